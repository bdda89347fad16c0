"""``benchmarks/gpu.sh`` can only be timed on a GPU, and device time is scarce: its Python
(``benchmarks/gpu_bench.py``) is run here on the CPU with tiny models, so a GPU session never
spends its minutes on a broken script. Nothing here is timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_bench.py"), "--device", "cpu", "--models", "resnet_tiny,vit_tiny",
           "--img-size", "32", "--batch-size", "4", "--mlp-dim", "32", "--num-classes", "5", "--steps", "1", "--warmup", "1",
           "--peak-tflops", "2.0", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert "| model | batch/view |" in proc.stdout
    return rows


@pytest.mark.slow
def test_gpu_benchmark_script_runs_its_code_paths_on_the_cpu():
    per_view = _run()
    joint = _run("--joint-views")
    assert [r["model"] for r in per_view] == ["resnet_tiny", "vit_tiny"]
    for r, j in zip(per_view, joint):
        assert r["per_view"] is True and j["per_view"] is False
        assert r["optimizer"] == ("lars" if r["model"] == "resnet_tiny" else "adamw")
        assert r["tflop_per_step"] > 0
        assert r["tflop_per_step"] == pytest.approx(j["tflop_per_step"], rel=1e-12)  # same arithmetic either way
        assert r["achieved_tflops"] == pytest.approx(r["tflop_per_step"] * 1e3 / r["ms_per_step"])
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 2.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_sh_without_a_gpu_says_so_in_one_line():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 3
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr


@pytest.mark.slow
def test_gpu_end_to_end_script_runs_its_code_paths_on_the_cpu():
    """``benchmarks/gpu_e2e.py`` (the second half of gpu.sh): makes its JPEG folder, runs both
    augmentation modes for both models through the training loop's feed; nothing is timed."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_e2e.py"), "--device", "cpu", "--models", "resnet_tiny,vit_tiny",
           "--img-size", "32", "--batch-size", "4", "--mlp-dim", "32", "--steps", "1", "--warmup", "1", "--n", "12",
           "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["backbone"], r["augment_on"]) for r in rows] == [
        ("resnet_tiny", "device"), ("resnet_tiny", "workers"), ("vit_tiny", "device"), ("vit_tiny", "workers")]
    for r in rows:
        assert r["amp"] == "bf16" and r["img_size"] == 32 and r["in_memory"] is False and r["images"] < 12
        assert r["img_per_s"] > 0 and 0 <= r["data_wait_share"] <= 1 and r["peak_rss_mb"] > 0
    assert rows[0]["channels_last"] is True and rows[2]["channels_last"] is False
    assert "| model | augment on |" in proc.stdout
