"""What every evaluation protocol shares.

* :func:`load_eval_backbone` turns ``--checkpoint`` into a backbone: an opera run directory,
  ``backbone.safetensors`` or ``last.pt``; ``random:<backbone>`` (randomly initialised, the
  "no pretraining" baseline) or ``timm:<name>`` (any timm architecture, never downloaded); or
  any weights :func:`opera.weights.read_weights` reads (MoCo-v3 / OPERA ``main_moco.py``,
  ``main_lincls.py``, ``convert_to_deit.py``, timm and torchvision state dicts, a
  ``config.json`` + ``model.safetensors`` folder), said in one line.
* :func:`extract_features` runs a frozen backbone over a dataset in batches into one
  preallocated ``N x D`` tensor (``pooled_features``: timm's pre-logits, Eq. 8's y).
* :class:`EvalRun` records a protocol's run: TensorBoard scalars under ``OUTPUT/tb`` and the
  trackers of ``--set loggers=...`` (W&B, MLflow: :mod:`opera.engine.trackers`), then
  ``OUTPUT/results.json`` (metrics, checkpoint path + sha256 + backbone spec, the full protocol
  config, the data specs, seed, wall time, versions) written atomically, and a rich table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from opera.errors import OperaError, suggest
from opera.features import accuracy, extract_features, gathered_accuracy, make_loader, shard_of, topk_correct  # noqa: F401  (re-exported)
from opera.evals.options import EvalConfig  # noqa: F401  (re-exported: every protocol's config extends it)
from opera.weights import sha256_file  # noqa: F401  (re-exported: results.json records it)

RESULTS = "results.json"


# ----------------------------------------------------------------------------- common options
def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


#: options that may differ between the run that saved a checkpoint and the one that resumes it
VOLATILE = ("output", "device", "workers", "tensorboard", "loggers", "checkpoint", "log_every",
            "save_every_steps", "save_every", "max_steps", "eval_every")  # speed, cadence, where the run stops


def eval_identity(protocol: str, cfg: Any, loaded: Any, train: Any = None) -> dict[str, Any]:
    """What a resumed evaluation must share with the one that saved: the protocol, the backbone
    (its file's sha256, or the random:/timm: source), every option but :data:`VOLATILE`, and the
    training images (``train``: their :func:`~opera.data.labels.data_identity`)."""
    from opera.data.labels import data_identity

    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config_dict(cfg).items() if k not in VOLATILE}
    want = {"protocol": protocol, "backbone": loaded.sha256 or loaded.source, "options": options}
    if train is not None:
        want["data"] = data_identity(train)
    return want


# ----------------------------------------------------------------------------- small helpers
def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def parse_data(spec: str):
    """Parse a data spec up front (a bad spec fails before any model is built)."""
    from opera.data import parse_data_spec

    return parse_data_spec(spec)


def default_img_size(data_spec: str) -> int:
    return 32 if parse_data(data_spec).name == "digits" else 224


def check_output(output: str | Path, create: bool = True) -> Path:
    """Validate ``--output`` (a folder, or a path where one can be made); create it if asked."""
    if not str(output):
        raise OperaError("no --output folder given; pass --output DIR for results.json")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise OperaError(f"--output {out} is a file; pass a folder for results.json")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OperaError(f"cannot create --output {out}: {exc.strerror or exc}; pass a writable folder") from None
    return out






# ----------------------------------------------------------------------------- backbones
@dataclass
class LoadedBackbone:
    """A backbone and where it came from (recorded in results.json)."""

    model: nn.Module
    source: str  # the --checkpoint string
    kind: str  # "checkpoint" | "random" | "timm" | the format read_weights found ("mocov3", "hf-dir", ...)
    file: str | None = None  # the file actually read
    sha256: str | None = None
    spec: dict[str, Any] | None = None
    img_size: int = 224
    run_dir: str | None = None  # the opera run directory when there is one
    run_config: dict[str, Any] | None = None  # its config.yaml

    @property
    def name(self) -> str:
        return (self.spec or {}).get("name", type(self.model).__name__)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "file": self.file,
            "sha256": self.sha256,
            "backbone_spec": self.spec,
            "img_size": self.img_size,
            "run_dir": self.run_dir,
            "run_config": self.run_config,
        }


def _run_config(run_dir: Path | None) -> dict[str, Any] | None:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except yaml.YAMLError as exc:
        raise OperaError(f"{run_dir / 'config.yaml'} is not valid YAML ({str(exc).splitlines()[0]}); repair or remove it") from None
    return data if isinstance(data, dict) else None


def _pick_img_size(explicit: int | None, run_config: dict | None, spec: dict | None, data: str | None) -> int:
    fixed = (spec or {}).get("timm_kwargs", {}).get("img_size")
    if isinstance(fixed, (list, tuple)):
        fixed = fixed[0]
    if explicit is not None and fixed and int(explicit) != int(fixed):
        raise OperaError(f"--img-size {explicit} differs from the {fixed}px this {spec.get('name')} backbone was built for; drop --img-size or pass {fixed}")
    if explicit is not None:
        if explicit < 1:
            raise OperaError(f"--img-size must be a positive integer, got {explicit}")
        return int(explicit)
    if fixed:
        return int(fixed)
    size = ((run_config or {}).get("backbone") or {}).get("img_size")
    if size:
        return int(size)
    return default_img_size(data) if data else 224


def _random_backbone(name: str, kind: str, expect: str | None, img_size: int | None, data: str | None, seed: int, source: str) -> LoadedBackbone:
    from opera.backbones import create_backbone

    if not name:
        raise OperaError(f"--checkpoint {source!r} names no backbone; write {kind}:resnet50, {kind}:resnet_tiny, ...")
    full = f"timm:{name}" if kind == "timm" else name
    if expect is not None and expect not in (name, full):
        raise OperaError(f"--checkpoint {source!r} builds a {name!r} backbone but --backbone is {expect!r}; make them agree")
    size = _pick_img_size(img_size, None, None, data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_backbone(full, img_size=size)
    spec = model.opera_spec.to_dict()
    return LoadedBackbone(model, source, kind, spec=spec, img_size=_pick_img_size(img_size, None, spec, data))


def load_eval_backbone(checkpoint: str, backbone: str | None = None, img_size: int | None = None,
                       data: str | None = "digits", seed: int = 0) -> LoadedBackbone:
    """Resolve ``--checkpoint`` (see the module docstring) into a :class:`LoadedBackbone`.

    ``backbone`` (``--backbone``) is the name the user expects; a checkpoint of another backbone
    is an :class:`OperaError`. Random weights are drawn from ``seed``. ``data`` only picks the
    default image size (32 for digits, else 224; a run's config.yaml or a ViT's size win).
    """
    from opera.engine.checkpoint import load_backbone, resolve_checkpoint

    checkpoint = str(checkpoint or "").strip()
    if not checkpoint:
        raise OperaError("no --checkpoint given; pass an opera run directory, a backbone.safetensors/last.pt file, random:<backbone> or timm:<name>")
    for kind in ("random", "timm"):
        if checkpoint.startswith(kind + ":"):
            return _random_backbone(checkpoint[len(kind) + 1:].strip(), kind, backbone, img_size, data, seed, checkpoint)
    from opera.weights import is_opera_checkpoint
    from opera.weights.readers import HUB_PREFIXES

    path = Path(checkpoint).expanduser()
    if checkpoint.lower().startswith((*HUB_PREFIXES, "local-dir:")):  # a hub name is one line: opera never downloads
        return _foreign_backbone(checkpoint, backbone, img_size, data)
    if not path.exists():
        raise OperaError(
            f"checkpoint {checkpoint} does not exist; pass an opera run directory, a backbone.safetensors or last.pt file, "
            "weights of another format (a .pth/.safetensors file, a config.json + model.safetensors folder; opera never "
            "downloads: put the file there), or random:<backbone> / timm:<name> for a baseline"
        )
    if not is_opera_checkpoint(path):
        return _foreign_backbone(checkpoint, backbone, img_size, data)
    file = resolve_checkpoint(path)
    model = load_backbone(file, expect=backbone)
    run_dir = path if path.is_dir() else (file.parent if (file.parent / "config.yaml").is_file() else None)
    run_config = _run_config(run_dir)
    spec = model.opera_spec.to_dict()
    return LoadedBackbone(
        model, checkpoint, "checkpoint", file=str(file), sha256=sha256_file(file), spec=spec,
        img_size=_pick_img_size(img_size, run_config, spec, data), run_dir=str(run_dir) if run_dir else None,
        run_config=run_config,
    )


def _foreign_backbone(checkpoint: str, backbone: str | None, img_size: int | None, data: str | None) -> LoadedBackbone:
    """Weights opera did not write (:func:`opera.weights.read_weights`), with its one report line."""
    from opera.distributed import is_main_process
    from opera.weights import read_weights

    w = read_weights(checkpoint, backbone=backbone, img_size=img_size)
    if is_main_process():
        print(w.report, flush=True)
    spec = w.backbone.opera_spec.to_dict()
    return LoadedBackbone(w.backbone, checkpoint, w.format, file=str(w.file), sha256=w.sha256, spec=spec,
                          img_size=_pick_img_size(img_size, None, spec, data))


def is_vit(model: nn.Module) -> bool:
    from opera.backbones import is_token_backbone

    return is_token_backbone(model)


def snapshot_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of every parameter and buffer."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class FrozenBackboneError(RuntimeError):
    """The backbone of a frozen-feature protocol changed during training (a bug, not user input)."""


def check_frozen(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """MoCo-v3's ``sanity_check``: every parameter and buffer still equals the loaded checkpoint."""
    state = model.state_dict()
    changed = [k for k, v in reference.items() if k not in state or not torch.equal(state[k].detach().cpu(), v)]
    extra = [k for k in state if k not in reference]
    if changed or extra:
        keys = changed + extra
        raise FrozenBackboneError(
            f"the frozen backbone changed during evaluation: {len(keys)} tensors differ from the loaded checkpoint "
            f"(first: {', '.join(keys[:3])}); the linear protocol must not update the backbone or its BatchNorm statistics"
        )


# ----------------------------------------------------------------------------- features




# ----------------------------------------------------------------------------- distributed
def eval_env(device: str) -> tuple[Any, torch.device]:
    """Join the process group and pick this rank's device (:func:`opera.distributed.join`)."""
    from opera import distributed

    return distributed.join(device)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """This rank's share of every global batch of an epoch (a ``batch_sampler`` for DataLoader).

    Epoch ``e`` visits ``indices`` in the order ``torch.randperm(len(indices))`` drawn from a
    generator seeded ``seed + e`` (DistributedSampler's permutation), cut into global batches of
    ``batch_size``; rank r takes the contiguous share :func:`~opera.distributed.shard_bounds` of
    each. Unlike ``DistributedSampler``, which deals the epoch out round robin and pads it with
    repeated images, the global batch is the same set of images for any number of processes and
    no image is repeated: with gradients summed over ranks and divided by :meth:`global_size`,
    N processes take the optimizer steps of one. ``drop_last`` drops a partial last batch; a
    partial last batch with fewer images than ranks is always dropped (a rank would get none).
    ``start`` skips the first batches (resuming mid-epoch).
    """

    def __init__(self, indices: int | list[int], batch_size: int, seed: int = 0, rank: int = 0, world: int = 1,
                 drop_last: bool = False):
        self.indices = list(range(indices)) if isinstance(indices, int) else list(indices)
        self.batch_size, self.seed, self.rank, self.world, self.drop_last = batch_size, seed, rank, world, drop_last
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_sizes(self) -> list[int]:
        """The size of every global batch of an epoch (the same on every rank and world size)."""
        n, b = len(self.indices), self.batch_size
        sizes = [b] * (n // b)
        tail = n % b
        if tail and not self.drop_last and tail >= self.world:
            sizes.append(tail)
        return sizes

    def global_size(self, step_in_epoch: int) -> int:
        return self.global_sizes()[step_in_epoch]

    def __len__(self) -> int:
        return len(self.global_sizes())

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.indices), generator=g).tolist()
        from opera.distributed import shard_bounds

        for i, size in enumerate(self.global_sizes()):
            if i < self.start:
                continue
            batch = perm[i * self.batch_size: i * self.batch_size + size]
            lo, hi = shard_bounds(size, self.rank, self.world)
            yield [self.indices[j] for j in batch[lo:hi]]






