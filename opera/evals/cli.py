"""Typer commands of the evaluation protocols, as plain functions for ``opera.cli`` to mount:

    run_app.command("linear")(linear)       # opera run linear
    run_app.command("finetune")(finetune)   # opera run finetune
    run_app.command("knn")(knn)             # opera run knn
    run_app.command("transfer")(transfer)   # opera run transfer
    run_app.command("diagnose")(diagnose)   # opera run diagnose
    app.command("export")(export)           # opera export
    app.command("convert")(convert)         # opera convert

Every command writes ``OUTPUT/results.json`` (metrics, checkpoint sha256, full config, data
specs, seed, wall time), TensorBoard scalars under ``OUTPUT/tb`` and prints a table, except
``convert``, which writes OUT only and prints one line. Bad inputs
raise :class:`~opera.errors.OperaError` (one line, exit 2 in ``opera.cli.main``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from opera.evals.options import DiagnoseConfig, KNNConfig, LinearConfig, TransferConfig
from opera.launch.options import LaunchOptions, dispatch, with_launch_options

CHECKPOINT_HELP = ("An opera run directory, its backbone.safetensors or last.pt; or random:<backbone> "
                   "(randomly initialised baseline, e.g. random:resnet50) or timm:<name> (a timm architecture, never downloaded).")
BACKBONE_HELP = "Expected backbone name; a checkpoint of another backbone is an error (and it must match random:/timm:)."
DATA_HELP = "Data spec: digits, digits:0-4, an ImageNet-style folder (PATH[@0-99]), or cifar10|cifar100|stl10|flowers102|pets=ROOT."
IMG_HELP = "Image size. Default: a ViT's own size, else the run's config.yaml, else 32 for digits and 224 otherwise."
DEVICE_HELP = "auto | cpu | cuda | cuda:N. Default: auto."
SEED_HELP = "Random seed. Default: 0."
WORKERS_HELP = "DataLoader workers. Default: 0."
SET_HELP = "Set any field of the protocol's config, repeatable: --set key=value (the options above are the common ones; 'opera run <cmd> --set x=1' lists the valid keys if x is not one)."


def _set_option():
    return typer.Option([], "--set", help=SET_HELP)


def _default(cls: type, name: str) -> str:
    """``Default: V`` of a config field, for a help text (the dataclass owns the value)."""
    value = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    return f"Default: {value}."


def _given(**values: Any) -> dict[str, Any]:
    """The options given on the command line (None: not given, the config's default holds)."""
    return {k: v for k, v in values.items() if v is not None}


def _with_sets(cfg: Any, sets: list[str], command: str) -> Any:
    """``--set key=value`` on the protocol's config (the mechanism of every config,
    :func:`opera.configs.apply_overrides`), then validated."""
    from opera.configs import apply_overrides

    return apply_overrides(cfg, list(sets or []), command=f"run {command}")


def _default_output(kind: str, checkpoint: str) -> Path:
    p = Path(checkpoint)
    if ":" not in checkpoint and p.exists():
        run_dir = p if p.is_dir() else p.parent
        return run_dir / "evals" / kind
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in checkpoint).strip("-")
    return Path("evals") / f"{kind}_{safe}"


def _launch(fn: Callable[..., Any], cfg: Any, launch: LaunchOptions) -> None:
    """Run ``fn(cfg)`` where the launch options say, as pretraining does (``opera.launch.options``):
    here, in ``--nproc`` processes, or as a requeueable SLURM job (paths made absolute for it)."""
    if launch.slurm:
        absolute = {"output": os.path.abspath(cfg.output)}
        if ":" not in cfg.checkpoint and Path(cfg.checkpoint).exists():
            absolute["checkpoint"] = os.path.abspath(cfg.checkpoint)
        cfg = dataclasses.replace(cfg, **absolute)
    dispatch(fn, (cfg,), launch, Path(cfg.output))


