"""The ``vicreg`` space: VICReg's variance, invariance and covariance terms (Bardes et al., ICLR 2022,
Eq. 1-6) as facebookresearch/vicreg's ``main_vicreg.py`` computes them, no teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opera import distributed
from opera.hierarchy import SupervisionHierarchy
from tests.hierarchy.test_distributed import run_two_ranks
from tests.supervisions.helpers import gloo_group, train_cli

#: non-default values, so that a coefficient on the wrong term (or a dropped gamma / eps) shows
CUSTOM = {"sim_coeff": 3.0, "std_coeff": 5.0, "cov_coeff": 7.0, "gamma": 1.5, "eps": 1e-3, "weight": 0.5}


def build(spec="vicreg", seed=0, dtype=torch.float64, **options):
    torch.manual_seed(seed)
    h = SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", num_classes=3, img_size=16,
                                       vicreg={"dim": 8, "mlp_dim": 16, **options})
    return h.to(dtype)


def views(n=8, size=16, seed=1, count=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g, dtype=dtype) for _ in range(count)]


def projections(h: SupervisionHierarchy, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Z of each view, each view alone through the backbone and the projector (BatchNorm per view)."""
    sp = h.spaces["vicreg"]
    with torch.no_grad():
        return [sp.projector(h.backbone(x)) for x in xs]


def vicreg_by_hand(z1: torch.Tensor, z2: torch.Tensor, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, gamma=1.0,
                   eps=1e-4, weight=1.0) -> dict[str, float]:
    """Bardes, Ponce, LeCun (ICLR 2022) with explicit loops over samples i and coordinates j, k:

        Eq. 5  s(Z, Z')  = 1/n sum_i ||z_i - z'_i||^2
        Eq. 1  v(Z)      = 1/d sum_j max(0, gamma - sqrt(Var(z^j) + eps)),  Var(z^j) = 1/(n-1) sum_i (z_ij - zbar_j)^2
        Eq. 3  C(Z)_jk   = 1/(n-1) sum_i (z_ij - zbar_j)(z_ik - zbar_k)
        Eq. 4  c(Z)      = 1/d sum_{j != k} C(Z)_jk^2

    and, as facebookresearch/vicreg's main_vicreg.py (VICReg.forward) weighs them,
    repr_loss = F.mse_loss(z, z') = s / d, std_loss = v(Z)/2 + v(Z')/2, cov_loss = c(Z) + c(Z'):

        loss = weight * (sim_coeff * s/d + std_coeff * (v(Z) + v(Z'))/2 + cov_coeff * (c(Z) + c(Z')))
    """
    a, b = z1.tolist(), z2.tolist()
    n, d = len(a), len(a[0])
    s = sum((a[i][j] - b[i][j]) ** 2 for i in range(n) for j in range(d)) / n

    def means(z):
        return [sum(z[i][j] for i in range(n)) / n for j in range(d)]

    def v(z):
        m = means(z)
        total = 0.0
        for j in range(d):
            var = sum((z[i][j] - m[j]) ** 2 for i in range(n)) / (n - 1)
            total += max(0.0, gamma - math.sqrt(var + eps))
        return total / d

    def c(z):
        m = means(z)
        total = 0.0
        for j in range(d):
            for k in range(d):
                if j != k:
                    cjk = sum((z[i][j] - m[j]) * (z[i][k] - m[k]) for i in range(n)) / (n - 1)
                    total += cjk ** 2
        return total / d

    terms = {"invariance": s / d, "variance": v(a) / 2 + v(b) / 2, "covariance": c(a) + c(b)}
    terms["loss"] = weight * (sim_coeff * terms["invariance"] + std_coeff * terms["variance"] + cov_coeff * terms["covariance"])
    return terms


def test_loss_equals_eq1_to_eq6_by_hand_in_float64():
    """On a fixed batch, the loss and each logged term equal the hand computation (1e-10), with
    non-default coefficients (each multiplies its own term), and with the official defaults."""
    x = views()
    for options in (CUSTOM, {}):
        h = build(**options)
        out = h(views=x)
        expected = vicreg_by_hand(*projections(h, x), **options)
        assert abs(float(out.losses["vicreg"].detach()) - expected["loss"]) < 1e-10, options
        for term in ("invariance", "variance", "covariance"):
            assert abs(float(out.logs[f"vicreg/{term}"]) - expected[term]) < 1e-10, (options, term)
        assert all(expected[t] > 1e-3 for t in ("invariance", "variance", "covariance"))  # no term vanishes here


