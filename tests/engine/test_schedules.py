"""MoCo-v3's schedules at known points: the lr (linear warmup per iteration, then half cosine to
0) and the EMA momentum of the momentum encoder (``--moco-m-cos``: half cosine from m to 1).

The expected values are the closed forms at points where they are plain numbers (0, lr/2, lr,
(1+m)/2, 1), not values computed by the code under test."""

from __future__ import annotations

import pytest

from opera.engine.optim import ema_momentum_at, lr_at

LR = 0.8


@pytest.mark.parametrize("epoch,expected", [
    (0.0, 0.0),            # start of warmup
    (1.0, LR / 4),         # a quarter of the 4 warmup epochs
    (2.0, LR / 2),         # half of the warmup
    (4.0, LR),             # end of warmup: the peak
    (7.0, LR / 2),         # middle of the cosine (4 + 6/2): cos(pi/2) = 0
    (10.0, 0.0),           # end of training
])
def test_lr_at_warmup_then_half_cosine(epoch, expected):
    assert lr_at(epoch, epochs=10, warmup_epochs=4, lr=LR) == pytest.approx(expected, abs=1e-12)


def test_lr_at_cosine_quarter_points_and_no_warmup():
    # 8 cosine epochs after 2 warmup epochs: a quarter in, lr * (1 + cos(pi/4)) / 2
    assert lr_at(4.0, 10, 2, LR) == pytest.approx(LR * (1 + 2 ** -0.5) / 2, abs=1e-12)
    assert lr_at(8.0, 10, 2, LR) == pytest.approx(LR * (1 - 2 ** -0.5) / 2, abs=1e-12)
    assert lr_at(0.0, 10, 0, LR) == pytest.approx(LR)  # no warmup: starts at the peak
    assert lr_at(5.0, 10, 0, LR) == pytest.approx(LR / 2)


def test_lr_at_is_monotone_up_then_down_per_iteration():
    steps = 40  # 10 epochs of 4 iterations
    lrs = [lr_at(i / 4, 10, 2, LR) for i in range(steps + 1)]
    peak = 8  # iteration 8 = epoch 2
    assert lrs[:peak + 1] == sorted(lrs[:peak + 1]) and len(set(lrs[:peak + 1])) == peak + 1
    assert lrs[peak:] == sorted(lrs[peak:], reverse=True) and len(set(lrs[peak:])) == steps - peak + 1


@pytest.mark.parametrize("epoch,expected", [
    (0.0, 0.99),             # start: the base momentum m
    (50.0, (1 + 0.99) / 2),  # middle: halfway from m to 1
    (100.0, 1.0),            # end: 1 (the momentum encoder stops moving)
    (25.0, 1 - (1 + 2 ** -0.5) / 2 * 0.01),  # a quarter: 1 - (1 + cos(pi/4))/2 * (1 - m)
])
def test_ema_momentum_cosine_from_m_to_one(epoch, expected):
    assert ema_momentum_at(epoch, epochs=100, m=0.99, cosine=True) == pytest.approx(expected, abs=1e-12)


def test_ema_momentum_constant_without_cosine():
    assert [ema_momentum_at(e, 100, 0.996, cosine=False) for e in (0.0, 50.0, 100.0)] == [0.996] * 3
