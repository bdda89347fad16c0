"""The ``simclr`` space: NT-Xent over the gathered global batch (Chen et al. 2020, Eq. 1), no teacher."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from opera import distributed
from opera.hierarchy import SupervisionHierarchy
from tests.hierarchy.test_distributed import run_two_ranks
from tests.supervisions.helpers import gloo_group, train_cli

TAU = 0.1


def build(spec="simclr", seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    h = SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", num_classes=3, img_size=16,
                                       simclr={"dim": 8, "mlp_dim": 16, "temperature": TAU}, **kw)
    return h.to(dtype)


def nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR (Chen et al., ICML 2020), Eq. 1, with explicit loops over the 2N views:

        l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k=1..2N, k != i} exp(sim(z_i, z_k) / tau) )
        L = 1/(2N) sum_{k=1..N} [ l(2k-1, 2k) + l(2k, 2k-1) ]

    sim(u, v) = u.v / (|u| |v|); the views of image k are z1[k] and z2[k]."""
    zs = [z for pair in zip(z1.tolist(), z2.tolist()) for z in pair]  # 2k-1, 2k interleaved as in the paper

    def sim(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    def ell(i, j):  # l(i, j) of Eq. 1
        den = sum(math.exp(sim(zs[i], zs[k]) / tau) for k in range(len(zs)) if k != i)
        return -math.log(math.exp(sim(zs[i], zs[j]) / tau) / den)

    n = len(z1)
    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


def views(n=6, size=16, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g, dtype=dtype) for _ in range(2)]


def test_loss_equals_eq1_by_hand_in_float64():
    h = build()
    x = views()
    out = h(views=x)
    sp = h.spaces["simclr"]
    with torch.no_grad():
        z = [sp.projector(h.backbone(v)) for v in x]  # each view alone through the network (BatchNorm per view)
    assert float(out.losses["simclr"].detach()) == pytest.approx(nt_xent_by_hand(z[0], z[1], TAU), abs=1e-10, rel=1e-10)
    assert float(out.logs["simclr/nt_xent"]) == pytest.approx(float(out.losses["simclr"].detach()), abs=1e-12)
    # the weight scales it
    h2 = build()
    h2.spaces["simclr"].options.weight = 0.25
    assert float(h2(views=x).losses["simclr"].detach()) == pytest.approx(0.25 * float(out.losses["simclr"].detach()), abs=1e-12)


def test_defaults_are_simclr_v2s_head_and_temperature():
    """3 layers, hidden = the backbone width, 128 out, tau 0.1; bias-free linears, BN(+ReLU) in
    between, and a last BN with a scale but no shift (``batch_norm_relu(center=False)``)."""
    h = SupervisionHierarchy.from_spec("simclr", backbone="resnet_tiny", num_classes=3, img_size=16)
    sp = h.spaces["simclr"]
    width = h.backbone.num_features
    linears = [m for m in sp.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(width, width), (width, width), (width, 128)]
    assert all(m.bias is None for m in linears)
    last = sp.projector[-1]
    assert not last.norm.affine and last.weight.shape == (128,)
    assert sp.options.temperature == 0.1 and h.teacher is None
    assert h.describe()["derived"]["simclr"]["mlp_dim"] == width
    assert set(h.representations(torch.randn(4, 3, 16, 16))) == {"backbone", "simclr/projector"}


def test_gradients_reach_both_views_through_the_denominator():
    """No stop-gradient anywhere: detaching the other view's z changes the gradient (so the
    per-view step cannot be a sum of independent per-view terms; see the next test)."""
    from opera.supervisions.simclr import nt_xent_terms

    g = torch.Generator().manual_seed(0)
    z = [torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1).requires_grad_() for _ in range(2)]
    full = torch.autograd.grad(nt_xent_terms(z, z, 0, TAU).mean(), z[0])[0]
    half = [z[0], z[1].detach()]
    detached = torch.autograd.grad(nt_xent_terms(half, half, 0, TAU)[0].mean() / 2, z[0])[0]
    assert not torch.allclose(full, detached)


