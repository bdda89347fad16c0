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
* ``mocov3``: ``backbone_mocov3.pth.tar``, the checkpoint of MoCo-v3's ``main_moco.py`` that
  its ``main_lincls.py -a ARCH --pretrained FILE`` loads unchanged, with the projector, predictor
  and momentum encoder of the opera run where it has them (:func:`opera.weights.writers.mocov3_checkpoint`);
  torchvision's ResNets and moco-v3's ``vits.py`` ViTs only.
* ``hf``: ``backbone_hf/`` (``config.json`` + ``model.safetensors``), which
  ``timm.create_model("local-dir:backbone_hf", pretrained=True)`` loads (:func:`opera.weights.writers.write_hf`).

``opera convert IN OUT --format F`` (:func:`run_convert`) writes the same files, and opera's own
``backbone.safetensors`` (``--format opera``), from anything :func:`opera.weights.read_weights`
reads, without training. The key maps and architectures live in :mod:`opera.weights.writers`
(re-exported here).

The torchvision, detectron2 and mmdet formats need a torchvision-style ResNet; other backbones
(ViTs) get a one-line error pointing to ``timm``. Each ``usage`` line names the architecture the
weights have (:data:`TORCHVISION_RESNETS`, matched by every tensor's name and shape): a ResNet
that none of torchvision's constructors builds (``resnet_tiny``: one BasicBlock per stage,
widths 32-256) is refused by ``--format torchvision``, and its detectron2 / mmdet files come with
a usage line saying that no stock config of those libraries builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opera.errors import OperaError
from opera.evals.common import EvalConfig, EvalRun, choose, load_eval_backbone, sha256_file
from opera.weights.writers import (  # noqa: F401  (re-exported: the key maps and architectures live with the writers)
    TORCHVISION_RESNETS, Written, backbone_spec, detectron2_to_torchvision, mmdet_to_torchvision,
    save_atomic, timm_to_torchvision, torchvision_architecture, torchvision_to_detectron2, torchvision_to_mmdet, write_hf,
    write_mocov3, write_opera,
)

FORMATS = ("timm", "torchvision", "detectron2", "mmdet", "mocov3", "hf")
#: what ``opera convert`` writes: the export formats and opera's own ``backbone.safetensors``
WRITABLE = ("opera", *FORMATS)
EXTENSIONS = {"timm": ".safetensors", "torchvision": ".pth", "detectron2": ".pth", "mmdet": ".pth", "mocov3": ".pth.tar",
              "hf": ""}  # hf: a folder


@dataclass
class ExportConfig(EvalConfig):
    format: str = "timm"
    data: str = "digits"  # unused (only picks the default image size of random:/timm: baselines)


# ----------------------------------------------------------------------------- key maps
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
        load = "safetensors.torch.load_file" if path.suffix == ".safetensors" else "torch.load"
        return (f"m = timm.create_model({spec.get('timm_name')!r}, num_classes=0{', ' + kw if kw else ''}); "
                f"m.load_state_dict({load}({str(path)!r}))")
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
    if fmt == "timm" and path.suffix != ".safetensors":  # a .pth for timm.models.load_checkpoint
        obj: Any = state
    elif fmt == "timm":
        import json

        md = {"format": "pt", "opera_spec": json.dumps(spec), "opera_source": json.dumps(source)}
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(save(state, metadata=md)), what=f"the {fmt} export")
    elif fmt == "torchvision":
        obj = state
    elif fmt == "detectron2":
        obj = {"model": state, "__author__": "opera", "matching_heuristics": True}
    else:
        obj = {"state_dict": state, "meta": meta}
    return save_atomic(obj, path, f"the {fmt} export")


def write_format(backbone: torch.nn.Module, fmt: str, path: str | Path, source: dict[str, Any],
                 heads: dict[str, torch.Tensor] | None = None, img_size: int | None = None) -> Written:
    """Write ``backbone`` in ``fmt`` (one of :data:`WRITABLE`) to ``path`` (a folder for ``hf``);
    ``heads`` (opera hierarchy names) go into a ``mocov3`` checkpoint only,
    ``img_size`` (the size the weights were trained at) into an ``hf`` config only."""
    fmt = choose("--format", fmt, WRITABLE)
    spec = backbone_spec(backbone)
    name = f"backbone {spec.get('name', type(backbone).__name__)!r}"
    path = Path(path)
    if fmt == "opera":
        return write_opera(backbone, path, source)
    if fmt == "mocov3":
        return write_mocov3(backbone, path, heads, name)
    if fmt == "hf":
        return write_hf(backbone, path, source, img_size)
    state = convert(backbone.state_dict(), fmt, name=name)
    arch, shape = None, ""
    if fmt != "timm":
        tv = convert(backbone.state_dict(), "torchvision", name=name)
        arch, shape = check_describable(tv, fmt, name), describe_resnet(tv)
    write_export(state, fmt, path, spec, source)
    return Written(path, fmt, len(state), _usage(fmt, path, spec, arch, shape), architecture=arch or shape)


