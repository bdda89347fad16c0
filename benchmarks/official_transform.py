"""Baseline: the OFFICIAL MoCo-v3/OPERA two-crop augmentation, a PIL ``transforms.Compose`` per view
(``main_moco.py``: ``TwoCropsTransform`` of augmentation1 / augmentation2), for the data benchmarks
(``data_pipeline.py``, ``official_pipeline.py``) to race opera's ``PretrainTransform`` against.
Not part of the package: opera trains with ``opera.data.PretrainTransform`` only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opera.data import IMAGENET_MEAN, IMAGENET_STD
from opera.errors import OperaError


class _PILGaussianBlur:
    """MoCo-v3's PIL Gaussian blur (sigma ~ U(0.1, 2.0)), drawing from torch's RNG."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        s = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=s))


class _PILSolarize:
    def __call__(self, img):
        from PIL import ImageOps

        return ImageOps.solarize(img)


class ClassicPILPretrainTransform:
    """The official MoCo-v3 PIL ``transforms.Compose`` two-crop pipeline: a PIL image in,
    ``[view1, view2]`` float tensors out (view 1: blur p=1.0, no solarize; view 2: blur p=0.1,
    solarize p=0.2)."""

    def __init__(
        self,
        img_size: int = 224,
        crop_min: float = 0.08,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip: bool = True,
    ):
        from torchvision import transforms as T

        if not isinstance(img_size, int) or img_size < 1 or not 0.0 < crop_min <= 1.0:
            raise OperaError(f"the PIL baseline needs a positive integer img_size and crop_min in (0, 1], got {img_size!r}, {crop_min!r}")
        normalize = T.Normalize(mean=list(mean), std=list(std))

        def view(blur_p: float, solarize_p: float):
            ops = [
                T.RandomResizedCrop(img_size, scale=(crop_min, 1.0)),
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
                T.RandomApply([_PILGaussianBlur((0.1, 2.0))], p=blur_p),
                T.RandomApply([_PILSolarize()], p=solarize_p),
            ]
            if flip:
                ops.append(T.RandomHorizontalFlip())
            return T.Compose(ops + [T.ToTensor(), normalize])

        self.view1 = view(1.0, 0.0)
        self.view2 = view(0.1, 0.2)

    def __call__(self, img) -> list[torch.Tensor]:
        return [self.view1(img), self.view2(img)]
