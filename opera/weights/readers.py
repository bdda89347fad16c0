"""``read_weights(SPEC)``: the weights the field hands out, as an opera backbone (and heads).

A SPEC is a local path: an opera run directory, ``last.pt`` or ``backbone.safetensors``; a
MoCo-v3 / OPERA ``main_moco.py``, ``main_lincls.py`` or ``convert_to_deit.py`` file; a timm or
torchvision state dict (``.pth``, ``.pt``, ``.safetensors``); or a folder of ``config.json`` +
``model.safetensors`` as ``timm.create_model("local-dir:DIR")`` reads it (its ``architecture``
field names the model, as timm's ``load_model_config_from_path``). The format is found from the
keys (:mod:`opera.weights.formats`). Nothing is ever downloaded: a hub name is a one-line error
saying where to put the file. Files are read with ``torch.load(weights_only=True)``
(:func:`opera.engine.checkpoint.load_state`: pickled code is refused, never run) or safetensors.

The backbone is strict: every tensor of the backbone must come from the file and every tensor of
the file must be used, except the classifier (``fc``, ``head``) that opera's backbones do not
have; anything else is a one-line :class:`OperaError` naming the first keys and the format the
file looked like. A ViT's position embeddings are resampled with timm's
``resample_abs_pos_embed`` when the patch grid differs; a differing patch size is an error.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opera.errors import OperaError
from opera.weights.formats import CLASSIFIERS, DESCRIPTIONS, Parsed, head_module, head_name, looks_like, parse

#: names that mean a download; opera reads local files only
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "hub:", "torch.hub:", "timm-hub:", "http://", "https://", "s3://", "gs://")

#: MoCo-v3's ``main_moco.py --arch`` names (``vits.py``) -> opera's backbone of the same network
ARCHS = {"vit_small": "deit_small", "vit_base": "deit_base"}
#: ``vits.py`` architectures opera has no backbone for
UNSUPPORTED_ARCHS = ("vit_conv_small", "vit_conv_base")

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


@dataclass
class Weights:
    """What :func:`read_weights` read: ``backbone`` (an opera backbone, strictly loaded), ``heads``
    (the rest, in an opera hierarchy's ``state_dict`` names; ``{}`` for backbone-only formats) and
    the one-line ``report``."""

    format: str
    source: str
    file: Path | None
    sha256: str | None
    backbone: nn.Module
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    report: str = ""


def sha256_file(path: str | Path) -> str:
    """sha256 of a file (cached per path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


# ------------------------------------------------------------------------------------ locating
def locate(spec: str) -> Path:
    """The file a SPEC names (a run directory -> its ``last.pt``, else ``backbone.safetensors``;
    a ``config.json`` folder -> its weights file), or a one-line error saying where to put it."""
    from opera.engine.checkpoint import BACKBONE, LAST

    spec = str(spec).strip()
    low = spec.lower()
    if low.startswith(HUB_PREFIXES):
        raise OperaError(f"{spec} names a download, and opera never downloads: fetch the weights yourself (e.g. "
                         "'huggingface-cli download NAME --local-dir DIR' for a config.json + model.safetensors "
                         "folder) and pass the local file or folder")
    path = Path(spec[len("local-dir:"):] if low.startswith("local-dir:") else spec).expanduser()
    if not path.exists():
        raise OperaError(f"weights {spec} do not exist; put the file there (a .pth/.pt/.safetensors checkpoint, or a "
                         "folder of config.json + model.safetensors) and pass its path - opera never downloads")
    if path.is_dir():
        if (path / "config.json").is_file():
            for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
                if (path / name).is_file():
                    return path / name
            raise OperaError(f"{path} has a config.json but no model.safetensors; put the weights beside it")
        for name in (LAST, BACKBONE):
            if (path / name).is_file():
                return path / name
        raise OperaError(f"{path} holds neither {BACKBONE} nor {LAST} (an opera run) nor config.json + model.safetensors; "
                         "pass the --output directory of an opera run, such a folder or a checkpoint file")
    return path


def _read_safetensors(file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(file)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise OperaError(f"cannot read {file}: {str(exc).splitlines()[0][:200]}; it is not a safetensors file") from None


def _load(file: Path) -> tuple[Parsed, dict[str, Any] | None]:
    """(the file's tensors in opera's names, the opera backbone spec where opera wrote it)."""
    from opera.engine.checkpoint import load_state

    if file.suffix == ".safetensors":
        tensors, meta = _read_safetensors(file)
        if meta.get("format") == "opera-backbone":
            return Parsed("opera", tensors), json.loads(meta.get("spec") or "null")
        obj: Any = tensors
        if (file.parent / "config.json").is_file():
            return Parsed("hf-dir", tensors), None
    else:
        obj = load_state(file)
    if isinstance(obj, dict) and obj.get("backbone_spec") and isinstance(obj.get("model"), dict):
        model = obj["model"]
        backbone = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
        heads = {k: v for k, v in model.items() if not k.startswith("backbone.")}
        return Parsed("opera", backbone, heads, left_out=[k for k in obj if k != "model"]), obj["backbone_spec"]
    parsed = parse(obj)
    if parsed is None:
        raise OperaError(f"{file} is none of the weight formats opera reads ({looks_like(list(obj) if isinstance(obj, dict) else [])}); "
                         "pass an opera run, a MoCo-v3/OPERA main_moco.py, main_lincls.py or convert_to_deit.py file, "
                         "a timm/torchvision state dict or a config.json + model.safetensors folder")
    if file.parent.joinpath("config.json").is_file() and parsed.format in ("timm", "torchvision"):
        parsed.format = "hf-dir"
    return parsed, None


# ------------------------------------------------------------------------------------ building
def _architecture(parsed: Parsed, file: Path, backbone: str | None, spec: dict | None) -> tuple[str, str | None, dict]:
    """(opera backbone name to build, the architecture the file names, options from the file)."""
    options: dict[str, Any] = {}
    if parsed.format == "opera":
        named = spec["name"]
        options = {k: v for k, v in spec.get("timm_kwargs", {}).items() if k not in ("num_classes", "img_size")}
        if backbone is not None and backbone != named:
            raise OperaError(f"{file} holds a {named!r} backbone, not {backbone!r}; pass weights of that backbone or "
                             f"--backbone {named}")
        return named, named, options
    if parsed.format == "hf-dir":
        cfg = json.loads((file.parent / "config.json").read_text())
        arch = cfg.get("architecture") or (cfg.get("pretrained_cfg") or {}).get("architecture")
        options = {k: v for k, v in (cfg.get("model_args") or {}).items() if k not in ("num_classes", "img_size")}
        named = f"timm:{arch}" if arch else None
    else:
        arch = parsed.arch
        if arch in UNSUPPORTED_ARCHS:
            raise OperaError(f"{file} holds MoCo-v3's {arch} (a convolutional stem), which opera has no backbone for; "
                             "use a vit_small / vit_base or ResNet checkpoint")
        named = ARCHS.get(arch, arch) if arch else None
    if backbone is None and named is None:
        raise OperaError(f"{file} is {parsed.description}, which does not name its architecture; pass --backbone NAME "
                         "(e.g. resnet50, deit_small, timm:vit_small_patch14_dinov2)")
    return backbone or named, arch, options


def _check_same_architecture(model: nn.Module, name: str, arch: str | None, named_by: str, file: Path) -> None:
    """A backbone other than the one the file names is one line (opera's name, or timm's, may agree)."""
    spec = model.opera_spec
    arch_timm = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}.get(arch or "", arch)
    if arch is None or name in (arch, ARCHS.get(arch)) or spec.timm_name == arch_timm:
        return
    raise OperaError(f"{file} holds a {arch!r} backbone ({named_by}), not {name!r}; pass --backbone {ARCHS.get(arch, arch)} "
                     "or weights of that backbone")


def _own_size(tensors: dict[str, torch.Tensor]) -> int | None:
    """A ViT's image size from its position embedding and patch projection (None for CNNs)."""
    pos, proj = tensors.get("pos_embed"), tensors.get("patch_embed.proj.weight")
    if pos is None or proj is None:
        return None
    n = pos.shape[1]
    for prefix in ((1, 0) if "cls_token" in tensors else (0,)):
        g = math.isqrt(n - prefix)
        if g * g == n - prefix:
            return g * int(proj.shape[-1])
    return None


def _fit(tensors: dict[str, torch.Tensor], model: nn.Module, file: Path) -> tuple[dict[str, torch.Tensor], str]:
    """``tensors`` with a ViT's position embedding resampled to ``model``'s patch grid (timm's
    ``resample_abs_pos_embed``), and the note saying so; a differing patch size is one line."""
    proj = tensors.get("patch_embed.proj.weight")
    embed = getattr(model, "patch_embed", None)
    if proj is not None and embed is not None and hasattr(embed, "patch_size"):
        have, want = tuple(proj.shape[-2:]), tuple(embed.patch_size)
        if have != want:
            raise OperaError(f"{file} has {have[0]}x{have[1]} patches but the backbone uses {want[0]}x{want[1]}; build it "
                             f"with patch size {have[0]} (--set backbone.patch_size={have[0]}) or pass weights of that patch size")
    pos = tensors.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pos is None or not isinstance(target, torch.Tensor) or pos.shape == target.shape:
        return tensors, ""
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old = math.isqrt(pos.shape[1] - prefix)
    if old * old != pos.shape[1] - prefix:
        raise OperaError(f"{file}'s position embedding ({pos.shape[1]} tokens) is not a square grid; it does not fit this ViT")
    new = list(embed.grid_size)
    out = dict(tensors)
    out["pos_embed"] = resample_abs_pos_embed(pos, new_size=new, old_size=[old, old], num_prefix_tokens=prefix)
    return out, f"position embeddings resampled from {old}x{old} to {new[0]}x{new[1]} (timm's resample_abs_pos_embed)"


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _match(tensors: dict[str, torch.Tensor], model: nn.Module, parsed: Parsed, file: Path, name: str,
           what: str = "backbone") -> list[str]:
    """Strictly check ``tensors`` against ``model``'s state dict; the classifier keys skipped."""
    expected = model.state_dict()
    skipped = [k for k in tensors if k not in expected and k.startswith(CLASSIFIERS)]
    unexpected = [k for k in tensors if k not in expected and k not in skipped]
    missing = [k for k in expected if k not in tensors]
    shapes = [f"{k} {list(tensors[k].shape)} vs {list(expected[k].shape)}" for k in tensors
              if k in expected and tensors[k].shape != expected[k].shape]
    problems = [f"{label} {_first(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                              ("other shapes", shapes)) if keys]
    if problems:
        raise OperaError(f"{file} looks like {parsed.description}, but its {what} does not fit backbone {name!r}: "
                         f"{'; '.join(problems)}; pass --backbone with the architecture it holds")
    return skipped


def _build(name: str, img_size: int, options: dict[str, Any]) -> nn.Module:
    """An opera backbone, its random init drawn without touching the caller's random state."""
    from opera.backbones import create_backbone

    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    with torch.random.fork_rng(devices=[]):
        return create_backbone(name, img_size=img_size, **options)


def _head_groups(heads: dict[str, torch.Tensor]) -> list[str]:
    return [head_name(m) for m in dict.fromkeys(head_module(k) for k in heads)]


def read_weights(spec: str, backbone: str | None = None, img_size: int | None = None,
                 backbone_options: dict[str, Any] | None = None) -> Weights:
    """Read SPEC (see the module docstring) into an opera backbone.

    ``backbone``: the opera backbone to build (``--backbone``); it must agree with the
    architecture the file names (``main_moco.py``'s ``arch``, ``config.json``'s
    ``architecture``, an opera spec), and formats that name none need it. ``img_size``: the
    image size to build a ViT for (its position embeddings are resampled); None: the file's own.
    ``backbone_options``: further ``create_backbone`` options (a ViT's ``patch_size`` ...).
    """
    file = locate(spec)
    parsed, opera_spec = _load(file)
    name, arch, options = _architecture(parsed, file, backbone, opera_spec)
    options = {**options, **{k: v for k, v in (backbone_options or {}).items() if v is not None}}
    size = img_size or _own_size(parsed.backbone) or ((opera_spec or {}).get("timm_kwargs", {}).get("img_size")) or 224
    model = _build(name, int(size), options)
    named_by = {"hf-dir": "config.json's architecture", "opera": "its opera spec"}.get(parsed.format, "its arch entry")
    _check_same_architecture(model, name, arch, named_by, file)
    tensors, note = _fit(parsed.backbone, model, file)
    skipped = _match(tensors, model, parsed, file, name)
    model.load_state_dict({k: v for k, v in tensors.items() if k not in skipped}, strict=True)
    heads = dict(parsed.heads)
    teacher = {k[len("teacher.backbone."):]: v for k, v in heads.items() if k.startswith("teacher.backbone.")}
    if teacher:
        teacher, _ = _fit(teacher, model, file)
        _match(teacher, model, parsed, file, name, what="momentum encoder")
        heads.update({"teacher.backbone." + k: v for k, v in teacher.items()})
    left = ([f"{sorted({k.split('.')[0] for k in skipped})[0]} (the classifier)"] if skipped else []) + parsed.left_out
    report = (f"read {file} as {parsed.description}: {len(tensors) - len(skipped)} backbone tensors matched, 0 missing, "
              f"0 unexpected ({'skipped ' + ', '.join(left) if left else 'nothing skipped'})")
    if heads:
        report += f"; heads: {', '.join(_head_groups(heads))}"
    if note:
        report += f"; {note}"
    return Weights(parsed.public_format, str(spec), file, sha256_file(file), model, heads, report)


def is_opera_checkpoint(path: str | Path) -> bool:
    """True for what opera itself writes (a run directory, ``backbone.safetensors`` with its spec,
    a ``last.pt`` with ``backbone_spec``): :func:`opera.engine.checkpoint.load_backbone` reads those."""
    from opera.engine.checkpoint import BACKBONE, LAST, load_state

    p = Path(path)
    if p.is_dir():
        return (p / BACKBONE).is_file() or (p / LAST).is_file()
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                return (f.metadata() or {}).get("format") == "opera-backbone"
        except Exception:  # noqa: BLE001 - not safetensors: the reader says why in one line
            return False
    try:
        state = load_state(p, mmap=True)
    except OperaError:
        return False
    return "backbone_spec" in state


__all__ = ["DESCRIPTIONS", "HUB_PREFIXES", "Weights", "is_opera_checkpoint", "locate", "read_weights", "sha256_file"]
