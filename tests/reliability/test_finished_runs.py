"""A rerun of a finished run says it is finished and writes nothing; a resume whose new length ends
before the checkpoint's step is refused in one line (docs/reliability.md, "Finished runs")."""

from __future__ import annotations

from pathlib import Path

import pytest

from opera.engine.checkpoint import LAST, load_state


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: (size, modification time in ns)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_finished_run_rerun_says_so_and_writes_nothing(run_copy, opera_main, tiny):
    before = snapshot(run_copy)
    code, out, err = opera_main(*tiny, "--output", str(run_copy))
    assert code == 0, err
    assert f"{run_copy} is a finished 1-epoch run (step 9); to train again choose a new --output, or pass " \
           "--epochs N > 1 to extend it" in out
    assert "resuming" not in out and "done" not in out and "Traceback" not in err
    assert snapshot(run_copy) == before  # not one file written or touched


@pytest.mark.slow
def test_a_resume_shorter_than_the_checkpoint_is_refused_and_max_steps_end_is_finished(run_copy, opera_main, tiny,
                                                                                        one_line):
    code, out, err = opera_main(*tiny, "--output", str(run_copy), "--epochs", "2", "--set", "train.max_steps=12")
    assert code == 0, err
    assert int(load_state(run_copy / LAST)["global_step"]) == 12  # in epoch 2
    before = snapshot(run_copy)

    code, out, err = opera_main(*tiny, "--output", str(run_copy), "--set", "train.max_steps=12")  # --epochs 1
    line = one_line(err)
    assert code == 2
    assert f"--epochs 1 ends at step 9, before step 12 where {run_copy / LAST} already is; pass --epochs 2 or more" \
           in line, line

    code, out, err = opera_main(*tiny, "--output", str(run_copy), "--epochs", "2", "--set", "train.max_steps=12")
    assert code == 0, err
    assert f"{run_copy} is a finished run: it stopped at max_steps=12 (step 12)" in out
    assert snapshot(run_copy) == before

    code, out, err = opera_main(*tiny, "--output", str(run_copy), "--epochs", "2", "--set", "train.max_steps=11")
    assert code == 2 and "max_steps=11 ends before step 12" in one_line(err)
