"""Write a backbone (and the MoCo-v3 heads of its run) in layouts that other code loads unchanged.

* ``opera``: ``backbone.safetensors`` as an opera run writes it (:func:`opera.engine.checkpoint.export_backbone`).
* ``mocov3``: the checkpoint of facebookresearch/moco-v3's ``main_moco.py`` ``save_checkpoint``:
  ``{"epoch", "arch", "state_dict"}`` where ``state_dict`` is ``MoCo_ResNet`` / ``MoCo_ViT``
  (``moco/builder.py``) under DistributedDataParallel: ``module.base_encoder.<backbone key>``, the
  projector in the base encoder's classifier slot (``module.base_encoder.fc.*`` for ResNets,
  ``module.base_encoder.head.*`` for ViTs), ``module.predictor.*`` and
  ``module.momentum_encoder.*`` (backbone and projector); OPERA's own ``moco/builder.py`` adds
  ``module.fully_projector.*``, the class head of the ``full`` space. Opera's heads are MoCo-v3's
  ``_build_mlp`` layer for layer (:func:`opera.supervisions.heads.build_mlp`), so their indices
  carry over. ``main_lincls.py --pretrained`` keeps the ``module.base_encoder.*`` keys outside
  the classifier, builds ``torchvision.models.<arch>()`` or ``vits.<arch>()`` and asserts that only
  the classifier (``fc`` / ``head``) is missing: the backbone has to be one of those
  architectures (:func:`mocov3_arch`), checked by every tensor's name and shape.
  ``vits.py`` builds its ViTs at 224 px with MoCo-v3's fixed 2-D sin-cos position embedding; a
  ViT of another size whose position embedding is that fixed one gets the 14x14 one written (a
  learned one is refused).
* ``hf``: a folder that ``timm.create_model("local-dir:DIR", pretrained=True)`` loads (timm's
  ``_hub.load_model_config_from_path`` / ``load_state_dict_from_path``): ``config.json`` as timm's
  ``save_config_for_hf`` writes it (``architecture``, ``num_classes`` 0, ``model_args``,
  ``pretrained_cfg`` with the input size and opera's ImageNet mean/std) plus ``opera_spec`` and
  ``opera_source``, and ``model.safetensors`` with timm's key names.

The key maps of torchvision, detectron2 and mmdet (:func:`timm_to_torchvision` ...) and the
architectures they name (:data:`TORCHVISION_RESNETS`) are here too; :mod:`opera.evals.export`
writes those formats and re-exports them.

Every file goes through :func:`opera.files.atomic_write`; bad inputs raise a one-line
:class:`~opera.errors.OperaError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from opera.errors import OperaError
from opera.files import atomic_write
from opera.weights.formats import MOCO_TO_OPERA

#: moco-v3 ``vits.py``: arch -> (embed_dim, depth, num_heads); all have patch 16, mlp_ratio 4,
#: qkv_bias, LayerNorm eps 1e-6, a class token and 224 px inputs
MOCOV3_VITS: dict[str, tuple[int, int, int]] = {
    "vit_small": (384, 12, 12), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16), "vit_huge": (1280, 32, 16),
}
MOCOV3_IMG_SIZE = 224
#: MoCo-v3's module of each head group of :data:`opera.weights.formats.MOCO_TO_OPERA` (``{kw}``: ``fc``
#: for ResNets, ``head`` for ViTs); OPERA's own ``moco/builder.py`` adds the class head ``fully_projector``
MOCOV3_MODULES = {"projector": "module.base_encoder.{kw}.", "predictor": "module.predictor.",
                  "momentum_backbone": "module.momentum_encoder.", "momentum_projector": "module.momentum_encoder.{kw}.",
                  "fully_projector": "module.fully_projector."}
#: opera hierarchy state names -> MoCo-v3's
MOCOV3_HEADS = {MOCO_TO_OPERA[group]: module for group, module in MOCOV3_MODULES.items()}
HF_FILES = ("config.json", "model.safetensors")


@dataclass
class Written:
    """What a writer wrote: the file or folder, how many tensors, the line that loads it, a note
    (what was adapted or left out; empty when nothing was) and the architecture the format names
    (main_lincls.py's ``--arch``, config.json's ``architecture``, a torchvision constructor)."""

    path: Path
    format: str
    tensors: int
    usage: str
    note: str = ""
    architecture: str = ""


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def backbone_spec(backbone: nn.Module) -> dict[str, Any]:
    """The backbone's opera spec as a dict; ``{}`` for a module opera did not build."""
    spec = getattr(backbone, "opera_spec", None)
    return spec.to_dict() if spec is not None else {}


