"""The ``barlow`` space: Barlow Twins' cross-correlation loss (Zbontar et al. 2021, Eq. 1-2), joint only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opera import distributed
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy
from opera.supervisions.barlow import BarlowOptions, BarlowTwinsSpace
from tests.hierarchy.test_distributed import run_two_ranks
from tests.supervisions.helpers import gloo_group, train_cli

LAMBD = 0.0051
EPS = 1e-5  # BatchNorm1d's eps, the official self.bn's


def build(spec="barlow", seed=0, dtype=torch.float64, arrangement=None, **options):
    torch.manual_seed(seed)
    h = SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", num_classes=3, img_size=16, arrangement=arrangement,
                                       barlow={"dim": 8, "mlp_dim": 16, **options})
    return h.to(dtype)


def views(n=6, size=16, seed=1, count=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g, dtype=dtype) for _ in range(count)]


def projections(h: SupervisionHierarchy, xs: list[torch.Tensor]) -> list[list[list[float]]]:
    """z of each view, each view alone through backbone and projector (BatchNorm per view)."""
    sp = h.spaces["barlow"]
    with torch.no_grad():
        return [sp.projector(h.backbone(x)).tolist() for x in xs]


def barlow_by_hand(za: list[list[float]], zb: list[list[float]], lambd: float, eps: float) -> tuple[float, float]:
    """Barlow Twins (Zbontar et al., ICML 2021) with explicit loops, as the official main.py
    computes it (``c = bn(z1).T @ bn(z2) / batch_size``, bn a BatchNorm1d without affine, eps):

        zhat_bi = (z_bi - mean_b z_bi) / sqrt(var_b z_bi + eps)     (biased variance, per view)
        C_ij    = 1/N sum_b zhat^A_bi zhat^B_bj                     (Eq. 2; = it exactly for eps = 0)
        L_BT    = sum_i (1 - C_ii)^2 + lambda sum_i sum_{j != i} C_ij^2      (Eq. 1)

    Returns (L_BT, the invariance sum), the second to check the logged terms."""
    n, d = len(za), len(za[0])

    def normalised(z):
        out = [[0.0] * d for _ in range(n)]
        for i in range(d):
            mean = sum(z[b][i] for b in range(n)) / n
            var = sum((z[b][i] - mean) ** 2 for b in range(n)) / n
            for b in range(n):
                out[b][i] = (z[b][i] - mean) / math.sqrt(var + eps)
        return out

    a, b_ = normalised(za), normalised(zb)
    c = [[sum(a[b][i] * b_[b][j] for b in range(n)) / n for j in range(d)] for i in range(d)]
    on = sum((1 - c[i][i]) ** 2 for i in range(d))
    off = sum(c[i][j] ** 2 for i in range(d) for j in range(d) if j != i)
    return on + lambd * off, on


def eq2_cosine_by_hand(za: list[list[float]], zb: list[list[float]], lambd: float) -> float:
    """Eq. 2 as the paper writes it, over z mean-centred along the batch:

        C_ij = sum_b z^A_bi z^B_bj / ( sqrt(sum_b (z^A_bi)^2) sqrt(sum_b (z^B_bj)^2) )

    then Eq. 1 (no BatchNorm, no eps)."""
    n, d = len(za), len(za[0])

    def centred(z):
        means = [sum(z[b][i] for b in range(n)) / n for i in range(d)]
        return [[z[b][i] - means[i] for i in range(d)] for b in range(n)]

    a, b_ = centred(za), centred(zb)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            num = sum(a[b][i] * b_[b][j] for b in range(n))
            cij = num / (math.sqrt(sum(a[b][i] ** 2 for b in range(n))) * math.sqrt(sum(b_[b][j] ** 2 for b in range(n))))
            loss += (1 - cij) ** 2 if i == j else lambd * cij ** 2
    return loss


def test_loss_equals_eq1_by_hand_in_float64():
    h = build()
    x = views()
    out = h(views=x)
    z = projections(h, x)
    expected, on = barlow_by_hand(z[0], z[1], LAMBD, EPS)
    assert abs(float(out.losses["barlow"].detach()) - expected) < 1e-10
    assert abs(float(out.logs["barlow/loss"]) - expected) < 1e-10
    assert abs(float(out.logs["barlow/on_diag"]) - on) < 1e-10
    assert abs(float(out.logs["barlow/off_diag"]) - (expected - on) / LAMBD) < 1e-8
    # lambda and the weight enter as Eq. 1 says
    assert abs(float(build(lambd=0.5)(views=x).losses["barlow"].detach()) - barlow_by_hand(z[0], z[1], 0.5, EPS)[0]) < 1e-10
    assert abs(float(build(weight=0.25)(views=x).losses["barlow"].detach()) - 0.25 * expected) < 1e-10


def test_without_eps_the_loss_is_eq2_as_the_paper_writes_it():
    """BatchNorm's eps is the only difference between the official ``bn(z1).T @ bn(z2) / N`` and
    the cosine form of Eq. 2 (BatchNorm refuses eps = 0 in training: 1e-30 is 0 in float64 here)."""
    h = build()
    h.spaces["barlow"].norm.eps = 1e-30
    x = views()
    z = projections(h, x)
    assert abs(float(h(views=x).losses["barlow"].detach()) - eq2_cosine_by_hand(z[0], z[1], LAMBD)) < 1e-10


def test_three_views_give_the_mean_over_the_pairs():
    h = build()
    x = views(count=3)
    z = projections(h, x)
    expected = sum(barlow_by_hand(z[a], z[b], LAMBD, EPS)[0] for a, b in ((0, 1), (0, 2), (1, 2))) / 3
    assert abs(float(h(views=x).losses["barlow"].detach()) - expected) < 1e-10


def test_defaults_are_the_official_projector_lambda_and_bn():
    """main.py: --projector 8192-8192-8192 (bias-free Linear, BN, ReLU twice, then a bias-free
    Linear), self.bn = BatchNorm1d(8192, affine=False), --lambd 0.0051; no teacher, no predictor."""
    o = BarlowOptions()
    assert (o.dim, o.mlp_dim, o.layers, o.lambd, o.weight, o.gather_distributed) == (8192, 8192, 3, 0.0051, 1.0, True)
    assert BarlowTwinsSpace.joint_only and not BarlowTwinsSpace.multi_crop
    h = build(dtype=torch.float32)
    sp = h.spaces["barlow"]
    width = h.backbone.num_features
    kinds = [type(m).__name__ for m in sp.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    linears = [m for m in sp.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(width, 16), (16, 16), (16, 8)]
    assert all(m.bias is None for m in linears)
    assert isinstance(sp.norm, torch.nn.BatchNorm1d) and not sp.norm.affine and sp.norm.eps == EPS
    assert h.teacher is None
    assert set(h.representations(torch.randn(4, 3, 16, 16))) == {"backbone", "barlow/projector"}


def test_a_subset_of_the_views_and_one_view_are_one_line_errors():
    h = build()
    x = views()
    with pytest.raises(OperaError) as err:
        h(views=x, view_ids=[0])
    assert "\n" not in str(err.value) and "'barlow'" in str(err.value) and "per_view=false" in str(err.value)
    with pytest.raises(OperaError) as err:
        h(views=x[:1])
    assert "\n" not in str(err.value) and "two views" in str(err.value)


def test_full_stacks_on_the_projector_and_bad_options_are_one_line():
    h = build("barlow,full")
    assert h.arrangement == "B" and h.spaces["full"].source == "barlow/projector"
    with pytest.raises(OperaError, match="arrangement 'C'"):
        build("barlow,full", arrangement="C")
    for bad in ({"lambd": -1.0}, {"dim": 0}, {"weight": -0.5}, {"layers": 0}):
        with pytest.raises(OperaError) as err:
            build(**bad)
        assert "\n" not in str(err.value) and f"barlow.{next(iter(bad))}" in str(err.value)


# ----------------------------------------------------------------------------- 2 gloo processes
WORLD = 2
LOCAL = 4
TIMEOUT_S = 90


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port, WORLD, TIMEOUT_S):
        x = [v[rank * LOCAL:(rank + 1) * LOCAL] for v in views(n=WORLD * LOCAL)]
        h = distributed.convert_sync_batchnorm(build())  # the official convert_sync_batchnorm
        out = h(views=x)
        out.loss.backward()
        # DistributedDataParallel's gradient: the mean over ranks
        grads = {k: distributed.all_reduce_mean(p.grad) for k, p in h.named_parameters() if p.grad is not None}
        local = distributed.convert_sync_batchnorm(build(gather_distributed=False))
        record = {"loss": out.losses["barlow"].detach(), "grads": grads,
                  "local_loss": local(views=x).losses["barlow"].detach()}
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_give_the_official_loss_and_gradient(tmp_path):
    """The official code's semantics on 2 processes: C is each rank's bn(z1).T @ bn(z2) divided by
    the global batch and summed over ranks (all_reduce), so every rank's loss is the 1-process
    loss on the concatenated batch; the all_reduce is not differentiable, so DDP's mean gradient
    is the 1-process gradient divided by the number of ranks."""
    records = run_two_ranks(tmp_path, _worker, TIMEOUT_S)
    ref = build()
    x = views(n=WORLD * LOCAL)
    out = ref(views=x)
    out.loss.backward()
    z = projections(ref, x)
    expected = barlow_by_hand(z[0], z[1], LAMBD, EPS)[0]
    assert abs(float(out.losses["barlow"].detach()) - expected) < 1e-10
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    for rec in records:
        assert abs(float(rec["loss"]) - expected) < 1e-10
        assert rec["grads"].keys() == ref_grads.keys()
        for k, g in ref_grads.items():
            torch.testing.assert_close(rec["grads"][k], g / WORLD, rtol=1e-8, atol=1e-10, msg=k)
        # not vacuous: C over this rank's batch alone is another loss
        assert abs(float(rec["local_loss"]) - expected) > 1e-3


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["barlow", "barlow,full"])
def test_cli_trains(tmp_path, spec):
    rows = train_cli(tmp_path, spec, "barlow.mlp_dim=64", "barlow.dim=32")
    rows = [row for row in rows if "loss/barlow" in row]
    assert rows and all(math.isfinite(row["loss/barlow"]) and row["barlow/on_diag"] >= 0 for row in rows)
    if "full" in spec:
        assert all("loss/full" in row for row in rows)


# ----------------------------------------------------------------------------- the ImageNet recipe
RECIPE = Path(__file__).resolve().parents[2] / "docs" / "recipes" / "barlow_r50_1000ep_b2048.yaml"


def test_imagenet_recipe_is_the_official_command():
    """docs/recipes/barlow_r50_1000ep_b2048.yaml against facebookresearch/barlowtwins' README
    command (``python main.py /path/to/imagenet/``: every main.py default): --epochs 1000
    --batch-size 2048 --learning-rate-weights 0.2 --weight-decay 1e-6 --lambd 0.0051 --projector
    8192-8192-8192, LARS momentum 0.9, 10 warm-up epochs, fp16 autocast, SyncBatchNorm,
    RandomResizedCrop's default scale (0.08, 1); it also stacks 'full'."""
    from opera.configs import load_config

    cfg = load_config(str(RECIPE))
    assert cfg.hierarchy == "barlow" and cfg.backbone.name == "resnet50" and cfg.backbone.img_size == 224
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay,
            cfg.optim.momentum, cfg.optim.warmup_epochs) == (2048, 1000, "lars", 0.2, 1e-6, 0.9, 10)
    assert cfg.optim.base_lr * cfg.train.batch_size / 256 == pytest.approx(1.6)  # main.py: batch / 256 * 0.2
    assert cfg.train.sync_bn and not cfg.train.concat_views and cfg.train.amp == "fp16" and cfg.data.crop_min == 0.08
    assert cfg.space_options()["barlow"] == {"dim": 8192, "mlp_dim": 8192, "layers": 3, "lambd": 0.0051,
                                             "weight": 1.0, "gather_distributed": True}


@pytest.mark.slow
def test_imagenet_recipe_builds_with_full_on_the_projector():
    """The recipe's hierarchy (ResNet-50, the 8192-8192-8192 projector) with 'full' on top."""
    from opera.configs import load_config

    h = SupervisionHierarchy.from_config(load_config(str(RECIPE), ["hierarchy=barlow,full"]), {"class": 1000})
    linears = [m for m in h.spaces["barlow"].projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 8192), (8192, 8192), (8192, 8192)]
    assert h.arrangement == "B" and h.spaces["full"].source == "barlow/projector"
