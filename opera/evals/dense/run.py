"""Dense transfer (paper §4.3, Appendix C.2-C.3): fine-tune a pretrained backbone for semantic
segmentation or detection + instance segmentation and score it.

* ``task="segmentation"``: :class:`~opera.evals.dense.models.Segmenter` (UperNet, or FCN on a
  dilated backbone) trained with pixel cross-entropy (+ 0.4 x an auxiliary FCN head), scored by
  mIoU / mAcc / aAcc from an exact confusion matrix.
* ``task="detection"``: torchvision's Mask R-CNN (or Faster R-CNN, ``masks: false``) with an FPN,
  scored by pycocotools' box and mask AP.

Recipes (``opera/evals/dense/recipes``) hold every option; options given explicitly win:

=============================  ======================================================================
``ade20k_upernet_160k``        Table 4 / §4.4 ablations (DeiTs): UperNet + FCN aux (0.4), SGD lr 0.01,
                               momentum 0.9, wd 5e-4, poly (0.9) to 1e-4, 160k iters, batch 16,
                               512x512 crops of (2048, 512) x [0.5, 2] resizes, flip (mmseg).
``ade20k_fcn_160k``            Table 4 (R50): FCN on the dilated R50-D8 (``output_stride: 8``), rest as above.
``coco_maskrcnn_r50_fpn_1x``   Table 5: Mask R-CNN R50-FPN, SGD lr 0.02, momentum 0.9, wd 1e-4,
                               batch 16, 90k iters (12 epochs), x0.1 at 60k and 80k, 500 warmup
                               iters, (1333, 800) resize, flip (mmdet's 1x).
``digits_segmentation``        digit scenes on a CPU in about a minute.
``digits_segmentation_probe``  frozen backbone + linear head on 32 px one-digit scenes, seconds.
``digits_detection``           digit scenes with a narrow Mask R-CNN on a CPU in a few minutes.
``digits_detection_probe``     frozen backbone + Faster R-CNN on 32 px one-digit scenes, ~10 s.
=============================  ======================================================================

Training runs in the one training loop (:mod:`opera.engine.loop`), which holds ``OUTPUT``'s lock
and keeps ``OUTPUT/last.pt`` (model, optimizer, iteration, the augmentations' generator; written
atomically every ``save_every`` iterations and when SIGINT/SIGTERM stops the run, read back with
``weights_only=True``); rerunning the same command resumes from it, and a checkpoint of other
options or another backbone is refused in one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from opera import distributed
from opera.configs import load_recipe, validate
from opera.engine.loop import Cadence, Position, RunDirectory, TrainingLoop, run_directory
from opera.errors import OperaError
from opera.evals.common import (
    EvalConfig,
    EvalRun,
    LoadedBackbone,
    check_output,
    choose,
    eval_identity,
    load_eval_backbone,
    seed_everything,
)
from opera.fields import option

RECIPES = Path(__file__).parent / "recipes"
TASKS = ("segmentation", "detection")


@dataclass
class DenseConfig(EvalConfig):
    task: str = option("segmentation", help="segmentation | detection", choices=TASKS)
    data: str = option("digit_scenes", help="digit_scenes[:classes] | coco=ROOT | ade20k=ROOT")
    recipe: str | None = option(None, help="a recipe name (opera/evals/dense/recipes) or a YAML path")
    iters: int = option(160000, help="training iterations", min=1)
    batch_size: int = option(16, help="training batch", min=1)
    optimizer: str = option("sgd", help="sgd | adamw", choices=("sgd", "adamw"))
    lr: float = option(0.01, help="base learning rate", min=0, min_exclusive=True)
    momentum: float = option(0.9, help="SGD momentum", min=0, max=1)
    weight_decay: float = option(5e-4, help="weight decay", min=0)
    schedule: str = option("poly", help="poly | step | cosine", choices=("poly", "step", "cosine"))
    poly_power: float = option(0.9, help="poly: lr factor (1 - it/iters)^poly_power", min=0)
    min_lr: float = option(1e-4, help="poly: the lr it decays to", min=0)
    lr_steps: tuple[float, ...] = option((2 / 3, 8 / 9), help="step: fractions of iters where lr *= lr_gamma",
                                         min=0, max=1, example="[0.667,0.889]")
    lr_gamma: float = option(0.1, help="step: lr factor at each of lr_steps", min=0, min_exclusive=True)
    warmup_iters: int = option(0, help="linear warmup iterations", min=0)
    warmup_factor: float = option(0.001, help="lr factor the warmup starts from", min=0, max=1)
    freeze_backbone: bool = option(False, help="a frozen-backbone probe instead of fine-tuning (not the paper's protocol)")
    clip_grad: float | None = option(None, help="gradient norm clipping (None or 0: off)", min=0)
    save_every: int = option(0, help="iterations between last.pt writes (0: at the end only)", min=0)
    eval_batch_size: int = option(8, help="batch of the validation passes", min=1)
    # segmentation
    head: str = option("upernet", help="upernet | fcn | linear", choices=("upernet", "fcn", "linear"))
    channels: int = option(512, help="segmentation head channels", min=1)
    aux_channels: int = option(256, help="channels of the auxiliary FCN head (0: no auxiliary head)", min=0)
    aux_weight: float = option(0.4, help="loss weight of the auxiliary FCN head", min=0)
    output_stride: int | None = option(None, help="8: dilated CNN (R50-D8 of FCN); None: the backbone's own",
                                       choices=(8, 16, 32))
    crop_size: int | None = option(512, help="training crop side (None: no crop)", min=1)
    scale: tuple[int, int] | None = option((2048, 512), help="resize scale (long, short side) before the ratio range "
                                           "(None: none)", min=1, example="[2048,512]")
    ratio_range: tuple[float, float] = option((0.5, 2.0), help="random resize ratios of scale", min=0, min_exclusive=True,
                                              example="[0.5,2.0]")
    flip: bool = option(True, help="random horizontal flip")
    # detection
    masks: bool = option(True, help="Mask R-CNN (box + mask AP) or Faster R-CNN (box AP)")
    fpn_channels: int = option(256, help="FPN channels", min=1)
    anchor_sizes: tuple[int, ...] = option((32, 64, 128, 256, 512), help="RPN anchor sizes, one per FPN level", min=1,
                                           example="[32,64,128,256,512]")
    min_size: int = option(800, help="resize: shorter side", min=1)
    max_size: int = option(1333, help="resize: longer side at most", min=1)
    box_representation: int = option(1024, help="box head representation size", min=1)
    mask_channels: int = option(256, help="mask head channels", min=1)
    mask_convs: int = option(4, help="mask head convolutions", min=1)
    rpn_batch: int = option(256, help="RPN anchors sampled per image", min=1)
    roi_batch: int = option(512, help="RoIs sampled per image", min=1)
    rpn_pre_nms: tuple[int, int] = option((2000, 1000), help="RPN proposals before NMS (train, test)", min=1,
                                          example="[2000,1000]")
    rpn_post_nms: tuple[int, int] = option((2000, 1000), help="RPN proposals after NMS (train, test)", min=1,
                                           example="[2000,1000]")
    norm_eval: bool = option(True, help="backbone BatchNorm statistics frozen (mmdet's R50 norm_eval)")
    frozen_stages: int = option(1, help="CNN stages frozen: 0 none, 1 the stem + layer1 (mmdet's R50)", min=0, max=4)
    vit_channels: int = option(256, help="ViTs: channels of the simple feature pyramid", min=1)
    # digit scenes
    scene_canvas: int = option(64, help="digit scenes: canvas side in pixels", min=1)
    scene_digits: tuple[int, int] = option((2, 4), help="digit scenes: (min, max) digits per scene", min=1,
                                           example="[2,4]")
    scene_scale: tuple[int, int] = option((16, 32), help="digit scenes: (min, max) side of a digit in pixels", min=4,
                                          example="[16,32]")
    scene_train: int = option(600, help="digit scenes: training scenes", min=1)
    scene_val: int = option(200, help="digit scenes: validation scenes", min=1)
    scene_seed: int = option(0, help="digit scenes: seed of the generated scenes")
    scene_texture: float = option(1.0, help="background contrast of the scenes (0: black, as the digits)", min=0)


# ----------------------------------------------------------------------------- recipes
def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def default_recipe(task: str, data: str) -> str:
    from opera.evals.dense.data import parse_dense_spec

    kind = parse_dense_spec(data).kind
    if kind == "digit_scenes":
        return f"digits_{task}"
    return "ade20k_upernet_160k" if task == "segmentation" else "coco_maskrcnn_r50_fpn_1x"


def dense_config(task: str, recipe: str | None = "auto", **options: Any) -> DenseConfig:
    """Defaults < recipe (``auto``: :func:`default_recipe`) < ``options`` that are not None,
    validated (:func:`opera.configs.load_recipe`, the one recipe reader of every protocol)."""
    choose("--suite", task, TASKS)
    name = default_recipe(task, options.get("data") or DenseConfig.data) if recipe in (None, "auto") else recipe
    return load_recipe(name, DenseConfig, RECIPES, values={**options, "task": task, "recipe": name}, what="dense recipe")


def _validate(cfg: DenseConfig) -> None:
    """Every field's type, range and choices (:func:`opera.configs.validate`), then what the
    fields' metadata cannot state: segmentation's BatchNorm heads need two images a batch."""
    validate(cfg)
    if cfg.batch_size < 2 and cfg.task == "segmentation":
        raise OperaError("segmentation trains BatchNorm heads and needs batch_size >= 2")


def scene_config(cfg: DenseConfig):
    from opera.data.digit_scenes import SceneConfig

    return SceneConfig(canvas=cfg.scene_canvas, min_digits=cfg.scene_digits[0], max_digits=cfg.scene_digits[1],
                       scale=tuple(cfg.scene_scale), train_scenes=cfg.scene_train, val_scenes=cfg.scene_val, seed=cfg.scene_seed,
                       texture=cfg.scene_texture)


# ----------------------------------------------------------------------------- schedule and optimizer
def lr_factor(cfg: DenseConfig, it: int) -> float:
    """The lr of iteration ``it`` over the base lr: linear warmup from ``warmup_factor``, then
    poly (mmseg: ``(1 - it/iters)^power`` down to ``min_lr``), step (mmdet/Detectron) or cosine."""
    if cfg.schedule == "poly":
        f = (1 - it / cfg.iters) ** cfg.poly_power
        f = f * (1 - cfg.min_lr / cfg.lr) + cfg.min_lr / cfg.lr
    elif cfg.schedule == "step":
        f = cfg.lr_gamma ** sum(it >= round(s * cfg.iters) for s in cfg.lr_steps)
    else:
        f = 0.5 * (1 + math.cos(math.pi * it / cfg.iters))
    if it < cfg.warmup_iters:
        f *= cfg.warmup_factor + (1 - cfg.warmup_factor) * it / cfg.warmup_iters
    return f


def build_optimizer(cfg: DenseConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def freeze_stages(body: nn.Module, stages: int) -> None:
    """mmdet's ``frozen_stages`` for timm ResNets: 1 freezes the stem and layer1."""
    if stages <= 0 or not hasattr(body, "layer1"):
        return
    mods = [body.conv1, body.bn1] + [getattr(body, f"layer{i}") for i in range(1, stages + 1)]
    for m in mods:
        for p in m.parameters():
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, body: nn.Module, norm_eval: bool) -> None:
    model.train()
    if norm_eval:
        for m in body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ----------------------------------------------------------------------------- models
