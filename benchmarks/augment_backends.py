"""Batched MoCo-v3 two-crop augmentation: opera's own torch code vs ``kornia.augmentation``, and the
per-image ``PretrainTransform`` loop, on the same uint8 batch, interleaved round by round; median ms
per batch (both views).

``--path crops`` (what runs on the device for a folder: the workers already cut the two uint8
crops) times everything after the crop; ``--path sources`` (an in-memory dataset on the device)
times the whole recipe from ``--side``-pixel source images, the crop included.

    python benchmarks/augment_backends.py --path crops --img-size 64 --batch-size 64 --threads 1 --rounds 7
    python benchmarks/augment_backends.py --path sources --side 96 --img-size 64 --batch-size 64 --threads 1
    python benchmarks/augment_backends.py --device cuda --img-size 224 --batch-size 256   # on a GPU

kornia runs the same recipe: RandomResizedCrop(scale=(crop_min, 1)), flip, ColorJitter(0.4, 0.4,
0.2, 0.1, p=0.8), RandomGrayscale(0.2), RandomGaussianBlur(kernel, (0.1, 2.0), p=1.0/0.1),
RandomSolarize(threshold 0.5, p=0/0.2), Normalize - its default cropping mode ("slice") and its
own per-sample parameters (note: one ColorJitter order per batch, not per image).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from opera.data.device_augment import BatchTwoCrop
from opera.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PretrainTransform, blur_kernel_size


def kornia_views(img_size: int, crop_min: float, crop: bool = True):
    import kornia.augmentation as K

    k = blur_kernel_size(img_size)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)

    def view(blur_p: float, solarize_p: float):
        first = [K.RandomResizedCrop((img_size, img_size), scale=(crop_min, 1.0))] if crop else []
        return K.AugmentationSequential(
            *first,
            K.RandomHorizontalFlip(),
            K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((k, k), (0.1, 2.0), p=blur_p),
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=solarize_p),
            K.Normalize(mean, std),
        )

    return view(1.0, 0.0), view(0.1, 0.2)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--path", choices=("crops", "sources"), default="crops")
    p.add_argument("--side", type=int, default=None, help="source side for --path sources (default: 2 x img-size)")
    p.add_argument("--crop-min", type=float, default=0.08)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-per-image", action="store_true", help="skip the per-image loop (slow at 224 px)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    crops = a.path == "crops"
    side = a.img_size if crops else (a.side or 2 * a.img_size)
    g = torch.Generator().manual_seed(0)
    low = torch.rand(a.batch_size, 3, side // 16 + 2, side // 16 + 2, generator=g)
    imgs = (torch.nn.functional.interpolate(low, size=(side, side), mode="bicubic") .clamp(0, 1) * 255).to(torch.uint8)
    imgs_dev = imgs.to(dev)
    ours = BatchTwoCrop(a.img_size, a.crop_min)
    k1, k2 = kornia_views(a.img_size, a.crop_min, crop=not crops)
    k1, k2 = k1.to(dev), k2.to(dev)
    per_image = PretrainTransform(a.img_size, a.crop_min)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    pairs = torch.stack([imgs_dev, imgs_dev.flip(-1)], 1)  # [B, 2, 3, S, S]: the workers' two crops

    def run_ours():
        params = ours.sample_seeded(range(a.batch_size), [(side, side)] * a.batch_size)
        return ours.from_crops(pairs, params) if crops else ours(imgs_dev, params)

    def run_kornia():
        if crops:
            return [k1(pairs[:, 0].float().div_(255)), k2(pairs[:, 1].float().div_(255))]
        x = imgs_dev.float().div_(255)
        return [k1(x), k2(x)]

    def run_per_image():  # the whole per-image recipe (its crop included) - what a worker runs
        return [torch.stack(v) for v in zip(*(per_image(im) for im in imgs))]

    variants = {"opera": run_ours, "kornia": run_kornia}
    if not a.no_per_image and dev.type == "cpu":
        variants["per_image"] = run_per_image
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(a.rounds + 1):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r:  # round 0 is warm-up
                times[name].append(time.perf_counter() - t0)
    out = {"path": a.path, "img_size": a.img_size, "batch_size": a.batch_size, "side": side, "threads": a.threads, "device": str(dev),
           "rounds": a.rounds, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}}
    out["kornia_over_opera"] = out["kornia_ms"] / out["opera_ms"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
