"""Augmentations on uint8 ``3xHxW`` tensors (``torchvision.transforms.v2``).

``PretrainTransform`` is MoCo-v3's two-crop asymmetric (BYOL) recipe; ``EvalTransform`` is the
resize + center-crop of linear evaluation. All randomness is drawn from torch's global RNG, so
seeding it (``opera.data.loader.SeededDataset``) makes augmentation reproducible per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from opera.errors import OperaError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


#: DINO's local crops (``DataAugmentationDINO.local_transfo``): blur p 0.5, no solarize; crop
#: scale (0.05, 0.4) and 96 px for 224 px global views (``--local_crops_scale``)
LOCAL_VIEW = (0.5, 0.0)
LOCAL_SCALE = (0.05, 0.4)


def local_size_for(img_size: int) -> int:
    """DINO's local crop size for global views of ``img_size``: 96 px at 224, in proportion."""
    return max(1, round(img_size * 96 / 224))


def blur_kernel_size(img_size: int) -> int:
    """Gaussian-blur kernel: ~10% of the image side, odd, at least 3 (23 for 224)."""
    k = max(3, int(round(0.1 * img_size)))
    return k if k % 2 == 1 else k + 1


def _check(img_size: int, crop_min: float | None = None) -> None:
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1:
        raise OperaError(f"image size must be a positive integer, got {img_size!r}; e.g. 224")
    if crop_min is not None and not (0.0 < float(crop_min) <= 1.0):
        raise OperaError(f"crop_min must be in (0, 1], got {crop_min!r}; MoCo-v3 uses 0.08")


def _as_uint8_tensor(img) -> torch.Tensor:
    if isinstance(img, torch.Tensor):
        return img
    return F.pil_to_tensor(img)  # PIL input is accepted for convenience


def adjust_hue_fast(img: torch.Tensor, hue_factor: float | torch.Tensor) -> torch.Tensor:
    """``F.adjust_hue`` for float ``[..., 3, H, W]`` images in [0, 1], ~5x faster.

    ``hue_factor`` is a number, or a tensor broadcastable to ``[..., H, W]`` (one factor per
    image of a batch: ``[B, 1, 1]``, as ``opera.data.device_augment`` uses it).

    Rotating the HSV hue keeps V (= max) and S (so max - min); each output channel is then
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6`` and n = 5, 3, 1 for
    R, G, B (the closed-form HSV -> RGB). Ties between channels resolve like torchvision's.
    """
    batched = isinstance(hue_factor, torch.Tensor)
    if not batched and not (-0.5 <= hue_factor <= 0.5):
        raise ValueError(f"hue_factor ({hue_factor}) is not in [-0.5, 0.5].")
    if batched and not img.is_floating_point():
        raise ValueError("per-image hue factors need a float image")
    if not img.is_floating_point():
        return F.adjust_hue(img, hue_factor)
    # Elementwise arithmetic only: torch.where, aminmax and remainder are several times slower
    # on CPU than the masks, max/min pairs and floor used here.
    r, g, b = img.unbind(dim=-3)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    is_r = (maxc == r).to(img.dtype)
    is_g = (maxc == g).to(img.dtype).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    h6 = (g - b).mul_(is_r)  # hue * 6, in [-1, 5)
    h6.addcmul_((b - r).add_(chroma, alpha=2.0), is_g)
    h6.addcmul_((r - g).add_(chroma, alpha=4.0), is_b)
    h6.div_(chroma.clamp_min(1e-12)).add_(hue_factor * 6.0)  # chroma == 0: any hue, output = max
    n = torch.tensor([5.0, 3.0, 1.0], dtype=img.dtype, device=img.device).view(3, 1, 1)
    k = h6.unsqueeze(-3) + n
    k.sub_(k.div(6.0).floor_().mul_(6.0))  # k mod 6
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return w.mul_(chroma.unsqueeze(-3)).neg_().add_(maxc.unsqueeze(-3))


