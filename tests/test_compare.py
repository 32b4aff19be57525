"""compare.py statistics against hand-computed values."""

import math

import pytest

from compare import binomial_se, ema_of_best, paired_delta, t_quantile


@pytest.mark.parametrize("df,expected", [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)])
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3)


def test_paired_delta_all_wins():
    d = paired_delta([1.0, 2.0, 6.0])
    half = 4.303 * math.sqrt(7) / math.sqrt(3)
    assert d["mean"] == pytest.approx(3.0)
    assert d["sd"] == pytest.approx(math.sqrt(7))
    assert d["ci_low"] == pytest.approx(3 - half, abs=2e-3)
    assert d["ci_high"] == pytest.approx(3 + half, abs=2e-3)
    assert (d["wins"], d["seeds"]) == (3, 3)


def test_paired_delta_loss_and_tie():
    d = paired_delta([-2.0, 0.0, 5.0, 1.0])  # mean 1, sd sqrt(26/3), t_{0.975,3} = 3.182
    half = 3.182 * math.sqrt(26 / 3) / 2
    assert d["mean"] == pytest.approx(1.0)
    assert d["ci_low"] == pytest.approx(1 - half, abs=2e-3)
    assert d["wins"] == 2


def test_paired_delta_one_seed_has_no_interval():
    d = paired_delta([2.5])
    assert d["mean"] == 2.5 and d["ci_low"] is None and d["ci_high"] is None and d["wins"] == 1


def test_ema_of_best_hand_case():
    # 10; 0.3*max(5,10)+0.7*10 = 10; 0.3*20+0.7*10 = 13
    assert ema_of_best([10, 5, 20]) == pytest.approx([10, 10, 13])


def test_binomial_se():
    assert binomial_se(0.3, 512) == pytest.approx(100 * math.sqrt(0.21 / 512))
