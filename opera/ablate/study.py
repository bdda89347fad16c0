"""Ablation studies: variants x seeds of pretraining + evaluation, resumable cell by cell.

Layout of a study directory ``OUT``::

    OUT/study.json                         what to run: the command, base config, variants, seeds, evals
    OUT/cells/<variant>/seed<k>/pretrain/  an ordinary opera run (config.yaml, metrics.jsonl, last.pt, ...)
    OUT/cells/<variant>/seed<k>/eval_<e>/results.json   one per evaluation (linear, knn, transfer_*)
    OUT/cells/<variant>/seed<k>/cell.json  written atomically once the cell is done (its metrics)
    OUT/report.{md,csv,json}, OUT/plots/*.png

A cell with ``cell.json`` is never rerun; a cell without it resumes its pretraining from
``pretrain/last.pt`` (``run_pretrain`` does that by itself) and skips the evaluations whose
``results.json`` already exists. Each cell rebuilds its configuration from ``study.json`` alone
(base config dict + the variant's overrides + the seed), so a SLURM array task needs nothing else.

Evaluations (``--evals linear,knn``): each runs *in-domain* (on the pretraining data spec: bank /
classifier on its train split, accuracy on its val split) and, when the study has a transfer data
spec, on the *held-out classes* (``transfer_linear``, ``transfer_knn``). The default study data
is ``digits:0-6`` with transfer to ``digits:7-9`` (classes never seen during pretraining).

Dense evaluations (``--evals linear,knn,segmentation``; also ``detection``) fine-tune the cell's
backbone on the digit scenes (:mod:`opera.evals.dense`, recipes ``digits_segmentation`` /
``digits_detection``) of the held-out classes (``digit_scenes:7-9``; the pretraining classes
when the study has no digits transfer spec) and report ``segmentation/miou`` or
``detection/box_ap`` and ``detection/mask_ap``: Fig. 4 (right)'s dense side of the arrangements.
"""

from __future__ import annotations

import datetime as _dt
import functools
import itertools
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from opera.ablate.records import (
    CELL_FILE,
    DENSE_EVALS,
    RUN_PLACE,
    STUDY_FILE,
    Study,
    Variant,
    cell_dir,
    dense_data,
    json_roundtrip,
    load_study,
    read_cell,
    write_json,
)
from opera.ablate.report import build_report, label
from opera.errors import OperaError, suggest

RECIPES = Path(__file__).parent / "recipes"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # .../opera
DEFAULT_RECIPE = "ablate_digits"  # opera/ablate/recipes/ablate_digits.yaml
EVALS = ("linear", "knn", "segmentation", "detection")
KINDS = ("arrangements", "hierarchy", "sweep", "labels")

#: Fig. 4: where the class space attaches (plus the naive sum of Eq. 4)
ARRANGEMENT_NOTES = {
    "A": "full on the backbone feature",
    "B": "full on the projector, beside self",
    "C": "full after the predictor: OPERA",
    "naive": "naive sum of Eq. 4 (full on the instance representation)",
}
#: the hierarchy study's variants: name -> (hierarchy, arrangement, note)
HIERARCHY_VARIANTS: dict[str, tuple[str, str | None, str]] = {
    "self": ("self", None, "self-supervised only (MoCo-v3)"),
    "full": ("full", None, "fully supervised only"),
    "self+full": ("self,full", "C", "OPERA"),
    "naive": ("self,full", "naive", "naive sum of Eq. 4"),
    "mask+self+full": ("mask,self,full", "C", "OPERA with masked image modeling (ViT)"),
}
DEFAULT_HIERARCHY_VARIANTS = ("self", "full", "self+full", "naive", "mask+self+full")


# ----------------------------------------------------------------------------- variants
def split_list(text: str | None, what: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",")]
    items = [t for t in items if t]
    if not items:
        raise OperaError(f"no {what} given; write a comma-separated list")
    if len(set(items)) != len(items):
        raise OperaError(f"{what} {text!r} repeats an entry; list each once")
    return items


