"""Baseline: the OFFICIAL MoCo-v3/OPERA pipeline end to end, timed like ``opera bench --end-to-end``.

``main_moco.py``'s data path - ``torchvision.datasets.ImageFolder`` (PIL loader) with the two-crop
``transforms.Compose`` (``TwoCropsTransform``: RandomResizedCrop, ColorJitter p=0.8, grayscale 0.2,
blur 1.0/0.1, solarize 0/0.2, flip, ToTensor, Normalize - ``official_transform.py``) and a
``DataLoader(shuffle=True, num_workers, pin_memory=True, drop_last=True)`` rebuilt every epoch -
feeding the official-equivalent step of ``official_step.py``. Timing, data-wait share and peak
memory of the process and its workers come from ``opera.bench.time_pipeline``, the same function
the opera side uses.

    python benchmarks/official_pipeline.py --data DIR --backbone resnet18 --img-size 64 --batch-size 64 --workers 2 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from official_step import build, train_step  # noqa: E402
from official_transform import ClassicPILPretrainTransform  # noqa: E402

from opera.bench import endless, time_pipeline  # noqa: E402


def bench_official_pipeline(data: str, backbone: str = "resnet18", img_size: int = 64, batch_size: int = 64,
                            workers: int = 2, steps: int = 30, warmup: int = 3, threads: int = 2, mlp_dim: int = 4096,
                            crop_min: float = 0.08, patch_size: int | None = None) -> dict:
    from torchvision.datasets import ImageFolder

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dataset = ImageFolder(data, transform=ClassicPILPretrainTransform(img_size, crop_min=crop_min))
    model, optimizer = build(backbone, img_size, patch_size, mlp_dim=mlp_dim, num_classes=len(dataset.classes))
    model.train()

    def epoch(_e: int):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                             pin_memory=torch.cuda.is_available(), drop_last=True)
        for (x1, x2), y in loader:
            yield (x1, x2), y

    def step(i: int, views, labels):
        return train_step(model, optimizer, views[0], views[1], labels, lr=optimizer.param_groups[0]["lr"], moco_m=0.99)

    result = time_pipeline(endless(epoch), step, steps, warmup, batch_size)
    return {"pipeline": "official", "impl": "official", "backbone": backbone, "img_size": img_size, "batch_size": batch_size,
            "workers": workers, "threads": torch.get_num_threads(), "mlp_dim": mlp_dim, "data": data, "images": len(dataset),
            "crop_min": crop_min, "device": "cpu", **result}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mlp-dim", type=int, default=4096)
    p.add_argument("--crop-min", type=float, default=0.08)
    a = p.parse_args(argv)
    print(json.dumps(bench_official_pipeline(a.data, a.backbone, a.img_size, a.batch_size, a.workers, a.steps, a.warmup,
                                             a.threads, a.mlp_dim, a.crop_min)))


if __name__ == "__main__":
    main()
