"""Export a pretrained backbone for downstream frameworks (paper Tables 10-11: ADE20K, COCO).

Formats (``--format``):

* ``timm``: ``backbone_timm.safetensors``, timm's own key names; loads with
  ``timm.create_model(timm_name, num_classes=0, **timm_kwargs)`` + ``load_state_dict`` or
  ``timm.models.load_checkpoint`` (any backbone, ViTs included).
* ``torchvision``: ``backbone_torchvision.pth``, a plain state dict with torchvision's ResNet
  names (``conv1``, ``bn1``, ``layerN.M.convK/bnK``, ``layerN.M.downsample.0/1``) and no ``fc``;
  timm's ResNet uses the same names, so this is timm's state minus ``fc``. It loads strictly into
  the torchvision constructor of the same architecture with ``fc = Identity()`` (the printed
  ``usage``), into the ``backbone.body`` of ``maskrcnn_resnet50_fpn`` / the ``backbone`` of
  ``fcn_resnet50`` for a ResNet-50.
* ``detectron2``: ``backbone_detectron2.pth`` = ``{"model": state, "__author__": "opera",
  "matching_heuristics": True}`` with detectron2's names (``stem.conv1.weight``,
  ``stem.conv1.norm.*``, ``res2.0.conv1.weight``, ``res2.0.conv1.norm.*``, ``res2.0.shortcut.*``),
  what ``tools/convert-torchvision-to-d2.py`` writes. Use it as ``MODEL.WEIGHTS`` with the
  architecture's ``MODEL.RESNETS.DEPTH`` (and ``NUM_GROUPS`` / ``WIDTH_PER_GROUP``,
  ``RES2_OUT_CHANNELS 64`` for depths 18 and 34), ``MODEL.RESNETS.STRIDE_IN_1X1 False`` and
  torchvision's RGB pixel mean/std (``MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]``,
  ``MODEL.PIXEL_STD [58.395, 57.120, 57.375]``, ``INPUT.FORMAT RGB``).
* ``mmdet``: ``backbone_mmdet.pth`` = ``{"state_dict": {"backbone." + torchvision name: ...},
  "meta": {...}}``; mmdet's ResNet uses torchvision's names. Use it as the backbone's
  ``init_cfg=dict(type="Pretrained", checkpoint=PATH, prefix="backbone.")`` with the
  architecture's ``depth`` (``ResNeXt``: ``groups``, ``base_width``) and the FPN's ``in_channels``.

The torchvision, detectron2 and mmdet formats need a torchvision-style ResNet; other backbones
(ViTs) get a one-line error pointing to ``timm``. Each ``usage`` line names the architecture the
weights have (:data:`TORCHVISION_RESNETS`, matched by every tensor's name and shape): a ResNet
that none of torchvision's constructors builds (``resnet_tiny``: one BasicBlock per stage,
widths 32-256) is refused by ``--format torchvision``, and its detectron2 / mmdet files come with
a usage line saying that no stock config of those libraries builds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opera.errors import OperaError
from opera.evals.common import EvalConfig, EvalRun, choose, load_eval_backbone, sha256_file

FORMATS = ("timm", "torchvision", "detectron2", "mmdet")
EXTENSIONS = {"timm": ".safetensors", "torchvision": ".pth", "detectron2": ".pth", "mmdet": ".pth"}

_TV_KEY = re.compile(
    r"^(conv1\.weight|bn1\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|layer[1-4]\.\d+\.(conv[1-3]\.weight|bn[1-3]\.(weight|bias|running_mean|running_var|num_batches_tracked)"
    r"|downsample\.0\.weight|downsample\.1\.(weight|bias|running_mean|running_var|num_batches_tracked)))$"
)
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"


@dataclass
class ExportConfig(EvalConfig):
    format: str = "timm"
    data: str = "digits"  # unused (only picks the default image size of random:/timm: baselines)


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


def convert(state: dict[str, torch.Tensor], fmt: str, name: str = "backbone") -> dict[str, torch.Tensor]:
    """The backbone's (timm) state dict in the key names of ``fmt``."""
    choose("--format", fmt, FORMATS)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if fmt == "timm":
        return state
    tv = timm_to_torchvision(state, name)
    if fmt == "torchvision":
        return tv
    if fmt == "detectron2":
        return torchvision_to_detectron2(tv)
    return torchvision_to_mmdet(tv)


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


def describe_resnet(state: dict[str, torch.Tensor]) -> str:
    """``"BasicBlock stages [1, 1, 1, 1], widths [32, 64, 128, 256]"`` of a torchvision-named state."""
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5)]
    kind = "Bottleneck" if "layer1.0.conv3.weight" in state else "BasicBlock"
    last = "bn3" if kind == "Bottleneck" else "bn2"
    widths = [state[f"layer{i}.{n - 1}.{last}.weight"].shape[0] if n else 0 for i, n in enumerate(blocks, 1)]
    return f"{kind} stages {blocks}, widths {widths}"


def check_describable(state: dict[str, torch.Tensor], fmt: str, name: str) -> str | None:
    """The torchvision architecture of ``state`` (a torchvision-named ResNet state); a one-line
    error for ``--format torchvision`` when none of torchvision's constructors builds it."""
    arch = torchvision_architecture(state)
    if arch is None and fmt == "torchvision":
        raise OperaError(
            f"{name} ({describe_resnet(state)}) is built by none of torchvision's ResNets, so no torchvision model loads "
            f"its weights; --format torchvision takes {', '.join(TORCHVISION_RESNETS)}: export this one with --format timm"
        )
    return arch


