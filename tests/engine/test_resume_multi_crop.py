"""Multi-crop resumes exactly: ``dino,full`` with 4 local crops, killed with SIGKILL at an
arbitrary step and rerun, ends bit-identical to a run never interrupted (deterministic CPU mode):
every local crop of a sample depends only on (seed, epoch, index), DINO's center is a buffer of
the checkpoint, and the teacher-temperature schedule is a function of the step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opera.engine.checkpoint import load_state
from tests.engine.test_resume import env, kill_midway

pytestmark = pytest.mark.slow

ARGS = ["--hierarchy", "dino,full", "--data", "digits:0-3", "--epochs", "2", "--batch-size", "32", "--seed", "4",
        "--set", "data.local_crops=4", "--set", "train.knn_every=0", "--set", "train.log_every=1",
        "--set", "train.save_every_steps=1", "--set", "train.deterministic=true", "--set", "train.save_every_epochs=0",
        "--set", "dino.dim=256", "--set", "dino.hidden_dim=64", "--set", "dino.bottleneck_dim=32"]


def opera_cmd(output: Path) -> list[str]:
    return [sys.executable, "-m", "opera", "run", "pretrain", *ARGS, "--output", str(output)]


def test_sigkill_then_resume_with_local_crops_is_bit_identical(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    r = subprocess.run(opera_cmd(clean), env=env(), timeout=600, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    state = load_state(clean / "last.pt")
    total = state["global_step"]
    assert total > 8
    rows = [json.loads(line) for line in (clean / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/dino" in row and "loss/full" in row for row in rows)

    stopped = kill_midway(opera_cmd(killed), killed, total)

    done = subprocess.run(opera_cmd(killed), env=env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step {stopped}" in done.stdout  # resumed, not restarted
    a, b = state["model"], load_state(killed / "last.pt")["model"]
    assert a.keys() == b.keys() and any("center" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
