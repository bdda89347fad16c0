"""Evaluations on 2 gloo processes give the metrics of 1 process.

Each protocol runs once here and once in 2 spawned processes (``launch_local``, what
``--nproc 2`` does). The global batch is the same set of images for any world size
(``GlobalBatchSampler``), gradients are summed over ranks and divided by the global batch,
BatchNorm is synchronised, validation is sharded without padding and the k-NN bank is sharded:
so metrics agree within float tolerance, and the learning rate is scaled by the *global* batch.
"""

from __future__ import annotations

import re

import pytest
import torch

from opera.distributed import shard_bounds
from opera.evals.common import GlobalBatchSampler
from opera.evals.finetune import finetune_config, run_finetune
from opera.evals.knn import KNNConfig, run_knn
from opera.evals.linear import LinearConfig, run_linear
from opera.launch.local import launch_local

DATA = "digits:0-3"  # 576 train / 144 val images
TIMEOUT_S = 240


def one_and_two(fn, cfg_of, tmp_path):
    one = fn(cfg_of(tmp_path / "one"))
    ranks = launch_local(fn, (cfg_of(tmp_path / "two"),), 2, timeout=TIMEOUT_S)
    return one, ranks


def test_shards_partition_and_global_batches_do_not_depend_on_world_size():
    for n in (0, 1, 7, 144):
        bounds = [shard_bounds(n, r, 3) for r in range(3)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    # 103 images, batch 20: 5 full batches and a tail of 3
    one = GlobalBatchSampler(103, 20, seed=4)
    two = [GlobalBatchSampler(103, 20, seed=4, rank=r, world=2) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(3)
    merged = [a + b for a, b in zip(*two)]
    assert merged == list(one) and len(merged) == 6 and one.global_sizes() == [20] * 5 + [3]
    flat = [i for b in merged for i in b]
    assert sorted(flat) == list(range(103))  # every image once, none padded
    resumed = GlobalBatchSampler(103, 20, seed=4)
    resumed.set_epoch(3, start=4)
    assert list(resumed) == list(one)[4:]
    assert GlobalBatchSampler(101, 20, world=2).global_sizes() == [20] * 5  # a tail of 1 image over 2 ranks: dropped


@pytest.mark.slow
def test_knn_two_processes_shard_the_bank_and_match_one(trained_run, tmp_path):
    # a trained backbone: random features are nearly collinear, their neighbours near-ties
    cfg = lambda out: KNNConfig(checkpoint=str(trained_run), data=DATA, output=str(out), tensorboard=False,  # noqa: E731
                                bank_chunk=100, query_chunk=50)
    one, ranks = one_and_two(run_knn, cfg, tmp_path)
    m1, m2 = one["metrics"], ranks[0]["metrics"]
    print(f"\nknn top1: 1 process {m1['top1']:.2f}, 2 processes {m2['top1']:.2f}")
    assert m2["world_size"] == 2 and m2["bank_sharded_over_ranks"] and m2["queries"] == 144 == m1["queries"]
    assert m2["top1"] == pytest.approx(m1["top1"], abs=1e-6) and m2["top5"] == pytest.approx(m1["top5"], abs=1e-6)
    assert ranks[1]["metrics"]["top1"] == m2["top1"]
    assert not (tmp_path / "two" / "results.json").exists() or ranks[0]["metrics"] == m2


@pytest.mark.slow
def test_linear_grid_two_processes_match_one_and_lr_scales_with_the_global_batch(trained_run, tmp_path):
    cfg = lambda out: LinearConfig(checkpoint=str(trained_run), data=DATA, output=str(out), epochs=3,  # noqa: E731
                                   batch_size=64, tensorboard=False, grid=True, grid_lr_scales=(1.0, 10.0))
    one, ranks = one_and_two(run_linear, cfg, tmp_path)
    g1, g2 = one["linear_grid"], ranks[0]["linear_grid"]
    print("\nlinear heads (val top1) 1 vs 2 processes:",
          [(a["name"], round(a["val_top1"], 2), round(b["val_top1"], 2)) for a, b in zip(g1["heads"], g2["heads"])])
    assert [h["name"] for h in g1["heads"]] == ["lr0.1", "lr0.1_bn", "lr1", "lr1_bn"] and g1["winner"] == g2["winner"]
    for a, b in zip(g1["heads"], g2["heads"]):
        assert b["val_top1"] == pytest.approx(a["val_top1"], abs=1e-6) and b["holdout_top1"] == pytest.approx(a["holdout_top1"], abs=1e-6)
    # 1 x 64 and 2 x 32: the same lr, from the global batch; the world size is recorded
    s1, s2 = one["lr_scaling"], ranks[0]["lr_scaling"]
    assert (s1["world_size"], s1["per_rank_batch"], s2["world_size"], s2["per_rank_batch"]) == (1, 64, 2, 32)
    assert s1["global_batch"] == s2["global_batch"] == 64 and one["metrics"]["lr"] == ranks[0]["metrics"]["lr"]
    # the heads themselves: the same weights
    w1 = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_finetune_two_processes_match_one(tmp_path):
    """Three steps of AdamW with a large epsilon (its update is then linear in the gradient, so
    float noise is not blown up to +-lr as Adam does for near-zero gradients; over a whole run
    even 1 vs 2 threads of one process drift apart that way): the same weights on 1 and 2
    processes, which checks the sampler, the loss normalisation, the synchronised BatchNorm and
    DDP together. Deterministic views (no crop, no flip): only the split over ranks differs."""
    cfg = lambda out: finetune_config("digits", checkpoint="random:resnet_tiny", data=DATA, output=str(out),  # noqa: E731
                                      epochs=2, batch_size=64, crop_min=1.0, tensorboard=False, device="cpu",
                                      eps=1.0, base_lr=0.1, max_steps=3)
    one, ranks = one_and_two(run_finetune, cfg, tmp_path)
    m1, m2 = one["metrics"], ranks[0]["metrics"]
    print(f"\nfinetune top1: 1 process {m1['top1']:.2f}, 2 processes {m2['top1']:.2f}")
    assert m1["steps"] == m2["steps"] == 3 and ranks[0]["lr_scaling"]["world_size"] == 2
    assert m2["top1"] == pytest.approx(m1["top1"], abs=1e-6)
    w1 = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    for key in w1:
        torch.testing.assert_close(w2[key].float(), w1[key].float(), rtol=1e-4, atol=1e-5, msg=key)


def test_bad_inputs_of_the_new_options_are_one_line_errors(tmp_path):
    from opera.errors import OperaError
    from opera.evals.cli import _floats
    from opera.evals.common import check_global_batch

    out = str(tmp_path / "o")
    cases = [
        (lambda: run_linear(LinearConfig(checkpoint="random:resnet_tiny", output=out, grid=True, holdout_fraction=1.5)),
         "config key holdout_fraction=1.5 is out of range: must be in (0, 1); set --set holdout_fraction="),
        (lambda: run_linear(LinearConfig(checkpoint="random:resnet_tiny", output=out, grid=True, grid_lr_scales=(0.0,))),
         "config key grid_lr_scales=[0.0] is out of range: must be > 0 (each value)"),
        (lambda: check_global_batch(63, 2), "use a multiple of 2"),
        (lambda: _floats("--grid-lrs", "0.1,abc"), "not a comma-separated list of numbers"),
    ]
    for call, message in cases:
        with pytest.raises(OperaError, match=re.escape(message)) as info:
            call()
        assert "\n" not in str(info.value)


def test_resuming_with_other_options_is_refused_naming_them(tmp_path):
    from opera.errors import OperaError

    cfg = dict(checkpoint="random:resnet_tiny", data="digits:0-1", output=str(tmp_path), batch_size=64, tensorboard=False)
    run_linear(LinearConfig(epochs=1, **cfg))
    with pytest.raises(OperaError, match=r"written by another linear evaluation: epochs 1 \(this run: 2\).*new --output"):
        run_linear(LinearConfig(epochs=2, **cfg))
    again = run_linear(LinearConfig(epochs=1, **cfg))  # the same command: resumes its finished state
    assert again["metrics"]["frozen_check"] == "passed"
