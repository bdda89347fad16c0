"""Pretraining: the hierarchy's protocol for the one training loop (:mod:`opera.engine.loop`).

The protocol knows nothing about the task spaces: a step asks the hierarchy for ``out.loss`` and
the named ``out.losses``, and the loop logs them. Written for torch.distributed from the start: one
process per device, ``train.batch_size`` is the global batch, only rank 0 writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from opera import distributed
from opera.backbones import get_spec
from opera.configs import PretrainConfig, config_to_dict
from opera.engine.checkpoint import (
    BACKBONE,
    atomic_write_text,
    disk_use,
    export_backbone,
    kept_epoch_count,
    state_bytes,
)
from opera.engine.loop import Cadence, Position, RunDirectory, TrainingLoop, run_directory, seed_step
from opera.engine.collapse import collapse_warnings
from opera.engine.monitors import (
    CollapseProbe,
    FeatureTap,
    OnlineLinearMonitor,
    collapse_pass,
    collapse_row,
    collapse_rows,
    eval_mode,
    online_linear_setup,
    online_linear_step,
)
from opera.engine.optim import build_optimizer, ema_momentum_at, lr_at, optimizer_name
from opera.engine.resume import check_config_drift
from opera.engine.step import make_grad_scaler, prepare_model, train_step
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy, parse_spec
from opera.supervisions.base import Progress

class Initializer(Protocol):
    """The weights a run starts from (``train.init``; :class:`opera.weights.InitWeights`): handed to
    :func:`run_pretrain` by the caller, which reads them, so the engine knows no weight format."""

    spec: str
    sha256: str

    def identity(self) -> dict[str, str]: ...

    def apply(self, hierarchy: torch.nn.Module, backbone: str, img_size: int,
              backbone_options: dict[str, Any] | None = None) -> str: ...


def identity(cfg: PretrainConfig, hierarchy: SupervisionHierarchy, data: dict[str, Any] | None = None,
             init: Initializer | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run (``data``: the training data's
    :func:`~opera.data.labels.data_identity`; ``init``: the ``--init`` source and its sha256)."""
    spec = get_spec(hierarchy.backbone)
    want = {"hierarchy": hierarchy.spec, "arrangement": hierarchy.arrangement,
            "backbone": spec.name if spec else None, "num_classes": hierarchy.label_sets.get("class"),
            "label_sets": dict(hierarchy.label_sets)}
    if init is not None:
        want["init"] = init.identity()
    if data is not None:
        want["data"] = data
    return want


