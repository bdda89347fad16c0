"""Exact resume under per-sample seeding in both augmentation modes: a run killed with SIGKILL
mid-run and resumed ends with the weights of a run never interrupted (deterministic CPU mode,
1e-6) - with ``data.augment_on=device`` (digits on the device, and a JPEG folder decoded and
cropped in a worker) and with ``data.augment_on=workers``."""

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

from opera.data.photos import make_photo_folder
from opera.engine.checkpoint import load_state

BASE = ["--hierarchy", "self,full", "--epochs", "2", "--seed", "3", "--set", "train.knn_every=0",
        "--set", "self.mlp_dim=32", "--set", "self.dim=16", "--set", "full.hidden=32", "--set", "train.log_every=1",
        "--set", "train.save_every_steps=1", "--set", "train.deterministic=true", "--set", "train.save_every_epochs=0"]


def _cmd(output: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "opera", "run", "pretrain", *BASE, *extra, "--output", str(output)]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _logged(output: Path) -> int:
    path = output / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip().endswith("}")),
               default=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["device-digits", "device-folder", "workers-digits"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, case):
    mode, data = case.split("-")
    extra = ["--set", f"data.augment_on={mode}", "--batch-size", "16"]
    if data == "folder":
        folder = make_photo_folder(str(tmp_path / "jpegs"), n=60, classes=2)
        extra += ["--data", folder, "--set", "data.workers=1", "--set", "backbone.img_size=24"]
    else:
        extra += ["--data", "digits:0-2", "--set", "backbone.img_size=16"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_cmd(clean, extra), check=True, env=_env(), timeout=600, capture_output=True)
    total = load_state(clean / "last.pt")["global_step"]
    assert total >= 6
    proc = subprocess.Popen(_cmd(killed, extra), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _logged(killed) < total // 2 + 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = load_state(killed / "last.pt")["global_step"]
    assert 0 < stopped < total, f"kill came too late or too early (step {stopped} of {total})"
    done = subprocess.run(_cmd(killed, extra), env=_env(), timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"step {stopped}" in done.stdout  # resumed, not restarted
    a, b = load_state(clean / "last.pt")["model"], load_state(killed / "last.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
