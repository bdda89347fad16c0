"""Linear evaluation (paper Appendix C.1): a linear classifier on the frozen backbone.

Protocol: the backbone is frozen (eval mode, no gradients; its BatchNorm statistics stay those
of the checkpoint); features y (Eq. 8, timm's pre-logits) go through an optional
``BatchNorm1d(affine=False)`` (``bn=True``: a per-feature standardisation as in MAE's linear
probe, which makes one learning rate fit every backbone; off by default as in C.1 / MoCo-v3) and
a ``Linear`` layer (weights N(0, 0.01), bias 0).
SGD, momentum 0.9, weight decay 0, ``lr = base_lr * batch / 256`` with base 0.1 for CNNs and 3.0
for ViTs (C.1: R50 0.1, DeiT-S 3.0), batch 1024, per-iteration cosine decay, 90 epochs.
Top-1 / top-5 on the held-out split.

Two modes:

* ``augment=True`` (the ImageNet protocol): every epoch draws fresh RandomResizedCrop + flip
  views of the training images and runs them through the frozen backbone;
* ``augment=False``: training features are extracted once (center crop, no augmentation) and the
  classifier trains on the cached features - seconds instead of hours. It is the default for
  ``digits`` (8x8 images, where crops destroy the content and the whole set is 1,437 images);
  ``augment=None`` picks it by data spec.

Many heads in one pass (``grid=True``, ``--grid``): one frozen forward feeds a grid of linear
classifiers, every learning rate of ``grid_lr_scales`` x the base lr, each without and with the
BatchNorm (dinov2's linear eval trains such a grid). The head is chosen on ``holdout_fraction``
of the *training* set held out from training (seeded), never on the validation split, and
results.json reports every head (its held-out and validation accuracy) and the winner, whose
validation accuracy is the result. Without ``--grid``: the one C.1 head on the whole train split.

Distributed (``--nproc``, torchrun, SLURM): ``batch_size`` is the global batch and the learning
rate scales with it, ``lr = base_lr * global_batch / 256`` whatever the number of processes
(results.json records base lr, global batch, world size and per-rank batch). Every rank takes
its share of each global batch (:class:`~opera.evals.common.GlobalBatchSampler`); the gradients
of the cross-entropy summed over the global batch and divided by its size are summed over ranks,
and the BatchNorm of a head normalises over the global batch (synchronised), so N processes take
the steps of one. Validation features are sharded without padding and the correct counts summed
over ranks: every image counts exactly once.

Resumable: the heads train in the one training loop (:mod:`opera.engine.loop`), which holds
``OUTPUT``'s lock, writes ``OUTPUT/last.pt`` (heads, optimizer, epoch, step) atomically at every
epoch end and when SIGINT/SIGTERM stops the run after its current step; rerunning the same
command continues from it (a SLURM requeue does the same) and ends with the same heads.

Validation features are extracted once in both modes (the backbone is frozen). After training,
every backbone parameter and buffer is compared with the loaded checkpoint (MoCo-v3's
``sanity_check``); any difference raises :class:`~opera.evals.common.FrozenBackboneError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opera import distributed
from opera.data.loader import Loader
from opera.configs import validate
from opera.engine.loop import Cadence, Position, RunDirectory, TrainingLoop, run_directory
from opera.engine.optim import lr_at
from opera.errors import OperaError
from opera.evals.common import (
    EvalRun,
    GlobalBatchSampler,
    check_frozen,
    check_global_batch,
    check_output,
    eval_env,
    extract_features,
    gathered_accuracy,
    eval_identity,
    is_vit,
    load_eval_backbone,
    parse_data,
    seed_everything,
    shard_of,
    snapshot_state,
    topk_correct,
)
from opera.evals.options import LinearConfig  # noqa: F401  (re-exported)

#: C.1: base learning rates of the linear probe (scaled by batch / 256)
BASE_LR_CNN = 0.1
BASE_LR_VIT = 3.0


class LinearHead(nn.Sequential):
    def __init__(self, dim: int, num_classes: int, bn: bool = True):
        layers: list[nn.Module] = [nn.BatchNorm1d(dim, affine=False, eps=1e-6)] if bn else []
        fc = nn.Linear(dim, num_classes)
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        super().__init__(*layers, fc)


class LinearTrainTransform:
    """RandomResizedCrop(img_size, scale=(crop_min, 1)) + horizontal flip + normalise (MoCo-v3's
    linear-probe augmentation) on uint8 ``3xHxW`` tensors."""

    def __init__(self, img_size: int, crop_min: float = 0.08):
        from torchvision.transforms import v2

        from opera.data import IMAGENET_MEAN, IMAGENET_STD

        self.t = v2.Compose([
            v2.RandomResizedCrop(img_size, scale=(crop_min, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __call__(self, img):
        return self.t(img)




def resolve_base_lr(cfg: LinearConfig, model: nn.Module) -> float:
    if cfg.base_lr is not None:
        return cfg.base_lr
    return BASE_LR_VIT if is_vit(model) else BASE_LR_CNN


def _validate(cfg: LinearConfig) -> None:
    """Every field's type, range and choices (:func:`opera.configs.validate`), then what the
    fields' metadata cannot state: the data spec parses, and a grid has heads."""
    validate(cfg)
    parse_data(cfg.data)
    if cfg.grid:
        if not cfg.grid_lr_scales:
            raise OperaError("the grid needs at least one lr multiplier; set --grid-lrs 0.1,0.3,1,3,10")
        if not cfg.grid_bn:
            raise OperaError("the grid needs at least one BatchNorm setting (grid_bn: [false, true])")


