"""A checkpoint whose pickle would run code is refused in one line that names that code, read from
the file itself; the code never runs. Intact opera checkpoints still load, and a torn one is still
called truncated or corrupt, not code."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opera.engine.checkpoint import LAST, CheckpointUnreadable, load_state, save_state


class System:
    """Unpickled in full, it runs ``touch MARKER`` through ``os.system`` (``posix.system``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Exec:
    """Unpickled in full, it runs Python source that creates MARKER (``builtins.exec``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


class Opens:
    """Unpickled in full, it creates MARKER with ``open(MARKER, 'w')`` (``io.open``)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def evil_state(payload) -> dict:
    """A training state with tensors and plain values, and one object whose unpickling runs code."""
    return {"global_step": 3, "model": {"backbone.w": torch.zeros(2)}, "config": {"seed": 0}, "payload": payload}


# (payload class, torch.save keywords, the global the message names): torch's own error names no global
# for posix.system (its module is blocked), and none at all for protocol 4 or the legacy format
CASES = {
    "os.system": (System, {}, "posix.system"),
    "exec": (Exec, {}, "builtins.exec"),
    "open": (Opens, {}, "io.open"),
    "protocol-4": (System, {"pickle_protocol": 4}, "posix.system"),
    "legacy-format": (System, {"_use_new_zipfile_serialization": False}, "posix.system"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch's, for the protocol-4 file
@pytest.mark.parametrize("case", list(CASES))
def test_pickled_code_is_named_from_the_file_and_never_runs(tmp_path, case):
    kind, save_kw, name = CASES[case]
    marker = tmp_path / "MARKER"
    bad = tmp_path / "evil.pt"
    torch.save(evil_state(kind(marker)), bad, **save_kw)
    with pytest.raises(CheckpointUnreadable) as e:
        load_state(bad)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {bad} holds pickled Python objects (code: {name}), not only tensors"), msg
    assert "did not run that code" in msg and "a source you trust" in msg and "re-save only its tensors" in msg
    assert "weights_only" not in msg and "safe_globals" not in msg and "\n" not in msg
    assert e.value.reason == f"it holds pickled code ({name}), not only tensors"  # what a run folder says of it
    assert not marker.exists()


def test_an_opera_training_state_still_loads(tmp_path):
    state = {"global_step": 7, "model": {"backbone.w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"lr": 0.5},
             "config": {"train": {"epochs": 2}}, "history": [1.5, 2.5], "name": "self,full", "scaler": None}
    save_state(state, tmp_path / LAST)
    for mmap in (False, True):
        loaded = load_state(tmp_path / LAST, mmap=mmap)
        assert loaded.keys() == state.keys() and torch.equal(loaded["model"]["backbone.w"], state["model"]["backbone.w"])
        assert {k: v for k, v in loaded.items() if k != "model"} == {k: v for k, v in state.items() if k != "model"}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_a_torn_checkpoint_is_truncated_or_corrupt_not_code(tmp_path, legacy):
    path = tmp_path / LAST
    torch.save({"global_step": 7, "model": {"backbone.w": torch.zeros(64)}}, path,
               _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a node that died mid-write leaves
    with pytest.raises(CheckpointUnreadable) as e:
        load_state(path)
    msg = str(e.value)
    assert msg.startswith(f"cannot load checkpoint {path}: it is ") and "corrupt" in msg and "pickled" not in msg, msg
    assert e.value.reason.startswith(("truncated or corrupt", "corrupt")) and "\n" not in msg


# ------------------------------------------------------------------------------- the CLI, as a process
def opera(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opera", *args], capture_output=True, text=True, timeout=600, env=env)


def only_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_knn_on_a_checkpoint_holding_code_is_one_line_and_runs_nothing(tmp_path, child):
    marker, bad = tmp_path / "MARKER", tmp_path / "evil.pt"
    torch.save(evil_state(System(marker)), bad)
    line = only_line(opera(child[1], "run", "knn", "--checkpoint", str(bad), "--output", str(tmp_path / "knn")))
    assert line.startswith(f"error: checkpoint {bad} holds pickled Python objects (code: posix.system)"), line
    assert "did not run that code" in line and "a source you trust" in line
    assert not marker.exists() and not (tmp_path / "knn" / "results.json").exists()


@pytest.mark.slow
def test_a_run_whose_last_holds_code_is_one_line_and_runs_nothing(tmp_path, child, tiny):
    opera_argv, env = child
    marker, run = tmp_path / "MARKER", tmp_path / "run"
    run.mkdir()
    torch.save(evil_state(Exec(marker)), run / LAST)
    resumed = only_line(opera(env, *tiny, "--output", str(run)))  # the run directory: no intact checkpoint
    assert resumed.startswith(f"error: no intact checkpoint in {run}: last.pt (it holds pickled code"), resumed
    named = only_line(opera(env, *tiny, "--output", str(tmp_path / "new"), "--resume", str(run / LAST)))
    assert named.startswith(f"error: checkpoint {run / LAST} holds pickled Python objects (code: builtins.exec)"), named
    assert "did not run that code" in named
    assert not marker.exists() and (run / LAST).is_file()
