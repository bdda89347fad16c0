"""Every speed optimisation of the pretraining step changes no result.

Each kept optimisation (see BENCHMARKS.md) is held against the straightforward code it replaces:
the same loss, the same gradients and the same parameters after optimizer and momentum updates,
to float32 round-off (1e-5 relative / 1e-6 absolute):

* foreach LARS (batched trust ratios, scratch copy promoted to momentum buffer) vs MoCo-v3's
  per-parameter Python loop;
* the ``torch._foreach_lerp_`` momentum update vs MoCo-v3's loop
  ``param_m.data = param_m.data * m + param_b.data * (1 - m)``;
* fused AdamW vs the foreach implementation;
* channels_last CNNs vs contiguous NCHW;
* the single-sync finiteness check still names the bad term;
* the whole optimised ``train_step`` vs a plain reference step over several iterations.

No test here is timed: speed lives in ``benchmarks/``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from opera.engine.optim import LARS, build_optimizer, param_groups
from opera.engine.step import NonFiniteLoss, prepare_model, train_step
from opera.hierarchy import SupervisionHierarchy

RTOL, ATOL = 1e-5, 1e-6
NUM_CLASSES = 5


def build(backbone: str = "resnet_tiny", spec: str = "self,full", **kw) -> SupervisionHierarchy:
    torch.manual_seed(0)
    options = {"self": {"mlp_dim": 64, "dim": 32}} if "self" in spec else {}
    if "full" in spec:
        options["full"] = {"hidden": 32}
    return SupervisionHierarchy.from_spec(
        spec, backbone=backbone, num_classes=NUM_CLASSES, img_size=32,
        backbone_options={"depth": 2} if backbone == "vit_tiny" else None, **options, **kw,
    )


def batch(n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)], torch.randint(0, NUM_CLASSES, (n,), generator=g)


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """``max|a - b| <= ATOL + RTOL * max|b|``: equal up to float32 round-off, measured against the
    tensor's scale (an element-wise relative bound would flag tiny entries of a gradient whose
    round-off comes from the large ones, e.g. through a BatchNorm over a few samples)."""
    assert a.shape == b.shape, what
    a, b = a.detach().double(), b.detach().double()
    err, scale = float((a - b).abs().max()) if a.numel() else 0.0, float(b.abs().max()) if b.numel() else 0.0
    assert err <= ATOL + RTOL * scale, f"{what}: max |diff| {err:.3g} > {ATOL} + {RTOL} * {scale:.3g}"


def assert_same_params(m1: nn.Module, m2: nn.Module) -> None:
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        assert_close(p1, p2, n1)


def assert_same_grads(m1: nn.Module, m2: nn.Module) -> None:
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert (p1.grad is None) == (p2.grad is None), n1
        if p1.grad is not None:
            assert_close(p1.grad, p2.grad, f"grad of {n1}")


# --------------------------------------------------------------------------- references
def _benchmarks_module(name: str):
    """Import ``benchmarks/<name>.py`` (not a package): the official step the benchmarks race."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


#: MoCo-v3's ``moco/optimizer.py`` LARS (one parameter at a time, ``p.ndim > 1`` adapted), as
#: re-implemented for the official baseline of ``benchmarks/``
LoopLARS = _benchmarks_module("official_step").LARS


@torch.no_grad()
def loop_momentum_update(h: SupervisionHierarchy, m: float) -> None:
    """MoCo-v3's ``_update_momentum_encoder``, over every (online, momentum) pair."""
    for src, dst in h.momentum_pairs():
        for param_b, param_m in zip(src.parameters(), dst.parameters()):
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)


def reference_step(h: SupervisionHierarchy, opt: torch.optim.Optimizer, views, labels, lr: float, m: float):
    """MoCo-v3's order: the momentum update with this step's m, then forward, backward, step."""
    for g in opt.param_groups:
        g["lr"] = lr
    loop_momentum_update(h, m)
    out = h(views=views, labels=labels)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    return out


