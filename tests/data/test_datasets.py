"""Datasets (digits, folders, torchvision roots) and the deterministic sharded loader."""

import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from opera.data import (
    SeededDataset,
    ShardedBatchSampler,
    build_dataset,
    build_loader,
    parse_data_spec,
    steps_per_epoch,
    verify_images,
)
from opera.errors import OperaError


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def _write_img(path, size=(20, 14), seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)


def _tree(root, classes, per_class, ext=".jpg"):
    for k, c in enumerate(classes):
        for i in range(per_class):
            _write_img(os.path.join(root, c, f"{c}_{i}{ext}"), seed=k * 100 + i)


# ---------------------------------------------------------------------------------------- digits


def test_digits_split_disjoint_stratified_and_stable():
    tr, va = build_dataset("digits", "train"), build_dataset("digits", "val")
    assert len(tr) + len(va) == 1797
    assert set(tr.indices.tolist()).isdisjoint(va.indices.tolist())
    assert sorted(tr.indices.tolist() + va.indices.tolist()) == list(range(1797))
    assert tr.num_classes == va.num_classes == 10 and tr.class_names == [str(i) for i in range(10)]
    # stratified: every class has ~20% of its images in val
    tr_counts = np.bincount(tr.targets, minlength=10)
    va_counts = np.bincount(va.targets, minlength=10)
    frac = va_counts / (tr_counts + va_counts)
    assert np.all(np.abs(frac - 0.2) < 0.01), frac
    # stable across calls and independent of the global torch / numpy seeds
    torch.manual_seed(123)
    np.random.seed(123)
    assert build_dataset("digits", "val").indices.tolist() == va.indices.tolist()


def test_digits_items_are_uint8_3ch_8x8():
    ds = build_dataset("digits", "train")
    img, y = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 8)
    assert torch.equal(img[0], img[1]) and torch.equal(img[0], img[2])
    assert int(ds.images.max()) == 255 and int(ds.images.min()) == 0
    assert isinstance(y, int) and 0 <= y < 10
    assert len(ds.targets) == len(ds)


def test_digits_class_selection_remaps_labels():
    lo = build_dataset("digits:0-4", "train")
    assert lo.num_classes == 5 and set(lo.targets) == {0, 1, 2, 3, 4}
    hi = build_dataset("digits:5-9", "val")
    assert hi.num_classes == 5 and set(hi.targets) == {0, 1, 2, 3, 4}
    assert hi.class_names == ["5", "6", "7", "8", "9"]
    full = build_dataset("digits", "val")
    # the same images, with labels shifted by 5
    keep = [i for i, y in enumerate(full.targets) if y >= 5]
    assert hi.indices.tolist() == full.indices[keep].tolist()
    assert hi.targets == [full.targets[i] - 5 for i in keep]
    sel = build_dataset(parse_data_spec("digits:0,2,7"), "train")
    assert sel.class_names == ["0", "2", "7"] and set(sel.targets) == {0, 1, 2}


def test_bad_split():
    with pytest.raises(OperaError) as e:
        build_dataset("digits", "test")
    assert "train, val" in _one_line(e)


# --------------------------------------------------------------------------------------- folders


def test_imagenet_style_folder(tmp_path):
    root = tmp_path / "in"
    _tree(str(root / "train"), ["cat", "dog", "eel"], 3)
    _tree(str(root / "val"), ["cat", "eel"], 2, ext=".png")  # val may lack classes
    tr, va = build_dataset(str(root), "train"), build_dataset(str(root), "val")
    assert tr.class_names == va.class_names == ["cat", "dog", "eel"]
    assert len(tr) == 9 and len(va) == 4
    assert tr.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2] and va.targets == [0, 0, 2, 2]
    img, y = va[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 14, 20) and y == 2
    assert verify_images(tr) == 9 and verify_images(SeededDataset(va, 0)) == 4
    sub = build_dataset(f"{root}@1-2", "train")
    assert sub.class_names == ["dog", "eel"] and sub.targets == [0, 0, 0, 1, 1, 1]
    with pytest.raises(OperaError) as e:
        build_dataset(f"{root}@2-3", "train")
    assert "outside" in _one_line(e) and "0-2" in str(e.value)


