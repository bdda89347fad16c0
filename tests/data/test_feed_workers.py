"""The folder path of ``PretrainFeed`` keeps one loader per shape across epochs: its DataLoader
workers are forked once, and every epoch's batches (from any start step) are bit-identical to
those of a feed built for that epoch alone (what a resumed run builds)."""

from __future__ import annotations

import os

import pytest
import torch

from opera.bench import TreeMemory
from opera.data import PretrainFeed, build_dataset
from opera.data.photos import make_photo_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_photo_folder(str(tmp_path_factory.mktemp("jpegs")), n=20, classes=2)


def _feed(folder: str, augment_on: str) -> PretrainFeed:
    return PretrainFeed(build_dataset(folder, "train"), img_size=16, crop_min=0.08, flip=True, seed=3,
                        augment_on=augment_on, workers=1)


def _workers() -> list[int]:
    return [p for p in TreeMemory._pids() if p != os.getpid()]


def _same(a, b) -> None:
    (va, ya), (vb, yb) = a, b
    assert len(va) == len(vb) and all(torch.equal(x, y) for x, y in zip(va, vb))
    assert ya.keys() == yb.keys() and all(torch.equal(ya[k], yb[k]) for k in ya)


@pytest.mark.slow
@pytest.mark.parametrize("augment_on", ["device", "workers"])
def test_one_set_of_workers_serves_every_epoch_with_the_batches_of_a_fresh_feed(folder, augment_on):
    feed = _feed(folder, augment_on)  # 16 train images: 4 steps of 4 per epoch
    before = set(_workers())
    epoch0 = list(feed.epoch(4, 0))
    workers = set(_workers()) - before
    assert len(workers) == 1
    partial = feed.epoch(4, 1)
    next(partial)  # an epoch abandoned after one batch (a stop signal, max_steps) ...
    partial.close()
    epoch1 = list(feed.epoch(4, 1))  # ... and the same epoch again, from its start
    resumed = list(feed.epoch(4, 2, start_step=2))
    assert set(_workers()) - before == workers  # no worker forked after the first epoch
    assert len(epoch0) == len(epoch1) == 4 and len(resumed) == 2

    fresh = _feed(folder, augment_on)
    for got, want in zip(epoch1, fresh.epoch(4, 1)):
        _same(got, want)
    for got, want in zip(resumed, _feed(folder, augment_on).epoch(4, 2, start_step=2)):
        _same(got, want)
    assert not all(torch.equal(a, b) for a, b in zip(epoch0[0][0], epoch1[0][0]))  # epochs differ


@pytest.mark.slow
def test_workers_started_before_the_model_serve_a_resumed_epoch_unchanged(folder):
    """``start_workers`` forks at set-up (before the model exists); the workers begin on epoch 0's
    first batches, and a run resumed at epoch 1, step 2 still gets exactly that step's batches."""
    feed = _feed(folder, "device")
    before = set(_workers())
    feed.start_workers(4)
    workers = set(_workers()) - before
    assert len(workers) == 1  # forked now, not at the first epoch
    resumed = list(feed.epoch(4, 1, start_step=2))
    assert set(_workers()) - before == workers
    want = list(_feed(folder, "device").epoch(4, 1, start_step=2))
    assert len(resumed) == len(want) == 2
    for got, w in zip(resumed, want):
        _same(got, w)
