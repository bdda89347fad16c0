"""The one checkpoint writer and reader of opera.

* Every file is written atomically: to a temporary file in the same folder, flushed and fsynced,
  then renamed over the target - a run killed mid-write leaves the previous checkpoint intact.
* Training states (``last.pt``, ``epoch_NNNN.pt``) hold only tensors and plain Python values and
  are loaded with ``torch.load(weights_only=True)``: no pickled code ever runs.
* The backbone alone goes to ``backbone.safetensors`` with its build spec in the metadata, so it
  loads into ``timm.create_model(timm_name, **timm_kwargs)`` without opera.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open
from torch import nn

from opera.errors import OperaError

LAST = "last.pt"
BACKBONE = "backbone.safetensors"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` over ``path`` (same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_state(state: dict[str, Any], path: str | Path) -> Path:
    """Atomically save a training state (tensors and plain values only)."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    """Load a training state with ``weights_only=True``; a bad file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise OperaError(f"checkpoint {path} does not exist; pass a run directory with {LAST} or a .pt file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or holding pickled objects
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OperaError(f"cannot load checkpoint {path}: {first[:200]}; it is corrupt or not an opera checkpoint") from None
    if not isinstance(state, dict):
        raise OperaError(f"checkpoint {path} is not an opera training state; pass a file written by 'opera run pretrain'")
    return state


def export_backbone(backbone: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the backbone's weights to safetensors with its spec (``opera_spec``) as metadata."""
    spec = getattr(backbone, "opera_spec", None)
    meta = {"format": "opera-backbone", "spec": json.dumps(spec.to_dict() if spec else None)}
    for k, v in (extra or {}).items():
        meta[k] = json.dumps(v)
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_backbone_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of a ``backbone.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise OperaError(f"backbone file {path} does not exist; pass a run directory or its {BACKBONE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise OperaError(f"cannot read {path}: {str(exc).splitlines()[0][:200]}; it is not a safetensors file") from None
    meta = {k: json.loads(v) if k != "format" else v for k, v in raw_meta.items()}
    return tensors, meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory or a file -> the file to read (``backbone.safetensors`` preferred)."""
    path = Path(path)
    if path.is_dir():
        for name in (BACKBONE, LAST):
            if (path / name).is_file():
                return path / name
        raise OperaError(f"{path} holds neither {BACKBONE} nor {LAST}; pass the --output directory of an opera run")
    if not path.exists():
        raise OperaError(f"checkpoint {path} does not exist; pass a run directory or a checkpoint file")
    return path


def load_backbone(path: str | Path, expect: str | None = None) -> nn.Module:
    """Rebuild the backbone of an opera run (directory, ``backbone.safetensors`` or ``.pt``)."""

    file = resolve_checkpoint(path)
    if file.suffix == ".safetensors":
        tensors, meta = read_backbone_file(file)
        spec = meta.get("spec")
    else:
        state = load_state(file)
        spec = state.get("backbone_spec")
        tensors = {k[len("backbone."):]: v for k, v in state.get("model", {}).items() if k.startswith("backbone.")}
    if not spec:
        raise OperaError(f"{file} carries no backbone spec; it was not written by opera")
    if expect is not None and spec["name"] != expect:
        raise OperaError(f"{file} holds a {spec['name']!r} backbone, not {expect!r}; pass a checkpoint of that backbone or --backbone {spec['name']}")
    kwargs = {k: v for k, v in spec["timm_kwargs"].items() if k != "num_classes"}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    import timm

    backbone = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0, **kwargs)
    missing, unexpected = backbone.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise OperaError(f"{file} does not match backbone {spec['name']!r} (missing {len(missing)}, unexpected {len(unexpected)} keys); the file is damaged or from another model")
    from opera.backbones import BackboneSpec, guard_image_size

    guard_image_size(backbone, spec["name"])
    backbone.opera_spec = BackboneSpec(spec["name"], spec["timm_name"], spec["timm_kwargs"])
    return backbone
