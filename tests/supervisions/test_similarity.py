"""The unified similarity view of §3.1 and Proposition 1 / Corollary 1 (§3.3, Appendix A).

Every closed form in ``opera.supervisions.similarity`` is held against autograd:

* Eq. 1-2 (with Eq. 13-15): the softmax objective's gradient w.r.t. s is ``-w_p`` / ``+w_n``;
* Eq. 1, 3: InfoNCE's gradient w.r.t. s is ``-w_p`` / ``+w_n`` of Eq. 3, for several tau, and
  the class space's cross-entropy is Eq. 3 with tau = 1;
* Eq. 17-22: dJ^O/dy for linear g, h and fixed p, for each label relation;
* Eq. 23, 27-31 and Corollary 1 (Eq. 11): the loss weights and their ordering.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opera.supervisions.losses import class_cross_entropy
from opera.supervisions.similarity import (
    Relation,
    corollary1_weights,
    infonce_weights_eq3,
    pair_objective_eq17,
    proposition1_gradient,
    softmax_objective_eq13,
    softmax_weights_eq2,
    unified_objective,
)

DT = torch.float64


def _grad(fn, s: torch.Tensor) -> torch.Tensor:
    s = s.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(s), s)
    return g


def _multi_positive_mask(rows: int, cols: int) -> torch.Tensor:
    """Random label relations with >= 1 positive and >= 1 negative in every row."""
    pos = torch.rand(rows, cols) < 0.3
    pos[:, 0] = True
    pos[:, -1] = False
    return pos[:, torch.randperm(cols)]


def _one_positive_mask(rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, cols, (rows,))
    return F.one_hot(labels, cols).bool(), labels


# --------------------------------------------------------------------------- Eq. 2 (softmax)
def test_eq2_weights_are_the_gradient_of_the_softmax_objective_eq13():
    """Eq. 14-15: dJ_s/ds = -w_p (= -1) on positives and +w_n of Eq. 2 on negatives."""
    s = torch.randn(6, 9, dtype=DT) * 3
    pos = _multi_positive_mask(6, 9)
    grad = _grad(lambda t: softmax_objective_eq13(t, pos), s)
    w_p, w_n = softmax_weights_eq2(s, pos)
    assert torch.allclose(grad[pos], -w_p[pos])
    assert torch.allclose(grad[~pos], w_n[~pos])
    assert torch.all(w_p[pos] == 1)  # Eq. 2: w_p = 1
    # Eq. 2 literally: w_n = exp(s) / sum_{l_p' != l_y} exp(s'), over the negatives of the row
    literal = s.exp() / (s.exp() * ~pos).sum(1, keepdim=True)
    assert torch.allclose(w_n[~pos], literal[~pos])
    assert torch.all(w_n >= 0) and torch.all(w_p >= 0)  # w_p, w_n >= 0 (§3.1)


def test_eq1_with_detached_eq2_weights_has_the_softmax_gradient():
    """Eq. 1 with w_p, w_n of Eq. 2 held constant optimises exactly as Eq. 13 (Appendix A.1)."""
    s = torch.randn(5, 7, dtype=DT) * 2
    pos = _multi_positive_mask(5, 7)
    w_p, w_n = softmax_weights_eq2(s, pos)
    g_loss = _grad(lambda t: softmax_objective_eq13(t, pos), s)
    g_unified = _grad(lambda t: unified_objective(t, pos, w_p.detach(), w_n.detach()), s)
    assert torch.allclose(g_unified, g_loss)


# --------------------------------------------------------------------------- Eq. 3 (InfoNCE)
@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0, 3.0])
def test_eq3_weights_are_the_gradient_of_infonce(tau):
    """d/ds of sum_i CE(s_i / tau, l_i) = -w_p on the positive and +w_n on each negative (Eq. 3)."""
    s = torch.randn(8, 8, dtype=DT)
    pos, labels = _one_positive_mask(8, 8)
    grad = _grad(lambda t: F.cross_entropy(t / tau, labels, reduction="sum"), s)
    w_p, w_n = infonce_weights_eq3(s, pos, tau)
    assert torch.allclose(grad[pos], -w_p[pos])
    assert torch.allclose(grad[~pos], w_n[~pos])
    # Eq. 3 literally, with Z = exp(s_pos/tau) + sum_neg exp(s'/tau)
    e = (s / tau).exp()
    z = e.sum(1, keepdim=True)
    neg_sum = (e * ~pos).sum(1, keepdim=True)
    assert torch.allclose(w_p[pos], (neg_sum / z / tau).squeeze(1))
    assert torch.allclose(w_n[~pos], (e / z / tau)[~pos])
    # w_p, w_n >= 0 and each row's total pull equals its total push (softmax rows sum to one)
    assert torch.all(w_p >= 0) and torch.all(w_n >= 0)
    assert torch.allclose(w_p.sum(1), w_n.sum(1))


@pytest.mark.parametrize("tau", [0.2, 1.0])
def test_eq1_with_detached_eq3_weights_has_the_infonce_gradient(tau):
    """The point of Eq. 1: InfoNCE optimises like J with the Eq. 3 weights held constant."""
    s = torch.randn(6, 10, dtype=DT)
    pos, labels = _one_positive_mask(6, 10)
    w_p, w_n = infonce_weights_eq3(s, pos, tau)
    g_loss = _grad(lambda t: F.cross_entropy(t / tau, labels, reduction="sum"), s)
    g_unified = _grad(lambda t: unified_objective(t, pos, w_p.detach(), w_n.detach()), s)
    assert torch.allclose(g_unified, g_loss)
    # and the check can fail: the Eq. 2 weights (positive excluded from Z) are a different gradient
    w2_p, w2_n = softmax_weights_eq2(s, pos)
    g_eq2 = _grad(lambda t: unified_objective(t, pos, w2_p, w2_n), s)
    assert not torch.allclose(g_eq2, g_loss)


def test_class_cross_entropy_gradient_is_eq3_with_tau_one():
    """The class term of Eq. 34 (standard CE, mean over N) has gradient (-w_p, +w_n) / N of Eq. 3, tau = 1."""
    n, c = 12, 7
    logits = torch.randn(n, c, dtype=DT) * 2
    pos, labels = _one_positive_mask(n, c)
    grad = _grad(lambda t: class_cross_entropy(t, labels), logits)
    w_p, w_n = infonce_weights_eq3(logits, pos, 1.0)
    assert torch.allclose(grad * n, -w_p + w_n)
    g_unified = _grad(lambda t: unified_objective(t, pos, w_p, w_n) / n, logits)
    assert torch.allclose(g_unified, grad)


# --------------------------------------------------------------------------- Proposition 1
def _random_problem(d: int = 6, d_self: int = 5, d_full: int = 4):
    W_g = torch.randn(d_self, d, dtype=DT)
    W_h = torch.randn(d_full, d_self, dtype=DT)
    y = torch.randn(d, dtype=DT)
    p = torch.randn(d, dtype=DT)
    w = torch.rand(4, dtype=DT).tolist()  # w_p^self, w_n^self, w_p^full, w_n^full >= 0
    return W_g, W_h, y, p, w


@pytest.mark.parametrize("relation", list(Relation))
def test_proposition1_gradient_eq20_to_22_matches_autograd(relation):
    """dJ^O(y, p)/dy of Eq. 17 equals Eq. 20 / 21 / 22 for linear g, h and a fixed p."""
    for _ in range(20):
        W_g, W_h, y, p, w = _random_problem()
        y = y.requires_grad_(True)
        (grad,) = torch.autograd.grad(pair_objective_eq17(y, p, W_g, W_h, relation, *w), y)
        closed = proposition1_gradient(p, W_g, W_h, relation, *w)
        assert torch.allclose(grad, closed)


def test_proposition1_eq19_general_form():
    """Eq. 19 with the indicators written out reduces to Eq. 20/21/22 case by case."""
    W_g, W_h, _, p, (wps, wns, wpf, wnf) = _random_problem()
    gp = W_g.T @ W_g @ p
    hp = W_g.T @ W_h.T @ W_h @ W_g @ p
    indicators = {
        Relation.SAME_INSTANCE: (1, 1),
        Relation.SAME_CLASS: (0, 1),
        Relation.DIFFERENT_CLASS: (0, 0),
    }
    for relation, (i_self, i_full) in indicators.items():
        eq19 = -i_self * wps * gp + (1 - i_self) * wns * gp - i_full * wpf * hp + (1 - i_full) * wnf * hp
        assert torch.allclose(proposition1_gradient(p, W_g, W_h, relation, wps, wns, wpf, wnf), eq19)


@pytest.mark.parametrize("relation", list(Relation))
def test_eq23_similarity_change_is_the_corollary1_weight(relation):
    """Eq. 23: (dJ^O/dy)^T p = w(relation) with alpha = |W_g p|^2, beta = |W_h W_g p|^2 (Eq. 27-29)."""
    W_g, W_h, _, p, w = _random_problem()
    grad = proposition1_gradient(p, W_g, W_h, relation, *w)
    weights = corollary1_weights(p, W_g, W_h, *w)
    assert float(grad @ p) == pytest.approx(weights[relation], rel=1e-9, abs=1e-9)


# --------------------------------------------------------------------------- Corollary 1
def _ordered(w: dict[Relation, float], tol: float = 1e-9) -> bool:
    """Eq. 11: w(same instance) <= w(same class, other instance) <= w(different class)."""
    return (
        w[Relation.SAME_INSTANCE] <= w[Relation.SAME_CLASS] + tol
        and w[Relation.SAME_CLASS] <= w[Relation.DIFFERENT_CLASS] + tol
    )


def test_corollary1_ordering_eq11_holds_for_nonnegative_weights():
    """Eq. 11 (via Eq. 30-31) for many random W_g, W_h, p and non-negative w's."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(300):
        d, d_self, d_full = (int(v) for v in torch.randint(2, 9, (3,), generator=gen))
        W_g = torch.randn(d_self, d, dtype=DT, generator=gen) * (0.1 + 3 * torch.rand(1, generator=gen, dtype=DT))
        W_h = torch.randn(d_full, d_self, dtype=DT, generator=gen) * (0.1 + 3 * torch.rand(1, generator=gen, dtype=DT))
        p = torch.randn(d, dtype=DT, generator=gen)
        wps, wns, wpf, wnf = (torch.rand(4, dtype=DT, generator=gen) * 5).tolist()
        w = corollary1_weights(p, W_g, W_h, wps, wns, wpf, wnf)
        assert _ordered(w), (trial, w)
        alpha = float((W_g @ p).pow(2).sum())
        beta = float((W_h @ W_g @ p).pow(2).sum())
        # Eq. 30 and Eq. 31: the two gaps
        assert w[Relation.SAME_INSTANCE] - w[Relation.SAME_CLASS] == pytest.approx(-(wps + wns) * alpha, abs=1e-9)
        assert w[Relation.SAME_CLASS] - w[Relation.DIFFERENT_CLASS] == pytest.approx(-(wpf + wnf) * beta, abs=1e-9)


def test_corollary1_ordering_can_fail_with_a_negative_weight():
    """The ordering needs w_p, w_n >= 0 (§3.1): a negative weight breaks Eq. 30 or Eq. 31."""
    W_g, W_h, _, p, _ = _random_problem()
    # Eq. 30 gap -(w_p^self + w_n^self) alpha > 0 when w_p^self + w_n^self < 0
    w = corollary1_weights(p, W_g, W_h, -2.0, 0.5, 1.0, 1.0)
    assert w[Relation.SAME_INSTANCE] > w[Relation.SAME_CLASS]
    assert not _ordered(w)
    # Eq. 31 gap -(w_p^full + w_n^full) beta > 0 when w_p^full + w_n^full < 0
    w = corollary1_weights(p, W_g, W_h, 1.0, 1.0, 0.5, -2.0)
    assert w[Relation.SAME_CLASS] > w[Relation.DIFFERENT_CLASS]
    assert not _ordered(w)
