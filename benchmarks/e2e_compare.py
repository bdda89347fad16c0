"""End to end, side by side on the same JPEG folder: the official MoCo-v3/OPERA pipeline
(``official_pipeline.py``) vs ``opera bench --end-to-end`` (``--augment-on device``, and
``workers`` with ``--with-workers``). Every run is a fresh process (its own peak memory); the
variants alternate within each repeat (official, opera, official, opera, ...), so a burst of load
from other jobs on a shared machine falls on all of them alike; the table shows medians.

    opera data make-folder /tmp/jpegs --n 2000
    python benchmarks/e2e_compare.py --data /tmp/jpegs --sizes 64,112,224 --repeats 3 --steps 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def command(variant: str, size: int, steps: int, a) -> list[str]:
    common = ["--backbone", a.backbone, "--img-size", str(size), "--batch-size", str(a.batch_size), "--workers",
              str(a.workers), "--steps", str(steps), "--warmup", str(a.warmup), "--threads", str(a.threads),
              "--mlp-dim", str(a.mlp_dim)]
    if variant == "official":
        return [sys.executable, os.path.join(HERE, "official_pipeline.py"), "--data", a.data, *common]
    return [sys.executable, "-m", "opera", "bench", "--end-to-end", "--data", a.data, "--augment-on", variant,
            "--no-roofline", "--json", *common]


def run(variant: str, size: int, steps: int, a) -> dict:
    cmd = command(variant, size, steps, a)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: dict[tuple[int, str], list[dict]], variants: list[str]) -> str:
    out = ["| size | pipeline | img/s | s/step | waits for data | peak RSS MB (PSS) | main / each worker, VmHWM MB (PSS) "
           "| img/s vs official |",
           "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for size in sorted({s for s, _ in rows}):
        base = statistics.median(r["img_per_s"] for r in rows[(size, "official")])
        for v in variants:
            rs = rows[(size, v)]
            med = {k: statistics.median(r[k] for r in rs) for k in ("img_per_s", "s_per_step", "data_wait_share",
                                                                       "peak_rss_mb", "peak_pss_mb")}
            name = "official (ImageFolder+PIL)" if v == "official" else f"opera, augment on {v}"
            runs = ", ".join(f"{r['img_per_s']:.1f}" for r in rs)
            procs = [(p["role"], p["vmhwm_mb"], p["pss_mb"]) for r in rs for p in r.get("processes", [])]
            split = " / ".join(
                f"{statistics.median(m for k, m, _ in procs if k == role):.0f} "
                f"({statistics.median(q for k, _, q in procs if k == role):.0f})"
                for role in ("main", "worker") if any(k == role for k, _, _ in procs)) or "-"
            out.append(f"| {size} | {name} | {med['img_per_s']:.1f} ({runs}) | {med['s_per_step']:.2f} | "
                       f"{100 * med['data_wait_share']:.0f}% | {med['peak_rss_mb']:.0f} ({med['peak_pss_mb']:.0f}) | {split} | "
                       f"{med['img_per_s'] / base:.2f}x |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--sizes", default="64,112,224")
    p.add_argument("--steps", default="30", help="timed steps: one number, or one per size (e.g. 30,15,6)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mlp-dim", type=int, default=4096)
    p.add_argument("--with-workers", action="store_true", help="also opera with --augment-on workers")
    p.add_argument("--json", default=None, help="write every run's result here")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    steps = [int(s) for s in a.steps.split(",")]
    steps = steps * len(sizes) if len(steps) == 1 else steps
    if len(steps) != len(sizes):
        raise SystemExit("--steps takes one number or one per size")
    variants = ["official", "device"] + (["workers"] if a.with_workers else [])
    rows: dict[tuple[int, str], list[dict]] = {}
    for size, n in zip(sizes, steps):
        for r in range(a.repeats):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                res = run(v, size, n, a)
                rows.setdefault((size, v), []).append(res)
                print(f"# size {size} repeat {r + 1} {v}: {res['img_per_s']:.1f} img/s, "
                      f"waits {100 * res['data_wait_share']:.0f}%, RSS {res['peak_rss_mb']:.0f} MB", flush=True)
                if a.json:
                    with open(a.json + ".tmp", "w") as f:
                        json.dump([{"size": s, "variant": k, **x} for (s, k), xs in rows.items() for x in xs], f, indent=1)
                    os.replace(a.json + ".tmp", a.json)
    print(table(rows, variants))


if __name__ == "__main__":
    main()