def arrangement_variants(arrangements: str | list[str] = "A,B,C") -> list[Variant]:
    """Fig. 4: ``self,full`` with the class space at A (backbone), B (projector), C (predictor)."""
    from opera.hierarchy import ARRANGEMENTS

    names = split_list(arrangements, "arrangements") if isinstance(arrangements, str) else list(arrangements)
    out = []
    for a in names:
        if a not in ARRANGEMENTS:
            raise OperaError(f"unknown arrangement {a!r}{suggest(a, ARRANGEMENTS)}; valid: {', '.join(ARRANGEMENTS)}")
        out.append(Variant(a, ["hierarchy=self,full", f"arrangement={a}"], ARRANGEMENT_NOTES[a]))
    return out


def hierarchy_variants(variants: str | list[str] | None = None) -> list[Variant]:
    """Single-level baselines and OPERA: ``self`` (MoCo-v3), ``full`` (supervised), ``self+full``
    (OPERA), ``naive`` (Eq. 4), ``mask+self+full`` (MIM; ViT backbones only). Any other
    hierarchy written with ``+`` (``mask+self``) is accepted too."""
    from opera.hierarchy import parse_spec

    names = list(DEFAULT_HIERARCHY_VARIANTS) if variants is None else (
        split_list(variants, "variants") if isinstance(variants, str) else list(variants))
    out = []
    for name in names:
        if name in HIERARCHY_VARIANTS:
            spec, arrangement, note = HIERARCHY_VARIANTS[name]
        else:
            try:
                spec = ",".join(parse_spec(name))
            except OperaError:
                raise OperaError(
                    f"unknown hierarchy variant {name!r}{suggest(name, list(HIERARCHY_VARIANTS))}; valid: "
                    f"{', '.join(HIERARCHY_VARIANTS)} or any hierarchy written with '+' (e.g. mask+self)") from None
            arrangement, note = None, ""
        out.append(Variant(name, [f"hierarchy={spec}", f"arrangement={arrangement if arrangement else 'null'}"], note))
    return out


def label_variants(fractions: str = "1%,10%,100%", variants: str = "self,full,self+full") -> list[Variant]:
    """The label-fraction study (omni-supervision): every hierarchy variant at every ``--labels``
    fraction, named ``<variant>@<fraction>``. A variant without a space that needs labels
    (``self``) ignores them, so it is one variant (``self``, every label dropped or not, the same
    run) instead of one per fraction."""
    from opera.data.labels import is_all, parse_labels

    fracs = split_list(fractions, "fractions")
    for f in fracs:
        if not is_all(f):
            parse_labels(f)
    out = []
    for v in hierarchy_variants(variants):
        spec = v.overrides[0].split("=", 1)[1]
        if set(spec.split(",")) <= {"self", "mask"}:
            out.append(Variant(v.name, v.overrides, (v.note + "; " if v.note else "") + "needs no labels: one run for every fraction"))
            continue
        for f in fracs:
            out.append(Variant(f"{v.name}@{f}", v.overrides + [f"data.labels={f}"], f"{v.note or v.name}, --labels {f}"))
    return out


def split_values(raw: str) -> list[str]:
    """``1,2,3`` -> ``['1','2','3']``; commas inside ``[...]``/``{...}`` do not split (``[0.9,0.99]``)."""
    parts, depth, cur = [], 0, ""
    for ch in raw:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def sweep_variants(sets: list[str]) -> tuple[list[Variant], list[str]]:
    """``--set`` items of a sweep -> (variants, fixed overrides).

    ``key=v1,v2,...`` is an axis (a comma separates values; write hierarchies with ``+``:
    ``hierarchy=self,self+full``); ``key=v`` (one value) is a fixed override of every variant.
    Several axes make a grid (their product), named ``k1=a k2=b``.
    """
    from opera.configs.core import split_override

    axes: list[tuple[str, list[str]]] = []
    fixed: list[str] = []
    for item in sets:
        key, raw = split_override(item)  # the --set parser of every config; each value is read by it too
        values = split_values(raw.strip())
        if any(v == "" for v in values):
            raise OperaError(f"--set {item!r} has an empty value; write e.g. --set {key}=1,2,3")
        if len(set(values)) != len(values):
            raise OperaError(f"--set {item!r} repeats a value; list each once")
        if any(k == key for k, _ in axes) or any(f.split("=", 1)[0].strip() == key for f in fixed):
            raise OperaError(f"--set {key}=... is given twice; list all its values in one --set {key}=a,b,c")
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes.append((key, values))
    if not axes:
        raise OperaError("a sweep needs at least one key with several values, e.g. --set full.layers=1,2,3,4 "
                         "(the paper's Fig. 5-8: train.epochs, full.layers, self.dim, full.hidden)")
    variants = []
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in axes]):
        variants.append(Variant(" ".join(f"{k}={v}" for k, v in combo), [f"{k}={v}" for k, v in combo]))
    return variants, fixed