def gaussian_blur_fast(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """``F.gaussian_blur`` (reflect padding) for float ``CxHxW`` images, as separable shift-adds.

    torch's depthwise conv2d is slow on CPU for large kernels (~14 ms for 23 taps at 224 px);
    this takes ~0.5 ms. Taps beyond 4 sigma (< 3.4e-4 of the peak) are dropped, so the result
    matches ``F.gaussian_blur`` to ~1e-4 on [0, 1] images - below uint8 quantisation.
    """
    if not img.is_floating_point() or img.ndim != 3:
        return F.gaussian_blur(img, [kernel_size, kernel_size], [sigma, sigma])
    half = min(kernel_size // 2, int(math.ceil(4.0 * sigma)))
    _, h, w = img.shape
    half = min(half, h - 1, w - 1)  # reflect padding needs pad < size
    if half < 1:
        return img
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    taps = (taps / taps.sum()).tolist()
    k = 2 * half + 1
    y = torch.nn.functional.pad(img[None], (half, half, 0, 0), mode="reflect")[0]
    acc = y[:, :, 0:w] * taps[0]
    for i in range(1, k):
        acc.add_(y[:, :, i : i + w], alpha=taps[i])
    y = torch.nn.functional.pad(acc[None], (0, 0, half, half), mode="reflect")[0]
    out = y[:, 0:h] * taps[0]
    for i in range(1, k):
        out.add_(y[:, i : i + h], alpha=taps[i])
    return out


class FastColorJitter(v2.ColorJitter):
    """``v2.ColorJitter`` (same random draws) using :func:`adjust_hue_fast` on float tensors."""

    def transform(self, inpt, params):
        if type(inpt) is not torch.Tensor or not inpt.is_floating_point():
            return super().transform(inpt, params)
        out = inpt
        for fn_id in params["fn_idx"].tolist():
            if fn_id == 0 and params["brightness_factor"] is not None:
                out = F.adjust_brightness(out, params["brightness_factor"])
            elif fn_id == 1 and params["contrast_factor"] is not None:
                out = F.adjust_contrast(out, params["contrast_factor"])
            elif fn_id == 2 and params["saturation_factor"] is not None:
                out = F.adjust_saturation(out, params["saturation_factor"])
            elif fn_id == 3 and params["hue_factor"] is not None:
                out = adjust_hue_fast(out, params["hue_factor"])
        return out


class FastGaussianBlur(v2.GaussianBlur):
    """``v2.GaussianBlur`` (same random sigma) using :func:`gaussian_blur_fast` on float tensors."""

    def transform(self, inpt, params):
        if type(inpt) is not torch.Tensor or not inpt.is_floating_point():
            return super().transform(inpt, params)
        return gaussian_blur_fast(inpt, self.kernel_size[0], params["sigma"][0])


class ToFloat(torch.nn.Module):
    """uint8 -> float32 in [0, 1], in planar (contiguous ``CxHxW``) memory.

    Decoded images are channels-last views; the per-pixel color ops run faster on planes.
    """

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return F.to_dtype(img, torch.float32, scale=True).contiguous()


class RandomSolarize(torch.nn.Module):
    """Solarize with probability ``p`` at MoCo-v3's threshold (128 of 255, i.e. 128/255 on float
    images in [0, 1]); ``p=0`` draws no random number."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.p > 0 and torch.rand(1).item() < self.p:
            return F.solarize(img, threshold=128 if img.dtype == torch.uint8 else 128 / 255)
        return img


class PretrainTransform:
    """MoCo-v3 / BYOL two-crop asymmetric augmentation; returns ``[view1, view2]`` (then
    ``local_crops`` DINO local crops: :class:`opera.data.device_augment.BatchTwoCrop`).

    Per view: RandomResizedCrop(img_size, scale=(crop_min, 1)), horizontal flip (``flip``),
    ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8, RandomGrayscale p=0.2, GaussianBlur
    (sigma 0.1-2.0, kernel ~10% of ``img_size``) with p=1.0 / 0.1, Solarize p=0.0 / 0.2, then
    float + Normalize(mean, std). The flip is applied right after the crop: it commutes with the
    pointwise color ops and with the symmetric blur, so the distribution is MoCo-v3's while the
    color ops run on the small crop. Inputs are uint8 ``3xHxW`` tensors (or PIL images).
    """

    def __init__(
        self,
        img_size: int = 224,
        crop_min: float = 0.08,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip: bool = True,
        local_crops: int = 0,
        local_size: int = 0,
        local_scale: tuple[float, float] = LOCAL_SCALE,
    ):
        _check(img_size, crop_min)
        self.img_size, self.crop_min, self.flip = img_size, float(crop_min), flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.view1 = self._view(blur_p=1.0, solarize_p=0.0)
        self.view2 = self._view(blur_p=0.1, solarize_p=0.2)
        self.local_crops, self.local_size = int(local_crops), int(local_size) or local_size_for(img_size)
        # DINO's local_transfo: every local crop is drawn with the same transform, one after another
        self.local = self._view(*LOCAL_VIEW, size=self.local_size, scale=tuple(local_scale)) if self.local_crops else None

    def _view(self, blur_p: float, solarize_p: float, size: int | None = None,
              scale: tuple[float, float] | None = None) -> v2.Compose:
        # Geometry on uint8 (the resize has a fast uint8 kernel), then one conversion to float:
        # torchvision's uint8 color kernels convert to float and back internally for every op.
        size = size or self.img_size
        ops: list = [v2.RandomResizedCrop(size, scale=scale or (self.crop_min, 1.0), antialias=True)]
        if self.flip:
            ops.append(v2.RandomHorizontalFlip())
        ops += [
            ToFloat(),
            v2.RandomApply([FastColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply(
                [FastGaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=blur_p
            ),
            RandomSolarize(solarize_p),
            v2.Normalize(self.mean, self.std),
        ]
        return v2.Compose(ops)

    def __call__(self, img) -> list[torch.Tensor]:
        img = _as_uint8_tensor(img)
        return [self.view1(img), self.view2(img)] + [self.local(img) for _ in range(self.local_crops)]

    def __repr__(self) -> str:
        return (
            f"PretrainTransform(img_size={self.img_size}, crop_min={self.crop_min}, "
            f"flip={self.flip}" + (f", local_crops={self.local_crops}@{self.local_size}px" if self.local_crops else "") + ")"
        )


class EvalTransform:
    """Resize (short side to ``img_size*256/224`` when ``img_size >= 128``, else to ``img_size``),
    center crop ``img_size``, float + Normalize. Returns one float tensor."""

    def __init__(
        self,
        img_size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        _check(img_size)
        self.img_size = img_size
        self.mean, self.std = tuple(mean), tuple(std)
        resize = int(img_size * 256 / 224) if img_size >= 128 else img_size
        self.transform = v2.Compose(
            [
                v2.Resize(resize, antialias=True),
                v2.CenterCrop(img_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std),
            ]
        )

    def __call__(self, img) -> torch.Tensor:
        return self.transform(_as_uint8_tensor(img))

    def __repr__(self) -> str:
        return f"EvalTransform(img_size={self.img_size})"
