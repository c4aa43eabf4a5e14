"""Tests for efftrain.analysis.plots: each plot writes a valid, non-empty PNG on tiny
synthetic data and rejects empty input with a clear ValueError."""

import math

import numpy as np
import pytest

from efftrain.analysis import plots
from efftrain.analysis.fits import fit_law

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000  # a real rendered figure, not just a header
    assert b"IEND" in data[-12:]


def qid_rows():
    rows = []
    for method in ("gptq", "rtn"):
        for n in (1e7, 1e8):
            for d in (1e9, 1e10, 1e11):
                for p in (3, 4, 8):
                    q = 0.017 * d**0.5251 / (n**0.2261 * p**5.4967) * (2.0 if method == "rtn" else 1.0)
                    rows.append({"n_params": n, "tokens": d, "bits": p, "qid": q, "method": method})
    rows.append({"n_params": 1e8, "tokens": 1e9, "bits": 8, "qid": -1e-4, "method": "gptq"})  # not shown
    return rows


def test_loss_vs_tokens(tmp_path):
    evals = [{"run": run, "tokens": t, "val_loss": 5.0 - 0.3 * math.log10(t) + off}
             for run, off in (("wsd", 0.0), ("cosine", 0.05)) for t in (1e6, 1e7, 1e8)]
    out = plots.plot_loss_vs_tokens(evals, tmp_path / "sub" / "loss.png")
    assert out == tmp_path / "sub" / "loss.png"
    assert_png(out)


@pytest.mark.parametrize("with_fit", [False, True])
def test_qid_vs_tokens(tmp_path, with_fit):
    rows = qid_rows()
    fit = fit_law(rows, "ouyang", n_boot=0) if with_fit else None
    assert_png(plots.plot_qid_vs_tokens(rows, tmp_path / "qid_tokens.png", fit=fit))


def test_qid_vs_tokens_per_method_fits(tmp_path):
    rows = qid_rows()
    fits = {m: fit_law([r for r in rows if r["method"] == m], "kumar", n_boot=0) for m in ("gptq", "rtn")}
    assert_png(plots.plot_qid_vs_tokens(rows, tmp_path / "qid_tokens_m.png", fit=fits))


@pytest.mark.parametrize("at_tokens", ["final", 1e10, None])
def test_qid_vs_params(tmp_path, at_tokens):
    assert_png(plots.plot_qid_vs_params(qid_rows(), tmp_path / "qid_params.png", at_tokens=at_tokens))


def test_kbit(tmp_path):
    rows = []
    for bits, eff in ((3, 3.125), (4, 4.125), (8, 8.125), (16, 16.0)):
        for n in (1e7, 1e8, 1e9):
            rows.append({"bits": bits, "eff_bits": eff, "params_total": n,
                         "loss_q": 4.0 - 0.2 * math.log10(n) + 3.0 * 2.0 ** (-bits)})
    assert_png(plots.plot_kbit(rows, tmp_path / "kbit.png"))


def test_technique_qid(tmp_path):
    summary = [
        {"technique": "baseline", "qid": 0.05, "ci_lo": 0.04, "ci_hi": 0.06, "bits": 4},
        {"technique": "baseline", "qid": 0.30, "ci_lo": 0.25, "ci_hi": 0.36, "bits": 3},
        {"technique": "mla", "variant": "rank64", "qid": 0.07, "ci": 0.01, "bits": 4},
        {"technique": "mla", "variant": "rank64", "qid": 0.33, "ci": (0.3, 0.4), "bits": 3},
        {"technique": "fp8", "qid": 0.04, "bits": 4},  # no CI: bar without error bar
    ]
    assert_png(plots.plot_technique_qid(summary, tmp_path / "tech.png"))
    # no bits column -> one bar per technique
    assert_png(plots.plot_technique_qid([{k: v for k, v in r.items() if k != "bits"} for r in summary[::2]],
                                        tmp_path / "tech2.png"))


@pytest.mark.parametrize("layout", ["long", "wide"])
def test_moe_balance(tmp_path, layout):
    rng = np.random.default_rng(0)
    steps = range(0, 100, 10)
    if layout == "long":
        metrics = [{"step": s, "layer": l, "max_vio": float(1.0 / (1 + s / 20) + 0.05 * rng.random())}
                   for s in steps for l in range(3)]
    else:
        metrics = [{"step": s, "max_vio": list(1.0 / (1 + s / 20) + 0.05 * rng.random(3)),
                    "max_vio_global": 0.5 / (1 + s / 20)} for s in steps]
    assert_png(plots.plot_moe_balance(metrics, tmp_path / "moe.png"))


def test_fp8_gap(tmp_path):
    bf16 = [{"step": s, "loss": 6.0 / (1 + s / 50)} for s in range(0, 200, 5)]
    fp8 = [{"step": s, "loss": 6.0 / (1 + s / 50) * 1.001} for s in range(0, 200, 5)]
    assert_png(plots.plot_fp8_gap(bf16, fp8, tmp_path / "fp8.png", smooth=5))
    cols_b = {"step": [0, 1, 2], "train_loss": [3.0, 2.9, 2.8]}  # dict-of-columns input, auto loss key
    cols_f = {"step": [0, 1, 2], "train_loss": [3.01, 2.9, 2.81]}
    assert_png(plots.plot_fp8_gap(cols_b, cols_f, tmp_path / "fp8b.png"))
    with pytest.raises(ValueError, match="no common steps"):
        plots.plot_fp8_gap(bf16, [{"step": 1, "loss": 1.0}], tmp_path / "none.png")


@pytest.mark.parametrize(
    "call",
    [
        lambda p: plots.plot_loss_vs_tokens([], p),
        lambda p: plots.plot_qid_vs_tokens([], p),
        lambda p: plots.plot_qid_vs_params([], p),
        lambda p: plots.plot_kbit([], p),
        lambda p: plots.plot_technique_qid([], p),
        lambda p: plots.plot_moe_balance([], p),
        lambda p: plots.plot_fp8_gap([], [{"step": 0, "loss": 1.0}], p),
        lambda p: plots.plot_fp8_gap([{"step": 0, "loss": 1.0}], [], p),
    ],
)
def test_empty_input_raises(tmp_path, call):
    path = tmp_path / "empty.png"
    with pytest.raises(ValueError, match="empty input"):
        call(path)
    assert not path.exists()


def test_missing_keys_and_unplottable_rows(tmp_path):
    with pytest.raises(ValueError, match=r"missing required keys \['val_loss'\]"):
        plots.plot_loss_vs_tokens([{"run": "a", "tokens": 1}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rows with qid > 0"):
        plots.plot_qid_vs_tokens([{"n_params": 1e7, "tokens": 1e9, "bits": 4, "qid": -0.1}], tmp_path / "y.png")
