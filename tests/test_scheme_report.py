"""The report of PTQ schemes beyond weight-only (issue 19): the weight-only predicate that keeps them out
of the existing analysis, the KV-cache section (QiD against KV bytes per token, MLA vs MHA) and the
other-schemes section (activation quantization, SmoothQuant, FP8, BiLLM, rotations and their effect on the
per-run slopes). Fast: rows and stores are simulated from a known truth, nothing is trained.

Truths
  * weight-only rows: QiD = k·D^β_run·exp(noise) over 7 log-spaced D per run (as tests/test_slopes.py);
  * KV rows: QiD of (attention, KV quantizer) = a fixed value + a seed effect shared by the runs of one
    seed (what pairing by seed removes) + a little noise, with bytes per token given per setting;
  * rotation rows: per run, slope(with) = slope(without) + δ + a run-level deviation, so the paired
    difference of the per-run slopes is an unbiased estimate of δ with a t-interval over seeds.
"""

import math
import re
import shutil
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest

from efftrain.analysis.compare import is_weight_only, series_labels
from efftrain.analysis.report import _cluster_rows, analyse, build_report
from efftrain.analysis.report_parts import Context, load_grid_results
from efftrain.analysis.report_schemes import (KV_16, kv_attention_comparisons, kv_points, kv_sentence,
                                              rotation_sentence, rotation_slopes, scheme_family, scheme_points)
from efftrain.grid.store import PTQ_COLUMNS, ResultsStore

TOKENS = np.geomspace(4e6, 1e8, 7)
WARMUP = 100
NEW_COLUMNS = ("scheme", "act_quant", "kv_quant", "kv_bytes_per_token", "rotation", "smooth_alpha")
QUIET = dict(log=lambda *_: None)


# --------------------------------------------------------------------------- simulated grids
def make_runs(variants: dict[str, str], n_seeds: int) -> list[dict]:
    """Runs of each variant (name -> model.attention) x n_seeds, as load_grid_results gives them."""
    return [{"key": f"{v}-{s}", "name": f"{v},seed={s}", "replicate": v, "seed": s, "data_seed": s, "kind": "main",
             "parent": None, "params_active": 1000, "status": "done",
             "config": {"model": {"attention": att}, "train": {"seed": s}}}
            for v, att in variants.items() for s in range(n_seeds)]


def weight_only_rows(runs: list[dict], rng, methods=("gptq", "rtn"), bits=3, beta=0.5, k=1e-5,
                     kv_bytes: float | None = None) -> list[dict]:
    rows = []
    for run in runs:
        b_run = beta + 0.05 * rng.standard_normal()
        for m in methods:
            for i, d in enumerate(TOKENS):
                q = k * d**b_run * math.exp(0.05 * rng.standard_normal()) * (1.5 if m == "rtn" else 1.0)
                rows.append({"run_key": run["key"], "method": m, "bits": bits, "group_size": 128, "format": "int",
                             "tokens": float(d), "step": 200 + i, "warmup_steps": WARMUP, "qid": q,
                             "qid_se": 0.01 * q, "kv_bytes_per_token": kv_bytes})
    return rows


def scheme_rows(runs: list[dict], base: list[dict], rng) -> list[dict]:
    """Rows of every scheme family at each checkpoint of each run, on top of the 3-bit GPTQ rows `base`."""
    out = []
    for r in base:
        if r["method"] != "gptq":
            continue
        q = r["qid"]
        common = {k: r[k] for k in ("run_key", "tokens", "step", "warmup_steps")}
        out += [
            {**r, "format": "int+a8", "scheme": "w3a8", "act_quant": "a8", "qid": q + 0.02, "qid_se": 1e-3},
            {**r, "format": "int+sq0.5+a8", "scheme": "w3a8+sq0.5", "act_quant": "a8", "smooth_alpha": 0.5,
             "qid": q + 0.01, "qid_se": 1e-3},
            {**r, "format": "int+rot-hadamard", "scheme": "w3a16+rot-hadamard", "rotation": "hadamard",
             "qid": 0.8 * q * math.exp(0.05 * rng.standard_normal()), "qid_se": 0.008 * q},
            {**common, "method": "none", "bits": 16, "group_size": -1, "format": "none+kv-int4",
             "scheme": "w16a16+kv-int4", "kv_quant": "kv-int4", "kv_bytes_per_token": 1056.0,
             "qid": 0.03 + 1e-3 * rng.standard_normal(), "qid_se": 1e-3},
            {**common, "method": "fp8-block", "bits": 8, "group_size": 128, "format": "fp8+afp8", "scheme": "fp8",
             "act_quant": "afp8", "qid": 0.004, "qid_se": 1e-4},
        ]
    return out


