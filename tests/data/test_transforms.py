"""Augmentations: shapes, asymmetry, reproducibility through SeededDataset, fast kernels."""

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from opera.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    PretrainTransform,
    SeededDataset,
    build_dataset,
)
from opera.data.transforms import adjust_hue_fast, blur_kernel_size, gaussian_blur_fast
from opera.errors import OperaError


def _img(h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def test_two_views_shape_dtype_and_differ():
    t = PretrainTransform(32)
    v1, v2 = t(_img())
    for v in (v1, v2):
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert not torch.allclose(v1, v2)


MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_pretrain_views_end_with_normalize_by_imagenet_mean_and_std():
    """The same seed through the default transform and through one normalising with mean 0 and
    std 1 gives the same augmented image: the default's output is exactly (image - mean) / std."""
    img = _img()
    torch.manual_seed(5)
    default = PretrainTransform(32)(img)
    torch.manual_seed(5)
    raw = PretrainTransform(32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(img)
    for d, r in zip(default, raw):
        assert 0.0 <= r.min() and r.max() <= 1.0  # the unnormalised view is in [0, 1]
        torch.testing.assert_close(d, (r - MEAN) / STD, atol=1e-6, rtol=0)


def test_eval_transform_normalizes_with_the_pretraining_mean_and_std():
    """A uniform gray 128 image: EvalTransform gives (128/255 - mean) / std with the very mean
    and std that PretrainTransform uses, so evaluations see the pixels pretraining saw."""
    pre, ev = PretrainTransform(32), EvalTransform(32)
    assert (pre.mean, pre.std) == (ev.mean, ev.std) == (IMAGENET_MEAN, IMAGENET_STD)
    gray = torch.full((3, 40, 56), 128, dtype=torch.uint8)
    out = ev(gray)
    assert out.shape == (3, 32, 32)
    pre_mean, pre_std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    torch.testing.assert_close(out * pre_std + pre_mean, torch.full((3, 32, 32), 128 / 255), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(128 / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]),
                               atol=1e-6, rtol=0)


def test_views_accept_channels_last_and_pil():
    img = _img()
    cl = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # what the JPEG decoder returns
    t = PretrainTransform(24)
    torch.manual_seed(1)
    a = t(img)
    torch.manual_seed(1)
    b = t(cl)
    torch.manual_seed(1)
    c = t(Image.fromarray(img.permute(1, 2, 0).numpy()))
    for x, y, z in zip(a, b, c):
        assert torch.allclose(x, y, atol=1e-5) and torch.allclose(x, z, atol=1e-5)


def test_flip_off_and_bad_options():
    t = PretrainTransform(16, crop_min=1.0, flip=False)
    assert not any("Flip" in type(op).__name__ for op in t.view1.transforms)
    with pytest.raises(OperaError):
        PretrainTransform(16, crop_min=0.0)
    with pytest.raises(OperaError):
        PretrainTransform(0)
    with pytest.raises(OperaError):
        EvalTransform(-3)


def test_view_asymmetry_blur_and_solarize():
    # MoCo-v3 / BYOL: view1 always blurs and never solarizes; view2 blurs 10%, solarizes 20%
    from opera.data.transforms import FastGaussianBlur, RandomSolarize

    t = PretrainTransform(16, crop_min=1.0, flip=False)

    def probs(view):
        blur = [op.p for op in view.transforms
                if hasattr(op, "transforms") and isinstance(op.transforms[0], FastGaussianBlur)]
        sol = [op.p for op in view.transforms if isinstance(op, RandomSolarize)]
        return blur, sol

    assert probs(t.view1) == ([1.0], [0.0]) and probs(t.view2) == ([0.1], [0.2])
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3 and blur_kernel_size(8) == 3
    assert blur_kernel_size(96) % 2 == 1
    # solarize on float views uses MoCo's uint8 threshold 128 -> identical to solarizing uint8
    img = _img()
    sol = RandomSolarize(1.0)
    torch.testing.assert_close(
        sol(F.to_dtype(img, torch.float32, scale=True)),
        F.to_dtype(F.solarize(img, 128), torch.float32, scale=True),
    )


def test_eval_transform_sizes():
    assert EvalTransform(224)(_img(300, 400)).shape == (3, 224, 224)
    out = EvalTransform(32)(build_dataset("digits", "val")[0][0])
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    torch.manual_seed(0)
    a = EvalTransform(32)(_img())
    torch.manual_seed(1)
    assert torch.equal(a, EvalTransform(32)(_img()))  # deterministic


def test_seeded_dataset_reproducible_per_epoch_and_index():
    ds = build_dataset("digits:0-4", "train", transform=PretrainTransform(16, crop_min=0.3))
    s = SeededDataset(ds, seed=7)
    torch.manual_seed(0)
    (a1, a2), ya = s[3]
    torch.manual_seed(999)  # the caller's RNG state does not matter ...
    (b1, b2), yb = s[3]
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and ya == yb
    after = torch.rand(1)
    torch.manual_seed(999)
    assert torch.equal(after, torch.rand(1))  # ... and is left untouched
    s.set_epoch(1)
    (c1, c2), _ = s[3]
    assert not torch.equal(a1, c1) and not torch.equal(a2, c2)
    (d1, _), _ = s[4]
    assert not torch.equal(c1, d1)
    assert torch.equal(SeededDataset(ds, seed=7)[(1, 3)][0][0], c1)
    assert not torch.equal(SeededDataset(ds, seed=8)[(1, 3)][0][0], c1)
    assert s.num_classes == 5  # attributes pass through


@pytest.mark.parametrize("hue", [-0.5, -0.13, 0.0, 0.07, 0.5])
def test_fast_hue_matches_torchvision(hue):
    x = torch.rand(3, 24, 30)
    x[:, :4] = 0.5  # gray pixels
    x[0, 5:9] = x[1, 5:9]  # ties between channels
    x[2, 10:12] = x[0, 10:12]
    torch.testing.assert_close(adjust_hue_fast(x, hue), F.adjust_hue(x, hue), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k,sigma", [(3, 0.1), (7, 0.8), (23, 1.0), (23, 2.0), (9, 2.0)])
def test_fast_blur_matches_torchvision(k, sigma):
    x = torch.rand(3, 30, 26)
    ref = F.gaussian_blur(x, [k, k], [sigma, sigma])
    torch.testing.assert_close(gaussian_blur_fast(x, k, sigma), ref, atol=1e-4, rtol=0)
