"""Tests for efftrain.analysis.fits: recovery of the Ouyang and Kumar QiD laws,
bootstrap intervals, data handling, grouping and loading."""

import csv
import json
import math
import sqlite3

import numpy as np
import pytest

from efftrain.tables import load_rows
from efftrain.analysis.fits import (
    FitResult,
    fit_law,
    fit_table,
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


def law_qid(law, n, d, p):
    if law == "ouyang":
        t = OUYANG
        return t["k"] * d ** t["beta"] / (n ** t["alpha"] * p ** t["gamma"])
    t = KUMAR
    return t["C"] * d ** t["gamma_D"] / n ** t["gamma_N"] * math.exp(-p / t["gamma_post"])


def grid_rows(law, noise_sigma=0.0, seed=0, n_sizes=6, n_tokens=6, bits=BITS, **extra):
    """N in [1e7, 1e10], D in [1e9, 1e12] (log-spaced), P in bits; multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in np.logspace(7, 10, n_sizes):
        for d in np.logspace(9, 12, n_tokens):
            for p in bits:
                q = law_qid(law, n, d, p) * math.exp(noise_sigma * rng.standard_normal())
                rows.append({"n_params": float(n), "tokens": float(d), "bits": p, "qid": q, **extra})
    return rows


# (1) exact recovery ---------------------------------------------------------------------------
@pytest.mark.parametrize("law", ["ouyang", "kumar"])
def test_noiseless_recovery_to_1e_6(law):
    res = fit_law(grid_rows(law), law, n_boot=0)
    for name, true in TRUE[law].items():
        assert res.params[name] == pytest.approx(true, rel=1e-6), name
    assert res.r2 == pytest.approx(1.0, abs=1e-12)
    assert res.rmse < 1e-9
    assert res.n_points == 6 * 6 * 4 and res.n_dropped == 0


# (2) bootstrap intervals cover the truth under noise -----------------------------------------
@pytest.mark.parametrize("law", ["ouyang", "kumar"])
def test_noisy_truth_inside_95_bootstrap_ci(law):
    rows = grid_rows(law, noise_sigma=0.1, seed=1)
    res = fit_law(rows, law, n_boot=200, seed=0)
    for name, true in TRUE[law].items():
        lo, hi = res.ci[name]
        assert lo < res.params[name] < hi, name
        assert lo <= true <= hi, f"{name}: true {true} outside [{lo}, {hi}]"
    # sigma = 0.1 noise in log space -> residual RMSE close to 0.1
    assert 0.07 < res.rmse < 0.13
    assert 0.99 < res.r2 < 1.0


def test_bootstrap_is_deterministic_and_seed_dependent():
    rows = grid_rows("ouyang", noise_sigma=0.1, seed=3, n_sizes=4, n_tokens=4)
    a = fit_law(rows, "ouyang", n_boot=100, seed=7)
    b = fit_law(rows, "ouyang", n_boot=100, seed=7)
    c = fit_law(rows, "ouyang", n_boot=100, seed=8)
    assert a.ci == b.ci
    np.testing.assert_array_equal(a.boot, b.boot)
    assert a.ci != c.ci
    assert a.params == c.params  # point estimate does not depend on the seed


# (3) tokens_to_reach inverts predict ---------------------------------------------------------
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


def test_tokens_to_reach_rejects_nonpositive_exponent_and_threshold():
    res = fit_law(grid_rows("ouyang"), "ouyang", n_boot=0)
    with pytest.raises(ValueError, match="qid_threshold"):
        tokens_to_reach(res, 0.0, 1e9, 4)
    res.params["beta"] = -0.1
    with pytest.raises(ValueError, match="does not grow with tokens"):
        tokens_to_reach(res, 0.1, 1e9, 4)


# (4) qid <= 0 rows are dropped and counted ---------------------------------------------------
def test_nonpositive_qid_rows_dropped_and_counted():
    rows = grid_rows("ouyang")
    bad = [dict(rows[0], qid=0.0), dict(rows[1], qid=-0.02), dict(rows[2], qid=-1e-5), dict(rows[3], qid=float("nan"))]
    res = fit_law(rows + bad, "ouyang", n_boot=0)
    assert res.n_points == len(rows)
    assert res.n_dropped == 4
    assert res.dropped == {"qid<=0": 3, "nonfinite": 1}
    for name, true in OUYANG.items():  # the good rows still give the exact law
        assert res.params[name] == pytest.approx(true, rel=1e-6)


def test_floor_clips_instead_of_dropping():
    rows = grid_rows("ouyang") + [{"n_params": 1e8, "tokens": 1e10, "bits": 8, "qid": -0.01}]
    res = fit_law(rows, "ouyang", n_boot=0, floor=1e-6)
    assert res.n_dropped == 0 and res.n_floored == 1 and res.n_points == len(rows)


# (5) too few points --------------------------------------------------------------------------
def test_too_few_points_raises_naming_group():
    rows = grid_rows("kumar")[:4]  # 4 points, kumar needs 5
    with pytest.raises(ValueError, match=r"group 'all'.*only 4 usable points.*at least 5"):
        fit_law(rows, "kumar", n_boot=0)
    # dropped rows make a group too small, and the error names the group and the drops
    rows = grid_rows("ouyang", n_sizes=2, n_tokens=2, bits=(2, 4))  # 8 points
    for r in rows[:4]:
        r["qid"] = -1.0
    for r in rows:
        r["method"] = "rtn"
    rows += grid_rows("ouyang", method="gptq", n_sizes=2, n_tokens=2)
    with pytest.raises(ValueError, match=r"group method=rtn: only 4 usable points \(4 rows dropped"):
        fit_table(rows, "ouyang", group_by=["method"], n_boot=0, on_error="raise")


def test_unidentifiable_parameter_message_and_fixed_param():
    rows = grid_rows("ouyang", bits=(4,))
    with pytest.raises(ValueError, match=r"bits \(P\) takes a single value.*'gamma'"):
        fit_law(rows, "ouyang", n_boot=0)
    res = fit_law(rows, "ouyang", n_boot=20, fixed={"gamma": OUYANG["gamma"]})
    assert res.params["gamma"] == OUYANG["gamma"] and res.ci["gamma"] == (OUYANG["gamma"],) * 2
    for name in ("k", "alpha", "beta"):
        assert res.params[name] == pytest.approx(OUYANG[name], rel=1e-6)


def test_unknown_law_and_missing_keys():
    with pytest.raises(ValueError, match="unknown law"):
        fit_law(grid_rows("ouyang"), "chinchilla")
    with pytest.raises(ValueError, match=r"missing required keys \['qid'\]"):
        fit_law([{"n_params": 1, "tokens": 1, "bits": 4}] * 6, "ouyang")


def test_robust_loss_downweights_outliers():
    rows = grid_rows("ouyang", n_sizes=5, n_tokens=5)
    for r in rows[::25]:
        r["qid"] *= 50.0  # a few blown-up points (e.g. 2-bit RTN collapse)
    ols = fit_law(rows, "ouyang", n_boot=0)
    rob = fit_law(rows, "ouyang", n_boot=0, robust_loss="soft_l1", f_scale=0.05)
    err = lambda r: max(abs(r.params[k] / OUYANG[k] - 1) for k in ("alpha", "beta", "gamma"))  # noqa: E731
    assert err(rob) < 0.2 * err(ols)


# (6) grouped fits ----------------------------------------------------------------------------
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
    json.dumps(table_to_dict(table))


def test_fit_table_skip_small_groups():
    rows = grid_rows("ouyang", method="gptq", n_sizes=3, n_tokens=3)
    rows += grid_rows("ouyang", method="awq", n_sizes=1, n_tokens=1)  # 4 points, too few
    with pytest.warns(UserWarning, match="skipping group"):
        table = fit_table(rows, "ouyang", group_by="method", n_boot=0, on_error="skip")
    assert set(table) == {"all", ("gptq",)}


def test_to_dict_is_json_serialisable():
    res = fit_law(grid_rows("kumar", noise_sigma=0.1), "kumar", n_boot=30)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["law"] == "kumar" and set(d["params"]) == set(KUMAR)
    assert d["ci"]["gamma_post"][0] <= d["params"]["gamma_post"] <= d["ci"]["gamma_post"][1]
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


def test_kumar_gamma_post_at_bound_warns():
    rows = grid_rows("kumar", n_sizes=3, n_tokens=3)
    for r in rows:  # QiD that grows with bits: no finite positive gamma_post fits
        r["qid"] *= math.exp(1.5 * r["bits"])
    with pytest.warns(UserWarning, match="gamma_post hit its upper bound"):
        res = fit_law(rows, "kumar", n_boot=0)
    assert res.params["gamma_post"] > 1e5
