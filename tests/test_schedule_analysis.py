"""Learning-rate schedule comparisons at equal tokens (efftrain.analysis.schedule) on simulated grids
with a known truth: the pairing (branch of seed s against the run of seed s, at the same step), which
runs count as references, the restriction of the stable run's slope to the other variant's D range, the
coverage of the paired intervals, and the report section that shows them."""

import math

import numpy as np
import pytest

from efftrain.analysis.report_parts import Context, Doc, GridResults
from efftrain.analysis.report_schedule import schedule_sentences, section_schedule
from efftrain.analysis.compare import Selection
from efftrain.analysis.schedule import equal_token_comparisons, stable_slope_differences

TOKENS_PER_STEP = 32768
STEPS = [122, 217, 381, 457, 763, 916]  # series checkpoints of the main cells (steps > warmup 100)
BRANCH_STEP = {"cooldown@12.5M": 457, "avg@12.5M": 381, "cooldown@25M": 916}


def _run(key, replicate, seed, kind="main", parent=None, lr=2e-3):
    return {"key": key, "replicate": replicate, "kind": kind, "parent": parent, "seed": seed, "data_seed": seed,
            "config": {"optim": {"lr": lr}}, "name": f"{replicate},seed={seed}", "status": "done"}


def _row(run, step, qid, loss, schedule, method="gptq", bits=3):
    return {"run_key": run["key"], "step": step, "tokens": step * TOKENS_PER_STEP, "qid": qid, "qid_se": 1e-6,
            "loss_16": loss, "method": method, "bits": bits, "group_size": 128, "format": "int",
            "schedule": schedule, "warmup_steps": 100}


def stable_qid(d):
    """A kinked truth: slope 0.5 in log D below 20M tokens, 1.0 above (continuous at 20M)."""
    return 1e-2 * (d / 20e6) ** (0.5 if d < 20e6 else 1.0)


def simulate(seeds, delta_cool=0.004, delta_avg=-0.003, noise=0.0, seed=0):
    """A stable WSD variant with cooldown branches and averages, a lower-LR stable variant, and a cosine
    run trained to 15M tokens (slope 0.7 in log D); QiD = truth x a per-seed factor (+ noise on the
    branch points)."""
    rng = np.random.default_rng(seed)
    runs, rows = [], []
    for s in seeds:
        a = math.exp(rng.normal(0, 0.1))  # the seed's own level: cancels in the pairing
        wsd, low = _run(f"w{s}", "wsd", s), _run(f"l{s}", "wsd-low-lr", s, lr=6.7e-4)
        cos = _run(f"c{s}", "cosine-15M", s)
        runs += [wsd, low, cos]
        for st in STEPS:
            d = st * TOKENS_PER_STEP
            rows.append(_row(wsd, st, a * stable_qid(d), 3.0, "wsd-stable"))
            rows.append(_row(low, st, 1.5 * a * stable_qid(d), 3.2, "wsd-stable"))
            if st <= 457:
                rows.append(_row(cos, st, a * 0.012 * (d / 15e6) ** 0.7, 2.9, "cosine"))
        for name, step in BRANCH_STEP.items():
            kind = "cooldown" if name.startswith("cooldown") else "average"
            br = _run(f"w{s}{name}", f"wsd,{name}", s, kind=kind, parent=wsd["key"])
            runs.append(br)
            delta = delta_cool if kind == "cooldown" else delta_avg
            rows.append(_row(br, step, a * stable_qid(step * TOKENS_PER_STEP) + delta + rng.normal(0, noise),
                             2.9, "wsd-cooldown" if kind == "cooldown" else "wsd-stable+avg"))
    return runs, rows


def test_branches_are_paired_with_their_stable_run_and_the_runs_trained_to_their_budget():
    runs, rows = simulate(seeds=[0, 1, 2])
    found = {(c.branch, c.reference): c for c in equal_token_comparisons(rows, runs, 128, "int")}
    # the stable run at the same step; the cosine run ending at 15M; never the other stable variant
    assert set(found) == {("wsd,cooldown@12.5M", "wsd"), ("wsd,cooldown@12.5M", "cosine-15M"),
                          ("wsd,avg@12.5M", "wsd"), ("wsd,cooldown@25M", "wsd")}
    cool = found[("wsd,cooldown@12.5M", "wsd")]
    assert cool.relation == "stable run" and cool.diff.n == 3 and cool.diff.paired == ((0, 0), (1, 1), (2, 2))
    assert cool.diff.estimate == pytest.approx(0.004, abs=1e-12)  # the seed factors cancel exactly
    assert cool.verdict == "the cooldown raises QiD" and cool.loss_diff.estimate == pytest.approx(-0.1)
    avg = found[("wsd,avg@12.5M", "wsd")]
    assert avg.diff.estimate == pytest.approx(-0.003, abs=1e-12) and avg.verdict == "averaging lowers QiD"
    assert avg.tokens == 381 * TOKENS_PER_STEP
    budget = found[("wsd,cooldown@12.5M", "cosine-15M")]
    assert budget.relation == "trained to this budget" and budget.reference_tokens == 457 * TOKENS_PER_STEP


