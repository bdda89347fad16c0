"""End-to-end fine-tuning (paper Appendix C.1, Table 2; DeiT's recipe as used by MoCo-v3).

The pretrained backbone gets a fresh linear classifier (``timm.create_model(..., num_classes=K)``
with the backbone weights loaded, so every timm model works) and is trained end to end:
AdamW (betas 0.9/0.999) with ``lr = base_lr * batch / lr_batch_base`` (5e-4 per 512 images, as
DeiT scales it), weight decay 0.05 (not on biases, norms, position embeddings or class tokens),
linear warmup then per-iteration cosine decay, timm Mixup 0.8 / CutMix 1.0 (switch prob 0.5) with
label smoothing 0.1 (``SoftTargetCrossEntropy``), RandAugment (torchvision's, 2 ops at
magnitude 9, on uint8 tensors), random erasing 0.25, stochastic depth (drop path) 0.1 and
optionally layer-wise lr decay (timm's ``param_groups_layer_decay``, e.g. 0.75 for ViTs). Each
is a field of :class:`FinetuneConfig`; 0 / None switches it off.

Recipes (``opera/evals/recipes/*.yaml``) set the fields of one row of the paper:
``finetune_100ep`` ... ``finetune_300ep`` (Table 2: only the epochs differ), ``transfer`` (Table 3:
100 epochs) and ``digits`` (seconds on a CPU: no Mixup/RandAugment, which would swamp 8x8
images). Precedence, lowest first: dataclass defaults, the recipe, explicit options.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from opera import distributed
from opera.data.loader import Loader
from opera.configs import load_recipe, validate
from opera.engine.loop import Cadence, Position, RunDirectory, TrainingLoop, run_directory
from opera.engine.optim import lr_at
from opera.engine.step import autocast_context
from opera.errors import OperaError
from opera.evals.common import (
    EvalConfig,
    EvalRun,
    GlobalBatchSampler,
    LoadedBackbone,
    check_global_batch,
    check_output,
    eval_env,
    eval_identity,
    gathered_accuracy,
    load_eval_backbone,
    make_loader,
    parse_data,
    seed_everything,
    shard_of,
    topk_correct,
)
from opera.fields import option

RECIPES = Path(__file__).parent / "recipes"


@dataclass
class FinetuneConfig(EvalConfig):
    recipe: str | None = option(None, help="a recipe name (opera/evals/recipes) or a YAML path")
    epochs: int = option(100, help="fine-tuning epochs (Table 2: 100/150/200/300)", min=1)
    batch_size: int = option(1024, help="global batch over all processes (C.1: 1024)", min=1)
    base_lr: float = option(5e-4, help="AdamW lr per lr_batch_base images (C.1: 5e-4)", min=0, min_exclusive=True)
    lr_batch_base: int = option(512, help="lr = base_lr * batch_size / lr_batch_base", min=1)
    weight_decay: float = option(0.05, help="AdamW weight decay (not on biases, norms, position embeddings, class "
                                 "tokens)", min=0)
    betas: tuple[float, float] = option((0.9, 0.999), help="AdamW betas", min=0, max=1, max_exclusive=True,
                                        example="[0.9,0.999]")
    eps: float = option(1e-8, help="AdamW's epsilon (timm --opt-eps, default 1e-8)", min=0, min_exclusive=True)
    warmup_epochs: float = option(5.0, help="linear warmup epochs before the per-iteration cosine decay", min=0)
    layer_decay: float | None = option(None, help="layer-wise lr decay, e.g. 0.75 for ViTs; None: off",
                                       min=0, max=1, min_exclusive=True)
    drop_path: float = option(0.1, help="stochastic depth rate", min=0, max=1)
    label_smoothing: float = option(0.1, help="label smoothing", min=0, max=1)
    mixup: float = option(0.8, help="Mixup alpha (0: off)", min=0)
    cutmix: float = option(1.0, help="CutMix alpha (0: off)", min=0)
    mixup_prob: float = option(1.0, help="probability of mixing a batch", min=0, max=1)
    mixup_switch_prob: float = option(0.5, help="probability of CutMix instead of Mixup when both are on", min=0, max=1)
    randaug_ops: int = option(2, help="RandAugment operations per image", min=0)
    randaug_magnitude: int = option(9, help="RandAugment magnitude (0: RandAugment off; 30 at most: 31 bins)",
                                    min=0, max=30)
    reprob: float = option(0.25, help="random erasing probability", min=0, max=1)
    crop_min: float = option(0.08, help="RandomResizedCrop minimum scale", min=0, max=1, min_exclusive=True)
    flip: bool = option(True, help="random horizontal flip")
    clip_grad: float | None = option(None, help="gradient norm clipping (None or 0: off)", min=0)
    amp: str = option("auto", help="auto (bf16 on CUDA) | bf16 | off", choices=("auto", "bf16", "off"))
    eval_every: int = option(1, help="epochs between validations (the final one always runs)", min=1)
    max_steps: int = option(0, help="stop after this many optimizer steps (0: no limit; smoke tests)", min=0)
    save_every_steps: int = option(0, help="last.pt within an epoch every this many steps (0: at epoch ends only)",
                                   min=0)
    sync_bn: bool = option(True, help="under several processes, BatchNorm over the global batch (timm/DeiT --sync-bn)")
    labels: str = option("all", help="semi-supervised protocol: train on these labelled images only "
                         "(opera.data.labels.labelled_subset)")


# ----------------------------------------------------------------------------- recipes
def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def default_recipe(data: str) -> str:
    """``digits`` for the embedded digits, ``finetune_100ep`` otherwise."""
    return "digits" if parse_data(data).name == "digits" else "finetune_100ep"


def finetune_config(recipe: str | None = "auto", **options: Any) -> FinetuneConfig:
    """Defaults < ``recipe`` < ``options`` (options that are None are ignored), validated
    (:func:`opera.configs.load_recipe`, the one recipe reader of every protocol).

    ``recipe="auto"`` picks :func:`default_recipe` of ``options["data"]``; None uses the
    dataclass defaults (the 100-epoch ImageNet recipe) alone.
    """
    if recipe == "auto":
        recipe = default_recipe(options.get("data") or FinetuneConfig.data)
    return load_recipe(recipe, FinetuneConfig, RECIPES, values={**options, "recipe": recipe},
                       command="run finetune", what="fine-tuning recipe")


def _validate(cfg: FinetuneConfig) -> None:
    """Every field's type, range and choices (:func:`opera.configs.validate`), then what the
    fields' metadata cannot state: the data spec parses, and Mixup/CutMix get an even batch."""
    validate(cfg)
    parse_data(cfg.data)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise OperaError(f"Mixup/CutMix mix a batch with its reverse and need an even --batch-size, got {cfg.batch_size}")