def build_model(cfg: DenseConfig, loaded: LoadedBackbone, num_classes: int) -> nn.Module:
    """The segmenter or detector with the pretrained backbone at ``model.backbone.body``."""
    from opera.evals.dense.models import DenseBackbone, Segmenter, build_detector, load_body, prepare_vit

    body = load_body(loaded.spec or {}, loaded.model.state_dict(), loaded.source, output_stride=cfg.output_stride)
    size = cfg.scene_canvas if cfg.data.startswith("digit_scenes") else (cfg.crop_size or cfg.min_size)
    prepare_vit(body, size)
    if cfg.task == "segmentation":
        model: nn.Module = Segmenter(DenseBackbone(body, cfg.vit_channels), num_classes, cfg.head, cfg.channels, cfg.aux_channels)
    else:
        from opera.data import IMAGENET_MEAN, IMAGENET_STD

        model = build_detector(body, num_classes, masks=cfg.masks, fpn_channels=cfg.fpn_channels, vit_channels=cfg.vit_channels,
                               anchor_sizes=tuple(cfg.anchor_sizes), min_size=cfg.min_size, max_size=cfg.max_size,
                               box_representation=cfg.box_representation, mask_channels=cfg.mask_channels,
                               mask_convs=cfg.mask_convs, rpn_batch=cfg.rpn_batch, roi_batch=cfg.roi_batch,
                               rpn_pre_nms=tuple(cfg.rpn_pre_nms), rpn_post_nms=tuple(cfg.rpn_post_nms),
                               image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        freeze_stages(body, cfg.frozen_stages)
    if cfg.freeze_backbone:
        for p in body.parameters():
            p.requires_grad_(False)
    return model


def _normalise(x: torch.Tensor) -> torch.Tensor:
    from opera.data import IMAGENET_MEAN, IMAGENET_STD

    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


# ----------------------------------------------------------------------------- training
def _batches(dataset, batch_size: int, gen: torch.Generator, start_it: int):
    """Seeded shuffled batches forever (epoch after epoch, drop_last), from iteration ``start_it``."""
    n = len(dataset)
    per_epoch = max(1, n // batch_size)
    it = start_it
    while True:
        epoch, k = divmod(it, per_epoch)
        g = torch.Generator().manual_seed(int(gen.initial_seed()) + epoch)
        perm = torch.randperm(n, generator=g)
        for j in range(k, per_epoch):
            yield it, [dataset[int(i)] for i in perm[j * batch_size:(j + 1) * batch_size]]
            it += 1


def _seg_loss(cfg: DenseConfig, model: nn.Module, batch, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    from opera.evals.dense.data import IGNORE, seg_train_augment

    imgs, labs = [], []
    for img, t in batch:
        img, sem = seg_train_augment(img, t["semantic"], gen, cfg.crop_size if cfg.scale else None, cfg.scale,
                                     tuple(cfg.ratio_range), cfg.flip)
        imgs.append(img)
        labs.append(sem)
    x, y = _normalise(torch.stack(imgs).to(device)), torch.stack(labs).to(device)
    logits, aux = model(x)
    losses = {"decode": F.cross_entropy(logits, y, ignore_index=IGNORE)}
    if aux is not None:
        losses["aux"] = cfg.aux_weight * F.cross_entropy(aux, y, ignore_index=IGNORE)
    return losses


def _det_loss(cfg: DenseConfig, model: nn.Module, batch, gen: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    from opera.evals.dense.data import hflip_detection

    imgs, targets = [], []
    for img, t in batch:
        if cfg.flip and bool(torch.rand(1, generator=gen) < 0.5):
            img, t = hflip_detection(img, t)
        imgs.append(img.to(device).float() / 255)
        tt = {"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)}
        if cfg.masks:
            tt["masks"] = t["masks"].to(device)
        targets.append(tt)
    return model(imgs, targets)


@dataclass
class DenseProtocol:
    """Dense transfer's :class:`~opera.engine.loop.TrainingProtocol`: ``cfg.iters`` iterations
    of one "epoch" (the batches run through the training images epoch after epoch)."""

    cfg: DenseConfig
    model: nn.Module
    dataset: Any
    device: torch.device
    want: dict[str, Any]
    run: EvalRun
    name: str = "dense transfer"
    skips_nonfinite: bool = False

    def __post_init__(self) -> None:
        self.opt = build_optimizer(self.cfg, self.model)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)  # the augmentations' draws
        self.loss_fn = _seg_loss if self.cfg.task == "segmentation" else _det_loss
        self.norm_eval = self.cfg.norm_eval and self.cfg.task == "detection" or self.cfg.freeze_backbone
        self.last: dict[str, float] = {}

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size

    def identity(self) -> dict[str, Any]:
        return self.want

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])

    def batches(self, at: Position) -> Iterator[Any]:
        return (batch for _, batch in _batches(self.dataset, self.cfg.batch_size, self.gen, at.global_step))

    def step(self, batch: Any, at: Position) -> dict[str, torch.Tensor]:
        cfg, it = self.cfg, at.global_step
        set_train_mode(self.model, self.model.backbone.body, self.norm_eval)
        for g in self.opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(cfg, it)
        losses = self.loss_fn(cfg, self.model, batch, self.gen, self.device)
        loss = sum(losses.values())
        values = {"loss": loss.detach(), **{f"loss/{k}": v.detach() for k, v in losses.items()}}
        if not torch.isfinite(loss):
            return values  # the loop ends the run in one line, naming each term
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.opt.step()
        self.last = {k: float(v) for k, v in values.items()}
        return values

    def log_row(self, at: Position) -> dict[str, float]:
        for k, v in self.last.items():
            self.run.log(f"{self.cfg.task}/{k}", v, at.global_step - 1)
        return {"lr": self.opt.param_groups[0]["lr"]}

    def end_epoch(self, at: Position, finished_epoch: bool) -> dict[str, float]:
        return {}


def _train_identity(dataset) -> dict[str, Any]:
    """The training images' :func:`~opera.data.labels.data_identity` where they are files; the
    generated digit scenes are a function of the scene options, which the identity holds."""
    from opera.data.labels import data_identity

    try:
        return data_identity(dataset)
    except (AttributeError, TypeError, NotImplementedError):
        return {"images": len(dataset), "unlabelled": 0}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_segmentation(cfg: DenseConfig, model: nn.Module, dataset, device: torch.device) -> dict[str, Any]:
    """mIoU / mAcc / aAcc over ``dataset`` at the labels' resolution (logits resized back)."""
    from opera.evals.dense.data import IGNORE, seg_eval_resize
    from opera.evals.dense.metrics import confusion_matrix, segmentation_scores

    model.eval()
    k = dataset.num_classes
    cm = torch.zeros(k, k, dtype=torch.int64)
    scale = cfg.scale if not cfg.data.startswith("digit_scenes") else None
    bs = cfg.eval_batch_size if scale is None else 1
    for i in range(0, len(dataset), bs):
        items = [dataset[j] for j in range(i, min(i + bs, len(dataset)))]
        x = _normalise(torch.stack([seg_eval_resize(img, scale) for img, _ in items]).to(device))
        logits, _ = model(x)
        for (_, t), lg in zip(items, logits):
            lab = t["semantic"]
            if lg.shape[-2:] != lab.shape:
                lg = F.interpolate(lg[None], size=lab.shape, mode="bilinear", align_corners=False)[0]
            cm += confusion_matrix(lg.argmax(0).cpu(), lab, k, IGNORE)
    return segmentation_scores(cm, list(dataset.class_names))


@torch.no_grad()
def evaluate_detection(cfg: DenseConfig, model: nn.Module, dataset, device: torch.device) -> dict[str, Any]:
    """pycocotools box (and mask) AP over ``dataset``."""
    from opera.evals.dense.metrics import coco_ap, coco_from_targets, detections_to_coco

    model.eval()
    coco = getattr(dataset, "coco", None)
    cats = getattr(dataset, "category_ids", None)
    results, targets, ids = [], [], []
    for i in range(0, len(dataset), cfg.eval_batch_size):
        items = [dataset[j] for j in range(i, min(i + cfg.eval_batch_size, len(dataset)))]
        outputs = model([img.to(device).float() / 255 for img, _ in items])
        for (_, t), o in zip(items, outputs):
            results += detections_to_coco(t["image_id"], o, cats)
            ids.append(t["image_id"])
            if coco is None:
                targets.append(t)
    if coco is None:
        coco = coco_from_targets(targets, list(dataset.class_names), with_masks=cfg.masks)
    return coco_ap(coco, results, ("bbox", "segm") if cfg.masks else ("bbox",), image_ids=ids)


# ----------------------------------------------------------------------------- the protocol
def run_dense(cfg: DenseConfig, loaded: LoadedBackbone | None = None, protocol: str | None = None,
              data: dict[str, Any] | None = None) -> dict:
    """Build, fine-tune and score; write ``OUTPUT/results.json``. Headline metrics: ``mIoU``
    (segmentation) or ``box_AP`` / ``mask_AP`` (detection), in %. ``data`` adds fields to its
    ``data`` record (the transfer suites': ``pretraining`` and ``held_out``)."""
    from opera.evals.dense.data import parse_dense_spec

    _validate(cfg)
    parse_dense_spec(cfg.data)
    check_output(cfg.output, create=False)
    with run_directory(cfg.output, main=True) as run_dir:
        return _dense(cfg, loaded, protocol, run_dir, data or {})


def _dense(cfg: DenseConfig, loaded: LoadedBackbone | None, protocol: str | None, run_dir: RunDirectory,
           extra_data: dict[str, Any]) -> dict:
    from opera.evals.dense.data import build_dense_dataset

    run = EvalRun(protocol or cfg.task, cfg)
    device = distributed.resolve_device(cfg.device)
    scenes = scene_config(cfg)
    train_ds = build_dense_dataset(cfg.data, "train", cfg.task, scenes)
    val_ds = build_dense_dataset(cfg.data, "val", cfg.task, scenes)
    if loaded is None:
        loaded = load_eval_backbone(cfg.checkpoint, cfg.backbone, cfg.img_size, None, cfg.seed)
    seed_everything(cfg.seed)
    model = build_model(cfg, loaded, train_ds.num_classes).to(device)
    pretrained = {k: v.detach().cpu().clone() for k, v in model.backbone.body.state_dict().items()}
    want = eval_identity(protocol or cfg.task, cfg, loaded)
    want["data"] = _train_identity(train_ds)
    p = DenseProtocol(cfg, model, train_ds, device, want, run)
    loop = TrainingLoop(run_dir, p, Cadence(1, cfg.iters, save_every_steps=cfg.save_every, log_every=cfg.log_every),
                        seed=cfg.seed, tensorboard=False)
    loop.resume()
    ran = not loop.done
    loop.run_to_end()
    losses = p.last if ran else {}
    if cfg.freeze_backbone:
        from opera.evals.common import check_frozen

        check_frozen(model.backbone.body, pretrained)
    if cfg.task == "segmentation":
        scores = evaluate_segmentation(cfg, model, val_ds, device)
        metrics: dict[str, Any] = {"mIoU": scores["mIoU"], "mAcc": scores["mAcc"], "aAcc": scores["aAcc"], "IoU": scores["IoU"]}
    else:
        ap = evaluate_detection(cfg, model, val_ds, device)
        metrics = {"box_AP": ap["bbox"]["AP"], **({"mask_AP": ap["segm"]["AP"]} if "segm" in ap else {}), "coco": ap}
    metrics["final_loss"] = losses.get("loss")
    data = {"spec": cfg.data, "train_images": len(train_ds), "val_images": len(val_ds), "classes": list(train_ds.class_names),
            **extra_data}
    return run.finish(metrics, loaded, data=data, title=f"{cfg.task} on {cfg.data}: {loaded.source}")