# --------------------------------------------------------------------------- optimizers
def _lars_params(channels_last: bool = False):
    g = torch.Generator().manual_seed(3)
    shapes = [(8, 4, 3, 3), (16, 8), (8,), (8,), (3, 5), (4, 4, 1, 1), (6, 2)]
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    with torch.no_grad():
        params[4].zero_()  # |p| = 0: trust ratio 1
        params[6].mul_(0.01)  # 0 < |p| < 1: still a trust ratio eta |p| / |g|
    if channels_last:
        params = [nn.Parameter(p.detach().contiguous(memory_format=torch.channels_last)) if p.ndim == 4 else p for p in params]
    return params


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_foreach_lars_matches_moco_v3_loop(weight_decay, channels_last):
    ours = _lars_params(channels_last)
    ref = [nn.Parameter(p.detach().clone().contiguous()) for p in ours]
    model_ours, model_ref = nn.ParameterList(ours), nn.ParameterList(ref)
    opt = LARS(param_groups(model_ours, weight_decay), lr=0.3, momentum=0.9)
    opt_ref = LoopLARS(model_ref.parameters(), lr=0.3, weight_decay=weight_decay, momentum=0.9)
    g = torch.Generator().manual_seed(4)
    for step in range(4):
        for i, (a, b) in enumerate(zip(ours, ref)):
            grad = torch.randn(a.shape, generator=g)
            if i == 1 and step == 2:
                grad.zero_()  # |g| = 0 (with no decay): trust ratio 1
            if i == 5 and step == 1:
                a.grad = b.grad = None  # a parameter without a gradient this step is skipped
                continue
            a.grad = grad.clone().contiguous(memory_format=torch.channels_last) if a.ndim == 4 and channels_last else grad.clone()
            b.grad = grad.clone()
        grads_before = [None if p.grad is None else p.grad.clone() for p in ours]
        opt.step()
        opt_ref.step()
        for a, b in zip(ours, ref):
            assert_close(a, b, "param")
            assert_close(opt.state[a]["mu"], opt_ref.state[b]["mu"], "momentum buffer")
        for p, before in zip(ours, grads_before):  # p.grad is not modified
            assert (p.grad is None) == (before is None)
            if before is not None:
                assert torch.equal(p.grad, before)


def test_fused_adamw_matches_main_moco_adamw():
    """build_optimizer's fused AdamW against main_moco.py's ``AdamW(model.parameters(), lr, wd)`` run
    by torch's per-parameter loop (``foreach=False``), not built by the code under test. The same
    gradients into both (no forward between steps, so round-off does not feed back)."""
    params_fused = _lars_params()
    params_ref = [nn.Parameter(p.detach().clone()) for p in params_fused]
    o1 = build_optimizer(nn.ParameterList(params_fused), "adamw", lr=1e-2, weight_decay=0.05)
    assert o1.defaults.get("fused")
    # main_moco.py's AdamW (every parameter decayed), run by torch's single-tensor loop
    o2 = torch.optim.AdamW(params_ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05, foreach=False)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        for a, b in zip(params_fused, params_ref):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        o1.step()
        o2.step()
        for a, b in zip(params_fused, params_ref):
            assert_close(a, b, "param")


# --------------------------------------------------------------------------- momentum update
@pytest.mark.parametrize("backbone", ["resnet_tiny", "vit_tiny"])
def test_foreach_momentum_update_matches_loop(backbone):
    h1 = build(backbone)
    with torch.no_grad():  # make online and momentum weights differ
        for p in h1.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    h2 = copy.deepcopy(h1)
    for m in (0.99, 0.9, 0.5):
        h1.momentum_update(m)
        loop_momentum_update(h2, m)
    assert_same_params(h1, h2)


# --------------------------------------------------------------------------- per-view encoders
def test_backbones_run_each_view_alone():
    """MoCo-v3 runs the online and momentum encoders on each view alone (per-view statistics)."""
    h = build("resnet_tiny")
    calls = []
    h.backbone.conv1.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    h.teacher.backbone.conv1.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    views, labels = batch(n=6)
    h(views=views, labels=labels)
    assert calls == [6, 6, 6, 6]  # online x2, momentum x2: per-view BatchNorm statistics


