"""``data.labelled_per_batch``'s sampler against the simpler design that gathers each step's batch
from the cycle's permutation (``pool[perm[a:b]]``), side by side in one process.

opera's ``LabelledShareBatchSampler`` gathers a pool in its cycle's order once per cycle
(``pool[perm]``, O(N) about once an epoch), so a step is one slice of each stream, a concatenate
and a ``tolist``. ``GatherPerStep`` below keeps the other design, with the same streams. The two
step round-robin (one step of each in turn, so a burst of load falls on both), every batch is
checked equal, and the output gives per step: the mean over the epochs after the first (the
cycles' permutation draws included: what a run pays) and the median (a step that draws nothing).
Between steps the loop sleeps ``--gap-ms`` (outside the timed calls): a training step takes far
longer, and opera draws the next cycle's permutation on a background thread meanwhile; with no
gap the loop walks a cycle of 1.28M images in ~30 ms, less than the draw takes.

    python benchmarks/sampler_side_by_side.py --images 1281167 --epochs 3 --gap-ms 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from itertools import repeat
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opera.data.loader import LabelledShareBatchSampler, epoch_permutation_array, sample_seed  # noqa: E402


class GatherPerStep(LabelledShareBatchSampler):
    """The same streams, gathered a step at a time from the cycle's permutation."""

    def _stream(self, pool, g, per_global, offset, count, tag):
        steps_per_cycle = len(pool) // per_global
        c = g // steps_per_cycle
        held = self._cycles.get(tag)
        if held is None or held[0] != c:
            self._cycles.pop(tag, None)
            held = self._cycles[tag] = (c, epoch_permutation_array(len(pool), sample_seed(self.seed, tag, c), c))
        start = (g % steps_per_cycle) * per_global + offset
        return pool[held[1][start: start + count]]

    def _batches(self, epoch, start_step):
        k_rank = self.k // self.world_size
        u_rank, u_global = self.batch_size - k_rank, self.batch_size * self.world_size - self.k
        for step in range(start_step, self.n_steps):
            g = epoch * self.n_steps + step
            batch = self._stream(self.labelled, g, self.k, self.rank * k_rank, k_rank, -3).tolist()
            batch += self._stream(self.unlabelled, g, u_global, self.rank * u_rank, u_rank, -4).tolist()
            yield list(zip(repeat(epoch), batch)) if self.seeded else batch


def side_by_side(n: int, epochs: int, batch: int = 256, k: int = 64, seeded: bool = False, gap_s: float = 1e-3) -> dict:
    labelled = np.arange(0, n, 100)
    unlabelled = np.setdiff1d(np.arange(n), labelled)
    samplers = {name: cls(labelled, unlabelled, batch, k, seed=0, seeded=seeded)
                for name, cls in (("opera", LabelledShareBatchSampler), ("gather_per_step", GatherPerStep))}
    times: dict[str, list[float]] = {name: [] for name in samplers}
    for epoch in range(epochs):
        its = {}
        for name, s in samplers.items():
            s.set_epoch(epoch)
            its[name] = iter(s)
        for _ in range(samplers["opera"].n_steps):
            got = {}
            for name, it in its.items():
                t0 = time.perf_counter()
                got[name] = next(it)
                times[name].append(time.perf_counter() - t0)
            assert got["opera"] == got["gather_per_step"], "the two samplers disagree"
            time.sleep(gap_s)
    skip = samplers["opera"].n_steps if epochs > 1 else 0  # the first epoch draws its first cycles on the step
    times = {name: t[skip:] for name, t in times.items()}
    return {"images": n, "epochs": epochs, "timed_steps": len(times["opera"]), "gap_ms": gap_s * 1e3, "batch": batch, "labelled_per_batch": k,
            "seeded": seeded,
            **{f"{name}_mean_us": 1e6 * sum(t) / len(t) for name, t in times.items()},
            **{f"{name}_median_us": 1e6 * statistics.median(t) for name, t in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1_281_167)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gap-ms", type=float, default=1.0, help="sleep between steps (a training step's stand-in)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    for seeded in (False, True):
        r = side_by_side(args.images, args.epochs, seeded=seeded, gap_s=args.gap_ms / 1e3)
        print(json.dumps({**r, "load_start": load, "load_end": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main()
