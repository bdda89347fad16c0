"""How the hierarchy is wired: which modules each supervision reaches (Fig. 4 arrangements, Eq. 8),
the momentum encoder (Appendix B), and the OPERA loss of Eq. 34 recomputed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from opera.hierarchy import SupervisionHierarchy

NUM_CLASSES = 7
SELF = {"mlp_dim": 64, "dim": 32}
VIT = {"depth": 2}


def build(spec: str = "self,full", arrangement: str | None = "C", backbone: str = "resnet_tiny", **kw):
    options = {}
    if "self" in spec:
        options["self"] = SELF
    if "full" in spec:
        options["full"] = {"hidden": 32}
        kw.setdefault("num_classes", NUM_CLASSES)
    return SupervisionHierarchy.from_spec(
        spec, backbone=backbone, arrangement=arrangement, img_size=32,
        backbone_options=VIT if backbone == "vit_tiny" else None, **kw, **options,
    )


def batch(n: int = 6, views: int = 2):
    xs = [torch.randn(n, 3, 32, 32) for _ in range(views)]
    return xs, torch.randint(0, NUM_CLASSES, (n,))


def grad_mass(module: nn.Module) -> float:
    """Sum of |grad| over the module's parameters (a missing grad counts as zero)."""
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


# --------------------------------------------------------------------------- arrangements (Fig. 4)
# which modules the class loss alone must reach: y^full = h(.) of the backbone (A), of the
# projector (B), or of the predictor q = Y^self (C, OPERA: Y^full = h(Y^self), Eq. 8)
REACH = {
    "C": {"backbone": True, "projector": True, "predictor": True},
    "naive": {"backbone": True, "projector": True, "predictor": True},
    "B": {"backbone": True, "projector": True, "predictor": False},
    "A": {"backbone": True, "projector": False, "predictor": False},
}


@pytest.mark.parametrize("arrangement", list(REACH))
def test_class_loss_reaches_exactly_the_modules_below_its_attachment(arrangement):
    """Backward of out.losses['full'] alone: grads flow down from where h attaches (Eq. 8, Fig. 4)."""
    h = build(arrangement=arrangement)
    xs, y = batch()
    out = h(xs, y)
    out.losses["full"].backward()
    sp = h.spaces["self"]
    modules = {"backbone": h.backbone, "projector": sp.projector, "predictor": sp.predictor}
    for name, reached in REACH[arrangement].items():
        mass = grad_mass(modules[name])
        assert (mass > 0) == reached, f"arrangement {arrangement}: class-loss grad on {name} = {mass}"
    # the stem conv is reached through every residual path (the zero-init last BNs do not block it)
    assert h.backbone.conv1.weight.grad.abs().sum() > 0
    assert grad_mass(h.spaces["full"].class_head) > 0
    for frozen in (h.teacher.backbone, h.teacher.heads["self_projector"]):
        assert all(p.grad is None for p in frozen.parameters())


@pytest.mark.parametrize("arrangement", list(REACH))
def test_instance_loss_never_reaches_the_class_head(arrangement):
    """The hierarchy is one-way: J^self (Eq. 9) is computed below h and sends it no gradient."""
    h = build(arrangement=arrangement)
    xs, y = batch()
    h(xs, y).losses["self"].backward()
    assert grad_mass(h.spaces["full"].class_head) == 0
    sp = h.spaces["self"]
    assert grad_mass(sp.predictor) > 0 and grad_mass(sp.projector) > 0 and grad_mass(h.backbone) > 0


@pytest.mark.parametrize("arrangement", list(REACH))
def test_momentum_branch_is_frozen_and_gets_no_gradient(arrangement):
    """The target network is updated by EMA only (stop-gradient, Appendix B)."""
    h = build(arrangement=arrangement)
    frozen = list(h.teacher.backbone.parameters()) + list(h.teacher.heads["self_projector"].parameters())
    assert frozen and all(not p.requires_grad for p in frozen)
    trainable = {id(p) for _, p in h.trainable_parameters()}
    assert not any(id(p) in trainable for p in frozen)
    xs, y = batch()
    h(xs, y).loss.backward()
    assert all(p.grad is None for p in frozen)


@pytest.mark.parametrize(
    "spec,arrangement,backbone",
    [("self,full", "A", "resnet_tiny"), ("self,full", "B", "resnet_tiny"), ("self,full", "C", "resnet_tiny"),
     ("self,full", "naive", "resnet_tiny"), ("full", None, "resnet_tiny"), ("mask,self,full", None, "vit_tiny")],
)
def test_class_head_width_is_num_classes(spec, arrangement, backbone):
    """Y^full has one component per class of the data (Appendix B), here 7 - never a hard-coded 1000."""
    h = build(spec, arrangement, backbone)
    head = h.spaces["full"].class_head
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    assert last.out_features == NUM_CLASSES
    h.eval()
    reps = h.representations(torch.randn(3, 3, 32, 32))
    assert reps["full/logits"].shape == (3, NUM_CLASSES)
    if arrangement == "naive":  # no mapping h: a single linear classifier on Y^self
        assert sum(isinstance(m, nn.Linear) for m in head.modules()) == 1


# --------------------------------------------------------------------------- momentum update
def _pairs(h: SupervisionHierarchy):
    sp = h.spaces["self"]
    return [(h.backbone, h.teacher.backbone), (sp.projector, h.teacher.heads["self_projector"])]