def check_global_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise OperaError(f"--batch-size {batch_size} is the global batch and must divide over the {world} processes; "
                         f"use a multiple of {world}")


# ----------------------------------------------------------------------------- recording
class EvalRun:
    """Times a protocol, logs scalars to TensorBoard and writes ``results.json``.

    ``OUTPUT`` is validated at once but created only when something is written, so a run that
    fails on its inputs leaves no folder behind.

    >>> run = EvalRun("linear", cfg)          # creates cfg.output
    >>> run.log("linear/val_top1", 93.1, step=epoch)
    >>> results = run.finish(metrics, backbone=loaded, data={"train": "digits", "val": "digits"})
    """

    def __init__(self, protocol: str, cfg: Any, output: str | Path | None = None, tensorboard: bool | None = None,
                 main: bool = True):
        self.protocol = protocol
        self.main = main  # under torch.distributed only rank 0 writes (TensorBoard, results.json, the table)
        self.cfg = cfg
        self.output = check_output(output if output is not None else cfg.output, create=False)
        self.started = time.time()
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        from opera.engine.trackers import TrackerOptions, require

        loggers = getattr(cfg, "loggers", "tensorboard")
        self._trackers_opts = TrackerOptions.of(cfg, key="loggers") if hasattr(cfg, "loggers") else None
        if main and self._trackers_opts is not None:
            require(self._trackers_opts.loggers, key="loggers")  # a missing extra: one line before the protocol runs
        self._tb_enabled = main and (getattr(cfg, "tensorboard", True) if tensorboard is None else tensorboard) \
            and "tensorboard" in [n.strip() for n in str(loggers).split(",")]
        self._tb = None
        self._trackers: list | None = None  # opened at the first scalar, on rank 0

    @property
    def writer(self):
        if self._tb is None and self._tb_enabled:
            from torch.utils.tensorboard import SummaryWriter

            from opera.engine.logging import quiet_tensorboard_thread_errors

            check_output(self.output)
            quiet_tensorboard_thread_errors()
            with self._tensorboard():
                self._tb = SummaryWriter(log_dir=str(self.output / "tb"))
        return self._tb

    @contextlib.contextmanager
    def _tensorboard(self):
        """A failed TensorBoard write (a full disk, ``ulimit -f``, ...) is one line, not a traceback."""
        from opera.files import write_failed

        try:
            yield
        except OSError as exc:
            raise write_failed(self.output / "tb", exc, "the TensorBoard events",
                               kept="results.json and the checkpoints are as they were") from None

    def path(self, name: str) -> Path:
        """``OUTPUT/name``, creating ``OUTPUT``."""
        check_output(self.output)
        return self.output / name

    @property
    def trackers(self) -> list:
        """The W&B / MLflow runs of ``loggers`` (rank 0), started (or continued: ``OUTPUT/trackers.json``)
        at the first scalar with the protocol's config as theirs."""
        if self._trackers is None:
            self._trackers = []
            if self.main and self._trackers_opts is not None and self._trackers_opts.trackers:
                from opera.engine.trackers import describe, open_trackers

                self._trackers = open_trackers(self.path(""), self._trackers_opts, _jsonable(config_dict(self.cfg)))
                for line in describe(self._trackers, self.output):
                    print(line, flush=True)
        return self._trackers

    def log(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None and math.isfinite(float(value)):
            with self._tensorboard():
                self.writer.add_scalar(tag, float(value), step)
        if value is not None:
            for tracker in self.trackers:
                tracker.log({tag: float(value)}, step)

    def finish(self, metrics: dict[str, Any], backbone: LoadedBackbone | None = None, data: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None, title: str | None = None, print_table: bool = True) -> dict[str, Any]:
        from opera.files import atomic_write

        wall = time.time() - self.started
        results = {
            "protocol": self.protocol,
            "evaluation": "offline",  # a protocol run after pretraining (the online monitors are labelled "online")
            "metrics": metrics,
            "checkpoint": backbone.describe() if backbone is not None else None,
            "config": config_dict(self.cfg),
            "data": data or {},
            "seed": getattr(self.cfg, "seed", None),
            "started_at": self.started_at,
            "wall_time_s": round(wall, 3),
            "versions": _versions(),
        }
        if extra:
            results.update(extra)
        if not self.main:
            return results
        check_output(self.output)
        text = json.dumps(_jsonable(results), indent=2, sort_keys=False) + "\n"
        atomic_write(self.output / RESULTS, lambda tmp: Path(tmp).write_text(text), what="the evaluation's results")
        if self.writer is not None or self.trackers:
            for k, v in _flatten(metrics).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.log(f"final/{k}", v, 0)
        if self.writer is not None:
            with self._tensorboard():
                self.writer.flush()
                self.writer.close()
            self._tb = None
        self.close_trackers()
        if print_table:
            print_metrics(title or f"{self.protocol}: {backbone.source if backbone else ''}", metrics, wall)
        return results


    def close_trackers(self) -> None:
        from opera.engine.trackers import close_all

        trackers, self._trackers = self._trackers or [], None
        close_all(trackers)


def _versions() -> dict[str, str]:
    import timm

    import opera

    return {"opera": getattr(opera, "__version__", "?"), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    from opera.engine.trackers import flatten

    return flatten(d, sep="/")


def print_metrics(title: str, metrics: dict[str, Any], wall: float | None = None) -> None:
    """A two-column rich table of (nested) metrics."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in _flatten(metrics).items():
        if isinstance(v, float):
            v = f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
        table.add_row(k, str(v))
    if wall is not None:
        table.add_row("wall time (s)", f"{wall:.1f}")
    Console().print(table)


def choose(name: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    """Validate an option value against ``choices`` (one-line error with a suggestion)."""
    if value not in choices:
        raise OperaError(f"unknown {name} {value!r}{suggest(value, list(choices))}; valid: {', '.join(choices)}")
    return value


__all__ = [
    "EvalConfig", "EvalRun", "GlobalBatchSampler", "check_global_batch", "eval_env", "gathered_accuracy", "eval_identity",
    "shard_of", "FrozenBackboneError", "LoadedBackbone", "RESULTS", "accuracy", "check_frozen",
    "check_output", "choose", "config_dict", "default_img_size", "extract_features", "is_vit", "load_eval_backbone",
    "make_loader", "parse_data", "print_metrics", "seed_everything", "sha256_file",
    "snapshot_state", "topk_correct",
]