@dataclass
class HeadSpec:
    """One classifier of the grid: its name, base lr (lr = base_lr * global batch / 256) and BN."""

    name: str
    base_lr: float
    lr: float
    bn: bool


def head_grid(cfg: LinearConfig, base_lr: float, global_batch: int) -> list[HeadSpec]:
    """The single C.1 head, or (``--grid``) every lr scale x BN setting, in grid order."""
    pairs = [(m, bn) for m in cfg.grid_lr_scales for bn in cfg.grid_bn] if cfg.grid else [(1.0, cfg.bn)]
    return [HeadSpec(f"lr{base_lr * m:g}{'_bn' if bn else ''}", base_lr * m, base_lr * m * global_batch / 256, bn)
            for m, bn in pairs]


class LinearHeads(nn.Module):
    """Many linear heads on the same frozen features: ``forward`` returns one logit tensor each."""

    def __init__(self, dim: int, num_classes: int, specs: list[HeadSpec]):
        super().__init__()
        self.heads = nn.ModuleList(LinearHead(dim, num_classes, s.bn) for s in specs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [h(x) for h in self.heads]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices) of a seeded random split of ``range(n)``."""
    g = torch.Generator()
    g.manual_seed(seed + 7)
    perm = torch.randperm(n, generator=g).tolist()
    k = max(1, round(n * fraction))
    return sorted(perm[k:]), sorted(perm[:k])


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, feats: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> list[dict[str, float]]:
    """top-1/top-5 of every head over this rank's (unpadded) share, counts summed over ranks."""
    heads.eval()
    counts = [{1: 0, 5: 0} for _ in heads.heads]
    for i in range(0, len(feats), batch):
        y = labels[i: i + batch]
        for c, logits in zip(counts, heads(feats[i: i + batch])):
            for k, v in topk_correct(logits.float(), y).items():
                c[k] += v
    return [gathered_accuracy(c, len(feats)) for c in counts]


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if distributed.get_world_size() == 1 or not grads:
        return
    flat = distributed.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
    i = 0
    for g in grads:
        g.copy_(flat[i: i + g.numel()].view_as(g))
        i += g.numel()


def run_linear(cfg: LinearConfig, loaded=None) -> dict:
    """Linear evaluation of ``cfg.checkpoint`` on ``cfg.data``; returns the results dict."""
    _validate(cfg)
    check_output(cfg.output, create=False)
    env, device = eval_env(cfg.device)
    with run_directory(cfg.output, env.rank == 0) as run:
        return _linear(cfg, loaded, env, device, run)


