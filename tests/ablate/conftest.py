"""Helpers of the ablation tests: a tiny study (seconds per cell) and fabricated finished cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

#: the tiny config of a real cell: one short epoch on 3 digit classes, small MLPs
TINY = ["train.epochs=1", "self.mlp_dim=64", "self.dim=32", "full.hidden=64", "train.knn_every=0",
        "train.batch_size=64", "train.log_every=1", "train.save_every_steps=0"]
TINY_EVALS = ["linear.epochs=5", "linear.batch_size=256"]


def write_fake_cell(study_dir: Path, variant: str, seed: int, metrics: dict[str, float], losses=(3.0, 2.0, 1.5)) -> Path:
    """Write a finished cell (cell.json + a metrics.jsonl) without training."""
    from opera.ablate.records import CELL_FILE, cell_dir, load_study

    study = load_study(study_dir)
    cdir = cell_dir(study_dir, study.variant(variant), seed)
    (cdir / "pretrain").mkdir(parents=True, exist_ok=True)
    rows = [{"step": i + 1, "epoch": (i + 1) / len(losses), "loss": v, "loss/self": v / 2, "loss/full": v / 2}
            for i, v in enumerate(losses)]
    rows.append({"step": len(losses), "epoch": 1.0, "knn_top1": 50.0})  # monitor rows carry no loss
    (cdir / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (cdir / CELL_FILE).write_text(json.dumps({"variant": study.variant(variant).name, "seed": seed, "metrics": metrics,
                                              "final_losses": {"loss": losses[-1]}, "cell_s": 60.0}))
    return cdir


@pytest.fixture
def tiny_study(tmp_path):
    """An arrangements study A,C x 1 seed on digits:0-2 (transfer digits:3-4), not run yet."""
    from opera.ablate.study import arrangement_variants, create_study

    out = tmp_path / "study"
    create_study("arrangements", arrangement_variants("A,C"), output=out, command="opera ablate arrangements (test)",
                 seeds=1, overrides=TINY, data="digits:0-2", transfer="digits:3-4", eval_options=TINY_EVALS)
    return out


@pytest.fixture
def fake_cell():
    """``fake_cell(study_dir, variant, seed, metrics, losses=...)`` writes a finished cell."""
    return write_fake_cell


@pytest.fixture
def one_thread():
    """One torch thread (as the study runs its cells): two threads on the shared 2-core machine
    spin against each other and make a seconds-long cell take a minute."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_overrides():
    """The ``--set`` items of a seconds-long cell."""
    return list(TINY)
