"""The configuration schema of ``opera run pretrain`` and its loader.

Every field states its help, and its valid range or choices, once (:func:`opera.fields.option`);
:func:`load_config` and :func:`apply_overrides` validate with them (:mod:`opera.configs.core`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import opera.supervisions  # noqa: F401  (registers the task spaces and their Options)
from opera.configs import core
from opera.errors import OperaError
from opera.fields import option
from opera.supervisions.base import SPACES

RECIPES = Path(__file__).parent / "recipes"


@dataclass
class BackboneConfig:
    name: str = option("resnet_tiny", help="resnet_tiny, vit_tiny, resnet18, resnet50, deit_small, deit_base or a timm name")
    img_size: int = option(32, help="crop size of the views", min=1)
    patch_size: int | None = option(None, help="ViTs; None: 16 for DeiTs, img_size/8 for vit_tiny", min=1)
    stop_grad_patch_embed: bool | None = option(None, help="ViTs; None: True for DeiTs (MoCo-v3)")
    drop_path_rate: float = option(0.0, help="stochastic depth rate", min=0, max=1, max_exclusive=True)


@dataclass
class DataConfig:
    spec: str = option("digits", help="data spec (opera.data.parse_data_spec)")
    crop_min: float = option(0.2, help="RandomResizedCrop minimum scale (MoCo-v3 --crop-min)", min=0, max=1, min_exclusive=True)
    flip: bool = option(True, help="random horizontal flip")
    workers: int = option(0, help="DataLoader workers per process", min=0)
    augment_on: str = option("device", help="device: batched two-crop on the training device (in-memory data stays "
                             "there) | workers: per image", choices=("device", "workers"))
    labels: str = option("all", help="which training images keep their labels: all | 10% | 13/class | FILE "
                         "(opera.data.labels; -1 for the rest)")
    unlabelled: str = option("", help="extra images without labels, seen by self: a folder of images, auto "
                             "(<data>/unlabelled) or a data spec")
    labelled_per_batch: int = option(0, help="> 0: exactly this many labelled images in every global batch "
                                     "(opera.data.labels); 0: plain random", min=0)
    local_crops: int = option(0, help="multi-crop: this many local crops after the two global views (DINO's "
                              "--local_crops_number, 8 for ImageNet); read by multi-crop spaces (dino) only", min=0)
    local_size: int = option(0, help="local crop size in px; 0: 96/224 of backbone.img_size (DINO's 96 at 224)", min=0)
    local_crop_scale: tuple[float, float] = option((0.05, 0.4), help="RandomResizedCrop scale of the local crops "
                                                   "(DINO's --local_crops_scale)", min=0, max=1, min_exclusive=True,
                                                   example="[0.05,0.4]")


@dataclass
class OptimConfig:
    name: str = option("auto", help="auto: LARS for CNNs, AdamW for ViTs; or lars | adamw | sgd",
                       choices=("auto", "lars", "adamw", "sgd"))
    base_lr: float = option(0.6, help="lr = base_lr * global_batch / 256", min=0, min_exclusive=True)
    weight_decay: float = option(1e-6, help="weight decay", min=0)
    exclude_1d_decay: bool = option(False, help="AdamW/SGD: no decay on biases and norms (off: main_moco.py decays "
                                    "every parameter; LARS always exempts them)")
    momentum: float = option(0.9, help="LARS / SGD momentum", min=0, max=1)
    betas: tuple[float, float] = option((0.9, 0.999), help="AdamW betas", min=0, max=1, max_exclusive=True,
                                        example="[0.9,0.999]")
    warmup_epochs: float = option(1.0, help="linear warmup per iteration, then cosine to 0", min=0)
    ema_momentum: float = option(0.99, help="m of the momentum encoder", min=0, max=1)
    ema_cosine: bool = option(True, help="m follows a half cosine from m to 1 (MoCo-v3 --moco-m-cos)")


@dataclass
class TrainConfig:
    epochs: int = option(20, help="pretraining epochs", min=1)
    batch_size: int = option(128, help="global batch over all processes", min=1)
    seed: int = option(0, help="random seed (data order, augmentations, masks)")
    device: str = option("auto", help="auto | cpu | cuda | cuda:N")
    amp: str = option("auto", help="auto (bf16 on CUDA, off on CPU) | bf16 | fp16 (autocast + GradScaler, as "
                      "main_moco.py) | off", choices=("auto", "bf16", "fp16", "off"))
    concat_views: bool = option(False, help="one forward for both views (changes BatchNorm statistics)")
    per_view: bool = option(True, help="online forward+backward one view at a time: same gradients, one view's "
                            "activations alive")
    sync_bn: bool = option(True, help="SyncBatchNorm under DDP")
    channels_last: bool = option(True, help="channels-last memory format for CNNs on CUDA")
    compile: bool = option(False, help="torch.compile the hierarchy")
    deterministic: bool = option(False, help="deterministic kernels (bit-exact resume on CPU)")
    log_every: int = option(10, help="steps between metrics.jsonl rows", min=1)
    save_every_steps: int | str = option(50, help="last.pt cadence within an epoch (0: only at epoch ends; auto: "
                                         "measure a write and the step, then save so that writes take under 2% of "
                                         "the time, at most 30 min of steps apart)", min=0, example="auto")
    save_every_epochs: int = option(10, help="epoch_NNNN.pt cadence (0: never)", min=0)
    keep_epoch_checkpoints: int | tuple[int, ...] = option(
        3, help="epoch_NNNN.pt files kept: the newest N (a count; -1: all), or these epochs (a list of multiples of "
        "save_every_epochs, e.g. [100,200,300]); older ones are removed", example="3")
    keep_last_prev: bool = option(False, help="keep last.prev.pt (the last.pt before the newest) beside last.pt, a "
                                  "second full state; off: removed once the new last.pt reads back")
    knn_every: int = option(5, help="epochs between kNN evaluations on the held-out split (0: never)", min=0)
    knn_k: int = option(20, help="neighbours of the kNN monitor", min=1)
    knn_bank_per_class: int = option(-1, help="the kNN monitor's bank: a fixed class-balanced subset of the train "
                                     "split, at most this many images per class (0: the whole split; -1: the whole "
                                     "split up to 20,000 train images, else 100 per class; 'opera run knn' is the full "
                                     "protocol)", min=-1)
    rank_every: int = option(1, help="epochs between the label-free collapse monitor's RankMe, alpha-ReQ and std of "
                             "every representation (0: never; it shares the kNN monitor's pass when both run)", min=0)
    rank_images: int = option(4096, help="the collapse monitor's images: a fixed seeded subset of the kNN monitor's "
                              "bank (all of it when smaller)", min=2)
    rank_max_dim: int = option(4096, help="the collapse monitor skips wider representations (said once): a d x d "
                               "sum and two d x d eigendecompositions each (VICReg/Barlow 8192: about 50 s of CPU each)",
                               min=1)
    online_linear: bool = option(False, help="a linear classifier on detached features beside pretraining "
                                 "(opera.engine.monitors)")
    online_linear_lr: float = option(0.1, help="its own SGD lr (solo-learn's online classifier: 0.1)", min=0,
                                     min_exclusive=True)
    max_steps: int = option(0, help="stop after this many steps in total (0: no limit; for smoke tests)", min=0)
    loggers: str = option("tensorboard", help="comma-separated loggers beside metrics.jsonl: tensorboard, wandb, mlflow "
                          "(wandb/mlflow: pip install -e \".[wandb]\" / \".[mlflow]\"; docs/trackers.md)")
    tracker_project: str = option("opera", help="W&B project / MLflow experiment of the tracker runs")
    tracker_group: str = option("", help="W&B group / MLflow tag opera.group ('opera ablate': the study's folder name)")
    tracker_name: str = option("", help="the tracker run's name ('': the run directory's name)")
    wandb_mode: str = option("auto", help="auto ($WANDB_MODE, else offline) | offline (no network; wandb sync "
                             "uploads) | online", choices=("auto", "offline", "online"))
    wandb_entity: str = option("", help="W&B entity (team or user; '': the default)")
    mlflow_uri: str = option("", help="MLflow tracking URI ('': $MLFLOW_TRACKING_URI, else file:OUTPUT/mlruns)")
    init: str = option("", help="start from these weights (opera run/file, MoCo-v3/OPERA main_moco.py, main_lincls.py, "
                       "convert_to_deit.py, timm/torchvision state dict, config.json + model.safetensors folder; "
                       "opera.weights); '' : random init")


SECTIONS: dict[str, type] = {"backbone": BackboneConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def _space_defaults() -> dict[str, Any]:
    return {name: SPACES.get(name).Options() for name in SPACES.names()}


@dataclass
class PretrainConfig:
    hierarchy: str = option("self,full", help="task spaces from the base up: self | full | self,full | mask,self,full ...")
    arrangement: str | None = option(None, help="where 'full' attaches: A | B | C | naive; None: C with an instance "
                                     "space (self, byol, ...) and full (B if it has no predictor), A with full alone")
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    #: the task spaces' Options ('mask', 'self', 'full' ... sections), keyed by space name
    spaces: dict[str, Any] = field(default_factory=_space_defaults, metadata={"sections": True})

    def config_sections(self) -> dict[str, Any]:
        """The sections: backbone, data, optim, train, then one per registered task space."""
        out: dict[str, Any] = {name: getattr(self, name) for name in SECTIONS}
        for name in SPACES.names():
            if name not in self.spaces:
                self.spaces[name] = SPACES.get(name).Options()
            out[name] = self.spaces[name]
        return out

    def config_check(self) -> None:
        """Rules over several keys: a valid hierarchy and arrangement, a parseable --labels."""
        from opera.data.labels import is_all, parse_labels
        from opera.hierarchy import ARRANGEMENTS, parse_spec

        names = parse_spec(self.hierarchy)
        if self.data.local_crops and not any(SPACES.get(n).multi_crop for n in names):
            readers = ", ".join(n for n in SPACES.names() if SPACES.get(n).multi_crop) or "none registered"
            raise OperaError(f"data.local_crops={self.data.local_crops} but no space of hierarchy {self.hierarchy!r} reads "
                             f"local crops (multi-crop spaces: {readers}); set data.local_crops=0 or add one")
        lo, hi = self.data.local_crop_scale
        if lo > hi:
            raise OperaError(f"data.local_crop_scale={list(self.data.local_crop_scale)} is [max, min]; write [{hi},{lo}]")
        if self.arrangement is not None and self.arrangement not in ARRANGEMENTS:
            raise OperaError(f"config key arrangement={self.arrangement!r} must be one of {', '.join(ARRANGEMENTS)} "
                             "(or null: C with an instance space and full, A with full alone); set --set arrangement=C")
        if not is_all(self.data.labels):
            parse_labels(self.data.labels)
        from opera.loggers import parse_loggers

        parse_loggers(self.train.loggers)
        self._check_retention()
        every = self.train.save_every_steps
        if isinstance(every, str) and every != "auto":
            raise OperaError(f"config key train.save_every_steps={every!r} must be a number of steps >= 0 or auto; "
                             "set --set train.save_every_steps=auto")

    def _check_retention(self) -> None:
        keep, every = self.train.keep_epoch_checkpoints, self.train.save_every_epochs
        if isinstance(keep, int):
            if keep < -1:
                raise OperaError(f"config key train.keep_epoch_checkpoints={keep} must be a count >= 0, -1 (all) or a "
                                 "list of epochs; set --set train.keep_epoch_checkpoints=3")
            return
        never = [e for e in keep if e < 1 or not every or e % every]
        if never:
            fix = f"list multiples of {every}" if every else "set train.save_every_epochs to write epoch files"
            raise OperaError(f"train.keep_epoch_checkpoints lists epoch {never[0]}, which train.save_every_epochs="
                             f"{every} does not write; {fix}")

    def space_options(self) -> dict[str, dict[str, Any]]:
        """Options of the spaces in the hierarchy, as dicts for ``from_spec``."""
        from opera.hierarchy import parse_spec

        return {n: dataclasses.asdict(self.spaces[n]) for n in parse_spec(self.hierarchy)}


TOP_LEVEL = ("hierarchy", "arrangement")


def _choices(cls: type, name: str) -> tuple[str, ...]:
    return next(f.metadata["choices"] for f in fields(cls) if f.name == name)


#: keys that take one of a few words (read from the fields' metadata; YAML's bare ``off`` means "off")
CHOICES: dict[str, tuple[str, ...]] = {"train.amp": _choices(TrainConfig, "amp"),
                                       "data.augment_on": _choices(DataConfig, "augment_on"),
                                       "optim.name": _choices(OptimConfig, "name")}


def config_from_dict(data: dict[str, Any], base: PretrainConfig | None = None) -> PretrainConfig:
    """Apply a nested dict (a YAML recipe, a run's config.yaml) on top of ``base`` (default: the
    defaults), validated."""
    cfg = base if base is not None else PretrainConfig()
    if not isinstance(data, dict):
        raise OperaError("a config must be a YAML mapping of sections (hierarchy, backbone, data, optim, train, mask, self, full)")
    return core.validate(core.apply_dict(cfg, data))


def config_to_dict(cfg: PretrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"hierarchy": cfg.hierarchy, "arrangement": cfg.arrangement}
    for sec in SECTIONS:
        out[sec] = dataclasses.asdict(getattr(cfg, sec))
    for name, opts in cfg.spaces.items():
        out[name] = dataclasses.asdict(opts)
    for sec in out.values():
        if isinstance(sec, dict):
            for k, v in sec.items():
                if isinstance(v, tuple):
                    sec[k] = list(v)
    return out


def list_recipes() -> list[str]:
    return core.recipe_names(RECIPES)


def recipe_path(name_or_path: str) -> Path:
    """A pretraining recipe name (``opera configs list``) or a YAML path -> the file."""
    return core.find_recipe(name_or_path, RECIPES)


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults <- recipe <- ``key=value`` overrides, validated."""
    return core.load_recipe(name_or_path, PretrainConfig, RECIPES, overrides=list(overrides or []))


#: the one implementation of every config (nested like this one, or flat like the evaluations')
apply_overrides = core.apply_overrides
load_yaml = core.load_yaml
merge_dicts = core.merge_dicts
