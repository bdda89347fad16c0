"""An error in a DataLoader worker (a corrupt image) is the worker's own one line, as without workers.

torch re-raises a worker's exception in the main process with the worker's whole traceback as
its message (``Caught OperaError in DataLoader worker process 1. Original Traceback ...``);
opera's :class:`~opera.data.loader.Loader` raises the worker's own :class:`OperaError` instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opera.data import build_dataset
from opera.data.loader import Loader, build_loader
from opera.data.photos import make_photo_folder
from opera.engine.checkpoint import CheckpointUnreadable
from opera.errors import OperaError


def corrupt_folder(root: Path) -> tuple[str, Path]:
    """A class folder of 12 small JPEGs, one of the training split's overwritten with bytes that are no image."""
    folder = make_photo_folder(str(root / "photos"), n=12, classes=2, seed=0, short_side=(40, 60))
    bad = Path(build_dataset(folder, "train").samples[1])
    bad.write_bytes(bytes(range(256)) * 8)
    return folder, bad


class Raises(torch.utils.data.Dataset):
    """Item 3 raises ``error``; the others are their index."""

    def __init__(self, error: Exception):
        self.error = error

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        if i == 3:
            raise self.error
        return i


def first_error(loader) -> BaseException:
    with pytest.raises(Exception) as e:
        for _ in loader:
            pass
    return e.value


def test_a_corrupt_image_in_a_worker_is_the_same_one_line_as_without_workers(tmp_path):
    folder, bad = corrupt_folder(tmp_path)
    ds = build_dataset(folder, "train")
    alone = first_error(build_loader(ds, 4, workers=0, shuffle=False))
    workers = first_error(build_loader(ds, 4, workers=2, shuffle=False))
    assert type(alone) is OperaError and f"cannot decode image {bad}" in str(alone)
    assert type(workers) is OperaError and str(workers) == str(alone)
    assert "Caught" not in str(workers) and "Traceback" not in str(workers)
    raw = first_error(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2))  # what torch alone gives
    assert str(raw).startswith("Caught OperaError in DataLoader worker process") and str(alone) in str(raw)


def test_a_worker_error_of_a_subclass_that_torch_cannot_rebuild_is_its_own_line():
    # CheckpointUnreadable(message, reason): torch cannot rebuild it and raises a RuntimeError instead
    err = first_error(Loader(Raises(CheckpointUnreadable("checkpoint x.pt is torn; delete it", "torn")), num_workers=2))
    assert isinstance(err, OperaError) and str(err) == "checkpoint x.pt is torn; delete it"


def test_other_worker_errors_pass_unchanged():
    err = first_error(Loader(Raises(ZeroDivisionError("a bug")), num_workers=2))
    assert type(err) is ZeroDivisionError and str(err).startswith("Caught ZeroDivisionError in DataLoader worker process")


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opera", *args], capture_output=True, text=True, timeout=600, env=env)


def assert_names_the_file(proc: subprocess.CompletedProcess, bad: Path) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "Caught" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: cannot decode image {bad}: ") and lines[0].endswith("remove or replace it")


@pytest.mark.slow
def test_pretrain_with_workers_on_a_corrupt_image_is_one_line(tmp_path, child):
    folder, bad = corrupt_folder(tmp_path)
    proc = run_cli(child[1], "run", "pretrain", "--hierarchy", "self", "--data", folder, "--epochs", "1", "--batch-size", "3",
                   "--set", "data.workers=2", "--set", "backbone.img_size=16", "--set", "self.mlp_dim=16",
                   "--set", "self.dim=8", "--set", "train.knn_every=0", "--output", str(tmp_path / "run"))
    assert_names_the_file(proc, bad)


@pytest.mark.slow
def test_bench_data_with_workers_on_a_corrupt_image_is_one_line(tmp_path, child):
    folder, bad = corrupt_folder(tmp_path)
    proc = run_cli(child[1], "bench", "--data", folder, "--workers", "2", "--batch-size", "2", "--batches", "6", "--img-size", "16")
    assert_names_the_file(proc, bad)
