"""Intervals and minimum detectable effects for the held-out comparison, against hand-checked cases."""

from __future__ import annotations

import math

import pytest

from crl_exp.stats import mde_paired_binary, mde_paired_mean, wilson_interval


def test_wilson_interval_known_values_and_the_degenerate_cases():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # a bootstrap would say [0, 0]
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_interval(1, 200)
    assert 0 < lo < 0.005 < hi < 0.03
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_mde_of_paired_proportions_inverts_connors_sample_size():
    # Connor (1987): p_d = 0.2, delta = 0.1, alpha 0.05 two-sided, power 0.8 -> n = 155 pairs
    needed = (1.959964 * math.sqrt(0.2) + 0.841621 * math.sqrt(0.2 - 0.01)) ** 2 / 0.01
    assert math.ceil(needed) == 155
    assert mde_paired_binary(155, 0.2) == pytest.approx(0.1, abs=1e-3)
    assert mde_paired_binary(620, 0.2) < mde_paired_binary(155, 0.2) / 1.8  # ~1/sqrt(n)
    assert math.isnan(mde_paired_binary(3, 0.05))  # too few pairs to detect anything possible
    assert math.isnan(mde_paired_binary(100, 0.0))


def test_mde_of_a_paired_mean():
    assert mde_paired_mean(100, 1.0) == pytest.approx((1.959964 + 0.841621) / 10, abs=1e-5)


def test_heldout_power_reports_the_mde_at_the_assumed_and_the_observed_discordance():
    from crl_exp.evaluation.comparison import detectable_effects

    base = [{"correct": float(i % 4 == 0), "reward": 0.0} for i in range(200)]
    crl = [{"correct": float(i % 4 in (0, 1)), "reward": 0.1 * (i % 3)} for i in range(200)]
    power = detectable_effects(crl, base, [str(i) for i in range(200)], assumed_discordance=0.2)
    assert power["n"] == 200 and power["discordance"] == pytest.approx(0.25) and power["design_effect"] == 1.0
    assert power["mde_correct"] == pytest.approx(mde_paired_binary(200, 0.2))
    assert power["mde_correct_observed"] == pytest.approx(mde_paired_binary(200, 0.25))
    assert 0 < power["mde_reward"] < 0.1


def test_seed_aggregate_mean_spread_and_a_ci_with_seed_variance():
    from crl_exp.analysis.sweep_table import seed_aggregate
    from crl_exp.stats import t_975

    z = 1.959963984540054
    rows = [{"task": "bbq", "layer": "12", "masking": "adaptive", "seed": s, "delta_vs_static": d,
             "delta_vs_static_ci_low": d - z * 0.02, "delta_vs_static_ci_high": d + z * 0.02}
            for s, d in ((0, 0.01), (1, 0.03), (2, 0.05))]
    (agg,) = seed_aggregate(rows)
    assert agg["seeds"] == "0,1,2" and agg["crl_minus_static"] == pytest.approx(0.03)
    assert agg["crl_minus_static_sd_seeds"] == pytest.approx(0.02)
    # example sampling (shared examples: not divided by the seeds) at z, between-seed spread / n_seeds at t_2
    half = math.sqrt((z * 0.02) ** 2 + (t_975(2) * 0.02 / math.sqrt(3)) ** 2)
    assert agg["crl_minus_static_ci_low"] == pytest.approx(0.03 - half)
    assert agg["crl_minus_static_ci_high"] == pytest.approx(0.03 + half)
    assert "crl_minus_none" not in agg  # no such deltas logged