def save_atomic(obj: Any, path: Path, what: str) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`opera.files.atomic_write` (one line on failure)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a Python file: a failed write is the OSError that names its cause
            torch.save(obj, f)

    return atomic_write(path, write, what=what)


_TV_KEY = re.compile(
    r"^(conv1\.weight|bn1\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|downsample\.0\.weight|downsample\.1\.(weight|bias|running_mean|running_var|num_batches_tracked)))$"
)


# ----------------------------------------------------------------------------- key maps
def timm_to_torchvision(state: dict[str, torch.Tensor], name: str = "backbone") -> dict[str, torch.Tensor]:
    """timm ResNet -> torchvision ResNet names (identical; the classifier ``fc`` is dropped)."""
    out = {k: v for k, v in state.items() if not k.startswith("fc.")}
    bad = [k for k in out if not _TV_KEY.match(k)]
    if bad or not any(k.startswith("layer1.") for k in out):
        raise OperaError(
            f"{name} is not a torchvision-style ResNet (e.g. key {bad[0] if bad else 'layer1.*'!r}); "
            "the torchvision, detectron2 and mmdet formats take resnet18/resnet50-like backbones: use --format timm"
        )
    return out


def torchvision_to_detectron2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ResNet names -> detectron2's (``convert-torchvision-to-d2.py``); detectron2's
    FrozenBatchNorm2d has no ``num_batches_tracked``, so those are dropped."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        m = re.match(r"^layer([1-4])\.(\d+)\.(.*)$", k)
        if m:
            stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
            rest = re.sub(r"^bn([1-3])\.", r"conv\1.norm.", rest)
            rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
            new = f"res{stage}.{block}.{rest}"
        else:
            new = "stem." + re.sub(r"^bn1\.", "conv1.norm.", k)
        out[new] = v
    return out


def detectron2_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`torchvision_to_detectron2` (without ``num_batches_tracked``)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = re.match(r"^res([2-5])\.(\d+)\.(.*)$", k)
        if m:
            rest = m.group(3)
            rest = re.sub(r"^conv([1-3])\.norm\.", r"bn\1.", rest)
            rest = re.sub(r"^shortcut\.norm\.", "downsample.1.", rest)
            rest = re.sub(r"^shortcut\.", "downsample.0.", rest)
            new = f"layer{int(m.group(1)) - 1}.{m.group(2)}.{rest}"
        elif k.startswith("stem."):
            new = re.sub(r"^conv1\.norm\.", "bn1.", k[len("stem."):])
        else:
            raise OperaError(f"unexpected detectron2 key {k!r}; expected stem.* or resN.M.*")
        out[new] = v
    return out


def torchvision_to_mmdet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"backbone.{k}": v for k, v in state.items()}


def mmdet_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}


# ----------------------------------------------------------------------------- architectures
#: torchvision's ResNet constructors: name -> (depth, groups, width per group)
TORCHVISION_RESNETS: dict[str, tuple[int, int, int]] = {
    "resnet18": (18, 1, 64), "resnet34": (34, 1, 64), "resnet50": (50, 1, 64), "resnet101": (101, 1, 64),
    "resnet152": (152, 1, 64), "resnext50_32x4d": (50, 32, 4), "resnext101_32x8d": (101, 32, 8),
    "resnext101_64x4d": (101, 64, 4), "wide_resnet50_2": (50, 1, 128), "wide_resnet101_2": (101, 1, 128),
}


def torchvision_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the torchvision constructor (:data:`TORCHVISION_RESNETS`) whose model, ``fc``
    left out, has exactly ``state``'s tensor names and shapes; None when none has."""
    import torchvision

    want = {k: tuple(v.shape) for k, v in state.items()}
    for name in TORCHVISION_RESNETS:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            model = getattr(torchvision.models, name)()
        if want == {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}:
            return name
    return None


# ----------------------------------------------------------------------------- opera
def write_opera(backbone: nn.Module, path: str | Path, source: dict[str, Any] | None = None) -> Written:
    """``backbone.safetensors`` as an opera run writes it: timm's names, the spec in the metadata."""
    from opera.engine.checkpoint import export_backbone

    if not backbone_spec(backbone):
        raise OperaError(f"{type(backbone).__name__} carries no opera spec; build it with opera.backbones.create_backbone")
    path = export_backbone(backbone, path, extra={"source": source or {}})
    return Written(Path(path), "opera", len(backbone.state_dict()),
                   f"opera run linear --checkpoint {path} (or --init {path})")


