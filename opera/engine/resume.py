"""What a run resumes from, and whether it may (docs/reliability.md).

* :func:`find_checkpoint` - the newest intact checkpoint of a directory: ``last.pt``, else the
  newest readable of ``last.prev.pt`` and ``epoch_NNNN.pt``, with one line naming what was skipped.
* :func:`check_identity` - a checkpoint is resumed only by the setup that wrote it (the protocol,
  the backbone, the options that shape training, the training data); one line names each change.
* :func:`check_config_drift` - a resumed pretraining run must have the configuration it was started
  with, except for the keys in :data:`RESUMABLE_CHANGES` (each change said in one line).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from opera.configs.core import rename_keys
from opera.engine.checkpoint import LAST, PREV, load_state
from opera.errors import OperaError

#: Keys that may differ between a checkpoint's configuration and the run resuming it, and why.
RESUMABLE_CHANGES: dict[str, str] = {
    "train.epochs": "the run is extended or shortened; the lr and EMA schedules now end at the new epoch count",
    "train.max_steps": "only where the run stops",
    "train.log_every": "logging cadence only",
    "train.save_every_steps": "checkpoint cadence only",
    "train.save_every_epochs": "checkpoint cadence only",
    "train.keep_epoch_checkpoints": "which epoch checkpoints stay on disk only",
    "train.keep_last_prev": "which checkpoints stay on disk only",
    "train.knn_every": "monitoring cadence only",
    "train.loggers": "which loggers receive the metrics only (a tracker added on resume is backfilled from metrics.jsonl)",
    "train.tracker_project": "the names of tracker runs not yet made only (a kept tracker run keeps its own)",
    "train.tracker_group": "the names of tracker runs not yet made only (a kept tracker run keeps its own)",
    "train.tracker_name": "the names of tracker runs not yet made only (a kept tracker run keeps its own)",
    "train.wandb_mode": "where W&B sends the metrics only",
    "train.wandb_entity": "the names of tracker runs not yet made only (a kept tracker run keeps its own)",
    "train.mlflow_uri": "the store of MLflow runs not yet made only (a kept run stays in the store trackers.json names)",
    "train.knn_k": "the kNN monitor only, not the training",
    "train.knn_bank_per_class": "the kNN monitor only, not the training",
    "train.rank_every": "monitoring cadence only",
    "train.rank_images": "the collapse monitor only, not the training",
    "train.rank_max_dim": "the collapse monitor only, not the training",
    "data.workers": "data loading speed only (augmentations depend on seed, epoch and index)",
    "train.compile": "speed only",
}


# ------------------------------------------------------------------------------------ config drift
def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_drift(old: dict[str, Any], new: dict[str, Any], ignore_sections: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(refused, allowed) changes between two resolved configurations, each ``key old -> new``.

    The ``resolved`` block (derived values such as the world size) and ``ignore_sections`` (options
    of task spaces the hierarchy does not use) are not compared.
    """
    skip = {"resolved", *ignore_sections}
    a = flatten({k: v for k, v in old.items() if k not in skip})
    b = flatten({k: v for k, v in new.items() if k not in skip})
    refused, allowed = [], []
    for key in sorted(set(a) | set(b)):
        if _norm(a.get(key)) == _norm(b.get(key)):
            continue
        show = lambda tree, key=key: repr(tree[key]) if key in tree else "(unset)"  # noqa: E731
        change = f"{key} {show(a)} -> {show(b)}"
        (allowed if key in RESUMABLE_CHANGES else refused).append(change)
    return refused, allowed