def test_terms_by_hand_with_the_hinge_active_on_some_coordinates_only():
    """The terms as functions of Z: coordinates scaled so that some standard deviations are below
    gamma (the hinge pushes them) and some above (no variance loss from them)."""
    from opera.supervisions.vicreg import covariance_term, invariance_term, variance_term

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.2, 0.5, 3.0, 4.0, 0.8, 2.5], dtype=torch.float64)
    z1 = torch.randn(10, 6, generator=g, dtype=torch.float64) * scale + torch.randn(6, generator=g, dtype=torch.float64)
    z2 = z1 + 0.3 * torch.randn(10, 6, generator=g, dtype=torch.float64)
    std = torch.sqrt(z1.var(dim=0) + 1e-4)
    assert (std < 1).any() and (std > 1).any()
    expected = vicreg_by_hand(z1, z2)
    got = {"invariance": invariance_term(z1, z2),
           "variance": variance_term(z1, 1.0, 1e-4) / 2 + variance_term(z2, 1.0, 1e-4) / 2,
           "covariance": covariance_term(z1) + covariance_term(z2)}
    for term, value in got.items():
        assert abs(float(value) - expected[term]) < 1e-10, term
    # a collapsed batch: every std is sqrt(eps), so v = gamma - sqrt(eps) and c = 0
    flat = torch.ones(5, 4, dtype=torch.float64)
    assert abs(float(variance_term(flat, 1.0, 1e-4)) - (1 - math.sqrt(1e-4))) < 1e-12
    assert float(covariance_term(flat)) == 0.0


def test_defaults_are_the_official_projector_and_coefficients():
    """main_vicreg.py: --mlp 8192-8192-8192 (Linear+BN+ReLU twice, the linears with a bias, then a
    bias-free Linear), --sim-coeff 25 --std-coeff 25 --cov-coeff 1, sqrt(var + 0.0001), relu(1 - std);
    no teacher; only vicreg/projector is published (no predictor), so 'full' on top attaches at B."""
    from opera.supervisions.vicreg import VICRegOptions, vicreg_projector

    o = VICRegOptions()
    assert (o.dim, o.mlp_dim, o.layers) == (8192, 8192, 3)
    assert (o.sim_coeff, o.std_coeff, o.cov_coeff, o.gamma, o.eps, o.weight, o.gather_distributed) == (25.0, 25.0, 1.0, 1.0, 1e-4, 1.0, True)
    with torch.device("meta"):  # no 8192 x 8192 allocation
        kinds = [type(m).__name__ for m in vicreg_projector(3, 2048, 8192, 8192)]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    h = build("vicreg,full")
    linears = [m for m in h.spaces["vicreg"].projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linears] == \
        [(h.backbone.num_features, 16, True), (16, 16, True), (16, 8, False)]
    assert h.teacher is None and h.joint_only == "vicreg"
    assert h.arrangement == "B" and h.spaces["full"].source == "vicreg/projector"
    reps = h.representations(torch.randn(4, 3, 16, 16, dtype=torch.float64))
    assert set(reps) == {"backbone", "vicreg/projector", "full/logits"} and reps["vicreg/projector"].shape == (4, 8)


def test_more_than_two_views_average_the_two_view_loss_over_the_pairs():
    h = build(**CUSTOM)
    x = views(count=3)
    out = h(views=x)
    z = projections(h, x)
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected = sum(vicreg_by_hand(z[i], z[j], **CUSTOM)["loss"] for i, j in pairs) / len(pairs)
    assert abs(float(out.losses["vicreg"].detach()) - expected) < 1e-10