@with_launch_options
def linear(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " " + _default(LinearConfig, "data")),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for results.json and tb/. Default: RUN/evals/linear."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=BACKBONE_HELP),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs of the linear classifier (C.1). " + _default(LinearConfig, "epochs")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (C.1). " + _default(LinearConfig, "batch_size")),
    base_lr: Optional[float] = typer.Option(None, "--base-lr", help="lr = base_lr * batch / 256. Default 0.1 for CNNs, 3.0 for ViTs (C.1)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="SGD weight decay (C.1). " + _default(LinearConfig, "weight_decay")),
    bn: Optional[bool] = typer.Option(None, "--bn/--no-bn", help="BatchNorm1d(affine=False) on the features before the linear layer (MAE-style). Default off, as in C.1 / MoCo-v3."),
    augment: Optional[bool] = typer.Option(None, "--augment/--no-augment", help="Fresh RandomResizedCrop+flip views each epoch through the frozen backbone (ImageNet protocol), or features cached once without augmentation. Default: cached for digits, augmented otherwise."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help=IMG_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    grid: Optional[bool] = typer.Option(None, "--grid", help="Train a grid of heads in one pass (every --grid-lrs x base lr, without and with BN) and pick one on a held-out split of the training set, never on validation; results.json lists every head and the winner."),
    grid_lrs: Optional[str] = typer.Option(None, "--grid-lrs", help="Comma-separated multipliers of the base lr for --grid. Default: 0.1,0.3,1,3,10."),
    holdout_fraction: Optional[float] = typer.Option(None, "--holdout-fraction", help="With --grid: share of the training images held out to choose the head. " + _default(LinearConfig, "holdout_fraction")),
    sets: list[str] = _set_option(),
    launch: LaunchOptions = None,  # --nproc, --slurm, --nodes, ... (opera.launch.options)
) -> None:
    """Linear probe on the frozen backbone (SGD, cosine; top-1/top-5); fails if the backbone changed."""
    from opera.evals.linear import run_linear

    cfg = LinearConfig(**_given(checkpoint=checkpoint, data=data, output=str(output or _default_output("linear", checkpoint)),
                                backbone=backbone, img_size=img_size, device=device, seed=seed, workers=workers,
                                epochs=epochs, batch_size=batch_size, base_lr=base_lr, weight_decay=weight_decay, bn=bn,
                                augment=augment, grid=grid, holdout_fraction=holdout_fraction,
                                grid_lr_scales=_floats("--grid-lrs", grid_lrs) if grid_lrs else None))
    _launch(run_linear, _with_sets(cfg, sets, "linear"), launch)


def _floats(flag: str, text: str) -> tuple[float, ...]:
    from opera.errors import OperaError

    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise OperaError(f"{flag} {text!r} is not a comma-separated list of numbers, e.g. 0.1,0.3,1,3,10") from None


@with_launch_options
def knn(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " The train split is the bank, val the queries. " + _default(KNNConfig, "data")),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for results.json and tb/. Default: RUN/evals/knn."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=BACKBONE_HELP),
    k: Optional[int] = typer.Option(None, "--k", help="Neighbours. " + _default(KNNConfig, "k")),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Vote weight exp(cos / T). " + _default(KNNConfig, "temperature")),
    query_chunk: Optional[int] = typer.Option(None, "--query-chunk", help="Queries per similarity block (bounds memory). " + _default(KNNConfig, "query_chunk")),
    bank_chunk: Optional[int] = typer.Option(None, "--bank-chunk", help="Bank features per similarity block (bounds memory). " + _default(KNNConfig, "bank_chunk")),
    half_bank: Optional[bool] = typer.Option(None, "--half-bank", help="Keep the training bank in float16 (ImageNet-sized banks)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help=IMG_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    sets: list[str] = _set_option(),
    launch: LaunchOptions = None,  # --nproc, --slurm, --nodes, ... (opera.launch.options)
) -> None:
    """Weighted k-NN (k=20, T=0.07) on L2-normalised frozen features, computed in bounded chunks
    (with several processes the training bank is sharded across them)."""
    from opera.evals.knn import run_knn

    cfg = KNNConfig(**_given(checkpoint=checkpoint, data=data, output=str(output or _default_output("knn", checkpoint)),
                             backbone=backbone, img_size=img_size, device=device, seed=seed, workers=workers, k=k,
                             temperature=temperature, query_chunk=query_chunk, bank_chunk=bank_chunk, half_bank=half_bank))
    _launch(run_knn, _with_sets(cfg, sets, "knn"), launch)


@with_launch_options
def finetune(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " Default: digits."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for results.json and tb/. Default: RUN/evals/finetune."),
    recipe: str = typer.Option("auto", "--recipe", help="finetune_100ep | finetune_150ep | finetune_200ep | finetune_300ep (Table 2), transfer, digits, or a YAML path. auto: digits for digits data, else finetune_100ep. Options below override it."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=BACKBONE_HELP),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (recipe: 100/150/200/300)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Batch size (C.1: 1024)."),
    base_lr: Optional[float] = typer.Option(None, "--base-lr", help="AdamW lr per --lr-batch-base images (C.1: 5e-4)."),
    lr_batch_base: Optional[int] = typer.Option(None, "--lr-batch-base", help="lr = base_lr * batch / this (DeiT: 512)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="AdamW weight decay (C.1: 0.05)."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear warmup epochs before the cosine decay."),
    layer_decay: Optional[float] = typer.Option(None, "--layer-decay", help="Layer-wise lr decay (e.g. 0.75 for ViTs; timm param_groups_layer_decay). Default off."),
    drop_path: Optional[float] = typer.Option(None, "--drop-path", help="Stochastic depth rate."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="Label smoothing."),
    mixup: Optional[float] = typer.Option(None, "--mixup", help="Mixup alpha (0: off)."),
    cutmix: Optional[float] = typer.Option(None, "--cutmix", help="CutMix alpha (0: off)."),
    randaug_magnitude: Optional[int] = typer.Option(None, "--randaug-magnitude", help="RandAugment magnitude (0: off; DeiT 9)."),
    reprob: Optional[float] = typer.Option(None, "--reprob", help="Random erasing probability."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help=IMG_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto (bf16 on CUDA) | bf16 | off. Default: auto."),
    crop_min: Optional[float] = typer.Option(None, "--crop-min", help="RandomResizedCrop minimum scale (1: no crop)."),
    save_every_steps: Optional[int] = typer.Option(None, "--save-every-steps", help="Also write last.pt every this many steps within an epoch (default: at epoch ends)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Semi-supervised protocol: fine-tune on these labelled images only (10%, 13/class, FILE, or run: the pretraining run's labelled.txt, also used when it holds the same spec); top-1 on the full val split."),
    sets: list[str] = _set_option(),
    launch: LaunchOptions = None,  # --nproc, --slurm, --nodes, ... (opera.launch.options)
) -> None:
    """End-to-end fine-tuning (AdamW, cosine + warmup, Mixup/CutMix, RandAugment, label smoothing, drop path)."""
    from opera.evals.finetune import finetune_config, run_finetune

    cfg = finetune_config(recipe, checkpoint=checkpoint, data=data, output=str(output or _default_output("finetune", checkpoint)),
                          backbone=backbone, img_size=img_size, device=device, seed=seed, workers=workers, amp=amp,
                          epochs=epochs, batch_size=batch_size, base_lr=base_lr, lr_batch_base=lr_batch_base,
                          weight_decay=weight_decay, warmup_epochs=warmup_epochs, layer_decay=layer_decay,
                          drop_path=drop_path, label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix,
                          randaug_magnitude=randaug_magnitude, reprob=reprob, crop_min=crop_min,
                          save_every_steps=save_every_steps, labels=labels)
    _launch(run_finetune, _with_sets(cfg, sets, "finetune"), launch)


def _single_process(command: str, launch: LaunchOptions) -> None:
    from opera.errors import OperaError

    if launch is not None and launch.world_size > 1:
        raise OperaError(f"opera run {command} runs in one process (its suites are not rank-aware yet); drop --nproc, "
                         "or submit it with --slurm and one task (--gpus-per-node 1)")


@with_launch_options
def transfer(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    suite: Optional[str] = typer.Option(None, "--suite", help=_default(TransferConfig, "suite") + " classification: CIFAR-10/100, Flowers-102, Pets from --root (fine-tuning, 100 epochs; Table 3). digits: linear, k-NN and fine-tuning on digits classes held out from pretraining. segmentation: UperNet/FCN mIoU on ADE20K (--root) or the digit scenes (Table 4). detection: Mask R-CNN R50-FPN box/mask AP on COCO (--root) or the digit scenes (Table 5)."),
    root: Optional[str] = typer.Option(None, "--root", help="classification: folder holding cifar-10-batches-py/, cifar-100-python/, flowers-102/, oxford-iiit-pet/. segmentation: folder holding ADEChallengeData2016/. detection: COCO folder with annotations/instances_{train,val}2017.json, train2017/, val2017/. Never downloaded."),
    datasets: Optional[str] = typer.Option(None, "--datasets", help="classification: comma-separated subset of cifar10,cifar100,flowers102,pets."),
    target: Optional[str] = typer.Option(None, "--target", help="digits: held-out data spec. Default: the digits classes absent from the run's pretraining data, else digits:5-9. segmentation/detection without --root: digit_scenes:5-9 (default: those held-out classes, else all ten)."),
    protocols: Optional[str] = typer.Option(None, "--protocols", help="digits: comma-separated protocols. " + _default(TransferConfig, "protocols")),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for results.json (and one subfolder per dataset/protocol)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Fine-tuning recipe (default auto); auto: transfer (classification) or digits. Dense suites: ade20k_upernet_160k, ade20k_fcn_160k, coco_maskrcnn_r50_fpn_1x, digits_segmentation, digits_segmentation_probe (frozen backbone, linear head), digits_detection, digits_detection_probe (frozen backbone, Faster R-CNN) or a YAML path (auto: the paper's for --root, digits_* for the scenes)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Override the recipe's fine-tuning epochs."),
    iters: Optional[int] = typer.Option(None, "--iters", help="segmentation/detection: override the recipe's iterations."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Override the recipe's fine-tuning batch size."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=BACKBONE_HELP),
    img_size: Optional[int] = typer.Option(None, "--img-size", help=IMG_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help=SEED_HELP),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", help=WORKERS_HELP),
    sets: list[str] = _set_option(),
    launch: LaunchOptions = None,  # --slurm, ... (one process: opera.launch.options)
) -> None:
    """Transfer to other classification datasets (Table 3), to held-out digits classes, or to dense tasks (Tables 4-5)."""
    from opera.evals.transfer import run_transfer

    cfg = TransferConfig(**_given(checkpoint=checkpoint, suite=suite, root=root, datasets=datasets, target=target,
                                  protocols=protocols, recipe=recipe, epochs=epochs, iters=iters, batch_size=batch_size,
                                  backbone=backbone, img_size=img_size, seed=seed, device=device, workers=workers))
    cfg.output = str(output or _default_output(f"transfer_{cfg.suite}", checkpoint))
    _single_process("transfer", launch)
    _launch(run_transfer, _with_sets(cfg, sets, "transfer"), launch)


@with_launch_options
def diagnose(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP + " A run directory with last.pt adds the proxy spaces."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " Default: the run's pretraining data."),
    split: Optional[str] = typer.Option(None, "--split", help="train | val. " + _default(DiagnoseConfig, "split")),
    num_images: Optional[int] = typer.Option(None, "--num-images", help="Images sampled (two augmented views each). " + _default(DiagnoseConfig, "num_images")),
    crop_min: Optional[float] = typer.Option(None, "--crop-min", help="RandomResizedCrop minimum scale of the views. Default: the run's."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for results.json and similarity_hist.png."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=BACKBONE_HELP),
    img_size: Optional[int] = typer.Option(None, "--img-size", help=IMG_HELP),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (image sample and views). Default: 0."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    plot: Optional[str] = typer.Option(None, "--plot", help="umap | tsne: draw every space's representation in 2-D, coloured by class (held-out classes as crosses), beside its similarity histogram: OUTPUT/embedding_<space>.png. umap needs umap-learn (pip install umap-learn), else scikit-learn's t-SNE draws it. Default: no plot."),
    sets: list[str] = _set_option(),
    launch: LaunchOptions = None,  # --slurm, ... (one process: opera.launch.options)
) -> None:
    """Corollary 1: mean cosine similarity of views / same-class / different-class pairs in every space (Eq. 11 ordering), RankMe / alpha-ReQ / std of every space, and with --plot its 2-D embedding."""
    from opera.evals.diagnose import run_diagnose

    cfg = DiagnoseConfig(**_given(checkpoint=checkpoint, data=data, split=split, num_images=num_images, crop_min=crop_min,
                                  output=str(output or _default_output("diagnose", checkpoint)), backbone=backbone,
                                  img_size=img_size, seed=seed, device=device, plot=plot))
    _single_process("diagnose", launch)
    _launch(run_diagnose, _with_sets(cfg, sets, "diagnose"), launch)


def export(
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help=CHECKPOINT_HELP),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="timm (any backbone, safetensors) | torchvision | detectron2 | mmdet (ResNets) | mocov3 (MoCo-v3's main_lincls.py --pretrained) | hf (a folder for timm's local-dir:). Default: timm."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder for backbone_<format>.<ext> (backbone_hf/) and results.json. Default: RUN/export."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help=BACKBONE_HELP),
) -> None:
    """Export the backbone for timm, torchvision, detectron2, mmdet, MoCo-v3 or a timm local-dir folder."""
    from opera.evals.export import ExportConfig, run_export

    out = output
    if out is None:
        p = Path(checkpoint)
        out = (p if p.is_dir() else p.parent) / "export" if ":" not in checkpoint and p.exists() else Path("export")
    run_export(ExportConfig(**_given(checkpoint=checkpoint, format=format, output=str(out), backbone=backbone, tensorboard=False)))


def convert(
    source: str = typer.Argument(..., metavar="IN", help="Weights to read: an opera run or file, a MoCo-v3/OPERA main_moco.py, main_lincls.py or convert_to_deit.py file, a timm/torchvision state dict, a config.json + model.safetensors folder."),
    out: Path = typer.Argument(..., metavar="OUT", help="The file to write (a new folder for --format hf)."),
    format: str = typer.Option(..., "--format", "-f", help="opera (backbone.safetensors) | timm (.safetensors or .pth) | torchvision | detectron2 | mmdet | mocov3 | hf."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="The opera backbone to build, for files that name none (a bare state dict)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="Build a ViT for this size (position embeddings resampled); an hf config's input size."),
) -> None:
    """Convert weights between formats without training; one line says what was read and written."""
    from opera.evals.export import run_convert

    run_convert(source, out, format, backbone, img_size)


COMMANDS = {"linear": linear, "finetune": finetune, "knn": knn, "transfer": transfer, "diagnose": diagnose}
"""``opera run <name>`` commands; ``export`` and ``convert`` are top level (``opera export``, ``opera convert``)."""
