"""The label-free collapse monitor (opera.engine.collapse, opera.engine.monitors): RankMe, alpha-ReQ
and the std of the normalised embeddings against hand computations in float64 on matrices of
known rank and spectrum, and the warning of a collapsed run through the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from opera.engine.collapse import RANKME_MIN, STD_MIN, CollapseStats, alpha_req, collapse_warnings, rankme, statistics


def orthonormal(n: int, k: int, seed: int) -> np.ndarray:
    """n x k with orthonormal columns."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, k)))
    return q


def hand_rankme(z: np.ndarray, eps: float = 1e-7) -> float:
    """Garrido et al. 2023, Eq. 1, with a loop: exp(-sum p_k log p_k), p_k = s_k / sum(s) + eps."""
    s = np.linalg.svd(z, compute_uv=False)  # min(N, d) singular values
    total = 0.0
    for sk in s:
        total += sk
    entropy = 0.0
    for sk in s:
        p = sk / total + eps
        entropy -= p * math.log(p)
    return math.exp(entropy)


def hand_normalised_std(z: np.ndarray) -> float:
    n, d = z.shape
    rows = [z[i] / math.sqrt(sum(v * v for v in z[i])) for i in range(n)]
    stds = []
    for j in range(d):
        col = [r[j] for r in rows]
        mean = sum(col) / n
        stds.append(math.sqrt(sum((c - mean) ** 2 for c in col) / (n - 1)))
    return sum(stds) / d


def test_rankme_of_a_rank_r_matrix_with_a_flat_spectrum_is_r():
    n, d = 60, 24
    for r in (1, 3, 10):
        z = orthonormal(n, r, 0) @ orthonormal(d, r, 1).T * 5.0  # r singular values of 5, the rest 0
        m = statistics(torch.from_numpy(z))
        assert m["rankme"] == pytest.approx(hand_rankme(z), rel=1e-9)
        assert m["rankme"] == pytest.approx(r, abs=1e-3)  # eps = 1e-7 on min(N, d) = 24 terms moves it by < 1e-3


def test_rankme_equals_the_hand_loop_on_a_random_spectrum_and_over_batches():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((80, 16)) @ np.diag(np.linspace(0.1, 4, 16)) + 0.5
    whole = statistics(torch.from_numpy(z))
    batched = CollapseStats(16)
    for i in range(0, 80, 7):  # uneven batches: sums are exact
        batched.update(torch.from_numpy(z[i: i + 7]))
    parts = batched.metrics()
    assert whole["rankme"] == pytest.approx(hand_rankme(z), rel=1e-9)
    for key in ("rankme", "areq", "std"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-9)
    # wide matrix (N < d): min(N, d) = N singular values
    wide = rng.standard_normal((10, 40))
    assert statistics(torch.from_numpy(wide))["rankme"] == pytest.approx(hand_rankme(wide), rel=1e-9)
    assert rankme(torch.tensor([2.0, 2.0, 0.0, 0.0])) == pytest.approx(hand_rankme(np.diag([2.0, 2.0, 0.0, 0.0])), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.3])
def test_alpha_req_recovers_the_exponent_of_an_exact_power_law(alpha):
    n, d = 200, 32
    lam = np.arange(1, d + 1, dtype=np.float64) ** -alpha
    assert alpha_req(torch.from_numpy(lam[::-1].copy())) == pytest.approx(alpha, abs=1e-12)  # any order
    # embeddings whose centred covariance has exactly the eigenvalues lam (columns orthogonal to 1: centred)
    basis = orthonormal(n, d + 1, 5)
    ones = np.ones((n, 1)) / math.sqrt(n)
    q = np.linalg.qr(np.hstack([ones, basis]))[0][:, 1: d + 1]
    z = math.sqrt(n - 1) * q @ np.diag(np.sqrt(lam)) @ orthonormal(d, d, 6).T + 3.0  # a mean; centring removes it
    cov_eig = np.sort(np.linalg.eigvalsh(np.cov(z, rowvar=False)))[::-1]
    assert np.allclose(cov_eig, lam, rtol=1e-9, atol=1e-13)
    # the least-squares slope by hand
    x, y = [math.log(i) for i in range(1, d + 1)], [math.log(v) for v in cov_eig]
    mx, my = sum(x) / d, sum(y) / d
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    assert statistics(torch.from_numpy(z))["areq"] == pytest.approx(-slope, rel=1e-7)
    assert statistics(torch.from_numpy(z))["areq"] == pytest.approx(alpha, rel=1e-7)


