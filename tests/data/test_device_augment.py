"""The batched device augmentation (``data.augment_on=device``) held to the per-image recipe.

* fixed parameters: the same sample seed gives ``PretrainTransform``'s parameters, and the batched
  views equal the per-image ones (exactly up to float rounding where the workers crop; up to
  interpolation error where ``roi_align`` crops on the device);
* random parameters: crop areas, aspect ratios, jitter factors and the probabilities of every
  random step match torchvision's per-image draws (two-sample KS / binomial / chi-square tests,
  each at ALPHA; see ``test_parameter_distributions_match_the_recipe``);
* the feed: the same views in every path, and ``start_step`` resumes mid-epoch exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torchvision import transforms as T

from opera.data import PretrainFeed, PretrainTransform, SeededDataset, build_dataset, sample_seed
from opera.data.device_augment import NUM_PARAMS, P, BatchTwoCrop, CropForDevice
from opera.errors import OperaError

#: False-alarm rate of each statistical check (a correct sampler fails one with this probability
#: per fresh seed); 16 checks -> at most 1.6% per run by Bonferroni. The seeds are fixed, so the
#: test is deterministic; the rate says how unusual a failure would be for a correct recipe.
ALPHA = 1e-3


def _smooth(h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, h // 12 + 2, w // 12 + 2, generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return (img.clamp(0, 1)[0] * 255).round().to(torch.uint8)


def _noise(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _per_image(t: PretrainTransform, img: torch.Tensor, seed: int) -> tuple[list[torch.Tensor], float]:
    torch.manual_seed(seed)
    views = t(img)
    return views, float(torch.rand(1))  # the next draw: tells whether both consumed the RNG alike


def test_same_seed_gives_pretrain_transforms_parameters_and_views():
    """Workers cut the uint8 crops (the per-image kernel), the device does the rest: equal to
    ``PretrainTransform`` up to float rounding, for 24 samples covering every random branch."""
    size = 24
    t, bt = PretrainTransform(size, crop_min=0.08), BatchTwoCrop(size, crop_min=0.08)
    crop = CropForDevice(bt)
    imgs = [_noise(37 + i, 50 - i, i) for i in range(24)]
    want, crops, params = [], [], []
    for i, img in enumerate(imgs):
        views, after_ref = _per_image(t, img, 1000 + i)
        torch.manual_seed(1000 + i)
        c, p = crop(img)
        assert float(torch.rand(1)) == after_ref  # same number of draws, same order
        want.append(views)
        crops.append(c)
        params.append(p)
    params = torch.stack(params)
    got = bt.from_crops(torch.stack(crops), params)
    for v in range(2):
        torch.testing.assert_close(got[v], torch.stack([w[v] for w in want]), rtol=0, atol=2e-5)
    # the 24 samples exercised every branch in both views (else the check above proves less)
    for name in ("flip", "jitter", "gray"):
        assert 0 < params[:, :, P[name]].sum() < params[:, :, P[name]].numel(), name
    assert params[:, 1, P["solarize"]].sum() > 0 and params[:, 0, P["blur"]].all()


def test_device_crop_equals_per_image_crop_up_to_interpolation():
    """In-memory data is cropped on the device by roi_align: with the parameters fixed (same
    seed), the views match the per-image path up to interpolation error on smooth images."""
    size = 32
    t, bt = PretrainTransform(size, crop_min=0.08), BatchTwoCrop(size, crop_min=0.08)
    imgs = torch.stack([_smooth(96, 96, i) for i in range(32)])
    seeds = [50 + i for i in range(32)]
    got = bt(imgs, bt.sample_seeded(seeds, [(96, 96)] * 32))
    std = torch.tensor(t.std).view(1, 3, 1, 1)
    for v in range(2):
        want = torch.stack([_per_image(t, img, s)[0][v] for img, s in zip(imgs, seeds)])
        err = ((got[v] - want) * std).abs()  # in [0, 1] pixel units
        assert err.mean() < 4e-3 and torch.quantile(err.flatten(), 0.99) < 0.03, (err.mean(), err.max())


def test_identity_crop_is_exact_on_the_device():
    """A full-image box at the output size is a no-op crop: then the device path equals the
    per-image one to float rounding (everything else is the same arithmetic)."""
    size = 20
    bt = BatchTwoCrop(size, crop_min=0.08)
    imgs = torch.stack([_noise(size, size, i) for i in range(16)])
    params = bt.sample_seeded(range(16), [(size, size)] * 16)
    params[:, :, 0:4] = torch.tensor([0.0, 0.0, size, size], dtype=torch.float64)
    got = bt(imgs, params)
    ref = bt.from_crops(torch.stack([imgs, imgs], 1), params)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)


def _official_crop_draws(n: int, h: int, w: int, scale: tuple[float, float]) -> tuple[list[float], list[float]]:
    torch.manual_seed(12345)
    areas, logr = [], []
    for _ in range(n):
        _, _, ch, cw = T.RandomResizedCrop.get_params(torch.empty(3, h, w), scale=scale, ratio=(3 / 4, 4 / 3))
        areas.append(ch * cw / (h * w))
        logr.append(math.log(cw / ch))
    return areas, logr


def _check_recipe(params: torch.Tensor, official: tuple[list[float], list[float]], h: int, w: int) -> list[str]:
    """Names of the checks that reject at ALPHA (``params`` [N, 2, NUM_PARAMS])."""
    fails = []
    areas_o, logr_o = official
    for v, (blur_p, solarize_p) in enumerate(((1.0, 0.0), (0.1, 0.2))):
        p = params[:, v]
        area = (p[:, P["height"]] * p[:, P["width"]] / (h * w)).tolist()
        logr = torch.log(p[:, P["width"]] / p[:, P["height"]]).tolist()
        if stats.ks_2samp(area, areas_o).pvalue < ALPHA:
            fails.append(f"view{v + 1} crop area")
        if stats.ks_2samp(logr, logr_o).pvalue < ALPHA:
            fails.append(f"view{v + 1} aspect ratio")
        for name, prob in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2), ("blur", blur_p), ("solarize", solarize_p)):
            k, n = int(p[:, P[name]].sum()), p.shape[0]
            if prob in (0.0, 1.0):
                if k != round(prob * n):
                    fails.append(f"view{v + 1} {name} (p={prob}: {k}/{n})")
            elif stats.binomtest(k, n, prob).pvalue < ALPHA:
                fails.append(f"view{v + 1} {name} p ({k}/{n} vs {prob})")
        jit = p[p[:, P["jitter"]] > 0.5]
        for name, (lo, hi) in (("brightness", (0.6, 1.4)), ("saturation", (0.8, 1.2)), ("hue", (-0.1, 0.1))):
            if stats.kstest(jit[:, P[name]].numpy(), stats.uniform(lo, hi - lo).cdf).pvalue < ALPHA:
                fails.append(f"view{v + 1} {name}")
        first = torch.bincount(jit[:, P["order0"]].long(), minlength=4).numpy()
        if stats.chisquare(first).pvalue < ALPHA:
            fails.append(f"view{v + 1} jitter order")
    return fails


def test_parameter_distributions_match_the_recipe():
    """4000 samples of the batched sampler vs torchvision's per-image RandomResizedCrop draws
    (the official code's): crop area fraction and log aspect ratio (two-sample KS), the
    probability of flip 0.5 / jitter 0.8 / grayscale 0.2 / blur 1.0, 0.1 / solarize 0, 0.2
    (binomial; p in {0, 1} exactly), jitter factors ~ U(range) (KS) and which op comes first
    (chi-square, uniform). Each check at ALPHA = 1e-3. The same checks reject a recipe with one
    thing wrong (the test has power), so it can fail."""
    n, h, w = 4000, 300, 400
    bt = BatchTwoCrop(64, crop_min=0.08)
    params = bt.sample_seeded([sample_seed(7, 0, i) for i in range(n)], [(h, w)] * n)
    assert params.shape == (n, 2, NUM_PARAMS)
    official = _official_crop_draws(n, h, w, (0.08, 1.0))
    assert _check_recipe(params, official, h, w) == []
    wrong_scale = BatchTwoCrop(64, crop_min=0.2).sample_seeded(range(n), [(h, w)] * n)
    assert "view1 crop area" in _check_recipe(wrong_scale, official, h, w)
    wrong_gray = params.clone()
    flip_some = torch.rand(n, generator=torch.Generator().manual_seed(1)) < 0.1
    wrong_gray[flip_some, 0, P["gray"]] = 1.0  # p(gray) ~ 0.28 in view 1
    fails = _check_recipe(wrong_gray, official, h, w)
    assert len(fails) == 1 and fails[0].startswith("view1 gray p"), fails


class _NoImages(torch.utils.data.Dataset):
    """digits without its in-memory ``images``: forces the decode-in-workers device path."""

    def __init__(self, ds):
        self.ds, self.targets, self.num_classes, self.transform = ds, ds.targets, ds.num_classes, None

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img = self.ds.load_image(i)
        return (self.transform(img) if self.transform else img), self.targets[i]


def _epoch(feed: PretrainFeed, start: int = 0) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    return list(feed.epoch(16, 1, start_step=start))


def test_feed_paths_agree_and_resume_mid_epoch_exactly():
    kw = dict(img_size=16, crop_min=0.3, flip=True, seed=5)
    memory = PretrainFeed(build_dataset("digits:0-2", "train"), augment_on="device", **kw)
    workers = PretrainFeed(_NoImages(build_dataset("digits:0-2", "train")), augment_on="device", **kw)
    per_image = PretrainFeed(build_dataset("digits:0-2", "train"), augment_on="workers", **kw)
    assert memory.in_memory and not workers.in_memory and not per_image.in_memory
    full = {name: _epoch(f) for name, f in (("memory", memory), ("workers", workers), ("per_image", per_image))}
    assert len(full["memory"]) == len(full["workers"]) == len(full["per_image"]) > 3
    for (vm, ym), (vw, yw), (vp, yp) in zip(full["memory"], full["workers"], full["per_image"]):
        assert set(ym) == set(yp) == {"class", "coarse"} and set(yw) == {"class"}  # the wrapper hides 'coarse'
        assert torch.equal(ym["class"], yw["class"]) and all(torch.equal(ym[k], yp[k]) for k in ym)  # same order
        for a, b, c in zip(vm, vw, vp):
            torch.testing.assert_close(b, c, rtol=0, atol=2e-5)  # same parameters, same crops
            assert ((a - b).abs().mean()) < 0.08  # 8x8 digits: roi_align vs antialiased uint8 resize
    for name, feed in (("memory", memory), ("workers", workers), ("per_image", per_image)):
        tail = _epoch(feed, start=2)
        assert len(tail) == len(full[name]) - 2
        for (v, y), (vf, yf) in zip(tail, full[name][2:]):
            assert all(torch.equal(y[k], yf[k]) for k in y) and all(torch.equal(a, b) for a, b in zip(v, vf)), name


def test_crop_params_in_a_worker_equal_the_in_memory_draws():
    bt = BatchTwoCrop(16, crop_min=0.3)
    ds = SeededDataset(_NoImages(build_dataset("digits:0-2", "train")), seed=9)
    ds.dataset.transform = CropForDevice(bt)
    for epoch, index in ((0, 0), (3, 17), (1, 40)):
        (_, params), _ = ds[(epoch, index)]
        assert torch.equal(params, bt.sample_seeded([sample_seed(9, epoch, index)], [(8, 8)])[0])


def test_bad_augment_on_is_a_one_line_error():
    with pytest.raises(OperaError, match="augment_on must be one of device, workers"):
        PretrainFeed(build_dataset("digits:0-1", "train"), img_size=16, crop_min=0.3, flip=True, seed=0,
                     augment_on="gpu")