@dataclass
class PretrainProtocol:
    """Everything a pretraining run holds between steps (built once by :func:`setup_pretrain`):
    the :class:`~opera.engine.loop.TrainingProtocol` of the hierarchy."""

    cfg: PretrainConfig
    run: RunDirectory
    rank: int
    world: int
    device: torch.device
    feed: Any  # opera.data.PretrainFeed
    hierarchy: SupervisionHierarchy
    optimizer: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler under fp16, else None
    lr: float  # the peak lr: base_lr * global batch / 256
    steps_per_epoch: int
    data_identity: dict[str, Any]
    resolved: dict[str, Any]  # config.yaml: the configuration and what was derived from it
    monitor: OnlineLinearMonitor | None = None  # train.online_linear
    tap: FeatureTap | None = None
    monitor_val: Any = None
    model: torch.nn.Module | None = None  # the hierarchy, or its DDP / compiled wrapper
    channels_last: bool = False
    name: str = "pretraining run"
    data_flags: str = "--data / --unlabelled"  # what chose the training data (a changed folder is refused naming them)
    init: Initializer | None = None  # train.init: the weights the run starts from
    knn: Any = None  # the kNN monitor's datasets (KnnSets), built at its first evaluation
    collapse_rows: Any = None  # the collapse monitor's rows of the kNN bank (a boolean mask), built with them
    collapse_skipped_said: bool = False  # the line naming the representations too wide to measure, once
    skips_nonfinite: bool = True  # train_step refuses a non-finite loss itself, unless the fp16 scaler skips the step
    _lr_now: float = field(default=0.0, repr=False)
    _m_now: float = field(default=0.0, repr=False)

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.train.epochs

    # -------------------------------------------------------------------------------- state
    def identity(self) -> dict[str, Any]:
        return identity(self.cfg, self.hierarchy, self.data_identity, self.init)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.hierarchy.state_dict(), "optimizer": self.optimizer.state_dict(), "config": self.resolved,
                "backbone_spec": get_spec(self.hierarchy.backbone).to_dict(),
                **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
                **({"online_linear": self.monitor.state_dict()} if self.monitor is not None else {})}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        unused = set(self.cfg.spaces) - set(parse_spec(self.cfg.hierarchy))
        for line in check_config_drift(state.get("config"), config_to_dict(self.cfg), source, ignore_sections=unused,
                                       defaults=config_to_dict(PretrainConfig())):
            if self.run.main:
                print(line, flush=True)
        self.hierarchy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.monitor is not None and state.get("online_linear"):
            self.monitor.load_state_dict(state["online_linear"])

    # -------------------------------------------------------------------------------- steps
    def batches(self, at: Position) -> Iterator[Any]:
        self.model.train()
        return self.feed.epoch(self.global_batch // self.world, at.epoch, rank=self.rank, world_size=self.world,
                               start_step=at.step_in_epoch)

    def step(self, batch: Any, at: Position) -> dict[str, torch.Tensor]:
        cfg, (views, targets) = self.cfg, batch
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        epoch_f = at.epoch + at.step_in_epoch / self.steps_per_epoch
        self._lr_now = lr_at(epoch_f, cfg.train.epochs, cfg.optim.warmup_epochs, self.lr)
        self._m_now = ema_momentum_at(epoch_f, cfg.train.epochs, cfg.optim.ema_momentum, cfg.optim.ema_cosine)
        self.hierarchy.on_step(Progress(epoch_f, at.global_step, cfg.train.epochs, self.total_steps))
        out = train_step(self.model, self.hierarchy, self.optimizer, views, targets, self._lr_now, self._m_now, self.device,
                         cfg.train.amp, at.global_step, per_view=cfg.train.per_view, scaler=self.scaler,
                         global_views=self.feed.global_views if cfg.data.local_crops else None)
        online_linear_step(self.monitor, self.tap, targets)
        return {"loss": out.loss.detach(), **{f"loss/{k}": v.detach() for k, v in out.losses.items()}, **out.logs}

    def log_row(self, at: Position) -> dict[str, float]:
        return {"lr": self._lr_now, "ema_momentum": self._m_now}

    def _monitor_sets(self) -> KnnSets:
        """The kNN monitor's datasets (and the collapse monitor's rows of its bank), built once."""
        cfg = self.cfg
        if self.knn is None:
            self.knn = knn_sets(cfg)
            self.collapse_rows = collapse_rows(len(self.knn.bank), cfg.train.rank_images)
            if self.run.main:
                if cfg.train.knn_every:
                    print(self.knn.line, flush=True)
                if cfg.train.rank_every:
                    print(f"collapse monitor: RankMe, alpha-ReQ and std of every representation over "
                          f"{int(self.collapse_rows.sum())} of the kNN bank's {len(self.knn.bank)} train images "
                          f"(train.rank_images={cfg.train.rank_images}), every {cfg.train.rank_every} epoch(s) "
                          f"(train.rank_every), from the kNN monitor's pass when both run", flush=True)
        return self.knn

    def end_epoch(self, at: Position, finished_epoch: bool) -> dict[str, float]:
        """The kNN monitor (every ``knn_every`` epochs and at the last), the collapse monitor
        (every ``rank_every`` epochs and at the last; from the kNN monitor's bank pass when both
        run) and the online linear monitor, on every rank, after a whole epoch."""
        cfg, row = self.cfg, {}
        if not finished_epoch:
            return row

        def due(every: int) -> bool:
            return bool(every) and (at.epoch % every == 0 or at.epoch == cfg.train.epochs)

        knn_due, rank_due = due(cfg.train.knn_every), due(cfg.train.rank_every)
        probe = None
        if knn_due:
            start = time.perf_counter()
            sets = self._monitor_sets()
            if rank_due:  # this rank's share of the bank (opera.features.shard_of) and its collapse rows
                lo, hi = distributed.shard_bounds(len(sets.bank), self.rank, self.world)
                probe = CollapseProbe(self.hierarchy, self.collapse_rows[lo:hi], cfg.train.rank_max_dim)
            with eval_mode(self.hierarchy):
                row["knn_top1"] = knn_monitor(self.hierarchy.backbone, cfg, self.device, self.rank, self.world, sets,
                                              probe)
            row["knn_s"] = time.perf_counter() - start
        elif rank_due:
            start = time.perf_counter()
            sets = self._monitor_sets()
            probe = collapse_pass(self.hierarchy, sets.bank, self.collapse_rows, self.device, cfg.data.workers,
                                  cfg.train.rank_max_dim)
        if probe is not None:
            stats = probe.metrics()
            row.update(collapse_row(stats))
            # its own pass's wall time, or (sharing the kNN monitor's) the heads and statistics alone
            row["rank_s"] = probe.seconds if knn_due else time.perf_counter() - start
            if self.run.main:
                if probe.stats.skipped and not self.collapse_skipped_said:
                    self.collapse_skipped_said = True
                    wide = ", ".join(f"{k} (d={d})" for k, d in probe.stats.skipped.items())
                    print(f"collapse monitor: not measured, wider than train.rank_max_dim={cfg.train.rank_max_dim}: "
                          f"{wide}; raise train.rank_max_dim to measure them (a d x d sum, two d x d eigendecompositions)",
                          flush=True)
                for line in collapse_warnings(stats, at.epoch):
                    print(line, flush=True)
        if self.monitor is not None:
            row.update(self.monitor.epoch_metrics(self.hierarchy.backbone, self.monitor_val))
        return row

    def after_save(self, at: Position) -> None:
        """``backbone.safetensors`` beside every ``last.pt`` written at an epoch's end."""
        if self.run.main:
            export_backbone(self.hierarchy.backbone, self.run.output / BACKBONE,
                            {"identity": self.identity(), "epoch": at.epoch})


