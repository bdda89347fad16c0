"""MoCo-v3's two-crop augmentation on whole batches, on the training device (``data.augment_on=device``).

The per-image recipe (:class:`opera.data.transforms.PretrainTransform`, MoCo-v3 / BYOL) runs
image by image in DataLoader workers; on a GPU node that CPU work, not the step, sets the speed.
Here it is split in two:

* **parameters, per sample, on the CPU** (:meth:`BatchTwoCrop.sample`): the crop box, flip, colour
  jitter (applied?, four factors, their order), grayscale, blur (applied?, sigma) and solarize of
  each view, drawn from torch's RNG *in the same order and with the same calls* as
  ``PretrainTransform``'s ``transforms.v2`` ops. Under the per-sample seed of
  :class:`opera.data.loader.SeededDataset` (``(seed, epoch, index)``) a sample therefore gets the
  very same augmentation parameters in both modes, and an interrupted run resumes exactly;
* **pixels, per batch, on the device** (:meth:`BatchTwoCrop.__call__`): one ``roi_align`` crops and
  resizes every view of the batch (each with its own box), then flip, colour jitter (each sample's
  own factors and order), grayscale, Gaussian blur (each sample's sigma, separable, reflect
  padding), solarize and normalisation run as batched tensor ops on the selected samples.

Where images are decoded in workers (folders), a worker decodes and cuts the two
RandomResizedCrops in uint8 (:class:`CropForDevice`) - the one step that needs the source
resolution, with the per-image path's own kernel, and cheaper for the worker than stretching the
photograph to a fixed size would be - and the device runs the rest. In-memory datasets (digits)
live on the device and run the whole recipe there, the crop by ``roi_align`` (equal to the
per-image crop up to interpolation error; ``tests/data/test_device_augment.py``).

Own torch code rather than ``kornia.augmentation``: kornia applies ColorJitter's four ops in one
order per batch (MoCo-v3/torchvision draw the order per image), crops with a per-sample Python
loop or an unfiltered ``grid_sample``, and measured slower on the CPU (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from opera.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LOCAL_SCALE,
    LOCAL_VIEW,
    _check,
    adjust_hue_fast,
    blur_kernel_size,
    local_size_for,
)

#: Columns of one view's parameter row (``BatchTwoCrop.sample`` -> ``[2, NUM_PARAMS]`` per sample).
PARAM_NAMES = (
    "top", "left", "height", "width",  # crop box in source pixels (RandomResizedCrop.make_params)
    "src_h", "src_w",  # size of the source image the box refers to
    "flip",
    "jitter", "brightness", "contrast", "saturation", "hue",  # ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8
    "order0", "order1", "order2", "order3",  # ColorJitter's op order (0 b, 1 c, 2 s, 3 h)
    "gray",
    "blur", "sigma",
    "solarize",
)
P = {name: k for k, name in enumerate(PARAM_NAMES)}
NUM_PARAMS = len(PARAM_NAMES)

#: MoCo-v3's asymmetric views: (blur p, solarize p). They are DINO's two global views too.
VIEWS = ((1.0, 0.0), (0.1, 0.2))

JITTER = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))  # ColorJitter(0.4, 0.4, 0.2, 0.1) ranges
JITTER_P, GRAY_P, FLIP_P = 0.8, 0.2, 0.5
RATIO = (3.0 / 4.0, 4.0 / 3.0)
SIGMA = (0.1, 2.0)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On the CPU, run the batched ops with one intra-op thread, then restore the count.

    They are ~100 small tensor ops per batch; with the step's 2+ OpenMP threads each one is a
    parallel region that, on a busy machine, waits a scheduler time slice for a descheduled
    partner thread: 1-13 s per 64-image batch at 64 px with 2 threads vs 0.08 s with 1, measured
    under load 15 (BENCHMARKS.md). Values do not depend on the thread count here."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(lo, hi, generator=g))


def _rand(g: torch.Generator | None) -> float:
    return float(torch.rand(1, generator=g))


def crop_box(height: int, width: int, scale: tuple[float, float], g: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """``RandomResizedCrop`` box ``(top, left, h, w)``: torchvision's algorithm and RNG calls
    (10 tries of area ~ U(scale), log aspect ~ U(log 3/4, log 4/3), then a centre crop)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=g))
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=g))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        h, w = height, int(round(height * max(RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class BatchTwoCrop:
    """MoCo-v3 two-crop augmentation of a batch, each sample with its own random parameters.

    ``sample((H, W))`` draws one sample's ``[2, NUM_PARAMS]`` parameters (the draws of
    ``PretrainTransform``); ``self(images, params)`` turns uint8 ``[B, 3, h, w]`` images (on any
    device; ``params`` ``[B, 2, NUM_PARAMS]``) into ``[view1, view2]``, float ``[B, 3, S, S]``,
    normalised - the views of Eq. 34.

    Multi-crop (DINO, Caron et al. 2021, ``DataAugmentationDINO``): ``local_crops=N`` adds N local
    crops after the two global views, each ``local_size`` px (0: 96/224 of ``img_size``) from a
    RandomResizedCrop of scale ``local_scale`` (DINO's (0.05, 0.4)), flipped and colour-jittered as
    the global views, blurred with p 0.5 and never solarized. Their parameters are drawn after the
    global views' from the same per-sample generator, so the global views of a sample are those of
    the two-crop recipe, and resume stays exact.
    """

    def __init__(self, img_size: int = 224, crop_min: float = 0.08, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, flip: bool = True, local_crops: int = 0, local_size: int = 0,
                 local_scale: tuple[float, float] = LOCAL_SCALE):
        _check(img_size, crop_min)
        self.img_size, self.crop_min, self.flip = img_size, float(crop_min), flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.kernel_size = blur_kernel_size(img_size)
        self.local_crops = int(local_crops)
        self.local_size = int(local_size) or local_size_for(img_size)
        self.local_scale = (float(local_scale[0]), float(local_scale[1]))
        if self.local_crops:
            _check(self.local_size, self.local_scale[0])

    @property
    def views(self) -> tuple[tuple[float, float, float, float, int], ...]:
        """Each view's (crop scale min, max, blur p, solarize p, size): the two global views, then
        the local crops."""
        g = tuple((self.crop_min, 1.0, blur_p, solarize_p, self.img_size) for blur_p, solarize_p in VIEWS)
        return g + ((*self.local_scale, *LOCAL_VIEW, self.local_size),) * self.local_crops

    def size_of(self, view: int) -> int:
        return self.img_size if view < len(VIEWS) else self.local_size

    # ------------------------------------------------------------------ parameters (CPU)
    def sample(self, src_hw: tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
        """Both views' parameters for a source image of ``src_hw`` pixels, drawn from
        ``generator`` (default: torch's global RNG) in ``PretrainTransform``'s order."""
        h, w = int(src_hw[0]), int(src_hw[1])
        rows = torch.zeros(len(self.views), NUM_PARAMS, dtype=torch.float64)
        for v, (lo, hi, blur_p, solarize_p, _) in enumerate(self.views):
            r = rows[v]
            r[0:4] = torch.tensor(crop_box(h, w, (lo, hi), generator), dtype=torch.float64)
            r[P["src_h"]], r[P["src_w"]] = h, w
            if self.flip:
                r[P["flip"]] = float(_rand(generator) < FLIP_P)
            if _rand(generator) < JITTER_P:  # RandomApply: draws, then the ColorJitter's params
                r[P["jitter"]] = 1.0
                r[P["order0"] : P["order3"] + 1] = torch.randperm(4, generator=generator).to(torch.float64)
                for k, (lo, hi) in enumerate(JITTER):
                    r[P["brightness"] + k] = _uniform(lo, hi, generator)
            r[P["gray"]] = float(_rand(generator) < GRAY_P)
            if _rand(generator) < blur_p:
                r[P["blur"]] = 1.0
                r[P["sigma"]] = _uniform(SIGMA[0], SIGMA[1], generator)
            if solarize_p > 0:
                r[P["solarize"]] = float(_rand(generator) < solarize_p)
        return rows

    def sample_seeded(self, seeds: Sequence[int], sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``[B, 2, NUM_PARAMS]``: sample ``b`` drawn from a generator seeded with ``seeds[b]``
        (what ``SeededDataset`` does to the global RNG in a worker, so both give the same draws)."""
        g = torch.Generator()
        out = []
        for s, hw in zip(seeds, sizes):
            g.manual_seed(int(s))
            out.append(self.sample(hw, g))
        return torch.stack(out)

    # ------------------------------------------------------------------ pixels (device)
    def __call__(self, images: torch.Tensor, params: torch.Tensor) -> list[torch.Tensor]:
        """``[view1, view2]`` from uint8 source images ``[B, 3, h, w]`` (an in-memory dataset's
        images on the device): every step of the recipe, the crop included, batched here."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {tuple(images.shape)}")
        params = params.to(torch.float64).cpu()
        with _one_cpu_thread(images.device):
            src = _to_float(images)
            return [self.finish(self.resized_crop(src, params[:, v], self.size_of(v)), params[:, v])
                    for v in range(params.shape[1])]

    def from_crops(self, crops: torch.Tensor, params: torch.Tensor, local: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[view1, view2, local crops...]`` from the two uint8 global crops ``[B, 2, 3, S, S]``
        (and the local ones ``[B, L, 3, s, s]``) that workers cut (:class:`CropForDevice`): the
        recipe after the crop, batched here."""
        if crops.ndim != 5 or crops.shape[1] != len(VIEWS) or crops.shape[2] != 3:
            raise ValueError(f"expected uint8 crops [B, 2, 3, S, S], got {tuple(crops.shape)}")
        views = [crops[:, v] for v in range(crops.shape[1])] + ([] if local is None else [local[:, v] for v in range(local.shape[1])])
        if len(views) != params.shape[1]:
            raise ValueError(f"{len(views)} crops for {params.shape[1]} views' parameters")
        params = params.to(torch.float64).cpu()
        with _one_cpu_thread(crops.device):
            return [self.finish(_to_float(x), params[:, v]) for v, x in enumerate(views)]

    def finish(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """The recipe after the crop, on float ``[B, 3, S, S]`` in [0, 1] (modified in place):
        flip, colour jitter, grayscale, blur, solarize, normalise; ``p`` ``[B, NUM_PARAMS]``."""
        dev = x.device
        if self.flip:
            idx = _where(p[:, P["flip"]], dev)
            if idx.numel():
                x[idx] = x[idx].flip(-1)
        x = self.color_jitter(x, p)
        idx = _where(p[:, P["gray"]], dev)
        if idx.numel():
            x[idx] = F.rgb_to_grayscale(x[idx], num_output_channels=3)
        x = self.gaussian_blur(x, p)
        idx = _where(p[:, P["solarize"]], dev)
        if idx.numel():
            sub = x[idx]
            x[idx] = torch.where(sub >= 128 / 255, 1.0 - sub, sub)
        return F.normalize(x, list(self.mean), list(self.std), inplace=True)

    def resized_crop(self, src: torch.Tensor, p: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Crop each sample's box (source pixels, mapped onto ``src``'s size) and resize it to
        ``size`` (default ``img_size``): bilinear, averaging ``ceil(box / img_size)``^2 samples per output pixel when
        shrinking (``roi_align``, aligned=True), like the antialiased resize of the per-image path."""
        b, _, h, w = src.shape
        sy, sx = h / p[:, P["src_h"]], w / p[:, P["src_w"]]
        y0, x0 = p[:, P["top"]] * sy, p[:, P["left"]] * sx
        y1, x1 = y0 + p[:, P["height"]] * sy, x0 + p[:, P["width"]] * sx
        boxes = torch.stack([torch.arange(b, dtype=torch.float64), x0, y0, x1, y1], 1)
        s = size or self.img_size
        # one roi_align per distinct sampling ratio (its adaptive choice is per box already; a
        # fixed, larger ratio for all would cost more), samples in their own order
        ratio = torch.ceil(torch.maximum(y1 - y0, x1 - x0) / s).clamp_min(1).to(torch.int64)
        out = src.new_empty(b, 3, s, s)
        for r in ratio.unique().tolist():
            sel = (ratio == r).nonzero().flatten()
            out[sel.to(src.device)] = roi_align(src, boxes[sel].to(src), output_size=(s, s), spatial_scale=1.0,
                                                sampling_ratio=int(r), aligned=True)
        return out.clamp_(0.0, 1.0)

    def color_jitter(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """ColorJitter(0.4, 0.4, 0.2, 0.1) on the samples that drew it, each applying brightness,
        contrast, saturation and hue in its own order (torchvision's float kernels, batched)."""
        applied = p[:, P["jitter"]] > 0.5
        if not bool(applied.any()):
            return x
        for slot in range(4):
            op_of = p[:, P["order0"] + slot].round().to(torch.int64)
            for op in range(4):
                idx = _where(applied & (op_of == op), x.device)
                if not idx.numel():
                    continue
                f = p[idx.cpu(), P["brightness"] + op].to(x)
                x[idx] = _jitter_op(x[idx], op, f)
        return x

    def gaussian_blur(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Gaussian blur (kernel ``blur_kernel_size``, reflect padding) of the samples that drew
        it, each with its own sigma; separable shift-adds, taps beyond 4 sigma dropped (< 3.4e-4 of
        the peak, as ``gaussian_blur_fast``). Samples are grouped by that tap count."""
        blur = p[:, P["blur"]] > 0.5
        if not bool(blur.any()):
            return x
        sigma = p[:, P["sigma"]]
        s = x.shape[-1]
        kernel_size = self.kernel_size if s == self.img_size else blur_kernel_size(s)
        half = torch.ceil(4.0 * sigma).clamp(max=kernel_size // 2).clamp(max=min(x.shape[-2:]) - 1).to(torch.int64)
        for hf in half[blur].unique().tolist():
            sel = (blur & (half == hf)).nonzero().flatten()
            if hf < 1:
                continue
            t = torch.arange(-hf, hf + 1, dtype=torch.float64)
            taps = torch.exp(-0.5 * (t[None] / sigma[sel, None]) ** 2)
            taps = (taps / taps.sum(1, keepdim=True)).to(x)  # [n, 2 hf + 1]
            idx = sel.to(x.device)
            x[idx] = _separable(x[idx], taps, hf, s)
        return x


def _separable(x: torch.Tensor, taps: torch.Tensor, half: int, size: int) -> torch.Tensor:
    n = x.shape[0]
    h, w = x.shape[-2:]
    wt = taps.view(n, 1, 1, 1, -1)
    y = torch.nn.functional.pad(x, (half, half, 0, 0), mode="reflect")
    acc = y[..., 0:w] * wt[..., 0]
    for i in range(1, 2 * half + 1):
        acc.addcmul_(y[..., i : i + w], wt[..., i])
    y = torch.nn.functional.pad(acc, (0, 0, half, half), mode="reflect")
    out = y[..., 0:h, :] * wt[..., 0]
    for i in range(1, 2 * half + 1):
        out.addcmul_(y[..., i : i + h, :], wt[..., i])
    return out


def _jitter_op(x: torch.Tensor, op: int, f: torch.Tensor) -> torch.Tensor:
    """One ColorJitter op with per-sample factors ``f`` ``[n]`` on float ``[n, 3, H, W]``
    (torchvision's ``_blend`` formulas: brightness, contrast, saturation; hue closed form)."""
    f4 = f.view(-1, 1, 1, 1)
    if op == 0:
        return x.mul(f4).clamp_(0.0, 1.0)
    if op == 3:
        return adjust_hue_fast(x, f.view(-1, 1, 1))
    gray = F.rgb_to_grayscale(x, num_output_channels=1)
    if op == 1:
        gray = gray.mean(dim=(-3, -2, -1), keepdim=True)
    return x.mul(f4).add_(gray.mul(1.0 - f4)).clamp_(0.0, 1.0)


def _where(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    return (mask > 0.5).nonzero().flatten().to(device)


def _to_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0)
    return images.to(torch.float32, copy=True)


class CropForDevice:
    """The worker half of ``augment_on=device`` for datasets decoded in workers: a uint8
    ``3xHxW`` image becomes ``(its two RandomResizedCrops [2, 3, S, S] uint8, their
    [2, NUM_PARAMS] parameters)``. The crop is the one step that needs the full-resolution
    source, and ``F.resized_crop`` on uint8 is the per-image path's own kernel, so the crops are
    exactly ``PretrainTransform``'s; everything after them runs batched on the device
    (:meth:`BatchTwoCrop.from_crops`). Parameters come from torch's global RNG, which
    ``SeededDataset`` seeds with the sample's seed."""

    def __init__(self, two_crop: BatchTwoCrop):
        self.two_crop = two_crop

    def __call__(self, img) -> tuple[torch.Tensor, ...]:
        from opera.data.transforms import _as_uint8_tensor

        img = _as_uint8_tensor(img)
        aug = self.two_crop
        params = aug.sample((img.shape[-2], img.shape[-1]))
        crops = [F.resized_crop(img, *[int(v) for v in row[0:4]], [aug.size_of(k)] * 2, antialias=True)
                 for k, row in enumerate(params)]
        g = len(VIEWS)
        if aug.local_crops:  # (global crops, local crops, parameters): the two sizes batch apart
            return torch.stack(crops[:g]), torch.stack(crops[g:]), params
        return torch.stack(crops), params

    def __repr__(self) -> str:
        return f"CropForDevice({self.two_crop.img_size}px)"