def test_a_run_of_another_seed_or_step_is_never_a_pair():
    runs, rows = simulate(seeds=[0, 1, 2])
    rows = [r for r in rows if not (r["run_key"] == "w2" and r["step"] == 457)]  # stable seed 2 lacks that step
    cool = next(c for c in equal_token_comparisons(rows, runs, 128, "int")
                if c.branch == "wsd,cooldown@12.5M" and c.reference == "wsd")
    assert cool.diff.paired == ((0, 0), (1, 1))


def test_paired_intervals_cover_the_true_effect():
    """300 simulated grids of 4 seeds with noise on the branch points: the 95% t-interval of the cooldown's
    paired effect covers the truth in about 95% of them, and the estimate is unbiased."""
    hits, estimates = 0, []
    for i in range(300):
        runs, rows = simulate(seeds=[0, 1, 2, 3], delta_cool=0.004, noise=0.002, seed=i)
        c = next(c for c in equal_token_comparisons(rows, runs, 128, "int")
                 if c.branch == "wsd,cooldown@25M" and c.reference == "wsd")
        hits += c.diff.lo <= 0.004 <= c.diff.hi
        estimates.append(c.diff.estimate)
    assert 0.91 <= hits / 300 <= 0.99
    assert abs(np.mean(estimates) - 0.004) < 4 * 0.002 / math.sqrt(4 * 300)


def test_slopes_are_compared_over_the_other_variants_range_of_tokens():
    runs, rows = simulate(seeds=[0, 1, 2])
    diffs = stable_slope_differences(rows, runs, 128, "int")
    assert [(d.variant, d.stable) for d in diffs] == [("cosine-15M", "wsd")]  # same peak LR only
    d = diffs[0]
    assert (d.d_min, d.d_max) == pytest.approx((122 * TOKENS_PER_STEP, 457 * TOKENS_PER_STEP))
    # the stable run refitted over 4M-15M only, where its true slope is 0.5 (1.0 past 20M)
    assert d.stable_slope.estimate == pytest.approx(0.5, abs=1e-9)
    assert d.slope.estimate == pytest.approx(0.7, abs=1e-9) and d.diff.estimate == pytest.approx(0.2, abs=1e-9)


def test_report_section_shows_the_comparisons_and_the_summary_names_them(tmp_path):
    runs, rows = simulate(seeds=[0, 1, 2], noise=1e-4)
    res = GridResults(name="lr", db_path=tmp_path / "r.sqlite", runs_dir=tmp_path, runs=runs, checkpoints=[], rows=rows)
    ctx = Context(res=res, out=tmp_path, baseline="wsd", n_boot=10, labels={}, rows=rows,
                  sel=Selection("gptq", 3, 128, "int"))
    doc = Doc()
    section_schedule(ctx, doc)
    text = doc.markdown()
    assert "## Learning-rate schedule at equal tokens" in text
    assert "| wsd,cooldown@12.5M | cosine-15M | trained to this budget |" in text
    assert "the cooldown raises QiD" in text and "averaging lowers QiD" in text
    lines = schedule_sentences(ctx)
    assert any(line.startswith("Cooldown end vs the stable run") and "2 of 2: the cooldown raises QiD" in line
               for line in lines)
    assert any("**cosine-15M**" in line and "steeper than the stable run" in line for line in lines)
    # a grid without branches gets no section
    plain = Context(res=GridResults(name="p", db_path=tmp_path / "p", runs_dir=tmp_path, runs=[r for r in runs if r["kind"] == "main"],
                                    checkpoints=[], rows=rows), out=tmp_path, baseline="wsd", n_boot=10, labels={},
                    rows=rows, sel=Selection("gptq", 3, 128, "int"))
    empty = Doc()
    section_schedule(plain, empty)
    assert empty.blocks == []
