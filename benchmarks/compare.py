"""Official OPERA/MoCo-v3 step vs opera's step on the same configurations, each run in a fresh
subprocess (so peak RSS is per configuration), alternating official/opera/official/opera...
``--repeats`` times; the table shows the median over the repeats.

    python benchmarks/compare.py                     # the three target configurations (ResNet-50, ResNet-18, ViT-Tiny)
    python benchmarks/compare.py --repeats 3 --steps 10 --warmup 3 --threads 2 --json out.json

The machine may be shared: the alternation makes a burst of load from other processes fall on
both sides alike, and the median over repeats drops the worst bursts. Compare only numbers from
the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

#: (name, backbone, img_size, batch_size, patch_size) - MLP hidden 1024, 10 classes, fp32
CONFIGS = [
    ("resnet18@64 b64", "resnet18", 64, 64, None),
    ("resnet50@64 b32", "resnet50", 64, 32, None),
    ("vit_tiny/8@64 b64", "vit_tiny", 64, 64, 8),
]


def run_one(impl: str, backbone: str, img_size: int, batch_size: int, patch_size: int | None, a) -> dict:
    if impl == "official":
        cmd = [sys.executable, os.path.join(HERE, "official_step.py"), "--backbone", backbone, "--img-size", str(img_size),
               "--batch-size", str(batch_size), "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--threads", str(a.threads), "--mlp-dim", str(a.mlp_dim), "--num-classes", str(a.num_classes)]
    else:
        cmd = [sys.executable, "-m", "opera.bench", "--backbone", backbone, "--img-size", str(img_size),
               "--batch-size", str(batch_size), "--hierarchy", "self,full", "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--threads", str(a.threads), "--mlp-dim", str(a.mlp_dim),
               "--num-classes", str(a.num_classes), "--json"]
    if patch_size:
        cmd += ["--patch-size", str(patch_size)]
    if impl == "opera":
        cmd += shlex.split(a.opera_args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="official vs opera pretraining step, fresh process per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--only", nargs="*", default=None, help="config names (substring match) to run")
    p.add_argument("--json", default=None, help="also write every run to this file")
    p.add_argument("--opera-args", default="", help='extra options for opera bench, one string: --opera-args="--joint-views --no-roofline"')
    a = p.parse_args(argv)
    configs = [c for c in CONFIGS if not a.only or any(o in c[0] for o in a.only)]
    runs: list[dict] = []
    table = []
    for name, backbone, img, batch, patch in configs:
        res: dict[str, list[dict]] = {"official": [], "opera": []}
        for _ in range(a.repeats):
            for impl in ("official", "opera"):
                r = run_one(impl, backbone, img, batch, patch, a)
                r["config"] = name
                res[impl].append(r)
                runs.append(r)
                print(f"  {name:<18} {impl:<9} {r['img_per_s']:7.1f} img/s  {r['peak_rss_mb']:7.0f} MB", file=sys.stderr, flush=True)
        row = {"config": name}
        for impl in ("official", "opera"):
            row[f"{impl}_img_per_s"] = statistics.median(r["img_per_s"] for r in res[impl])
            row[f"{impl}_peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in res[impl])
        row["speedup"] = row["opera_img_per_s"] / row["official_img_per_s"]
        row["rss_ratio"] = row["opera_peak_rss_mb"] / row["official_peak_rss_mb"]
        roof = [r for r in res["opera"] if "gflop_per_step" in r]
        if roof:  # the same arithmetic in both (tests/perf), so one FLOP count serves both
            gflop = roof[0]["gflop_per_step"]
            peak = statistics.median(r["compute_peak_gflop_per_s"] for r in roof)
            row.update(gflop_per_step=gflop, compute_peak_gflop_per_s=peak,
                       matmul_peak_gflop_per_s=statistics.median(r["matmul_peak_gflop_per_s"] for r in roof),
                       conv_peak_gflop_per_s=statistics.median(r.get("conv_peak_gflop_per_s", 0.0) for r in roof))
            for impl in ("official", "opera"):
                row[f"{impl}_gflop_per_s"] = gflop * row[f"{impl}_img_per_s"] / batch
                row[f"{impl}_fraction_of_peak"] = row[f"{impl}_gflop_per_s"] / peak
            row["ceiling_speedup"] = 1.0 / row["official_fraction_of_peak"]
        table.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "table": table, "runs": runs}, f, indent=1)
    print(f"threads {a.threads}, mlp {a.mlp_dim}, {a.num_classes} classes, fp32; median of {a.repeats} fresh-process runs "
          f"each ({a.warmup} warm-up + {a.steps} timed steps, median step)")
    print("| config | official img/s | opera img/s | speed-up | official peak RSS MB | opera peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['config']} | {r['official_img_per_s']:.1f} | {r['opera_img_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['official_peak_rss_mb']:.0f} | {r['opera_peak_rss_mb']:.0f} |")
    if all("gflop_per_step" in r for r in table):
        print()
        print("Roofline: FLOPs of one step (counted; the same arithmetic in both, tests/perf) over the step time, against the best large fp32 matmul/convolution here (opera.bench.compute_peak_gflops)")
        print("| config | GFLOP/step | matmul / conv GFLOP/s | peak used | official GFLOP/s (% of peak) | opera GFLOP/s (% of peak) | "
              "highest speed-up any fp32 implementation could reach over official |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in table:
            print(f"| {r['config']} | {r['gflop_per_step']:.1f} | {r['matmul_peak_gflop_per_s']:.0f} / "
                  f"{r['conv_peak_gflop_per_s']:.0f} | {r['compute_peak_gflop_per_s']:.0f} | "
                  f"{r['official_gflop_per_s']:.0f} ({100 * r['official_fraction_of_peak']:.0f}%) | "
                  f"{r['opera_gflop_per_s']:.0f} ({100 * r['opera_fraction_of_peak']:.0f}%) | {r['ceiling_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