# --------------------------------------------------------------------------- channels_last
def test_channels_last_cnn_changes_nothing():
    h_cl, h_plain = build("resnet_tiny"), build("resnet_tiny")
    h_cl = prepare_model(h_cl, "cpu")  # default: channels_last for CNNs
    h_plain = prepare_model(h_plain, "cpu", channels_last=False)
    assert h_cl.opera_channels_last and not h_plain.opera_channels_last
    assert h_cl.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert h_cl.teacher.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    o_cl = build_optimizer(h_cl, "lars", lr=0.2, weight_decay=1e-4)
    o_plain = build_optimizer(h_plain, "lars", lr=0.2, weight_decay=1e-4)
    views, labels = batch(n=32)  # BatchNorm over 6 samples would amplify round-off past 1e-5
    for step in range(3):
        out_cl = train_step(h_cl, h_cl, o_cl, views, labels, 0.2, 0.99, torch.device("cpu"), step=step)
        out_plain = train_step(h_plain, h_plain, o_plain, views, labels, 0.2, 0.99, torch.device("cpu"), step=step)
        assert_close(out_cl.loss, out_plain.loss, f"loss at step {step}")
    assert_same_grads(h_cl, h_plain)
    assert_same_params(h_cl, h_plain)
    for (n, b1), (_, b2) in zip(h_cl.named_buffers(), h_plain.named_buffers()):
        assert_close(b1.float(), b2.float(), n)


def test_vit_is_not_made_channels_last():
    h = prepare_model(build("vit_tiny"), "cpu")
    assert not h.opera_channels_last
    assert h.backbone.patch_embed.proj.weight.is_contiguous()


# --------------------------------------------------------------------------- the whole step
@pytest.mark.parametrize("backbone,optimizer", [("resnet_tiny", "lars"), ("vit_tiny", "sgd")])
def test_optimised_train_step_matches_reference_step(backbone, optimizer):
    """Optimised: channels_last (CNN), foreach LARS, foreach EMA.
    Reference: NCHW, one view at a time, loop LARS, loop EMA. (The ViT runs with SGD on both
    sides: Adam's normalised update turns round-off in near-zero gradients into lr-sized steps,
    so two Adam runs drift apart through later forwards; fused AdamW is tested on its own above.)"""
    fast = prepare_model(build(backbone), "cpu")
    ref = prepare_model(build(backbone), "cpu", channels_last=False)
    lr = 0.2 if optimizer == "lars" else 0.05
    opt_fast = build_optimizer(fast, optimizer, lr=lr, weight_decay=1e-4)
    opt_ref = LoopLARS(ref.parameters(), lr=lr, weight_decay=1e-4) if optimizer == "lars" else build_optimizer(ref, "sgd", lr=lr, weight_decay=1e-4)
    for step in range(3):
        views, labels = batch(n=32, seed=10 + step)
        out_fast = train_step(fast, fast, opt_fast, views, labels, lr, 0.9, torch.device("cpu"), step=step)
        out_ref = reference_step(ref, opt_ref, views, labels, lr, 0.9)
        assert_close(out_fast.loss, out_ref.loss, f"loss at step {step}")
        assert_same_grads(fast, ref)
        assert_same_params(fast, ref)


def test_single_sync_finiteness_check_still_names_the_bad_term():
    h = build("resnet_tiny")
    opt = build_optimizer(h, "lars", lr=0.1, weight_decay=0.0)
    views, labels = batch()
    labels = labels.clone()
    with torch.no_grad():
        h.spaces["full"].class_head[-1].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLoss, match=r"full=nan") as info:
        train_step(h, h, opt, views, labels, 0.1, 0.99, torch.device("cpu"), step=7)
    assert "self=" not in str(info.value) and "step 7" in str(info.value)


# --------------------------------------------------------------------------- one view at a time
def _three_views(n: int = 8, seed: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(3)], torch.randint(0, NUM_CLASSES, (n,), generator=g)