def test_alpha_req_leaves_out_numerical_zeros_and_is_nan_without_two_eigenvalues():
    lam = torch.tensor([1.0, 0.5 ** 1.5, 1e-14, 0.0], dtype=torch.float64)  # 2^-1.5: alpha 1.5 on i = 1, 2
    assert alpha_req(lam) == pytest.approx(1.5, abs=1e-12)
    assert math.isnan(alpha_req(torch.tensor([3.0, 0.0, 0.0])))


def test_std_of_the_normalised_embeddings_equals_the_hand_loop_and_is_about_one_over_sqrt_d():
    rng = np.random.default_rng(7)
    z = rng.standard_normal((300, 20))
    m = statistics(torch.from_numpy(z))
    assert m["std"] == pytest.approx(hand_normalised_std(z), rel=1e-9)
    assert 0.9 < m["std_sqrt_d"] < 1.1  # isotropic: 1/sqrt(d) per dimension (SimSiam, Sec. 4.1)
    assert m["std_sqrt_d"] == pytest.approx(m["std"] * math.sqrt(20), rel=1e-12)


def test_a_collapsed_representation_warns_once_naming_it_and_a_healthy_one_does_not():
    rng = np.random.default_rng(8)
    healthy = statistics(torch.from_numpy(rng.standard_normal((100, 16))))
    constant = statistics(torch.from_numpy(np.tile(rng.standard_normal((1, 16)), (100, 1))))
    assert constant["rankme"] == pytest.approx(1.0, abs=1e-4) and constant["std"] < 1e-7
    assert math.isnan(constant["areq"])
    lines = collapse_warnings({"backbone": {**healthy, "dim": 16, "images": 100},
                               "self/projector": {**constant, "dim": 16, "images": 100}}, epoch=3)
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "'self/projector'" in lines[0] and "epoch 3" in lines[0]
    assert f"< {RANKME_MIN}" in lines[0] and f"< {STD_MIN}" in lines[0] and "self.weight" in lines[0]
    # one direction with spread along it: the rank is low but the std is not 0
    line = np.outer(rng.standard_normal(100), rng.standard_normal(16))
    m = statistics(torch.from_numpy(line))
    assert m["rankme"] < RANKME_MIN
    assert len(collapse_warnings({"y": {**m, "dim": 16, "images": 100}})) == 1
    # two-class logits l_0 = -l_1 (rank 1, RankMe 1) that still tell the images apart: no warning
    s = rng.standard_normal((100, 1))
    logits = statistics(torch.from_numpy(np.hstack([s, -s])))
    assert logits["rankme"] == pytest.approx(1.0, abs=1e-4) and logits["std_sqrt_d"] > 0.5
    assert collapse_warnings({"full/logits": {**logits, "dim": 2, "images": 100}}) == []
    # non-negative features in a narrow cone (a ReLU backbone's pooled y early in training): the
    # normalised std is far below the isotropic one, but the images are told apart: no warning
    cone = statistics(torch.from_numpy(1 + 0.1 * np.abs(rng.standard_normal((100, 16)))))
    assert 0.02 < cone["std_sqrt_d"] < 0.1 and cone["rankme"] > RANKME_MIN
    assert collapse_warnings({"backbone": {**cone, "dim": 16, "images": 100}}) == []


