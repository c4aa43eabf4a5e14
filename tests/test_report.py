"""`efftrain report`: HTML (self-contained) + Markdown from a real tiny grid, and summary sentences
generated from the numbers."""

import base64
import re

import pytest
import yaml

import math

from efftrain.analysis.compare import Selection, compare_techniques
from efftrain.analysis.report import build_report, summary_sentences
from efftrain.cli import main as cli
from efftrain.grid.runner import run_grid
from efftrain.grid.spec import GridError

from conftest import tiny_raw

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory, cache_dir):
    """dense / MoE / FP8 variants of the tiny config x 2 seeds, 12 steps, 4 checkpoints, RTN at 2 and 3 bits.
    FP8 with scaling only: the accumulator model is slow on CPU, and nothing in the report depends on it."""
    tmp = tmp_path_factory.mktemp("report-grid")
    raw = tiny_raw(cache_dir)
    raw["checkpoint"] = {"tokens": [512, 1024, 1536], "resume_every": 100, "async_save": False}
    (tmp / "base.yaml").write_text(yaml.safe_dump(raw))
    spec = {"name": "report-test", "base": "base.yaml", "runs_dir": str(tmp / "runs"),
            "variants": {"dense": {}, "moe": {"model.moe.enabled": True, "model.moe.num_routed_experts": 4,
                                              "model.moe.expert_hidden": 16, "model.moe.top_k": 2},
                         "fp8": {"fp8.enabled": True, "fp8.accum_bits": None}},
            "seeds": [0, 1],
            "ptq": {"methods": ["rtn"], "bits": [2, 3], "calib_samples": 8, "eval_tokens": 4096}}  # (GPTQ of FP8 models is slow on CPU)
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert set(run_grid(path, log=lambda *_: None).values()) == {"done"}
    return path


def test_report_writes_self_contained_html_and_markdown(tiny_grid, tmp_path):
    out = tmp_path / "report"
    html_path = build_report(tiny_grid, out, bits=2, n_boot=100, log=lambda *_: None)
    assert html_path == out / "report.html"
    html = html_path.read_text()
    sources = re.findall(r'<img[^>]* src="([^"]+)"', html)
    assert len(sources) == 9  # loss, QiD vs tokens, QiD vs N, k-bit, variants, MoE balance x2, FP8 gap x2
    for src in sources:  # every image inlined: the file stands alone
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    md = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == len(sources)
    for name in images:
        assert (out / name).read_bytes()[:8] == PNG
    for section in ("## Summary", "## Grid", "## Training", "## Measurement noise", "## Quantization-induced degradation",
                    "## Technique diagnostics", "## Per-run slopes of log QiD vs log D", "## Fitted laws"):
        assert section in md
    assert "moe_balance_" in md and "fp8_gap_" in md
    summary = md.split("## Summary")[1].split("## Grid")[0]
    assert "baseline **dense**" in summary and "**moe**" in summary and "**fp8**" in summary
    assert "model.moe.enabled" in md and "fp8.enabled" in md  # the differing config fields
    assert "ouyang: QiD = k * D^beta" in md and "Published: k = 0.017" in md
    # the cells' N lie within a factor 2, so the pooled α is flagged as not identified
    assert "alpha not identified" in summary
    # replicates: grouped into variants, paired by seed, with the seeds and epochs in the grid table
    assert "2 seed pairs" in summary and "| dense,seed=1 | dense | 1/1 |" in md
    assert "median se" in md and "epochs" in md