def recipe_file(config: str | None) -> Path:
    """``--config``: a name in opera/ablate/recipes, a name in opera/configs/recipes, or a YAML path."""
    from opera.configs.schema import recipe_path

    name = config or DEFAULT_RECIPE
    local = RECIPES / f"{name}.yaml"
    if local.is_file() and not Path(name).suffix:
        return local
    return recipe_path(name)


def _source_name(config: str | None) -> str:
    """How report.md names the base recipe: a shipped recipe by its name and its path inside the
    package (``ablate_digits (opera/ablate/recipes/ablate_digits.yaml)``), a YAML file as given on
    the command line - never an absolute path of the machine that ran the study."""
    path = recipe_file(config).resolve()
    name = config or DEFAULT_RECIPE
    if Path(name).suffix in (".yaml", ".yml") or not path.is_relative_to(PACKAGE_ROOT):
        return name
    return f"{name} ({path.relative_to(PACKAGE_ROOT.parent).as_posix()})"


def base_config(config: str | None, overrides: list[str]):
    """Defaults <- recipe (default ``ablate_digits``) <- ``key=value`` overrides, validated."""
    from opera.configs import PretrainConfig, load_recipe
    from opera.configs.schema import RECIPES

    return load_recipe(recipe_file(config), PretrainConfig, RECIPES, overrides=list(overrides))


def cell_config(study: Study, variant: Variant, seed: int):
    """The pretraining config of one cell: the study's base config, the variant's overrides, the seed."""
    from opera.configs import PretrainConfig, apply_overrides, config_from_dict, set_value

    cfg = config_from_dict(json_roundtrip(study.base), PretrainConfig())
    cfg = apply_overrides(cfg, list(variant.overrides))
    set_value(cfg, "train.seed", int(seed))
    return cfg


def default_transfer(data: str) -> str | None:
    """The held-out classes of a ``digits:<classes>`` spec (``digits:0-6`` -> ``digits:7-9``), else None."""
    from opera.data import parse_data_spec
    from opera.data.specs import format_classes

    spec = parse_data_spec(data)
    if spec.name != "digits" or not spec.classes:
        return None
    rest = tuple(c for c in range(10) if c not in spec.classes)
    return f"digits:{format_classes(rest)}" if rest else None


def _eval_config_class(protocol: str):
    if protocol == "linear":
        from opera.evals.linear import LinearConfig

        return LinearConfig
    if protocol == "knn":
        from opera.evals.knn import KNNConfig

        return KNNConfig
    if protocol in DENSE_EVALS:
        from opera.evals.dense import DenseConfig

        return DenseConfig
    raise OperaError(f"unknown evaluation {protocol!r}{suggest(protocol, EVALS)}; valid: {', '.join(EVALS)}")


#: set by the study for every evaluation (not user options)
_EVAL_OWNED = ("checkpoint", "data", "output", "seed", "device", "task")


