"""GPU throughput and model-FLOPs utilisation (MFU) of opera's pretraining step (run by ``benchmarks/gpu.sh``).

``--device cpu`` with tiny models only exercises this script's code paths where there is no GPU
(``tests/perf/test_gpu_script.py``); its figures mean nothing.
"""
import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from opera.bench import make_step

p = argparse.ArgumentParser(prog="benchmarks/gpu_bench.py")
p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (TFLOP/s); detected for H100/H200")
p.add_argument("--models", default="resnet50,deit_small,deit_base")
p.add_argument("--batch-size", type=int, default=128, help="images per view per step")
p.add_argument("--img-size", type=int, default=224)
p.add_argument("--mlp-dim", type=int, default=4096)
p.add_argument("--num-classes", type=int, default=1000)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--no-cudnn-benchmark", action="store_true")
p.add_argument("--joint-views", action="store_true", help="both views' online forward before one backward (default: one view at a time)")
p.add_argument("--device", default="cuda", help="cuda (default); cpu only checks the script's code paths on a machine without a GPU")
a = p.parse_args()

dev = torch.device(a.device)
cuda = dev.type == "cuda"
if cuda and not torch.cuda.is_available():
    sys.exit("benchmarks/gpu_bench.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine")
name = torch.cuda.get_device_name(dev) if cuda else "cpu"
peak = a.peak_tflops
if peak is None and cuda:
    up = name.upper()
    if "H100" in up and "PCIE" in up:
        peak = 756.0
    elif "H100" in up and "NVL" in up:
        peak = 835.0
    elif "H100" in up or "H200" in up or "GH200" in up:
        peak = 989.4  # SXM, dense bf16 (H200 is the same GH100 chip)
torch.backends.cudnn.benchmark = cuda and not a.no_cudnn_benchmark
print(f"device: {name}; bf16 dense peak: {f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}; "
      f"torch {torch.__version__}; cudnn.benchmark={torch.backends.cudnn.benchmark}", flush=True)

def sync() -> None:
    if cuda:
        torch.cuda.synchronize(dev)


rows = []
for model_name in [m.strip() for m in a.models.split(",") if m.strip()]:
    if cuda:
        torch.cuda.empty_cache()
    step, model, meta = make_step(model_name, a.img_size, a.batch_size, "self,full", threads=0, mlp_dim=a.mlp_dim,
                                  num_classes=a.num_classes, device=str(dev), amp="bf16", per_view=not a.joint_views)
    for i in range(a.warmup):
        step(i)
    sync()
    with FlopCounterMode(display=False) as counter:  # one (untimed) step
        step(a.warmup)
    sync()
    flops = counter.get_total_flops()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(a.steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(a.warmup + 1 + i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step(a.warmup + 1 + i)
            times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    row = {
        "model": model_name, "img_size": a.img_size, "batch_size": a.batch_size, "optimizer": meta["optimizer"],
        "channels_last": meta["channels_last"], "per_view": meta["per_view"], "amp": "bf16",
        "img_per_s": a.batch_size / s, "ms_per_step": s * 1e3, "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / s / 1e12, "mfu": (flops / s / 1e12 / peak) if peak else None,
        "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None, "device": name,
    }
    rows.append(row)
    print(json.dumps(row), flush=True)
    del step, model
print()
print("| model | batch/view | img/s | ms/step | TFLOP/step | TFLOP/s | MFU | peak GPU MB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    print(f"| {r['model']} @{r['img_size']} | {r['batch_size']} | {r['img_per_s']:.0f} | {r['ms_per_step']:.1f} | "
          f"{r['tflop_per_step']:.2f} | {r['achieved_tflops']:.0f} | {mfu} | {r['peak_gpu_mb'] or 0:.0f} |")