@pytest.mark.parametrize("backbone", ["resnet_tiny", "vit_tiny"])
def test_momentum_update_is_ema_of_every_parameter(backbone):
    """theta_k <- m theta_k + (1 - m) theta_q for every parameter of encoder and projector (MoCo)."""
    h = build("self", None, backbone)
    for online, target in _pairs(h):  # MoCo starts the target as a copy of the online network
        for (n_q, p_q), (n_k, p_k) in zip(online.named_parameters(), target.named_parameters(), strict=True):
            assert n_q == n_k and torch.equal(p_q, p_k)
    with torch.no_grad():
        for online, _ in _pairs(h):
            for p in online.parameters():
                p.add_(torch.randn_like(p))
    before = [
        [(n, p_q.detach().clone(), p_k.detach().clone())
         for (n, p_q), (_, p_k) in zip(online.named_parameters(), target.named_parameters(), strict=True)]
        for online, target in _pairs(h)
    ]
    m = 0.9
    h.momentum_update(m)
    for (online, target), saved in zip(_pairs(h), before):
        after_q = dict(online.named_parameters())
        after_k = dict(target.named_parameters())
        assert set(after_k) == {n for n, _, _ in saved}
        for name, theta_q, theta_k in saved:
            assert torch.equal(after_q[name], theta_q), f"online {name} changed"
            assert torch.allclose(after_k[name], m * theta_k + (1 - m) * theta_q, atol=1e-6), name
            if not torch.equal(theta_q, theta_k):
                assert not torch.equal(after_k[name], theta_k), f"target {name} did not move"


def test_momentum_update_limits():
    """m = 1 keeps the target, m = 0 copies the online network."""
    h = build("self", None)
    with torch.no_grad():
        for p in h.backbone.parameters():
            p.add_(1.0)
    target = h.teacher.backbone
    saved = [p.detach().clone() for p in target.parameters()]
    h.momentum_update(1.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), saved))
    h.momentum_update(0.0)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), h.backbone.parameters()))


# --------------------------------------------------------------------------- Eq. 34 by hand
def ctr(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo-v3's ctr: CE(normalize(q) normalize(k)^T / tau, labels = arange) * 2 tau."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / t
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * t)


def opera_loss_by_hand(h: SupervisionHierarchy, xs, y, concat: bool, arrangement: str | None = None):
    """Eq. 34 with the official weights: 0.5 (ctr(q1,k2) + ctr(q2,k1)) + 0.5 CE(y1) + 0.5 CE(y2).

    Every module runs per view (BatchNorm statistics per view) unless ``concat``, in train mode,
    exactly as the hierarchy calls them; nothing from opera's forward is reused.
    """
    sp, fs = h.spaces["self"], h.spaces["full"]

    def apply(module, inputs):
        if concat:
            return list(module(torch.cat(inputs)).chunk(len(inputs)))
        return [module(x) for x in inputs]

    ys = apply(h.backbone, xs)  # timm with num_classes=0: forward() = pooled pre-logits y
    zs = apply(sp.projector, ys)
    qs = apply(sp.predictor, zs)
    with torch.no_grad():
        ks = apply(h.teacher.heads["self_projector"], apply(h.teacher.backbone, xs))
    t = sp.resolved_temperature
    j_self = 0.5 * (ctr(qs[0], ks[1], t) + ctr(qs[1], ks[0], t))
    source = {"A": ys, "B": zs, "C": qs, "naive": qs}[arrangement or h.arrangement]
    logits = apply(fs.class_head, source)
    j_full = 0.5 * F.cross_entropy(logits[0], y) + 0.5 * F.cross_entropy(logits[1], y)
    return j_self, j_full


CASES = [("resnet_tiny", "C", False), ("resnet_tiny", "C", True), ("resnet_tiny", "A", False),
         ("resnet_tiny", "B", False), ("resnet_tiny", "naive", False), ("vit_tiny", "C", False)]


@pytest.mark.parametrize("backbone,arrangement,concat", CASES)
def test_hierarchy_loss_is_eq34_by_hand(backbone, arrangement, concat):
    """out.loss of 'self,full' equals Eq. 34 recomputed from the same modules, and so do the grads."""
    h = build("self,full", arrangement, backbone, concat_views=concat)
    h.train()
    xs, y = batch(n=8)
    torch.manual_seed(1)
    out = h(xs, y)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in h.named_parameters() if p.grad is not None}
    h.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    j_self, j_full = opera_loss_by_hand(h, xs, y, concat)
    assert torch.allclose(out.losses["self"], j_self, atol=1e-6)
    assert torch.allclose(out.losses["full"], j_full, atol=1e-6)
    assert torch.allclose(out.loss, j_self + j_full, atol=1e-6)
    assert set(out.losses) == {"self", "full"}
    (j_self + j_full).backward()
    hand = {n: p.grad for n, p in h.named_parameters() if p.grad is not None}
    assert set(hand) == set(grads)
    for name, g in grads.items():
        assert torch.allclose(hand[name], g, rtol=1e-4, atol=1e-6), name


def test_eq34_by_hand_can_tell_the_arrangements_apart():
    """The hand computation is not vacuous: reading h's input at the wrong level gives another loss."""
    h = build("self,full", "C")  # projector and predictor are both 32 wide, so B's wiring runs too
    xs, y = batch(n=8)
    out = h(xs, y)
    _, j_full_c = opera_loss_by_hand(h, xs, y, False)
    _, j_full_b = opera_loss_by_hand(h, xs, y, False, arrangement="B")
    assert torch.allclose(out.losses["full"], j_full_c, atol=1e-6)
    assert not torch.allclose(out.losses["full"], j_full_b, atol=1e-3)