def write_store(path, runs: list[dict], rows: list[dict]):
    """A results store written through the ResultsStore API (checkpoints, params, PTQ rows)."""
    with ResultsStore(path) as store:
        for run in runs:
            config = SimpleNamespace(to_dict=lambda c=run["config"]: c)
            cell = SimpleNamespace(key=run["key"], name=run["name"], kind="main", parent=None, schedule=None,
                                   values={"v": run["replicate"]}, config=config,
                                   replicate=run["replicate"], seed=run["seed"], data_seed=run["data_seed"])
            store.register_cell(cell, ckpt_expected=len(TOKENS), ptq_expected=0)
            store.set_status(run["key"], "done")
            store.set_params(run["key"], {"total": 20_000, "active": 20_000, "non_embedding": 10_000,
                                          "embedding": 10_000})
            store.add_checkpoints(run["key"], [{"step": 200 + j, "tokens": int(d), "val_loss": 4.0 - 0.1 * j}
                                               for j, d in enumerate(TOKENS)])
            for r in rows:
                if r["run_key"] == run["key"]:
                    j = int(r["step"]) - 200
                    store.add_ptq_row({**r, "tokens": int(r["tokens"]), "loss_16": 4.0 - 0.1 * j,
                                       "loss_q": 4.0 - 0.1 * j + r["qid"], "params_quantized": 10_000,
                                       "params_nonembed": 10_000, "seed": run["seed"],
                                       "data_seed": run["data_seed"], "run_id": run["key"]}, cell)
    return path


def sections(md: str) -> dict[str, str]:
    """'## heading' -> its text (up to the next '## '), the report's title block left out."""
    parts = re.split(r"^## ", md, flags=re.M)[1:]
    return {p.split("\n", 1)[0]: p.strip() for p in parts}


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """The same weight-only grid twice: once alone (an old store: without the scheme columns at all),
    once with scheme rows added as the new sweep writes them (kv_bytes_per_token on every row)."""
    tmp = tmp_path_factory.mktemp("scheme-report")
    runs = make_runs({"dense": "mha", "latent": "mla"}, n_seeds=3)
    base = weight_only_rows(runs, np.random.default_rng(5))
    old = write_store(tmp / "old" / "results.sqlite", runs, base)
    new_base = [{**r, "kv_bytes_per_token": 4096.0} for r in base]
    new = write_store(tmp / "new" / "results.sqlite", runs,
                      new_base + scheme_rows(runs, new_base, np.random.default_rng(6)))
    # the old store as an efftrain from before issue 19 wrote it: no scheme columns
    con = sqlite3.connect(old)
    for c in NEW_COLUMNS:
        con.execute(f"ALTER TABLE ptq DROP COLUMN {c}")
    con.commit()
    con.close()
    reports = {}
    for name, db in (("old", old), ("new", new)):
        build_report(db, tmp / f"out-{name}", n_boot=20, **QUIET)
        reports[name] = (tmp / f"out-{name}" / "report.md").read_text()
    return SimpleNamespace(tmp=tmp, runs=runs, old=old, new=new, md=reports)


# --------------------------------------------------------------------------- 1. the weight-only predicate
def test_is_weight_only_follows_the_contract():
    plain = {"method": "gptq", "bits": 3, "group_size": 128, "format": "int"}
    assert is_weight_only(plain)  # a row from before the scheme columns
    assert is_weight_only({**plain, **{c: None for c in NEW_COLUMNS}, "kv_bytes_per_token": 4096.0, "scheme": "w3a16"})
    assert is_weight_only({**plain, "act_quant": "", "kv_quant": "", "rotation": "", "smooth_alpha": ""})  # CSV cells
    assert is_weight_only({**plain, "smooth_alpha": float("nan")})
    assert is_weight_only({**plain, "format": "int+lora-t65536-r8-a16", "recovery_method": "lora"})
    assert is_weight_only({**plain, "method": "billm", "bits": 1})
    assert is_weight_only({**plain, "method": "fp8-block", "bits": 8})
    for extra in ({"act_quant": "a8"}, {"kv_quant": "kv-int4"}, {"rotation": "hadamard"}, {"smooth_alpha": 0.5},
                  {"method": "none", "bits": 16, "group_size": -1}):
        assert not is_weight_only({**plain, **extra}), extra


