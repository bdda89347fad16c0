"""The ``byol`` space: BYOL's symmetric regression loss against the momentum teacher's projection."""

from __future__ import annotations


import pytest
import torch

from opera.errors import OperaError
from opera.hierarchy import SupervisionHierarchy
from tests.supervisions.helpers import train_cli


def build(spec="byol", seed=0, **kw):
    torch.manual_seed(seed)
    return SupervisionHierarchy.from_spec(spec, backbone="resnet_tiny", num_classes=3, img_size=16,
                                          byol={"dim": 8, "mlp_dim": 16}, **kw)


def byol_by_hand(q: torch.Tensor, z: torch.Tensor) -> float:
    """Grill et al. 2020, Eq. 2: L = || q/||q|| - z'/||z'|| ||^2 (= 2 - 2 cos(q, z')), mean over the
    batch; written with explicit loops over samples and coordinates."""
    total = 0.0
    for qb, zb in zip(q.tolist(), z.tolist()):
        nq = sum(v * v for v in qb) ** 0.5
        nz = sum(v * v for v in zb) ** 0.5
        total += sum((a / nq - b / nz) ** 2 for a, b in zip(qb, zb))
    return total / len(q)


def test_byol_loss_equals_the_hand_computation_in_float64():
    """Eq. 3: L_total = L(v1 -> v2) + L(v2 -> v1): each view's online prediction against the
    *other* view's target projection (the teacher's backbone + projector), times ``weight``."""
    h = build().double()
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    with torch.no_grad():  # the teacher starts different from the online network, as after training
        for p in h.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    out = h(views=views)
    sp, t = h.spaces["byol"], h.teacher
    with torch.no_grad():
        feats = [h.backbone.forward_head(h.backbone.forward_features(v), pre_logits=True) for v in views]
        q = [sp.predictor(sp.projector(y)) for y in feats]
        z_target = [t.heads["byol_projector"](t.backbone.forward_head(t.backbone.forward_features(v), pre_logits=True))
                    for v in views]
    expected = byol_by_hand(q[0], z_target[1]) + byol_by_hand(q[1], z_target[0])
    assert abs(float(out.losses["byol"].detach()) - 1.0 * expected) < 1e-10
    assert abs(float(out.logs["byol/loss"]) - expected) < 1e-10
    # the same numbers as 2 - 2 cos, the form the paper writes beside Eq. 2
    cos = [torch.nn.functional.cosine_similarity(q[i], z_target[1 - i], dim=1) for i in range(2)]
    assert abs(sum(float((2 - 2 * c).mean()) for c in cos) - expected) < 1e-10


def test_weight_scales_the_loss():
    torch.manual_seed(0)
    h = SupervisionHierarchy.from_spec("byol", backbone="resnet_tiny", img_size=16,
                                       byol={"dim": 8, "mlp_dim": 16, "weight": 0.25})
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    out = h(views=views)
    torch.testing.assert_close(out.losses["byol"], 0.25 * out.logs["byol/loss"])


def test_gradients_never_reach_the_teacher_and_the_target_is_backbone_plus_projector():
    h = build()
    views = [torch.randn(6, 3, 16, 16) for _ in range(2)]
    h(views=views).loss.backward()
    assert set(h.teacher.heads) == {"byol_projector"}  # the target network has no predictor
    assert h.describe()["teacher"] == ["byol/projector"]
    assert all(not p.requires_grad and p.grad is None for p in h.teacher.parameters())
    online = {p.data_ptr() for p in h.parameters() if p.requires_grad}
    assert not any(p.data_ptr() in online for p in h.teacher.parameters())
    assert all(p.grad is not None for p in h.spaces["byol"].predictor.parameters())
    # the EMA (xi <- tau xi + (1 - tau) theta) is the only way the teacher changes
    before = [p.clone() for p in h.teacher.parameters()]
    opt = torch.optim.SGD([p for _, p in h.trainable_parameters()], lr=0.5)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, h.teacher.parameters()))
    h.momentum_update(0.9)
    online_pairs = list(h.backbone.parameters()) + list(h.spaces["byol"].projector.parameters())
    target_pairs = list(h.teacher.backbone.parameters()) + list(h.teacher.heads["byol_projector"].parameters())
    for b, theta, xi in zip(before, online_pairs, target_pairs):
        torch.testing.assert_close(xi, 0.9 * b + 0.1 * theta)


def test_one_view_is_a_one_line_error():
    h = build()
    with pytest.raises(OperaError) as err:
        h(views=[torch.randn(4, 3, 16, 16)])
    assert "\n" not in str(err.value) and "'byol'" in str(err.value) and "two views" in str(err.value)


def run_cli(tmp_path, hierarchy: str) -> list[dict]:
    return train_cli(tmp_path, hierarchy, "byol.dim=32", "byol.mlp_dim=64")


@pytest.mark.slow
def test_cli_trains_byol(tmp_path):
    rows = [r for r in run_cli(tmp_path, "byol") if "loss/byol" in r]
    assert rows and all(0 <= r["byol/loss"] <= 8 for r in rows)  # 2 terms, each in [0, 4]


@pytest.mark.slow
def test_cli_trains_byol_full(tmp_path):
    rows = [r for r in run_cli(tmp_path, "byol,full") if "loss/byol" in r]
    assert rows and all(k in rows[-1] for k in ("loss/byol", "byol/loss", "loss/full", "full/ce"))
