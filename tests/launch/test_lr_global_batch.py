"""The learning rate actually applied in a 2-process gloo run: ``base_lr x global batch / 256``
(``--batch-size`` is the global batch), at every step of the schedule, on every rank."""

from __future__ import annotations

import math

import pytest

from opera import distributed
from opera.launch import launch_local

pytestmark = pytest.mark.slow  # every test here spawns processes or trains for seconds (pytest -m 'not slow' skips them)

TIMEOUT_S = 150
GLOBAL_BATCH = 32  # 16 per rank
STEPS = 3


def pretrain_recording_lr(output: str) -> list[list[float]]:
    """run_pretrain on this rank; the lr of every optimizer group at every step."""
    from opera.configs import apply_overrides, load_config
    from opera.engine import optim
    from opera.engine.pretrain import run_pretrain

    cfg = apply_overrides(load_config("cpu_digits"), [
        "data.spec=digits:0-1", "train.epochs=1", f"train.batch_size={GLOBAL_BATCH}", "train.device=cpu",
        f"train.max_steps={STEPS}", "train.knn_every=0", "train.save_every_epochs=0", "backbone.img_size=16",
        "self.mlp_dim=32", "self.dim=16", "full.hidden=16", "optim.base_lr=2.56", "optim.warmup_epochs=0.5"])
    applied: list[list[float]] = []
    real_step = optim.LARS.step

    def recording_step(self, closure=None):
        applied.append([g["lr"] for g in self.param_groups])
        return real_step(self, closure)

    optim.LARS.step = recording_step
    try:
        run_pretrain(cfg, output)
    finally:
        optim.LARS.step = real_step
        distributed.shutdown()
    return applied


@pytest.mark.slow
def test_two_process_run_applies_the_global_batch_lr(tmp_path):
    ranks = launch_local(pretrain_recording_lr, (str(tmp_path / "run"),), nproc=2, timeout=TIMEOUT_S)
    peak = 2.56 * GLOBAL_BATCH / 256  # 0.32; the per-rank batch would give 0.16
    steps_per_epoch = 288 // GLOBAL_BATCH  # digits:0-1 has 288 training images
    warmup_steps = 0.5 * steps_per_epoch
    expected = [peak * k / warmup_steps for k in range(STEPS)]  # linear warmup per iteration
    assert expected[1:] == pytest.approx([peak / 4.5, 2 * peak / 4.5])
    for rank, applied in enumerate(ranks):
        assert len(applied) == STEPS, rank
        for k, lrs in enumerate(applied):
            assert lrs == pytest.approx([expected[k]] * len(lrs), abs=1e-12), f"rank {rank} step {k}"
    assert not math.isclose(ranks[0][1][0], ranks[0][2][0])  # the schedule moves between steps