def test_scheme_families():
    r = {"method": "gptq", "bits": 4, "format": "int"}
    assert scheme_family(r) is None
    assert scheme_family({**r, "act_quant": "a8"}) == "act"
    assert scheme_family({**r, "act_quant": "a8", "smooth_alpha": 0.5}) == "smoothquant"
    assert scheme_family({**r, "rotation": "hadamard", "act_quant": "a8"}) == "rotation"
    assert scheme_family({**r, "kv_quant": "kv-int4", "act_quant": "a8"}) is None  # the KV section's
    assert scheme_family({**r, "method": "billm", "bits": 1}) == "billm"
    assert scheme_family({**r, "method": "fp8-block", "bits": 8}) == "fp8-block"
    assert scheme_family({**r, "method": "fp8-block", "bits": 8, "act_quant": "afp8"}) == "fp8"


# --------------------------------------------------------------------------- 2. existing reports unchanged
def test_scheme_rows_leave_every_existing_section_unchanged(grids):
    old, new = sections(grids.md["old"]), sections(grids.md["new"])
    assert "KV-cache quantization" not in old and "Other PTQ schemes" not in old  # no such rows: no heading
    assert "KV-cache quantization" in new and "Other PTQ schemes" in new
    for heading, text in old.items():
        if heading in ("Grid", "Notes"):  # the grid's per-run count of PTQ rows counts every recorded row
            continue
        assert new[heading] == text, heading
    assert "kept out of the fits, comparisons, slopes and plots" in new["Notes"]
    assert all(line in new["Notes"] for line in old.get("Notes", "").splitlines()[1:])
    # the new sections come after recovery and before the fitted laws
    order = list(new)
    assert order.index("Per-run slopes of log QiD vs log D") < order.index("KV-cache quantization") \
        < order.index("Other PTQ schemes") < order.index("Fitted laws")


def _context(db, method=None, bits=None) -> Context:
    res = load_grid_results(db)
    rows = _cluster_rows([r for r in res.rows if r.get("qid") is not None], res.runs)
    ctx = Context(res=res, out=db.parent, baseline="dense", n_boot=20, labels=series_labels(res.runs),
                  rows=[r for r in rows if is_weight_only(r)], all_rows=rows)
    analyse(ctx, method, bits)
    return ctx


def test_fits_and_comparison_numbers_are_the_same_with_scheme_rows_billm_included(grids):
    """BiLLM rows are weight-only (a method of their own): they add their own fit, but leave the default
    selection, the comparison and every other method's fit and slopes as they were."""
    db = grids.tmp / "billm" / "results.sqlite"
    shutil.copytree(grids.new.parent, db.parent)
    extra = [{**r, "method": "billm", "bits": 1, "format": "int", "scheme": "w1a16", "qid": 10 * r["qid"]}
             for r in weight_only_rows(grids.runs, np.random.default_rng(9), methods=("gptq",))]
    write_store(db, grids.runs, extra)
    for name, path in (("old", grids.old), ("new", grids.new), ("billm", db)):
        ctx = _context(path)
        got = (ctx.sel, [(c.variant, c.qid, c.diff, c.matched_diff) for c in ctx.comparison],
               {law: {m: fr.params for m, (fr, _) in fits.items() if m in ("gptq", "rtn")}
                for law, fits in ctx.pooled.items()},
               {law: {v: fr.params for v, (fr, _) in fits.items()} for law, fits in ctx.variant_fits.items()},
               [(g.variant, g.method, g.mean) for g in ctx.slopes if g.method in ("gptq", "rtn")])
        if name == "old":
            want = got
        else:
            assert got == want, name
    assert "billm" in ctx.pooled["ouyang"]  # its own fit
    assert ctx.sel.method == "gptq"
    ctx = _context(db, method="billm", bits=1)  # still selectable by name
    assert ctx.sel.method == "billm" and ctx.sel.bits == 1


def test_an_old_store_opened_for_writing_gains_the_columns_and_reports_the_same(grids, tmp_path):
    db = tmp_path / "results.sqlite"
    shutil.copy(grids.old, db)
    con = sqlite3.connect(db)
    assert not set(NEW_COLUMNS) & {r[1] for r in con.execute("PRAGMA table_info(ptq)")}
    con.close()
    with ResultsStore(db) as store:  # migrates: ALTER TABLE ADD COLUMN, old rows NULL
        have = {r[1] for r in store.con.execute("PRAGMA table_info(ptq)")}
        assert set(NEW_COLUMNS) <= have and set(NEW_COLUMNS) <= {c for c, _ in PTQ_COLUMNS}
        rows = store.ptq_rows()
    assert rows and all(r[c] is None for r in rows for c in NEW_COLUMNS)
    assert all(is_weight_only(r) for r in rows)
    build_report(db, tmp_path / "out", n_boot=20, **QUIET)
    md = sections((tmp_path / "out" / "report.md").read_text())
    assert md == sections(grids.md["old"])


