"""The configuration schema of ``opera run pretrain`` and its loader."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import opera.supervisions  # noqa: F401  (registers the task spaces and their Options)
from opera.errors import OperaError, suggest
from opera.supervisions.base import SPACES

RECIPES = Path(__file__).parent / "recipes"


@dataclass
class BackboneConfig:
    name: str = "resnet_tiny"
    img_size: int = 32
    patch_size: int | None = None  # ViTs; None: 16 for DeiTs, img_size/8 for vit_tiny
    stop_grad_patch_embed: bool | None = None  # ViTs; None: True for DeiTs (MoCo-v3)
    drop_path_rate: float = 0.0


@dataclass
class DataConfig:
    spec: str = "digits"  # see opera.data.parse_data_spec
    crop_min: float = 0.2  # RandomResizedCrop minimum scale (MoCo-v3 --crop-min)
    flip: bool = True
    workers: int = 0  # DataLoader workers per process
    augment_on: str = "device"  # device: batched two-crop on the training device (in-memory data stays there) | workers: per image
    labels: str = "all"  # which training images keep their labels: all | 10% | 13/class | FILE (opera.data.labels; -1 for the rest)
    unlabeled: str = ""  # extra images without labels, seen by self: a folder of images, auto (<data>/unlabeled) or a data spec
    labeled_per_batch: int = 0  # > 0: exactly this many labelled images in every global batch (opera.data.labels); 0: plain random


@dataclass
class OptimConfig:
    name: str = "auto"  # auto: LARS for CNNs, AdamW for ViTs; or lars | adamw | sgd
    base_lr: float = 0.6  # lr = base_lr * global_batch / 256
    weight_decay: float = 1e-6
    exclude_1d_decay: bool = False  # AdamW/SGD: no decay on biases and norms (off: main_moco.py decays every parameter; LARS always exempts them)
    momentum: float = 0.9  # LARS / SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    warmup_epochs: float = 1.0  # linear warmup per iteration, then cosine to 0
    ema_momentum: float = 0.99  # m of the momentum encoder
    ema_cosine: bool = True  # m follows a half cosine from m to 1 (MoCo-v3 --moco-m-cos)


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 128  # global batch over all processes
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 (autocast + GradScaler, as main_moco.py) | off
    concat_views: bool = False  # one forward for both views (changes BatchNorm statistics)
    per_view: bool = True  # online forward+backward one view at a time: same gradients, one view's activations alive
    sync_bn: bool = True  # SyncBatchNorm under DDP
    channels_last: bool = True  # CNNs on CUDA
    compile: bool = False  # torch.compile the hierarchy
    deterministic: bool = False  # deterministic kernels (bit-exact resume on CPU)
    log_every: int = 10  # steps between metrics.jsonl rows
    save_every_steps: int = 50  # last.pt cadence within an epoch (0: only at epoch ends)
    save_every_epochs: int = 10  # epoch_NNNN.pt cadence (0: never)
    knn_every: int = 5  # epochs between kNN evaluations on the held-out split (0: never)
    knn_k: int = 20
    online_linear: bool = False  # a linear classifier on detached features beside pretraining (opera.engine.monitors)
    online_linear_lr: float = 0.1  # its own SGD lr (solo-learn's online classifier: 0.1)
    max_steps: int = 0  # stop after this many steps in total (0: no limit; for smoke tests)


SECTIONS: dict[str, type] = {"backbone": BackboneConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


def _space_defaults() -> dict[str, Any]:
    return {name: SPACES.get(name).Options() for name in SPACES.names()}


@dataclass
class PretrainConfig:
    hierarchy: str = "self,full"
    arrangement: str | None = None  # None: C with self and full, A with full alone
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    spaces: dict[str, Any] = field(default_factory=_space_defaults)  # 'mask', 'self', 'full' sections

    def space_options(self) -> dict[str, dict[str, Any]]:
        """Options of the spaces in the hierarchy, as dicts for ``from_spec``."""
        from opera.hierarchy import parse_spec

        return {n: dataclasses.asdict(self.spaces[n]) for n in parse_spec(self.hierarchy)}


TOP_LEVEL = ("hierarchy", "arrangement")


def valid_keys() -> list[str]:
    keys = list(TOP_LEVEL)
    for sec, cls in {**SECTIONS, **{n: SPACES.get(n).Options for n in SPACES.names()}}.items():
        keys += [f"{sec}.{f.name}" for f in fields(cls)]
    return keys


def _section(cfg: PretrainConfig, name: str) -> Any:
    if name in SECTIONS:
        return getattr(cfg, name)
    if name in SPACES:
        return cfg.spaces[name]
    raise OperaError(f"unknown config section {name!r}{suggest(name, list(SECTIONS) + SPACES.names())}; valid: {', '.join(list(TOP_LEVEL) + list(SECTIONS) + SPACES.names())}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except OperaError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise OperaError(f"config key {key} expects a list of {len(args)} values like [0.9, 0.999], got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise OperaError(f"config key {key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise OperaError(f"config key {key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise OperaError(f"config key {key} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise OperaError(f"config key {key} expects a string, got {value!r}")
    return value


#: keys that take one of a few words; YAML reads a bare ``off`` as false, which means "off" here
CHOICES: dict[str, tuple[str, ...]] = {"train.amp": ("auto", "bf16", "fp16", "off"), "data.augment_on": ("device", "workers")}


def _choice(key: str, value: Any) -> Any:
    if key not in CHOICES:
        return value
    if value is False and "off" in CHOICES[key]:
        value = "off"
    if value not in CHOICES[key]:
        raise OperaError(f"config key {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    return value


def set_value(cfg: PretrainConfig, key: str, value: Any) -> None:
    """Set dotted ``key`` (``train.epochs``, ``full.layers``) to ``value``, type-checked."""
    parts = key.split(".")
    if len(parts) == 1:
        if key not in TOP_LEVEL:
            raise OperaError(f"unknown config key {key!r}{suggest(key, valid_keys())}; valid keys: {', '.join(valid_keys())}")
        hints = typing.get_type_hints(PretrainConfig)
        setattr(cfg, key, _coerce(value, hints[key], key))
        return
    if len(parts) != 2:
        raise OperaError(f"config key {key!r} has too many dots; keys look like section.name, e.g. train.epochs")
    section = _section(cfg, parts[0])
    hints = typing.get_type_hints(type(section))
    if parts[1] not in hints:
        raise OperaError(f"unknown config key {key!r}{suggest(key, valid_keys())}; valid keys in {parts[0]}: {', '.join(f'{parts[0]}.{k}' for k in hints)}")
    setattr(section, parts[1], _coerce(_choice(key, value), hints[parts[1]], key))


def config_from_dict(data: dict[str, Any], base: PretrainConfig | None = None) -> PretrainConfig:
    """Apply a nested dict (a YAML recipe) on top of ``base`` (default: the defaults)."""
    cfg = base if base is not None else PretrainConfig()
    if not isinstance(data, dict):
        raise OperaError("a config must be a YAML mapping of sections (hierarchy, backbone, data, optim, train, mask, self, full)")
    for key, value in data.items():
        if key in ("description", "resolved"):  # prose, and what a run derived (config.yaml)
            continue
        if key in TOP_LEVEL:
            set_value(cfg, key, value)
        elif isinstance(value, dict):
            _section(cfg, key)
            for sub, v in value.items():
                set_value(cfg, f"{key}.{sub}", v)
        else:
            raise OperaError(f"unknown config key {key!r}{suggest(str(key), valid_keys() + list(SECTIONS))}; valid: {', '.join(list(TOP_LEVEL) + list(SECTIONS) + SPACES.names())}")
    return cfg


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
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise OperaError(f"config file {p} does not exist; pass a recipe name ({', '.join(list_recipes())}) or a YAML path")
        return p
    candidate = RECIPES / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise OperaError(f"unknown recipe {name_or_path!r}{suggest(name_or_path, list_recipes())}; see 'opera configs list'")
    return candidate


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise OperaError(f"cannot parse {path}: {str(exc).splitlines()[0]}; fix the YAML syntax") from None
    except OSError as exc:
        raise OperaError(f"cannot read {path} ({exc.strerror}); pass a readable YAML file") from None
    if not isinstance(data, dict):
        raise OperaError(f"{path} is not a YAML mapping of sections; write e.g. 'train: {{epochs: 100}}'")
    return data


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, section by section (a nested mapping merges, a value replaces)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_yaml(path: Path, recipes_dir: Path | None = None, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe as a dict, its ``base:`` resolved: ``base: r50_100ep_b1024`` (a recipe name, looked
    up beside the file, then in ``recipes_dir``) or ``base: other.yaml`` (relative to the file) is
    loaded first and this file's keys go on top, section by section; a base may have a base.

    One mechanism for every kind of recipe (pretraining, evaluation, ablation): a recipe states
    only what differs from the one it builds on."""
    path = Path(path)
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base.strip():
        raise OperaError(f"{path}: 'base' must name a recipe (e.g. base: r50_100ep_b1024), got {base!r}")
    candidates = [path.parent / base, path.parent / f"{base}.yaml"]
    if recipes_dir is not None:
        candidates += [recipes_dir / base, recipes_dir / f"{base}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        names = sorted(p.stem for p in path.parent.glob("*.yaml") if p != path)
        raise OperaError(f"{path}: base recipe {base!r} not found{suggest(base, names)}; name a recipe beside it or a YAML path")
    chain = (*_chain, path.resolve())
    if found.resolve() in chain:
        loop = " -> ".join(p.stem for p in (*chain, found.resolve()))
        raise OperaError(f"{path}: recipes inherit in a loop ({loop}); remove one 'base:'")
    parent = load_yaml(found, recipes_dir, chain)
    parent.pop("description", None)  # a description speaks for its own file
    return merge_dicts(parent, data)


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults <- recipe <- ``key=value`` overrides."""
    cfg = PretrainConfig()
    if name_or_path:
        cfg = config_from_dict(load_yaml(recipe_path(name_or_path), RECIPES), cfg)
    return apply_overrides(cfg, overrides or [])


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value read as YAML (``none`` -> None)."""
    if "=" not in item:
        raise OperaError(f"--set {item!r} is not key=value; write e.g. --set train.epochs=5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key.strip(), value


def override_dataclass(obj: Any, overrides: list[str], command: str) -> Any:
    """``--set key=value`` on a flat config dataclass (every evaluation's config): the same
    parsing, type checks and one-line errors as the pretraining config's ``--set``."""
    if not overrides:
        return obj
    hints = typing.get_type_hints(type(obj))
    values = {}
    for item in overrides:
        key, value = parse_override(item)
        if key not in hints:
            raise OperaError(f"unknown option {key!r} of 'opera {command}'{suggest(key, list(hints))}; valid: {', '.join(hints)}")
        values[key] = _coerce(_choice(key, value), hints[key], key)
    return dataclasses.replace(obj, **values)


def apply_overrides(cfg: PretrainConfig, overrides: list[str]) -> PretrainConfig:
    for item in overrides:
        key, value = parse_override(item)
        set_value(cfg, key, value)
    return cfg