def _heads(cfg: ExportConfig, kind: str) -> dict[str, torch.Tensor]:
    """The heads of the checkpoint's run (an opera run's ``last.pt``, a MoCo-v3 checkpoint), in
    opera hierarchy names; none for a random or timm baseline."""
    from opera.weights import read_weights

    if kind in ("random", "timm"):
        return {}
    return read_weights(cfg.checkpoint, cfg.backbone, cfg.img_size).heads


def run_convert(source: str, out: str | Path, fmt: str, backbone: str | None = None, img_size: int | None = None) -> Written:
    """Read ``source`` (anything :func:`opera.weights.read_weights` reads) and write it to ``out`` in
    ``fmt`` (:data:`WRITABLE`) without training; prints one line: what was read, what was written
    and the line that loads it."""
    from opera.weights import read_weights

    fmt = choose("--format", fmt, WRITABLE)
    out = Path(out)
    _check_out(out, fmt, source)
    w = read_weights(source, backbone=backbone, img_size=img_size)
    src = {"checkpoint": w.source, "format": w.format, "file": str(w.file), "sha256": w.sha256}
    written = write_format(w.backbone, fmt, out, src, w.heads, img_size=img_size)
    note = f" ({written.note})" if written.note else ""
    print(f"{w.report}; wrote {written.path} as {fmt}: {written.tensors} tensors{note}; load it with: {written.usage}",
          flush=True)
    return written


def _check_out(out: Path, fmt: str, source: str) -> None:
    """One line for an ``OUT`` that ``fmt`` cannot be written to (what else an ``hf`` folder may
    hold is checked by its writer)."""
    from opera.weights.readers import locate

    if fmt != "hf" and out.is_dir():
        raise OperaError(f"{out} is a folder; --format {fmt} writes a file: pass a file name such as "
                         f"{out / ('backbone.safetensors' if fmt == 'opera' else 'backbone_' + fmt + EXTENSIONS[fmt])}")
    read = locate(source).resolve()
    if out.exists() and out.resolve() in (read, read.parent if fmt == "hf" else read):
        raise OperaError(f"{out} holds the weights being read; write the conversion elsewhere")
    if fmt == "opera" and out.suffix != ".safetensors":
        raise OperaError(f"--format opera writes a safetensors file, but {out} ends in {out.suffix or 'no suffix'!r}: "
                         "name it backbone.safetensors")


def run_export(cfg: ExportConfig) -> dict:
    """Export ``cfg.checkpoint``'s backbone in ``cfg.format`` into ``cfg.output``; ``usage`` (in
    results.json and the table) is the line that loads it for this backbone's architecture."""
    fmt = choose("--format", cfg.format, FORMATS)
    loaded = load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, cfg.data, cfg.seed)
    heads = _heads(cfg, loaded.kind) if fmt == "mocov3" else {}
    run = EvalRun("export", cfg, tensorboard=False)
    path = run.output / f"backbone_{fmt}{EXTENSIONS[fmt]}"  # made by the writer: a refused backbone leaves no folder
    source = {"checkpoint": loaded.source, "sha256": loaded.sha256}
    written = write_format(loaded.model, fmt, path, source, heads, img_size=loaded.img_size)
    state = loaded.model.state_dict()
    file = path / "model.safetensors" if fmt == "hf" else path
    metrics = {"format": fmt, "file": str(path), "sha256": sha256_file(file), "tensors": written.tensors,
               "parameters": int(sum(v.numel() for k, v in state.items() if "running_" not in k and "num_batches" not in k)),
               **({"architecture": written.architecture} if written.architecture else {}),
               "usage": written.usage, **({"note": written.note} if written.note else {})}
    res = run.finish(metrics, loaded, data={}, title=f"export {fmt}: {loaded.source}")
    from rich.console import Console

    console = Console(soft_wrap=True, highlight=False)
    if written.note:
        console.print(f"note: {written.note}", markup=False)
    kind = "note" if metrics["usage"].startswith("no stock") else "usage"
    console.print(f"{kind}: {metrics['usage']}", markup=False)
    return res