def backbone_options(cfg: PretrainConfig) -> dict[str, Any]:
    """The ``create_backbone`` options of ``cfg.backbone`` beyond its name and image size."""
    b = cfg.backbone
    return {"patch_size": b.patch_size, "stop_grad_patch_embed": b.stop_grad_patch_embed,
            "drop_path_rate": b.drop_path_rate or None}


def setup_pretrain(cfg: PretrainConfig, run: RunDirectory, init: Initializer | None = None) -> PretrainProtocol:
    """Process group, data, hierarchy, optimizer and the online monitor of a pretraining run;
    ``init``: the source of ``train.init`` (recorded in config.yaml and the identity, loaded by
    :func:`run_pretrain` at a fresh start)."""
    if bool(cfg.train.init) != (init is not None) or (init is not None and init.spec != cfg.train.init):
        raise OperaError(f"train.init={cfg.train.init!r} must be handed to run_pretrain as its weights "
                         "(opera.weights.InitWeights.locate(cfg.train.init)); 'opera run pretrain --init SPEC' does that")
    from opera.data import PretrainFeed, steps_per_epoch
    from opera.data.labels import data_identity, pretrain_data

    env, device = distributed.join(cfg.train.device)
    rank, world, main = env.rank, env.world_size, env.rank == 0
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_step(cfg.train.seed, rank, 0)

    b, output = cfg.backbone, run.output
    train_data, target_sets, label_summary = pretrain_data(cfg.data, cfg.train.seed, output, main,
                                                           distributed.barrier if world > 1 else None)
    if main and label_summary:
        print(f"labels: {label_summary['labelled_images']} of {label_summary['labelled_set_images']} images of "
              f"{cfg.data.spec} keep their labels (--labels {cfg.data.labels})"
              + (f", plus {label_summary['unlabelled_images']} unlabelled ({cfg.data.unlabelled})"
                 if "unlabelled_images" in label_summary else ""), flush=True)
    feed = PretrainFeed(train_data, img_size=b.img_size, crop_min=cfg.data.crop_min, flip=cfg.data.flip,
                        seed=cfg.train.seed, augment_on=cfg.data.augment_on, device=device, workers=cfg.data.workers,
                        target_sets=target_sets, labelled_per_batch=cfg.data.labelled_per_batch,
                        local_crops=cfg.data.local_crops, local_size=cfg.data.local_size,
                        local_scale=cfg.data.local_crop_scale)
    batch = cfg.train.batch_size
    if batch % world:
        raise OperaError(f"--batch-size {batch} is not divisible by the {world} processes; use a multiple of {world}")
    if batch > len(feed.dataset):
        raise OperaError(f"batch size {batch} is larger than the dataset ({len(feed.dataset)} training images); "
                         f"use --batch-size <= {len(feed.dataset)}")
    n_steps = steps_per_epoch(len(feed.dataset), batch, world)
    feed.start_workers(batch // world, rank=rank, world_size=world)  # forked before the model: smaller workers

    # NHWC for CNNs on CUDA when train.channels_last (the same prepare_model as ``opera bench``)
    hierarchy = SupervisionHierarchy.from_config(cfg, feed.label_sets)
    nhwc = None if device.type == "cuda" and cfg.train.channels_last else False  # None: CNN backbones only
    hierarchy = prepare_model(hierarchy, device, channels_last=nhwc)
    opt_name = optimizer_name(cfg.optim.name, hierarchy)
    lr = cfg.optim.base_lr * batch / 256
    optimizer = build_optimizer(hierarchy, opt_name, lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.betas,
                                exclude_1d=cfg.optim.exclude_1d_decay)
    monitor, tap, monitor_val = online_linear_setup(cfg, hierarchy, feed.label_sets.get("class"), device)
    resolved = config_to_dict(cfg)
    resolved["resolved"] = {"optimizer": opt_name, "lr": lr, "world_size": world, "per_rank_batch": batch // world,
                            "steps_per_epoch": n_steps, "num_classes": feed.label_sets.get("class"), "device": str(device),
                            **label_summary, **hierarchy.describe()}
    if init is not None:
        resolved["resolved"]["init"] = {"spec": init.spec, "sha256": init.sha256}
    return PretrainProtocol(cfg=cfg, run=run, rank=rank, world=world, device=device, feed=feed, hierarchy=hierarchy,
                            optimizer=optimizer, scaler=make_grad_scaler(device, cfg.train.amp), lr=lr, steps_per_epoch=n_steps,
                            data_identity=data_identity(train_data), resolved=resolved, monitor=monitor, tap=tap,
                            monitor_val=monitor_val, channels_last=hierarchy.opera_channels_last, init=init)


def _wrap(p: PretrainProtocol) -> None:
    """DDP (SyncBatchNorm first, with ``train.sync_bn``) and ``torch.compile`` around the
    hierarchy, after its state is restored."""
    model: torch.nn.Module = p.hierarchy
    if p.world > 1:
        if p.cfg.train.sync_bn:
            p.hierarchy = distributed.convert_sync_batchnorm(p.hierarchy)  # torch's on CUDA, a gloo one on CPU
        model = torch.nn.parallel.DistributedDataParallel(
            p.hierarchy, device_ids=[p.device.index] if p.device.type == "cuda" else None)
    if p.cfg.train.compile:
        model = torch.compile(model)
    p.model = model


def run_pretrain(cfg: PretrainConfig, output: str | Path, resume: str | None = None,
                 init: Initializer | None = None) -> dict[str, Any]:
    """Pretrain with ``cfg`` into ``output``; continue from its newest intact checkpoint (or ``resume``).

    Rank 0 owns ``output`` for the whole run; SIGINT and SIGTERM stop after the current step with
    ``last.pt`` written at that step (:mod:`opera.engine.loop`, docs/reliability.md). ``init``
    (``train.init``'s weights) is loaded into the hierarchy only when the run starts from step 0
    with no checkpoint; a resume continues from its checkpoint and refuses another ``init``.
    """
    from opera.engine.trackers import TrackerOptions, require

    t = cfg.train
    trackers = TrackerOptions.of(t)
    if distributed.detect_env()[0] == 0:
        require(trackers.loggers)  # a missing extra is one line before anything is built (rank 0 only)
    with run_directory(output) as run:
        p = setup_pretrain(cfg, run, init)
        loop = TrainingLoop(run, p, Cadence(t.epochs, p.steps_per_epoch, t.max_steps, t.save_every_steps,
                                            t.save_every_epochs, t.log_every, t.keep_epoch_checkpoints, t.keep_last_prev),
                            seed=t.seed, rank=p.rank, world=p.world, tensorboard="tensorboard" in trackers.loggers,
                            trackers=trackers, tracker_config=p.resolved)
        try:
            loop.resume(resume)
            if init is not None and loop.source is None:
                line = init.apply(p.hierarchy, cfg.backbone.name, cfg.backbone.img_size, backbone_options(cfg))
                if run.main:
                    print(line, flush=True)
            _wrap(p)
            if run.main and not loop.done:  # a finished run rerun writes nothing
                print(disk_line(p), flush=True)
                atomic_write_text(run.output / "config.yaml", yaml.safe_dump(p.resolved, sort_keys=False),
                                  "the run's configuration")
            result = loop.run_to_end()
            if run.main and loop.at.global_step == p.total_steps and not (run.output / BACKBONE).is_file():
                export_backbone(p.hierarchy.backbone, run.output / BACKBONE, {"identity": p.identity(), "epoch": loop.at.epoch})
        finally:
            if p.tap is not None:
                p.tap.close()
        distributed.barrier()
    return {"output": str(run.output), "finished": loop.at.epoch >= t.epochs, **result}


def disk_line(p: PretrainProtocol) -> str:
    """The one line that says how much disk the run's checkpoints take (printed at start)."""
    t = p.cfg.train
    one = state_bytes(p.hierarchy, p.optimizer)
    rest, peak = disk_use(one, t.epochs, t.save_every_epochs, t.keep_epoch_checkpoints, t.keep_last_prev)
    kept = kept_epoch_count(t.keep_epoch_checkpoints, t.epochs, t.save_every_epochs)
    keep = t.keep_epoch_checkpoints
    shown = list(keep) if isinstance(keep, tuple) else keep
    return (f"checkpoints: about {gb(one)} each; this run keeps last.pt{' and last.prev.pt' if t.keep_last_prev else ''}"
            f" and up to {kept} epoch_NNNN.pt (train.save_every_epochs={t.save_every_epochs}, "
            f"train.keep_epoch_checkpoints={shown}): at most {gb(rest)}, {gb(peak)} while last.pt is written")


def gb(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**28 else f"{nbytes / 2**20:.1f} MiB"


#: train.knn_bank_per_class=-1 (auto): the kNN monitor keeps the whole train split as its bank up
#: to this many images (a few seconds to a minute of features), else a class-balanced subset of
#: KNN_AUTO_PER_CLASS images per class
KNN_FULL_BANK_MAX = 20_000
KNN_AUTO_PER_CLASS = 100


@dataclass
class KnnSets:
    """What the kNN monitor reads, built once per run: the bank (the train split, or its fixed
    class-balanced subset of ``train.knn_bank_per_class`` per class) and the held-out queries."""

    bank: Any
    queries: Any
    num_classes: int
    line: str  # what the log says about them, once


def knn_sets(cfg: PretrainConfig) -> KnnSets:
    from opera.data import EvalTransform, build_dataset
    from opera.engine.monitors import balanced_subset

    tf = EvalTransform(cfg.backbone.img_size)
    train = build_dataset(cfg.data.spec, "train", transform=tf)
    queries = build_dataset(cfg.data.spec, "val", transform=tf)
    per_class = cfg.train.knn_bank_per_class
    auto = per_class < 0
    if auto:  # small splits keep the whole bank (cheap); large ones a fixed subset
        per_class = 0 if len(train) <= KNN_FULL_BANK_MAX else KNN_AUTO_PER_CLASS
    keep = balanced_subset(train.targets, per_class)
    bank = train if keep is None else torch.utils.data.Subset(train, keep.tolist())
    setting = f"train.knn_bank_per_class={cfg.train.knn_bank_per_class}" + (
        f": auto, the whole split up to {KNN_FULL_BANK_MAX} images, else {KNN_AUTO_PER_CLASS} per class" if auto else "")
    which = (f"the whole train split ({len(train)} images; {setting})" if keep is None else
             f"{len(bank)} of {len(train)} train images, at most {per_class} per class "
             f"({setting}; a fixed class-balanced subset)")
    line = (f"kNN monitor: bank {which}, {len(queries)} held-out queries, float16 features, "
            f"{cfg.data.workers} workers; 'opera run knn' is the full protocol")
    return KnnSets(bank, queries, train.num_classes, line)


@torch.no_grad()
def knn_monitor(backbone: torch.nn.Module, cfg: PretrainConfig, device: torch.device, rank: int, world: int,
                sets: KnnSets | None = None, probe: CollapseProbe | None = None) -> float:
    """Weighted kNN top-1 (%) on the held-out split from backbone features; under DDP the train
    bank is sharded across the ranks (opera.engine.monitors.knn_monitor), every rank calls it.
    ``sets``: the datasets of :func:`knn_sets` (built here when not given); ``probe``: the
    collapse monitor, fed from the bank's features of the same pass."""
    from opera.engine import monitors

    sets = sets or knn_sets(cfg)
    return monitors.knn_monitor(backbone, sets.bank, sets.queries, sets.num_classes, device, k=cfg.train.knn_k,
                                workers=cfg.data.workers, on_bank_batch=probe)
