"""File names held as two numpy arrays (StringArray): the same strings as a list, and a DataLoader
worker that reads every one of them does not copy them (the list did)."""

from __future__ import annotations

import os
import sys

import pytest

from opera.data.strings import StringArray

NAMES = ["train/n01440764/a.JPEG", "", "ünïcödé/猫.png", os.fsdecode(b"bad-\xff-byte.jpg"), "x" * 300]


def test_strings_round_trip_in_order():
    a = StringArray(NAMES)
    assert len(a) == len(NAMES) and list(a) == NAMES and [a[i] for i in range(len(a))] == NAMES
    assert a[-1] == NAMES[-1] and a[1:4] == NAMES[1:4]
    assert a == NAMES and a == StringArray(NAMES) and a != NAMES[:-1]
    assert os.fsencode(a[3]) == b"bad-\xff-byte.jpg"  # a file name that is not UTF-8 comes back as it was
    assert a + ["y"] == NAMES + ["y"] and ["y"] + a == ["y"] + NAMES
    with pytest.raises(IndexError):
        a[len(NAMES)]
    assert list(StringArray()) == [] and len(StringArray()) == 0


def test_a_folder_dataset_holds_its_paths_in_arrays(tmp_path):
    from opera.data import build_dataset
    from opera.data.photos import make_photo_folder

    folder = make_photo_folder(str(tmp_path / "photos"), n=12, classes=2, seed=0, short_side=(20, 30))
    ds = build_dataset(folder, "train")
    assert isinstance(ds.samples, StringArray) and all(os.path.isfile(p) for p in ds.samples)
    assert ds.describe_item(0) == ds.samples[0]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps_rollup")
def test_a_worker_reading_every_path_does_not_copy_them():
    from benchmarks.worker_memory import synthetic_folder, worker_growth

    n = 300_000
    before, after = worker_growth(synthetic_folder(n))
    assert after - before < 8, (before, after)  # MB: what the pass itself allocates, not the 25 MB of names
    before, after = worker_growth(synthetic_folder(n, as_list=True))
    assert after - before > 20, (before, after)  # the list of str: every page of names copied
