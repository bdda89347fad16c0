"""The pretraining run: setup, the epoch loop, checkpoints, resume.

The loop knows nothing about the task spaces: it asks the hierarchy for ``out.loss`` and the
named ``out.losses``, logs them, and steps. Written for torch.distributed from the start: one
process per device, ``train.batch_size`` is the global batch, only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from opera import distributed
from opera.backbones import get_spec, is_token_backbone
from opera.configs import PretrainConfig, config_to_dict
from opera.engine.checkpoint import BACKBONE, LAST, export_backbone, load_state, save_state
from opera.engine.rundir import GracefulStop, NoLock, RunLock, Stopped, check_config_drift, find_checkpoint, own_run_dir
from opera.engine.monitors import online_linear_setup, online_linear_step
from opera.engine.logging import METRICS, ProgressDisplay, RunLogger, truncate_metrics
from opera.engine.optim import build_optimizer, ema_momentum_at, lr_at
from opera.engine.step import make_grad_scaler, prepare_model, train_step
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy, parse_spec
from opera.supervisions.base import Progress


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OperaError(f"device {name!r} was asked for but CUDA is not available here; use --device cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    try:
        return torch.device(name)
    except RuntimeError:
        raise OperaError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def check_output_dir(output: Path) -> None:
    """Create ``output`` or fail in one line if it cannot be written."""
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OperaError(f"output directory {output} is not writable ({exc.strerror}); choose another --output") from None


def resolve_optimizer_name(cfg: PretrainConfig, hierarchy: SupervisionHierarchy) -> str:
    name = cfg.optim.name
    if name == "auto":
        return "adamw" if is_token_backbone(hierarchy.backbone) else "lars"
    if name not in ("lars", "adamw", "sgd"):
        raise OperaError(f"unknown optimizer {name!r}; valid: auto, lars, adamw, sgd")
    return name


def identity(cfg: PretrainConfig, hierarchy: SupervisionHierarchy, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run (``data``: the training data's
    :func:`~opera.data.labels.data_identity`)."""
    spec = get_spec(hierarchy.backbone)
    want = {"hierarchy": hierarchy.spec, "arrangement": hierarchy.arrangement,
            "backbone": spec.name if spec else None, "num_classes": hierarchy.label_sets.get("class"),
            "label_sets": dict(hierarchy.label_sets)}
    if data is not None:
        want["data"] = data
    return want


#: identity keys that checkpoints of older versions lack (not compared when absent)
_NEWER_IDENTITY = ("label_sets", "data")


def check_resumable(state: dict[str, Any], want: dict[str, Any], path: Path) -> None:
    from opera.data.labels import check_same_data

    have = state.get("identity") or {}
    diffs = [f"{k} {have.get(k)!r} (this run: {v!r})" for k, v in want.items()
             if k != "data" and have.get(k) != v and not (k in _NEWER_IDENTITY and k not in have)]
    if diffs:
        raise OperaError(
            f"checkpoint {path} was trained with a different setup: {'; '.join(diffs)}; "
            "resume with the same settings or choose a new --output"
        )
    if "data" in want:
        check_same_data(have.get("data"), want["data"], path)


def seed_step(seed: int, rank: int, global_step: int) -> None:
    """Reseed every step from (seed, rank, step): model randomness (masks, drop path) is then a
    function of the step alone, so a resumed run replays the uninterrupted one exactly."""
    s = (seed * 1_000_003 + rank * 7_919 + global_step) % (2**31 - 1)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s)


@dataclass
class RunState:
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0


