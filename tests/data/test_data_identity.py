"""A run resumes only on the training data it began on: images added to (or removed from) the
``--unlabelled`` folder or the data folder between a stop and the rerun would silently change the
sampler's order and the steps per epoch from the resumed step on; the rerun refuses in one line.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from opera.configs.schema import DataConfig
from opera.data.labels import check_same_data, data_identity, pretrain_data
from opera.errors import OperaError


def write_images(folder: Path, n: int, seed: int = 0, start: int = 0) -> None:
    from torchvision.io import write_png

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(start, start + n):
        write_png(torch.randint(0, 255, (3, 12, 12), dtype=torch.uint8, generator=g), str(folder / f"{i}.png"))


def identity_of(data: str, unlabelled: str = "", labels: str = "all", run: Path | None = None) -> dict:
    cfg = dataclasses.replace(DataConfig(), spec=data, unlabelled=unlabelled, labels=labels)
    dataset, _, _ = pretrain_data(cfg, 0, run)
    return data_identity(dataset)


def test_identity_follows_the_files_not_where_the_folder_is(tmp_path):
    for sub, n in (("a/train/cat", 3), ("a/train/dog", 3), ("a/val/cat", 1), ("a/val/dog", 1), ("a/unlabelled", 4)):
        write_images(tmp_path / sub, n)
    base = identity_of(str(tmp_path / "a"), "auto")
    assert base == identity_of(str(tmp_path / "a"), "auto") and base["images"] == 10 and base["unlabelled"] == 4
    shutil.copytree(tmp_path / "a", tmp_path / "moved")  # the same data at another path (another mount)
    assert identity_of(str(tmp_path / "moved"), "auto") == base
    write_images(tmp_path / "a/unlabelled", 1, start=4)  # the crawl folder grew
    grown = identity_of(str(tmp_path / "a"), "auto")
    assert (grown["images"], grown["unlabelled"]) == (11, 5)
    (tmp_path / "a/unlabelled/4.png").rename(tmp_path / "a/unlabelled/x.png")  # as many images, another file
    renamed = identity_of(str(tmp_path / "a"), "auto")
    assert renamed["images"] == 11 and renamed["digest"] not in (grown["digest"], base["digest"])
    assert identity_of("digits:0-3")["images"] != identity_of("digits:0-4")["images"]
    assert identity_of("digits:0-3") == identity_of("digits:0-3")


def test_a_changed_identity_is_one_line_naming_both_counts_and_the_fix():
    saved = {"images": 10, "unlabelled": 4, "digest": "a" * 16}
    check_same_data(saved, dict(saved), "run/last.pt")
    check_same_data(None, saved, "run/last.pt")  # a checkpoint written before the data was recorded
    with pytest.raises(OperaError) as err:
        check_same_data(saved, {"images": 11, "unlabelled": 5, "digest": "b" * 16}, "run/last.pt")
    msg = str(err.value)
    assert "\n" not in msg and "10 images (4 unlabelled)" in msg and "finds 11 (5 unlabelled)" in msg
    assert "restore" in msg and "new --output" in msg
    with pytest.raises(OperaError, match="as many, but other files"):
        check_same_data(saved, {**saved, "digest": "b" * 16}, "run/last.pt")


def _pretrain(out: Path, unlabelled: Path, *extra: str):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "opera", "run", "pretrain", "--hierarchy", "self", "--data", "digits:0-1",
           "--unlabelled", str(unlabelled), "--epochs", "1", "--batch-size", "32", "--set", "train.knn_every=0",
           "--set", "self.mlp_dim=32", "--set", "self.dim=16", "--set", "backbone.img_size=16", "--device", "cpu",
           "--output", str(out), *extra]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pretraining_refuses_to_resume_on_a_grown_unlabelled_folder_and_resumes_once_restored(tmp_path):
    from opera.engine.checkpoint import load_state

    unlabelled, out = tmp_path / "crawl", tmp_path / "run"
    write_images(unlabelled, 8)
    first = _pretrain(out, unlabelled, "--set", "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    saved = load_state(out / "last.pt")
    assert saved["global_step"] == 2 and saved["identity"]["data"]["unlabelled"] == 8

    write_images(unlabelled, 3, seed=1, start=8)
    refused = _pretrain(out, unlabelled)
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "the training data changed since the run began" in lines[0] and "(8 unlabelled)" in lines[0]
    assert "(11 unlabelled)" in lines[0]
    assert load_state(out / "last.pt")["global_step"] == 2  # nothing was trained on the other data

    for i in range(8, 11):
        (unlabelled / f"{i}.png").unlink()
    resumed = _pretrain(out, unlabelled)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and load_state(out / "last.pt")["global_step"] > 2


@pytest.mark.slow
def test_finetuning_refuses_to_resume_on_a_changed_training_folder(tmp_path):
    import os
    import subprocess
    import sys

    for sub, n in (("data/train/cat", 6), ("data/train/dog", 6), ("data/val/cat", 2), ("data/val/dog", 2)):
        write_images(tmp_path / sub, n, seed=len(sub))
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "opera", "run", "finetune", "--checkpoint", "random:resnet_tiny", "--data",
           str(tmp_path / "data"), "--recipe", "digits", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
           "-o", str(out)]

    def run():
        return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)

    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    write_images(tmp_path / "data/train/dog", 1, seed=9, start=6)
    refused = run()
    assert refused.returncode == 2, refused.stderr[-2000:]
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "the training data changed since the run began" in lines[0], refused.stderr
    assert "trained on 12 images" in lines[0] and "finds 13" in lines[0] and "restore --data" in lines[0]
    (tmp_path / "data/train/dog/6.png").unlink()
    assert run().returncode == 0


def test_the_digest_is_of_the_names_joined_by_newlines(tmp_path):
    """Streamed over the names, the digest stays the one that checkpoints already hold: sha256 of the
    relative names joined by newlines (labelled folder first, then the unlabelled images)."""
    import hashlib

    for sub, n in (("a/train/cat", 3), ("a/train/dog", 2), ("a/val/cat", 1), ("a/val/dog", 1), ("a/unlabelled", 2)):
        write_images(tmp_path / sub, n)
    names = ["train/cat/0.png", "train/cat/1.png", "train/cat/2.png", "train/dog/0.png", "train/dog/1.png", "0.png",
             "1.png"]
    want = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    assert identity_of(str(tmp_path / "a"), "auto") == {"images": 7, "unlabelled": 2, "digest": want}
