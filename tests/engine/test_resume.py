"""Never lose work: a run killed with SIGKILL at an arbitrary step and resumed ends with the same
weights as a run never interrupted (deterministic CPU mode, 1e-6)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opera.engine.checkpoint import load_state, read_backbone_file

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

ARGS = ["--hierarchy", "self,full", "--data", "digits:0-3", "--epochs", "2", "--batch-size", "32", "--seed", "3",
        "--set", "train.knn_every=0", "--set", "self.mlp_dim=64", "--set", "self.dim=32", "--set", "train.log_every=1",
        "--set", "train.save_every_steps=1", "--set", "train.deterministic=true", "--set", "train.save_every_epochs=1"]


def opera_cmd(output: Path) -> list[str]:
    return [sys.executable, "-m", "opera", "run", "pretrain", *ARGS, "--output", str(output)]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


def logged_steps(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def kill_midway(cmd: list[str], output: Path, total: int) -> int:
    """Start ``cmd``, SIGKILL it once it has logged past half of its ``total`` steps (mid second
    epoch or late first: an arbitrary step, not an epoch end); the step its ``last.pt`` holds."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while logged_steps(output) < total // 2 + 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = load_state(output / "last.pt")["global_step"]
    assert 0 < stopped < total, f"kill came too late or too early (checkpoint at step {stopped} of {total})"
    return stopped


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(opera_cmd(clean), check=True, env=env(), timeout=600, capture_output=True)
    total = load_state(clean / "last.pt")["global_step"]
    assert total > 8

    stopped = kill_midway(opera_cmd(killed), killed, total)

    done = subprocess.run(opera_cmd(killed), env=env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "at epoch" in done.stdout and f"step {stopped}" in done.stdout  # resumed, not restarted

    a, _ = read_backbone_file(clean / "backbone.safetensors")
    b, _ = read_backbone_file(killed / "backbone.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    full_a = load_state(clean / "last.pt")["model"]
    full_b = load_state(killed / "last.pt")["model"]
    for k in full_a:
        torch.testing.assert_close(full_a[k], full_b[k], rtol=0, atol=1e-6, msg=k)
    rows = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert rows == sorted(rows) and len(rows) == len(set(rows))  # metrics trimmed, no duplicated steps
