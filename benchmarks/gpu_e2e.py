"""End-to-end img/s on a GPU: the training loop's feed with the augmentation on the device vs in
the DataLoader workers, at 224 px for ResNet-50 and ViT-B/16 (bf16 autocast, channels_last for
the CNN), on a JPEG folder cut from scikit-learn's photographs (run by ``benchmarks/gpu.sh``).

``--device cpu`` with tiny models only exercises this script's code paths where there is no GPU
(``tests/perf/test_gpu_script.py``); its figures mean nothing.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

from opera.bench import bench_end_to_end
from opera.data.photos import make_photo_folder

p = argparse.ArgumentParser(prog="benchmarks/gpu_e2e.py")
p.add_argument("--data", default=None, help="a folder of class folders of JPEGs (default: make --n of them in a temp dir)")
p.add_argument("--n", type=int, default=1500, help="images to make when --data is not given")
p.add_argument("--models", default="resnet50,deit_base")
p.add_argument("--img-size", type=int, default=224)
p.add_argument("--batch-size", type=int, default=128, help="images per view per step")
p.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1))
p.add_argument("--mlp-dim", type=int, default=4096)
p.add_argument("--steps", type=int, default=15)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script's code paths")
a = p.parse_args()

dev = torch.device(a.device)
if dev.type == "cuda" and not torch.cuda.is_available():
    sys.exit("benchmarks/gpu_e2e.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine")
torch.backends.cudnn.benchmark = dev.type == "cuda"
tmp = None
data = a.data
if data is None:
    tmp = tempfile.TemporaryDirectory(prefix="opera-jpegs-")
    data = make_photo_folder(tmp.name, n=a.n)
    print(f"made {a.n} JPEGs in {data}", flush=True)

rows = []
for model_name in [m.strip() for m in a.models.split(",") if m.strip()]:
    for augment_on in ("device", "workers"):
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        r = bench_end_to_end(data, augment_on=augment_on, workers=a.workers, steps=a.steps, warmup=a.warmup,
                             backbone=model_name, img_size=a.img_size, batch_size=a.batch_size, threads=0,
                             mlp_dim=a.mlp_dim, device=str(dev), amp="bf16")
        r["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
        rows.append(r)
        print(json.dumps(r), flush=True)
print()
print("| model | augment on | workers | img/s | s/step | waits for data | peak RSS MB | peak GPU MB |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['backbone']} @{r['img_size']} b{r['batch_size']} | {r['augment_on']} | {r['workers']} | {r['img_per_s']:.0f} | "
          f"{r['s_per_step']:.3f} | {100 * r['data_wait_share']:.0f}% | {r['peak_rss_mb']:.0f} | {r['peak_gpu_mb'] or 0:.0f} |")
if tmp is not None:
    tmp.cleanup()
