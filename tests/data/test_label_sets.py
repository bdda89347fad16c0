"""Named label sets of the data: ``class`` always, ``coarse`` where the data defines a grouping."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from opera.data import build_dataset, dataset_label_sets
from opera.data.datasets import coarse_from_pairs
from opera.errors import OperaError


def _folder(root, classes=("cat", "dog", "car", "bus"), per_class=3):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_folder_without_a_mapping_has_only_class(tmp_path):
    ds = build_dataset(str(_folder(tmp_path / "f")), "train")
    assert dataset_label_sets(ds) == {"class": 4}


def test_folder_coarse_file_gives_a_coarse_label_set(tmp_path):
    root = _folder(tmp_path / "f")
    (root / "coarse.txt").write_text("# class  superclass\ncat animal\ndog\tanimal\ncar vehicle  # wheels\nbus vehicle\n")
    ds = build_dataset(str(root), "train")
    assert dataset_label_sets(ds) == {"class": 4, "coarse": 2}
    coarse = ds.target_sets()["coarse"]
    for t, c in zip(ds.targets, coarse):
        assert ds.coarse_names[c] == ("animal" if ds.class_names[t] in ("cat", "dog") else "vehicle")
    # a class selection keeps only the groups present
    sub = build_dataset(f"{root}@0-1", "train")  # sorted folders: bus, car
    assert sub.class_names == ["bus", "car"] and dataset_label_sets(sub) == {"class": 2, "coarse": 1}


@pytest.mark.parametrize("text,needle", [
    ("cat animal\ndog\n", "expected 'class_name coarse_name'"),
    ("cat animal\ncat plant\n", "mapped twice"),
    ("cat animal\ndog animal\ncar vehicle\n", "lacks class 'bus'"),
])
def test_bad_coarse_files_are_one_line(tmp_path, text, needle):
    root = _folder(tmp_path / "f")
    (root / "coarse.txt").write_text(text)
    with pytest.raises(OperaError) as err:
        build_dataset(str(root), "train")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_coarse_from_per_image_labels_as_cifar100_stores_them():
    fine, coarse = [0, 1, 2, 0, 3], [1, 0, 1, 1, 0]
    assert coarse_from_pairs(fine, coarse, ["a", "b", "c", "d"], ["x", "y"]) == {"a": "y", "b": "x", "c": "y", "d": "x"}
    with pytest.raises(OperaError, match="two coarse classes"):
        coarse_from_pairs([0, 0], [0, 1], ["a"], ["x", "y"])
