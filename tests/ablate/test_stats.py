"""The 95% confidence interval: Student t quantiles computed here (no scipy) against values
known independently: closed forms for 1 and 2 degrees of freedom, tabulated quantiles, and the
Cornish-Fisher expansion for large df."""

from __future__ import annotations

import math

import pytest

from opera.ablate.report import mean_ci, t_cdf, t_quantile

# closed forms: df=1 is the Cauchy quantile tan(pi (p - 1/2)); df=2 is (2p-1) / sqrt(2 p (1-p))
CLOSED = {1: math.tan(math.pi * 0.475), 2: 0.95 / math.sqrt(2 * 0.975 * 0.025)}
# t_{0.975, df} as tabulated (e.g. scipy.stats.t.ppf, whose own error is ~1e-10 relative)
TABLE = {1: 12.706204736174698, 2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987,
         5: 2.5705818366147395, 9: 2.2621571627409915, 10: 2.2281388519649385, 29: 2.045229642132703,
         30: 2.0422724563012373, 100: 1.9839715184496334}


@pytest.mark.parametrize("df", sorted(CLOSED))
def test_quantile_matches_closed_forms(df):
    assert t_quantile(0.975, df) == pytest.approx(CLOSED[df], rel=1e-13)


@pytest.mark.parametrize("df", sorted(TABLE))
def test_quantile_matches_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(TABLE[df], rel=1e-9)


def test_quantile_other_levels_and_symmetry():
    assert t_quantile(0.995, 4) == pytest.approx(4.604094871415897, rel=1e-9)
    assert t_quantile(0.95, 9) == pytest.approx(1.8331129326536335, rel=1e-9)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4), rel=1e-14)
    assert t_quantile(0.5, 3) == 0.0
    assert t_cdf(t_quantile(0.975, 7), 7) == pytest.approx(0.975, abs=1e-14)


def test_large_df_tends_to_the_normal_quantile():
    z = 1.959963984540054
    for df in (5_000, 1e6):  # Cornish-Fisher: t = z + (z^3 + z) / (4 df) + O(df^-2)
        assert t_quantile(0.975, df) == pytest.approx(z + (z**3 + z) / (4 * df), rel=1e-7)


def test_mean_ci_three_seeds():
    mean, half, std = mean_ci([90.0, 92.0, 94.0])
    assert mean == pytest.approx(92.0)
    assert std == pytest.approx(2.0)
    assert half == pytest.approx(4.302652729749464 * 2.0 / math.sqrt(3), rel=1e-12)


def test_mean_ci_five_seeds():
    vals = [1.0, 2.0, 4.0, 8.0, 16.0]
    m = sum(vals) / 5
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / 4)
    mean, half, std = mean_ci(vals)
    assert (mean, std) == (pytest.approx(m), pytest.approx(s))
    assert half == pytest.approx(2.7764451051977987 * s / math.sqrt(5), rel=1e-9)


def test_one_seed_has_no_interval():
    assert mean_ci([77.5]) == (77.5, None, None)
    with pytest.raises(ValueError):
        mean_ci([])