def parse_eval_options(items: list[str], evals: list[str]) -> dict[str, dict[str, Any]]:
    """``--eval-set linear.epochs=30 --eval-set knn.k=10`` -> ``{"linear": {"epochs": 30}, "knn": {"k": 10}}``,
    read by the ``--set`` parser of every config and set on (and validated with) the protocol's
    config dataclass."""
    from opera.configs import parse_override, set_value, validate
    from opera.configs.core import leaf_fields

    out: dict[str, dict[str, Any]] = {e: {} for e in evals}
    configs: dict[str, Any] = {}
    for item in items:
        key, value = parse_override(item, "--eval-set")
        if "." not in key:
            raise OperaError(f"--eval-set {item!r} is not protocol.key=value; write e.g. --eval-set linear.epochs=30")
        protocol, name = (s.strip() for s in key.split(".", 1))
        if protocol not in evals:
            raise OperaError(f"--eval-set {item!r} names {protocol!r}, which is not among --evals {','.join(evals)}")
        cfg = configs.setdefault(protocol, _eval_config_class(protocol)())
        valid = [k for k in leaf_fields(cfg) if k not in _EVAL_OWNED]
        if name not in valid:
            raise OperaError(f"unknown {protocol} option {name!r}{suggest(name, valid)}; valid: {', '.join(valid)}")
        set_value(cfg, name, value, shown=f"{protocol}.{name}")
        out[protocol][name] = getattr(cfg, name)
    for protocol, cfg in configs.items():
        validate(cfg, prefix=f"{protocol}.")
    return out


def _check_variant(cfg, variant: Variant) -> None:
    """Build the variant's hierarchy on the meta device: a bad combination fails before any run."""
    import torch

    from opera.hierarchy import SupervisionHierarchy, parse_spec

    from opera.backbones.factory import BACKBONES

    spaces = parse_spec(cfg.hierarchy)
    no_mask = (f"variant {variant.name!r} uses the mask space (masked image modeling), which needs a ViT backbone, but "
               f"the study's backbone {cfg.backbone.name!r} is a CNN; run the hierarchy study with a ViT "
               f"(--config ablate_digits_vit, or --set backbone.name=vit_tiny) or drop {variant.name!r} from --variants")
    if "mask" in spaces and cfg.backbone.name in BACKBONES and not _is_vit_name(cfg.backbone.name):
        raise OperaError(no_mask)
    label_sets = _study_label_sets(cfg)
    try:
        with torch.device("meta"):
            SupervisionHierarchy.from_config(cfg, label_sets)
    except OperaError as exc:
        if "mask" in spaces and "token" in str(exc).lower():
            raise OperaError(f"{no_mask} ({exc})") from None
        raise OperaError(f"variant {variant.name!r}: {exc}") from None
    except Exception:  # noqa: BLE001 - anything else shows up (with its traceback) when the cell runs
        pass


def _study_label_sets(cfg) -> dict[str, int]:
    """The label sets of the study's data, so a variant needing one the data lacks fails up front."""
    from opera.data import build_dataset, dataset_label_sets

    try:
        return dataset_label_sets(build_dataset(cfg.data.spec, "train"))
    except OperaError:  # the data's own error shows up when the cell runs
        return {"class": 10}


def _is_vit_name(name: str) -> bool:
    from opera.backbones.factory import BACKBONES

    if name in BACKBONES:
        return name in ("vit_tiny", "deit_small", "deit_base")
    n = name.lower()
    return any(t in n for t in ("vit", "deit", "beit", "eva"))


