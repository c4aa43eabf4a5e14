"""The report of a grid: DIR/report.html (self-contained, PNGs inlined as data URIs) and DIR/report.md
(PNGs beside it), built from the grid's results store and its runs' metrics.jsonl.

Sections: summary (plain-language findings generated from the numbers, with the caveats the data
force), the grid (cells and the config fields that differ between them), training curves (val
loss vs tokens), QiD vs tokens per method with the fitted law, QiD vs N, the k-bit plot, a
per-variant QiD comparison at one (method, bits) with bootstrap CIs over checkpoints, MoE balance
and FP8-vs-BF16 gap plots when runs have those metrics, and the fitted laws with CIs and R².

Statistics
  * QiD of a variant at (method, bits, group size, format) = mean QiD over its checkpoints; the 95 %
    CI is a percentile bootstrap over checkpoints.
  * Difference to the baseline: checkpoints are paired by training tokens (within 5 %); the mean
    paired difference gets a bootstrap CI over pairs. With fewer than 2 pairs the means of the two
    series are compared (independent bootstrap). A CI that contains 0 is reported as "no detectable
    difference", never as a direction.
  * Laws (efftrain.analysis.fits): per method pooled over the cells, and per variant at the
    compared method. A variable with a single value in a group (one model size, one bit width)
    makes its exponent unidentifiable: it is held fixed (pooled fit, else the published value) and
    marked "(fixed)"; it is then absorbed into the prefactor and nothing is claimed about it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from efftrain.analysis import plots
from efftrain.analysis.fits import LAWS, FitResult, fit_law, format_param

Log = Callable[[str], None]

# Ouyang et al. 2024 (GPTQ on Pythia); used only to hold an unidentifiable exponent fixed
PUBLISHED = {"ouyang": {"alpha": 0.2261, "gamma": 5.4967, "beta": 0.5251},
             "kumar": {"gamma_N": 0.2261, "gamma_post": 1.0}}
# which exponent each data variable identifies
EXPONENT_OF = {"ouyang": {"n_params": "alpha", "bits": "gamma", "tokens": "beta"},
               "kumar": {"n_params": "gamma_N", "bits": "gamma_post", "tokens": "gamma_D"}}
TECHNIQUE_FIELDS = {"model.attention": "mha", "model.moe.enabled": False, "model.mtp.depth": 0, "fp8.enabled": False}


# ----------------------------------------------------------------------------------------------
# A tiny document model rendered to Markdown and HTML
# ----------------------------------------------------------------------------------------------
@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def ul(self, items: list[str]):
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[Any]]):
        self.blocks.append(("table", header, [[("" if c is None else str(c)) for c in r] for r in rows]))

    def image(self, path: Path, caption: str):
        self.blocks.append(("img", Path(path), caption))

    def pre(self, text: str):
        self.blocks.append(("pre", text))

    # ---- renderers ---------------------------------------------------------------------------
    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {x}" for x in b[1]))
            elif b[0] == "table":
                esc = [[c.replace("|", "\\|") for c in r] for r in [b[1]] + b[2]]
                out.append("\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])] +
                                     ["| " + " | ".join(r) + " |" for r in esc[1:]]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})\n\n*{b[2]}*")
            elif b[0] == "pre":
                out.append("```\n" + b[1].rstrip() + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:  # **bold** only
            return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))

        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{inline(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
            elif b[0] == "pre":
                body.append(f"<pre>{html.escape(b[1])}</pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                 "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.85em}"
                 "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}"
                 "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-size:0.85em;color:#555}"
                 "pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:0.8em}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass
class GridResults:
    name: str
    db_path: Path
    runs_dir: Path
    runs: list[dict]  # runs table, config parsed into "config"
    checkpoints: list[dict]
    rows: list[dict]  # ptq rows with n_params

    def run(self, key: str) -> dict | None:
        return next((r for r in self.runs if r["key"] == key), None)


def load_grid_results(source: str | Path) -> GridResults:
    from efftrain.grid.spec import GridError, load_spec
    from efftrain.grid.store import DB_NAME, ResultsStore
    from efftrain.tables import with_n_params

    path = Path(source)
    name = None
    if path.suffix in (".yaml", ".yml"):
        spec = load_spec(path)
        db, name = spec.db_path, spec.name
    elif path.is_dir():
        db = path / DB_NAME
    else:
        db = path
    with ResultsStore(db, read_only=True) as store:
        runs = store.runs()
        checkpoints = store.checkpoints()
        rows = with_n_params(store.ptq_rows())
    if not runs:
        raise GridError(f"{db}: no cells recorded (run `efftrain grid run SPEC` first)")
    for r in runs:
        r["config"] = json.loads(r["config_json"]) if r.get("config_json") else {}
    name = name or (runs[0]["config"].get("name") or db.parent.name)
    return GridResults(name=name, db_path=db, runs_dir=db.parent, runs=runs, checkpoints=checkpoints, rows=rows)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_fields(configs: list[dict]) -> list[str]:
    """Dotted config fields whose values differ between the configs (`name` excluded)."""
    flats = [_flatten(c) for c in configs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if k != "name" and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return out


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def bootstrap_mean(values, n_boot: int, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap of the mean (nan CI for fewer than 2 values)."""
    v = np.asarray(values, float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    if len(v) < 2 or n_boot <= 0:
        return float(v.mean()), math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [a, 100 - a])
    return float(v.mean()), float(lo), float(hi)


