"""The records of an ablation study on disk, shared by the runner (:mod:`opera.ablate.study`) and
the report (:mod:`opera.ablate.report`): what a study is (:class:`Study`, :class:`Variant`), where
its cells live and how their finished records are read.

    OUT/study.json                          Study.to_dict(): command, base config, variants, seeds, evals
    OUT/cells/<variant>/seed<k>/cell.json   a finished cell's record (written atomically)

A leaf module: it imports nothing else of :mod:`opera.ablate`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opera.errors import OperaError, suggest

STUDY_FILE = "study.json"
CELL_FILE = "cell.json"
CELLS = "cells"
DENSE_EVALS = ("segmentation", "detection")
RUN_PLACE = (("train", "device"), ("data", "workers"))  # may differ between the runs of one study


@dataclass
class Variant:
    """One row of the study: a name and the ``key=value`` overrides it applies to the base config."""

    name: str
    overrides: list[str]
    note: str = ""

    @property
    def dirname(self) -> str:
        return safe_name(self.name)


def safe_name(name: str) -> str:
    """A folder name for a variant label (``full.layers=2 self.dim=128`` -> ``full.layers=2_self.dim=128``)."""
    s = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name.strip()).strip("_")
    return s or "variant"


@dataclass
class Study:
    kind: str  # arrangements | hierarchy | sweep
    command: str  # the exact command line that created the study
    variants: list[Variant]
    seeds: list[int]
    evals: list[str]  # linear, knn
    base: dict[str, Any]  # config_to_dict of the base pretraining config
    transfer: str | None = None  # held-out data spec for the transfer evaluations
    eval_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # {"linear": {...}, "knn": {...}}
    config_source: str = ""
    overrides: list[str] = field(default_factory=list)
    created_at: str = ""
    invocations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def data(self) -> str:
        return str(self.base.get("data", {}).get("spec", "digits"))

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name or v.dirname == name:
                return v
        raise OperaError(f"variant {name!r} is not in this study{suggest(name, [v.name for v in self.variants])}; "
                         f"its variants: {', '.join(v.name for v in self.variants)}")

    def eval_plan(self) -> list[tuple[str, str, str]]:
        """``(name, protocol, data)`` of every evaluation of a cell, in order (dense ones once,
        on :func:`dense_data`)."""
        plan = [(e, e, self.data) for e in self.evals if e not in DENSE_EVALS]
        if self.transfer:
            plan += [(f"transfer_{e}", e, self.transfer) for e in self.evals if e not in DENSE_EVALS]
        return plan + [(e, e, dense_data(self.data, self.transfer)) for e in self.evals if e in DENSE_EVALS]

    def cells(self) -> list[tuple[Variant, int]]:
        """Every (variant, seed), seed-major: one seed of every variant finishes first."""
        return [(v, s) for s in self.seeds for v in self.variants]

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun into the same directory to resume this study (where it
        runs - ``train.device``, ``data.workers`` - may change)."""
        base = json_roundtrip(self.base)
        for sec, key in RUN_PLACE:
            base.get(sec, {}).pop(key, None)
        return {"kind": self.kind, "variants": [dataclasses.asdict(v) for v in self.variants], "evals": self.evals,
                "base": base, "transfer": self.transfer, "eval_options": self.eval_options}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Study":
        data = dict(data)
        data["variants"] = [Variant(**v) for v in data.get("variants", [])]
        # a study written before a key was renamed (data.unlabeled -> data.unlabelled) reads with the new names
        from opera.configs.core import rename_keys, rename_override

        if isinstance(data.get("base"), dict):
            data["base"] = rename_keys(data["base"])
        for v in data["variants"]:
            v.overrides = [rename_override(o) for o in v.overrides]
        if isinstance(data.get("overrides"), list):
            data["overrides"] = [rename_override(o) for o in data["overrides"]]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def cell_dir(study_dir: str | Path, variant: Variant | str, seed: int) -> Path:
    name = variant.dirname if isinstance(variant, Variant) else safe_name(variant)
    return Path(study_dir) / CELLS / name / f"seed{seed}"


def json_roundtrip(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def write_json(path: Path, data: dict[str, Any]) -> None:
    from opera.files import atomic_write

    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def load_study(study_dir: str | Path) -> Study:
    path = Path(study_dir) / STUDY_FILE
    if not path.is_file():
        raise OperaError(f"{study_dir} is not an ablation study (no {STUDY_FILE}); pass the --output of an 'opera ablate' run")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OperaError(f"cannot read {path}: {exc}; the study file is damaged, rerun the ablation into a new --output") from None
    return Study.from_dict(data)


def read_cell(path: Path) -> dict[str, Any] | None:
    """The ``cell.json`` of a finished cell (None when absent or unreadable)."""
    try:
        return json.loads((path / CELL_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def dense_data(data: str, transfer: str | None) -> str:
    """The digit scenes of the transfer classes (``digits:7-9`` -> ``digit_scenes:7-9``), else of
    the pretraining classes; a study on other data has no dense evaluation here."""
    from opera.data import parse_data_spec
    from opera.data.specs import format_classes

    for spec in (transfer, data):
        if spec and parse_data_spec(spec).name == "digits":
            classes = parse_data_spec(spec).classes
            return f"digit_scenes:{format_classes(classes)}" if classes else "digit_scenes"
    raise OperaError(f"dense evaluations in a study run on the digit scenes and need digits data, got --data {data!r}; "
                     "drop segmentation/detection from --evals or run opera run transfer --suite segmentation --root ... per checkpoint")