@pytest.mark.slow
def test_the_collapse_monitor_gives_the_same_statistics_from_the_knn_pass_and_from_its_own():
    from opera.configs import apply_overrides, load_config
    from opera.data import EvalTransform, build_dataset
    from opera.engine.monitors import CollapseProbe, collapse_pass, collapse_rows, eval_mode, knn_monitor
    from opera.hierarchy import SupervisionHierarchy

    cfg = apply_overrides(load_config("cpu_digits"), ["data.spec=digits:0-2", "backbone.img_size=16",
                                                       "self.mlp_dim=32", "self.dim=16", "full.hidden=16"])
    torch.manual_seed(0)
    h = SupervisionHierarchy.from_config(cfg, {"class": 3})
    h.train()
    tf = EvalTransform(16)
    bank, queries = build_dataset("digits:0-2", "train", tf), build_dataset("digits:0-2", "val", tf)
    rows = collapse_rows(len(bank), 100)
    assert int(rows.sum()) == 100 and torch.equal(rows, collapse_rows(len(bank), 100))  # fixed, seeded
    probe = CollapseProbe(h, rows)
    with eval_mode(h):
        knn_monitor(h.backbone, bank, queries, 3, torch.device("cpu"), on_bank_batch=probe)
    assert h.training and all(m.training for m in h.modules())  # every mode restored
    shared = probe.metrics()
    alone = collapse_pass(h, bank, rows, torch.device("cpu")).metrics()
    assert set(shared) == {"backbone", "self/projector", "self/predictor", "full/logits"} == set(alone)
    # by hand: every representation of the 100 rows, from the hierarchy's own forward
    x = torch.stack([bank[i][0] for i in torch.nonzero(rows).flatten().tolist()])
    with eval_mode(h):
        reps = h.representations(x)
    for name, z in reps.items():
        want = statistics(z.double())
        assert shared[name]["images"] == alone[name]["images"] == 100
        for key in ("rankme", "areq", "std"):
            assert shared[name][key] == pytest.approx(alone[name][key], rel=1e-5)
            assert shared[name][key] == pytest.approx(want[key], rel=1e-3)  # the same rows, float32 forwards batched differently


def constant_folder(root, classes: int = 2, per_class: int = 40):
    from PIL import Image

    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (120, 120, 120)).save(root / f"c{c}" / f"{i}.jpg")
    return root


def pretrain(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opera", "run", "pretrain", "--output", str(tmp_path / "run"), *args,
                           "--set", "train.epochs=2", "--set", "train.save_every_epochs=0", "--set", "train.device=cpu",
                           "--set", "backbone.img_size=16", "--set", "self.mlp_dim=32", "--set", "self.dim=16",
                           "--set", "full.hidden=16"], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_run_on_constant_images_warns_that_every_representation_collapsed(tmp_path):
    data = constant_folder(tmp_path / "flat")
    done = pretrain(tmp_path, "--data", str(data), "--batch-size", "16", "--set", "train.knn_every=2")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stdout.splitlines() if line.startswith("warning: representation")]
    named = {line.split("'")[1] for line in warnings}
    assert named == {"backbone", "self/projector", "self/predictor", "full/logits"}
    assert len(warnings) == 8  # each one at epochs 1 (its own pass) and 2 (the kNN monitor's pass)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ranked = [r for r in rows if "online/rankme/backbone" in r]
    assert len(ranked) == 2 and all(r["online/rankme/backbone"] < RANKME_MIN for r in ranked)
    assert all(r["online/std/self/projector"] < 1e-4 for r in ranked) and "knn_top1" in ranked[1]


@pytest.mark.slow
def test_a_healthy_short_run_logs_every_representation_and_does_not_warn(tmp_path):
    done = pretrain(tmp_path, "--data", "digits:0-3", "--batch-size", "64", "--set", "train.knn_every=0",
                    "--set", "train.rank_images=300")
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stdout
    assert "collapse monitor: RankMe, alpha-ReQ and std of every representation over 300 of" in done.stdout
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ranked = [r for r in rows if "rank_s" in r]
    assert len(ranked) == 2 and "knn_top1" not in ranked[0]
    for rep in ("backbone", "self/projector", "self/predictor", "full/logits"):
        assert all(r[f"online/rankme/{rep}"] > 2 and r[f"online/std/{rep}"] > 0 for r in ranked)