# ----------------------------------------------------------------------------- pieces
class FinetuneTrainTransform:
    """RandomResizedCrop + flip + RandAugment (uint8) + normalise + random erasing."""

    def __init__(self, img_size: int, crop_min: float = 0.08, flip: bool = True, randaug_ops: int = 2,
                 randaug_magnitude: int = 9, reprob: float = 0.25):
        from torchvision.transforms import v2

        from opera.data import IMAGENET_MEAN, IMAGENET_STD

        ops: list = [v2.RandomResizedCrop(img_size, scale=(crop_min, 1.0), antialias=True)]
        if flip:
            ops.append(v2.RandomHorizontalFlip())
        if randaug_magnitude > 0 and randaug_ops > 0:
            ops.append(v2.RandAugment(num_ops=randaug_ops, magnitude=randaug_magnitude))
        ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        if reprob > 0:
            ops.append(v2.RandomErasing(p=reprob, value="random"))
        self.t = v2.Compose(ops)

    def __call__(self, img):
        return self.t(img)


def build_classifier(loaded: LoadedBackbone, num_classes: int, drop_path: float = 0.0) -> nn.Module:
    """The timm model of the backbone's spec with a fresh ``num_classes`` head and the backbone
    weights; only the classifier's own parameters may be missing from the checkpoint."""
    import timm

    spec = loaded.spec or {}
    if not spec.get("timm_name"):
        raise OperaError(f"checkpoint {loaded.source} carries no timm spec; fine-tuning needs an opera or timm backbone")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("timm_kwargs", {}).items() if k != "num_classes"}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    try:
        model = timm.create_model(spec["timm_name"], pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise OperaError(f"backbone {spec.get('name')!r} does not accept drop_path_rate ({exc}); pass --drop-path 0") from None
    from opera.backbones import guard_image_size

    guard_image_size(model, str(spec.get("name")))
    classifier = model.get_classifier()
    cname = next(n for n, m in model.named_modules() if m is classifier)
    head = {f"{cname}.{n}" for n, _ in classifier.named_parameters()}
    missing, unexpected = model.load_state_dict(loaded.model.state_dict(), strict=False)
    stray = [k for k in missing if k not in head]
    if stray or unexpected:
        raise OperaError(f"checkpoint {loaded.source} does not fit {spec['timm_name']} (missing {stray[:3]}, unexpected {unexpected[:3]})")
    return model


def param_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """Weight-decay groups (none on 1-d params / no_weight_decay()), with per-layer lr scales."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay is not None and cfg.layer_decay < 1.0:
        groups = param_groups_layer_decay(model, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    return groups


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast) -> dict[str, float]:
    """top-1/top-5 over ``loader`` (this rank's unpadded share), correct counts summed over ranks."""
    model.eval()
    counts, n = {1: 0, 5: 0}, 0
    for x, y in loader:
        with autocast():
            logits = model(x.to(device, non_blocking=True)).float().cpu()
        for k, c in topk_correct(logits, torch.as_tensor(y)).items():
            counts[k] += c
        n += len(y)
    return gathered_accuracy(counts, n)


# ----------------------------------------------------------------------------- the protocol
def run_finetune(cfg: FinetuneConfig, loaded: LoadedBackbone | None = None, protocol: str = "finetune") -> dict:
    """Fine-tune ``cfg.checkpoint`` end to end on ``cfg.data``; returns the results dict.

    Distributed: ``batch_size`` is the global batch (``lr = base_lr * global_batch /
    lr_batch_base`` for any number of processes); each rank takes its share of every global batch
    (:class:`~opera.evals.common.GlobalBatchSampler`), the loss of a rank is its per-sample sum
    divided by the global batch size (times the world size, which DDP's gradient average undoes)
    and, with ``sync_bn`` (default), BatchNorm normalises over the global batch: N processes take
    the steps of one process, up to the per-process draws of the augmentations and of Mixup
    (which, as in DeiT, mixes within each rank's share). Validation is sharded without padding.

    Resumable like pretraining, in the same loop (:mod:`opera.engine.loop`): rank 0 writes
    ``OUTPUT/last.pt`` at every epoch end, every ``save_every_steps`` steps and when SIGINT/SIGTERM
    stops the run; rerunning the same command (or a requeued SLURM job) continues from it. Every
    step reseeds from (seed, rank, step), so with ``workers=0`` a resumed run replays the
    uninterrupted one exactly; with workers, the augmentations after a mid-epoch resume are drawn
    anew (the same images in the same order).
    """
    _validate(cfg)
    check_output(cfg.output, create=False)
    env, device = eval_env(cfg.device)
    with run_directory(cfg.output, env.rank == 0) as run:
        return _finetune(cfg, loaded, protocol, env, device, run)


@dataclass
class FinetuneProtocol:
    """Fine-tuning's :class:`~opera.engine.loop.TrainingProtocol`: the classifier (backbone +
    head) with AdamW, Mixup/CutMix, label smoothing, layer-wise lr decay (DeiT / BEiT recipes)."""

    cfg: FinetuneConfig
    model: nn.Module  # the classifier (SyncBatchNorm'd under DDP with sync_bn)
    net: nn.Module  # what the step calls: the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    sampler: GlobalBatchSampler
    loader: Any
    val_loader: Any
    mixup: Any
    criterion: nn.Module
    lr: float
    device: torch.device
    world: int
    want: dict[str, Any]
    run: EvalRun
    tag: str  # the protocol's name in results.json and TensorBoard ("finetune", "transfer-...")
    name: str = "fine-tuning"
    skips_nonfinite: bool = False
    best: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)  # the last validation

    def __post_init__(self) -> None:
        self.sizes = self.sampler.global_sizes()
        self.total, self.seen, self.cur = 0.0, 0, 0.0

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size

    def autocast(self):
        return autocast_context(self.device, self.cfg.amp)

    def identity(self) -> dict[str, Any]:
        return self.want

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "best": self.best, "metrics": self.metrics}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.best, self.metrics = float(state["best"]), dict(state.get("metrics") or {})

    def batches(self, at: Position) -> Iterator[Any]:
        self.net.train()
        self.sampler.set_epoch(at.epoch, at.step_in_epoch)
        self.total, self.seen = 0.0, 0
        return iter(self.loader)  # made now, before the loop seeds the first step (its augmentations are the step's)

    def step(self, batch: Any, at: Position) -> dict[str, torch.Tensor]:
        cfg, (x, y) = self.cfg, batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = self.mixup(x, y)
        self.cur = lr_at(at.epoch + at.step_in_epoch / max(1, len(self.sampler)), cfg.epochs, cfg.warmup_epochs, self.lr)
        for g in self.opt.param_groups:
            g["lr"] = self.cur * g["lr_scale"]
        with self.autocast():
            logits = self.net(x)
        # this rank's sum over its share / the global batch size; x world undoes DDP's mean over ranks
        n_global = self.sizes[at.step_in_epoch]
        loss = self.criterion(logits.float(), y) * (len(x) * self.world / n_global)
        if not torch.isfinite(loss):
            return {"loss": loss.detach()}  # the loop ends the run in one line, last.pt intact
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.opt.step()
        self.total += float(loss.detach()) * n_global / self.world
        self.seen += len(x)
        return {"loss": loss.detach()}

    def log_row(self, at: Position) -> dict[str, float]:
        return {"lr": self.cur}

    def end_epoch(self, at: Position, finished_epoch: bool) -> dict[str, float]:
        """Validation every ``eval_every`` epochs and at the end of the run (also a ``max_steps`` end)."""
        cfg, epoch = self.cfg, at.epoch - 1 if finished_epoch else at.epoch
        self.run.log(f"{self.tag}/train_loss", self.total / max(self.seen, 1), epoch)
        self.run.log(f"{self.tag}/lr", self.cur, epoch)
        last = at.epoch >= cfg.epochs or bool(cfg.max_steps and at.global_step >= cfg.max_steps)
        if not (last or (finished_epoch and at.epoch % cfg.eval_every == 0)):
            return {}
        self.metrics = evaluate(self.model, self.val_loader, self.device, self.autocast)
        self.best = max(self.best, self.metrics["top1"])
        self.run.log(f"{self.tag}/val_top1", self.metrics["top1"], epoch)
        self.run.log(f"{self.tag}/val_top5", self.metrics["top5"], epoch)
        return {"val_top1": self.metrics["top1"]}