# --------------------------------------------------------------------------- 3. the KV-cache section
MHA_BYTES = {"kv-int8": 2112.0, "kv-int4": 1056.0}
MLA_BYTES = {"kv-int8": 1056.0, "kv-int4": 544.0}


def kv_grid(truth: dict[tuple[str, str], float], n_seeds: int = 4, seed_sd: float = 0.01, noise_sd: float = 1e-3,
            rng=None):
    """runs 'mha' and 'mla' x n_seeds and their 16-bit-weight KV rows at 3 checkpoints (QiD of each
    (attention, kv) = truth + a seed effect shared by the seed's runs + noise; the last checkpoint counts)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    runs = make_runs({"mha": "mha", "mla": "mla"}, n_seeds)
    effect = {s: seed_sd * rng.standard_normal() for s in range(n_seeds)}
    rows = []
    for run in runs:
        att = run["config"]["model"]["attention"]
        for (a, kv), q in truth.items():
            if a != att:
                continue
            for i, d in enumerate(TOKENS[-3:]):
                rows.append({"run_key": run["key"], "method": "none", "bits": 16, "group_size": -1,
                             "format": f"none+{kv}", "kv_quant": kv, "scheme": f"w16a16+{kv}", "tokens": float(d),
                             "step": 200 + i, "kv_bytes_per_token": (MHA_BYTES if a == "mha" else MLA_BYTES)[kv],
                             # earlier checkpoints are off by 1: only the final one may enter
                             "qid": q + effect[run["seed"]] + noise_sd * rng.standard_normal() + (i < 2),
                             "qid_se": noise_sd})
    return rows, runs


def test_kv_points_take_each_runs_final_checkpoint_and_its_attention():
    rows, runs = kv_grid({("mha", "kv-int8"): 0.01, ("mha", "kv-int4"): 0.04, ("mla", "kv-int8"): 0.02,
                          ("mla", "kv-int4"): 0.06}, seed_sd=0.0, noise_sd=0.0)
    pts = kv_points(rows, runs, series_labels(runs))
    got = {(p.variant, p.attention, p.kv): (p.bytes_per_token, p.final.seeds, p.final.interval.estimate)
           for p in pts}
    assert got == {("mha", "mha", "kv-int8"): (2112.0, 4, pytest.approx(0.01)),
                   ("mha", "mha", "kv-int4"): (1056.0, 4, pytest.approx(0.04)),
                   ("mla", "mla", "kv-int8"): (1056.0, 4, pytest.approx(0.02)),
                   ("mla", "mla", "kv-int4"): (544.0, 4, pytest.approx(0.06))}
    assert all(p.weights == ("none", 16, -1, "none") for p in pts)
    assert pts[0].final.window_se == pytest.approx(0.0)


@pytest.mark.parametrize("gap", [-0.015, 0.015])
def test_mla_vs_mha_names_the_attention_with_the_lower_qid_at_equal_bytes(gap):
    # equal bytes: MHA kv-int4 and MLA kv-int8 both cache 1056 B/token; MLA's QiD there = MHA's + gap
    rows, runs = kv_grid({("mha", "kv-int8"): 0.01, ("mha", "kv-int4"): 0.04, ("mla", "kv-int8"): 0.04 + gap,
                          ("mla", "kv-int4"): 0.09}, rng=np.random.default_rng(1))
    labels = series_labels(runs)
    (c,) = kv_attention_comparisons(kv_points(rows, runs, labels), runs, labels)
    assert (c.mha.kv, c.mla.kv) == ("kv-int4", "kv-int8")
    assert c.diff.n == 4 and c.diff.lo < gap < c.diff.hi and c.diff.estimate == pytest.approx(gap, abs=3e-3)
    # pairing removes the seed effect (sd 0.01): the interval is far narrower than the seed spread
    assert c.diff.hi - c.diff.lo < 0.01
    text = kv_sentence(c)
    winner = "MLA" if gap < 0 else "MHA"
    assert f"**{winner}** has the lower QiD" in text and "at equal KV-cache bytes per token (1.06k B/token" in text
    assert "16-bit weights" in text and "(4 seed pairs)" in text and "no detectable" not in text


def test_mla_vs_mha_says_no_detectable_difference_when_the_truth_is_equal():
    calls = 0
    for i in range(200):
        rows, runs = kv_grid({("mha", "kv-int4"): 0.04, ("mla", "kv-int8"): 0.04}, n_seeds=3,
                             rng=np.random.default_rng(100 + i))
        labels = series_labels(runs)
        (c,) = kv_attention_comparisons(kv_points(rows, runs, labels), runs, labels)
        text = kv_sentence(c)
        if "no detectable difference" in text:
            assert "has the lower QiD" not in text and re.search(r"QiD\(MLA\) − QiD\(MHA\) = [+-]", text)
        else:
            calls += 1
    assert calls / 200 <= 0.09  # a 95% interval: about 5% false calls


def test_mla_vs_mha_at_the_nearest_bytes_and_with_one_seed():
    rows, runs = kv_grid({("mha", "kv-int4"): 0.04, ("mla", "kv-int4"): 0.02}, n_seeds=1)
    labels = series_labels(runs)
    (c,) = kv_attention_comparisons(kv_points(rows, runs, labels), runs, labels)
    text = kv_sentence(c)
    assert "at the nearest KV-cache bytes per token (MHA kv-int4: 1.06k B/token, MLA kv-int4: 544 B/token" in text
    assert "too few for an interval, so no claim" in text and "lower QiD" not in text


def test_kv_groups_by_the_weight_setting_and_adds_its_16_bit_cache_point():
    rows, runs = kv_grid({("mha", "kv-int4"): 0.04, ("mla", "kv-int4"): 0.02}, n_seeds=2)
    # 3-bit GPTQ weights: weight-only rows (16-bit cache) and the same weights with an int4 cache
    for r in list(rows):
        att = "mha" if r["run_key"].startswith("mha") else "mla"
        w = {**r, "method": "gptq", "bits": 3, "group_size": 128}
        rows.append({**w, "format": "int", "kv_quant": None, "scheme": "w3a16", "qid": 0.1,
                     "kv_bytes_per_token": {"mha": 4096.0, "mla": 1088.0}[att]})
        rows.append({**w, "format": "int+kv-int4", "qid": 0.12})
    labels = series_labels(runs)
    pts = kv_points(rows, runs, labels)
    assert [p.weights for p in pts][0] == ("none", 16, -1, "none")  # 16-bit weights first
    gptq = {(p.variant, p.kv) for p in pts if p.weights == ("gptq", 3, 128, "int")}
    assert gptq == {("mha", KV_16), ("mha", "kv-int4"), ("mla", KV_16), ("mla", "kv-int4")}
    comps = kv_attention_comparisons(pts, runs, labels)
    assert [c.weights for c in comps] == [("none", 16, -1, "none"), ("gptq", 3, 128, "int")]
    assert "3-bit GPTQ weights (group 128, int)" in kv_sentence(comps[1])


def test_the_kv_section_in_the_report(tmp_path):
    rows, runs = kv_grid({("mha", "kv-int8"): 0.01, ("mha", "kv-int4"): 0.04, ("mla", "kv-int8"): 0.02,
                          ("mla", "kv-int4"): 0.06}, n_seeds=3)
    rows += weight_only_rows(runs, np.random.default_rng(2), methods=("rtn",))
    build_report(write_store(tmp_path / "results.sqlite", runs, rows), tmp_path / "out", n_boot=10, **QUIET)
    md = sections((tmp_path / "out" / "report.md").read_text())
    assert "Other PTQ schemes" not in md
    kv = md["KV-cache quantization"]
    assert "### 16-bit weights" in kv and "![" in kv and "**MLA** has the lower QiD" in kv
    assert "| mla | MLA | kv-int4 | 544 | 3 |" in kv and "| mha | MHA | kv-int8 | 2.11k | 3 |" in kv
    (img,) = re.findall(r"!\[[^\]]*\]\(([\w.-]+\.png)\)", kv)
    assert (tmp_path / "out" / img).read_bytes()[:4] == b"\x89PNG"
    # the weight-only RTN analysis is there as without the KV rows
    assert "3-bit RTN" in md["Summary"]


# --------------------------------------------------------------------------- 4. the other schemes
def test_scheme_points_and_their_paired_difference_to_the_weights_alone(grids):
    res = load_grid_results(grids.new)
    pts = scheme_points(res.rows, res.runs, series_labels(res.runs))
    by = {(p.family, p.fmt, p.variant): p for p in pts}
    assert {k[:2] for k in by} == {("act", "int+a8"), ("smoothquant", "int+sq0.5+a8"), ("fp8", "fp8+afp8"),
                                   ("rotation", "int+rot-hadamard")}
    act = by[("act", "int+a8", "dense")]
    assert act.scheme == "w3a8" and act.base_fmt == "int" and act.final.seeds == 3
    assert act.final.diff_to_base().estimate == pytest.approx(0.02) and act.final.diff_to_base().n == 3
    assert by[("fp8", "fp8+afp8", "dense")].final.base == {}  # no FP8-block weight-only rows in this grid
    md = sections(grids.md["new"])["Other PTQ schemes"]
    for heading in ("### Activation quantization", "### SmoothQuant", "### FP8: E4M3 block weights",
                    "### Rotations"):
        assert heading in md
    assert "| w3a8 | 3-bit GPTQ weights (group 128, int) | int+a8 | dense | 3 |" in md
    assert "Does rotation (hadamard) shrink QiD growth with tokens?" in md


def rotation_grid(delta: float, n_seeds: int, slope_sd: float = 0.05, diff_sd: float = 0.03, noise_sd: float = 0.02,
                  rng=None, beta: float = 0.6):
    """Per run: slope without rotation β + u, with rotation β + u + δ + v (u, v run-level), QiD = k·D^slope·
    exp(noise) at the 7 checkpoints, weight-only ('int') and rotated ('int+rot-hadamard') rows."""
    rng = rng if rng is not None else np.random.default_rng(0)
    runs = make_runs({"dense": "mha"}, n_seeds)
    rows = []
    for run in runs:
        u, v = slope_sd * rng.standard_normal(), diff_sd * rng.standard_normal()
        for fmt, slope, extra in (("int", beta + u, {}), ("int+rot-hadamard", beta + u + delta + v,
                                                          {"rotation": "hadamard", "scheme": "w3a16+rot-hadamard"})):
            for i, d in enumerate(TOKENS):
                q = 1e-5 * d**slope * math.exp(noise_sd * rng.standard_normal())
                rows.append({"run_key": run["key"], "method": "gptq", "bits": 3, "group_size": 128, "format": fmt,
                             "tokens": float(d), "step": 200 + i, "warmup_steps": WARMUP, "qid": q,
                             "qid_se": 0.01 * q, **extra})
    return rows, runs


def test_rotation_slope_difference_recovers_a_known_difference_within_its_ci():
    rows, runs = rotation_grid(-0.3, n_seeds=4, rng=np.random.default_rng(3))
    (r,) = rotation_slopes(rows, runs)
    assert (r.variant, r.fmt, r.base_fmt, r.rotation) == ("dense", "int+rot-hadamard", "int", "hadamard")
    assert r.diff.n == 4 and r.diff.lo < -0.3 < r.diff.hi and r.diff.hi < 0
    assert r.with_rotation.mean.estimate == pytest.approx(0.3, abs=0.1)
    assert r.without.mean.estimate == pytest.approx(0.6, abs=0.1)
    assert r.verdict == "rotation shrinks QiD growth with tokens"
    text = rotation_sentence(r)
    assert "Does rotation (hadamard) shrink QiD growth with tokens? **dense**, 3-bit GPTQ (group 128)" in text
    assert "over 4 seed pairs: rotation shrinks QiD growth with tokens." in text


def test_rotation_slope_difference_covers_the_truth_and_says_no_detectable_difference_at_zero():
    covered, called = 0, 0
    for i in range(150):
        rows, runs = rotation_grid(0.0, n_seeds=3, rng=np.random.default_rng(200 + i))
        (r,) = rotation_slopes(rows, runs)
        covered += r.diff.lo <= 0.0 <= r.diff.hi
        called += r.verdict != "no detectable difference"
        if r.verdict == "no detectable difference":
            assert rotation_sentence(r).endswith(": no detectable difference.")
    assert covered / 150 >= 0.9 and called / 150 <= 0.1


def test_rotation_with_one_seed_makes_no_claim():
    rows, runs = rotation_grid(-0.3, n_seeds=1)
    (r,) = rotation_slopes(rows, runs)
    assert r.diff.n == 1 and r.verdict == "one seed pair: no interval, no claim"