def _drop(tree: dict[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """A copy of ``tree`` without the dotted ``keys``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    for key in keys:
        head, _, rest = key.partition(".")
        if rest and isinstance(out.get(head), dict):
            out[head] = _drop(out[head], [rest])
        else:
            out.pop(head, None)
    return out


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_config_drift(old: dict[str, Any] | None, new: dict[str, Any], source: Path,
                       ignore_sections: Iterable[str] = (), defaults: dict[str, Any] | None = None) -> list[str]:
    """Refuse (one line, every changed key) to resume ``source`` with another configuration;
    return the allowed changes as lines to print.

    A key that ``old`` lacks (the checkpoint predates the option) is no change while the new value
    is the option's default in ``defaults`` (the behaviour the older code had). A key ``old`` has
    under its name before a rename (``data.unlabeled``) is compared as the new key.
    """
    if not old:
        return []
    old = rename_keys(old)
    if defaults:
        have, dflt = flatten(old), flatten(defaults)
        new = _drop(new, [k for k, v in flatten(new).items() if k not in have and k in dflt and _norm(dflt[k]) == _norm(v)])
    refused, allowed = config_drift(old, new, ignore_sections)
    if refused:
        raise OperaError(
            f"{source} was trained with other settings: {', '.join(refused)}; rerun with the original values, or "
            f"choose a new --output to start a new run (keys that may change on resume: {', '.join(RESUMABLE_CHANGES)})")
    return [f"resuming with {change} ({RESUMABLE_CHANGES[change.split(' ', 1)[0]]})" for change in allowed]


# ------------------------------------------------------------------------------ finding a checkpoint
def _epoch_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("epoch_[0-9]*.pt"), reverse=True)


def find_checkpoint(folder: Path, rename_unreadable: bool = True) -> tuple[Path | None, dict[str, Any] | None, str | None]:
    """The newest intact checkpoint of run directory ``folder``: (path, state, note).

    ``last.pt`` if it loads; otherwise the readable one of ``last.prev.pt`` and ``epoch_NNNN.pt``
    with the highest ``global_step``, and ``note`` names what was skipped and why (the unreadable
    files are renamed ``NAME.unreadable`` so that the next rotation does not keep them, unless
    ``rename_unreadable`` is false: ranks other than 0 only read). (None,
    None, None) when the directory holds no checkpoint; a one-line error when none is intact.
    """
    candidates = [p for p in (folder / LAST, folder / PREV, *_epoch_files(folder)) if p.is_file()]
    if not candidates:
        return None, None, None
    skipped: list[tuple[Path, str]] = []
    best: tuple[int, Path] | None = None
    for path in candidates:
        try:
            state = load_state(path, mmap=path.name != LAST)  # the others: only their step, tensors mapped
        except OperaError as exc:  # unreadable, or renamed aside by rank 0 meanwhile
            skipped.append((path, getattr(exc, "reason", "it vanished while being read")))
            continue
        if path.name == LAST:
            return path, state, None
        step = int(state.get("global_step", -1))
        if best is None or step > best[0]:
            best = (step, path)
        del state
    why = "; ".join(f"{p.name} ({reason})" for p, reason in skipped)
    if best is None:
        raise OperaError(f"no intact checkpoint in {folder}: {why}; pass --resume PATH to a good checkpoint, or "
                         "choose a new --output to start over")
    for path, _ in skipped if rename_unreadable else ():
        if path.is_file():
            os.replace(path, path.with_name(path.name + ".unreadable"))
    kept = f" (kept as {', '.join(p.name + '.unreadable' for p, _ in skipped)})" if rename_unreadable else ""
    gone = f"skipped {why}{kept}" if skipped else f"no {LAST}"
    note = f"{gone}; resuming from {best[1].name}, the newest intact checkpoint (step {best[0]})"
    return best[1], load_state(best[1]), note


# ------------------------------------------------------------------------------ the run's identity
def _identity_diffs(have: dict[str, Any], want: dict[str, Any], newer: Iterable[str]) -> list[str]:
    """Every ``key old (this run: new)`` where the checkpoint's identity ``have`` differs from
    ``want``; a nested mapping (an evaluation's ``options``) is compared key by key; keys in
    ``newer`` are not compared when the checkpoint predates them."""
    diffs = []
    for key, value in want.items():
        if key == "data" or (key in newer and key not in have):
            continue
        old = have.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and key == "options":
            diffs += [f"{k} {old.get(k)!r} (this run: {value.get(k)!r})" for k in sorted(set(old) | set(value))
                      if old.get(k) != value.get(k)]
        elif old != value:
            diffs.append(f"{key} {old!r} (this run: {value!r})")
    return diffs


def check_identity(state: dict[str, Any], want: dict[str, Any], path: Path, what: str = "run",
                   newer: Iterable[str] = (), data_flags: str = "--data") -> None:
    """Refuse in one line to resume ``path`` unless its ``identity`` is ``want``: every key of
    ``want`` (the protocol, the backbone, the options that shape training, the training data's
    :func:`~opera.data.labels.data_identity` under ``data``) must be the same; ``data_flags``
    names the options that chose the training data, for the fix."""
    have = state.get("identity") or {}
    diffs = _identity_diffs(have, want, newer)
    if diffs:
        raise OperaError(f"{path} was written by another {what}: {'; '.join(diffs[:4])}; rerun with the original "
                         "options to resume it, or choose a new --output")
    if "data" in want:
        from opera.data.labels import check_same_data

        check_same_data(have.get("data"), want["data"], path, what=data_flags)


__all__ = ["RESUMABLE_CHANGES", "check_config_drift", "check_identity", "config_drift", "find_checkpoint", "flatten"]
