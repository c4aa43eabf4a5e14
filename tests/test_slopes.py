"""Per-run slopes of log QiD vs log D (efftrain.analysis.compare.run_slopes / slope_groups) and their
report section. Fast: rows and stores are simulated from a known truth, nothing is trained.

Truth: QiD = k·D^β_run·exp(noise) over 7 log-spaced D per run, β_run = β + a run-level deviation, so the
seeds' OLS slopes are independent draws around β and a t-interval over them covers β in 95 % of grids.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as sps

from efftrain.analysis.compare import (SLOPE_FALLS, SLOPE_FLAT, SLOPE_GROWS, SLOPE_NONE, SLOPE_ONE_SEED,
                                       in_warmup, ols_slope, run_slopes, slope_groups)
from efftrain.analysis.report import build_report, slope_sentence
from efftrain.grid.store import ResultsStore

TOKENS = np.geomspace(4e6, 1e8, 7)
WARMUP = 100


def simulate(truth: dict[str, float], n_seeds: int = 3, slope_sd: float = 0.1, noise_sd: float = 0.05,
             k: float = 1e-7, bits=(3,), rng=None, tokens=TOKENS, qid_se_frac: float = 0.01):
    """runs and PTQ rows: per variant (name -> true mean slope β) n_seeds runs, each with its own slope
    β + N(0, slope_sd²), QiD = k·D^β_run·exp(N(0, noise_sd²)) at `tokens`, qid_se = qid_se_frac·QiD,
    every checkpoint after warmup (step = 200 + index)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    runs, rows = [], []
    for variant, beta in truth.items():
        for s in range(n_seeds):
            key = f"{variant}-{s}"
            runs.append({"key": key, "name": f"{variant},seed={s}", "replicate": variant, "seed": s,
                         "data_seed": s, "kind": "main", "parent": None, "params_active": 1000, "config": {}})
            b_run = beta + slope_sd * rng.standard_normal()
            for b in bits:
                for i, d in enumerate(tokens):
                    q = k * d**b_run * math.exp(noise_sd * rng.standard_normal()) * (2.0 ** (3 - b))
                    rows.append({"run_key": key, "method": "gptq", "bits": b, "group_size": 128, "format": "int",
                                 "tokens": float(d), "qid": q, "qid_se": qid_se_frac * q, "step": 200 + i,
                                 "warmup_steps": WARMUP})
    return rows, runs


# --------------------------------------------------------------------------- (a) the per-run OLS slope
def test_per_run_slope_is_numpy_polyfit_and_its_se_is_linregress():
    rows, runs = simulate({"a": 0.8, "b": 0.3}, n_seeds=3, bits=(2, 3), rng=np.random.default_rng(3))
    slopes = run_slopes(rows, runs)
    assert len(slopes) == 2 * 3 * 2  # every run at every bit width
    for s in slopes:
        mine = sorted((r for r in rows if r["run_key"] == f"{s.variant}-{s.seed[0]}" and r["bits"] == s.bits),
                      key=lambda r: r["tokens"])
        x = np.log([r["tokens"] for r in mine])
        y = np.log([r["qid"] for r in mine])
        assert s.n == 7 and s.fitted and s.left_out == {}
        assert s.slope == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-12, abs=1e-12)
        assert s.se == pytest.approx(sps.linregress(x, y).stderr, rel=1e-10)
        assert (s.d_min, s.d_max) == pytest.approx((TOKENS[0], TOKENS[-1]), rel=1e-12)
        assert (s.method, s.group_size, s.fmt) == ("gptq", 128, "int")
    assert ols_slope([0, 1, 2], [1, 3, 5]) == pytest.approx((2.0, 0.0))
    assert math.isnan(ols_slope([1.0], [2.0])[0]) and math.isnan(ols_slope([1, 1, 1], [1, 2, 3])[0])


# --------------------------------------------------------------------------- (b) coverage over seeds
def test_seed_level_t_interval_covers_the_true_mean_slope():
    """200 simulated grids, 3 seeds each, true mean slope 0.6 with run-level deviations sd 0.1: the 95 %
    t-interval over the seeds' slopes covers 0.6 in 90-99 % of them."""
    rng = np.random.default_rng(2024)
    covered = 0
    for _ in range(200):
        rows, runs = simulate({"v": 0.6}, n_seeds=3, slope_sd=0.1, noise_sd=0.08, rng=rng)
        (g,) = slope_groups(run_slopes(rows, runs))
        assert g.mean.n == 3 and len(g.runs) == 3
        assert g.mean.estimate == pytest.approx(np.mean([s.slope for s in g.runs]))
        covered += g.mean.lo <= 0.6 <= g.mean.hi
    assert 0.90 <= covered / 200 <= 0.99