@pytest.mark.parametrize("spec,backbone", [("simclr,full", "resnet_tiny"), ("mask,simclr", "vit_tiny")])
def test_per_view_step_equals_the_joint_step(spec, backbone):
    """View by view (the loop's default) = joint: the losses, every gradient, and the BatchNorm
    running statistics (the look-ahead forward of the view not run yet leaves them alone). With
    ``mask`` the look-ahead draws the same masks as the later online forward (forked RNG)."""
    torch.manual_seed(0)
    kw = {"backbone_options": {"depth": 1, "patch_size": 8}} if backbone == "vit_tiny" else {}
    h = SupervisionHierarchy.from_spec(spec, backbone=backbone, num_classes=3, img_size=16,
                                       simclr={"dim": 8, "mlp_dim": 16}, **kw).double()
    x = views(n=8)
    y = {"class": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    joint = copy.deepcopy(h)
    torch.manual_seed(5)
    out = joint(views=x, targets=y)
    out.loss.backward()
    torch.manual_seed(5)
    first = h(views=x, targets=y, view_ids=[0])
    first.loss.backward()
    second = h(view_ids=[1], state=first.state)
    second.loss.backward()
    torch.testing.assert_close(first.losses["simclr"] + second.losses["simclr"], out.losses["simclr"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first.logs["simclr/nt_xent"] + second.logs["simclr/nt_xent"], out.logs["simclr/nt_xent"])
    a, b = dict(joint.named_parameters()), dict(h.named_parameters())
    for k, p in a.items():
        if p.grad is not None:
            torch.testing.assert_close(b[k].grad, p.grad, rtol=1e-9, atol=1e-12, msg=k)
    for k, buf in joint.named_buffers():
        torch.testing.assert_close(dict(h.named_buffers())[k], buf, rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- 2 gloo processes
WORLD = 2
LOCAL = 4
TIMEOUT_S = 90


def _hierarchy():
    h = build("simclr")
    return distributed.convert_sync_batchnorm(h)  # statistics over both ranks, as SimCLR's global BN


def _worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port, WORLD, TIMEOUT_S):
        x = [v[rank * LOCAL:(rank + 1) * LOCAL] for v in views(n=WORLD * LOCAL)]
        record = {}
        for mode in ("joint", "per_view"):
            h = _hierarchy()
            if mode == "joint":
                out = h(views=x)
                out.loss.backward()
                loss = out.losses["simclr"].detach()
            else:
                first = h(views=x, view_ids=[0])
                first.loss.backward()
                second = h(view_ids=[1], state=first.state)
                second.loss.backward()
                loss = (first.losses["simclr"] + second.losses["simclr"]).detach()
            # DDP's gradient: the mean over ranks
            grads = {k: distributed.all_reduce_mean(p.grad) for k, p in h.named_parameters() if p.grad is not None}
            record[mode] = {"loss": loss, "grads": grads}
        local = build("simclr")  # no gather: this rank's own batch only
        local.spaces["simclr"].options.gather_distributed = False
        record["local_loss"] = distributed.convert_sync_batchnorm(local)(views=x).losses["simclr"].detach()
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """Each rank's loss is the mean over its anchors against both ranks' z (gathered with
    gradient); the mean over ranks is the 1-process loss on the whole batch, and the ranks' mean
    gradients (DDP's) are its gradients, in the joint and in the per-view step."""
    records = run_two_ranks(tmp_path, _worker, TIMEOUT_S)
    ref = build("simclr")
    x = views(n=WORLD * LOCAL)
    out = ref(views=x)
    out.loss.backward()
    sp = ref.spaces["simclr"]
    with torch.no_grad():
        z = [sp.projector(ref.backbone(v)) for v in x]
    assert float(out.losses["simclr"].detach()) == pytest.approx(nt_xent_by_hand(z[0], z[1], TAU), abs=1e-10)
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    for mode in ("joint", "per_view"):
        mean = torch.stack([rec[mode]["loss"] for rec in records]).mean()
        assert float(mean) == pytest.approx(float(out.losses["simclr"].detach()), abs=1e-10), mode
        for rec in records:
            assert rec[mode]["grads"].keys() == ref_grads.keys()
            for k, g in ref_grads.items():
                torch.testing.assert_close(rec[mode]["grads"][k], g, rtol=1e-8, atol=1e-10, msg=f"{mode} {k}")
    # not vacuous: without the gather each rank's loss is another number
    for rec in records:
        assert abs(float(rec["local_loss"]) - float(rec["joint"]["loss"])) > 1e-3


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["simclr", "simclr,full"])
def test_cli_trains(tmp_path, spec):
    rows = train_cli(tmp_path, spec, "simclr.mlp_dim=64", "simclr.dim=32")
    keys = set().union(*rows)
    assert {"loss/simclr", "simclr/nt_xent"} <= keys, keys
    if "full" in spec:
        assert "loss/full" in keys
    assert all(math.isfinite(row["loss/simclr"]) for row in rows if "loss/simclr" in row)


# ----------------------------------------------------------------------------- the ImageNet recipe
RECIPE = Path(__file__).resolve().parents[2] / "docs" / "recipes" / "simclr_r50_100ep_b4096.yaml"


def test_imagenet_recipe_is_the_official_command():
    """docs/recipes/simclr_r50_100ep_b4096.yaml against google-research/simclr's README ImageNet command
    (--train_batch_size=4096 --train_epochs=100 --learning_rate=0.3 --weight_decay=1e-6
    --temperature=0.1) and run.py's defaults (LARS, momentum 0.9, warmup 10, linear lr scaling,
    --num_nlh_layers=1 --head_proj_dim=128, --global_bn=True); it also stacks 'full'."""
    from opera.configs import load_config

    cfg = load_config(str(RECIPE))
    assert cfg.hierarchy == "simclr" and cfg.backbone.name == "resnet50" and cfg.backbone.img_size == 224
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay,
            cfg.optim.momentum, cfg.optim.warmup_epochs) == (4096, 100, "lars", 0.3, 1e-6, 0.9, 10)
    assert cfg.optim.base_lr * cfg.train.batch_size / 256 == pytest.approx(4.8)  # the paper's 4.8
    assert cfg.train.concat_views and cfg.train.sync_bn and cfg.data.crop_min == 0.08
    assert cfg.space_options()["simclr"] == {"dim": 128, "mlp_dim": None, "layers": 2, "temperature": 0.1,
                                             "weight": 1.0, "gather_distributed": True}
    h = SupervisionHierarchy.from_config(load_config(str(RECIPE), ["hierarchy=simclr,full"]), {"class": 1000})
    linears = [m for m in h.spaces["simclr"].projector.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 2048), (2048, 128)]
    assert h.spaces["full"].source == "simclr/projector"