def check_run_options(jobs: Any, threads: Any) -> None:
    """``--jobs`` and ``--threads``: positive integers (``threads`` may be None: the default)."""
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise OperaError(f"--jobs must be a positive integer, got {jobs!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise OperaError(f"--threads must be a positive integer, got {threads!r}")


def create_study(kind: str, variants: list[Variant], *, output: str | Path, command: str, seeds: int = 3,
                 config: str | None = None, overrides: list[str] | None = None, data: str | None = None,
                 transfer: str | None = "auto", evals: list[str] | str = "linear,knn",
                 eval_options: list[str] | None = None, device: str | None = None) -> Study:
    """Validate a study (:func:`plan_study`) and write ``OUT/study.json`` (or check it against the
    one already there).

    ``transfer``: ``"auto"`` (the held-out digits classes of ``digits:<classes>``), ``None``/``"none"``
    (no transfer evaluation) or a data spec.
    """
    study = plan_study(kind, variants, command=command, seeds=seeds, config=config, overrides=overrides, data=data,
                       transfer=transfer, evals=evals, eval_options=eval_options, device=device)
    out = Path(output)
    path = out / STUDY_FILE
    invocation = {"command": command, "at": study.created_at, "seeds": study.seeds}
    if path.is_file():
        old = load_study(out)
        if json_roundtrip(old.identity()) != json_roundtrip(study.identity()):
            diff = [k for k, v in json_roundtrip(study.identity()).items() if json_roundtrip(old.identity()).get(k) != v]
            raise OperaError(
                f"{out} holds another study (its {', '.join(diff)} differ{'s' if len(diff) == 1 else ''}: first run as "
                f"'{old.command}'); rerun that command to resume it, or choose another --output")
        old.seeds = study.seeds
        for sec, key in RUN_PLACE:
            old.base.setdefault(sec, {})[key] = study.base.get(sec, {}).get(key)
        old.invocations = old.invocations + [invocation]
        study = old
    else:
        study.invocations = [invocation]
    from opera.engine.loop import check_output_dir

    check_output_dir(out)
    write_json(path, study.to_dict())
    return study


def plan_study(kind: str, variants: list[Variant], *, command: str = "", seeds: int = 3, config: str | None = None,
               overrides: list[str] | None = None, data: str | None = None, transfer: str | None = "auto",
               evals: list[str] | str = "linear,knn", eval_options: list[str] | None = None,
               device: str | None = None) -> Study:
    """Every check of a study, nothing written: the kind, seeds, variants (each variant's config
    built and validated, its hierarchy built on the meta device), evaluations and their options,
    the data. :func:`create_study` and ``--dry-run`` both go through it."""
    from opera.configs import config_to_dict, set_value, validate
    from opera.data import parse_data_spec

    if kind not in KINDS:
        raise OperaError(f"unknown study kind {kind!r}; valid: {', '.join(KINDS)}")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise OperaError(f"--seeds must be a positive integer, got {seeds!r}")
    if not variants:
        raise OperaError("the study has no variants")
    names = [v.name for v in variants]
    dirs = [v.dirname for v in variants]
    if len(set(dirs)) != len(dirs):
        raise OperaError(f"variants {', '.join(names)} collide as folder names; give them distinct names")
    evals = split_list(evals, "evaluations") if isinstance(evals, str) else list(evals)
    for e in evals:
        _eval_config_class(e)

    overrides = list(overrides or [])
    cfg = base_config(config, overrides)
    if data is not None:
        set_value(cfg, "data.spec", data)
    if device is not None:
        set_value(cfg, "train.device", device)
    validate(cfg)
    parse_data_spec(cfg.data.spec)
    if transfer == "auto":
        transfer = default_transfer(cfg.data.spec)
    elif transfer is not None and str(transfer).strip().lower() in ("", "none", "off", "no"):
        transfer = None
    if transfer is not None:
        parse_data_spec(transfer)
    if any(e in DENSE_EVALS for e in evals):
        dense_data(cfg.data.spec, transfer)
    base = json_roundtrip(config_to_dict(cfg))
    study = Study(kind=kind, command=command, variants=variants, seeds=[cfg.train.seed + i for i in range(seeds)],
                  evals=evals, base=base, transfer=transfer, eval_options=parse_eval_options(list(eval_options or []), evals),
                  config_source=_source_name(config), overrides=overrides,
                  created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    for v in variants:
        try:
            _check_variant(cell_config(study, v, study.seeds[0]), v)
        except OperaError as exc:
            if str(exc).startswith(f"variant {v.name!r}") or "needs a ViT backbone" in str(exc):
                raise
            raise OperaError(f"variant {v.name!r}: {exc}") from None
    return study


# ----------------------------------------------------------------------------- one cell
def _eval_config(study: Study, protocol: str, data: str, checkpoint: Path, output: Path, seed: int, device: str):
    cls = _eval_config_class(protocol)
    opts = {"tensorboard": False, **study.eval_options.get(protocol, {})}
    if protocol in DENSE_EVALS:
        from opera.evals.dense import dense_config

        return dense_config(protocol, opts.pop("recipe", None), checkpoint=str(checkpoint), data=data, output=str(output),
                            seed=seed, device=device, **opts)
    return cls(checkpoint=str(checkpoint), data=data, output=str(output), seed=seed, device=device, **opts)


def _run_eval(study: Study, protocol: str, data: str, checkpoint: Path, output: Path, seed: int, device: str) -> dict[str, Any]:
    """One evaluation; its own table and messages go to ``output/log.txt``."""
    import contextlib

    ecfg = _eval_config(study, protocol, data, checkpoint, output, seed, device)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "log.txt", "w") as log, contextlib.redirect_stdout(log):
        if protocol == "linear":
            from opera.evals.linear import run_linear

            return run_linear(ecfg)
        if protocol in DENSE_EVALS:
            from opera.evals.dense import run_dense

            return run_dense(ecfg)
        from opera.evals.knn import run_knn

        return run_knn(ecfg)


#: the scalars a cell keeps of each evaluation's results.json metrics: key there -> key in cell.json
CELL_METRICS = {"top1": "top1", "top5": "top5", "mIoU": "miou", "box_AP": "box_ap", "mask_AP": "mask_ap"}


def cell_metrics(name: str, metrics: dict[str, Any]) -> dict[str, float]:
    """``{"<eval>/top1": ..}`` (classification) or ``{"segmentation/miou": ..}`` (dense)."""
    return {f"{name}/{short}": float(metrics[k]) for k, short in CELL_METRICS.items()
            if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)}