def _linear(cfg: LinearConfig, loaded, env, device: torch.device, run_dir: RunDirectory) -> dict:
    from opera.data import EvalTransform, build_dataset

    rank, world, main = env.rank, env.world_size, env.rank == 0
    check_global_batch(cfg.batch_size, world)
    run = EvalRun("linear", cfg, main=main)
    seed_everything(cfg.seed)
    loaded = loaded or load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, cfg.data, cfg.seed)
    augment = cfg.augment if cfg.augment is not None else parse_data(cfg.data).name != "digits"
    eval_tf = EvalTransform(loaded.img_size)
    train_eval = build_dataset(cfg.data, "train", eval_tf)
    train = build_dataset(cfg.data, "train", LinearTrainTransform(loaded.img_size, cfg.crop_min)) if augment else train_eval
    val = build_dataset(cfg.data, "val", eval_tf)
    model = loaded.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    reference = snapshot_state(model)
    base_lr = resolve_base_lr(cfg, model)
    specs = head_grid(cfg, base_lr, cfg.batch_size)
    train_idx, hold_idx = holdout_split(len(train), cfg.holdout_fraction, cfg.seed) if cfg.grid else (list(range(len(train))), [])

    def features(dataset):  # this rank's unpadded share, through the frozen backbone
        f, y = extract_features(model, shard_of(dataset, rank, world), cfg.feature_batch_size, device, cfg.workers)
        return f.to(device), y.to(device)

    val_feats, val_labels = features(val)
    hold = features(torch.utils.data.Subset(train_eval, hold_idx)) if hold_idx else None
    sampler = GlobalBatchSampler(train_idx, cfg.batch_size, cfg.seed, rank, world, drop_last=augment and len(train_idx) > cfg.batch_size)
    cached = None if augment else tuple(distributed.all_gather_uneven(t) for t in features(train_eval))
    heads = LinearHeads(val_feats.shape[1], val.num_classes, specs).to(device)
    if world > 1:
        heads = distributed.convert_sync_batchnorm(heads)  # BN over the global batch, as in one process
    protocol = LinearProtocol(cfg, heads, specs, sampler, _batches(cfg, model, train, sampler, device, cached),
                              (val_feats, val_labels), eval_identity_linear(cfg, loaded, specs, train_eval), run, world)
    loop = TrainingLoop(run_dir, protocol, Cadence(cfg.epochs, max(1, len(sampler)), log_every=cfg.log_every), seed=cfg.seed,
                        rank=rank, world=world, tensorboard=False)
    loop.resume()
    loop.run_to_end()
    check_frozen(model, reference)
    metrics, extra = _linear_results(cfg, specs, heads, val_feats, val_labels, hold, protocol.best, base_lr, world, augment)
    return run.finish(metrics, loaded, extra=extra, data={
        "train": cfg.data, "val": cfg.data, "num_classes": val.num_classes, "train_images": len(train_idx),
        "holdout_images": len(hold_idx), "val_images": len(val)})


def _batches(cfg: LinearConfig, model: nn.Module, train, sampler: GlobalBatchSampler, device: torch.device,
             cached: tuple[torch.Tensor, torch.Tensor] | None):
    """``batches()``: this rank's (features, labels) of every remaining step of the sampler's
    epoch: fresh augmented views through the frozen backbone (``cached=None``), or rows of the
    cached features of the whole training set (any image may fall in a rank's share). The loader
    iterator is made at once, before the loop seeds the first step (its crops are the step's)."""
    from opera.backbones import pooled_features

    if cached is not None:
        feats, labels = cached

        def from_cache() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for idx in sampler:
                idx_t = torch.as_tensor(idx, dtype=torch.long, device=device)
                yield feats[idx_t], labels[idx_t]

        return from_cache
    loader = Loader(train, batch_sampler=sampler, num_workers=cfg.workers,  # a worker's error is its own line
                    pin_memory=device.type == "cuda")

    def augmented() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        it = iter(loader)

        def through_backbone() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for x, y in it:
                with torch.no_grad():  # (a yield inside it would leave the caller without gradients)
                    f = pooled_features(model, x.to(device, non_blocking=True)).float()
                yield f, y.to(device)

        return through_backbone()

    return augmented


