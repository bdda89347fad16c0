"""The loss functions of the task spaces: ``info_nce`` (instance term of Eq. 34), ``class_cross_entropy``
(class term of Eq. 34) and ``masked_patch_loss`` (J^mask of Eq. 36), checked against hand formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from opera.backbones import create_backbone
from opera.supervisions.losses import class_cross_entropy, info_nce, masked_patch_loss
from opera.supervisions.masked import patchify, random_patch_mask
from opera.supervisions.similarity import infonce_weights_eq3, softmax_objective_eq13


def _ctr_by_hand(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo-v3's ctr(q, k): CE(normalize(q) normalize(k)^T / tau, arange) * 2 tau (Eq. 34, instance term)."""
    q, k = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = q @ k.T / t
    n = q.shape[0]
    log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
    return -log_prob[torch.arange(n), torch.arange(n)].mean() * 2 * t


@pytest.mark.parametrize("t", [0.1, 0.2, 1.0])
def test_info_nce_is_mocov3_ctr(t):
    """Eq. 34, instance term: -log exp(q_i k_i / tau) / sum_j exp(q_i k_j / tau), averaged, times 2 tau."""
    q, k = torch.randn(10, 16, dtype=torch.float64), torch.randn(10, 16, dtype=torch.float64)
    assert torch.allclose(info_nce(q, k, t), _ctr_by_hand(q, k, t))
    assert torch.allclose(info_nce(q, k, t, gather_distributed=False), info_nce(q, k, t))
    # q and k are L2-normalised inside: their norms do not matter
    assert torch.allclose(info_nce(3.0 * q, 0.25 * k, t), info_nce(q, k, t))
    # and the positive really is key i: a shuffled key order changes the loss
    assert not torch.allclose(info_nce(q, k.roll(1, 0), t), info_nce(q, k, t))


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_info_nce_gradient_through_similarities_is_eq3(t):
    """dL/ds for s = q k^T is (2 tau / N)(-w_p + w_n) of Eq. 3; dL/dq is that, through the L2 norm."""
    n, d = 8, 12
    q = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    (g_q,) = torch.autograd.grad(info_nce(q, k, t), q)
    s = (q @ k.T).detach()
    pos = torch.eye(n, dtype=torch.bool)
    w_p, w_n = infonce_weights_eq3(s, pos, t)
    d_s = (2 * t / n) * (-w_p + w_n)  # Eq. 3, scaled by MoCo-v3's 2 tau and the batch mean
    d_qn = d_s @ k  # chain rule through s = q_n k^T
    expected = d_qn - (d_qn * q).sum(1, keepdim=True) * q  # Jacobian of normalize at |q| = 1
    assert torch.allclose(g_q, expected)


def test_info_nce_sends_no_gradient_to_the_keys():
    """Keys are stop-gradient (MoCo, Appendix B) - in one process exactly as when gathered from many ranks."""
    q = torch.randn(6, 8, requires_grad=True)
    k = torch.randn(6, 8, requires_grad=True)
    for gather in (True, False):
        loss = info_nce(q, k, 0.2, gather_distributed=gather)
        (g_q,) = torch.autograd.grad(loss, q)
        assert g_q.abs().sum() > 0
        # the keys take no part in the graph: allow_unused returns None for them
        assert torch.autograd.grad(info_nce(q, k, 0.2, gather_distributed=gather), k, allow_unused=True)[0] is None


def test_class_cross_entropy_is_standard_softmax_ce():
    """Class term of Eq. 34 as the official code trains it: CE with the positive in the denominator."""
    logits, labels = torch.randn(9, 7), torch.randint(0, 7, (9,))
    by_hand = -(logits.log_softmax(1)[torch.arange(9), labels]).mean()
    assert torch.allclose(class_cross_entropy(logits, labels), by_hand)
    assert torch.allclose(
        class_cross_entropy(logits, labels, label_smoothing=0.1), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )
    assert not torch.allclose(class_cross_entropy(logits, labels, label_smoothing=0.1), by_hand)


def test_literal_eq13_denominator_is_unbounded_below_but_class_ce_is_not():
    """Why the class term is not Eq. 13/34 verbatim: with the positive out of the denominator the loss
    goes to -inf as the positive logit grows, whereas CE stays >= 0."""
    labels = torch.tensor([0, 1])
    logits = torch.zeros(2, 5)
    logits[0, 0] = logits[1, 1] = 50.0
    pos = F.one_hot(labels, 5).bool()
    assert softmax_objective_eq13(logits, pos) < -90
    assert class_cross_entropy(logits, labels) >= 0


def test_masked_patch_loss_counts_masked_patches_only():
    """J^mask of Eq. 36: mean over masked patches of the per-patch MSE; unmasked patches are free."""
    pred, target = torch.randn(3, 10, 12), torch.randn(3, 10, 12)
    mask = torch.rand(3, 10) < 0.5
    mask[0, 0], mask[0, 1] = True, False
    per_patch = (pred - target).pow(2).mean(-1)
    assert torch.allclose(masked_patch_loss(pred, target, mask), per_patch[mask].mean())
    pred = pred.requires_grad_(True)
    (g,) = torch.autograd.grad(masked_patch_loss(pred, target, mask), pred)
    assert torch.all(g[~mask] == 0) and torch.all(g[mask].abs().sum(-1) > 0)
    changed = pred.detach().clone()
    changed[~mask] += 100.0
    assert torch.allclose(masked_patch_loss(changed, target, mask), masked_patch_loss(pred, target, mask))
    empty = masked_patch_loss(pred, target, torch.zeros(3, 10, dtype=torch.bool))
    assert torch.isfinite(empty) and empty == 0


def test_random_patch_mask_masks_exactly_ratio_per_row():
    m = random_patch_mask(5, 16, 0.4, torch.device("cpu"))
    assert m.dtype == torch.bool and m.shape == (5, 16)
    assert torch.all(m.sum(1) == round(0.4 * 16))
    assert not torch.all(m == m[0])  # different positions per image


def test_patchify_targets_line_up_with_the_vit_tokens():
    """Eq. 36 targets: patch n of ``patchify`` is the pixels that the ViT's token n embeds."""
    vit = create_backbone("vit_tiny", img_size=16, patch_size=4, depth=1)
    pe = vit.patch_embed
    x = torch.randn(2, 3, 16, 16)
    proj = pe.proj.weight.permute(0, 2, 3, 1).reshape(pe.proj.out_channels, -1)  # (D, p*q*c)
    tokens = patchify(x, 4) @ proj.T + pe.proj.bias
    assert torch.allclose(tokens, pe(x), atol=1e-5)
