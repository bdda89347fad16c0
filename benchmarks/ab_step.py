"""Interleaved A/B timing of pretraining steps in ONE process (for a noisy, shared machine).

Every variant is built up front; then the steps run round-robin (A, B, C, A, B, C, ...), so a
burst of load from other processes hits every variant alike. Reports, per variant, the median
step time, images/s and the speed-up over the first variant. (Peak RSS is not per variant here:
use ``benchmarks/compare.py``, which runs each configuration in a fresh process.)

    python benchmarks/ab_step.py --backbone resnet18 --img-size 64 --batch-size 64 --mlp-dim 1024 \\
        --variants official opera opera:channels_last=0 --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from official_step import make_official_step  # noqa: E402
from opera.bench import make_step  # noqa: E402


def _value(text: str):
    low = text.lower()
    if low in ("1", "true", "yes"):
        return True
    if low in ("0", "false", "no"):
        return False
    if low == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def build_variant(spec: str, common: dict):
    """``official`` or ``opera[:key=value,...]`` (keys of ``opera.bench.make_step``)."""
    name, _, opts = spec.partition(":")
    kw = {k: _value(v) for k, v in (o.split("=", 1) for o in opts.split(",") if o)}
    if name == "official":
        return make_official_step(**common)
    if name == "opera":
        return make_step(**{**common, **kw})
    raise SystemExit(f"unknown variant {spec!r}: official or opera[:key=value,...]")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["official", "opera"])
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    common = dict(backbone=a.backbone, img_size=a.img_size, batch_size=a.batch_size, threads=a.threads,
                  patch_size=a.patch_size, mlp_dim=a.mlp_dim)
    steps = [build_variant(v, common)[0] for v in a.variants]
    times = {v: [] for v in a.variants}
    cpu = {v: [] for v in a.variants}
    for r in range(a.warmup + a.rounds):
        for v, step in zip(a.variants, steps):
            c0, t0 = time.process_time(), time.perf_counter()
            step(r)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= a.warmup:
                times[v].append(dt)
                cpu[v].append(dc)
    base = statistics.median(times[a.variants[0]])
    base_cpu = statistics.median(cpu[a.variants[0]])
    rows = []
    for v in a.variants:
        med = statistics.median(times[v])
        med_cpu = statistics.median(cpu[v])
        rows.append({"variant": v, "s_per_step": med, "img_per_s": a.batch_size / med, "speedup": base / med,
                     "cpu_s_per_step": med_cpu, "cpu_speedup": base_cpu / med_cpu,
                     "s_all": [round(t, 3) for t in times[v]]})
    cfg = f"{a.backbone} {a.img_size}px batch {a.batch_size} mlp {a.mlp_dim} threads {torch.get_num_threads()}, {a.rounds} rounds"
    if a.json:
        print(json.dumps({"config": cfg, "rows": rows}))
        return
    print(cfg)
    for row in rows:
        print(f"  {row['variant']:<40} {row['s_per_step'] * 1e3:8.0f} ms/step {row['img_per_s']:8.1f} img/s  x{row['speedup']:.2f}"
              f"   cpu {row['cpu_s_per_step'] * 1e3:8.0f} ms/step x{row['cpu_speedup']:.2f}   all: {row['s_all']}")


if __name__ == "__main__":
    main()
