"""Folders of real JPEGs for trying the image-folder path without a dataset: random crops of the two
photographs scikit-learn ships, at ImageNet-typical sizes (``opera data make-folder DIR``; the
end-to-end benchmarks and the resume tests use it)."""

from __future__ import annotations

import math
import os

import numpy as np

from opera.files import atomic_write
from opera.errors import OperaError


def make_photo_folder(
    dir: str, n: int = 2000, classes: int = 10, seed: int = 0,
    short_side: tuple[int, int] = (300, 500), quality: tuple[int, int] = (75, 95),
) -> str:
    """Write ``n`` JPEGs at ImageNet-typical sizes into ``classes`` class folders of ``dir``.

    Each image is a random crop (area 25-100%, aspect 3:4-4:3) of one of the two photographs that
    scikit-learn ships (``sklearn.datasets.load_sample_images``: china.jpg, flower.jpg), scaled
    so its shorter side is uniform in ``short_side`` pixels, mirrored half the time, with a mild
    brightness change, saved at a JPEG quality uniform in ``quality``: real photographic content,
    so decode cost is realistic. Deterministic in ``seed``; each file is written to a temporary
    name and renamed (a killed run leaves no truncated JPEG). Nothing is downloaded. Returns ``dir``.
    """
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    if n < 1 or classes < 1:
        raise OperaError(f"make-folder needs --n >= 1 and --classes >= 1, got n={n}, classes={classes}")
    try:
        os.makedirs(dir, exist_ok=True)
        for c in range(classes):
            os.makedirs(os.path.join(dir, f"class{c:03d}"), exist_ok=True)
    except OSError as e:
        raise OperaError(f"cannot create {dir}: {e.strerror or e}; choose another directory") from None
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = photos[int(rng.integers(len(photos)))]
        area = rng.uniform(0.25, 1.0) * src.width * src.height
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = min(src.width, int(round(math.sqrt(area * aspect))))
        h = min(src.height, int(round(math.sqrt(area / aspect))))
        x, y = int(rng.integers(0, src.width - w + 1)), int(rng.integers(0, src.height - h + 1))
        img = src.crop((x, y, x + w, y + h))
        short = int(rng.integers(short_side[0], short_side[1] + 1))
        scale = short / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
        path = os.path.join(dir, f"class{i % classes:03d}", f"img{i:06d}.jpg")
        q = int(rng.integers(quality[0], quality[1] + 1))
        atomic_write(path, lambda tmp, img=img, q=q: img.save(tmp, format="JPEG", quality=q), what="a photo of the folder")
    return dir
