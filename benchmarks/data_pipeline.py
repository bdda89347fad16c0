"""Data-pipeline benchmark: opera's uint8 ``transforms.v2`` two-crop pipeline (``opera.bench``) vs the
official MoCo-v3 PIL one (``official_transform.py``).

Both decode a JPEG and produce MoCo-v3's two augmented crops, one image at a time, in one thread
(the cost inside one DataLoader worker), alternating batch by batch so that load from other
processes hits both alike; or through a DataLoader with ``workers`` processes (then the throughput
is divided by ``workers``).

    python benchmarks/data_pipeline.py --folder /tmp/jpegs --make 64 --img-size 224
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


def _time_in_process(pil_ds, v2_ds, n_images: int, batch_size: int) -> tuple[float, float]:
    """Images/s of each pipeline in this process on one thread, alternating batch by batch."""
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


def compare_pipelines(folder: str, img_size: int = 224, batches: int = 4, batch_size: int = 32, workers: int = 0) -> dict:
    """``{"v2_img_per_s", "pil_img_per_s", "speedup", "images", "img_size", "workers"}``, per worker."""
    if batches < 1 or batch_size < 1 or workers < 0:
        raise OperaError("batches and batch_size must be >= 1 and workers >= 0")
    files = image_files(folder)
    n = batches * batch_size
    torch.manual_seed(0)
    pil_ds, v2_ds = PILFiles(files, img_size), TwoCropFiles(files, img_size)
    if workers == 0:
        pil, v2 = _time_in_process(pil_ds, v2_ds, n, batch_size)
    else:
        pil = time_loader(pil_ds, n, batch_size, workers)
        v2 = time_loader(v2_ds, n, batch_size, workers)
    return {"v2_img_per_s": v2, "pil_img_per_s": pil, "speedup": v2 / pil, "images": n, "img_size": img_size, "workers": workers}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", required=True)
    p.add_argument("--make", type=int, default=0, help="first write this many random JPEGs")
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line")
    a = p.parse_args(argv)
    if a.make:
        make_jpeg_folder(a.folder, a.make, tuple(a.size))
    r = compare_pipelines(a.folder, a.img_size, a.batches, a.batch_size, a.workers)
    if a.json:
        print(json.dumps(r))
        return
    print(f"{r['images']} images, img_size {r['img_size']}, workers {r['workers']}: "
          f"v2 {r['v2_img_per_s']:.1f} img/s, PIL {r['pil_img_per_s']:.1f} img/s per worker, speedup {r['speedup']:.2f}x")


if __name__ == "__main__":
    main()