# --------------------------------------------------------------------------- (c) what is left out
def test_warmup_and_unresolved_rows_are_left_out_and_counted():
    rows, runs = simulate({"v": 0.8}, n_seeds=2, slope_sd=0.0, noise_sd=0.0, rng=np.random.default_rng(1))
    r0 = [r for r in rows if r["run_key"] == "v-0"]
    # two warmup rows (one at step == warmup_steps: warmup, as in the fits) with QiD far off the line
    rows += [{**r0[0], "tokens": 1e6, "step": 50, "qid": 5.0}, {**r0[0], "tokens": 2e6, "step": WARMUP, "qid": 5.0}]
    # two unresolved rows: QiD <= 2·se (one exactly at 2·se, one negative)
    r0[1]["qid_se"] = r0[1]["qid"] / 2
    r0[2].update(qid=-1e-4, qid_se=1e-4)
    # a row without qid_se is kept when QiD > 0
    r0[3]["qid_se"] = None
    assert in_warmup({"step": WARMUP, "warmup_steps": WARMUP}) and not in_warmup({"step": WARMUP + 1,
                                                                                  "warmup_steps": WARMUP})
    assert not in_warmup({"step": 5})  # rows without warmup info count as trained
    s0, s1 = run_slopes(rows, runs)
    assert s0.left_out == {"warmup": 2, "unresolved": 2} and s0.n == 5 and s0.no_se == 1
    kept = [r for r in r0 if r not in (r0[1], r0[2])]
    x, y = np.log([r["tokens"] for r in kept]), np.log([r["qid"] for r in kept])
    assert s0.slope == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-12)
    assert s0.slope == pytest.approx(0.8, rel=1e-9)  # the warmup rows (QiD 5) would have pulled it far off
    assert s0.d_min == pytest.approx(TOKENS[0]) and s1.n == 7 and s1.left_out == {}

    # a run left with fewer than 3 usable rows gets no slope, and is counted
    for r in rows:
        if r["run_key"] == "v-1" and r["tokens"] > TOKENS[1] * 1.01:
            r["step"] = 10
    (g,) = slope_groups(run_slopes(rows, runs))
    assert [s.fitted for s in g.runs] == [True, False] and g.too_few == 1 and math.isnan(g.runs[1].slope)
    assert g.runs[1].n == 2 and g.left_out == {"warmup": 7, "unresolved": 2}
    assert g.mean.n == 1 and g.verdict == SLOPE_ONE_SEED
    text = slope_sentence([g], "gptq", 3)
    assert "7 rows inside LR warmup" in text and "2 rows with QiD ≤ 2·se" in text
    assert "1 run with fewer than 3 points, so no slope" in text
    for r in rows:
        r["step"] = 10
    (g,) = slope_groups(run_slopes(rows, runs))
    assert g.mean.n == 0 and g.verdict == SLOPE_NONE and g.too_few == 2


# --------------------------------------------------------------------------- (d) verdicts
def test_verdicts_flat_grows_falls_and_one_seed():
    """100 grids: a variant with true slope 0 is "no detectable trend" in >= 90 % (about 95 % expected),
    one with slope 0.8 (run sd 0.1) "grows" in all of them, one with slope -0.8 "falls" in >= 98 %."""
    rng = np.random.default_rng(7)
    verdicts = {"flat": [], "up": [], "down": []}
    for _ in range(100):
        rows, runs = simulate({"flat": 0.0, "up": 0.8, "down": -0.8}, n_seeds=3, slope_sd=0.1, rng=rng)
        for g in slope_groups(run_slopes(rows, runs)):
            verdicts[g.variant].append(g.verdict)
    assert verdicts["flat"].count(SLOPE_FLAT) >= 90
    assert set(verdicts["flat"]) <= {SLOPE_FLAT, SLOPE_GROWS, SLOPE_FALLS}
    assert verdicts["up"].count(SLOPE_GROWS) == 100
    assert verdicts["down"].count(SLOPE_FALLS) >= 98

    rows, runs = simulate({"v": 0.8}, n_seeds=1)
    (g,) = slope_groups(run_slopes(rows, runs))
    assert g.verdict == SLOPE_ONE_SEED and g.mean.n == 1 and not g.mean.defined
    assert "(1 seed: no interval) (1 run): one seed, no claim" in slope_sentence([g], "gptq", 3)


