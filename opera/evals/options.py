"""The options of the evaluation protocols that ``opera run linear|knn|transfer|diagnose`` show in
their help: plain dataclasses (:func:`opera.fields.option`), importable without torch, so that
``opera --help`` and every ``--help`` start without it. Each protocol's module re-exports its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from opera.fields import option

SUITES = ("classification", "digits", "segmentation", "detection")


# ----------------------------------------------------------------------------- common options
@dataclass
class EvalConfig:
    """Options shared by every protocol (each protocol's config extends it). Every field states its
    help and its range or choices once (:func:`opera.fields.option`); :func:`opera.configs.validate`
    checks them."""

    checkpoint: str = option("", help="run dir | backbone.safetensors | last.pt | random:<backbone> | timm:<name> | "
                             "a MoCo-v3/OPERA main_moco.py, main_lincls.py or convert_to_deit.py file | a timm/torchvision "
                             "state dict (.pth, .safetensors) | a config.json + model.safetensors folder")
    data: str = option("digits", help="data spec (opera.data.parse_data_spec)")
    output: str = option("", help="folder for results.json and tb/")
    backbone: str | None = option(None, help="expected backbone name; a checkpoint of another one is an error")
    img_size: int | None = option(None, help="None: a ViT's own size, else the run's config.yaml, else 32 (digits) / 224",
                                  min=1)
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    seed: int = option(0, help="random seed")
    workers: int = option(0, help="DataLoader workers", min=0)
    tensorboard: bool = option(True, help="TensorBoard scalars under OUTPUT/tb")
    loggers: str = option("tensorboard", help="comma-separated: tensorboard, wandb, mlflow (docs/trackers.md; "
                          "W&B offline unless $WANDB_MODE=online, MLflow at $MLFLOW_TRACKING_URI or file:OUTPUT/mlruns)")
    log_every: int = option(10, help="protocols that train: steps between a stdout line and a metrics.jsonl row "
                            "(0: epoch ends only)", min=0)


@dataclass
class LinearConfig(EvalConfig):
    epochs: int = option(90, help="training epochs of the linear classifier (C.1)", min=1)
    batch_size: int = option(1024, help="global batch over all processes (C.1)", min=1)
    base_lr: float | None = option(None, help="None: 0.1 for CNNs, 3.0 for ViTs; lr = base_lr * batch_size / 256",
                                   min=0, min_exclusive=True)
    momentum: float = option(0.9, help="SGD momentum", min=0, max=1)
    weight_decay: float = option(0.0, help="SGD weight decay", min=0)
    warmup_epochs: float = option(0.0, help="linear warmup epochs before the cosine decay", min=0)
    bn: bool = option(False, help="BatchNorm1d(affine=False) before the linear layer (MAE-style; C.1/MoCo-v3: none)")
    augment: bool | None = option(None, help="None: off for digits (cached features), on otherwise")
    crop_min: float = option(0.08, help="RandomResizedCrop scale of the augmented mode", min=0, max=1, min_exclusive=True)
    feature_batch_size: int = option(256, help="batch of the frozen forward passes", min=1)
    grid: bool = option(False, help="train the grid of heads below in the same pass, pick one on a held-out train split")
    grid_lr_scales: tuple[float, ...] = option((0.1, 0.3, 1.0, 3.0, 10.0), help="x the base lr (dinov2's linear eval: "
                                               "a grid of lrs)", min=0, min_exclusive=True, example="[0.1,1,10]")
    grid_bn: tuple[bool, ...] = option((False, True), help="each lr without and with BatchNorm1d(affine=False)")
    holdout_fraction: float = option(0.1, help="with grid: share of the training set held out to choose the head",
                                     min=0, max=1, min_exclusive=True, max_exclusive=True)


@dataclass
class KNNConfig(EvalConfig):
    k: int = option(20, help="neighbours", min=1)
    temperature: float = option(0.07, help="T of the vote weight exp(cos / T)", min=0, min_exclusive=True)
    batch_size: int = option(256, help="feature extraction batch", min=1)
    query_chunk: int = option(1024, help="test queries per similarity block", min=1)
    bank_chunk: int = option(65536, help="training features per similarity block", min=1)
    half_bank: bool = option(False, help="store the training bank in float16 (halves memory on ImageNet)")
    train_data: str | None = option(None, help="the bank's data spec; None: the train split of --data")


@dataclass
class TransferConfig(EvalConfig):
    suite: str = option("digits", help="classification | digits | segmentation | detection", choices=SUITES)
    data: str = option("", help="unused: the suite names the data (recorded per dataset)")
    root: str | None = option(None, help="classification: folder holding the torchvision datasets")
    datasets: str | None = option(None, help="classification: comma-separated subset of cifar10,cifar100,flowers102,pets")
    target: str | None = option(None, help="digits: held-out data spec; dense: the digit scenes spec")
    iters: int | None = option(None, help="dense: overrides the recipe's iterations", min=1)
    protocols: str = option("linear,knn,finetune", help="digits: which protocols")
    recipe: str = option("auto", help="fine-tuning recipe: auto = transfer (classification) / digits")
    epochs: int | None = option(None, help="overrides the recipe's fine-tuning epochs", min=1)
    batch_size: int | None = option(None, help="overrides the recipe's fine-tuning batch", min=1)
    linear_epochs: int = option(90, help="digits: linear probe epochs", min=1)
    k: int = option(20, help="digits: k-NN neighbours", min=1)


@dataclass
class DiagnoseConfig(EvalConfig):
    data: str | None = option(None, help="None: the run's pretraining data (config.yaml), else digits")
    split: str = option("val", help="train | val", choices=("train", "val"))
    num_images: int = option(512, help="images sampled (two augmented views each)", min=4)
    batch_size: int = option(256, help="batch of the forward passes", min=1)
    crop_min: float | None = option(None, help="None: the run's data.crop_min, else 0.2", min=0, max=1, min_exclusive=True)
    bins: int = option(60, help="histogram bins", min=1)
    plot: str = option("", help="'' | umap | tsne: every space's representation in 2-D beside its histogram, one PNG "
                       "per space (umap needs umap-learn, else t-SNE)", choices=("", "umap", "tsne"))


__all__ = ["DiagnoseConfig", "EvalConfig", "KNNConfig", "LinearConfig", "SUITES", "TransferConfig"]
