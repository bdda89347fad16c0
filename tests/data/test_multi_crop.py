"""Multi-crop views (DINO's ``DataAugmentationDINO``): 2 global views, then ``local_crops`` local crops.

* the same sample seed gives the per-image transform's views in the batched device path (the
  workers cut the uint8 crops, the device does the rest), with the same number of RNG draws;
* the global views of a sample are the two-crop recipe's, local crops or not;
* the local crops' parameters follow DINO's recipe: RandomResizedCrop area ~ scale (0.05, 0.4)
  (two-sample KS against torchvision's own draws), flip 0.5, jitter 0.8, gray 0.2, blur 0.5, no
  solarize (binomial tests at ALPHA), and a wrong recipe is rejected (the test has power);
* every feed path gives the same batches, and ``start_step`` resumes mid-epoch exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torchvision import transforms as T

from opera.data import PretrainFeed, PretrainTransform, build_dataset, sample_seed
from opera.data.device_augment import P, BatchTwoCrop, CropForDevice, local_size_for
from opera.errors import OperaError
from tests.data.test_device_augment import _NoImages

ALPHA = 1e-3


def _noise(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_local_crops_in_the_device_path_equal_the_per_image_transform():
    size, local, n_local = 24, 12, 3
    t = PretrainTransform(size, crop_min=0.4, local_crops=n_local, local_size=local)
    bt = BatchTwoCrop(size, crop_min=0.4, local_crops=n_local, local_size=local)
    two = PretrainTransform(size, crop_min=0.4)
    crop = CropForDevice(bt)
    want, globals_, locals_, params = [], [], [], []
    for i in range(24):
        img = _noise(37 + i, 50 - i, i)
        torch.manual_seed(100 + i)
        views = t(img)
        after = float(torch.rand(1))
        torch.manual_seed(100 + i)
        g, loc, p = crop(img)
        assert float(torch.rand(1)) == after  # same draws, same order
        torch.manual_seed(100 + i)
        two_views = two(img)
        for a, b in zip(views[:2], two_views):  # the global views are the two-crop recipe's
            assert torch.equal(a, b)
        assert [tuple(v.shape[-2:]) for v in views] == [(size, size)] * 2 + [(local, local)] * n_local
        want.append(views)
        globals_.append(g)
        locals_.append(loc)
        params.append(p)
    params = torch.stack(params)
    assert params.shape[1] == 2 + n_local
    got = bt.from_crops(torch.stack(globals_), params, torch.stack(locals_))
    assert len(got) == 2 + n_local
    for v in range(2 + n_local):
        torch.testing.assert_close(got[v], torch.stack([w[v] for w in want]), rtol=0, atol=2e-5)
    loc = params[:, 2:]
    assert 0 < loc[..., P["blur"]].sum() < loc[..., P["blur"]].numel() and loc[..., P["solarize"]].sum() == 0


def test_local_size_defaults_to_dinos_96_of_224():
    assert local_size_for(224) == 96 and local_size_for(32) == 14
    assert BatchTwoCrop(224, local_crops=2).local_size == 96


def _local_fails(params: torch.Tensor, h: int, w: int, scale: tuple[float, float]) -> list[str]:
    torch.manual_seed(12345)
    official = []
    for _ in range(params.shape[0]):
        _, _, ch, cw = T.RandomResizedCrop.get_params(torch.empty(3, h, w), scale=scale, ratio=(3 / 4, 4 / 3))
        official.append(ch * cw / (h * w))
    fails = []
    for v in range(2, params.shape[1]):
        p = params[:, v]
        area = (p[:, P["height"]] * p[:, P["width"]] / (h * w)).tolist()
        if stats.ks_2samp(area, official).pvalue < ALPHA:
            fails.append(f"local{v - 1} crop area")
        for name, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("solarize", 0.0)):
            k, n = int(p[:, P[name]].sum()), p.shape[0]
            if (prob == 0.0 and k) or (prob > 0 and stats.binomtest(k, n, prob).pvalue < ALPHA):
                fails.append(f"local{v - 1} {name} ({k}/{n} vs {prob})")
        if stats.kstest(p[p[:, P["blur"]] > 0.5, P["sigma"]].numpy(), stats.uniform(0.1, 1.9).cdf).pvalue < ALPHA:
            fails.append(f"local{v - 1} sigma")
    return fails


def test_local_crop_parameters_follow_dinos_recipe():
    n, h, w = 3000, 300, 400
    bt = BatchTwoCrop(64, crop_min=0.4, local_crops=2, local_scale=(0.05, 0.4))
    params = bt.sample_seeded([sample_seed(3, 0, i) for i in range(n)], [(h, w)] * n)
    assert _local_fails(params, h, w, (0.05, 0.4)) == []
    assert not math.isclose(float(params[:, 0, P["height"]].mean()), float(params[:, 2, P["height"]].mean()), rel_tol=0.2)
    wrong = BatchTwoCrop(64, crop_min=0.4, local_crops=2, local_scale=(0.1, 0.4)).sample_seeded(range(n), [(h, w)] * n)
    assert "local1 crop area" in _local_fails(wrong, h, w, (0.05, 0.4))


def test_feed_paths_agree_and_resume_mid_epoch_exactly_with_local_crops():
    kw = dict(img_size=16, crop_min=0.4, flip=True, seed=5, local_crops=3, local_size=8)
    memory = PretrainFeed(build_dataset("digits:0-2", "train"), augment_on="device", **kw)
    workers = PretrainFeed(_NoImages(build_dataset("digits:0-2", "train")), augment_on="device", **kw)
    per_image = PretrainFeed(build_dataset("digits:0-2", "train"), augment_on="workers", **kw)
    full = {name: list(f.epoch(16, 1)) for name, f in (("memory", memory), ("workers", workers), ("per_image", per_image))}
    for (vm, _), (vw, _), (vp, _) in zip(full["memory"], full["workers"], full["per_image"]):
        assert [tuple(v.shape) for v in vm] == [(16, 3, 16, 16)] * 2 + [(16, 3, 8, 8)] * 3
        for v, (a, b, c) in enumerate(zip(vm, vw, vp)):
            torch.testing.assert_close(b, c, rtol=0, atol=2e-5)  # same parameters, same crops
            # 8x8 digits: roi_align vs the antialiased uint8 resize; a local crop blows 2-5 source
            # pixels up to 8, where the two interpolations differ more (0.10 on average here)
            assert ((a - b).abs().mean()) < (0.08 if v < 2 else 0.15)
    for name, feed in (("memory", memory), ("workers", workers), ("per_image", per_image)):
        tail = list(feed.epoch(16, 1, start_step=2))
        assert len(tail) == len(full[name]) - 2
        for (v, _), (vf, _) in zip(tail, full[name][2:]):
            assert all(torch.equal(a, b) for a, b in zip(v, vf)), name


def test_local_crops_need_a_multi_crop_space_and_an_ordered_scale():
    from opera.configs import load_config

    with pytest.raises(OperaError) as err:
        load_config("cpu_digits", ["hierarchy=self,full", "data.local_crops=4"])
    assert "\n" not in str(err.value) and "data.local_crops=0" in str(err.value)
    with pytest.raises(OperaError) as err:
        load_config("cpu_digits", ["data.local_crop_scale=[0.4,0.05]"])
    assert "\n" not in str(err.value) and "[0.05,0.4]" in str(err.value)