def test_slopes_group_by_variant_without_the_seed_and_by_method_and_bits():
    rows, runs = simulate({"a": 0.8, "b": 0.0}, n_seeds=3, bits=(2, 3, 4))
    rows += [{**r, "method": "rtn"} for r in rows if r["bits"] == 3]
    groups = slope_groups(run_slopes(rows, runs))
    assert [(g.variant, g.method, g.bits) for g in groups] == [
        ("a", "gptq", 2), ("a", "gptq", 3), ("a", "gptq", 4), ("a", "rtn", 3),
        ("b", "gptq", 2), ("b", "gptq", 3), ("b", "gptq", 4), ("b", "rtn", 3)]
    assert all(len(g.runs) == 3 and [s.seed for s in g.runs] == [(0, 0), (1, 1), (2, 2)] for g in groups)
    text = slope_sentence(groups, "rtn", 3)
    assert text.startswith("3-bit RTN, per-run slopes of log QiD vs log D") and "**a** +0." in text
    assert slope_sentence(groups, "rtn", 2) is None


# --------------------------------------------------------------------------- (e) the report section
def _store(path, truth: dict[str, float], n_seeds: int = 2):
    """A results store written through the ResultsStore API from simulate()'s rows (RTN and GPTQ, 3 bits)."""
    rows, runs = simulate(truth, n_seeds=n_seeds, bits=(3,), rng=np.random.default_rng(5))
    rows += [{**r, "method": "rtn", "qid": 1.5 * r["qid"], "qid_se": 1.5 * r["qid_se"]} for r in rows]
    with ResultsStore(path) as store:
        for i, run in enumerate(runs):
            n = 10_000 * (1 + list(truth).index(run["replicate"]))
            cell = SimpleNamespace(key=run["key"], name=run["name"], kind="main", parent=None, schedule=None,
                                   values={"v": run["replicate"]}, config=SimpleNamespace(to_dict=lambda: {}),
                                   replicate=run["replicate"], seed=run["seed"], data_seed=run["data_seed"])
            store.register_cell(cell, ckpt_expected=len(TOKENS), ptq_expected=2 * len(TOKENS))
            store.set_status(run["key"], "done")
            store.set_params(run["key"], {"total": 2 * n, "active": 2 * n, "non_embedding": n, "embedding": n})
            store.add_checkpoints(run["key"], [{"step": 200 + j, "tokens": int(d), "val_loss": 4.0 - 0.1 * j}
                                               for j, d in enumerate(TOKENS)])
            for r in rows:
                if r["run_key"] == run["key"]:
                    j = int(r["step"]) - 200
                    store.add_ptq_row({**r, "tokens": int(r["tokens"]), "loss_16": 4.0 - 0.1 * j,
                                       "loss_q": 4.0 - 0.1 * j + r["qid"], "params_quantized": n,
                                       "params_nonembed": n, "seed": run["seed"], "data_seed": run["data_seed"],
                                       "run_id": run["key"]}, cell)
    return path


def test_report_has_the_per_run_slopes_section_and_summary_sentences(tmp_path):
    db = _store(tmp_path / "results.sqlite", {"grows": 0.8, "flat": 0.0})
    build_report(db, tmp_path / "out", n_boot=20, log=lambda *_: None)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Per-run slopes of log QiD vs log D" in md
    section = md.split("## Per-run slopes of log QiD vs log D")[1].split("\n## ")[0]
    assert ("| variant | method | bits | runs | mean slope [95% CI over seeds] | per-run slopes | D range | left out "
            "| verdict |") in section
    table = [line for line in section.splitlines() if line.startswith("| grows |") or line.startswith("| flat |")]
    assert len(table) == 4  # 2 variants x (GPTQ, RTN) at 3 bits
    assert all(" | 2 | " in line and "0: " in line and "1: " in line and "(7 pts)" in line for line in table)
    assert "Left out, counted: nothing" in section
    summary = md.split("## Summary")[1].split("## Grid")[0]
    for m in ("GPTQ", "RTN"):
        assert f"3-bit {m}, per-run slopes of log QiD vs log D" in summary
    assert summary.index("GPTQ pooled over the cells") < summary.index("3-bit GPTQ, per-run slopes")
    assert "Per-run slopes of log QiD vs log D" in (tmp_path / "out" / "report.html").read_text()
