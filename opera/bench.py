"""``opera bench``: time full pretraining steps (with ``--data``, the data pipeline; with ``--data DIR
--end-to-end``, real steps fed by the training loop's loader).

One step is exactly what the training loop runs - ``opera.engine.step.train_step`` - on random
in-memory images: both views through the online branch (forward and backward), both through the
momentum branch, the optimizer step (LARS for CNNs, AdamW for ViTs) and the momentum (EMA)
update. fp32 on a CPU; the step's bf16 autocast on CUDA.

    opera bench --backbone resnet18 --img-size 64 --batch-size 64 --hierarchy self,full \\
        --steps 20 --warmup 3 --threads 2 --json

    opera bench --end-to-end --data DIR --backbone resnet18 --img-size 64 --batch-size 64 --workers 2 --steps 30 --json

``opera bench`` times opera's own code only. The official MoCo-v3/OPERA baselines it is raced
against live outside the package, in ``benchmarks/`` (``official_step.py``, ``official_pipeline.py``,
``official_transform.py``), whose scripts import both sides: ``compare.py`` (steps),
``e2e_compare.py`` (end to end), ``data_pipeline.py`` (the two-crop augmentation).

Peak RSS is the process's ``ru_maxrss`` (end to end: the sampled sum over the process and its workers): run one configuration per process (``opera bench`` does;
``bench_step_subprocess`` starts a fresh interpreter) for a per-configuration figure.
"""

from __future__ import annotations

import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

from opera.errors import OperaError

if TYPE_CHECKING:  # torch is imported where it is used: `opera bench --help` (and `opera --help`) need none
    import torch

try:  # the command works without typer installed only as a library function
    import typer
except ImportError:  # pragma: no cover
    typer = None


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def make_step(
    backbone: str = "resnet18", img_size: int = 64, batch_size: int = 64, hierarchy: str = "self,full", threads: int = 2,
    patch_size: int | None = None, mlp_dim: int = 4096, dim: int = 256, num_classes: int = 10,
    concat_views: bool = False, channels_last: bool | None = None, compile: bool = False, device: str = "cpu",
    optimizer: str = "auto", amp: str = "auto", per_view: bool = True,
):
    """Build the model, optimizer and random views of one configuration.

    Returns ``(step, model, meta)``: ``step(i)`` runs ``train_step`` once and returns its output
    (``step(i, views, labels)`` on a real batch: ``bench_end_to_end``), ``meta`` describes the
    configuration. ``bench_step`` times it; ``benchmarks/ab_step.py``
    interleaves it with the official step in one process.
    """
    import torch

    from opera.backbones import is_token_backbone
    from opera.engine.optim import build_optimizer, optimizer_name
    from opera.engine.step import make_grad_scaler, prepare_model, train_step
    from opera.hierarchy import SupervisionHierarchy, parse_spec

    from opera.configs.schema import CHOICES

    if batch_size < 2:
        raise OperaError("bench needs --batch-size >= 2 (BatchNorm)")
    if amp not in CHOICES["train.amp"]:
        raise OperaError(f"--amp must be one of {', '.join(CHOICES['train.amp'])}, got {amp!r}")
    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OperaError("no CUDA device: run the benchmark with --device cpu")
    torch.manual_seed(0)
    spaces = parse_spec(hierarchy)
    options: dict[str, dict[str, Any]] = {}
    if "self" in spaces:
        options["self"] = {"dim": dim, "mlp_dim": mlp_dim}
    model = SupervisionHierarchy.from_spec(
        hierarchy, backbone=backbone, label_sets={"class": num_classes, "coarse": 3}, img_size=img_size,
        concat_views=concat_views, backbone_options={"patch_size": patch_size} if patch_size else None, **options,
    )
    token = is_token_backbone(model.backbone)
    opt_name = optimizer_name(optimizer, model)
    model = prepare_model(model, dev, channels_last=channels_last)
    optim = build_optimizer(model, opt_name, lr=0.1 if opt_name == "lars" else 1e-4,
                            weight_decay=1e-6 if opt_name == "lars" else 0.1)
    runner = torch.compile(model) if compile else model
    model.train()
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(dev) for _ in range(2)]
    # random labels, and a synthetic coarse set (class mod 3) for spaces that ask for one
    classes = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
    labels = {"class": classes, "coarse": classes % 3}

    scaler = make_grad_scaler(dev, amp)

    def step(i: int, batch_views: list[torch.Tensor] | None = None, batch_labels: torch.Tensor | None = None):
        """One ``train_step`` on the random views, or on ``batch_views``/``batch_labels`` (real data)."""
        v, y = (views, labels) if batch_views is None else (batch_views, batch_labels)
        return train_step(runner, model, optim, v, y, lr=optim.param_groups[0]["lr"], ema_momentum=0.99,
                          device=dev, amp=amp, step=i, per_view=per_view, scaler=scaler)

    meta = {
        "impl": "opera",
        "backbone": backbone, "img_size": img_size, "batch_size": batch_size, "hierarchy": hierarchy,
        "patch_size": model.backbone.patch_embed.patch_size[0] if token else None,
        "mlp_dim": mlp_dim, "dim": dim, "num_classes": num_classes, "concat_views": concat_views,
        "channels_last": bool(getattr(model, "opera_channels_last", False)), "compile": compile,
        "optimizer": opt_name, "device": str(dev), "amp": amp, "threads": torch.get_num_threads(),
        "per_view": bool(per_view and not concat_views),
    }
    return step, model, meta