@dataclass
class LinearProtocol:
    """The linear probe's :class:`~opera.engine.loop.TrainingProtocol`: every head of the grid
    on the same frozen features, one SGD step each per global batch."""

    cfg: LinearConfig
    heads: LinearHeads
    specs: list[HeadSpec]
    sampler: GlobalBatchSampler
    make_batches: Any  # () -> this rank's (features, labels) of the sampler's epoch
    val: tuple[torch.Tensor, torch.Tensor]
    want: dict[str, Any]
    run: EvalRun
    world: int
    name: str = "linear evaluation"
    skips_nonfinite: bool = False
    best: list[float] = field(default_factory=list)  # each head's best validation top-1 over epochs (reported only)

    def __post_init__(self) -> None:
        self.params = list(self.heads.parameters())
        self.opt = torch.optim.SGD([{"params": list(h.parameters()), "peak_lr": s.lr} for h, s in zip(self.heads.heads, self.specs)],
                                   lr=self.specs[0].lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        self.sizes = self.sampler.global_sizes()
        self.best = [0.0] * len(self.specs)
        self.total, self.seen = 0.0, 0

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size

    def identity(self) -> dict[str, Any]:
        return self.want

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.heads.state_dict(), "optimizer": self.opt.state_dict(), "best": torch.tensor(self.best)}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        self.heads.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.best = [float(b) for b in state["best"]]

    def batches(self, at: Position) -> Iterator[Any]:
        self.heads.train()
        self.sampler.set_epoch(at.epoch, at.step_in_epoch)
        self.total, self.seen = 0.0, 0
        return self.make_batches()

    def step(self, batch: Any, at: Position) -> dict[str, torch.Tensor]:
        (x, y), i = batch, at.step_in_epoch
        n_global = self.sizes[i]
        if n_global < 2 and any(s.bn for s in self.specs):  # BatchNorm needs two samples (all ranks agree)
            return {}
        for g in self.opt.param_groups:
            g["lr"] = lr_at(at.epoch + i / max(1, len(self.sampler)), self.cfg.epochs, self.cfg.warmup_epochs, g["peak_lr"])
        # the cross-entropy summed over the global batch / its size, summed over ranks
        loss = sum(F.cross_entropy(logits, y, reduction="sum") for logits in self.heads(x)) / n_global
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        _all_reduce_grads(self.params)
        self.opt.step()
        self.total += float(loss.detach()) * n_global / len(self.specs)
        self.seen += n_global
        return {"loss": loss.detach() / len(self.specs)}

    def log_row(self, at: Position) -> dict[str, float]:
        return {"lr": self.opt.param_groups[0]["lr"]}

    def end_epoch(self, at: Position, finished_epoch: bool) -> dict[str, float]:
        """Every head on the validation features; the TensorBoard scalars of the epoch."""
        accs = evaluate_heads(self.heads, *self.val)
        self.best = [max(b, a["top1"]) for b, a in zip(self.best, accs)]
        epoch = at.epoch - 1
        self.run.log("linear/train_loss", float(distributed.all_reduce_sum(torch.tensor([self.total]))[0]) / max(self.seen, 1), epoch)
        self.run.log("linear/val_top1", accs[0]["top1"], epoch)
        self.run.log("linear/lr", self.opt.param_groups[0]["lr"], epoch)
        return {"val_top1": accs[0]["top1"]}


def eval_identity_linear(cfg: LinearConfig, loaded, specs: list[HeadSpec], train=None) -> dict[str, Any]:
    want = eval_identity("linear", cfg, loaded, train)
    want["options"]["heads"] = [s.name for s in specs]
    return want


def _linear_results(cfg, specs, heads, val_feats, val_labels, hold, best, base_lr, world, augment):
    val = evaluate_heads(heads, val_feats, val_labels)
    scaling = {"rule": "lr = base_lr * global_batch / 256", "base_lr": base_lr, "global_batch": cfg.batch_size,
               "world_size": world, "per_rank_batch": cfg.batch_size // world, "lr": specs[0].lr if not cfg.grid else None}
    if not cfg.grid:
        metrics = {**val[0], "best_top1": best[0], "lr": specs[0].lr, "augment": augment, "frozen_check": "passed"}
        return metrics, {"lr_scaling": scaling}
    held = evaluate_heads(heads, *hold)
    table = [{"name": s.name, "base_lr": s.base_lr, "lr": s.lr, "bn": s.bn, "holdout_top1": h["top1"],
              "val_top1": v["top1"], "val_top5": v["top5"]} for s, h, v in zip(specs, held, val)]
    win = max(range(len(specs)), key=lambda j: (held[j]["top1"], -j))  # ties: the first in grid order
    metrics = {**val[win], "winner": specs[win].name, "lr": specs[win].lr, "bn": specs[win].bn,
               "holdout_top1": held[win]["top1"], "augment": augment, "frozen_check": "passed"}
    grid = {"selection_split": "train-held-out", "selected_on": "holdout_top1", "holdout_fraction": cfg.holdout_fraction,
            "winner": specs[win].name, "heads": table,
            "note": "the head is chosen on images held out from the training split, never on validation"}
    return metrics, {"lr_scaling": scaling, "linear_grid": grid}
