"""Data-pipeline benchmark: opera's uint8 ``transforms.v2`` two-crop pipeline (``opera.bench``) vs the
official MoCo-v3 PIL one (``official_transform.py``).

Both decode a JPEG and produce MoCo-v3's two augmented crops, one image at a time, in one thread
(the cost inside one DataLoader worker), alternating batch by batch so that load from other
processes hits both alike; or through a DataLoader with ``workers`` processes (then the throughput
is divided by ``workers``).

    python benchmarks/data_pipeline.py --folder /tmp/jpegs --make 64 --img-size 224
    python benchmarks/data_pipeline.py --folder /tmp/jpegs --img-size 64 --batch-size 64 --batches 8 --device-half
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from official_transform import ClassicPILPretrainTransform  # noqa: E402

from opera.bench import TwoCropFiles, image_files, time_loader  # noqa: E402
from opera.errors import OperaError  # noqa: E402


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


class PILFiles(torch.utils.data.Dataset):
    """torchvision's ``pil_loader`` + the official two-crop ``transforms.Compose``."""

    def __init__(self, files: list[str], img_size: int):
        self.files, self.transform = files, ClassicPILPretrainTransform(img_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with open(self.files[i], "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img)


class CropFiles(torch.utils.data.Dataset):
    """The worker half of ``data.augment_on=device`` (the default): decode, then the two uint8
    RandomResizedCrops with their parameters (``CropForDevice``). Flip, jitter, grayscale, blur,
    solarize and normalisation run batched on the training device afterwards, not in the worker.
    :func:`crop_files` adds the per-sample seeding a training worker does."""

    def __init__(self, files: list[str], img_size: int):
        from opera.data.device_augment import BatchTwoCrop, CropForDevice

        self.files, self.crop = files, CropForDevice(BatchTwoCrop(img_size))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from opera.data.datasets import decode_image_file

        return self.crop(decode_image_file(self.files[i]))


def crop_files(files: list[str], img_size: int, seed: int = 0):
    """:class:`CropFiles` under ``SeededDataset``, as a training worker runs it (seed, epoch 0, index)."""
    from opera.data.loader import SeededDataset

    return SeededDataset(CropFiles(files, img_size), seed)


def _time_in_process(pil_ds, v2_ds, n_images: int, batch_size: int, crop_ds=None) -> tuple[float, ...]:
    """Images/s of each pipeline in this process on one thread, alternating batch by batch:
    (PIL, v2) or, with ``crop_ds``, (PIL, v2, crop)."""
    idx = [i % len(pil_ds) for i in range(n_images)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipelines = [("pil", pil_ds), ("v2", v2_ds)] + ([("crop", crop_ds)] if crop_ds is not None else [])
    spent = {name: 0.0 for name, _ in pipelines}
    try:
        for i in idx[: min(4, len(idx))]:  # warm-up
            for _, ds in pipelines:
                ds[i]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            for name, ds in pipelines:
                t0 = time.perf_counter()
                for i in chunk:
                    ds[i]
                spent[name] += time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return tuple(n_images / spent[name] for name, _ in pipelines)


def compare_pipelines(folder: str, img_size: int = 224, batches: int = 4, batch_size: int = 32, workers: int = 0,
                      device_half: bool = False) -> dict:
    """``{"v2_img_per_s", "pil_img_per_s", "speedup", "images", "img_size", "workers"}``, per worker;
    ``device_half`` (in-process only) adds ``crop_img_per_s`` and ``crop_speedup``: the worker's
    share of ``augment_on=device`` (:func:`crop_files`) against the official per-image PIL work."""
    if batches < 1 or batch_size < 1 or workers < 0:
        raise OperaError("batches and batch_size must be >= 1 and workers >= 0")
    if device_half and workers:
        raise OperaError("--device-half times one thread in this process; use it with --workers 0")
    files = image_files(folder)
    n = batches * batch_size
    torch.manual_seed(0)
    pil_ds, v2_ds = PILFiles(files, img_size), TwoCropFiles(files, img_size)
    extra = {}
    if workers == 0:
        rates = _time_in_process(pil_ds, v2_ds, n, batch_size, crop_files(files, img_size) if device_half else None)
        pil, v2 = rates[:2]
        if device_half:
            extra = {"crop_img_per_s": rates[2], "crop_speedup": rates[2] / pil}
    else:
        pil = time_loader(pil_ds, n, batch_size, workers)
        v2 = time_loader(v2_ds, n, batch_size, workers)
    return {"v2_img_per_s": v2, "pil_img_per_s": pil, "speedup": v2 / pil, "images": n, "img_size": img_size,
            "workers": workers, **extra}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--make", type=int, default=0, help="first write this many random JPEGs")
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device-half", action="store_true",
                   help="also time the worker's share of augment_on=device (decode + two uint8 crops)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    if a.make:
        make_jpeg_folder(a.folder, a.make, tuple(a.size))
    r = compare_pipelines(a.folder, a.img_size, a.batches, a.batch_size, a.workers, a.device_half)
    if a.json:
        print(json.dumps(r))
        return
    print(f"{r['images']} images, img_size {r['img_size']}, workers {r['workers']}: "
          f"v2 {r['v2_img_per_s']:.1f} img/s, PIL {r['pil_img_per_s']:.1f} img/s per worker, speedup {r['speedup']:.2f}x")
    if "crop_img_per_s" in r:
        print(f"  augment_on=device, the worker's share (decode + two uint8 crops): {r['crop_img_per_s']:.1f} img/s, "
              f"{r['crop_speedup']:.2f}x the PIL per-image work")


if __name__ == "__main__":
    main()
