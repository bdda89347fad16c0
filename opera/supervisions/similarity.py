"""The unified similarity-learning view of §3.1 and Proposition 1 (§3.3, Appendix A).

These functions are the paper's closed forms, kept next to the losses so the tests can hold
autograd against them:

* Eq. 1 - the unified objective ``J = sum[-w_p I s + w_n (1 - I) s]``;
* Eq. 2 - the weights that make Eq. 1 the softmax objective of Eq. 13 (positive excluded from
  the denominator, as the paper writes it);
* Eq. 3 - the weights that make Eq. 1 InfoNCE with temperature tau (the standard softmax with
  the positive in the denominator; tau = 1 gives the ordinary cross-entropy that the class space
  trains with);
* Eq. 20-22 - the gradient of J^O (Eq. 17) with respect to y for linear g, h and a fixed p;
* Eq. 27-29 - the loss weights whose ordering is Corollary 1 (Eq. 11).
"""

from __future__ import annotations

from enum import Enum

import torch


def unified_objective(s: torch.Tensor, positive: torch.Tensor, w_p: torch.Tensor, w_n: torch.Tensor) -> torch.Tensor:
    """Eq. 1 for a matrix of similarities ``s`` and a boolean matrix ``positive`` = I(l_y, l_p)."""
    pos = positive.to(s.dtype)
    return (-w_p * pos * s + w_n * (1 - pos) * s).sum()


def softmax_objective_eq13(s: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Eq. 13 as written: ``-log(exp(s_pos) / sum_{neg} exp(s_neg))`` summed over rows."""
    neg = s.masked_fill(positive, float("-inf"))
    return (-(s * positive).sum(1) + torch.logsumexp(neg, dim=1)).sum()


def softmax_weights_eq2(s: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: ``w_p = 1``, ``w_n = exp(s) / sum_{l_p' != l_y} exp(s')`` (row-wise)."""
    neg = s.masked_fill(positive, float("-inf"))
    w_n = torch.softmax(neg, dim=1)
    return torch.ones_like(s), w_n


def infonce_weights_eq3(s: torch.Tensor, positive: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 for rows with exactly one positive: the gradient of InfoNCE w.r.t. the similarities.

    ``w_p = (1/tau) sum_neg exp(s'/tau) / Z`` on the positive, ``w_n = (1/tau) exp(s/tau) / Z``
    on each negative, with ``Z = exp(s_pos/tau) + sum_neg exp(s'/tau)``.
    """
    prob = torch.softmax(s / tau, dim=1)
    p_pos = (prob * positive).sum(1, keepdim=True)
    w_p = (1 - p_pos) / tau * positive
    w_n = prob / tau * (~positive)
    return w_p, w_n


class Relation(str, Enum):
    """The three label relations of a pair (y, p) in Proposition 1."""

    SAME_INSTANCE = "same_instance"  # I_self = 1, I_full = 1 (Eq. 20)
    SAME_CLASS = "same_class"  # I_self = 0, I_full = 1 (Eq. 21)
    DIFFERENT_CLASS = "different_class"  # I_self = 0, I_full = 0 (Eq. 22)


def pair_objective_eq17(
    y: torch.Tensor, p: torch.Tensor, W_g: torch.Tensor, W_h: torch.Tensor, relation: Relation,
    w_p_self: float, w_n_self: float, w_p_full: float, w_n_full: float,
) -> torch.Tensor:
    """J^O(y, p) of Eq. 17 with s(a, b) = a^T b, y^self = W_g y, y^full = W_h W_g y (Eq. 8)."""
    i_self = 1.0 if relation is Relation.SAME_INSTANCE else 0.0
    i_full = 0.0 if relation is Relation.DIFFERENT_CLASS else 1.0
    y_self, p_self = W_g @ y, W_g @ p
    y_full, p_full = W_h @ y_self, W_h @ p_self
    s_self, s_full = y_self @ p_self, y_full @ p_full
    return (
        -i_self * w_p_self * s_self + (1 - i_self) * w_n_self * s_self
        - i_full * w_p_full * s_full + (1 - i_full) * w_n_full * s_full
    )


def proposition1_gradient(
    p: torch.Tensor, W_g: torch.Tensor, W_h: torch.Tensor, relation: Relation,
    w_p_self: float, w_n_self: float, w_p_full: float, w_n_full: float,
) -> torch.Tensor:
    """dJ^O/dy in closed form: Eq. 20, 21 or 22 depending on ``relation``."""
    eye = torch.eye(W_g.shape[0], dtype=W_g.dtype)
    hh = W_h.T @ W_h
    if relation is Relation.SAME_INSTANCE:
        inner = -w_p_self * eye - w_p_full * hh  # Eq. 20
    elif relation is Relation.SAME_CLASS:
        inner = w_n_self * eye - w_p_full * hh  # Eq. 21
    else:
        inner = w_n_self * eye + w_n_full * hh  # Eq. 22
    return W_g.T @ inner @ W_g @ p


def corollary1_weights(
    p: torch.Tensor, W_g: torch.Tensor, W_h: torch.Tensor,
    w_p_self: float, w_n_self: float, w_p_full: float, w_n_full: float,
) -> dict[Relation, float]:
    """The loss weights of Eq. 27-29 with alpha = |W_g p|^2 and beta = |W_h W_g p|^2 (Eq. 23)."""
    alpha = float((W_g @ p).pow(2).sum())
    beta = float((W_h @ W_g @ p).pow(2).sum())
    return {
        Relation.SAME_INSTANCE: -w_p_self * alpha - w_p_full * beta,  # Eq. 27
        Relation.SAME_CLASS: w_n_self * alpha - w_p_full * beta,  # Eq. 28
        Relation.DIFFERENT_CLASS: w_n_self * alpha + w_n_full * beta,  # Eq. 29
    }