def run_pretrain(cfg: PretrainConfig, output: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Pretrain with ``cfg`` into ``output``; continue from its newest intact checkpoint (or ``resume``).

    Rank 0 owns ``output`` for the whole run (:class:`~opera.engine.rundir.RunLock`); SIGINT and
    SIGTERM stop after the current step with ``last.pt`` written at that step (docs/reliability.md).
    """
    output = Path(output)
    main = distributed.detect_env()[0] == 0
    if main:
        check_output_dir(output)
    with own_run_dir(output, main) as owner, GracefulStop() as stop:
        return _pretrain(cfg, output, resume, owner, stop)


def resume_source(output: Path, resume: str | None, main: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state) to resume from: ``resume`` (a file, or a run directory searched like
    ``output``), else the newest intact checkpoint of ``output``; (None, None) for a fresh run."""
    if resume:
        source = Path(resume)
        if not source.exists():
            raise OperaError(f"--resume {source} does not exist; pass the last.pt of an opera run or its directory")
        if source.is_file():
            return source, load_state(source)
        path, state, note = find_checkpoint(source, rename_unreadable=main)
        if path is None:
            raise OperaError(f"--resume {source} holds no checkpoint ({LAST}, epoch_NNNN.pt); pass a run directory or a .pt file")
    else:
        path, state, note = find_checkpoint(output, rename_unreadable=main)
    if note and main:
        print(note, flush=True)
    return path, state


class PretrainSession:
    """Everything a pretraining run holds between steps: built once by :func:`setup_pretrain`,
    advanced by :func:`train_one_epoch` and :func:`finish_epoch` (MAE's ``main_pretrain`` /
    ``train_one_epoch`` split)."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)

    def checkpoint(self, path: Path) -> None:
        """Write the resumable state to ``path`` (rank 0; atomic, ``save_state``)."""
        self.owner.check_owner()
        if self.main:
            save_state({
                "model": self.hierarchy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch, "global_step": self.state.global_step,
                "identity": self.want, "config": self.resolved, "backbone_spec": get_spec(self.hierarchy.backbone).to_dict(),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                **({"online_linear": self.monitor.state_dict()} if self.monitor is not None else {}),  # online monitor
            }, path)


def setup_pretrain(cfg: PretrainConfig, output: Path, resume: str | None, owner: RunLock | NoLock,
                   stop: GracefulStop) -> PretrainSession:
    """Process group, data, hierarchy, optimizer, resume, DDP, config.yaml and loggers."""
    from opera.data import PretrainFeed, steps_per_epoch
    from opera.data.labels import data_identity, pretrain_data

    env = distributed.init(cfg.train.device if cfg.train.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world, main = env.rank, env.world_size, env.rank == 0
    device = resolve_device(cfg.train.device, env.local_rank)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_step(cfg.train.seed, rank, 0)

    b = cfg.backbone
    train_data, target_sets, label_summary = pretrain_data(cfg.data, cfg.train.seed, output, main,
                                                           distributed.barrier if world > 1 else None)
    if main and label_summary:
        print(f"labels: {label_summary['labelled_images']} of {label_summary['labelled_set_images']} images of "
              f"{cfg.data.spec} keep their labels (--labels {cfg.data.labels})"
              + (f", plus {label_summary['unlabelled_images']} unlabelled ({cfg.data.unlabeled})"
                 if "unlabelled_images" in label_summary else ""), flush=True)
    feed = PretrainFeed(train_data, img_size=b.img_size, crop_min=cfg.data.crop_min, flip=cfg.data.flip,
                        seed=cfg.train.seed, augment_on=cfg.data.augment_on, device=device, workers=cfg.data.workers,
                        target_sets=target_sets, labeled_per_batch=cfg.data.labeled_per_batch)
    train_set = feed.dataset
    batch = cfg.train.batch_size
    if batch % world:
        raise OperaError(f"--batch-size {batch} is not divisible by the {world} processes; use a multiple of {world}")
    if batch > len(train_set):
        raise OperaError(f"batch size {batch} is larger than the dataset ({len(train_set)} training images); use --batch-size <= {len(train_set)}")
    n_steps = steps_per_epoch(len(train_set), batch, world)

    # NHWC for CNNs on CUDA when train.channels_last (the same prepare_model as ``opera bench``)
    hierarchy = SupervisionHierarchy.from_config(cfg, feed.label_sets)
    nhwc = None if device.type == "cuda" and cfg.train.channels_last else False  # None: CNN backbones only
    hierarchy = prepare_model(hierarchy, device, channels_last=nhwc)
    channels_last = hierarchy.opera_channels_last
    want = identity(cfg, hierarchy, data_identity(train_data))
    opt_name = resolve_optimizer_name(cfg, hierarchy)
    lr = cfg.optim.base_lr * batch / 256
    optimizer = build_optimizer(hierarchy, opt_name, lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.betas,
                                exclude_1d=cfg.optim.exclude_1d_decay)
    scaler = make_grad_scaler(device, cfg.train.amp)

    state = RunState()
    source, ckpt = resume_source(output, resume, main)
    if ckpt is not None:
        check_resumable(ckpt, want, source)
        unused = set(cfg.spaces) - set(parse_spec(cfg.hierarchy))
        for line in check_config_drift(ckpt.get("config"), config_to_dict(cfg), source, ignore_sections=unused,
                                       defaults=config_to_dict(PretrainConfig())):
            if main:
                print(line, flush=True)
        hierarchy.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        state = RunState(int(ckpt["epoch"]), int(ckpt["step_in_epoch"]), int(ckpt["global_step"]))
        if main:
            print(f"resuming from {source} at epoch {state.epoch + 1}, step {state.global_step}", flush=True)
            truncate_metrics(output / METRICS, state.global_step)

    # --- online linear monitor (opera.engine.monitors; train.online_linear) ---
    monitor, tap, monitor_val = online_linear_setup(cfg, hierarchy, feed.label_sets.get("class"), device, ckpt)

    model: torch.nn.Module = hierarchy
    if world > 1:
        if cfg.train.sync_bn:
            hierarchy = distributed.convert_sync_batchnorm(hierarchy)  # torch's on CUDA, a gloo one on CPU
        model = torch.nn.parallel.DistributedDataParallel(
            hierarchy, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        model = torch.compile(model)

    resolved = config_to_dict(cfg)
    resolved["resolved"] = {"optimizer": opt_name, "lr": lr, "world_size": world, "per_rank_batch": batch // world,
                            "steps_per_epoch": n_steps, "num_classes": feed.label_sets.get("class"), "device": str(device),
                            **label_summary, **hierarchy.describe()}
    if main:
        (output / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    total_steps = n_steps * cfg.train.epochs
    return PretrainSession(
        cfg=cfg, output=output, owner=owner, stop=stop, rank=rank, world=world, main=main, device=device, feed=feed,
        hierarchy=hierarchy, model=model, optimizer=optimizer, scaler=scaler, state=state, want=want, lr=lr,
        batch=batch, per_rank=batch // world, n_steps=n_steps, total_steps=total_steps, resolved=resolved,
        channels_last=channels_last, logger=RunLogger(output, enabled=main),
        progress=ProgressDisplay(main, total_steps, state.global_step),
        t_last=time.time(), logged_at=state.global_step,  # time and step of the previous log row
        monitor=monitor, tap=tap, monitor_val=monitor_val,  # online monitor
    )


def train_one_epoch(s: PretrainSession) -> dict[str, float]:
    """The steps of the current epoch from ``s.state.step_in_epoch`` (to its end, ``max_steps``
    or a stop request, which checkpoints and raises :class:`Stopped`); returns the epoch's mean
    of every logged value."""
    cfg, state, epochs = s.cfg, s.state, s.cfg.train.epochs
    loader = s.feed.epoch(s.per_rank, state.epoch, rank=s.rank, world_size=s.world, start_step=state.step_in_epoch)
    s.model.train()
    sums: dict[str, float] = {}
    count = 0
    for views, targets in loader:
        seed_step(cfg.train.seed, s.rank, state.global_step)
        if s.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        epoch_f = state.epoch + state.step_in_epoch / s.n_steps
        step_lr = lr_at(epoch_f, epochs, cfg.optim.warmup_epochs, s.lr)
        m = ema_momentum_at(epoch_f, epochs, cfg.optim.ema_momentum, cfg.optim.ema_cosine)
        s.hierarchy.on_step(Progress(epoch_f, state.global_step, epochs, s.total_steps))
        out = train_step(s.model, s.hierarchy, s.optimizer, views, targets, step_lr, m, s.device, cfg.train.amp,
                         state.global_step, per_view=cfg.train.per_view, scaler=s.scaler)
        online_linear_step(s.monitor, s.tap, targets)  # online monitor
        state.global_step += 1
        state.step_in_epoch += 1
        terms = {f"loss/{k}": v.detach() for k, v in out.losses.items()}
        row_now = {"loss": out.loss.detach(), **terms, **out.logs}
        values = {k: float(v) for k, v in row_now.items()}
        if all(math.isfinite(v) for v in values.values()):  # an fp16 step the scaler skipped stays out of the means
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
        if state.global_step % cfg.train.log_every == 0 or state.step_in_epoch == s.n_steps:
            dt = time.time() - s.t_last
            s.t_last, images = time.time(), s.batch * (state.global_step - s.logged_at)
            s.logged_at = state.global_step
            row = {k: float(distributed.all_reduce_mean(v.float())) for k, v in row_now.items()}
            s.logger.log({"epoch": epoch_f, "lr": step_lr, "ema_momentum": m,
                          "img_per_s": images / max(dt, 1e-9), **row}, state.global_step)
            s.progress.update(state.global_step, state.epoch + 1, {k: v for k, v in row.items() if k.startswith("loss")})
        signum = s.stop.requested(s.world)
        if signum:
            s.checkpoint(s.output / LAST)
            raise Stopped(state.global_step, signum)
        if cfg.train.save_every_steps and state.global_step % cfg.train.save_every_steps == 0 and state.step_in_epoch < s.n_steps:
            s.checkpoint(s.output / LAST)
        if cfg.train.max_steps and state.global_step >= cfg.train.max_steps:
            break
    if state.step_in_epoch >= s.n_steps:
        state.epoch += 1
        state.step_in_epoch = 0
    return {k: v / max(count, 1) for k, v in sums.items()}


def finish_epoch(s: PretrainSession, epoch_row: dict[str, float]) -> dict[str, Any]:
    """After an epoch (or a ``max_steps`` stop inside one): kNN monitor, ``last.pt``, the
    periodic ``epoch_NNNN.pt``, ``backbone.safetensors``, the progress line."""
    cfg, state, epochs = s.cfg, s.state, s.cfg.train.epochs
    epoch_done = state.step_in_epoch == 0
    if cfg.train.knn_every and (state.epoch % cfg.train.knn_every == 0 or state.epoch == epochs) and epoch_done:
        epoch_row["knn_top1"] = knn_monitor(s.hierarchy.backbone, cfg, s.device, s.rank, s.world)
        s.logger.log({"epoch": float(state.epoch), "knn_top1": epoch_row["knn_top1"]}, state.global_step)
    if s.monitor is not None and epoch_done:  # online monitor: one row per epoch, every rank calls
        s.logger.log({"epoch": float(state.epoch), **s.monitor.epoch_metrics(s.hierarchy.backbone, s.monitor_val)}, state.global_step)
    s.checkpoint(s.output / LAST)
    if s.main and cfg.train.save_every_epochs and state.epoch % cfg.train.save_every_epochs == 0 and epoch_done:
        s.checkpoint(s.output / f"epoch_{state.epoch:04d}.pt")
    if s.main:
        export_backbone(s.hierarchy.backbone, s.output / BACKBONE, {"identity": s.want, "epoch": state.epoch})
    s.progress.epoch_end(state.epoch - 1 if epoch_done else state.epoch, epochs, state.global_step, s.total_steps, epoch_row)
    # A stop requested during the epoch's end (the kNN monitor can take minutes on ImageNet) stops
    # here, with last.pt just written, rather than after the first step of the next epoch; under
    # SLURM the deferred requeue then needs no data loader started for an epoch it will not train.
    more = state.global_step < s.total_steps and not (cfg.train.max_steps and state.global_step >= cfg.train.max_steps)
    signum = s.stop.requested(s.world)
    if signum and more:
        raise Stopped(state.global_step, signum)
    return {"epoch": state.epoch, "global_step": state.global_step, **epoch_row}


def _pretrain(cfg: PretrainConfig, output: Path, resume: str | None, owner: RunLock | NoLock, stop: GracefulStop) -> dict[str, Any]:
    s = setup_pretrain(cfg, output, resume, owner, stop)
    result: dict[str, Any] = {}
    try:
        while s.state.epoch < cfg.train.epochs:
            result = finish_epoch(s, train_one_epoch(s))
            if cfg.train.max_steps and s.state.global_step >= cfg.train.max_steps:
                break
        if s.main and s.state.global_step == s.total_steps and not (output / BACKBONE).is_file():
            export_backbone(s.hierarchy.backbone, output / BACKBONE, {"identity": s.want, "epoch": s.state.epoch})
    finally:
        if s.tap is not None:  # online monitor
            s.tap.close()
        s.progress.close()
        s.logger.close()
    distributed.barrier()
    return {"output": str(output), "finished": s.state.epoch >= cfg.train.epochs, **result}


@torch.no_grad()
def knn_monitor(backbone: torch.nn.Module, cfg: PretrainConfig, device: torch.device, rank: int, world: int) -> float:
    """Weighted kNN top-1 (%) on the held-out split from backbone features; under DDP the train
    bank is sharded across the ranks (opera.engine.monitors.knn_monitor), every rank calls it."""
    from opera.data import EvalTransform, build_dataset
    from opera.engine import monitors

    tf = EvalTransform(cfg.backbone.img_size)
    bank_set = build_dataset(cfg.data.spec, "train", transform=tf)
    query_set = build_dataset(cfg.data.spec, "val", transform=tf)
    return monitors.knn_monitor(backbone, bank_set, query_set, bank_set.num_classes, device, k=cfg.train.knn_k)
