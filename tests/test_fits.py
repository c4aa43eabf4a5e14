"""Tests for efftrain.analysis.fits: the weighted QiD fits of the Ouyang and Kumar laws.

Validation on data simulated from a known law with the noise of a real grid (3 seeds x 4 sizes x 6 token
counts x bits 2/3/4/8, a 10 % multiplicative effect shared by all rows of a run, additive window noise
N(0, (7e-4 nats)^2) with qid_se given): interval coverage and bias over hundreds of experiments; then exact
recovery without noise, the default exclusions, identifiability, grouping, formatting and loading."""

import csv
import json
import math
import sqlite3

import numpy as np
import pytest

from efftrain.tables import load_rows
from efftrain.analysis.fits import (
    PUBLISHED,
    PUBLISHED_NOTES,
    FitResult,
    fit_law,
    fit_table,
    format_param,
    format_published,
    format_table,
    table_to_dict,
    tokens_to_reach,
    tokens_to_reach_ci,
)

# published GPTQ-on-Pythia fit (Ouyang et al. 2024, arXiv 2411.17691)
OUYANG = {"k": 0.017, "alpha": 0.2261, "beta": 0.5251, "gamma": 5.4967}
# illustrative Kumar et al. 2024 (arXiv 2411.04330) post-train term
KUMAR = {"C": 0.3, "gamma_D": 0.5, "gamma_N": 0.5, "gamma_post": 1.0}
TRUE = {"ouyang": OUYANG, "kumar": KUMAR}
BITS = (2, 3, 4, 8)


def law_qid(law, n, d, p, truth=None):
    if law == "ouyang":
        t = truth or OUYANG
        return t["k"] * d ** t["beta"] / (n ** t["alpha"] * p ** t["gamma"])
    t = truth or KUMAR
    return t["C"] * d ** t["gamma_D"] / n ** t["gamma_N"] * math.exp(-p / t["gamma_post"])