def count_step_flops(step_fn, i: int) -> int:
    """FLOPs of one step (matmuls, convolutions, attention; forward and backward), counted by
    ``torch.utils.flop_counter.FlopCounterMode`` while ``step_fn(i)`` runs (untimed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step_fn(i)
    return int(counter.get_total_flops())


def compute_peak_gflops(device: torch.device, repeats: int = 6) -> dict[str, float]:
    """Measured throughput of the step's kinds of arithmetic at their best, at the current thread
    count: ``matmul``, a 2048^3 fp32 matmul on the CPU (MKL: the ViT's linear layers and the
    heads run through it) or a bf16 8192^3 one on CUDA; on the CPU also ``conv``, a 3x3 fp32
    convolution over 64x256x8x8 in channels_last (oneDNN: the ResNets' convolutions; on this AMD
    CPU ~35% above MKL's matmul). A step whose FLOPs ran at these rates would have nothing left
    to gain in this precision."""
    import torch

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = None if cuda else torch.Generator().manual_seed(0)
    size = 8192 if cuda else 2048

    def best(fn, flops: float) -> float:
        times = []
        for r in range(repeats + 2):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            if r >= 2:
                times.append(time.perf_counter() - t0)
        return flops / min(times) / 1e9

    a = torch.randn(size, size, dtype=dtype, device=device, generator=gen)
    b = torch.randn(size, size, dtype=dtype, device=device, generator=gen)
    peaks = {"matmul": best(lambda: a @ b, 2 * size**3)}
    if not cuda:
        x = torch.randn(64, 256, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
        peaks["conv"] = best(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 64 * 8 * 8 * 256 * 256 * 9)
    return peaks


def bench_step(steps: int = 20, warmup: int = 3, roofline: bool = True, **config: Any) -> dict[str, Any]:
    """Time ``steps`` pretraining steps (after ``warmup``) in this process; ``config`` is passed,
    by keyword, to ``make_step`` (backbone, img_size, batch_size, hierarchy, threads, ...).

    ``channels_last=None`` follows ``opera.engine.step.prepare_model`` (on for CNN backbones).
    Returns the configuration and ``img_per_s`` (batch / median step time), ``s_per_step``
    (median), ``s_per_step_min``, ``peak_rss_mb`` (this process's peak so far) and, on CUDA,
    ``peak_cuda_mb``. With ``roofline`` (after the timed steps, so it moves no figure above):
    ``gflop_per_step`` (counted), ``gflop_per_s`` achieved, ``matmul_peak_gflop_per_s`` and
    (CPU) ``conv_peak_gflop_per_s`` (``compute_peak_gflops``, same threads),
    ``compute_peak_gflop_per_s`` (the larger) and ``fraction_of_peak`` against it: a bound on how
    much any implementation of the same arithmetic could still speed the step up.
    """
    import torch

    if steps < 1 or warmup < 0:
        raise OperaError("bench needs --steps >= 1 and --warmup >= 0")
    step_fn, model, meta = make_step(**config)
    dev, batch_size = torch.device(meta["device"]), meta["batch_size"]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times: list[float] = []
    out = None
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        out = step_fn(i)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    result: dict[str, Any] = {
        **meta, "steps": steps, "warmup": warmup,
        "img_per_s": batch_size / med,
        "s_per_step": med,
        "s_per_step_min": min(times),
        "peak_rss_mb": _peak_rss_mb(),
        "loss": float(out.loss.detach()) if out is not None else None,
    }
    if dev.type == "cuda":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if roofline:
        flops = count_step_flops(step_fn, warmup + steps)
        peaks = compute_peak_gflops(dev)
        peak = max(peaks.values())
        result.update(gflop_per_step=flops / 1e9, gflop_per_s=flops / 1e9 / med,
                      **{f"{k}_peak_gflop_per_s": v for k, v in peaks.items()},
                      compute_peak_gflop_per_s=peak, fraction_of_peak=flops / 1e9 / med / peak)
    return result


class TreeMemory:
    """Peak memory of this process and its children (DataLoader workers), read from /proc by
    :meth:`sample`, which :func:`time_pipeline` calls *between* timed steps, never beside them.

    ``peak_rss_mb`` is the sum over the processes of each one's own RSS high-water mark
    (``VmHWM``, kept by the kernel, so a peak inside a step is not missed; pages that forked
    workers share with the parent count once per process, as ``ps`` and SLURM's accounting do).
    It bounds the peak of the sum from above. ``peak_pss_mb`` is the largest sum of PSS (shared
    pages split between sharers) seen between steps. Why not a sampling thread: reading
    ``smaps_rollup`` walks a process's page tables under its memory-map lock, so the process
    cannot fault pages in meanwhile; sampled every 50 ms beside the steps, it slowed the timed
    pipeline by ~40% (BENCHMARKS.md). Off Linux only the process's own ``ru_maxrss`` is known.

    :meth:`processes` says where the memory is: one line per process (``role`` main or worker,
    ``pid``, ``vmhwm_mb`` at the sample whose VmHWM sum was ``peak_rss_mb``, ``pss_mb`` at the
    sample whose PSS sum was ``peak_pss_mb``; 0 where the process was not alive then), so the
    lines sum to the two totals. A DataLoader rebuilt every epoch (the official pipeline) has new
    workers each epoch; the lines are those of the peak samples."""

    def __init__(self) -> None:
        self.peak_rss_mb, self.peak_pss_mb = 0.0, 0.0
        self.proc = os.path.isdir("/proc/self/task")
        self._rss_at_peak: dict[int, float] = {}
        self._pss_at_peak: dict[int, float] = {}

    @staticmethod
    def _pids() -> list[int]:
        pids, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except OSError:
                continue
        return pids

    @staticmethod
    def _kb(path: str, key: str) -> float:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return float(line.split()[1])
        except OSError:
            pass
        return 0.0

    def sample(self) -> None:
        if not self.proc:
            self.peak_rss_mb = _peak_rss_mb()
            return
        pids = self._pids()
        rss = {p: self._kb(f"/proc/{p}/status", "VmHWM:") / 1024 for p in pids}
        pss = {p: self._kb(f"/proc/{p}/smaps_rollup", "Pss:") / 1024 for p in pids}
        if sum(rss.values()) >= self.peak_rss_mb:
            self.peak_rss_mb, self._rss_at_peak = sum(rss.values()), rss
        if sum(pss.values()) >= self.peak_pss_mb:
            self.peak_pss_mb, self._pss_at_peak = sum(pss.values()), pss

    def processes(self) -> list[dict[str, Any]]:
        """One line per process of the peak samples: ``{role, pid, vmhwm_mb, pss_mb}``, the main
        process first; ``sum(vmhwm_mb) == peak_rss_mb`` and ``sum(pss_mb) == peak_pss_mb``."""
        me = os.getpid()
        pids = sorted(set(self._rss_at_peak) | set(self._pss_at_peak), key=lambda p: (p != me, p))
        return [{"role": "main" if p == me else "worker", "pid": p, "vmhwm_mb": self._rss_at_peak.get(p, 0.0),
                 "pss_mb": self._pss_at_peak.get(p, 0.0)} for p in pids]

    def __enter__(self) -> "TreeMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.sample()


def time_pipeline(batches, step, steps: int, warmup: int, batch_size: int, sync=lambda: None) -> dict[str, Any]:
    """Run ``warmup + steps`` iterations of ``views, labels = next(batches); step(i, views, labels)``
    and time the last ``steps``: ``img_per_s`` (images of the timed steps over their wall time),
    ``s_per_step`` (median wall time of one iteration, data included), ``s_per_step_compute``
    (median of the step alone), ``data_wait_share`` (the fraction of the timed wall time spent
    waiting for the next batch: loader, transfer and, on the device path, the batched
    augmentation), peak memory of the process tree (:class:`TreeMemory`). The official
    pipeline's benchmark (``benchmarks/official_pipeline.py``) uses the same function."""
    import torch

    waits, computes, out = [], [], None
    with TreeMemory() as mem:
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            try:
                views, labels = next(batches)
            except StopIteration:
                raise OperaError("the data ran out before the timed steps ended; use fewer --steps") from None
            sync()
            t1 = time.perf_counter()
            out = step(i, views, labels)
            sync()
            t2 = time.perf_counter()
            if i >= warmup:
                waits.append(t1 - t0)
                computes.append(t2 - t1)
            mem.sample()  # between steps, outside the timed spans (see TreeMemory)
    wall = sum(waits) + sum(computes)
    return {"steps": steps, "warmup": warmup, "img_per_s": batch_size * steps / wall,
            "s_per_step": statistics.median([w + c for w, c in zip(waits, computes)]),
            "s_per_step_compute": statistics.median(computes), "data_wait_share": sum(waits) / wall,
            "peak_rss_mb": mem.peak_rss_mb, "peak_pss_mb": mem.peak_pss_mb, "processes": mem.processes(),
            "loss": float(out.detach() if isinstance(out, torch.Tensor) else out.loss.detach()) if out is not None else None}


def endless(epoch_iter):
    """Batches of epoch 0, 1, 2, ... from ``epoch_iter(epoch)``, without end."""
    epoch = 0
    while True:
        yield from epoch_iter(epoch)
        epoch += 1


def bench_end_to_end(data: str, augment_on: str = "device", workers: int = 2, crop_min: float = 0.08, seed: int = 0,
                     steps: int = 30, warmup: int = 3, **config: Any) -> dict[str, Any]:
    """Real pretraining steps fed by the training loop's own feed (``opera.data.PretrainFeed``
    over ``data``'s train split, ``augment_on``, ``workers``): ``time_pipeline``'s figures plus
    the configuration. ``config`` goes to ``make_step`` (backbone, img_size, batch_size, threads,
    device, amp, channels_last, ...); the class count is the dataset's."""
    import torch

    from opera.data import PretrainFeed, build_dataset

    if steps < 1 or warmup < 0:
        raise OperaError("bench needs --steps >= 1 and --warmup >= 0")
    dataset = build_dataset(data, "train")
    # the feed, and its workers, before the model: as the training loop does (PretrainFeed.start_workers)
    default = {k: v.default for k, v in inspect.signature(make_step).parameters.items()}
    dev, batch_size = torch.device(config.get("device", default["device"])), config.get("batch_size", default["batch_size"])
    feed = PretrainFeed(dataset, img_size=config.get("img_size", default["img_size"]), crop_min=crop_min, flip=True,
                        seed=seed, augment_on=augment_on, device=dev, workers=workers)
    feed.start_workers(batch_size)
    step, model, meta = make_step(num_classes=dataset.num_classes, **config)
    to_cl = meta["channels_last"] and dev.type == "cuda"

    def batches():
        for views, labels in endless(lambda e: feed.epoch(batch_size, e)):
            yield ([v.contiguous(memory_format=torch.channels_last) for v in views] if to_cl else views), labels

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    result = time_pipeline(batches(), step, steps, warmup, batch_size, sync)
    return {**meta, "pipeline": "opera", "augment_on": augment_on, "in_memory": feed.in_memory, "workers": workers,
            "data": data, "images": len(dataset), "crop_min": crop_min, **result}


# ----------------------------------------------------------------------------- the data pipeline
def image_files(folder: str) -> list[str]:
    """The image files under ``folder``, sorted (walk order fixed)."""
    from opera.data.datasets import IMAGE_EXTS

    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTS)]
    if not out:
        raise OperaError(f"no images in {folder}; make some with: opera data make-folder {folder}")
    return out


class TwoCropFiles:  # a map-style dataset (DataLoader needs __getitem__ and __len__ only)
    """Decode + opera's two-crop ``PretrainTransform``, one file at a time (a DataLoader worker's work)."""

    def __init__(self, files: list[str], img_size: int):
        from opera.data.transforms import PretrainTransform

        self.files, self.transform = files, PretrainTransform(img_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from opera.data.datasets import decode_image_file

        return self.transform(decode_image_file(self.files[i]))


def time_loader(ds, n_images: int, batch_size: int, workers: int) -> float:
    """Images/s per worker of ``ds`` through a DataLoader with ``workers`` processes (the first
    batch, which waits for the workers to start, is not counted)."""
    import torch

    idx = [i % len(ds) for i in range(n_images)]
    from opera.data.loader import Loader

    loader = Loader(torch.utils.data.Subset(ds, idx), batch_size=batch_size, num_workers=workers)
    t0, seen = None, 0
    for k, (v1, _v2) in enumerate(loader):
        if k == 0:
            t0 = time.perf_counter()
            continue
        seen += v1.shape[0]
    if t0 is None or seen == 0:
        raise OperaError("the data benchmark needs at least 2 batches with workers; raise --batches")
    return seen / (time.perf_counter() - t0) / workers


def bench_pipeline(folder: str, img_size: int = 224, batches: int = 4, batch_size: int = 32, workers: int = 0) -> dict[str, Any]:
    """Images/s of opera's decode + two-crop augmentation of the images in ``folder``, per worker.
    ``workers=0``: in this process on one thread (the cost inside one DataLoader worker), after
    4 warm-up images. The comparison with the official PIL pipeline is ``benchmarks/data_pipeline.py``."""
    import torch

    if batches < 1 or batch_size < 1 or workers < 0:
        raise OperaError("the data benchmark needs --batches >= 1, --batch-size >= 1 and --workers >= 0")
    ds = TwoCropFiles(image_files(folder), img_size)
    n = batches * batch_size
    torch.manual_seed(0)
    if workers:
        rate = time_loader(ds, n, batch_size, workers)
    else:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i in range(min(4, n)):
                ds[i % len(ds)]
            t0 = time.perf_counter()
            for i in range(n):
                ds[i % len(ds)]
            rate = n / (time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
    return {"data_pipeline": "opera", "img_per_s": rate, "images": n, "img_size": img_size, "workers": workers}


def bench_step_subprocess(timeout: float | None = None, **config: Any) -> dict[str, Any]:
    """``bench_step(**config)`` in a fresh interpreter, so ``peak_rss_mb`` is this config's own."""
    code = "import json, sys; from opera.bench import bench_step; print(json.dumps(bench_step(**json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise OperaError(f"benchmark subprocess failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _format(r: dict[str, Any]) -> str:
    if r.get("pipeline"):
        return (f"end to end ({r['pipeline']}, augment on {r.get('augment_on', 'workers')}, {r['workers']} workers): "
                f"{r['backbone']} {r['img_size']}px batch {r['batch_size']} on {r['device']}: {r['img_per_s']:.1f} img/s, "
                f"{r['s_per_step']:.3f} s/step ({r['s_per_step_compute']:.3f} s computing), waited for data "
                f"{100 * r['data_wait_share']:.0f}% of the time, peak RSS {r['peak_rss_mb']:.0f} MB "
                f"(PSS {r['peak_pss_mb']:.0f} MB) with workers")
    if "data_pipeline" in r:
        return (f"data pipeline (opera, decode + two crops): {r['images']} images at {r['img_size']}px, {r['workers']} workers: "
                f"{r['img_per_s']:.1f} img/s per worker")
    return (f"{r['backbone']} {r['img_size']}px batch {r['batch_size']} [{r['hierarchy']}] on {r['device']} "
            f"({r['threads']} threads): {r['img_per_s']:.1f} img/s, {r['s_per_step'] * 1e3:.0f} ms/step (median of "
            f"{r['steps']}), peak RSS {r['peak_rss_mb']:.0f} MB"
            + (f"; {r['gflop_per_step']:.1f} GFLOP/step at {r['gflop_per_s']:.0f} GFLOP/s = "
               f"{100 * r['fraction_of_peak']:.0f}% of {r['compute_peak_gflop_per_s']:.0f} (best of a large matmul, "
               f"{r['matmul_peak_gflop_per_s']:.0f}, and conv, {r.get('conv_peak_gflop_per_s', float('nan')):.0f}, here)"
               if "gflop_per_step" in r else ""))


if typer is not None:
    def bench(
        backbone: str = typer.Option("resnet18", "--backbone", "-b", help="Backbone name (resnet18, resnet50, vit_tiny, deit_small, ... or a timm name)."),
        img_size: int = typer.Option(64, "--img-size", help="Side of the random square images."),
        batch_size: int = typer.Option(64, "--batch-size", help="Images per view per step."),
        hierarchy: str = typer.Option("self,full", "--hierarchy", "-H", help="Task spaces from the base up."),
        steps: int = typer.Option(20, "--steps", help="Timed steps (the median is reported)."),
        warmup: int = typer.Option(3, "--warmup", help="Untimed steps first."),
        threads: int = typer.Option(2, "--threads", help="torch.set_num_threads (0: leave as is)."),
        patch_size: Optional[int] = typer.Option(None, "--patch-size", help="ViT patch size (default: img_size/8 for vit_tiny, 16 for DeiTs)."),
        mlp_dim: int = typer.Option(4096, "--mlp-dim", help="Hidden width of projector and predictor."),
        dim: int = typer.Option(256, "--dim", help="Instance embedding width."),
        num_classes: int = typer.Option(10, "--num-classes", help="Classes of the class space."),
        concat_views: bool = typer.Option(False, "--concat-views", help="One forward for both views (changes BatchNorm statistics)."),
        roofline: bool = typer.Option(True, "--roofline/--no-roofline", help="Also count the step's FLOPs and measure a large matmul's throughput (after timing)."),
        per_view: bool = typer.Option(True, "--per-view/--joint-views", help="Online forward+backward one view at a time (default; same gradients, less memory) or both at once."),
        channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last", help="Default: on for CNN backbones."),
        compile: bool = typer.Option(False, "--compile", help="torch.compile the hierarchy."),
        device: str = typer.Option("cpu", "--device", help="cpu | cuda | cuda:N."),
        amp: str = typer.Option("auto", "--amp", help="auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 (also on CPU) | fp16 (autocast + GradScaler) | off."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON line."),
        data: Optional[str] = typer.Option(None, "--data", help="Benchmark opera's data pipeline (decode + two crops) on the images in DIR instead; benchmarks/data_pipeline.py races it against the official PIL one."),
        workers: int = typer.Option(0, "--workers", help="DataLoader workers for --data (0: one thread in this process)."),
        batches: int = typer.Option(4, "--batches", help="Batches for --data."),
        end_to_end: bool = typer.Option(False, "--end-to-end", help="With --data: real training steps fed by the training loop's loader (img/s, s/step, peak RSS of process+workers, data-wait share)."),
        augment_on: str = typer.Option("device", "--augment-on", help="--end-to-end: device (batched two-crop on --device) | workers (per image)."),
        crop_min: float = typer.Option(0.08, "--crop-min", help="--end-to-end: RandomResizedCrop minimum scale (MoCo-v3: 0.08)."),
    ) -> None:
        """Time full pretraining steps on random images, the data pipeline with --data DIR, or both
        together with --data DIR --end-to-end."""
        if end_to_end:
            if data is None:
                raise OperaError("--end-to-end needs --data (a folder of class folders; make one with: opera data make-folder DIR)")
            result = bench_end_to_end(data, augment_on=augment_on, workers=workers, crop_min=crop_min, steps=steps,
                                      warmup=warmup, backbone=backbone, img_size=img_size, batch_size=batch_size,
                                      hierarchy=hierarchy, threads=threads, patch_size=patch_size, mlp_dim=mlp_dim, dim=dim,
                                      channels_last=channels_last, compile=compile, device=device, amp=amp, per_view=per_view)
        elif data is not None:
            if not os.path.isdir(data):
                raise OperaError(f"--data {data!r} is not a directory of images")
            result = bench_pipeline(data, img_size=img_size, batches=batches, batch_size=batch_size, workers=workers)
        else:
            result = bench_step(backbone=backbone, img_size=img_size, batch_size=batch_size, hierarchy=hierarchy, steps=steps,
                                warmup=warmup, threads=threads, patch_size=patch_size, mlp_dim=mlp_dim, dim=dim,
                                num_classes=num_classes, concat_views=concat_views, channels_last=channels_last,
                                compile=compile, device=device, per_view=per_view, roofline=roofline, amp=amp)
        print(json.dumps(result) if as_json else _format(result))


def main() -> None:  # ``python -m opera.bench ...``
    if typer is None:  # pragma: no cover
        raise SystemExit("typer is not installed")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(bench)
    try:
        app()
    except OperaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