def test_report_cli_prints_the_path_and_rejects_unknown_baseline(tiny_grid, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(["report", str(tiny_grid), "--out", str(out), "--n-boot", "20"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.html")
    assert cli(["report", str(tiny_grid), "--out", str(out), "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is not a variant" in capsys.readouterr().err


def test_report_of_a_grid_that_never_ran(tmp_path, cache_dir):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_raw(cache_dir)))
    spec = tmp_path / "g.yaml"
    spec.write_text(yaml.safe_dump({"name": "g", "base": "base.yaml", "runs_dir": str(tmp_path / "runs")}))
    with pytest.raises(GridError, match="no results database"):
        build_report(spec, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# comparisons are paired by seed; summary sentences come from the numbers
# ----------------------------------------------------------------------------------------------
def synthetic(offset: float, seed_sd: float, n_seeds: int = 4, loss_gain: float = 0.0, rng_seed: int = 1):
    """Two variants x n_seeds runs; a seed effect shared by the two runs of one seed (what pairing
    removes), QiD rising along each run's series as its 16-bit loss falls."""
    import numpy as np

    rng = np.random.default_rng(rng_seed)
    runs, rows = [], []
    seed_effect = {s: seed_sd * rng.standard_normal() for s in range(n_seeds)}
    for variant, off, active in (("dense", 0.0, 1000), ("moe", offset, 1010)):
        for s in range(n_seeds):
            key = f"{variant}{s}"
            runs.append({"key": key, "name": f"{variant},seed={s}", "replicate": variant, "seed": s, "data_seed": s,
                         "kind": "main", "parent": None, "params_active": active, "config": {}})
            for i, t in enumerate((1e6, 2e6, 4e6, 8e6, 1.6e7, 3.2e7)):
                loss16 = 4.0 - 0.2 * i - (loss_gain if variant == "moe" else 0.0)
                rows.append({"run_key": key, "variant": f"{variant},seed={s}", "method": "gptq", "bits": 3,
                             "group_size": 128, "format": "int", "tokens": t, "loss_16": loss16, "epochs": t / 1e8,
                             "qid": 0.05 + 0.01 * i + off + seed_effect[s] + 1e-4 * rng.standard_normal()})
    return rows, runs


SEL = Selection("gptq", 3, 128, "int")


def test_comparison_is_paired_by_seed_and_states_a_difference_only_when_the_ci_excludes_zero():
    rows, runs = synthetic(0.012, seed_sd=0.01)
    comp = {c.variant: c for c in compare_techniques(rows, runs, SEL, "dense")}
    moe = comp["moe"]
    assert moe.seeds == 4 and moe.diff.n == 4 and moe.diff.estimate == pytest.approx(0.012, abs=1e-3)
    # pairing removes the shared seed effect (sd 0.01): the paired interval is much narrower than that
    assert 0.0105 < moe.diff.lo < moe.diff.hi < 0.0135
    assert comp["moe"].qid.hi - comp["moe"].qid.lo > 0.005  # the unpaired spread over seeds stays wide
    text = " ".join(summary_sentences(list(comp.values()), SEL, "dense", 1000, {}, {3: 1e-4}))
    assert re.search(r"final checkpoint: \*\*moe\*\* loses 0\.01\d nats more than \*\*dense\*\*", text)
    assert "At equal active params" in text and "Noise floor at 3-bit GPTQ" in text

    rows, runs = synthetic(0.0, seed_sd=0.01)
    comp = compare_techniques(rows, runs, SEL, "dense")
    text = " ".join(summary_sentences(comp, SEL, "dense", 1000, {}, {}))
    assert "final checkpoint: no detectable difference to dense" in text and "loses" not in text

    for r in runs[4:]:  # not an equal-active-params comparison: said so
        r["params_active"] = 3000
    text = " ".join(summary_sentences(compare_techniques(*synthetic(0.012, 0.01)[:1], runs, SEL, "dense"), SEL,
                                      "dense", 1000, {}, {}))
    assert "Active params differ" in text


def test_matched_loss_comparison_interpolates_each_series_at_the_worse_final_loss():
    # moe trains to a 0.1 lower loss with the same QiD-vs-step curve: at the final checkpoints it looks no
    # different, but at matched 16-bit loss (4.0 - 1.0 = 3.0) moe is half a step earlier on its curve
    rows, runs = synthetic(0.0, seed_sd=0.0, loss_gain=0.1)
    moe = next(c for c in compare_techniques(rows, runs, SEL, "dense") if c.variant == "moe")
    assert moe.matched_loss == pytest.approx(3.0)
    assert moe.matched_diff.estimate == pytest.approx(-0.005, abs=2e-4)
    assert moe.diff.estimate == pytest.approx(0.0, abs=2e-4)


def test_one_seed_gives_no_interval_and_no_claim():
    rows, runs = synthetic(0.05, seed_sd=0.01, n_seeds=1)
    comp = compare_techniques(rows, runs, SEL, "dense")
    moe = next(c for c in comp if c.variant == "moe")
    assert moe.diff.n == 1 and math.isnan(moe.diff.lo)
    text = " ".join(summary_sentences(comp, SEL, "dense", 1000, {}, {}))
    assert "too few for an interval, so no claim" in text and "loses" not in text


def test_identical_techniques_are_rarely_called_different():
    """Simulated check: two variants with the same truth, 3 paired seeds; the paired t-interval excludes 0
    in about 5 % of experiments (here at most 7 % of 1000)."""
    called = 0
    for i in range(1000):
        rows, runs = synthetic(0.0, seed_sd=0.01, n_seeds=3, rng_seed=100 + i)
        moe = next(c for c in compare_techniques(rows, runs, SEL, "dense") if c.variant == "moe")
        called += not moe.diff.includes_zero
    assert called / 1000 <= 0.07
