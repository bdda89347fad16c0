"""A damaged run directory resumes from its newest intact checkpoint, and says what it skipped;
a checkpoint holding pickled code is refused without running it."""

from __future__ import annotations

import pytest
import collections

import torch

from opera.engine.checkpoint import LAST, PREV, load_state, save_state
from opera.errors import OperaError


def truncate(path, keep: int = 4096) -> None:
    """What a node that died mid-write (or a quota) leaves: the first bytes of the file."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def step_of(path) -> int:
    return int(load_state(path)["global_step"])


def test_rotation_keeps_the_previous_last(tmp_path):
    save_state({"global_step": 1, "w": torch.ones(3)}, tmp_path / LAST)
    save_state({"global_step": 2, "w": torch.full((3,), 2.0)}, tmp_path / LAST)
    assert step_of(tmp_path / LAST) == 2 and step_of(tmp_path / PREV) == 1
    save_state({"global_step": 3}, tmp_path / "epoch_0001.pt")  # only last.pt rotates
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["epoch_0001.pt", LAST, PREV])


@pytest.mark.slow
def test_the_finished_run_has_three_intact_checkpoints(finished_run):
    assert step_of(finished_run / LAST) == 9
    assert step_of(finished_run / PREV) == 8
    assert step_of(finished_run / "epoch_0001.pt") == 9


def test_truncated_last_falls_back_to_the_previous_one(run_copy, opera_main, tiny):
    truncate(run_copy / LAST)
    code, out, err = opera_main(*tiny, "--output", str(run_copy))
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("skipped")]
    assert len(notes) == 1, out
    assert "last.pt (truncated or corrupt" in notes[0] and "resuming from epoch_0001.pt" in notes[0]  # step 9 > step 8
    assert "weights_only" not in out
    assert (run_copy / "last.pt.unreadable").is_file()  # kept for inspection, out of the rotation
    assert not (run_copy / LAST).exists() and step_of(run_copy / "epoch_0001.pt") == 9  # finished: nothing retrained


def test_newest_intact_wins_over_older_previous(run_copy, opera_main, tiny):
    truncate(run_copy / LAST)
    (run_copy / "epoch_0001.pt").unlink()
    code, out, err = opera_main(*tiny, "--output", str(run_copy), "--epochs", "2", "--set", "train.max_steps=9")
    assert code == 0, err
    assert "resuming from last.prev.pt, the newest intact checkpoint (step 8)" in out
    assert step_of(run_copy / LAST) == 9  # it trained step 9 again, from step 8


def test_no_intact_checkpoint_is_one_line_naming_files_and_choices(run_copy, opera_main, tiny, one_line):
    for name in (LAST, PREV, "epoch_0001.pt"):
        truncate(run_copy / name, keep=0 if name == PREV else 100)
    before = {p.name: p.read_bytes() for p in run_copy.glob("*.pt")}
    code, out, err = opera_main(*tiny, "--output", str(run_copy))
    line = one_line(err)
    assert code == 2
    for needle in ("no intact checkpoint", "last.pt (", "last.prev.pt (", "epoch_0001.pt (", "--resume PATH", "--output"):
        assert needle in line, line
    assert {p.name: p.read_bytes() for p in run_copy.glob("*.pt")} == before  # nothing renamed or overwritten


class Gadget:  # stands for any pickled object: its class is code that a full unpickle would import and run
    pass


def test_pickled_object_checkpoint_is_refused_without_unsafe_advice(tmp_path, opera_main, tiny, one_line):
    bad = tmp_path / "evil.pt"
    torch.save({"model": collections.OrderedDict(), "gadget": Gadget()}, bad)
    try:
        load_state(bad)
    except OperaError as exc:
        msg = str(exc)
    else:
        raise AssertionError("a pickled object was loaded")
    assert "holds pickled Python objects (code: " in msg and "Gadget" in msg and "will not execute it" in msg
    assert "weights_only" not in msg and "False" not in msg and "safe_globals" not in msg
    code, _, err = opera_main(*tiny, "--output", str(tmp_path / "new"), "--resume", str(bad))
    line = one_line(err)
    assert code == 2 and "will not execute it" in line and "weights_only" not in line


def test_garbage_is_corrupt_not_code(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"garbage")
    try:
        load_state(bad)
    except OperaError as exc:
        assert "corrupt" in str(exc) and "pickled" not in str(exc)
    else:
        raise AssertionError("garbage was loaded")


def test_pickled_last_is_skipped_naming_why(run_copy, opera_main, tiny):
    torch.save({"model": {}, "gadget": Gadget()}, run_copy / LAST)
    code, out, err = opera_main(*tiny, "--output", str(run_copy))
    assert code == 0, err
    assert "skipped last.pt (it holds pickled code (" in out and "Gadget), not only tensors)" in out  # the global named
