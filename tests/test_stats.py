"""Tests for efftrain.analysis.stats: t intervals against scipy, paired comparisons by seed (false-positive
rate and power on simulated techniques), the Rao-Wu cluster bootstrap, Satterthwaite degrees of freedom,
variance components and interpolation along a series."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from efftrain.analysis.stats import (
    Interval,
    cluster_bootstrap_weights,
    cluster_robust_cov,
    interpolate_at,
    paired_difference,
    paired_se,
    percentile_interval,
    satterthwaite_df,
    t_interval,
    t_quantile,
    variance_components,
)


# --------------------------------------------------------------------------- t intervals
@pytest.mark.parametrize("values", [[0.12, 0.15, 0.11], [1.0, 2.0, 4.0, 8.0, 16.0], list(np.linspace(-1, 3, 11))])
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_t_interval_matches_scipy(values, level):
    iv = t_interval(values, level)
    n = len(values)
    lo, hi = sps.t.interval(level, n - 1, loc=np.mean(values), scale=sps.sem(values))
    assert iv.estimate == pytest.approx(np.mean(values), rel=1e-12)
    assert iv.lo == pytest.approx(lo, rel=1e-10) and iv.hi == pytest.approx(hi, rel=1e-10)
    assert iv.se == pytest.approx(sps.sem(values), rel=1e-12)
    assert iv.n == n and iv.level == level
    assert t_quantile(level, n - 1) == pytest.approx(sps.t.ppf(0.5 + level / 2, n - 1), rel=1e-12)


def test_t_interval_small_n_and_nonfinite_values():
    one = t_interval([0.3])
    assert one.estimate == 0.3 and math.isnan(one.lo) and math.isnan(one.hi) and one.n == 1
    assert not one.defined and one.includes_zero and one.verdict() == "too few replicates for an interval"
    empty = t_interval([])
    assert empty.n == 0 and math.isnan(empty.estimate)
    iv = t_interval([1.0, None, float("nan"), 2.0, 3.0])  # None / nan left out
    assert iv.n == 3 and iv.estimate == 2.0


def test_interval_verdict():
    assert Interval(0.1, 0.05, 0.15, 0.02, 5).verdict() == "higher"
    assert Interval(-0.1, -0.15, -0.05, 0.02, 5).verdict(lower="less QiD") == "less QiD"
    iv = Interval(0.01, -0.02, 0.04, 0.01, 5)
    assert iv.includes_zero and iv.verdict() == "no detectable difference"
    assert Interval(0.1, 0.0, 0.2, 0.05, 3).includes_zero  # a bound at 0 includes 0
    d = iv.to_dict()
    assert d["lo"] == -0.02 and d["n"] == 5 and d["paired"] == []


def test_paired_se_is_sd_over_sqrt_n():
    d = [0.01, 0.03, -0.02, 0.05, 0.00, 0.02]
    assert paired_se(d) == pytest.approx(np.std(d, ddof=1) / math.sqrt(6), rel=1e-12)
    assert math.isnan(paired_se([0.1]))
    assert paired_se([0.1, None, 0.3, float("inf")]) == pytest.approx(np.std([0.1, 0.3], ddof=1) / math.sqrt(2))


# --------------------------------------------------------------------------- paired comparisons
def test_paired_difference_uses_common_seeds_and_reports_them():
    a = {0: 0.30, 1: 0.25, 2: 0.40, 5: 1.0}
    b = {0: 0.20, 1: 0.20, 2: 0.30, 3: 0.9, 4: None}
    iv = paired_difference(a, b)
    assert iv.paired == (0, 1, 2) and iv.n == 3
    ref = t_interval([0.10, 0.05, 0.10])
    assert (iv.estimate, iv.lo, iv.hi) == pytest.approx((ref.estimate, ref.lo, ref.hi))
    rel = paired_difference(a, b, relative=True)
    assert rel.estimate == pytest.approx(np.mean([0.5, 0.25, 1 / 3]))
    assert "relative" in rel.method and rel.paired == (0, 1, 2)


def _paired_experiments(n_exp, n_seeds, effect, rng):
    """Two techniques evaluated on the same seeds: a seed effect shared by both (sd 30 % of the QiD
    level, the large seed-to-seed spread of PolyPythias), and a technique-specific scatter (sd 0.01 nats)."""
    calls = 0
    for _ in range(n_exp):
        seed_effect = 0.3 * 0.2 * rng.standard_normal(n_seeds)  # shared: cancels in the pairing
        a = 0.2 + seed_effect + 0.01 * rng.standard_normal(n_seeds)
        b = 0.2 + effect + seed_effect + 0.01 * rng.standard_normal(n_seeds)
        iv = paired_difference(dict(enumerate(b)), dict(enumerate(a)))
        calls += not iv.includes_zero
    return calls / n_exp


def test_paired_difference_false_positive_rate_and_power():
    rng = np.random.default_rng(2024)
    fp = _paired_experiments(500, 3, 0.0, rng)  # two identical techniques, 3 seeds each
    fp5 = _paired_experiments(500, 5, 0.0, rng)
    power = _paired_experiments(500, 5, 0.03, rng)  # a real difference of 0.03 nats (3 x the scatter)
    print(f"\npaired by seed: 'different' in {fp:.1%} (3 seeds) / {fp5:.1%} (5 seeds) of identical pairs; "
          f"power {power:.1%} for a 0.03-nat difference with 5 seeds")
    assert fp <= 0.07 and fp5 <= 0.07
    assert power >= 0.85
    # the unpaired comparison of the same data would drown in the seed effect: pairing is what buys power
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(200):
        s = 0.06 * rng.standard_normal(5)
        a, b = 0.2 + s + 0.01 * rng.standard_normal(5), 0.23 + s + 0.01 * rng.standard_normal(5)
        lo, hi = sps.ttest_ind(b, a).confidence_interval(0.95)
        hits += not (lo <= 0 <= hi)
    assert hits / 200 < power / 2


# --------------------------------------------------------------------------- cluster bootstrap
def test_rao_wu_weights_give_unbiased_variance_of_a_mean():
    """3 runs in each of 4 cells (the fit's design): the replicate variance of the stratified mean matches
    the unbiased estimator Σ_h s_h²/n_h/H² (the plain bootstrap would give 2/3 of it)."""
    rng = np.random.default_rng(0)
    runs = [f"n{h}-s{s}" for h in range(4) for s in range(3)]
    cluster = np.repeat(runs, 5)  # 5 rows per run
    strata = np.repeat([r.split("-")[0] for r in runs], 5)
    y = rng.normal(size=12).repeat(5)  # one value per run
    w, df = cluster_bootstrap_weights(cluster, 40000, np.random.default_rng(1), strata)
    assert w.shape == (40000, 60) and df == 8
    per_cell = y.reshape(4, 15)
    means = np.stack([(w[:, 15 * h:15 * (h + 1)] * per_cell[h]).sum(1) / 15 for h in range(4)]).mean(0)
    run_vals = y[::5].reshape(4, 3)
    unbiased = np.sum(run_vals.var(axis=1, ddof=1) / 3) / 16
    assert np.var(means) == pytest.approx(unbiased, rel=0.03)
    assert np.allclose(w.reshape(40000, 12, 5).std(axis=2), 0)  # rows of a run share its weight
    assert np.allclose(w.sum(1), 60)  # each cell keeps its total weight
    with pytest.raises(ValueError, match="at least 2"):
        cluster_bootstrap_weights(["a", "b", "c"], 10, rng, strata=["x", "x", "y"])


def test_cluster_bootstrap_is_deterministic():
    ids = ["a", "a", "b", "c", "c", "d"]
    w1, _ = cluster_bootstrap_weights(ids, 50, np.random.default_rng(3))
    w2, _ = cluster_bootstrap_weights(ids, 50, np.random.default_rng(3))
    w3, _ = cluster_bootstrap_weights(ids, 50, np.random.default_rng(4))
    np.testing.assert_array_equal(w1, w2)
    assert not np.array_equal(w1, w3)


def test_cluster_robust_cov_of_a_mean():
    """For the mean of one value per cluster, the sandwich is the usual s²/G."""
    y = np.array([1.0, 2.0, 4.0, 3.0])
    cov, df = cluster_robust_cov((y - y.mean())[:, None] / 4, np.eye(1), ["a", "b", "c", "d"])
    assert df == 3 and cov[0, 0] == pytest.approx(np.var(y, ddof=1) / 4)


def test_satterthwaite_df():
    assert satterthwaite_df(np.ones(12), np.repeat(range(4), 3)) == pytest.approx(8)
    assert satterthwaite_df(np.ones(12)) == pytest.approx(11)
    # a slope over 4 equally spaced cells leans on the outer ones: ~4.9 df, not 8
    c2 = np.repeat([2.25, 0.25, 0.25, 2.25], 3)
    assert satterthwaite_df(c2, np.repeat(range(4), 3)) == pytest.approx(225 / 46.125)
    # and it matches a simulation of the estimator's spread: 2·E²/Var
    rng = np.random.default_rng(0)
    z = rng.normal(size=(200000, 12)) * np.sqrt(c2)
    zc = z.reshape(-1, 4, 3)
    v = (1.5 * ((zc - zc.mean(2, keepdims=True)) ** 2).sum(2)).sum(1)
    assert 2 * v.mean() ** 2 / v.var() == pytest.approx(225 / 46.125, rel=0.03)


def test_percentile_interval():
    r = np.arange(1001, dtype=float)
    assert percentile_interval(r, 0.95) == pytest.approx((25.0, 975.0))
    lo, hi = percentile_interval(np.column_stack([r, 2 * r]), 0.9)
    np.testing.assert_allclose(lo, [50, 100]) and np.testing.assert_allclose(hi, [950, 1900])
    assert all(math.isnan(x) for x in percentile_interval([1.0, np.nan]))


# --------------------------------------------------------------------------- variance components
def test_variance_components_recover_relative_and_additive_noise():
    rng = np.random.default_rng(0)
    f = np.geomspace(1e-3, 2.0, 4000)
    r = np.sqrt(4.9e-7 + 0.01 * f**2) * rng.standard_normal(f.size)
    tau2, sigma2 = variance_components(r, f, se2=np.full(f.size, 4.9e-7))
    assert math.sqrt(tau2) == pytest.approx(0.1, rel=0.05) and sigma2 == 0.0
    tau2, sigma2 = variance_components(r, f)  # no se given: the additive part is estimated too
    assert math.sqrt(tau2) == pytest.approx(0.1, rel=0.05)
    assert math.sqrt(sigma2) == pytest.approx(7e-4, rel=0.1)
    assert variance_components(1e-4 * rng.standard_normal(50), np.ones(50), se2=np.full(50, 1.0))[0] == 0.0


# --------------------------------------------------------------------------- interpolation
def test_interpolate_at_hand_computed():
    # a run's checkpoints: 16-bit loss falls as it trains, QiD rises; given out of order
    loss16 = [3.0, 4.0, 3.5, 5.0]
    qid = [0.30, 0.10, 0.20, 0.05]
    assert interpolate_at(loss16, qid, 3.75) == pytest.approx(0.15)  # halfway between (3.5, .2) and (4, .1)
    assert interpolate_at(loss16, qid, 4.5) == pytest.approx(0.075)
    assert interpolate_at(loss16, qid, 3.0) == pytest.approx(0.30)  # at an end point
    assert math.isnan(interpolate_at(loss16, qid, 2.9)) and math.isnan(interpolate_at(loss16, qid, 5.1))
    np.testing.assert_allclose(interpolate_at(loss16, qid, [3.25, 4.0, 6.0]), [0.25, 0.10, np.nan])
    assert interpolate_at([1.0, 1.0, 2.0], [0.0, 1.0, 2.0], 1.5) == pytest.approx(1.25)  # repeats averaged
    assert interpolate_at([1.0, np.nan, 2.0], [1.0, 5.0, 3.0], 1.5) == pytest.approx(2.0)  # nan pair dropped
    assert math.isnan(interpolate_at([], [], 1.0))