def _final_losses(metrics_file: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    try:
        lines = metrics_file.read_text().splitlines()
    except OSError:
        return last
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row:
            return {k: float(v) for k, v in row.items() if k == "loss" or k.startswith("loss/")}
    return last


def cell_tracker_names(cfg: Any, study_dir: str | Path, variant: Variant, seed: int) -> bool:
    """With W&B or MLflow in ``train.loggers``, a cell is one tracker run named ``<variant>/seed<k>``
    in the group of its study (W&B ``group``, MLflow tag ``opera.group``: the study folder's name),
    unless the study set ``train.tracker_group`` / ``train.tracker_name`` itself; MLflow's runs of
    the study share one file store, ``OUT/mlruns`` (unless ``train.mlflow_uri`` or
    ``MLFLOW_TRACKING_URI`` names one). Whether the cell is tracked."""
    from opera.configs import set_value
    from opera.engine.trackers import TrackerOptions

    if not TrackerOptions.of(cfg.train).trackers:
        return False
    if not cfg.train.tracker_group:
        set_value(cfg, "train.tracker_group", Path(study_dir).resolve().name)
    if not cfg.train.tracker_name:
        set_value(cfg, "train.tracker_name", f"{variant.dirname}/seed{seed}")
    if "mlflow" in cfg.train.loggers and not cfg.train.mlflow_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        set_value(cfg, "train.mlflow_uri", (Path(study_dir).resolve() / "mlruns").as_uri())  # one store per study
    return True


def log_cell_to_trackers(cfg: Any, pre_dir: Path, metrics: dict[str, float], step: int) -> None:
    """The cell's evaluation metrics (``linear/top1``, ...) into its pretraining's tracker run (the
    ids in ``pretrain/trackers.json``), at the run's last step: one tracker run holds the cell."""
    import yaml

    from opera.engine.trackers import TrackerOptions, close_all, open_trackers

    config = yaml.safe_load((pre_dir / "config.yaml").read_text()) if (pre_dir / "config.yaml").is_file() else {}
    trackers = open_trackers(pre_dir, TrackerOptions.of(cfg.train), config or {})
    try:
        for tracker in trackers:
            tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
    finally:
        close_all(trackers)


def run_cell(study_dir: str | Path, variant: str, seed: int, nproc: int = 1) -> dict[str, Any]:
    """Pretrain and evaluate one cell; return its ``cell.json`` record (read back when already done).

    Module-level and driven by ``study.json`` alone, so it can run as a SLURM array task; in a
    multi-task SLURM job every task pretrains (DDP) and rank 0 evaluates. ``nproc > 1`` pretrains
    in that many local processes (``launch_local``) and evaluates here.
    """
    from opera.engine.pretrain import run_pretrain
    from opera.evals.common import RESULTS

    study = load_study(study_dir)
    v = study.variant(variant)
    cdir = cell_dir(study_dir, v, seed)
    done = read_cell(cdir)
    if done is not None:
        return done
    cfg = cell_config(study, v, seed)
    tracked = cell_tracker_names(cfg, study_dir, v, seed)
    t0 = time.time()
    pre_dir = cdir / "pretrain"
    resumed = (pre_dir / "last.pt").is_file()
    if nproc > 1:
        from opera.launch.local import launch_local

        result = launch_local(run_pretrain, (cfg, pre_dir, None), nproc)[0] or {}
    else:
        result = run_pretrain(cfg, pre_dir)
        from opera import distributed

        if distributed.get_rank() != 0:  # the other tasks of a multi-task SLURM job: rank 0 evaluates
            return {}
    t_pre = time.time() - t0
    metrics: dict[str, float] = {}
    evals: dict[str, str] = {}
    device = cfg.train.device
    for name, protocol, data in study.eval_plan():
        edir = cdir / f"eval_{name}"
        res_file = edir / RESULTS
        res = None
        if res_file.is_file():
            try:
                res = json.loads(res_file.read_text())
            except (OSError, json.JSONDecodeError):
                res = None
        if res is None:
            res = _run_eval(study, protocol, data, pre_dir, edir, seed, device)
            top1 = (res.get("metrics") or {}).get("top1")
            print(f"eval {name} on {data}: top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else f"eval {name} done", flush=True)
        for key, value in cell_metrics(name, res.get("metrics") or {}).items():
            metrics[key] = value
        evals[name] = str(res_file.relative_to(cdir))
    if tracked:
        log_cell_to_trackers(cfg, pre_dir, metrics, int(result.get("global_step") or 0))
    losses = _final_losses(pre_dir / "metrics.jsonl")
    record = {
        "variant": v.name, "seed": seed, "overrides": v.overrides, "metrics": metrics,
        "final_losses": losses, "pretrain_finished": bool(result.get("finished")), "resumed": resumed,
        "pretrain_s": round(t_pre, 2), "cell_s": round(time.time() - t0, 2), "evals": evals,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(cdir / CELL_FILE, record)
    return record


# ----------------------------------------------------------------------------- the whole study
def pending_cells(study: Study, study_dir: str | Path) -> list[tuple[Variant, int]]:
    return [(v, s) for v, s in study.cells() if read_cell(cell_dir(study_dir, v, s)) is None]


def _init_worker(threads: int | None) -> None:
    import os

    import torch

    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def run_cell_logged(study_dir: str, variant: str, seed: int) -> dict[str, Any]:
    """:func:`run_cell` with its output appended to ``<cell>/log.txt`` (parallel workers)."""
    import contextlib

    study = load_study(study_dir)
    cdir = cell_dir(study_dir, study.variant(variant), seed)
    cdir.mkdir(parents=True, exist_ok=True)
    with open(cdir / "log.txt", "a", buffering=1) as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return run_cell(study_dir, variant, seed)


def _summary(rec: dict[str, Any]) -> str:
    parts = [f"{label(k)} {v:.1f}" for k, v in rec.get("metrics", {}).items() if k.endswith(("/top1", "/miou", "/box_ap", "/mask_ap"))]
    return f"{', '.join(parts)} [{float(rec.get('cell_s', 0)) / 60:.1f} min]"


def default_threads(jobs: int) -> int:
    """Threads per cell: the cores divided among the parallel cells (1 with 2 cells on 2 cores)."""
    import os

    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def run_study(study_dir: str | Path, launch: Any = None, console: Any = None,
              runner: Callable[[str, str, int], dict[str, Any]] | None = None, jobs: int = 1,
              threads: int | None = None, report: bool = True) -> dict[str, Any]:
    """Run the pending cells here (``jobs`` at a time, ``threads`` torch threads each) or as a SLURM
    array (``launch`` with ``slurm`` set), then write the report.

    Returns ``{"ran": [...], "skipped": n, "failed": [...], "report": {...} | None, "jobs": [...]}``.
    A failing cell (other than a usage error) is reported and the others go on; rerun to retry.
    With ``jobs > 1`` every cell runs in a spawned worker process and logs to ``<cell>/log.txt``.
    """
    from rich.console import Console

    console = console or Console()
    study = load_study(study_dir)
    pending = pending_cells(study, study_dir)
    total = len(study.cells())
    skipped = total - len(pending)
    check_run_options(jobs, threads)
    if skipped:
        console.print(f"[dim]{skipped} of {total} cells already finished in {study_dir}; not rerun[/]")
    if launch is not None and getattr(launch, "slurm", False):
        import os

        from opera.launch.options import dispatch_array

        absolute = Path(os.path.abspath(Path(study_dir).expanduser()))
        jobs_out = []
        if pending:
            jobs_out = dispatch_array(runner or run_cell, [(str(absolute), v.name, s) for v, s in pending], launch,
                                      folder=absolute / "slurm" / "%j")
        if launch.wait or not pending:
                return {"ran": [], "skipped": skipped, "failed": [], "jobs": jobs_out,
                    "report": build_report(study_dir, console=console) if report else None}
        console.print(f"{len(pending)} cells submitted as a SLURM array (each resumes by itself when requeued); "
                      f"when they finish: opera report {study_dir} (rerunning this command submits only unfinished cells)")
        return {"ran": [], "skipped": skipped, "failed": [], "report": None, "jobs": jobs_out}
    nproc = int(getattr(launch, "nproc", 1) or 1) if launch is not None else 1
    if nproc > 1:
        jobs = 1  # every cell's pretraining already takes nproc processes
        base_runner = runner or run_cell
        runner = functools.partial(base_runner, nproc=nproc) if base_runner is run_cell else base_runner
    ran, failed = [], []
    if jobs > 1 and len(pending) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = threads or default_threads(jobs)
        console.print(f"running {len(pending)} cells, {jobs} at a time ({threads} thread(s) each); "
                      f"logs in <cell>/log.txt")
        ex = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,))
        try:
            futures = {ex.submit(runner or run_cell_logged, str(study_dir), v.name, s): (v, s) for v, s in pending}
            for n, fut in enumerate(as_completed(futures)):
                v, s = futures[fut]
                try:
                    rec = fut.result()
                    ran.append((v.name, s))
                    console.print(f"[green]cell {skipped + n + 1}/{total} done[/] {v.name} seed {s}: {_summary(rec)}")
                except OperaError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    failed.append((v.name, s, f"{type(exc).__name__}: {exc}"))
                    console.print(f"[bold red]cell {v.name} seed {s} failed:[/] {type(exc).__name__}: {exc} "
                                  f"(see {cell_dir(study_dir, v, s) / 'log.txt'})")
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
    else:
        if threads:
            _init_worker(threads)
        for i, (v, s) in enumerate(pending):
            console.rule(f"[bold]cell {skipped + i + 1}/{total}: {v.name} seed {s}")
            try:
                rec = (runner or run_cell)(str(study_dir), v.name, s)
                ran.append((v.name, s))
                if isinstance(rec, dict):
                    console.print(f"[green]done[/] {v.name} seed {s}: {_summary(rec)}")
            except (OperaError, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - one diverging cell must not lose the others
                failed.append((v.name, s, f"{type(exc).__name__}: {exc}"))
                console.print(f"[bold red]cell {v.name} seed {s} failed:[/] {type(exc).__name__}: {exc}")
                traceback.print_exc()
    result = None
    if report:
        result = build_report(study_dir, console=console)
    if failed:
        raise OperaError(f"{len(failed)} of {total} cells failed ({'; '.join(f'{n} seed {s}: {e}' for n, s, e in failed)[:500]}); "
                         f"the report covers the finished ones; rerun the same command to retry the rest")
    return {"ran": ran, "skipped": skipped, "failed": failed, "report": result, "jobs": []}
