"""The ``dino`` space: self-distillation against a centred, sharpened momentum teacher (Caron et al. 2021)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from opera import distributed
from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy
from opera.supervisions.base import Progress
from tests.hierarchy.test_distributed import run_two_ranks
from tests.supervisions.helpers import gloo_group, train_cli

SMALL = {"dim": 8, "hidden_dim": 16, "bottleneck_dim": 8}


def build(spec="dino", seed=0, backbone="resnet_tiny", img_size=32, dtype=torch.float64, dino=None, **kw):
    """A small hierarchy whose teacher differs from the student (as after training)."""
    torch.manual_seed(seed)
    opts = {**SMALL, **(dino or {})}
    bb = {"backbone_options": {"depth": 1, "patch_size": 8}} if backbone == "vit_tiny" else {}
    h = SupervisionHierarchy.from_spec(spec, backbone=backbone, num_classes=3, img_size=img_size, dino=opts, **bb, **kw)
    h = h.to(dtype)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for p in h.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return h


def views(n=6, sizes=(32, 32), seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, s, s, generator=g, dtype=dtype) for s in sizes]


# ----------------------------------------------------------------------------- by hand
def prototype_scores_by_hand(z: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> list[list[float]]:
    """DINOHead's last step, written out: x = z / |z| (``F.normalize(x, dim=-1, p=2)``) and the
    weight-normalised Linear ``W_k = g_k v_k / |v_k|`` (``nn.utils.weight_norm``, dim 0), no bias."""
    rows = []
    for zb in z.tolist():
        nz = math.sqrt(sum(a * a for a in zb))
        x = [a / nz for a in zb]
        out = []
        for gk, vk in zip(g.reshape(-1).tolist(), v.tolist()):
            nv = math.sqrt(sum(a * a for a in vk))
            out.append(sum(gk * a / nv * b for a, b in zip(vk, x)))
        rows.append(out)
    return rows


def softmax(row: list[float], tau: float) -> list[float]:
    top = max(row)
    e = [math.exp((a - top) / tau) for a in row]
    s = sum(e)
    return [a / s for a in e]


def dino_by_hand(student: list[list[list[float]]], teacher: list[list[list[float]]], center: list[float],
                 tau_s: float, tau_t: float) -> float:
    """Caron et al. 2021, Eq. 1 and Eq. 3 with the centering of Sec. 3.1, as DINOLoss.forward
    (facebookresearch/dino, main_dino.py) computes it:

        P_t(x_iq)_b^(k) = exp((g_t(x_iq)_b^(k) - c^(k)) / tau_t) / sum_j exp((g_t(x_iq)_b^(j) - c^(j)) / tau_t)
        P_s(x_v)_b^(k)  = exp(g_s(x_v)_b^(k) / tau_s) / sum_j exp(g_s(x_v)_b^(j) / tau_s)
        L = 1 / #pairs  sum_{iq global} sum_{v != iq}  1/B sum_b  sum_k -P_t(x_iq)_b^(k) log P_s(x_v)_b^(k)

    ``student[v][b][k]`` = g_s(x_v), every view; ``teacher[iq][b][k]`` = g_t(x_iq), the global views."""
    total, pairs = 0.0, 0
    for iq, t_view in enumerate(teacher):
        for v, s_view in enumerate(student):
            if v == iq:
                continue
            term = 0.0
            for t_row, s_row in zip(t_view, s_view):
                p_t = softmax([a - c for a, c in zip(t_row, center)], tau_t)
                p_s = softmax(s_row, tau_s)
                term += sum(-a * math.log(b) for a, b in zip(p_t, p_s))
            total += term / len(t_view)
            pairs += 1
    return total / pairs


def center_by_hand(center: list[float], teacher: list[list[list[float]]], m: float) -> list[float]:
    """Eq. 4: c <- m c + (1 - m) (1/B) sum_i g_t(x_i), over the rows of every global view."""
    rows = [row for view in teacher for row in view]
    return [m * c + (1 - m) * sum(r[k] for r in rows) / len(rows) for k, c in enumerate(center)]


def outputs(h: SupervisionHierarchy, xs: list[torch.Tensor], n_global: int):
    """g_s of every view and g_t of the global views, each view alone through the networks, the
    prototype layer by hand."""
    sp, t = h.spaces["dino"], h.teacher
    last, t_last = sp.prototypes.last_layer.parametrizations.weight, t.heads["dino_prototypes"].last_layer.parametrizations.weight
    with torch.no_grad():
        student = [prototype_scores_by_hand(sp.projector(h.backbone(x)), last.original0, last.original1) for x in xs]
        teacher = [prototype_scores_by_hand(t.heads["dino_projector"](t.backbone(x)), t_last.original0, t_last.original1)
                   for x in xs[:n_global]]
    return student, teacher


def set_center(h: SupervisionHierarchy, seed: int = 7) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    c = h.spaces["dino"].center
    c.copy_(0.3 * torch.randn(c.shape, generator=g, dtype=c.dtype))
    return c[0].tolist()


# ----------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("epoch,schedule,tau_t", [
    (0, {}, 0.04),  # the official default: 0.04 throughout
    (5, {"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30}, 0.04 + 0.03 * 5 / 29),
    (31, {"warmup_teacher_temp": 0.04, "teacher_temp": 0.07, "warmup_teacher_temp_epochs": 30}, 0.07),
], ids=["default", "warm-up", "after-warm-up"])
def test_two_crop_loss_and_center_equal_the_hand_computation(epoch, schedule, tau_t):
    """Two global views: L = (H(P_t(x1), P_s(x2)) + H(P_t(x2), P_s(x1))) / 2 against a non-zero
    center; tau_t from the schedule at the integer epoch (np.linspace(0.04, 0.07, 30)[5] = 0.04 +
    0.03 * 5/29); the center afterwards is Eq. 4's update, once."""
    h = build(dino=schedule)
    h.on_step(Progress(epoch=epoch + 0.5, step=0, epochs=100, total_steps=1000))
    assert h.spaces["dino"].teacher_temp == pytest.approx(tau_t, abs=1e-15)
    c0 = set_center(h)
    x = views()
    student, teacher = outputs(h, x, 2)
    out = h(views=x)
    expected = dino_by_hand(student, teacher, c0, 0.1, tau_t)
    diff = abs(float(out.losses["dino"].detach()) - expected)
    assert diff < 1e-10, diff
    assert abs(float(out.logs["dino/loss"]) - expected) < 1e-10
    assert float(out.logs["dino/teacher_temp"]) == pytest.approx(tau_t, abs=1e-15)
    torch.testing.assert_close(h.spaces["dino"].center[0], torch.tensor(center_by_hand(c0, teacher, 0.9), dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # the weight scales the loss, not the logged term
    h2 = build(dino={**schedule, "weight": 0.25})
    h2.on_step(Progress(epoch=epoch + 0.5, step=0, epochs=100, total_steps=1000))
    set_center(h2)
    assert float(h2(views=x).losses["dino"].detach()) == pytest.approx(0.25 * expected, abs=1e-10)


def test_multi_crop_loss_by_hand_and_view_by_view():
    """2 global views (32 px) + 2 local crops (16 px): the teacher sees the global ones; 2 x 3 = 6
    pairs (iq, v != iq). Calls over [0], [1], [2], [3] give the joint loss, gradients and center
    (the targets are made once per step, the center updated once)."""
    h = build()
    c0 = set_center(h)
    x = views(sizes=(32, 32, 16, 16))
    student, teacher = outputs(h, x, 2)
    expected = dino_by_hand(student, teacher, c0, 0.1, 0.04)
    joint = copy.deepcopy(h)
    out = joint(views=x, global_views=2)
    out.loss.backward()
    assert abs(float(out.losses["dino"].detach()) - expected) < 1e-10
    state, total, log = None, 0.0, 0.0
    for v in range(4):
        part = h(views=x, global_views=2, view_ids=[v]) if state is None else h(view_ids=[v], state=state)
        part.loss.backward()
        state, total, log = part.state, total + part.losses["dino"].detach(), log + part.logs["dino/loss"]
    assert abs(float(total) - expected) < 1e-10 and abs(float(log) - expected) < 1e-10
    a, b = dict(joint.named_parameters()), dict(h.named_parameters())
    grads = [k for k, p in a.items() if p.grad is not None]
    assert any(k.startswith("backbone.") for k in grads) and any("last_layer" in k for k in grads)
    for k in grads:
        torch.testing.assert_close(b[k].grad, a[k].grad, rtol=1e-9, atol=1e-12, msg=k)
    expected_center = torch.tensor(center_by_hand(c0, teacher, 0.9), dtype=torch.float64)
    for model in (joint, h):
        torch.testing.assert_close(model.spaces["dino"].center[0], expected_center, rtol=0, atol=1e-12)


def test_local_crops_reach_dino_only_and_full_reads_the_global_views():
    """``dino,full`` with local crops: full's cross-entropy is over the 2 global views, on
    dino/projector (arrangement B: DINO has no predictor)."""
    h = build("dino,full")
    assert h.arrangement == "B" and h.spaces["full"].source == "dino/projector"
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out = h(views=views(sizes=(32, 32, 16, 16)), targets=y, global_views=2)
    stage = out.state.stage
    assert all("dino/prototypes" in stage.reps[i] for i in range(4))
    assert all("full/logits" in stage.reps[i] for i in range(2)) and all("full/logits" not in stage.reps[i] for i in (2, 3))
    with pytest.raises(OperaError) as err:
        build("dino,full", arrangement="C")
    assert "\n" not in str(err.value) and "'dino'" in str(err.value)


# ----------------------------------------------------------------------------- the head and the teacher
def test_defaults_are_the_official_head_and_loss():
    """DINOHead(in, 65536, use_bn=False, norm_last_layer=True, nlayers=3, hidden 2048, bottleneck 256)
    and DINOLoss(student_temp 0.1, center_momentum 0.9), teacher temperature 0.04, freeze_last_layer 1."""
    torch.manual_seed(0)
    h = SupervisionHierarchy.from_spec("dino", backbone="resnet_tiny", img_size=32)
    sp, width = h.spaces["dino"], h.backbone.num_features
    o = sp.options
    assert (o.student_temp, o.teacher_temp, o.warmup_teacher_temp, o.warmup_teacher_temp_epochs, o.center_momentum,
            o.freeze_last_layer, o.weight) == (0.1, 0.04, 0.04, 0, 0.9, 1, 1.0)
    linears = [m for m in sp.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(width, 2048), (2048, 2048), (2048, 256)]
    assert [type(m).__name__ for m in sp.projector] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    for m in linears:  # trunc_normal_(std=.02), bias 0
        assert 0.018 < float(m.weight.detach().std()) < 0.022 and not m.bias.any()
    wn = sp.prototypes.last_layer.parametrizations.weight
    assert wn.original1.shape == (65536, 256) and sp.prototypes.last_layer.bias is None
    assert torch.equal(wn.original0, torch.ones(65536, 1)) and not wn.original0.requires_grad
    assert sp.center.shape == (1, 65536) and not sp.center.any() and "spaces.dino.center" in h.state_dict()
    assert h.describe()["teacher"] == ["dino/prototypes"]
    reps = h.representations(torch.randn(2, 3, 32, 32))
    assert reps["dino/projector"].shape == (2, 256) and reps["dino/prototypes"].shape == (2, 65536)
    # the options the README names: BN in the head, a trainable g, one layer
    bn = SupervisionHierarchy.from_spec("dino", backbone="resnet_tiny", img_size=32,
                                        dino={"dim": 8, "use_bn": True, "norm_last_layer": False, "hidden_dim": 16})
    sp = bn.spaces["dino"]
    assert [type(m).__name__ for m in sp.projector] == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert sp.prototypes.last_layer.parametrizations.weight.original0.requires_grad
    one = SupervisionHierarchy.from_spec("dino", backbone="resnet_tiny", img_size=32, dino={"dim": 8, "layers": 1})
    assert [(m.in_features, m.out_features) for m in one.spaces["dino"].projector] == [(width, 256)]


def test_teacher_is_the_ema_of_backbone_and_whole_head_and_never_trained():
    h = build(dtype=torch.float32)
    h(views=views(dtype=torch.float32)).loss.backward()
    assert set(h.teacher.heads) == {"dino_projector", "dino_prototypes"}
    assert all(not p.requires_grad and p.grad is None for p in h.teacher.parameters())
    sp, t = h.spaces["dino"], h.teacher
    pairs = [(h.backbone, t.backbone), (sp.projector, t.heads["dino_projector"]), (sp.prototypes, t.heads["dino_prototypes"])]
    assert sum(1 for _ in t.parameters()) == sum(1 for online, _ in pairs for _ in online.parameters())
    before = [[p.clone() for p in target.parameters()] for _, target in pairs]
    h.momentum_update(0.99)
    for (online, target), old in zip(pairs, before):
        for b, theta, xi in zip(old, online.parameters(), target.parameters()):
            torch.testing.assert_close(xi, 0.99 * b + 0.01 * theta)


def test_prototypes_are_frozen_during_the_first_epoch():
    """``cancel_gradients_last_layer``: while epoch < freeze_last_layer the prototypes' gradients are
    set to None after the backward (AdamW then leaves them alone); afterwards they train."""
    from opera.engine.step import train_step

    h = build(dtype=torch.float32)
    x = views(dtype=torch.float32)
    opt = torch.optim.AdamW([p for _, p in h.trainable_parameters()], lr=1e-2, weight_decay=0.04)
    last = h.spaces["dino"].prototypes.last_layer.parametrizations.weight.original1
    first = h.spaces["dino"].projector[0].weight
    for epoch, frozen in ((0.0, True), (0.99, True), (1.0, False)):
        h.on_step(Progress(epoch=epoch, step=0, epochs=2, total_steps=10))
        v0, p0 = last.detach().clone(), first.detach().clone()
        train_step(h, h, opt, x, None, lr=1e-2, ema_momentum=0.99, device=torch.device("cpu"), amp="off")
        if frozen:
            assert torch.equal(last, v0) and last.grad is None, epoch
        else:
            assert not torch.equal(last, v0) and last.grad is not None, epoch
        assert not torch.equal(first, p0)  # the rest of the head trains throughout
    never = build(dtype=torch.float32, dino={"freeze_last_layer": 0})
    never(views=x).loss.backward()
    never.after_backward()
    assert never.spaces["dino"].prototypes.last_layer.parametrizations.weight.original1.grad is not None


@pytest.mark.parametrize("key,value", [("teacher_temp", 0.0), ("student_temp", -0.1), ("center_momentum", 1.5),
                                       ("layers", 0), ("dim", 0), ("freeze_last_layer", -1)])
def test_bad_options_are_one_line(key, value):
    with pytest.raises(OperaError) as err:
        SupervisionHierarchy.from_spec("dino", backbone="resnet_tiny", img_size=32, dino={**SMALL, key: value})
    assert "\n" not in str(err.value) and f"dino.{key}" in str(err.value)


def test_one_view_is_a_one_line_error():
    h = build()
    with pytest.raises(OperaError) as err:
        h(views=views(sizes=(32,)))
    assert "\n" not in str(err.value) and "'dino'" in str(err.value) and "two views" in str(err.value)


# ----------------------------------------------------------------------------- 2 gloo processes
WORLD = 2
LOCAL = 4
TIMEOUT_S = 90


def _gloo_model() -> SupervisionHierarchy:
    return build(backbone="vit_tiny", img_size=16)  # no BatchNorm: each rank's outputs are its rows' own


def _gloo_worker(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, port, WORLD, TIMEOUT_S):
        x = [v[rank * LOCAL:(rank + 1) * LOCAL] for v in views(n=WORLD * LOCAL, sizes=(16, 16))]
        h = _gloo_model()
        first = h(views=x)
        first.loss.backward()
        grads = {k: distributed.all_reduce_mean(p.grad) for k, p in h.named_parameters() if p.grad is not None}
        center1 = h.spaces["dino"].center.clone()
        second = h(views=x)  # this loss uses the all-reduced center
        torch.save({"loss1": first.losses["dino"].detach(), "loss2": second.losses["dino"].detach(), "grads": grads,
                    "center1": center1, "center2": h.spaces["dino"].center.clone()}, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    """The loss is a per-rank mean (DDP averages the gradients); the center's batch mean is
    all-reduced (``update_center``): the mean of the ranks' losses, their mean gradients and each
    rank's center equal one process on the whole batch, at the first step and at the second (whose
    loss reads the updated center)."""
    records = run_two_ranks(tmp_path, _gloo_worker, TIMEOUT_S)
    x = views(n=WORLD * LOCAL, sizes=(16, 16))
    ref = _gloo_model()
    first = ref(views=x)
    first.loss.backward()
    center1 = ref.spaces["dino"].center.clone()
    second = ref(views=x)
    for step, out in (("loss1", first), ("loss2", second)):
        mean = torch.stack([rec[step] for rec in records]).mean()
        assert abs(float(mean) - float(out.losses["dino"].detach())) < 1e-10, step
    ref_grads = {k: p.grad for k, p in ref.named_parameters() if p.grad is not None}
    for rec in records:
        assert rec["grads"].keys() == ref_grads.keys()
        for k, g in ref_grads.items():
            torch.testing.assert_close(rec["grads"][k], g, rtol=1e-8, atol=1e-12, msg=k)
        torch.testing.assert_close(rec["center1"], center1, rtol=0, atol=1e-12)
        torch.testing.assert_close(rec["center2"], ref.spaces["dino"].center, rtol=0, atol=1e-12)
    # not vacuous: a center from rank 0's rows alone is another one
    alone = _gloo_model()
    alone(views=[v[:LOCAL] for v in x])
    assert (alone.spaces["dino"].center - records[0]["center1"]).abs().max() > 1e-6


# ----------------------------------------------------------------------------- the CLI
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["dino", "dino,full"])
def test_cli_trains(tmp_path, spec):
    rows = train_cli(tmp_path, spec, "dino.dim=256", "dino.hidden_dim=64", "dino.bottleneck_dim=32")
    rows = [row for row in rows if "loss/dino" in row]
    assert len(rows) == 3, rows
    assert all(math.isfinite(row["loss/dino"]) and row["dino/teacher_temp"] == pytest.approx(0.04) for row in rows)
    if "full" in spec:
        assert all("loss/full" in row and "full/ce" in row for row in rows)


@pytest.mark.slow
def test_cli_trains_dino_full_with_six_local_crops(tmp_path):
    """Multi-crop from the CLI: 2 global views and 6 local crops (data.local_crops=6); the loss
    has 2 x 7 = 14 (teacher view, other view) pairs, and full still reads the global views."""
    rows = train_cli(tmp_path, "dino,full", "data.local_crops=6", "dino.dim=256", "dino.hidden_dim=64",
                     "dino.bottleneck_dim=32")
    rows = [row for row in rows if "loss/dino" in row]
    assert len(rows) == 3 and all(math.isfinite(row["loss/dino"]) and "loss/full" in row for row in rows)


# ----------------------------------------------------------------------------- the ImageNet recipe
RECIPE = Path(__file__).resolve().parents[2] / "docs" / "recipes" / "dino_vits16_100ep_b512.yaml"
#: the multi-crop data keys (--local_crops_number, the 96 px size, --local_crops_scale)
LOCAL_CROPS = {"local_crops": 8, "local_size": 96, "local_crop_scale": [0.05, 0.4]}


def test_imagenet_recipe_is_the_official_command(tmp_path):
    """docs/recipes/dino_vits16_100ep_b512.yaml against the README's vanilla ViT-S/16 command
    (8 GPUs x --batch_size_per_gpu 64, --epochs 100) and main_dino.py's defaults; it builds with
    'full' on dino/projector."""
    from opera.configs import load_config

    cfg = load_config(str(RECIPE))
    assert cfg.hierarchy == "dino" and cfg.arrangement is None
    b = cfg.backbone
    assert (b.name, b.img_size, b.patch_size, b.stop_grad_patch_embed, b.drop_path_rate) == \
        ("vit_small_patch16_224", 224, 16, None, 0.1)
    o = cfg.optim
    assert (o.name, o.base_lr, o.weight_decay, o.exclude_1d_decay, tuple(o.betas), o.warmup_epochs, o.ema_momentum,
            o.ema_cosine) == ("adamw", 0.0005, 0.04, True, (0.9, 0.999), 10, 0.996, True)
    assert (cfg.train.epochs, cfg.train.batch_size) == (100, 512)
    assert o.base_lr * cfg.train.batch_size / 256 == pytest.approx(0.001)
    assert cfg.data.crop_min == 0.4
    for k, v in LOCAL_CROPS.items():
        assert (list(getattr(cfg.data, k)) if isinstance(v, list) else getattr(cfg.data, k)) == v, k
    assert cfg.space_options()["dino"] == {
        "dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "layers": 3, "use_bn": False, "norm_last_layer": True,
        "student_temp": 0.1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
        "center_momentum": 0.9, "freeze_last_layer": 1, "weight": 1.0}
    full = load_config(str(RECIPE), ["hierarchy=dino,full"])
    h = SupervisionHierarchy.from_config(full, {"class": 1000})
    blocks = h.backbone.blocks
    assert len(blocks) == 12 and blocks[0].attn.num_heads == 6 and h.backbone.num_features == 384
    assert h.arrangement == "B" and h.spaces["full"].source == "dino/projector"
    assert h.spaces["dino"].projector[0].in_features == 384
    # the 96 px local crops reach the 224 px ViT: its position embedding follows each input's grid
    with torch.no_grad():
        assert h.backbone.forward_features(torch.zeros(1, 3, 96, 96)).shape[1] == 1 + 6 * 6
    # the teacher has no stochastic depth (main_dino.py builds it without drop_path_rate)
    drops = [m.drop_prob for m in h.teacher.backbone.modules() if type(m).__name__ == "DropPath"]
    assert drops and all(p == 0.0 for p in drops)
    assert any(m.drop_prob > 0 for m in h.backbone.modules() if type(m).__name__ == "DropPath")