def bootstrap_diff(a, b, n_boot: int, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean(a) - mean(b), lo, hi), the two samples resampled independently."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = float(a.mean() - b.mean())
    if min(len(a), len(b)) < 2 or n_boot <= 0:
        return d, math.nan, math.nan
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, len(a), size=(n_boot, len(a)))].mean(axis=1)
    mb = b[rng.integers(0, len(b), size=(n_boot, len(b)))].mean(axis=1)
    lo, hi = np.percentile(ma - mb, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return d, float(lo), float(hi)


def pair_by_tokens(a: dict[float, float], b: dict[float, float], rel_tol: float = 0.05) -> list[tuple[float, float]]:
    """(a value, b value) for checkpoints whose token counts agree within rel_tol (each used once)."""
    pairs, used = [], set()
    for t in sorted(a):
        best = min((u for u in b if u not in used), key=lambda u: abs(math.log(u / t)), default=None)
        if best is not None and abs(best - t) <= rel_tol * t:
            used.add(best)
            pairs.append((a[t], b[best]))
    return pairs


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:.{max(digits - 2, 1)}f}"


def _sfmt(x: float) -> str:
    return _fmt(x) if not (isinstance(x, (int, float)) and math.isfinite(x)) or x < 0 else "+" + _fmt(x)


