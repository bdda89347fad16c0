"""Export a pretrained backbone for downstream frameworks (paper Tables 10-11: ADE20K, COCO).

Formats (``--format``):

* ``timm``: ``backbone_timm.safetensors``, timm's own key names; loads with
  ``timm.create_model(timm_name, num_classes=0, **timm_kwargs)`` + ``load_state_dict`` or
  ``timm.models.load_checkpoint`` (any backbone, ViTs included).
* ``torchvision``: ``backbone_torchvision.pth``, a plain state dict with torchvision's ResNet
  names (``conv1``, ``bn1``, ``layerN.M.convK/bnK``, ``layerN.M.downsample.0/1``) and no ``fc``;
  loads into ``torchvision.models.resnet50()`` (``strict=False`` for the absent ``fc``) and
  strictly into the ``backbone.body`` of ``maskrcnn_resnet50_fpn`` / the ``backbone`` of
  ``fcn_resnet50``. timm's ResNet uses the same names, so this is timm's state minus ``fc``.
* ``detectron2``: ``backbone_detectron2.pth`` = ``{"model": state, "__author__": "opera",
  "matching_heuristics": True}`` with detectron2's names (``stem.conv1.weight``,
  ``stem.conv1.norm.*``, ``res2.0.conv1.weight``, ``res2.0.conv1.norm.*``, ``res2.0.shortcut.*``),
  what ``tools/convert-torchvision-to-d2.py`` writes. Use it as ``MODEL.WEIGHTS`` with
  ``MODEL.RESNETS.STRIDE_IN_1X1 False`` and torchvision's RGB pixel mean/std
  (``MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]``, ``MODEL.PIXEL_STD [58.395, 57.120, 57.375]``,
  ``INPUT.FORMAT RGB``).
* ``mmdet``: ``backbone_mmdet.pth`` = ``{"state_dict": {"backbone." + torchvision name: ...},
  "meta": {...}}``; mmdet's ResNet uses torchvision's names. Use it as ``load_from`` or as
  ``init_cfg=dict(type="Pretrained", checkpoint=PATH, prefix="backbone.")`` of the backbone.

The torchvision, detectron2 and mmdet formats need a torchvision-style ResNet (``resnet18``,
``resnet50``, ``resnet_tiny``, ...); other backbones get a one-line error pointing to ``timm``.
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


# ----------------------------------------------------------------------------- files
def _usage(fmt: str, path: Path, spec: dict) -> str:
    if fmt == "timm":
        kw = ", ".join(f"{k}={v!r}" for k, v in spec.get("timm_kwargs", {}).items() if k != "num_classes")
        return (f"m = timm.create_model({spec.get('timm_name')!r}, num_classes=0{', ' + kw if kw else ''}); "
                f"m.load_state_dict(safetensors.torch.load_file({str(path)!r}))")
    if fmt == "torchvision":
        return f"torchvision.models.resnet50().load_state_dict(torch.load({str(path)!r}), strict=False)  # fc is absent"
    if fmt == "detectron2":
        return (f"MODEL.WEIGHTS {path} MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB "
                "MODEL.PIXEL_MEAN [123.675,116.280,103.530] MODEL.PIXEL_STD [58.395,57.120,57.375]")
    return f"load_from = {str(path)!r}  # or backbone init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')"


def write_export(state: dict[str, torch.Tensor], fmt: str, path: Path, spec: dict, source: dict) -> Path:
    from safetensors.torch import save_file

    from opera.engine.checkpoint import atomic_write

    meta = {"exporter": "opera", "format": fmt, "backbone_spec": spec, "source": source}
    if fmt == "timm":
        import json

        md = {"format": "pt", "opera_spec": json.dumps(spec), "opera_source": json.dumps(source)}
        return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=md), what=f"the {fmt} export")
    if fmt == "torchvision":
        obj: Any = state
    elif fmt == "detectron2":
        obj = {"model": state, "__author__": "opera", "matching_heuristics": True}
    else:
        obj = {"state_dict": state, "meta": meta}
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), what=f"the {fmt} export")


def run_export(cfg: ExportConfig) -> dict:
    """Export ``cfg.checkpoint``'s backbone in ``cfg.format`` into ``cfg.output``."""
    fmt = choose("--format", cfg.format, FORMATS)
    loaded = load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, cfg.data, cfg.seed)
    state = convert(loaded.model.state_dict(), fmt, name=f"backbone {loaded.name!r}")
    run = EvalRun("export", cfg, tensorboard=False)
    path = run.path(f"backbone_{fmt}{EXTENSIONS[fmt]}")
    source = {"checkpoint": loaded.source, "sha256": loaded.sha256}
    write_export(state, fmt, path, loaded.spec or {}, source)
    metrics = {"format": fmt, "file": str(path), "sha256": sha256_file(path), "tensors": len(state),
               "parameters": int(sum(v.numel() for k, v in state.items() if "running_" not in k and "num_batches" not in k)),
               "usage": _usage(fmt, path, loaded.spec or {})}
    return run.finish(metrics, loaded, data={}, title=f"export {fmt}: {loaded.source}")
