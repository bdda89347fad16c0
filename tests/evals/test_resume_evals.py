"""Linear probe and fine-tuning resume like pretraining: SIGKILL mid-run, rerun the same
command, and the final weights equal those of an uninterrupted run.

Each run is the real CLI in a subprocess with one thread (so that both runs do the same float
operations); the killed one is stopped as soon as its ``last.pt`` holds a step inside the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

DEADLINE_S = 180


def opera(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "opera", "run", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def saved_step(out: Path) -> int:
    try:
        return int(torch.load(out / "last.pt", weights_only=True, map_location="cpu")["global_step"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def finish(proc: subprocess.Popen) -> str:
    text, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, text[-3000:]
    return text


def kill_after(proc: subprocess.Popen, out: Path, step: int, total: int) -> int:
    deadline = time.monotonic() + DEADLINE_S
    while saved_step(out) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    at = saved_step(out)
    assert step <= at < total, f"the run was not killed inside (saved step {at} of {total})"
    return at


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "last.pt", weights_only=True, map_location="cpu")["model"]


@pytest.mark.parametrize("protocol,args,total", [
    ("finetune", ["--recipe", "digits", "--epochs", "3", "--batch-size", "64", "--save-every-steps", "2"], 27),
    ("linear", ["--epochs", "4", "--batch-size", "64", "--augment", "--grid", "--grid-lrs", "1,10"], 4 * 8),
])
def test_sigkill_then_rerun_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, protocol, args, total):
    common = [protocol, "--checkpoint", "random:resnet_tiny", "--data", "digits:0-3", "--device", "cpu", *args]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    reference = opera([*common, "-o", str(whole)])
    finish(reference)
    killed_at = kill_after(opera([*common, "-o", str(cut)]), cut, 4, total)
    text = finish(opera([*common, "-o", str(cut)]))
    print(f"\n{protocol}: killed with last.pt at step {killed_at} of {total}; the rerun resumed and finished")
    assert "resuming from" in text and str(cut / "last.pt") in text
    assert saved_step(cut) == saved_step(whole) == total
    a, b = weights(whole), weights(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