@pytest.mark.parametrize("backbone,spec,arrangement,views", [
    ("resnet_tiny", "self,full", "C", 2),
    ("resnet_tiny", "self,full", "A", 2),
    ("resnet_tiny", "self,full", "B", 2),
    ("resnet_tiny", "self", None, 3),
    ("resnet_tiny", "full", None, 2),
    ("vit_tiny", "mask,self,full", "C", 2),
    ("vit_tiny", "self,full", "naive", 3),
])
def test_per_view_backward_matches_joint_backward(backbone, spec, arrangement, views, monkeypatch):
    """Eq. 34/36 are sums of per-view terms against detached keys, masks and labels, so running
    the online branch one view at a time (forward, backward, next view) must give the joint
    step's loss terms, logs, gradients, BatchNorm running statistics and updated parameters.
    In float64, so that only the order of summation differs: to 1e-10 of each tensor's scale."""
    monkeypatch.setattr(f"{__name__}.RTOL", 1e-10)
    monkeypatch.setattr(f"{__name__}.ATOL", 1e-12)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _per_view_vs_joint(backbone, spec, arrangement, views)
    finally:
        torch.set_default_dtype(saved)


def _per_view_vs_joint(backbone, spec, arrangement, views):
    per = build(backbone, spec, arrangement=arrangement)
    joint = copy.deepcopy(per)
    opt_per = build_optimizer(per, "sgd", lr=0.05, weight_decay=1e-4)
    opt_joint = build_optimizer(joint, "sgd", lr=0.05, weight_decay=1e-4)
    for step in range(2):
        xs, labels = batch(n=8, seed=20 + step) if views == 2 else _three_views(seed=20 + step)
        torch.manual_seed(step)  # the same MIM masks on both sides
        out_per = train_step(per, per, opt_per, xs, labels, 0.05, 0.9, torch.device("cpu"), step=step, per_view=True)
        torch.manual_seed(step)
        out_joint = train_step(joint, joint, opt_joint, xs, labels, 0.05, 0.9, torch.device("cpu"), step=step, per_view=False)
        assert out_per.losses.keys() == out_joint.losses.keys() == set(spec.split(","))
        assert_close(out_per.loss, out_joint.loss, "loss")
        for k in out_joint.losses:
            assert_close(out_per.losses[k], out_joint.losses[k], f"loss term {k}")
        assert out_per.logs.keys() == out_joint.logs.keys()
        for k in out_joint.logs:
            assert_close(out_per.logs[k], out_joint.logs[k], f"log {k}")
        assert_same_grads(per, joint)
        assert_same_params(per, joint)
        for (n1, b1), (_, b2) in zip(per.named_buffers(), joint.named_buffers()):
            assert_close(b1.float(), b2.float(), f"buffer {n1}")


def test_per_view_terms_add_up_to_the_joint_loss_and_reuse_the_keys():
    """The hierarchy API behind it: view 0 then view 1 (state passed on) add up to one call over
    both; the momentum encoder runs once per step, not once per call."""
    h = build("resnet_tiny", "self,full")
    xs, labels = batch(n=8)
    calls = {"n": 0}
    hook = h.teacher.heads["self_projector"].register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    first = h(views=xs, labels=labels, view_ids=[0])
    assert calls["n"] == 2  # the keys of both views, once
    second = h(view_ids=[1], state=first.state)
    assert calls["n"] == 2  # reused by the second call
    whole = copy.deepcopy(h)(views=xs, labels=labels)
    hook.remove()
    assert_close(first.loss + second.loss, whole.loss, "sum of per-view losses")
    for k in whole.losses:
        assert_close(first.losses[k] + second.losses[k], whole.losses[k], k)


def test_bad_view_ids_and_concat_views_subsets_are_one_line_errors():
    from opera.errors import OperaError

    h = build("resnet_tiny", "self,full")
    xs, labels = batch(n=4)
    for ids in ([2], [0, 0], []):
        with pytest.raises(OperaError, match="view_ids"):
            h(views=xs, labels=labels, view_ids=ids)
    with pytest.raises(OperaError, match="views="):
        h(labels=labels)
    hc = build("resnet_tiny", "self,full", concat_views=True)
    with pytest.raises(OperaError, match="concat_views"):
        hc(views=xs, labels=labels, view_ids=[0])


