"""Resuming the evaluations that train (linear probe, fine-tuning), the way pretraining resumes.

Rank 0 writes ``OUTPUT/last.pt`` with :func:`~opera.engine.checkpoint.save_state` (atomic, the
previous one kept as ``last.prev.pt``); a rerun of the same command, or a requeued SLURM job,
finds the newest intact one with :func:`~opera.engine.rundir.find_checkpoint` (loaded with
``weights_only=True``) and continues from its epoch and step. A checkpoint of another setup
(another backbone file, other protocol options) is refused in one line rather than mixed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opera.engine.rundir import find_checkpoint
from opera.errors import OperaError

#: options that may differ between the run that saved and the one that resumes
VOLATILE = ("output", "device", "workers", "tensorboard", "checkpoint")


def eval_identity(protocol: str, cfg: Any, loaded: Any, train: Any = None) -> dict[str, Any]:
    """What a resumed run must share with the one that saved: the protocol, the backbone
    (its file's sha256, or the random:/timm: source), every option but :data:`VOLATILE`, and
    the training images (``train``: their :func:`~opera.data.labels.data_identity`)."""
    from opera.data.labels import data_identity
    from opera.evals.common import config_dict

    options = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config_dict(cfg).items() if k not in VOLATILE}
    want = {"protocol": protocol, "backbone": loaded.sha256 or loaded.source, "options": options}
    if train is not None:
        want["data"] = data_identity(train)
    return want


def load_eval_state(output: str | Path, main: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """(path, state) of the newest intact checkpoint in ``output``; (None, None) for a fresh run."""
    path, state, note = find_checkpoint(Path(output), rename_unreadable=main)
    if note and main:
        print(note, flush=True)
    return path, state


def check_same_run(state: dict[str, Any], want: dict[str, Any], path: Path) -> None:
    have = state.get("identity") or {}
    diffs = []
    for key in ("protocol", "backbone"):
        if have.get(key) != want[key]:
            diffs.append(f"{key} {have.get(key)!r} (this run: {want[key]!r})")
    old, new = have.get("options") or {}, want["options"]
    diffs += [f"{k} {old.get(k)!r} (this run: {new.get(k)!r})" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs:
        raise OperaError(f"{path} was written by another evaluation: {'; '.join(diffs[:4])}; rerun with the original "
                         "options to resume it, or choose a new --output")
    if "data" in want:
        from opera.data.labels import check_same_data

        check_same_data(have.get("data"), want["data"], path, what="--data")