def test_the_loss_is_computed_in_float32_under_bf16_autocast():
    """Under autocast the projector runs in bf16, the loss in float32 from its outputs: it equals the
    float64 hand computation on those outputs to float32 precision (a bf16 loss would be ~1e-2 off)."""
    h = build(dtype=torch.float32)
    x = views(n=16, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = h(views=x)
    z = [out.state.stage.reps[i]["vicreg/projector"].detach() for i in range(2)]
    assert z[0].dtype == torch.bfloat16 and out.losses["vicreg"].dtype == torch.float32
    expected = vicreg_by_hand(z[0].double(), z[1].double())
    assert float(out.losses["vicreg"].detach()) == pytest.approx(expected["loss"], rel=1e-5)
    assert float(out.logs["vicreg/covariance"]) == pytest.approx(expected["covariance"], rel=1e-5)


# ----------------------------------------------------------------------------- 2 gloo processes
WORLD = 2
LOCAL = 4
TIMEOUT_S = 90


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port, WORLD, TIMEOUT_S):
        x = [v[rank * LOCAL:(rank + 1) * LOCAL] for v in views(n=WORLD * LOCAL)]
        h = distributed.convert_sync_batchnorm(build(**CUSTOM))  # BatchNorm over both ranks, as the official SyncBN
        out = h(views=x)
        out.loss.backward()
        record = {
            "loss": out.losses["vicreg"].detach(),
            "logs": {k: v for k, v in out.logs.items()},
            # DDP's gradient: the mean over ranks of each rank's gradient
            "grads": {k: distributed.all_reduce_mean(p.grad) for k, p in h.named_parameters() if p.grad is not None},
        }
        local = distributed.convert_sync_batchnorm(build(**CUSTOM, gather_distributed=False))
        record["local_loss"] = local(views=x).losses["vicreg"].detach()
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """main_vicreg.py's semantics: each rank's invariance is the mse of its own rows; variance and
    covariance are those of the global batch (gathered with gradient), the same on every rank.
    So the mean of the ranks' losses is the 1-process loss on the whole batch, and the ranks' mean
    gradients (DDP's) are its gradients."""
    records = run_two_ranks(tmp_path, _worker, TIMEOUT_S)
    ref = build(**CUSTOM)
    x = views(n=WORLD * LOCAL)
    out = ref(views=x)
    out.loss.backward()
    z = projections(ref, x)
    whole = vicreg_by_hand(*z, **CUSTOM)
    assert abs(float(out.losses["vicreg"].detach()) - whole["loss"]) < 1e-10
    mean = torch.stack([rec["loss"] for rec in records]).mean()
    assert abs(float(mean) - whole["loss"]) < 1e-10
    for r, rec in enumerate(records):
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        own = vicreg_by_hand(z[0][rows], z[1][rows], **CUSTOM)
        assert abs(float(rec["logs"]["vicreg/invariance"]) - own["invariance"]) < 1e-10  # local, as F.mse_loss(x, y)
        for term in ("variance", "covariance"):  # the gathered batch's
            assert abs(float(rec["logs"][f"vicreg/{term}"]) - whole[term]) < 1e-10, term
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    for rec in records:
        assert rec["grads"].keys() == ref_grads.keys()
        for k, g in ref_grads.items():
            torch.testing.assert_close(rec["grads"][k], g, rtol=1e-8, atol=1e-10, msg=k)
    # not vacuous: with the statistics of each rank's own rows the loss is another number
    for rec in records:
        assert abs(float(rec["local_loss"]) - float(rec["loss"])) > 1e-3


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["vicreg", "vicreg,full"])
def test_cli_trains(tmp_path, spec):
    rows = train_cli(tmp_path, spec, "vicreg.mlp_dim=64", "vicreg.dim=32")
    keys = set().union(*rows)
    assert {"loss/vicreg", "vicreg/invariance", "vicreg/variance", "vicreg/covariance"} <= keys, keys
    if "full" in spec:
        assert "loss/full" in keys
    assert all(math.isfinite(row["loss/vicreg"]) for row in rows if "loss/vicreg" in row)


# ----------------------------------------------------------------------------- the ImageNet recipe
RECIPE = Path(__file__).resolve().parents[2] / "docs" / "recipes" / "vicreg_r50_1000ep_b2048.yaml"


def test_imagenet_recipe_is_the_official_command():
    """docs/recipes/vicreg_r50_1000ep_b2048.yaml against facebookresearch/vicreg's README ImageNet
    command (--arch resnet50 --epochs 1000 --batch-size 2048 --base-lr 0.2) and main_vicreg.py's
    defaults (--wd 1e-6, --mlp 8192-8192-8192, coefficients 25/25/1, LARS momentum 0.9, 10 warm-up
    epochs, fp16 autocast with a GradScaler, SyncBatchNorm); it also stacks 'full' (arrangement B)."""
    from opera.configs import load_config

    cfg = load_config(str(RECIPE))
    assert cfg.hierarchy == "vicreg" and cfg.backbone.name == "resnet50" and cfg.backbone.img_size == 224
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay,
            cfg.optim.momentum, cfg.optim.warmup_epochs) == (2048, 1000, "lars", 0.2, 1e-6, 0.9, 10)
    assert cfg.optim.base_lr * cfg.train.batch_size / 256 == pytest.approx(1.6)
    assert cfg.train.amp == "fp16" and cfg.train.sync_bn and not cfg.train.concat_views and cfg.data.crop_min == 0.08
    assert cfg.space_options()["vicreg"] == {"dim": 8192, "mlp_dim": 8192, "layers": 3, "sim_coeff": 25.0,
                                             "std_coeff": 25.0, "cov_coeff": 1.0, "gamma": 1.0, "eps": 1e-4,
                                             "weight": 1.0, "gather_distributed": True}
    with torch.device("meta"):  # the shapes, without allocating ResNet-50 and three 8192-wide layers
        h = SupervisionHierarchy.from_config(load_config(str(RECIPE), ["hierarchy=vicreg,full"]), {"class": 1000})
    linears = [m for m in h.spaces["vicreg"].projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 8192), (8192, 8192), (8192, 8192)]
    assert h.arrangement == "B" and h.spaces["full"].source == "vicreg/projector"