# ----------------------------------------------------------------------------- files
def _usage(fmt: str, path: Path, spec: dict, arch: str | None = None, shape: str = "") -> str:
    """The line that loads the exported file, for the architecture ``arch`` (a key of
    :data:`TORCHVISION_RESNETS`; None: a ResNet ``shape`` that no stock config builds)."""
    if fmt == "timm":
        kw = ", ".join(f"{k}={v!r}" for k, v in spec.get("timm_kwargs", {}).items() if k != "num_classes")
        return (f"m = timm.create_model({spec.get('timm_name')!r}, num_classes=0{', ' + kw if kw else ''}); "
                f"m.load_state_dict(safetensors.torch.load_file({str(path)!r}))")
    if fmt == "torchvision":  # check_describable refused an arch of None
        return f"m = torchvision.models.{arch}(); m.fc = torch.nn.Identity(); m.load_state_dict(torch.load({str(path)!r}))"
    depth, groups, width = TORCHVISION_RESNETS.get(arch or "", (0, 0, 0))
    if arch is None or (fmt == "mmdet" and arch.startswith("wide_")):  # mmdet's ResNeXt with groups=1 is a plain ResNet
        return (f"no stock {fmt} config builds this backbone ({shape}): {path} holds its weights under {fmt}'s names "
                "for a ResNet with those stages built in code")
    if fmt == "detectron2":
        opts = f"MODEL.RESNETS.DEPTH {depth}" + (" MODEL.RESNETS.RES2_OUT_CHANNELS 64" if depth < 50 else "")
        if (groups, width) != (1, 64):
            opts += f" MODEL.RESNETS.NUM_GROUPS {groups} MODEL.RESNETS.WIDTH_PER_GROUP {width}"
        return (f"MODEL.WEIGHTS {path} {opts} MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB "
                "MODEL.PIXEL_MEAN [123.675,116.280,103.530] MODEL.PIXEL_STD [58.395,57.120,57.375]")
    backbone = f"type='ResNet', depth={depth}" if groups == 1 else f"type='ResNeXt', depth={depth}, groups={groups}, base_width={width}"
    channels = [c * (4 if depth >= 50 else 1) for c in (64, 128, 256, 512)]
    return (f"model = dict(backbone=dict({backbone}, init_cfg=dict(type='Pretrained', checkpoint={str(path)!r}, "
            f"prefix='backbone.')), neck=dict(in_channels={channels}))")


def write_export(state: dict[str, torch.Tensor], fmt: str, path: Path, spec: dict, source: dict) -> Path:
    from safetensors.torch import save

    from opera.files import atomic_write

    meta = {"exporter": "opera", "format": fmt, "backbone_spec": spec, "source": source}
    if fmt == "timm":
        import json

        md = {"format": "pt", "opera_spec": json.dumps(spec), "opera_source": json.dumps(source)}
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(save(state, metadata=md)), what=f"the {fmt} export")
    if fmt == "torchvision":
        obj: Any = state
    elif fmt == "detectron2":
        obj = {"model": state, "__author__": "opera", "matching_heuristics": True}
    else:
        obj = {"state_dict": state, "meta": meta}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a Python file: a failed write is the OSError that names its cause
            torch.save(obj, f)

    return atomic_write(path, write, what=f"the {fmt} export")


def run_export(cfg: ExportConfig) -> dict:
    """Export ``cfg.checkpoint``'s backbone in ``cfg.format`` into ``cfg.output``; ``usage`` (in
    results.json and the table) is the line that loads it for this backbone's architecture."""
    fmt = choose("--format", cfg.format, FORMATS)
    loaded = load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, cfg.data, cfg.seed)
    name = f"backbone {loaded.name!r}"
    state = convert(loaded.model.state_dict(), fmt, name=name)
    arch, shape = None, ""
    if fmt != "timm":
        tv = convert(loaded.model.state_dict(), "torchvision", name=name)
        arch, shape = check_describable(tv, fmt, name), describe_resnet(tv)
    run = EvalRun("export", cfg, tensorboard=False)
    path = run.path(f"backbone_{fmt}{EXTENSIONS[fmt]}")
    source = {"checkpoint": loaded.source, "sha256": loaded.sha256}
    write_export(state, fmt, path, loaded.spec or {}, source)
    metrics = {"format": fmt, "file": str(path), "sha256": sha256_file(path), "tensors": len(state),
               "parameters": int(sum(v.numel() for k, v in state.items() if "running_" not in k and "num_batches" not in k)),
               **({"architecture": arch or shape} if fmt != "timm" else {}),
               "usage": _usage(fmt, path, loaded.spec or {}, arch, shape)}
    res = run.finish(metrics, loaded, data={}, title=f"export {fmt}: {loaded.source}")
    from rich.console import Console

    kind = "note" if metrics["usage"].startswith("no stock") else "usage"
    Console(soft_wrap=True, highlight=False).print(f"{kind}: {metrics['usage']}", markup=False)
    return res