def _two_rank_statistics(seed: int) -> dict[str, torch.Tensor]:
    from opera import distributed
    from opera.engine.collapse import RepresentationStats

    env = distributed.init("cpu")
    z = torch.from_numpy(np.random.default_rng(seed).standard_normal((45, 12)) @ np.diag(np.arange(1.0, 13.0)))
    lo, hi = distributed.shard_bounds(len(z), env.rank, env.world_size)  # 23 and 22 rows
    stats = RepresentationStats()
    stats.update({"y": z[lo:hi]})
    m = stats.metrics()["y"]
    distributed.shutdown()
    return {k: torch.tensor(float(m[k]), dtype=torch.float64) for k in ("rankme", "areq", "std", "images")}


@pytest.mark.slow
def test_two_gloo_ranks_sum_their_shares_into_the_statistics_of_the_whole_matrix():
    from opera.launch.local import launch_local

    z = np.random.default_rng(4).standard_normal((45, 12)) @ np.diag(np.arange(1.0, 13.0))
    whole = statistics(torch.from_numpy(z))
    for r in launch_local(_two_rank_statistics, (4,), 2, timeout=120):
        assert float(r["images"]) == 45
        assert float(r["rankme"]) == pytest.approx(hand_rankme(z), rel=1e-9)
        for key in ("rankme", "areq", "std"):
            assert float(r[key]) == pytest.approx(whole[key], rel=1e-9)


def _two_rank_probe(wanted_on_rank0: int) -> dict[str, torch.Tensor]:
    """Rank 0 holds the wanted rows, rank 1 none: both must still reduce the same sums."""
    from opera import distributed
    from opera.configs import apply_overrides, load_config
    from opera.engine.monitors import CollapseProbe, eval_mode
    from opera.hierarchy import SupervisionHierarchy

    env = distributed.init("cpu")
    cfg = apply_overrides(load_config("cpu_digits"), ["backbone.img_size=16", "self.mlp_dim=32", "self.dim=16",
                                                       "full.hidden=16"])
    torch.manual_seed(0)
    h = SupervisionHierarchy.from_config(cfg, {"class": 3})
    y = torch.randn(wanted_on_rank0, h.backbone.num_features, generator=torch.Generator().manual_seed(1))
    probe = CollapseProbe(h, torch.ones(len(y), dtype=torch.bool))
    if env.rank == 0:
        with eval_mode(h):
            probe(y, 0)
    m = probe.metrics()
    distributed.shutdown()
    return {f"{k}:{s}": torch.tensor(float(v[s]), dtype=torch.float64) for k, v in m.items() for s in ("rankme", "images")}


@pytest.mark.slow
def test_a_rank_without_wanted_rows_still_joins_the_reduction():
    from opera.launch.local import launch_local

    ranks = launch_local(_two_rank_probe, (40,), 2, timeout=120)
    for r in ranks:
        assert set(r) == {f"{k}:{s}" for k in ("backbone", "self/projector", "self/predictor", "full/logits")
                          for s in ("rankme", "images")}
        assert all(float(v) == 40 for k, v in r.items() if k.endswith(":images"))
        assert float(r["backbone:rankme"]) > 5
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])


def test_representations_wider_than_the_limit_are_skipped_and_named():
    from opera.engine.collapse import RepresentationStats

    stats = RepresentationStats(max_dim=16)
    rng = np.random.default_rng(9)
    z16, z17 = torch.from_numpy(rng.standard_normal((30, 16))), torch.from_numpy(rng.standard_normal((30, 17)))
    stats.update({"narrow": z16, "wide": z17})
    m = stats.metrics()
    assert set(m) == {"narrow"} and stats.skipped == {"wide": 17}
    assert m["narrow"]["rankme"] == pytest.approx(hand_rankme(z16.numpy()), rel=1e-9) and m["narrow"]["images"] == 30
