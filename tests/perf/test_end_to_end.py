"""``opera bench --end-to-end`` and the official pipeline's baseline run their code paths on a tiny
folder, report consistent figures, and are compared by one script. Nothing here is timed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opera.data.photos import make_photo_folder

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--backbone", "resnet_tiny", "--img-size", "32", "--batch-size", "4", "--mlp-dim", "32", "--steps", "2",
        "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_photo_folder(str(tmp_path_factory.mktemp("jpegs")), n=20, classes=2)


def _json(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("augment_on,workers", [("device", 1), ("workers", 0)])
def test_end_to_end_bench_reports_real_steps(folder, augment_on, workers):
    r = _json([sys.executable, "-m", "opera", "bench", "--end-to-end", "--data", folder, "--augment-on", augment_on,
               "--workers", str(workers), "--no-roofline", "--json", *TINY])
    assert r["pipeline"] == "opera" and r["augment_on"] == augment_on and r["workers"] == workers
    assert r["images"] == 16 and r["num_classes"] == 2 and r["steps"] == 2  # the train split of 20 images
    assert r["img_per_s"] > 0 and 0 <= r["data_wait_share"] < 1 and r["s_per_step_compute"] <= r["s_per_step"]
    assert r["peak_rss_mb"] >= r["peak_pss_mb"] > 50 and r["loss"] == r["loss"]  # finite (not NaN)
    # a line per process: where the memory is, summing to the totals
    procs = r["processes"]
    assert [p["role"] for p in procs] == ["main"] + ["worker"] * workers
    assert len({p["pid"] for p in procs}) == len(procs) and all(p["vmhwm_mb"] > 0 and p["pss_mb"] > 0 for p in procs)
    assert sum(p["vmhwm_mb"] for p in procs) == pytest.approx(r["peak_rss_mb"], abs=1e-6)
    assert sum(p["pss_mb"] for p in procs) == pytest.approx(r["peak_pss_mb"], abs=1e-6)


@pytest.mark.slow
def test_official_pipeline_and_the_side_by_side_script(folder):
    r = _json([sys.executable, str(ROOT / "benchmarks" / "official_pipeline.py"), "--data", folder, "--workers", "1", *TINY])
    assert r["pipeline"] == "official" and r["images"] == 20 and r["img_per_s"] > 0 and r["peak_rss_mb"] > 50
    assert [p["role"] for p in r["processes"]] == ["main", "worker"]  # measured the same way as opera's
    assert sum(p["vmhwm_mb"] for p in r["processes"]) == pytest.approx(r["peak_rss_mb"], abs=1e-6)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "e2e_compare.py"), "--data", folder, "--sizes", "32",
                           "--steps", "1", "--warmup", "1", "--repeats", "1", "--backbone", "resnet_tiny", "--batch-size",
                           "4", "--mlp-dim", "32", "--workers", "0", "--threads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| 32 |")]
    assert len(lines) == 2 and "official" in lines[0] and lines[0].endswith("1.00x |") and "augment on device" in lines[1]


def test_end_to_end_without_data_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "opera", "bench", "--end-to-end"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--end-to-end needs --data" in proc.stderr