# ----------------------------------------------------------------------------- mocov3
def _vit_arch(backbone: nn.Module, name: str) -> str:
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):  # shapes only
        for arch, (dim, depth, heads) in MOCOV3_VITS.items():
            if getattr(backbone, "embed_dim", None) != dim or len(backbone.blocks) != depth:
                continue
            ref = VisionTransformer(img_size=MOCOV3_IMG_SIZE, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                                    mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0)
            want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "pos_embed"}
            got = {k: tuple(v.shape) for k, v in backbone.state_dict().items() if k != "pos_embed"}
            same = (want == got and backbone.blocks[0].attn.num_heads == heads and backbone.norm.eps == 1e-6
                    and backbone.global_pool == "token" and backbone.num_prefix_tokens == 1)
            if same:
                return arch
    _refuse(name, "ViT", "moco-v3's vits.py " + ", ".join(
        f"{a} (dim {d}, depth {n}, {h} heads, patch 16)" for a, (d, n, h) in MOCOV3_VITS.items()))


def _refuse(name: str, kind: str, archs: str) -> NoReturn:
    raise OperaError(f"{name} is built by none of the {kind}s main_lincls.py builds ({archs}), so MoCo-v3 cannot "
                     "load it; export it with --format timm or --format hf")


def mocov3_arch(backbone: nn.Module, name: str = "the backbone") -> tuple[str, str]:
    """(``--arch`` of main_lincls.py, its ``linear_keyword``) for ``backbone``; a one-line error for
    a backbone that neither ``torchvision.models`` nor moco-v3's ``vits.py`` builds."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, VisionTransformer):
        return _vit_arch(backbone, name), "head"
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    arch = torchvision_architecture(state) if any(k.startswith("layer1.") for k in state) else None
    if arch is None:
        _refuse(name, "ResNet", ", ".join(TORCHVISION_RESNETS))
    return arch, "fc"


def _mocov3_pos_embed(pe: torch.Tensor, grid: tuple[int, int], name: str) -> tuple[torch.Tensor, str]:
    """``pe`` for vits.py's 224 px grid: unchanged at 14x14; MoCo-v3's fixed sin-cos embedding
    (class token row zero) rewritten for 14x14; a learned one is refused."""
    from opera.backbones.vit import sincos_2d_position_embedding

    side = MOCOV3_IMG_SIZE // 16
    if tuple(grid) == (side, side):
        return pe, ""
    dim = pe.shape[-1]

    def fixed(h: int, w: int) -> torch.Tensor:
        return torch.cat([torch.zeros(1, dim), sincos_2d_position_embedding(h, w, dim)])[None].to(pe.dtype)

    if pe.shape != fixed(*grid).shape or not torch.allclose(pe.cpu(), fixed(*grid), atol=1e-6):
        raise OperaError(f"{name} has a learned position embedding for {grid[0]}x{grid[1]} patches, but main_lincls.py "
                         f"builds its ViTs for {MOCOV3_IMG_SIZE} px ({side}x{side} patches); export it with --format hf "
                         "or --format timm")
    return fixed(side, side), (f"position embedding: MoCo-v3's fixed 2-D sin-cos, written for {side}x{side} patches "
                               f"({MOCOV3_IMG_SIZE} px, vits.py) instead of {grid[0]}x{grid[1]}")


def mocov3_checkpoint(backbone: nn.Module, heads: dict[str, torch.Tensor] | None = None,
                      name: str = "the backbone") -> tuple[dict[str, Any], str]:
    """(main_moco.py's checkpoint dict, a note) for ``backbone`` and the opera ``heads`` of its run
    (hierarchy names, :data:`MOCOV3_HEADS`; other heads have no place in MoCo-v3 and are left out).
    ``epoch`` is 0: without ``optimizer`` and ``scaler`` the file starts main_lincls.py or a new
    main_moco.py run, it does not resume one."""
    arch, kw = mocov3_arch(backbone, name)
    notes: list[str] = []

    def encoder(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        state = _cpu(state)
        if kw == "head":
            state["pos_embed"], note = _mocov3_pos_embed(state["pos_embed"], backbone.patch_embed.grid_size, name)
            notes.append(note)
        return {prefix + k: v for k, v in state.items()}

    out = encoder(backbone.state_dict(), "module.base_encoder.")
    heads = _cpu(heads or {})
    teacher = {k[len("teacher.backbone."):]: v for k, v in heads.items() if k.startswith("teacher.backbone.")}
    if teacher:
        out.update(encoder(teacher, "module.momentum_encoder."))
    left = []
    for k, v in heads.items():
        old = next((o for o in MOCOV3_HEADS if k.startswith(o)), None)
        if old is None:
            left.append(k)
        elif old != "teacher.backbone.":
            out[MOCOV3_HEADS[old].format(kw=kw) + k[len(old):]] = v
    if left:
        spaces = sorted({".".join(k.split(".")[:2]) for k in left})
        notes.append(f"left out {len(left)} tensors of {', '.join(spaces)} (MoCo-v3 has no place for them)")
    return {"epoch": 0, "arch": arch, "state_dict": out}, "; ".join(dict.fromkeys(n for n in notes if n))


def write_mocov3(backbone: nn.Module, path: str | Path, heads: dict[str, torch.Tensor] | None = None,
                 name: str = "the backbone") -> Written:
    """main_moco.py's ``checkpoint_%04d.pth.tar`` for ``backbone`` (see :func:`mocov3_checkpoint`)."""
    ckpt, note = mocov3_checkpoint(backbone, heads, name)
    path = save_atomic(ckpt, Path(path), "the MoCo-v3 checkpoint")
    usage = f"python main_lincls.py -a {ckpt['arch']} --pretrained {path} [imagenet folder]"
    return Written(path, "mocov3", len(ckpt["state_dict"]), usage, note, ckpt["arch"])


# ----------------------------------------------------------------------------- hf
def _check_hf_folder(folder: Path) -> None:
    """A new or empty folder, or one that holds only a previous opera ``hf`` export."""
    if folder.exists() and not folder.is_dir():
        raise OperaError(f"{folder} is a file; --format hf writes a folder: pass a new or empty folder")
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    ours = set(names) <= set(HF_FILES) and "opera_spec" in _json_or_empty(folder / "config.json")
    if names and not ours:
        raise OperaError(f"{folder} is not empty ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
                         "--format hf writes a new folder: pass a new or empty one")


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def hf_config(backbone: nn.Module, source: dict[str, Any] | None = None, img_size: int | None = None) -> dict[str, Any]:
    """timm's ``config.json`` for ``backbone`` (``save_config_for_hf``), without the tag, license and
    hub ids of timm's pretrained weights (these are not those weights), with opera's normalisation
    and metadata. ``img_size``: the input size the weights were trained at, for a model that takes
    any size (a ResNet; a ViT's own size is its model argument)."""
    import tempfile

    from timm.models._hub import save_config_for_hf

    from opera.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    spec = backbone_spec(backbone)
    if not spec or not hasattr(backbone, "pretrained_cfg"):
        raise OperaError(f"{type(backbone).__name__} was not built by timm.create_model with an opera spec, so no "
                         "config.json can describe it; build it with opera.backbones.create_backbone")
    model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in spec["timm_kwargs"].items()}
    with tempfile.TemporaryDirectory() as tmp:
        data = {"input_size": (3, img_size, img_size)} if img_size else None
        save_config_for_hf(backbone, f"{tmp}/config.json", model_args={**model_args, "num_classes": 0}, data_config=data)
        cfg = json.loads(Path(tmp, "config.json").read_text())
    pre = cfg["pretrained_cfg"]
    for key in ("tag", "license", "hf_hub_id", "url", "file", "paper_ids", "paper_name", "notes", "origin_url"):
        pre.pop(key, None)
    pre.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    cfg["opera_spec"] = spec
    cfg["opera_source"] = source or {}
    return cfg


def write_hf(backbone: nn.Module, folder: str | Path, source: dict[str, Any] | None = None,
             img_size: int | None = None) -> Written:
    """A folder for ``timm.create_model("local-dir:FOLDER", pretrained=True)``: ``model.safetensors``
    first, then ``config.json`` (a folder with a config is complete)."""
    from safetensors.torch import save

    folder = Path(folder)
    _check_hf_folder(folder)
    cfg = hf_config(backbone, source, img_size)
    state = _cpu(backbone.state_dict())
    meta = {"format": "pt", "opera_spec": json.dumps(cfg["opera_spec"]), "opera_source": json.dumps(cfg["opera_source"])}
    atomic_write(folder / "model.safetensors", lambda tmp: Path(tmp).write_bytes(save(state, metadata=meta)),
                 what="the hf export's weights")
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(cfg, indent=2) + "\n"),
                 what="the hf export's config.json")
    return Written(folder, "hf", len(state), f"m = timm.create_model('local-dir:{folder}', pretrained=True)",
                   architecture=cfg["architecture"])