def grid_rows(law, noise_sigma=0.0, seed=0, n_sizes=6, n_tokens=6, bits=BITS, **extra):
    """N in [1e7, 1e10], D in [1e9, 1e12] (log-spaced), P in bits; multiplicative log-normal noise per row;
    no run ids and no qid_se (the shape of old tables)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in np.logspace(7, 10, n_sizes):
        for d in np.logspace(9, 12, n_tokens):
            for p in bits:
                q = law_qid(law, n, d, p) * math.exp(noise_sigma * rng.standard_normal())
                rows.append({"n_params": float(n), "tokens": float(d), "bits": p, "qid": q, **extra})
    return rows


# The simulated grid: N spans 30x (4 sizes), D spans 8x (6 checkpoints per run), 3 seeds per size.
TRUTH = {"k": 0.017, "beta": 0.53, "alpha": 0.23, "gamma": 5.5}  # 2-bit QiD 0.25-1.6 nats, 8-bit 1e-4-8e-4
SIZES = tuple(np.geomspace(1e7, 3e8, 4))
TOKENS = tuple(np.geomspace(1e9, 8e9, 6))
SE = 7e-4  # nats: the paired standard error of one checkpoint's QiD


def design_rows(rng, law="ouyang", truth=TRUTH, sizes=SIZES, tokens=TOKENS, bits=BITS, seeds=3, run_sd=0.1,
                add_sd=SE, se=True, warmup_steps=None, tokens_per_step=1e6):
    """Rows of a simulated grid: run = (size, seed); QiD = law * exp(run_sd * z_run) + add_sd * z_row."""
    rows = []
    for n in sizes:
        for s in range(seeds):
            u = math.exp(run_sd * rng.standard_normal())
            for d in tokens:
                for p in bits:
                    r = {"run_id": f"N{n:.3g}-seed{s}", "seed": s, "n_params": float(n), "tokens": float(d),
                         "bits": p, "qid": law_qid(law, n, d, p, truth) * u + add_sd * rng.standard_normal()}
                    if se:
                        r["qid_se"] = SE
                    if warmup_steps is not None:
                        r.update(step=int(d / tokens_per_step), warmup_steps=warmup_steps)
                    rows.append(r)
    return rows


def _log_ols(rows):
    """The old fit: least squares on log QiD of the rows with QiD > 0 (returns beta, alpha, gamma)."""
    q = np.array([r["qid"] for r in rows])
    ok = q > 0
    X = np.column_stack([np.ones(len(q))] + [s * np.log([r[c] for r in rows])
                                             for s, c in ((1, "tokens"), (-1, "n_params"), (-1, "bits"))])
    return np.linalg.lstsq(X[ok], np.log(q[ok]), rcond=None)[0][1:]


# (1) validation on simulated grids -----------------------------------------------------------
def test_intervals_cover_the_truth_and_estimates_are_unbiased():
    """250 simulated grids: 95 % intervals of beta, alpha, gamma cover the truth in 90-98 % of them and
    the mean relative error of each estimate is within 5 %. The old log-space fit is biased on the
    same data."""
    rng = np.random.default_rng(20241126)
    names = ("beta", "alpha", "gamma")
    n_exp = 250
    covered = {k: 0 for k in names}
    rel = {k: [] for k in names}
    log_k_err, old = [], []
    for e in range(n_exp):
        rows = design_rows(rng)
        res = fit_law(rows, "ouyang", n_boot=200, seed=e)
        assert res.excluded == {"noise_floor": 72}  # the 8-bit rows, every experiment
        for k in names:
            lo, hi = res.ci[k]
            covered[k] += lo <= TRUTH[k] <= hi
            rel[k].append(res.params[k] / TRUTH[k] - 1)
        log_k_err.append(math.log(res.params["k"] / TRUTH["k"]))
        if e < 50:
            old.append(_log_ols(rows) / np.array([TRUTH[k] for k in names]) - 1)
    cover = {k: covered[k] / n_exp for k in names}
    bias = {k: float(np.mean(rel[k])) for k in names}
    old_bias = dict(zip(names, np.mean(old, axis=0)))
    print(f"\n{n_exp} experiments, df {res.df}: coverage " + ", ".join(f"{k} {cover[k]:.1%}" for k in names)
          + "; mean relative error " + ", ".join(f"{k} {bias[k]:+.2%}" for k in names)
          + f"; log k error {np.mean(log_k_err):+.3f}; old log-OLS fit: "
          + ", ".join(f"{k} {old_bias[k]:+.1%}" for k in names))
    for k in names:
        assert 0.90 <= cover[k] <= 0.98, (k, cover[k])
        assert abs(bias[k]) < 0.05, (k, bias[k])
    assert abs(np.mean(log_k_err)) < 0.1
    assert old_bias["beta"] < -0.1  # what the rewrite fixed: the log fit loses 10+ % of beta here


def test_kumar_intervals_cover_the_truth():
    truth = {"C": 0.5, "gamma_D": 0.5, "gamma_N": 0.5, "gamma_post": 1.0}
    rng = np.random.default_rng(5)
    n_exp = 200
    covered = dict.fromkeys(truth, 0)
    rel = {k: [] for k in truth}
    for e in range(n_exp):
        res = fit_law(design_rows(rng, "kumar", truth), "kumar", n_boot=200, seed=e)
        for k in truth:
            lo, hi = res.ci[k]
            covered[k] += lo <= truth[k] <= hi
            rel[k].append(res.params[k] / truth[k] - 1)
    print("\nkumar: coverage " + ", ".join(f"{k} {covered[k] / n_exp:.1%}" for k in truth)
          + "; mean relative error " + ", ".join(f"{k} {np.mean(rel[k]):+.2%}" for k in truth))
    for k in ("gamma_D", "gamma_N", "gamma_post"):
        assert 0.90 <= covered[k] / n_exp <= 0.98 and abs(np.mean(rel[k])) < 0.05, k


def test_bootstrap_and_sandwich_standard_errors_agree():
    res = fit_law(design_rows(np.random.default_rng(3)), "ouyang", n_boot=1000, seed=0)
    for k in ("beta", "alpha", "gamma"):
        assert res.se[k] == pytest.approx(res.se_sandwich[k], rel=0.15), k
    assert res.n_clusters == 12 and res.n_strata == 4 and res.df_clusters == 8 and res.cluster_key == "run_id"
    assert 4 < res.df["alpha"] < 6 < res.df["beta"] <= 8  # alpha is a contrast of 4 sizes: fewer df
    assert "stratified by N (4 cells)" in res.ci_method
    assert res.tau == pytest.approx(0.1, abs=0.06)


def test_bootstrap_is_deterministic_and_seed_dependent():
    rows = design_rows(np.random.default_rng(3))
    a = fit_law(rows, "ouyang", n_boot=100, seed=7)
    b = fit_law(rows, "ouyang", n_boot=100, seed=7)
    c = fit_law(rows, "ouyang", n_boot=100, seed=8)
    assert a.ci == b.ci and a.se == b.se
    np.testing.assert_array_equal(a.boot, b.boot)
    assert a.ci != c.ci
    assert a.params == c.params  # the point estimate does not depend on the seed


# (2) exact recovery --------------------------------------------------------------------------
@pytest.mark.parametrize("law", ["ouyang", "kumar"])
def test_noiseless_recovery_to_1e_6(law):
    res = fit_law(grid_rows(law), law, n_boot=0)
    for name, true in TRUE[law].items():
        assert res.params[name] == pytest.approx(true, rel=1e-6), name
    assert res.r2 == pytest.approx(1.0, abs=1e-12)
    assert res.rmse < 1e-9
    assert res.n_points == 6 * 6 * 4 and res.n_dropped == 0 and res.se_mode == "estimated"
    assert res.cluster_key is None and "no run id" in res.ci_method


def test_noiseless_recovery_with_runs_and_se():
    rows = design_rows(np.random.default_rng(0), run_sd=0.0, add_sd=0.0)
    res = fit_law(rows, "ouyang", n_boot=50)
    for name, true in TRUTH.items():
        assert res.params[name] == pytest.approx(true, rel=1e-6), name
        lo, hi = res.ci[name]
        assert hi - lo < 1e-6 * abs(true) and lo == pytest.approx(true, rel=1e-6)
    assert res.tau < 1e-6 and res.se_mode == "given"


# (3) exclusions ------------------------------------------------------------------------------
def test_noise_floor_is_decided_per_bit_width_and_qid_le_0_rows_are_data():
    """The old behaviour is gone: no row is dropped for its own value. 8-bit (median |QiD|/se < 2) goes
    as a whole bit width, counted and listed; 4-bit rows with QiD <= 0 stay in the fit."""
    rows = design_rows(np.random.default_rng(11))
    four = [r for r in rows if r["bits"] == 4]
    four[0]["qid"], four[1]["qid"], four[2]["qid"] = 0.0, -1e-3, -2e-4
    res = fit_law(rows, "ouyang", n_boot=0)
    assert res.excluded == {"noise_floor": 72} and res.n_dropped == 72
    assert res.n_points == len(rows) - 72  # the three 4-bit rows with QiD <= 0 are counted in
    assert {r.bits for r in res.excluded_rows} == {8} and len(set(res.excluded_rows)) == 72
    assert {r.reason for r in res.excluded_rows} == {"noise_floor"}
    first = sorted(res.excluded_rows)[0]
    assert first.run_id == "N1e+07-seed0" and first.tokens == TOKENS[0]
    assert str(first) == "noise_floor: run N1e+07-seed0 1.000e+09 tokens 8-bit"
    assert res.bits_snr[8.0] < 2 < res.bits_snr[4.0]
    assert any("bits 8 left out as the noise floor" in n for n in res.notes)
    assert "excluded noise_floor 72" in format_table(res)
    keep = fit_law(rows, "ouyang", n_boot=0, noise_floor=None)
    assert keep.excluded == {} and keep.n_points == len(rows)


def test_floor_without_se_uses_the_sign_of_qid_per_bit_width():
    rows = design_rows(np.random.default_rng(4), se=False)
    res = fit_law(rows, "ouyang", n_boot=0)
    assert res.excluded == {"noise_floor": 72} and res.se_mode == "estimated"
    assert res.sigma_add > 0 and res.params["gamma"] == pytest.approx(TRUTH["gamma"], rel=0.05)


def test_warmup_rows_excluded_and_listed():
    rows = design_rows(np.random.default_rng(2), warmup_steps=1500)  # step = tokens / 1e6
    n_warm = sum(r["step"] <= 1500 for r in rows)
    assert n_warm == 12 * 4  # the first checkpoint of every run, all bit widths
    res = fit_law(rows, "ouyang", n_boot=0)
    assert res.excluded["warmup"] == n_warm and res.excluded["noise_floor"] == 12 * 5
    warm = [r for r in res.excluded_rows if r.reason == "warmup"]
    assert len(warm) == n_warm and all(r.step <= 1500 for r in warm)
    kept = fit_law(rows, "ouyang", n_boot=0, exclude_warmup=False)
    assert "warmup" not in kept.excluded


def test_missing_se_imputed_with_the_median():
    rows = design_rows(np.random.default_rng(6))
    for r in rows[:10]:
        r["qid_se"] = None
    rows[10]["qid_se"] = float("nan")
    res = fit_law(rows, "ouyang", n_boot=0)
    assert res.se_mode == "imputed" and res.n_se_imputed == 11  # imputed before the floor is decided
    assert any("median qid_se" in n for n in res.notes)


def test_nonfinite_qid_rows_excluded_and_counted():
    rows = grid_rows("ouyang")
    bad = [dict(rows[0], qid=None), dict(rows[1], qid=float("nan"))]
    res = fit_law(rows + bad, "ouyang", n_boot=0)
    assert res.excluded == {"nonfinite_qid": 2} and res.n_points == len(rows)
    for name, true in OUYANG.items():
        assert res.params[name] == pytest.approx(true, rel=1e-6)


# (4) identifiability -------------------------------------------------------------------------
def test_narrow_n_span_leaves_alpha_not_identified():
    rows = design_rows(np.random.default_rng(8), sizes=(1e8, 1.5e8, 2.5e8))  # 2.5x < 4x
    res = fit_law(rows, "ouyang", n_boot=200)
    assert res.identified["alpha"] is False and "spans 2.5x" in res.not_identified["alpha"]
    assert res.params["alpha"] == 0.0 and all(math.isnan(x) for x in res.ci["alpha"])
    assert format_param(res, "alpha") == "not identified"
    assert "alpha not identified" in format_table(res)
    for k in ("beta", "gamma"):  # what the data do identify is still right
        assert res.identified[k] and res.ci[k][0] <= TRUTH[k] <= res.ci[k][1]
    wide = fit_law(rows, "ouyang", n_boot=0, min_span=2.0)  # the threshold is an option
    assert wide.identified["alpha"]


def test_two_bit_widths_leave_kumar_gamma_post_not_identified():
    rows = grid_rows("ouyang", bits=(2, 4))
    res = fit_law(rows, "kumar", n_boot=20)
    assert not res.identified["gamma_post"] and "reparametrisation" in res.not_identified["gamma_post"]
    assert format_param(res, "gamma_post") == "not identified"
    # fitted as a nuisance: with two bit widths Kumar is Ouyang, so gamma_D = beta and gamma_N = alpha
    assert res.params["gamma_D"] == pytest.approx(OUYANG["beta"], rel=1e-6)
    assert res.params["gamma_N"] == pytest.approx(OUYANG["alpha"], rel=1e-6)
    assert res.identified["gamma_D"] and res.identified["gamma_N"]
    three = fit_law(grid_rows("kumar", bits=(2, 3, 4)), "kumar", n_boot=0)
    assert three.identified["gamma_post"] and three.params["gamma_post"] == pytest.approx(1.0, rel=1e-6)


def test_single_bit_width_or_token_count_held_at_zero():
    rows = grid_rows("ouyang", bits=(4,))
    res = fit_law(rows, "ouyang", n_boot=0)
    assert not res.identified["gamma"] and res.params["gamma"] == 0.0
    assert "single bit width" in res.not_identified["gamma"]
    # the prefactor absorbs 4^-gamma: the law still reproduces the data exactly
    assert res.params["k"] == pytest.approx(OUYANG["k"] / 4 ** OUYANG["gamma"], rel=1e-6)
    for name in ("alpha", "beta"):
        assert res.params[name] == pytest.approx(OUYANG[name], rel=1e-6)
    fixed = fit_law(rows, "ouyang", n_boot=20, fixed={"gamma": OUYANG["gamma"]})
    assert fixed.params["gamma"] == OUYANG["gamma"] and fixed.ci["gamma"] == (OUYANG["gamma"],) * 2
    assert fixed.identified["gamma"] and format_param(fixed, "gamma").endswith("(fixed)")
    assert fixed.params["k"] == pytest.approx(OUYANG["k"], rel=1e-6)
    one_d = fit_law(grid_rows("ouyang", n_tokens=1), "ouyang", n_boot=0)
    assert not one_d.identified["beta"] and "1 value" in one_d.not_identified["beta"]


# (5) derived quantities ----------------------------------------------------------------------
@pytest.mark.parametrize("law", ["ouyang", "kumar"])
def test_tokens_to_reach_inverts_predict(law):
    res = fit_law(grid_rows(law, noise_sigma=0.05, seed=2), law, n_boot=50)
    n = np.array([3e7, 1e9, 5e9])
    p = np.array([3, 4, 8])
    d = np.array([2e9, 7e10, 4e11])
    q = res.predict(n, d, p)
    np.testing.assert_allclose(tokens_to_reach(res, q, n, p), d, rtol=1e-10)
    # scalar in -> float out, and the crossing point is where predict hits the threshold
    d_star = tokens_to_reach(res, 0.05, 1e9, 4)
    assert isinstance(d_star, float)
    assert res.predict(1e9, d_star, 4) == pytest.approx(0.05, rel=1e-10)
    est, lo, hi = tokens_to_reach_ci(res, 0.05, 1e9, 4)
    assert est == d_star and lo < est < hi


def test_tokens_to_reach_ci_over_runs():
    res = fit_law(design_rows(np.random.default_rng(9)), "ouyang", n_boot=200)
    est, lo, hi = tokens_to_reach_ci(res, 0.05, 1e8, 3)
    truth = (0.05 * 1e8 ** TRUTH["alpha"] * 3 ** TRUTH["gamma"] / TRUTH["k"]) ** (1 / TRUTH["beta"])
    assert lo < est < hi and lo < truth < hi


def test_tokens_to_reach_rejects_nonpositive_exponent_and_threshold():
    res = fit_law(grid_rows("ouyang"), "ouyang", n_boot=0)
    with pytest.raises(ValueError, match="qid_threshold"):
        tokens_to_reach(res, 0.0, 1e9, 4)
    with pytest.raises(ValueError, match="no bootstrap replicates"):
        tokens_to_reach_ci(res, 0.1, 1e9, 4)
    res.params["beta"] = -0.1
    with pytest.raises(ValueError, match="does not grow with tokens"):
        tokens_to_reach(res, 0.1, 1e9, 4)


# (6) errors ----------------------------------------------------------------------------------
def test_too_few_points_raises_naming_group():
    rows = grid_rows("ouyang", n_sizes=1, n_tokens=1, bits=(2, 4))  # 2 points: k and gamma need 3
    with pytest.raises(ValueError, match=r"group 'all'.*only 2 usable points.*at least 3"):
        fit_law(rows, "ouyang", n_boot=0)
    rows = grid_rows("ouyang", n_sizes=2, n_tokens=2, bits=(2, 4), method="rtn")
    for r in rows:
        r["qid"] = -abs(r["qid"])  # every bit width at the floor
    rows += grid_rows("ouyang", method="gptq", n_sizes=2, n_tokens=2)
    with pytest.raises(ValueError, match=r"group method=rtn: only 0 usable points \(8 rows excluded"):
        fit_table(rows, "ouyang", group_by=["method"], n_boot=0, on_error="raise")


def test_unknown_law_missing_keys_and_collinear_design():
    with pytest.raises(ValueError, match="unknown law"):
        fit_law(grid_rows("ouyang"), "chinchilla")
    with pytest.raises(ValueError, match=r"missing required keys \['qid'\]"):
        fit_law([{"n_params": 1, "tokens": 1, "bits": 4}] * 6, "ouyang")
    rows = [dict(r, tokens=20 * r["n_params"]) for r in grid_rows("ouyang", n_tokens=1)]  # D = 20 N
    with pytest.raises(ValueError, match="rank-deficient"):
        fit_law(rows, "ouyang", n_boot=0)


def test_kumar_gamma_post_without_bit_dependence_warns():
    rows = grid_rows("kumar", n_sizes=3, n_tokens=3)
    for r in rows:  # QiD that grows with bits: no finite positive gamma_post fits
        r["qid"] *= math.exp(1.5 * r["bits"])
    with pytest.warns(UserWarning, match="QiD does not decrease with bits"):
        res = fit_law(rows, "kumar", n_boot=0)
    assert res.params["gamma_post"] < 0


# (7) provenance, grouping, formatting --------------------------------------------------------
def test_n_params_source_recorded():
    rows = [dict(r, n_params_source="params_quantized") for r in grid_rows("ouyang", n_sizes=3, n_tokens=3)]
    assert fit_law(rows, "ouyang", n_boot=0).n_params_source == "params_quantized"
    assert fit_law(grid_rows("ouyang", n_sizes=3, n_tokens=3), "ouyang", n_boot=0).n_params_source == "n_params"
    rows[0]["n_params_source"] = "params_nonembed"
    with pytest.warns(UserWarning, match="mix definitions of N"):
        res = fit_law(rows, "ouyang", n_boot=0)
    assert res.n_params_source.startswith("mixed: params_quantized")


def test_published_values_belong_to_their_own_law():
    assert PUBLISHED["ouyang"] == {"k": 0.017, "beta": 0.5251, "alpha": 0.2261, "gamma": 5.4967}
    assert PUBLISHED["kumar"] == {} and "γD ≈ γN" in PUBLISHED_NOTES["kumar"]
    assert "alpha = 0.2261" in format_published("ouyang")
    kumar = format_table(fit_law(grid_rows("kumar", n_sizes=3, n_tokens=3), "kumar", n_boot=0))
    assert "0.2261" not in kumar and "no single fitted value" in kumar
    assert fit_law(grid_rows("ouyang", n_sizes=3, n_tokens=3), "ouyang", n_boot=0).to_dict()["published"] \
        == PUBLISHED["ouyang"]


def test_grouped_fit_gives_separate_params_per_group():
    a = grid_rows("ouyang", method="gptq", n_sizes=4, n_tokens=4)
    b = grid_rows("ouyang", method="rtn", n_sizes=4, n_tokens=4)
    for r in b:  # rtn: 3x the degradation and a steeper token exponent
        r["qid"] = 3.0 * r["qid"] * (r["tokens"] / 1e9) ** 0.1
    table = fit_table(a + b, "ouyang", group_by=["method"], n_boot=50)
    assert set(table) == {"all", ("gptq",), ("rtn",)}
    g, r = table[("gptq",)], table[("rtn",)]
    assert g.params["beta"] == pytest.approx(OUYANG["beta"], rel=1e-6)
    assert r.params["beta"] == pytest.approx(OUYANG["beta"] + 0.1, rel=1e-6)
    assert r.params["k"] == pytest.approx(3.0 * OUYANG["k"] / 1e9 ** 0.1, rel=1e-6)
    assert g.group == {"method": "gptq"} and g.label == "method=gptq"
    assert table["all"].n_points == g.n_points + r.n_points
    assert table["all"].r2 < 1.0  # the joint fit cannot match both groups
    text = format_table(table)
    assert "method=gptq" in text and "method=rtn" in text and "R2(log)" in text and "[95% CI]" in text
    assert "published: k = 0.017" in text
    json.dumps(table_to_dict(table))


def test_fit_table_skip_small_groups():
    rows = grid_rows("ouyang", method="gptq", n_sizes=3, n_tokens=3)
    rows += grid_rows("ouyang", method="awq", n_sizes=1, n_tokens=1, bits=(4, 8))  # 2 points, too few
    with pytest.warns(UserWarning, match="skipping group"):
        table = fit_table(rows, "ouyang", group_by="method", n_boot=0, on_error="skip")
    assert set(table) == {"all", ("gptq",)}


def test_to_dict_is_json_serialisable():
    res = fit_law(design_rows(np.random.default_rng(1), "kumar", {"C": 0.5, "gamma_D": 0.5, "gamma_N": 0.5,
                                                                   "gamma_post": 1.0}), "kumar", n_boot=30)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["law"] == "kumar" and set(d["params"]) == set(KUMAR)
    assert d["ci"]["gamma_post"][0] <= d["params"]["gamma_post"] <= d["ci"]["gamma_post"][1]
    assert d["excluded"] == {"noise_floor": 72} and len(d["excluded_rows"]) == 72
    assert d["identified"]["gamma_post"] and d["published"] == {} and d["df_clusters"] == 8
    assert "boot" not in d and len(res.to_dict(include_boot=True)["boot"]) == 30
    assert isinstance(res, FitResult)


# (7) loading ---------------------------------------------------------------------------------
def _write_csv(path, rows, fields):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def test_load_csv_keeps_extra_columns_and_fits(tmp_path):
    rows = grid_rows("ouyang", method="gptq", n_sizes=3, n_tokens=3)
    path = tmp_path / "ptq.csv"
    _write_csv(path, rows, ["n_params", "tokens", "bits", "qid", "method"])
    loaded = load_rows(path)
    assert len(loaded) == len(rows)
    assert loaded[0]["method"] == "gptq" and isinstance(loaded[0]["bits"], int)
    res = fit_law(loaded, "ouyang", n_boot=0)
    assert res.params["gamma"] == pytest.approx(OUYANG["gamma"], rel=1e-6)


def test_load_csv_keeps_keys_that_look_like_numbers_as_text(tmp_path):
    # hex config keys such as 867e70887370 parse as a float (inf); a column with any text stays text
    path = tmp_path / "rows.csv"
    rows = [{"run_key": "867e70887370", "cell": "1e5", "n_params": 10, "tokens": 5, "bits": 3, "qid": 0.5},
            {"run_key": "123456789012", "cell": "dense", "n_params": 20, "tokens": 6, "bits": 4, "qid": ""}]
    _write_csv(path, rows, list(rows[0]))
    loaded = load_rows(path)
    assert [r["run_key"] for r in loaded] == ["867e70887370", "123456789012"]
    assert [r["cell"] for r in loaded] == ["1e5", "dense"]
    assert loaded[1]["n_params"] == 20 and loaded[0]["qid"] == 0.5 and loaded[1]["qid"] is None


def test_load_csv_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    _write_csv(path, [{"n_params": 1, "tokens": 2}], ["n_params", "tokens", "method"])
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['bits', 'qid'\]"):
        load_rows(path)


def test_load_sqlite_table_and_query(tmp_path):
    rows = grid_rows("kumar", n_sizes=3, n_tokens=3)
    path = tmp_path / "results.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE ptq (n_params REAL, tokens REAL, bits INTEGER, qid REAL, method TEXT)")
    con.executemany("INSERT INTO ptq VALUES (?,?,?,?,?)",
                    [(r["n_params"], r["tokens"], r["bits"], r["qid"], "gptq" if r["bits"] < 4 else "rtn")
                     for r in rows])
    con.execute("CREATE TABLE other (x REAL)")
    con.commit()
    con.close()
    loaded = load_rows(path)
    assert len(loaded) == len(rows) and {r["method"] for r in loaded} == {"gptq", "rtn"}
    res = fit_law(loaded, "kumar", n_boot=0)
    assert res.params["gamma_post"] == pytest.approx(1.0, rel=1e-6)
    sub = load_rows(path, query="SELECT * FROM ptq WHERE method = 'rtn'")
    assert len(sub) == 9 * 2 and all(r["bits"] >= 4 for r in sub)
    with pytest.raises(ValueError, match=r"no table 'qid_rows'"):
        load_rows(path, table="qid_rows")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['n_params', 'tokens', 'bits', 'qid'\]"):
        load_rows(path, table="other")

