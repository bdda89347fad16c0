"""The labelled-share sampler's cost: a step gathers its batch from permutations drawn once per
cycle (about once per epoch), so the work of a step does not depend on the dataset's size, and the
batches are still the documented function of (seed, epoch, step)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from opera.data.loader import LabelledShareBatchSampler, epoch_permutation, sample_seed


def documented_batch(labelled, unlabelled, per_rank, k, seed, epoch, step, n_steps, rank, world):
    """Global step g takes the next k labelled and B - k unlabelled items of each pool's endless
    sequence of permutations (cycle c of a pool: epoch_permutation(len, sample_seed(seed, tag, c), c))."""
    g = epoch * n_steps + step

    def stream(pool, per_global, offset, count, tag):
        per_cycle = len(pool) // per_global
        c = g // per_cycle
        perm = epoch_permutation(len(pool), sample_seed(seed, tag, c), c)
        start = (g % per_cycle) * per_global + offset
        return [pool[j] for j in perm[start:start + count]]

    k_rank, u_global = k // world, per_rank * world - k
    u_rank = per_rank - k_rank
    return stream(labelled, k, rank * k_rank, k_rank, -3) + stream(unlabelled, u_global, rank * u_rank, u_rank, -4)


@pytest.mark.parametrize("prefetch", [True, False])
def test_batches_are_the_documented_function_of_seed_epoch_step(prefetch):
    labelled, unlabelled = list(range(100, 123)), list(range(200, 517))
    world, per_rank, k = 2, 12, 4
    for rank in range(world):
        s = LabelledShareBatchSampler(labelled, unlabelled, per_rank, k, seed=7, rank=rank, world_size=world,
                                      prefetch=prefetch)
        for epoch in range(4):  # the labelled pool cycles within an epoch, the unlabelled one across epochs
            s.set_epoch(epoch)
            got = list(s)
            want = [documented_batch(labelled, unlabelled, per_rank, k, 7, epoch, step, s.n_steps, rank, world)
                    for step in range(s.n_steps)]
            assert got == want
        s.set_epoch(2, start_step=5)  # a resume mid-epoch, on a sampler that holds other cycles
        assert list(s) == [documented_batch(labelled, unlabelled, per_rank, k, 7, 2, step, s.n_steps, rank, world)
                           for step in range(5, s.n_steps)]


def step_work(n: int, per_rank: int = 32, k: int = 8, epochs: int = 2) -> tuple[list[int], int]:
    """The work (index elements drawn and gathered) of every step of ``epochs`` epochs over ``n``
    images, 1% of them labelled; and the steps per epoch."""
    labelled = np.arange(0, n, 100)
    unlabelled = np.setdiff1d(np.arange(n), labelled)
    s = LabelledShareBatchSampler(labelled, unlabelled, per_rank, k, seed=0)
    work = []
    for epoch in range(epochs):
        s.set_epoch(epoch)
        for _ in s:
            work.append(s.work - sum(work))
    return work, s.n_steps


def test_work_per_step_does_not_depend_on_the_dataset_size():
    small, steps_small = step_work(10_000)
    large, steps_large = step_work(100_000)
    # a step that draws no permutation gathers exactly its batch, at every size
    assert np.median(small) == np.median(large) == 32
    # the steps that draw one draw a pool's cycle: the unlabelled pool about once per epoch
    heavy = [w for w in large if w > 32]
    assert len([w for w in heavy if w > 50_000]) <= 3  # 2 epochs: at most 3 cycles of the large pool
    # so the work per step, over whole epochs, is the same at 10k and 100k images: O(B) a step, O(N) an epoch
    per_step_small, per_step_large = sum(small) / len(small), sum(large) / len(large)
    assert per_step_large < 1.1 * per_step_small < 4 * 32
    assert steps_large > 9 * steps_small


def test_seeded_batches_and_copies_are_the_same_streams():
    """The DataLoader path's ``(epoch, index)`` keys carry the same batches; a copy made while the
    next cycle is being drawn ahead (a pickled sampler) draws its own and agrees."""
    labelled, unlabelled = np.arange(0, 3000, 10), np.setdiff1d(np.arange(3000), np.arange(0, 3000, 10))
    plain = LabelledShareBatchSampler(labelled, unlabelled, 32, 8, seed=5)
    seeded = LabelledShareBatchSampler(labelled, unlabelled, 32, 8, seed=5, seeded=True)
    for epoch in range(3):  # the labelled pool (300, 8 a step) cycles several times an epoch
        plain.set_epoch(epoch)
        seeded.set_epoch(epoch)
        want = list(plain)
        assert list(seeded) == [[(epoch, i) for i in batch] for batch in want]
    twin = copy.deepcopy(seeded)
    twin.set_epoch(3, start_step=4)
    seeded.set_epoch(3, start_step=4)
    assert list(twin) == list(seeded) and len(list(twin)) == twin.n_steps - 4
