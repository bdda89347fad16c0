"""A real 2-process gloo run of the instance loss (Eq. 34, instance term; MoCo-v3's gathered keys).

On rank r, ``info_nce(q_r, k_r)`` contrasts the local queries with the keys of *all* ranks, and the
positive of query i is key ``i + r * local_batch``. Then the mean over ranks of the loss is the
1-process loss on the concatenated batch, and the per-rank gradients w.r.t. q are its gradient
(times the world size), which is what DDP's gradient averaging relies on.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from opera import distributed
from opera.supervisions.losses import info_nce

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

WORLD = 2
LOCAL_BATCH = 4
DIM = 8
TAU = 0.2
TIMEOUT_S = 60


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch: the same on every process (fixed generator)."""
    g = torch.Generator().manual_seed(123)
    q = torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(WORLD * LOCAL_BATCH, DIM, generator=g, dtype=torch.float64)
    return q, k


def worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: init gloo, compute the loss on its shard, save loss / grad / gathered keys."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        q_all, k_all = make_batch()
        shard = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        q = q_all[shard].clone().requires_grad_(True)
        k = k_all[shard].clone().requires_grad_(True)
        loss = info_nce(q, k, TAU)
        loss.backward()
        record = {
            "rank": distributed.get_rank(),
            "world": distributed.get_world_size(),
            "loss": loss.detach(),
            "grad_q": q.grad,
            "grad_k": k.grad,
            "local_loss": info_nce(q.detach(), k.detach(), TAU, gather_distributed=False),
            "gathered": distributed.all_gather_no_grad(k.detach()),
        }
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(out_dir: Path, fn=None, timeout_s: float = TIMEOUT_S) -> list[dict]:
    """``fn(rank, port, out_dir)`` (default: :func:`worker`) on 2 gloo processes; each rank's
    ``OUT_DIR/rank{r}.pt`` record, in rank order (the test fails if they do not finish in time)."""
    ctx = mp.spawn(fn or worker, args=(distributed.free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.terminate()
            pytest.fail(f"2-rank gloo run did not finish in {timeout_s} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_info_nce_gathers_keys_and_offsets_labels_across_two_gloo_ranks(tmp_path):
    assert not distributed.is_initialized()
    records = run_two_ranks(tmp_path)
    q_all, k_all = make_batch()

    for r, rec in enumerate(records):
        assert rec["rank"] == r and rec["world"] == WORLD
        assert torch.equal(rec["gathered"], k_all)  # all_gather in rank order
        assert rec["grad_k"] is None  # keys are stop-gradient on every rank

    # the 1-process loss on the concatenated batch
    q_ref = q_all.clone().requires_grad_(True)
    ref = info_nce(q_ref, k_all, TAU)
    ref.backward()
    mean_loss = torch.stack([rec["loss"] for rec in records]).mean()
    assert torch.allclose(mean_loss, ref.detach(), rtol=1e-10, atol=1e-12)
    grads = torch.cat([rec["grad_q"] for rec in records]) / WORLD
    assert torch.allclose(grads, q_ref.grad, rtol=1e-10, atol=1e-12)

    # not vacuous: without the gathered negatives, or without the rank offset, rank 1's loss differs
    q1 = F.normalize(q_all[LOCAL_BATCH:], dim=1)
    logits = q1 @ F.normalize(k_all, dim=1).T / TAU
    no_offset = F.cross_entropy(logits, torch.arange(LOCAL_BATCH, dtype=torch.long)) * 2 * TAU
    with_offset = F.cross_entropy(logits, torch.arange(LOCAL_BATCH) + LOCAL_BATCH) * 2 * TAU
    assert torch.allclose(records[1]["loss"], with_offset)
    assert not torch.allclose(records[1]["loss"], no_offset)
    for rec in records:
        assert not torch.allclose(rec["loss"], rec["local_loss"])