def test_flat_folder_fixed_held_out_split(tmp_path):
    root = tmp_path / "flat"
    _tree(str(root), ["a", "b"], 10)
    _write_img(str(root / "b" / "gray.png"), seed=5)  # also a grayscale PNG below
    Image.new("L", (9, 9), 7).save(root / "a" / "gray.png")
    tr, va = build_dataset(str(root), "train"), build_dataset(str(root), "val")
    assert set(tr.samples).isdisjoint(va.samples) and len(tr) + len(va) == 22
    assert np.bincount(va.targets).tolist() == [2, 2]  # 20% of 11 per class, stratified
    assert build_dataset(str(root), "val").samples == va.samples  # fixed
    gray = [i for i, p in enumerate(tr.samples + va.samples) if p.endswith("a/gray.png")][0]
    ds = tr if gray < len(tr) else va
    img, _ = ds[gray if gray < len(tr) else gray - len(tr)]
    assert img.shape == (3, 9, 9) and int(img.max()) == 7


def test_corrupt_image_names_the_file(tmp_path):
    root = tmp_path / "c"
    _tree(str(root), ["a", "b"], 5)
    bad = root / "a" / "x.jpg"
    bad.write_bytes(b"this is not a jpeg at all" * 10)
    # listing is eager, decoding is lazy
    tr, va = build_dataset(str(root), "train"), build_dataset(str(root), "val")
    ds = tr if str(bad) in tr.samples else va
    with pytest.raises(OperaError) as e:
        ds[ds.samples.index(str(bad))]
    msg = _one_line(e)
    assert f"cannot decode image {bad}" in msg and "remove or replace it" in msg
    with pytest.raises(OperaError) as e:
        verify_images(ds)
    assert str(bad) in _one_line(e)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(OperaError) as e:
        build_dataset(str(tmp_path / "nope"), "train")
    assert "does not exist" in _one_line(e) and str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OperaError) as e:
        build_dataset(str(tmp_path / "empty"), "train")
    assert "no class folders" in _one_line(e)
    (tmp_path / "hollow" / "cls").mkdir(parents=True)
    (tmp_path / "hollow" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(OperaError) as e:
        build_dataset(str(tmp_path / "hollow"), "train")
    assert "has no images" in _one_line(e)
    loose = tmp_path / "loose"
    _write_img(str(loose / "a.jpg"))
    with pytest.raises(OperaError) as e:
        build_dataset(str(loose), "train")
    assert "move them into class folders" in _one_line(e)
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(OperaError) as e:
        build_dataset(str(f), "train")
    assert "not a folder" in _one_line(e)


def test_imagenet_val_flat_images_is_explained(tmp_path):
    root = tmp_path / "in"
    _tree(str(root / "train"), ["a"], 2)
    _write_img(str(root / "val" / "ILSVRC2012_val_00000001.JPEG"), fmt="JPEG")
    assert len(build_dataset(str(root), "train")) == 2
    with pytest.raises(OperaError) as e:
        build_dataset(str(root), "val")
    assert "not class folders" in _one_line(e)


# ------------------------------------------------------------------------------------ torchvision


def test_missing_torchvision_dataset_explains_layout(tmp_path):
    for name, folder in [("cifar10", "cifar-10-batches-py"), ("stl10", "stl10_binary"),
                         ("pets", "oxford-iiit-pet"), ("flowers102", "flowers-102")]:
        with pytest.raises(OperaError) as e:
            build_dataset(f"{name}={tmp_path}", "train")
        msg = _one_line(e)
        assert f"{name} not found under {tmp_path}" in msg and folder in msg and "never downloads" in msg


def test_cifar10_from_local_root(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)  # fake files, no md5
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        labels = [int(x) for x in rng.integers(0, 10, n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    tr = build_dataset(f"cifar10={tmp_path}", "train")
    va = build_dataset(f"cifar10={tmp_path}", "val")
    assert len(tr) == 20 and len(va) == 6 and tr.class_names[3] == "c3"
    img, y = tr[5]
    with open(base / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
    assert torch.equal(img, torch.from_numpy(raw["data"][1].reshape(3, 32, 32))) and y == raw["labels"][1]
    sel = build_dataset(f"cifar10={tmp_path}@2-4", "train")
    keep = [i for i, t in enumerate(tr.targets) if 2 <= t <= 4]
    assert sel.targets == [tr.targets[i] - 2 for i in keep] and sel.class_names == ["c2", "c3", "c4"]


# ----------------------------------------------------------------------------------------- loader


class _Idx(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i, torch.rand(1).item()


def _epoch(loader):
    return [b[0].tolist() for b in loader]


def test_sharding_covers_epoch_without_overlap():
    ds = _Idx(103)
    seen = []
    for rank in range(2):
        loader = build_loader(ds, 10, shuffle=True, seed=3, epoch=1, rank=rank, world_size=2)
        batches = _epoch(loader)
        assert len(batches) == len(loader) == steps_per_epoch(103, 20, 2) == 5
        assert all(len(b) == 10 for b in batches)
        seen.append([i for b in batches for i in b])
    assert set(seen[0]).isdisjoint(seen[1])
    # without the per-rank batch tail, the two shards are the epoch's permutation minus its tail
    s = ShardedBatchSampler(103, 10, seed=3, epoch=1, world_size=2, drop_last=False)
    perm = [i for r in range(2) for i in ShardedBatchSampler(103, 51, seed=3, epoch=1, rank=r,
                                                            world_size=2)._rank_indices()]
    assert sorted(perm) == sorted(set(perm)) and len(perm) == 102
    assert sum(len(b) for b in s) == 52  # rank 0 of a 103-image epoch, nothing dropped
    # different epochs shuffle differently, same epoch is reproducible
    a = _epoch(build_loader(ds, 10, seed=3, epoch=1))
    assert a == _epoch(build_loader(ds, 10, seed=3, epoch=1))
    assert a != _epoch(build_loader(ds, 10, seed=3, epoch=2))


def test_skip_start_step_is_exact_tail():
    ds = _Idx(64)
    full = list(build_loader(ds, 8, seed=0, epoch=4, rank=1, world_size=2))
    tail = list(build_loader(ds, 8, seed=0, epoch=4, rank=1, world_size=2, start_step=2))
    assert len(full) == 4 and len(tail) == 2
    for (i_a, r_a), (i_b, r_b) in zip(full[2:], tail):
        assert torch.equal(i_a, i_b) and torch.equal(r_a, r_b)  # same indices, same randomness


def test_seeded_dataset_independent_of_workers():
    ds = _Idx(16)
    a = list(build_loader(ds, 4, seed=1, epoch=0, workers=0))
    b = list(build_loader(ds, 4, seed=1, epoch=0, workers=2))
    for (i_a, r_a), (i_b, r_b) in zip(a, b):
        assert torch.equal(i_a, i_b) and torch.equal(r_a, r_b)
    wrapped = SeededDataset(ds, seed=1)
    wrapped.set_epoch(0)
    first = a[0][0][0].item()
    assert wrapped[first][1] == a[0][1][0].item() == wrapped[(0, first)][1]
    assert wrapped[(1, first)][1] != wrapped[(0, first)][1]


def test_batch_larger_than_dataset():
    with pytest.raises(OperaError) as e:
        build_loader(_Idx(12), 16, seed=0, epoch=0)
    msg = _one_line(e)
    assert "batch size 16 is larger than the dataset (12 images)" in msg
    assert "--batch-size <= 12" in msg
    with pytest.raises(OperaError) as e:  # the global batch counts
        build_loader(_Idx(12), 8, seed=0, epoch=0, rank=0, world_size=2)
    assert "batch size 16" in _one_line(e)
    assert len(build_loader(_Idx(12), 16, drop_last=False, shuffle=False)) == 1
    with pytest.raises(OperaError) as e:
        steps_per_epoch(100, 10, 3)
    assert "multiple of 3" in _one_line(e)


class _Draws(torch.utils.data.Dataset):
    """Item ``i``: three draws from torch's global RNG (what a transform consumes)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        return torch.rand(3), i


def test_seeded_items_draw_the_sample_seeds_stream_and_leave_the_callers_rng_alone():
    from opera.data.loader import sample_seed

    ds = SeededDataset(_Draws(), seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    got = ds[(2, 3)][0]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    torch.manual_seed(sample_seed(5, 2, 3))  # the stream runs of earlier versions drew (resume stays exact)
    assert torch.equal(got, torch.rand(3))
    assert not torch.equal(got, ds[(2, 2)][0]) and not torch.equal(got, ds[(1, 3)][0])