def _finetune(cfg: FinetuneConfig, loaded: LoadedBackbone | None, protocol: str, env, device: torch.device,
              run_dir: RunDirectory) -> dict:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    from opera.data import EvalTransform, build_dataset
    from opera.data.labels import labelled_subset

    rank, world, main = env.rank, env.world_size, env.rank == 0
    run = EvalRun(protocol, cfg, main=main)
    seed_everything(cfg.seed)
    loaded = loaded or load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, cfg.data, cfg.seed)
    size = loaded.img_size
    train = build_dataset(cfg.data, "train", FinetuneTrainTransform(size, cfg.crop_min, cfg.flip, cfg.randaug_ops,
                                                                     cfg.randaug_magnitude, cfg.reprob))
    train = labelled_subset(train, cfg.labels, cfg.data, cfg.seed, cfg.checkpoint)  # --labels 10%: SimCLR's protocol
    val = build_dataset(cfg.data, "val", EvalTransform(size))
    k = train.num_classes
    model = build_classifier(loaded, k, cfg.drop_path).to(device)
    use_mixup = cfg.mixup > 0 or cfg.cutmix > 0
    batch = min(cfg.batch_size, len(train) - len(train) % (2 * world)) if use_mixup else cfg.batch_size
    check_global_batch(batch, world)
    if use_mixup and (batch // world) % 2:
        raise OperaError(f"Mixup/CutMix mix each process's share of the batch with its reverse: --batch-size {batch} over "
                         f"{world} processes leaves an odd {batch // world}; use a multiple of {2 * world}")
    sampler = GlobalBatchSampler(len(train), batch, cfg.seed, rank, world, drop_last=len(train) >= 2 * batch or use_mixup)
    loader = Loader(train, batch_sampler=sampler, num_workers=cfg.workers,  # a worker's error is its own line
                    pin_memory=device.type == "cuda")
    val_loader = make_loader(shard_of(val, rank, world), max(batch // world, 256), workers=cfg.workers, device=device)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                  label_smoothing=cfg.label_smoothing, num_classes=k) if use_mixup else None
    # timm's SoftTargetCrossEntropy (Mixup's soft targets) or label-smoothed cross-entropy: a mean
    # over this rank's share, turned into its sum below
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    lr = cfg.base_lr * cfg.batch_size / cfg.lr_batch_base
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    steps_per_epoch = max(1, len(sampler))
    want = eval_identity(protocol, cfg, loaded, train)
    net: nn.Module = model
    if world > 1:
        if cfg.sync_bn:
            model = distributed.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    p = FinetuneProtocol(cfg, model, net, opt, sampler, loader, val_loader, mixup, criterion, lr, device, world, want, run, protocol)
    loop = TrainingLoop(run_dir, p, Cadence(cfg.epochs, steps_per_epoch, cfg.max_steps, cfg.save_every_steps, 0, cfg.log_every),
                        seed=cfg.seed, rank=rank, world=world, tensorboard=False)
    loop.resume()
    loop.run_to_end()
    epoch, step, best, metrics = loop.at.epoch, loop.at.global_step, p.best, p.metrics
    metrics = dict(metrics)
    metrics.update({"best_top1": best, "epochs_run": epoch, "steps": step, "lr": lr})
    scaling = {"rule": f"lr = base_lr * global_batch / {cfg.lr_batch_base}", "base_lr": cfg.base_lr,
               "global_batch": cfg.batch_size, "world_size": world, "per_rank_batch": batch // world, "lr": lr}
    return run.finish(metrics, loaded, extra={"lr_scaling": scaling},
                      data={"train": cfg.data, "val": cfg.data, "num_classes": k, "train_images": len(train),
                            "val_images": len(val)})
