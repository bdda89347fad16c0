"""What grows with the dataset: every cost around the training step, at 10k / 100k / 1.28M images.

It makes ImageNet-style folders (``train/`` of 1000 class folders, ``val/`` of 1/25 as many
images) of hard links to a few real JPEGs from ``opera data make-folder`` (as few sources as
ext4's 65000 links per file allow), then measures at each size:

* ``dataset_s``: building the train split (scanning the folder);
* ``identity_s``: the data identity a resume checks (a digest of every name);
* ``sampler_us``: one epoch of ``data.labelled_per_batch`` (1% labelled, 64 of a batch of 256), per step,
  1 ms between steps;
* ``worker_mb``: a DataLoader worker's private memory after reading every path and label
  (``benchmarks/worker_memory.py``);
* ``labels_s``: re-matching ``labelled.txt`` (1% of the images, by file name) on resume;
* ``knn_images``: the images the kNN monitor decodes per evaluation (bank + queries), and
  ``knn_bank_mb``: its bank for ResNet-50 features (2048-d), the default
  (``train.knn_bank_per_class=100``, float16) against the whole split in float32;
* ``start_s``: ``opera --help``, the median of 5 runs.

Then, once (they do not depend on N): the kNN monitor's decode + eval transform per 1k images,
with 0 and 2 workers; the ResNet-50 and
DeiT-B checkpoint sizes, the ResNet-50 write time, and the disk of a 300-epoch run.

    python benchmarks/scale.py --root /tmp/opera_scale --sizes 10000,100000,1281167
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.worker_memory import worker_growth  # noqa: E402

CLASSES = 1000
LINKS_PER_SOURCE = 60_000  # ext4 allows 65000 links to one file


def make_sources(root: Path, n: int) -> list[str]:
    from opera.data.photos import make_photo_folder

    folder = root / "sources"
    if not (folder / "class000").is_dir() or len(list((folder / "class000").iterdir())) < n:
        make_photo_folder(str(folder), n=n, classes=1, seed=0)
    return sorted(str(p) for p in (folder / "class000").iterdir())


def make_folder(root: Path, n: int, sources: list[str]) -> Path:
    """``root/n{N}``: ``train/`` with ``n`` links in CLASSES class folders, ``val/`` with ``n // 25``."""
    out = root / f"n{n}"
    done = out / ".complete"
    if done.exists():
        return out
    for split, count in (("train", n), ("val", max(n // 25, CLASSES))):
        for c in range(CLASSES):
            (out / split / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            dst = out / split / f"c{i % CLASSES:04d}" / f"img{i:07d}.jpg"
            while not dst.exists():
                try:
                    os.link(sources[0], dst)
                except OSError as exc:  # EMLINK: this source is full, the next one takes over
                    if exc.errno != errno.EMLINK or len(sources) == 1:
                        raise
                    sources.pop(0)
    done.write_text("")
    return out


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def sampler_us(n: int, batch: int = 256, k: int = 64, gap_s: float = 1e-3) -> float:
    from opera.data.loader import LabelledShareBatchSampler

    labelled = np.arange(0, n, 100)
    unlabelled = np.setdiff1d(np.arange(n), labelled)
    s = LabelledShareBatchSampler(labelled, unlabelled, batch, k, seed=0)
    spent, it = 0.0, iter(s)
    for _ in range(s.n_steps):
        start = time.perf_counter()
        next(it)
        spent += time.perf_counter() - start
        time.sleep(gap_s)  # a step's stand-in: the next cycle is drawn ahead meanwhile (benchmarks/sampler_side_by_side.py)
    return spent / s.n_steps * 1e6


def labels_s(ds, tmp: Path) -> float:
    from opera.data.labels import resolve_labelled, write_labelled

    keep = list(range(0, len(ds), 100))
    tmp.mkdir(parents=True, exist_ok=True)
    write_labelled(tmp / "labelled.txt", ds, keep, "1%", "scale", 0)
    names = (tmp / "labelled.txt").read_text().splitlines()
    by_name = [names[0]] + [line.rsplit("/", 1)[-1] for line in names[1:]]  # file names, as SimCLR's lists
    (tmp / "labelled.txt").write_text("\n".join(by_name) + "\n")
    got, seconds = timed(lambda: resolve_labelled(ds, "1%", "scale", 0, tmp))
    assert got == keep
    return seconds


def knn_images(ds, val_images: int, per_class: int = 100) -> tuple[int, int]:
    """(images decoded per evaluation by the default monitor, by the whole-split one)."""
    from opera.engine.monitors import balanced_subset

    keep = balanced_subset(ds.targets, per_class)
    bank = len(ds) if keep is None else len(keep)
    return bank + val_images, len(ds) + val_images


def startup_s(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "opera", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(root: Path, n: int, sources: list[str]) -> dict:
    from opera.data import build_dataset
    from opera.data.labels import data_identity

    folder, make_s = timed(lambda: make_folder(root, n, sources))
    ds, dataset_s = timed(lambda: build_dataset(str(folder), "train"))
    _, identity_s = timed(lambda: data_identity(ds))
    before, after = worker_growth(ds)
    val = max(n // 25, CLASSES)
    knn_new, knn_old = knn_images(ds, val)
    bank_new = min(len(ds), 100 * CLASSES) * 2048 * 2 / 2**20
    bank_old = len(ds) * 2048 * 4 / 2**20
    return {"images": len(ds), "make_s": make_s, "dataset_s": dataset_s, "identity_s": identity_s,
            "sampler_us": sampler_us(len(ds)), "worker_mb": after - before, "labels_s": labels_s(ds, root / f"run{n}"),
            "knn_images": knn_new, "knn_images_whole": knn_old, "knn_bank_mb": bank_new, "knn_bank_whole_mb": bank_old}


def knn_cost_per_1k(folder: Path) -> dict:
    """Seconds to decode and eval-transform (224 px) 1000 images through the monitor's loader, by
    workers: the part of the monitor that the bank subset and the workers cut (the backbone's
    forward comes on top)."""
    from opera.data import EvalTransform, build_dataset
    from opera.features import make_loader

    ds = torch.utils.data.Subset(build_dataset(str(folder), "train", transform=EvalTransform(224)), range(1000))
    out = {}
    for workers in (0, 2):
        _, seconds = timed(lambda w=workers: sum(len(y) for _, y in make_loader(ds, 100, workers=w)))
        out[f"knn_decode_s_per_1k_w{workers}"] = seconds
    return out


def checkpoints(tmp: Path) -> dict:
    from opera.configs import load_config
    from opera.engine.checkpoint import disk_use, save_state, state_bytes
    from opera.engine.optim import build_optimizer, optimizer_name
    from opera.hierarchy import SupervisionHierarchy

    out = {}
    for recipe, key in (("r50_300ep_b1024", "r50"), ("deitb_300ep_b1024", "deitb")):
        cfg = load_config(recipe)
        h = SupervisionHierarchy.from_config(cfg, {"class": CLASSES})
        opt = build_optimizer(h, optimizer_name(cfg.optim.name, h), 1e-3, cfg.optim.weight_decay, cfg.optim.momentum,
                              cfg.optim.betas, exclude_1d=cfg.optim.exclude_1d_decay)
        one = state_bytes(h, opt)
        t = cfg.train
        rest, peak = disk_use(one, t.epochs, t.save_every_epochs, t.keep_epoch_checkpoints, t.keep_last_prev)
        every_epoch_file = (2 + t.epochs // t.save_every_epochs) * one  # last.pt, last.prev.pt, every epoch file
        out.update({f"{key}_state_gib": one / 2**30, f"{key}_300ep_peak_gib": peak / 2**30,
                    f"{key}_300ep_rest_gib": rest / 2**30, f"{key}_300ep_all_epochs_gib": every_epoch_file / 2**30})
        if key == "r50":  # a real write: the model with LARS's momentum filled in
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
            state = {"model": h.state_dict(), "optimizer": opt.state_dict()}
            tmp.mkdir(parents=True, exist_ok=True)
            _, seconds = timed(lambda s=state: save_state(s, tmp / "last.pt", keep_previous=False))
            out.update({"r50_write_s": seconds, "r50_file_gib": (tmp / "last.pt").stat().st_size / 2**30})
            (tmp / "last.pt").unlink()
        del h, opt
    return out


def table(rows: list[dict]) -> str:
    keys = [("dataset_s", "build the train split (s)"), ("identity_s", "data identity (s)"),
            ("sampler_us", "labelled_per_batch sampler (us/step)"), ("worker_mb", "worker private memory (MB)"),
            ("labels_s", "labelled.txt re-match (s)"), ("knn_images", "kNN monitor: images per evaluation"),
            ("knn_images_whole", "  the same, whole train split"), ("knn_bank_mb", "kNN bank, R50, fp16 (MB)"),
            ("knn_bank_whole_mb", "  the same, whole split fp32 (MB)")]
    head = "| item | " + " | ".join(f"{r['images']:,}" for r in rows) + " | growth / N growth |"
    lines = [head, "|---" * (len(rows) + 2) + "|"]
    n_growth = rows[-1]["images"] / rows[0]["images"]
    for key, label in keys:
        vals = [r[key] for r in rows]
        growth = vals[-1] / vals[0] / n_growth if vals[0] else float("nan")
        lines.append(f"| {label} | " + " | ".join(f"{v:,.3g}" for v in vals) + f" | {growth:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/opera_scale"))
    ap.add_argument("--sizes", default="10000,100000,1281167")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    needed = sum(n + max(n // 25, CLASSES) for n in sizes) // LINKS_PER_SOURCE + 2
    sources = make_sources(args.root, max(needed, 2))
    load = os.getloadavg()[0]
    rows = []
    for n in sizes:
        rows.append(measure(args.root, n, sources))
        print(json.dumps(rows[-1]), flush=True)
    once = {**knn_cost_per_1k(args.root / f"n{sizes[0]}"), **checkpoints(args.root / "ckpt"), "start_s": startup_s()}
    print(json.dumps(once), flush=True)
    print(f"\nload average {load:.1f} at start, {os.getloadavg()[0]:.1f} at the end\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "once": once}, indent=1))


if __name__ == "__main__":
    main()
