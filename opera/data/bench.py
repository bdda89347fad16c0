"""Data-pipeline benchmark: our uint8 ``transforms.v2`` pipeline vs the classic PIL one.

Both pipelines decode a JPEG and produce MoCo-v3's two augmented crops, one image at a time, in
one thread (the cost inside one DataLoader worker), or through a DataLoader with ``workers``
processes (then the throughput is divided by ``workers``).

    python -m opera.data.bench --folder /tmp/jpegs --make 64 --img-size 224
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from opera.data.datasets import IMAGE_EXTS, decode_image_file
from opera.data.transforms import ClassicPILPretrainTransform, PretrainTransform
from opera.errors import OperaError


def make_jpeg_folder(
    dir: str, n: int, size: int | tuple[int, int] = (500, 375), classes: int = 4, seed: int = 0
) -> str:
    """Write ``n`` random JPEGs (``size`` = side or (width, height)) into ``classes`` class folders.

    The images are smooth random fields plus mild noise, so they compress (and decode) like
    photographs rather than like white noise. Returns ``dir``.
    """
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(dir, f"class{c}"), exist_ok=True)
    for i in range(n):
        low = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, size=(h, w, 3))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        img.save(os.path.join(dir, f"class{i % classes}", f"img{i:06d}.jpg"), quality=90)
    return dir


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
        tmp = path + ".tmp"
        img.save(tmp, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
        os.replace(tmp, path)
    return dir


def _files(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTS)]
    if not out:
        raise OperaError(f"no images in {folder}; create some with make_jpeg_folder(dir, n, size)")
    return out


class _V2Set(torch.utils.data.Dataset):
    def __init__(self, files, img_size):
        self.files, self.t = files, PretrainTransform(img_size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.t(decode_image_file(self.files[i]))


class _PILSet(torch.utils.data.Dataset):
    def __init__(self, files, img_size):
        self.files, self.t = files, ClassicPILPretrainTransform(img_size)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with open(self.files[i], "rb") as f:  # torchvision's pil_loader
            img = Image.open(f).convert("RGB")
        return self.t(img)


def _time_in_process(pil_ds, v2_ds, n_images: int, batch_size: int) -> tuple[float, float]:
    """Images/s of each pipeline in this process on one thread, alternating batch by batch so
    that load from other processes on the machine hits both pipelines alike."""
    idx = [i % len(pil_ds) for i in range(n_images)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spent = {"pil": 0.0, "v2": 0.0}
    try:
        for i in idx[: min(4, len(idx))]:  # warm-up
            pil_ds[i], v2_ds[i]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            for name, ds in (("pil", pil_ds), ("v2", v2_ds)):
                t0 = time.perf_counter()
                for i in chunk:
                    ds[i]
                spent[name] += time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return n_images / spent["pil"], n_images / spent["v2"]


def _time_loader(ds, n_images: int, batch_size: int, workers: int) -> float:
    """Images/s per worker through a DataLoader with ``workers`` processes."""
    idx = [i % len(ds) for i in range(n_images)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx), batch_size=batch_size, num_workers=workers
    )
    t0 = None
    seen = 0
    for k, (v1, _v2) in enumerate(loader):
        if k == 0:  # exclude worker start-up
            t0 = time.perf_counter()
            continue
        seen += v1.shape[0]
    if t0 is None or seen == 0:
        raise OperaError("the benchmark needs at least 2 batches with workers; raise --batches")
    return seen / (time.perf_counter() - t0) / workers


def bench_pipeline(
    folder: str, img_size: int = 224, batches: int = 4, batch_size: int = 32, workers: int = 0
) -> dict:
    """Time two-crop augmentation of the JPEGs in ``folder``, per worker.

    Returns ``{"v2_img_per_s", "pil_img_per_s", "speedup", "images", "img_size", "workers"}``.
    ``workers=0`` runs in this process with one thread (the cost inside one DataLoader worker).
    """
    if batches < 1 or batch_size < 1 or workers < 0:
        raise OperaError("batches and batch_size must be >= 1 and workers >= 0")
    files = _files(folder)
    n = batches * batch_size
    torch.manual_seed(0)
    pil_ds, v2_ds = _PILSet(files, img_size), _V2Set(files, img_size)
    if workers == 0:
        pil, v2 = _time_in_process(pil_ds, v2_ds, n, batch_size)
    else:
        pil = _time_loader(pil_ds, n, batch_size, workers)
        v2 = _time_loader(v2_ds, n, batch_size, workers)
    return {
        "v2_img_per_s": v2,
        "pil_img_per_s": pil,
        "speedup": v2 / pil,
        "images": n,
        "img_size": img_size,
        "workers": workers,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--make", type=int, default=0, help="first write this many random JPEGs")
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    a = p.parse_args(argv)
    if a.make:
        make_jpeg_folder(a.folder, a.make, tuple(a.size))
    r = bench_pipeline(a.folder, a.img_size, a.batches, a.batch_size, a.workers)
    print(
        f"{r['images']} images, img_size {r['img_size']}, workers {r['workers']}: "
        f"v2 {r['v2_img_per_s']:.1f} img/s, PIL {r['pil_img_per_s']:.1f} img/s per worker, "
        f"speedup {r['speedup']:.2f}x"
    )


if __name__ == "__main__":
    main()
