"""`efftrain report`: HTML (self-contained) + Markdown from a real tiny grid, and summary sentences
generated from the numbers."""

import base64
import re

import pytest
import yaml

from efftrain.analysis.report import Selection, build_report, compare_variants, summary_sentences
from efftrain.cli import main as cli
from efftrain.grid.runner import run_grid
from efftrain.grid.spec import GridError

from conftest import tiny_raw

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory, cache_dir):
    """dense / MoE / FP8 variants of the tiny config, 12 steps, 4 checkpoints, RTN at 2 and 3 bits."""
    tmp = tmp_path_factory.mktemp("report-grid")
    raw = tiny_raw(cache_dir)
    raw["checkpoint"] = {"tokens": [512, 1024, 1536], "resume_every": 100, "async_save": False}
    (tmp / "base.yaml").write_text(yaml.safe_dump(raw))
    spec = {"name": "report-test", "base": "base.yaml", "runs_dir": str(tmp / "runs"),
            "variants": {"dense": {}, "moe": {"model.moe.enabled": True, "model.moe.num_routed_experts": 4,
                                              "model.moe.expert_hidden": 16, "model.moe.top_k": 2},
                         "fp8": {"fp8.enabled": True}},
            "ptq": {"methods": ["rtn"], "bits": [2, 3], "calib_samples": 8}}  # (GPTQ of FP8 models is slow on CPU)
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
    assert len(sources) == 7  # loss, QiD vs tokens, QiD vs N, k-bit, variants, MoE balance, FP8 gap
    for src in sources:  # every image inlined: the file stands alone
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    md = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == len(sources)
    for name in images:
        assert (out / name).read_bytes()[:8] == PNG
    for section in ("## Summary", "## Grid", "## Training", "## Quantization-induced degradation",
                    "## Technique diagnostics", "## Fitted laws"):
        assert section in md
    assert "moe_balance_" in md and "fp8_gap_" in md
    summary = md.split("## Summary")[1].split("## Grid")[0]
    assert "baseline **dense**" in summary and "**moe**" in summary and "**fp8**" in summary
    assert "model.moe.enabled" in md and "fp8.enabled" in md  # the differing config fields
    assert "ouyang: QiD = k * D^beta" in md and "R² (log)" in md
    # the cells' N lie within a factor 2, so the pooled α is flagged as not identified
    assert "so α is not identified by these cells" in summary


def test_report_cli_prints_the_path_and_rejects_unknown_baseline(tiny_grid, tmp_path, capsys):
    out = tmp_path / "r"
    assert cli(["report", str(tiny_grid), "--out", str(out), "--n-boot", "20"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.html")
    assert cli(["report", str(tiny_grid), "--out", str(out), "--baseline", "nope"]) == 2
    assert "--baseline 'nope' is not a cell name" in capsys.readouterr().err


def test_report_of_a_grid_that_never_ran(tmp_path, cache_dir):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_raw(cache_dir)))
    spec = tmp_path / "g.yaml"
    spec.write_text(yaml.safe_dump({"name": "g", "base": "base.yaml", "runs_dir": str(tmp_path / "runs")}))
    with pytest.raises(GridError, match="no results database"):
        build_report(spec, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# summary sentences come from the numbers
# ----------------------------------------------------------------------------------------------
def synthetic(offset_b: float, noise: float):
    import numpy as np

    rng = np.random.default_rng(1)
    runs = [{"key": "k1", "name": "dense", "kind": "main", "params_active": 1000},
            {"key": "k2", "name": "moe", "kind": "main", "params_active": 1010}]
    rows = []
    for run, off in (("dense", 0.0), ("moe", offset_b)):
        for i, t in enumerate((1e6, 2e6, 4e6, 8e6, 1.6e7, 3.2e7)):
            rows.append({"run_key": "k1" if run == "dense" else "k2", "variant": run, "method": "gptq", "bits": 3,
                         "group_size": 128, "format": "int", "tokens": t,
                         "qid": 0.05 + 0.01 * i + off + noise * rng.standard_normal()})
    return rows, runs


def test_summary_states_a_difference_only_when_the_ci_excludes_zero():
    sel = Selection("gptq", 3, 128, "int")
    rows, runs = synthetic(0.12, 0.005)
    comp = compare_variants(rows, runs, sel, "dense", n_boot=500)
    moe = next(c for c in comp if c["variant"] == "moe")
    assert moe["paired"] and moe["n_pairs"] == 6 and moe["diff"] == pytest.approx(0.12, abs=0.01)
    assert moe["diff_lo"] > 0.1 and moe["diff_hi"] < 0.14
    text = " ".join(summary_sentences(comp, sel, "dense", 1000, {}, {}))
    assert re.search(r"at 3-bit GPTQ, \*\*moe\*\* checkpoints lose 0\.1\d\d \[0\.1\d\d, 0\.1\d\d\] nats more than "
                     r"\*\*dense\*\* at equal active params", text)

    rows, runs = synthetic(0.0, 0.02)
    comp = compare_variants(rows, runs, sel, "dense", n_boot=500)
    text = " ".join(summary_sentences(comp, sel, "dense", 1000, {}, {3: (0, 12)}))
    assert "no detectable difference to dense" in text and "the 95% CI includes 0" in text
    assert "lose" not in text

    runs[1]["params_active"] = 3000  # not an equal-active-params comparison: said so
    rows, _ = synthetic(0.12, 0.005)
    text = " ".join(summary_sentences(compare_variants(rows, runs, sel, "dense", n_boot=200), sel, "dense", 1000,
                                      {}, {3: (8, 12)}))
    assert "active params differ" in text and "8 of 12 rows have QiD ≤ 0" in text
