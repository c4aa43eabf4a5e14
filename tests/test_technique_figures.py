"""MTP acceptance along the series and the FP8-vs-BF16 loss gap over paired seeds (report section)."""

import numpy as np
import pytest

from efftrain.analysis.compare import checkpoint_metric_by_variant, fp8_gaps
from efftrain.analysis.report import fp8_gap_sentence
from efftrain.analysis.stats import t_interval


def _run(key, variant, seed, **config):
    cfg = {"name": "g", "train": {"seed": seed}, "data": {"shuffle_seed": seed}, "optim": {"lr": 1e-3}}
    for dotted, value in config.items():
        section, _, name = dotted.partition("__")
        cfg.setdefault(section, {})[name] = value
    return {"key": key, "name": f"{variant},seed={seed}", "kind": "main", "replicate": variant, "seed": seed,
            "config": cfg}


def test_mtp_acceptance_is_averaged_over_seeds_per_series_point():
    runs = [_run(f"m{s}", "mtp", s, model__mtp={"depth": 1}) for s in range(3)] + [_run("d0", "dense", 0)]
    labels = {r["key"]: r["replicate"] for r in runs}
    acc = {(s, t): 0.2 + 0.1 * i + 0.01 * s for s in range(3) for i, t in enumerate((1000, 2000))}
    checkpoints = [{"run_key": f"m{s}", "step": t // 100, "tokens": t, "val_loss": 3.0, "mtp_acceptance": a}
                   for (s, t), a in acc.items()]
    checkpoints.append({"run_key": "d0", "step": 10, "tokens": 1000, "val_loss": 3.0, "mtp_acceptance": None})
    points = checkpoint_metric_by_variant(runs, checkpoints, "mtp_acceptance", labels)
    assert [(p.variant, p.tokens) for p in points] == [("mtp", 1000), ("mtp", 2000)]
    for p, i in zip(points, (0, 1)):
        expected = t_interval([0.2 + 0.1 * i + 0.01 * s for s in range(3)])
        assert p.interval.n == 3
        np.testing.assert_allclose([p.interval.estimate, p.interval.lo, p.interval.hi],
                                   [expected.estimate, expected.lo, expected.hi])


@pytest.mark.parametrize("gap,verdict", [(0.01, "FP8 trains to a higher loss"), (0.0, "no detectable difference")])
def test_fp8_gap_pairs_each_fp8_run_with_its_bf16_twin_of_the_same_seed(gap, verdict):
    """A twin differs only in the fp8 section (seeds included); a run with another LR is no twin. The
    relative gap per pair is (fp8 - bf16) / bf16 at the same step."""
    rng = np.random.default_rng(0)
    runs = ([_run(f"b{s}", "dense", s) for s in range(3)] +
            [_run(f"f{s}", "fp8", s, fp8__enabled=True) for s in range(3)] +
            [_run("x0", "fp8-lr", 0, fp8__enabled=True, optim__lr=3e-3)])
    labels = {r["key"]: r["replicate"] for r in runs}
    bf16 = {s: 3.0 + 0.1 * s for s in range(3)}
    noise = {s: 1e-3 * rng.normal() for s in range(3)}
    checkpoints = [{"run_key": f"b{s}", "step": 50, "tokens": 5000, "val_loss": bf16[s]} for s in range(3)]
    checkpoints += [{"run_key": f"f{s}", "step": 50, "tokens": 5000,
                     "val_loss": bf16[s] * (1 + gap + (noise[s] if gap == 0 else 0))} for s in range(3)]
    checkpoints += [{"run_key": "x0", "step": 50, "tokens": 5000, "val_loss": 9.0}]
    gaps = fp8_gaps(runs, checkpoints, labels)
    assert [(g.variant, g.twin, g.tokens, g.interval.n) for g in gaps] == [("fp8", "dense", 5000, 3)]
    expected = [(bf16[s] * (1 + gap + (noise[s] if gap == 0 else 0)) - bf16[s]) / bf16[s] for s in range(3)]
    np.testing.assert_allclose(gaps[0].interval.estimate, np.mean(expected))
    if gap == 0:  # noise around zero: the interval must include it
        assert gaps[0].interval.lo <= 0 <= gaps[0].interval.hi
    (sentence,) = fp8_gap_sentence(gaps)
    assert verdict in sentence and "0.25 %" in sentence


def test_technique_section_in_a_report(tmp_path):
    """A store (written through the ResultsStore API) with an MTP cell that recorded its acceptance and
    an FP8/BF16 pair gets the section with both tables and the FP8 sentence."""
    from types import SimpleNamespace

    from efftrain.analysis.report import build_report
    from efftrain.grid.store import ResultsStore

    runs = ([_run(f"b{s}", "dense", s) for s in range(2)] + [_run(f"f{s}", "fp8", s, fp8__enabled=True)
                                                            for s in range(2)] +
            [_run(f"m{s}", "mtp", s, model__mtp={"depth": 1}) for s in range(2)])
    db = tmp_path / "results.sqlite"
    with ResultsStore(db) as store:
        for r in runs:
            cell = SimpleNamespace(key=r["key"], name=r["name"], kind="main", parent=None, schedule=None,
                                   values={"v": r["replicate"]}, config=SimpleNamespace(to_dict=lambda r=r: r["config"]),
                                   replicate=r["replicate"], seed=r["seed"], data_seed=r["seed"])
            store.register_cell(cell, ckpt_expected=2, ptq_expected=0)
            store.set_status(r["key"], "done")
            store.add_checkpoints(r["key"], [
                {"step": st, "tokens": 100 * st, "val_loss": 4.0 - 0.01 * st + (0.004 if r["replicate"] == "fp8" else 0),
                 **({"mtp_acceptance": 0.3 + 0.001 * st + 0.01 * r["seed"]} if r["replicate"] == "mtp" else {})}
                for st in (10, 20)])
    build_report(db, tmp_path / "rep", n_boot=20, log=lambda *_: None)
    md = (tmp_path / "rep" / "report.md").read_text()
    section = md.split("## Technique figures along the series")[1].split("\n## ")[0]
    assert "acceptance [95% CI]" in section and "| mtp | 1k |" in section
    assert "relative gap [95% CI]" in section and "FP8 gap: **fp8** vs **dense** at 2k tokens" in section