def _count(n) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def fit_group(rows: list[dict], law: str, *, n_boot: int, reference: dict[str, float] | None = None,
              group: dict | None = None, seed: int = 0) -> tuple[FitResult | None, list[str]]:
    """Fit with every unidentifiable exponent held fixed (reference values, else the published ones)."""
    good = [r for r in rows if isinstance(r.get("qid"), (int, float)) and math.isfinite(r["qid"]) and r["qid"] > 0]
    if len({r["tokens"] for r in good}) < 2:
        return None, [f"fewer than 2 token counts with QiD > 0 ({len(good)} of {len(rows)} rows positive)"]
    fixed, notes = {}, []
    for col in ("n_params", "bits"):
        if len({r[col] for r in good}) == 1:
            pname = EXPONENT_OF[law][col]
            value = (reference or {}).get(pname, PUBLISHED[law][pname])
            fixed[pname] = value
            notes.append(f"{col} takes one value, so {pname} is held at {value:.4g} (absorbed into the prefactor)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fit_law(rows, law, n_boot=n_boot, seed=seed, fixed=fixed, group=group)
        except (ValueError, ArithmeticError) as e:  # OverflowError: a replicate's exp(log k) overflowed
            return None, notes + [f"{type(e).__name__}: {e}" if isinstance(e, ArithmeticError) else str(e)]
    return result, notes + [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------
@dataclass
class Selection:
    method: str
    bits: int
    group_size: int
    fmt: str


def choose_selection(rows: list[dict], method: str | None, bits: int | None) -> Selection:
    from efftrain.grid.spec import GridError

    methods = sorted({r["method"] for r in rows})
    if method is None:
        method = "gptq" if "gptq" in methods else methods[0]
    elif method not in methods:
        raise GridError(f"--method {method}: not in the results (methods: {', '.join(methods)})")
    sub = [r for r in rows if r["method"] == method]
    fmts = Counter(r["format"] for r in sub)
    fmt = "int" if "int" in fmts else fmts.most_common(1)[0][0]
    sub = [r for r in sub if r["format"] == fmt]
    group = Counter(r["group_size"] for r in sub).most_common(1)[0][0]
    all_bits = sorted({r["bits"] for r in sub})
    if bits is None:
        bits = 3 if 3 in all_bits else next((b for b in all_bits if b >= 3), all_bits[0])
    elif bits not in all_bits:
        raise GridError(f"--bits {bits}: no {method} rows at that bit width (have {all_bits})")
    return Selection(method, int(bits), int(group), fmt)


def default_baseline(runs: list[dict]) -> str:
    for r in runs:
        flat = _flatten(r["config"])
        if r.get("kind", "main") == "main" and all(flat.get(k) == v for k, v in TECHNIQUE_FIELDS.items()):
            return r["name"]
    return runs[0]["name"]


def series_labels(runs: list[dict]) -> dict[str, str]:
    """Cell key -> the series its checkpoints belong to: a main cell's name; all cooldown branches of
    a run form one series "<run> [cooldown]", all its averages "<run> [avg]"."""
    name = {r["key"]: r["name"] for r in runs}
    out = {}
    for r in runs:
        kind = r.get("kind") or "main"
        tag = {"cooldown": "cooldown", "average": "avg"}.get(kind)
        out[r["key"]] = f"{name.get(r['parent'], r['parent'])} [{tag}]" if tag else r["name"]
    return out


def compare_variants(rows: list[dict], runs: list[dict], sel: Selection, baseline: str, n_boot: int) -> list[dict]:
    """Per series: mean QiD over checkpoints with CI, and the difference to the baseline."""
    labels = series_labels(runs)
    sub = [r for r in rows if r["method"] == sel.method and r["bits"] == sel.bits
           and r["group_size"] == sel.group_size and r["format"] == sel.fmt and r.get("qid") is not None]
    series: dict[str, dict[float, float]] = {}
    for r in sub:
        series.setdefault(labels.get(r["run_key"], r["variant"]), {})[float(r["tokens"])] = float(r["qid"])
    active = {labels[r["key"]]: r.get("params_active") for r in runs}
    out = []
    base = series.get(baseline)
    for v in dict.fromkeys(labels[r["key"]] for r in runs):
        if v not in series:
            continue
        qid = series[v]
        mean, lo, hi = bootstrap_mean(list(qid.values()), n_boot)
        item = {"variant": v, "n": len(qid), "qid": mean, "ci_lo": lo,
                "ci_hi": hi, "params_active": active.get(v), "baseline": v == baseline}
        if base is not None and v != baseline:
            pairs = pair_by_tokens(qid, base)
            if pairs:
                d, dlo, dhi = bootstrap_mean([a - b for a, b in pairs], n_boot)
                item.update(diff=d, diff_lo=dlo, diff_hi=dhi, n_pairs=len(pairs), paired=True)
            else:
                d, dlo, dhi = bootstrap_diff(list(qid.values()), list(base.values()), n_boot)
                item.update(diff=d, diff_lo=dlo, diff_hi=dhi, n_pairs=len(pairs), paired=False)
        out.append(item)
    return out


def _method_label(m: str) -> str:
    return {"gptq": "GPTQ", "rtn": "RTN", "awq": "AWQ"}.get(m, m)


def summary_sentences(comparison: list[dict], sel: Selection, baseline: str, base_active,
                      variant_fits: dict[str, tuple[FitResult | None, list[str]]],
                      quality: dict[int, tuple[int, int]]) -> list[str]:
    at = f"at {sel.bits}-bit {_method_label(sel.method)}"
    out = []
    n_nonpos, n_all = quality.get(sel.bits, (0, 0))
    if n_all and n_nonpos / n_all > 0.3:
        out.append(f"{at}, {n_nonpos} of {n_all} rows have QiD ≤ 0: the quantization error is at the noise level "
                   f"of the val loss here, so differences at this bit width are weak evidence.")
    for c in comparison:
        v = c["variant"]
        fit, _ = variant_fits.get(v, (None, []))
        trend = ""
        if fit is not None and "beta" not in fit.fixed:
            lo, hi = fit.ci.get("beta", (math.nan, math.nan))
            b = fit.params["beta"]
            if math.isfinite(lo) and lo > 0:
                trend = f" Its QiD grows with training tokens (Ouyang β = {b:.2f} [{lo:.2f}, {hi:.2f}])."
            elif math.isfinite(hi) and hi < 0:
                trend = f" Its QiD falls with training tokens (β = {b:.2f} [{lo:.2f}, {hi:.2f}])."
            elif math.isfinite(lo):
                trend = f" The data show no clear trend of its QiD with tokens (β = {b:.2f} [{lo:.2f}, {hi:.2f}])."
        if c["baseline"]:
            out.append(f"**{v}** (baseline): mean QiD {at} is {_fmt(c['qid'])} [{_fmt(c['ci_lo'])}, "
                       f"{_fmt(c['ci_hi'])}] nats over {c['n']} checkpoints.{trend}")
            continue
        if "diff" not in c:
            out.append(f"**{v}**: mean QiD {_fmt(c['qid'])} over {c['n']} checkpoints; no baseline rows to compare "
                       f"with.{trend}")
            continue
        d, lo, hi = c["diff"], c["diff_lo"], c["diff_hi"]
        how = (f"{c['n_pairs']} checkpoint(s) matched by training tokens" if c["paired"]
               else "no checkpoints at matching token counts: series means, which mix training lengths")
        act = c.get("params_active")
        if act and base_active:
            rel = abs(act - base_active) / base_active
            size = (f"at equal active params ({_count(act)})" if rel <= 0.05 else
                    f"but active params differ ({_count(act)} vs {_count(base_active)}), so part of the gap "
                    f"may be model size")
        else:
            size = ""
        if not (math.isfinite(lo) and math.isfinite(hi)):
            out.append(f"**{v}**: {at} the difference to {baseline} is {_sfmt(d)} nats ({how}); too few checkpoints "
                       f"for a confidence interval, so no claim.{trend}")
        elif lo > 0 or hi < 0:
            word = "more" if d > 0 else "less"
            out.append(f"{at}, **{v}** checkpoints lose {_fmt(abs(d))} [{_fmt(abs(lo if d > 0 else hi))}, "
                       f"{_fmt(abs(hi if d > 0 else lo))}] nats {word} than **{baseline}** {size} ({how}).{trend}")
        else:
            out.append(f"**{v}**: {at} no detectable difference to {baseline}: {_sfmt(d)} [{_sfmt(lo)}, {_sfmt(hi)}] "
                       f"nats (the 95% CI includes 0; {how}){', ' + size if size else ''}.{trend}")
    return out


# ----------------------------------------------------------------------------------------------
# Building the report
# ----------------------------------------------------------------------------------------------
def _try_plot(notes: list[str], what: str, fn, *args, **kwargs) -> Path | None:
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        notes.append(f"{what} not plotted: {e}")
        return None


def _fit_table_rows(fits: list[tuple[str, FitResult | None, list[str]]], law: str) -> tuple[list[str], list[list]]:
    names = LAWS[law].param_names
    header = ["group"] + [f"{n} [95% CI]" for n in names] + ["R² (log)", "RMSE (log)", "n", "notes"]
    rows = []
    for label, fr, notes in fits:
        if fr is None:
            rows.append([label] + ["-"] * len(names) + ["-", "-", "-", "; ".join(notes)])
            continue
        cells = [format_param(fr, n) for n in names]
        rows.append([label] + cells + [f"{fr.r2:.3f}", f"{fr.rmse:.3f}", fr.n_points, "; ".join(notes)])
    return header, rows


def build_report(source: str | Path, out_dir: str | Path, *, method: str | None = None, bits: int | None = None,
                 baseline: str | None = None, n_boot: int = 300, log: Log = print) -> Path:
    """Write out_dir/report.html and out_dir/report.md (+ PNGs); returns the HTML path."""
    from efftrain.grid.spec import GridError

    res = load_grid_results(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_md = out / "report.md"
    if old_md.exists():  # images of an earlier report here (other cells) would linger beside the new one
        for name in re.findall(r"!\[[^\]]*\]\(([\w.-]+\.png)\)", old_md.read_text()):
            (out / name).unlink(missing_ok=True)
    runs = res.runs
    names = [r["name"] for r in runs]
    if baseline is not None and baseline not in names:
        raise GridError(f"--baseline '{baseline}' is not a cell name (cells: {', '.join(names)})")
    baseline = baseline or default_baseline(runs)
    notes: list[str] = []
    doc_plots = Doc()

    # ---- training curves -----------------------------------------------------------------------
    labels = series_labels(runs)
    evals = [{"run": labels[c["run_key"]], "tokens": c["tokens"], "val_loss": c["val_loss"]}
             for c in res.checkpoints if c["val_loss"] is not None and c["run_key"] in labels]
    doc_plots.h(2, "Training")
    img = _try_plot(notes, "val loss vs tokens", plots.plot_loss_vs_tokens, evals, out / "loss_vs_tokens.png") \
        if evals else None
    if img:
        doc_plots.image(img, "Validation loss of every series checkpoint against training tokens, one line per cell "
                             "(the cooldown branches and averages of a run form one line each).")

    # ---- QiD analysis ----------------------------------------------------------------------------
    rows = [r for r in res.rows if r.get("qid") is not None]
    comparison, fit_tables, summary, variant_fits = [], {}, [], {}
    sel = None
    if not rows:
        notes.append("no PTQ rows yet: nothing to fit or compare")
    else:
        sel = choose_selection(rows, method, bits)
        slice_rows = [r for r in rows if r["group_size"] == sel.group_size and r["format"] == sel.fmt]
        doc_plots.h(2, "Quantization-induced degradation")
        doc_plots.p(f"Rows with group size {sel.group_size} and format {sel.fmt}; QiD = loss(quantized) − loss(16-bit) "
                    f"on the run's held-out windows, in nats/token.")
        methods = sorted({r["method"] for r in slice_rows})
        pooled: dict[str, dict[str, tuple]] = {"ouyang": {}, "kumar": {}}
        for law in pooled:
            for m in methods:
                pooled[law][m] = fit_group([r for r in slice_rows if r["method"] == m], law, n_boot=n_boot,
                                           group={"method": m})
        for m in methods:
            fr = pooled["ouyang"][m][0]
            # the plot's linestyle key is "method": one line style per series within this method's plot
            mrows = [{**r, "method": labels.get(r["run_key"], r["variant"])} for r in slice_rows if r["method"] == m]
            img = _try_plot(notes, f"QiD vs tokens ({m})", plots.plot_qid_vs_tokens, mrows,
                            out / f"qid_vs_tokens_{m}.png", fit=fr, title=f"QiD vs training tokens — {_method_label(m)}")
            if img:
                doc_plots.image(img, f"{_method_label(m)}: QiD against training tokens; colour = bit width, line style "
                                     f"= series (cell), marker = model size; thick lines: the pooled Ouyang fit"
                                     + ("" if fr else " (no fit: " + "; ".join(pooled['ouyang'][m][1]) + ")") + ".")
        main_keys = {r["key"] for r in runs if (r.get("kind") or "main") == "main"}
        main_rows = [r for r in slice_rows if r["run_key"] in main_keys]
        img = _try_plot(notes, "QiD vs N", plots.plot_qid_vs_params, main_rows, out / "qid_vs_params.png")
        if img:
            doc_plots.image(img, "QiD against non-embedding parameters N at each main cell's final checkpoint.")
        last = {}
        for r in main_rows:
            last[r["run_key"]] = max(last.get(r["run_key"], 0), r["tokens"])
        kbit_rows = [r for r in main_rows if r["tokens"] == last[r["run_key"]] and r.get("params_total")
                     and r.get("eff_bits")]
        img = _try_plot(notes, "k-bit plot", plots.plot_kbit, kbit_rows, out / "kbit.png") if kbit_rows else None
        if img:
            doc_plots.image(img, "k-bit scaling (Dettmers & Zettlemoyer 2022): quantized loss of each main cell's final "
                                 "checkpoint against total model bits = parameters × effective bits per parameter "
                                 "(scales included).")

        # per-variant comparison
        comparison = compare_variants(rows, runs, sel, baseline, n_boot)
        at = f"{sel.bits}-bit {_method_label(sel.method)}"
        if comparison:
            img = _try_plot(notes, "technique comparison", plots.plot_technique_qid,
                            [{"technique": c["variant"].replace(",", ",\n").replace(" [", "\n["), "qid": c["qid"],
                              "ci_lo": c["ci_lo"], "ci_hi": c["ci_hi"]} for c in comparison], out / "technique_qid.png",
                            title=f"Mean QiD over checkpoints at {at} (group {sel.group_size}, {sel.fmt})",
                            ci_label="95% CI (bootstrap over checkpoints)")
            doc_plots.h(3, f"Variants at {at}")
            if img:
                doc_plots.image(img, f"Mean QiD over each cell's checkpoints at {at}; error bars: 95% bootstrap CI "
                                     f"over checkpoints.")
            doc_plots.table(["variant", "checkpoints", "active params", "mean QiD [95% CI]",
                             f"Δ vs {baseline} [95% CI]", "pairing"],
                            [[c["variant"], c["n"], _count(c["params_active"]),
                              f"{_fmt(c['qid'])} [{_fmt(c['ci_lo'])}, {_fmt(c['ci_hi'])}]",
                              "baseline" if c["baseline"] else
                              (f"{_sfmt(c['diff'])} [{_sfmt(c['diff_lo'])}, {_sfmt(c['diff_hi'])}]" if "diff" in c
                               else "-"),
                              "" if c["baseline"] or "diff" not in c else
                              (f"{c['n_pairs']} pairs by tokens" if c["paired"] else "unpaired means")]
                             for c in comparison])

        # fits per law: pooled per method, and per variant at the compared method
        sel_rows = [r for r in slice_rows if r["method"] == sel.method]
        for law in ("ouyang", "kumar"):
            entries = [(f"method={m} (all cells)", *pooled[law][m]) for m in methods]
            ref = pooled[law][sel.method][0]
            for label in dict.fromkeys(labels[r["key"]] for r in runs):
                vrows = [r for r in sel_rows if labels.get(r["run_key"]) == label]
                if not vrows:
                    continue
                fr, fnotes = fit_group(vrows, law, n_boot=n_boot, reference=ref.params if ref else None,
                                       group={"method": sel.method, "series": label})
                entries.append((f"method={sel.method}, {label}", fr, fnotes))
                if law == "ouyang":
                    variant_fits[label] = (fr, fnotes)
            fit_tables[law] = entries

        quality = {}
        for r in sel_rows:
            n_bad, n_all = quality.get(r["bits"], (0, 0))
            quality[r["bits"]] = (n_bad + (r["qid"] <= 0), n_all + 1)
        base_active = next((r.get("params_active") for r in runs if r["name"] == baseline), None)
        summary = summary_sentences(comparison, sel, baseline, base_active, variant_fits, quality)
        for m in methods:
            fr, fnotes = pooled["ouyang"][m]
            if fr is None:
                summary.append(f"{_method_label(m)}: the Ouyang law could not be fitted ({'; '.join(fnotes)}).")
                continue
            free = [k for k in ("beta", "alpha", "gamma") if k not in fr.fixed]
            parts = ", ".join(f"{k} = {fr.params[k]:.2f} [{_fmt(fr.ci[k][0], 2)}, {_fmt(fr.ci[k][1], 2)}]"
                              for k in free)
            ns = [r["params_nonembed"] for r in slice_rows if r["method"] == m and r.get("params_nonembed")]
            narrow = "alpha" in free and ns and max(ns) < 2 * min(ns)
            summary.append(f"{_method_label(m)} pooled over the cells: QiD = k·D^β/(N^α·P^γ) with {parts} "
                           f"(R² {fr.r2:.2f} on log QiD, {fr.n_points} rows"
                           + (f", {fr.n_dropped} with QiD ≤ 0 left out" if fr.n_dropped else "")
                           + (f"; N spans only {min(ns) / 1e6:.3g}M–{max(ns) / 1e6:.3g}M, so α is not "
                              "identified by these cells" if narrow else "")
                           + "); Ouyang et al. report β ≈ 0.53, α ≈ 0.23, γ ≈ 5.5 for GPTQ on Pythia.")

    # ---- MoE balance and FP8 gap ---------------------------------------------------------------
    doc_extra = Doc()
    main_runs = [r for r in runs if r.get("kind", "main") == "main"]
    moe_imgs = []
    for r in main_runs:
        if not _flatten(r["config"]).get("model.moe.enabled"):
            continue
        recs = [{"step": m["step"], "layer": int(k.rsplit("/l", 1)[1]), "max_vio": v}
                for m in read_metrics(res.runs_dir / r["key"]) for k, v in m.items()
                if re.fullmatch(r"moe/max_vio/l\d+", k)]
        if recs:
            img = _try_plot(notes, f"MoE balance of {r['name']}", plots.plot_moe_balance, recs,
                            out / f"moe_balance_{r['key']}.png", title=f"MoE load balance (MaxVio) — {r['name']}")
            if img:
                moe_imgs.append((img, r["name"]))
    fp8_imgs = []
    flat = {r["key"]: _flatten(r["config"]) for r in main_runs}
    for r in main_runs:
        if not flat[r["key"]].get("fp8.enabled"):
            continue
        mine = {k: v for k, v in flat[r["key"]].items() if not k.startswith("fp8.") and k != "name"}
        twin = next((o for o in main_runs if o is not r and not flat[o["key"]].get("fp8.enabled") and
                     {k: v for k, v in flat[o["key"]].items() if not k.startswith("fp8.") and k != "name"} == mine),
                    None)
        if twin is None:
            notes.append(f"FP8 gap of {r['name']}: no BF16 cell with the same config to compare with")
            continue
        a, b = read_metrics(res.runs_dir / twin["key"]), read_metrics(res.runs_dir / r["key"])
        img = _try_plot(notes, f"FP8 gap of {r['name']}", plots.plot_fp8_gap, a, b, out / f"fp8_gap_{r['key']}.png",
                        loss_key="loss", smooth=max(1, min(len(b) // 20, 25)),
                        title=f"FP8 vs BF16 training loss — {r['name']} vs {twin['name']}")
        if img:
            fp8_imgs.append((img, r["name"], twin["name"]))
    if moe_imgs or fp8_imgs:
        doc_extra.h(2, "Technique diagnostics")
        for img, name in moe_imgs:
            doc_extra.image(img, f"{name}: MaxVio (max expert load / mean load − 1) per MoE layer during training.")
        for img, name, twin in fp8_imgs:
            doc_extra.image(img, f"{name} vs {twin}: relative training-loss gap of simulated FP8 to BF16.")

    # ---- assemble ----------------------------------------------------------------------------------
    doc = Doc()
    status = Counter(r["status"] for r in runs)
    doc.h(1, f"efftrain grid report: {res.name}")
    doc.p(f"Source: {res.db_path} — {len(runs)} cells (" + ", ".join(f"{n} {s}" for s, n in sorted(status.items()))
          + f"), {len(res.checkpoints)} checkpoints, {len(res.rows)} PTQ rows. Generated "
          f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.")
    doc.h(2, "Summary")
    if sel is not None:
        doc.p(f"Comparison at {sel.bits}-bit {_method_label(sel.method)} (group {sel.group_size}, {sel.fmt}) against "
              f"the baseline **{baseline}**; 95% bootstrap intervals over checkpoints.")
    doc.ul(summary or ["No PTQ results yet, so no claims about quantization can be made."])
    incomplete = [r["name"] for r in runs if r["status"] != "done"]
    if incomplete:
        doc.p(f"Not finished: {', '.join(incomplete)} — numbers above cover the rows recorded so far.")

    doc.h(2, "Grid")
    doc.table(["key", "cell", "kind", "schedule", "status", "N (non-emb.)", "active", "checkpoints", "PTQ rows"],
              [[r["key"], r["name"], r.get("kind"), r.get("schedule"), r["status"], _count(r.get("params_nonembed")),
                _count(r.get("params_active")), sum(c["run_key"] == r["key"] for c in res.checkpoints),
                sum(x["run_key"] == r["key"] for x in res.rows)] for r in runs])
    diff = differing_fields([r["config"] for r in runs])
    if diff:
        doc.p("Config fields that differ between the cells:")
        flats = [_flatten(r["config"]) for r in runs]
        doc.table(["cell"] + diff, [[r["name"]] + [json.dumps(f.get(k)) if isinstance(f.get(k), (list, dict))
                                                   else f.get(k) for k in diff] for r, f in zip(runs, flats)])
    doc.blocks += doc_plots.blocks + doc_extra.blocks
    if fit_tables:
        doc.h(2, "Fitted laws")
        doc.p("Least squares on log QiD (rows with QiD ≤ 0 cannot enter and are counted as dropped); 95% percentile "
              "bootstrap intervals over rows; R² and RMSE on log QiD.")
        for law, entries in fit_tables.items():
            doc.h(3, f"{law}: {LAWS[law].formula} ({LAWS[law].citation})")
            header, trows = _fit_table_rows(entries, law)
            doc.table(header, trows)
    if notes:
        doc.h(2, "Notes")
        doc.ul(notes)

    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown())
    html_path.write_text(doc.html(f"efftrain grid report: {res.name}"))
    log(f"report: {html_path} (and {md_path})")
    return html_path
