"""The data-pipeline benchmarks: ``opera bench --data`` (opera's pipeline alone) and
``benchmarks/data_pipeline.py`` (opera's vs the official PIL one) count images and seconds
correctly. Nothing here is timed: a fake clock stands in for ``time.perf_counter``."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import opera.bench as opera_bench
from opera.data import build_dataset
from opera.errors import OperaError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import data_pipeline  # noqa: E402
from official_transform import ClassicPILPretrainTransform  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("jpegs"))
    data_pipeline.make_jpeg_folder(folder, 4, (40, 30), classes=2)
    return folder


def test_the_official_pil_pipeline_gives_two_normalised_crops():
    pil = Image.fromarray(torch.randint(0, 256, (50, 60, 3), dtype=torch.uint8).numpy())
    v1, v2 = ClassicPILPretrainTransform(32)(pil)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32 and not torch.equal(v1, v2)
    with pytest.raises(OperaError, match="crop_min in"):
        ClassicPILPretrainTransform(32, crop_min=0.0)


def test_side_by_side_reports_images_per_second_of_each_pipeline(jpegs, monkeypatch):
    """A clock on which each PIL batch takes 1 s and each v2 batch 2 s: 4 images in 2 batches are
    2 img/s (PIL) and 1 img/s (v2), speedup 0.5."""
    assert len(build_dataset(jpegs, "train")) + len(build_dataset(jpegs, "val")) == 4
    # readings per batch: PIL start, PIL end (+1 s), v2 start, v2 end (+2 s)
    clock = itertools.accumulate(itertools.cycle([1.0, 0.0, 2.0, 0.0]), initial=0.0)
    monkeypatch.setattr(data_pipeline, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    r = data_pipeline.compare_pipelines(jpegs, img_size=24, batches=2, batch_size=2, workers=0)
    assert (r["pil_img_per_s"], r["v2_img_per_s"], r["speedup"], r["images"]) == (2.0, 1.0, 0.5, 4)


def test_the_device_half_is_timed_beside_the_two_per_image_pipelines(jpegs, monkeypatch):
    """Three pipelines alternate batch by batch; on a clock where PIL batches take 1 s, v2 2 s and
    the crop-only worker half 4 s: 2, 1 and 0.5 img/s. The crop half gives two uint8 crops and
    their parameter rows, the same for the same index."""
    clock = itertools.accumulate(itertools.cycle([1.0, 0.0, 2.0, 0.0, 4.0, 0.0]), initial=0.0)
    monkeypatch.setattr(data_pipeline, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    r = data_pipeline.compare_pipelines(jpegs, img_size=24, batches=2, batch_size=2, workers=0, device_half=True)
    assert (r["pil_img_per_s"], r["v2_img_per_s"], r["crop_img_per_s"], r["crop_speedup"]) == (2.0, 1.0, 0.5, 0.25)
    ds = data_pipeline.crop_files(opera_bench.image_files(jpegs), 24)
    crops, params = ds[1]
    assert crops.shape == (2, 3, 24, 24) and crops.dtype == torch.uint8 and params.shape[0] == 2
    again, same = ds[1]
    assert torch.equal(crops, again) and torch.equal(params, same)
    with pytest.raises(OperaError, match="--workers 0"):
        data_pipeline.compare_pipelines(jpegs, img_size=24, batches=1, batch_size=2, workers=1, device_half=True)


def test_opera_bench_data_times_opera_pipeline_alone(jpegs, monkeypatch):
    """6 images after the warm-up, read 3 s apart on the fake clock: 2 img/s; the files are
    augmented by opera's own two-crop transform."""
    clock = iter([10.0, 13.0])
    monkeypatch.setattr(opera_bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    r = opera_bench.bench_pipeline(jpegs, img_size=24, batches=3, batch_size=2, workers=0)
    assert r == {"data_pipeline": "opera", "img_per_s": 2.0, "images": 6, "img_size": 24, "workers": 0}
    v1, v2 = opera_bench.TwoCropFiles(opera_bench.image_files(jpegs), 24)[0]
    assert v1.shape == v2.shape == (3, 24, 24)


@pytest.mark.slow
def test_opera_bench_data_from_the_command_line(jpegs, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "opera", "bench", "--data", jpegs, "--img-size", "24", "--batches", "1",
                           "--batch-size", "2"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data pipeline (opera, decode + two crops): 2 images at 24px, 0 workers" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "opera", "bench", "--data", str(tmp_path)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "no images in" in proc.stderr and "Traceback" not in proc.stderr
