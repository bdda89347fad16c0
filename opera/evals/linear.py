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

Validation features are extracted once in both modes (the backbone is frozen). After training,
every backbone parameter and buffer is compared with the loaded checkpoint (MoCo-v3's
``sanity_check``); any difference raises :class:`~opera.evals.common.FrozenBackboneError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from opera.engine.optim import lr_at
from opera.engine.rundir import owns_output
from opera.errors import OperaError
from opera.evals.common import (
    EvalConfig,
    EvalRun,
    accuracy,
    check_frozen,
    extract_features,
    is_vit,
    load_eval_backbone,
    make_loader,
    parse_data,
    resolve_device,
    seed_everything,
    snapshot_state,
)

#: C.1: base learning rates of the linear probe (scaled by batch / 256)
BASE_LR_CNN = 0.1
BASE_LR_VIT = 3.0


@dataclass
class LinearConfig(EvalConfig):
    epochs: int = 90
    batch_size: int = 1024
    base_lr: float | None = None  # None: 0.1 for CNNs, 3.0 for ViTs; lr = base_lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    bn: bool = False  # BatchNorm1d(affine=False) before the linear layer (MAE-style; C.1/MoCo-v3: none)
    augment: bool | None = None  # None: off for digits (cached features), on otherwise
    crop_min: float = 0.08  # RandomResizedCrop scale of the augmented mode
    feature_batch_size: int = 256  # batch of the frozen forward passes


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
    parse_data(cfg.data)
    for name in ("epochs", "batch_size", "feature_batch_size"):
        if getattr(cfg, name) < 1:
            raise OperaError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.base_lr is not None and cfg.base_lr <= 0:
        raise OperaError(f"--base-lr must be positive, got {cfg.base_lr}")
    if not 0 < cfg.crop_min <= 1:
        raise OperaError(f"--crop-min must be in (0, 1], got {cfg.crop_min}")


@torch.no_grad()
def _evaluate(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    head.eval()
    logits = torch.cat([head(feats[i: i + batch]) for i in range(0, len(feats), batch)])
    return accuracy(logits.float().cpu(), labels.cpu())


def train_linear_head(train_feats: torch.Tensor | None, train_labels: torch.Tensor | None, val_feats: torch.Tensor,
                      val_labels: torch.Tensor, num_classes: int, cfg: LinearConfig, lr: float,
                      device: torch.device, run: EvalRun | None = None, batches=None, steps_per_epoch: int | None = None,
                      generator: torch.Generator | None = None) -> tuple[nn.Module, dict[str, float]]:
    """Train the linear head; either on cached ``train_feats`` or on ``batches(epoch)`` (an
    iterator of (features, labels) per epoch, the augmented mode). Returns (head, metrics)."""
    dim = val_feats.shape[1]
    head = LinearHead(dim, num_classes, cfg.bn).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    val_feats, val_labels = val_feats.to(device), val_labels.to(device)
    if train_feats is not None:
        train_feats, train_labels = train_feats.to(device), train_labels.to(device)
        n = len(train_feats)
        steps_per_epoch = max(1, -(-n // cfg.batch_size))

        def batches(epoch: int):  # noqa: F811
            perm = torch.randperm(n, generator=generator).to(device)
            for i in range(0, n, cfg.batch_size):
                idx = perm[i: i + cfg.batch_size]
                yield train_feats[idx], train_labels[idx]

    best = 0.0
    step = 0
    for epoch in range(cfg.epochs):
        head.train()
        total, seen = 0.0, 0
        for i, (x, y) in enumerate(batches(epoch)):
            if cfg.bn and len(x) < 2:  # BatchNorm needs two samples
                continue
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch + i / steps_per_epoch, cfg.epochs, cfg.warmup_epochs, lr)
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
            seen += len(x)
            step += 1
        acc = _evaluate(head, val_feats, val_labels)
        best = max(best, acc["top1"])
        if run is not None:
            run.log("linear/train_loss", total / max(seen, 1), epoch)
            run.log("linear/val_top1", acc["top1"], epoch)
            run.log("linear/val_top5", acc["top5"], epoch)
            run.log("linear/lr", opt.param_groups[0]["lr"], epoch)
    metrics = _evaluate(head, val_feats, val_labels)
    metrics["best_top1"] = best
    return head, metrics


@owns_output("linear evaluation")
def run_linear(cfg: LinearConfig, loaded=None) -> dict:
    """Linear evaluation of ``cfg.checkpoint`` on ``cfg.data``; returns the results dict."""
    from opera.backbones import pooled_features
    from opera.data import EvalTransform, build_dataset

    _validate(cfg)
    device = resolve_device(cfg.device)
    run = EvalRun("linear", cfg)
    gen = seed_everything(cfg.seed)
    loaded = loaded or load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, cfg.data, cfg.seed)
    augment = cfg.augment if cfg.augment is not None else parse_data(cfg.data).name != "digits"
    eval_tf = EvalTransform(loaded.img_size)
    train = build_dataset(cfg.data, "train", LinearTrainTransform(loaded.img_size, cfg.crop_min) if augment else eval_tf)
    val = build_dataset(cfg.data, "val", eval_tf)
    model = loaded.model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    reference = snapshot_state(model)
    lr = resolve_base_lr(cfg, model) * cfg.batch_size / 256

    val_feats, val_labels = extract_features(model, val, cfg.feature_batch_size, device, cfg.workers)
    if augment:
        loader = make_loader(train, cfg.batch_size, shuffle=True, workers=cfg.workers, drop_last=len(train) > cfg.batch_size,
                             generator=gen, device=device)

        def batches(epoch: int):
            for x, y in loader:
                with torch.no_grad():
                    f = pooled_features(model, x.to(device, non_blocking=True)).float()
                yield f, y.to(device)

        _, metrics = train_linear_head(None, None, val_feats, val_labels, val.num_classes, cfg, lr, device, run,
                                       batches=batches, steps_per_epoch=len(loader))
    else:
        train_feats, train_labels = extract_features(model, train, cfg.feature_batch_size, device, cfg.workers)
        _, metrics = train_linear_head(train_feats, train_labels, val_feats, val_labels, val.num_classes, cfg, lr,
                                       device, run, generator=gen)
    check_frozen(model, reference)
    metrics.update({"lr": lr, "augment": augment, "frozen_check": "passed"})
    return run.finish(metrics, loaded, data={"train": cfg.data, "val": cfg.data, "num_classes": val.num_classes,
                                             "train_images": len(train), "val_images": len(val)})