def _peak_saved_bytes(run) -> int:
    """Peak bytes of tensors that autograd holds for backward (saved for the graph) while ``run``
    executes: the activation memory of a training step, counted exactly, not timed."""
    import weakref

    live = {"now": 0, "peak": 0}

    class Handle:
        def __init__(self, t):
            self.t = t

    def pack(t):
        h = Handle(t)
        size = t.numel() * t.element_size()
        live["now"] += size
        live["peak"] = max(live["peak"], live["now"])
        weakref.finalize(h, lambda: live.__setitem__("now", live["now"] - size))
        return h

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        run()
    return live["peak"]


@pytest.mark.parametrize("backbone", ["resnet_tiny", "vit_tiny"])
def test_per_view_backward_keeps_one_views_activations(backbone):
    """The point of per-view backward: the saved activations alive at once are those of one view
    (plus the small heads), not of both - close to half the joint step's."""
    per, joint = build(backbone), build(backbone)
    xs, labels = batch(n=16)
    opts = [build_optimizer(m, "sgd", lr=0.01, weight_decay=0.0) for m in (per, joint)]
    peak_per = _peak_saved_bytes(lambda: train_step(per, per, opts[0], xs, labels, 0.01, 0.9, torch.device("cpu"), per_view=True))
    peak_joint = _peak_saved_bytes(lambda: train_step(joint, joint, opts[1], xs, labels, 0.01, 0.9, torch.device("cpu"), per_view=False))
    assert peak_joint > 0
    assert peak_per < 0.6 * peak_joint, (peak_per, peak_joint)
    assert peak_per > 0.4 * peak_joint, (peak_per, peak_joint)  # and not because something was skipped


# --------------------------------------------------------------------------- the arithmetic itself
@pytest.mark.parametrize("backbone,patch", [("resnet_tiny", None), ("vit_tiny", 8)])
def test_opera_step_does_the_official_steps_arithmetic(backbone, patch):
    """The roofline argument of BENCHMARKS.md rests on this: opera's step (per view or joint)
    performs exactly the FLOPs of the official MoCo-v3/OPERA step (``benchmarks/official_step.py``),
    counted by ``FlopCounterMode`` - no work skipped, and nothing added but the logged instance
    accuracy (one B x dim x B product of q1 with the keys)."""
    from opera.bench import count_step_flops, make_step

    make_official_step = _benchmarks_module("official_step").make_official_step
    cfg = dict(backbone=backbone, img_size=32, batch_size=8, threads=1, patch_size=patch, mlp_dim=64, dim=32, num_classes=5)
    official = count_step_flops(make_official_step(**cfg)[0], 0)
    per_view = count_step_flops(make_step(**cfg, per_view=True)[0], 0)
    joint = count_step_flops(make_step(**cfg, per_view=False)[0], 0)
    assert official > 0
    batch, dim = cfg["batch_size"], cfg["dim"]
    assert per_view == joint, (per_view, joint)
    assert per_view - official == 2 * batch * dim * batch, (per_view, official)


def test_bench_reports_the_roofline_consistently():
    from opera.bench import bench_step

    r = bench_step(backbone="resnet_tiny", img_size=32, batch_size=8, threads=1, mlp_dim=64, steps=2, warmup=1)
    assert r["per_view"] is True and r["gflop_per_step"] > 0 and r["matmul_peak_gflop_per_s"] > 0
    assert r["compute_peak_gflop_per_s"] == max(r["matmul_peak_gflop_per_s"], r["conv_peak_gflop_per_s"])
    assert r["gflop_per_s"] == pytest.approx(r["gflop_per_step"] / r["s_per_step"])
    assert r["fraction_of_peak"] == pytest.approx(r["gflop_per_s"] / r["compute_peak_gflop_per_s"])
    r2 = bench_step(backbone="resnet_tiny", img_size=32, batch_size=8, threads=1, mlp_dim=64, steps=1, warmup=0,
                    per_view=False, roofline=False)
    assert r2["per_view"] is False and "gflop_per_step" not in r2
