"""What the instance spaces' tests share: a short CLI pretraining run, and a gloo process group."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def train_cli(tmp_path: Path, spec: str, *sets: str, steps: int = 3) -> list[dict]:
    """``opera run pretrain --hierarchy SPEC`` for ``steps`` steps on digits 0-4 (batch 64, a row
    per step), with ``--set`` overrides ``sets`` (the space's widths); the metrics.jsonl rows."""
    out = tmp_path / spec.replace(",", "_")
    cmd = [sys.executable, "-m", "opera", "run", "pretrain", "--hierarchy", spec, "--epochs", "1", "--output", str(out),
           "--set", f"train.max_steps={steps}", "--set", "train.knn_every=0", "--set", "data.spec=digits:0-4",
           "--set", "train.batch_size=64", "--set", "train.log_every=1"]
    for item in sets:
        cmd += ["--set", item]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@contextlib.contextmanager
def gloo_group(rank: int, port: int, world: int = 2, timeout_s: float = 90):
    """This process as rank ``rank`` of a ``world``-process gloo group on 127.0.0.1:``port``, one
    thread each (spawned by ``tests.hierarchy.test_distributed.run_two_ranks``)."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()
