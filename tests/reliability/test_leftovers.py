"""A writer killed mid-write (SIGKILL during a checkpoint write: a preemption, the OOM killer)
leaves its temporary file; the next run that owns the folder removes it and says so in one line,
and removes nothing else (docs/reliability.md, "Leftovers"). Real processes, a real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from opera.engine.checkpoint import LAST, load_state

#: a writer that dies inside atomic_write: 3 MB of last.pt written, then it waits to be killed
DIES_MID_WRITE = """
import sys, time
from pathlib import Path
from opera.files import atomic_write
def write(tmp):
    Path(tmp).write_bytes(b"x" * 3_000_000)
    print(tmp, flush=True)
    time.sleep(600)
atomic_write(Path(sys.argv[1]) / "last.pt", write)
"""


def killed_mid_write(folder) -> str:
    proc = subprocess.Popen([sys.executable, "-c", DIES_MID_WRITE, str(folder)], stdout=subprocess.PIPE, text=True)
    tmp = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert os.path.getsize(tmp) == 3_000_000  # the dead writer's partial file is there
    return os.path.basename(tmp)


@pytest.mark.slow
def test_the_next_run_removes_a_dead_writers_partial_checkpoint_and_says_so(run_copy, child):
    opera_argv, env = child
    partial = killed_mid_write(run_copy)
    mine = ["notes.tmp", ".my-data.tmp", ".last.pt.tmp"]  # not opera's temporary-file names: left alone
    for name in mine:
        (run_copy / name).write_text("keep me")
    step = int(load_state(run_copy / LAST)["global_step"])

    done = subprocess.run(opera_argv(run_copy, "--epochs", "2", "--set", f"train.max_steps={step + 1}"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if "partial file" in line]
    assert said == [f"{run_copy}: removed 1 partial file left by an interrupted write: {partial} (3.0 MB)"], done.stdout
    assert not (run_copy / partial).exists()
    assert all((run_copy / name).read_text() == "keep me" for name in mine)
    assert int(load_state(run_copy / LAST)["global_step"]) == step + 1


def test_a_run_refused_by_the_lock_removes_nothing(holder_process, child):
    run, holder = holder_process
    opera_argv, env = child
    partial = killed_mid_write(run)  # the holder could be the writer: not ours to remove
    done = subprocess.run(opera_argv(run), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and f"in use by pid {holder.pid}" in done.stderr, done.stderr
    assert (run / partial).stat().st_size == 3_000_000
    assert holder.poll() is None  # the holder still owns the folder
