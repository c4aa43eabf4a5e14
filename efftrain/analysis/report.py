"""The report of a grid: DIR/report.html (self-contained, PNGs inlined as data URIs) and DIR/report.md
(PNGs beside it), built from the grid's results store and its runs' metrics.jsonl.

Each section is one function below, in the order the report shows them: summary (plain-language
verdicts generated from the numbers, each with its interval), the grid (cells, seeds, tokens, epochs,
tokens per parameter, the config fields that differ), training curves, the measurement's noise floor,
QiD vs tokens per method with the fitted law, QiD vs N, the k-bit plot, the technique comparison,
MoE balance and FP8-vs-BF16 gap plots when runs have those metrics, the per-run slopes of log QiD vs
log D, recovery fine-tuning (recovered fraction against D/N per bit width, when the grid has recovery
rows), the KV cache (QiD against KV-cache bytes per token, MHA against MLA, when the grid has KV-cache
rows), the other PTQ schemes (activation quantization, FP8, SmoothQuant, BiLLM, FP8 block weights,
rotations, with the effect of a rotation on the per-run slopes, when the grid has such rows), and the
fitted laws.

Statistics (efftrain.analysis.stats, efftrain.analysis.fits)
  * Every section before the KV cache reads weight-only rows only (compare.is_weight_only: no activation
    or KV-cache quantizer, no rotation, no SmoothQuant, weights quantized), so rows of other schemes added
    to a grid leave those sections as they were; the scheme sections read the rest, each run at its final
    checkpoint (mean over seeds with a t-interval; a paired difference by seed between two variants).
  * A *variant* is a replicate group: the runs of one grid cell that differ only in their seeds.
  * Technique vs baseline is a paired difference per seed (the same seeds train every variant), with a
    t-interval over seeds (PolyPythias, arXiv 2503.09543: effects smaller than the seed spread are not
    findings). Three versions: QiD at each run's final checkpoint; relative QiD (QiD / loss_16) there;
    and QiD at matched 16-bit loss (each pair's two series interpolated at the worse of their two final
    16-bit losses, so a technique that simply trains to a lower loss is not credited with that). A
    variant with one seed gets no interval and no claim. An interval that contains 0 is reported as
    "no detectable difference", never as a direction.
  * Every QiD row carries qid_se, the paired standard error over eval windows; the report states the
    noise floor (median qid_se per bit width).
  * Per-run slopes: each run's OLS slope of log QiD on log D over its checkpoints after LR warmup whose
    QiD is resolved (QiD > 2·se), at least 3 of them; per variant the mean over seeds with a t-interval
    over the seeds' slopes (each run one replicate), and "grows" / "falls" only when it excludes 0.
  * Laws: weighted fits in linear space with run-level (cluster) bootstrap intervals; a cooldown branch
    or an average counts as part of the run it branched from. Rows inside LR warmup and bit widths at
    the noise floor are left out and listed; a parameter the data cannot identify is said to be so.
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
from efftrain.analysis.compare import (MIN_SLOPE_POINTS, RESOLVED_SE, SCHEME_WEIGHT_METHODS, SLOPE_FALLS,
                                       SLOPE_FLAT, SLOPE_GROWS, SLOPE_NONE, SLOPE_ONE_SEED, Comparison, FP8Gap,
                                       Selection, SlopeGroup, checkpoint_metric_by_variant, choose_selection,
                                       compare_techniques, default_baseline, fp8_gaps, is_weight_only,
                                       method_label, run_slopes, series_labels, slope_groups)
from efftrain.analysis.compare import _empty, _num, _seed_of
from efftrain.analysis.fits import LAWS, PUBLISHED, PUBLISHED_NOTES, FitResult, fit_law, format_param
from efftrain.analysis.stats import Interval, paired_difference, t_interval
from efftrain.config import flatten_dotted
from efftrain.formatting import format_count, format_value
from efftrain.grid.spec import GridError, load_spec
from efftrain.grid.store import DB_NAME, ResultsStore
from efftrain.tables import with_n_params
from efftrain.train.rundir import read_metrics

Log = Callable[[str], None]


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
    runs: list[dict]  # runs table, config parsed into "config", "replicate" / "seed" filled in for old stores
    checkpoints: list[dict]
    rows: list[dict]  # ptq rows with n_params

    def run(self, key: str) -> dict | None:
        return next((r for r in self.runs if r["key"] == key), None)


def load_grid_results(source: str | Path) -> GridResults:
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
        flat = flatten_dotted(r["config"])
        r["replicate"] = r.get("replicate") or r["name"]  # stores from before replicates: one run per cell
        r["seed"] = r.get("seed") if r.get("seed") is not None else flat.get("train.seed", 0)
        r["data_seed"] = r.get("data_seed") if r.get("data_seed") is not None else flat.get("data.shuffle_seed", 0)
    name = name or (runs[0]["config"].get("name") or db.parent.name)
    return GridResults(name=name, db_path=db, runs_dir=db.parent, runs=runs, checkpoints=checkpoints, rows=rows)


def differing_fields(configs: list[dict], ignore: tuple[str, ...] = ("name",)) -> list[str]:
    """Dotted config fields whose values differ between the configs (`ignore`d fields left out)."""
    flats = [flatten_dotted(c) for c in configs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if k not in ignore and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def _sfmt(x: float) -> str:
    return format_value(x) if not (isinstance(x, (int, float)) and math.isfinite(x)) or x < 0 else "+" + format_value(x)


def _interval(iv: Interval | None, signed: bool = False) -> str:
    """'est [lo, hi]' (signed: with a + on positive numbers); 'est (1 seed: no interval)'."""
    if iv is None:
        return "-"
    f = _sfmt if signed else format_value
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return f"{f(iv.estimate)} ({iv.n} seed{'s' if iv.n != 1 else ''}: no interval)"
    return f"{f(iv.estimate)} [{f(iv.lo)}, {f(iv.hi)}]"


# ----------------------------------------------------------------------------------------------
# Fits
# ----------------------------------------------------------------------------------------------
def _cluster_rows(rows: list[dict], runs: list[dict]) -> list[dict]:
    """Rows with `cluster`: the run they belong to for resampling (a branch or an average belongs to
    the run it branched from: their checkpoints share that run's history and seed)."""
    family = {r["key"]: r.get("parent") or r["key"] for r in runs}
    return [{**r, "cluster": family.get(r["run_key"], r["run_key"])} for r in rows]


def fit_group(rows: list[dict], law: str, *, n_boot: int, group: dict | None = None,
              seed: int = 0) -> tuple[FitResult | None, list[str]]:
    """A law fitted to one group of rows; (None, reasons) when it cannot be fitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fit_law(rows, law, n_boot=n_boot, seed=seed, group=group, cluster_key="cluster")
        except (ValueError, ArithmeticError) as e:
            return None, [str(e)]
    notes = [f"{name} not identified: {why}" for name, why in result.not_identified.items()]
    return result, notes + [str(w.message) for w in caught]


def _exclusion_note(fr: FitResult) -> str:
    if not fr.excluded:
        return ""
    return "left out: " + ", ".join(f"{n} {reason}" for reason, n in fr.excluded.items())


def _law_sentence(m: str, fr: FitResult) -> str:
    """The pooled Ouyang fit of one method in words, beside the published values."""
    parts = []
    for k in ("beta", "alpha", "gamma"):
        if k in fr.not_identified:
            parts.append(f"{k} not identified")
        elif k in fr.fixed:
            parts.append(f"{k} = {fr.params[k]:.3g} (held fixed)")
        else:
            parts.append(f"{k} = {format_param(fr, k)}")
    excl = _exclusion_note(fr)
    ref = PUBLISHED["ouyang"]
    return (f"{method_label(m)} pooled over the cells: QiD = k·D^β/(N^α·P^γ) with {', '.join(parts)} "
            f"({fr.n_points} rows from {fr.n_clusters} runs, N = {fr.n_params_source}"
            + (f"; {excl}" if excl else "") + f"); Ouyang et al. report β ≈ {ref['beta']:.2f}, "
            f"α ≈ {ref['alpha']:.2f}, γ ≈ {ref['gamma']:.1f} for GPTQ on Pythia (about one epoch of the Pile, "
            f"N from 70M to 12B).")


# ----------------------------------------------------------------------------------------------
# Summary sentences
# ----------------------------------------------------------------------------------------------
def _trend(fit: FitResult | None) -> str:
    if fit is None or "beta" in fit.fixed or "beta" in fit.not_identified:
        return ""
    b, (lo, hi) = fit.params["beta"], fit.ci.get("beta", (math.nan, math.nan))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    iv = f"β = {b:.2f} [{lo:.2f}, {hi:.2f}]"
    if lo > 0:
        return f" Its QiD grows with training tokens ({iv})."
    if hi < 0:
        return f" Its QiD falls with training tokens ({iv})."
    return f" No detectable trend of its QiD with tokens ({iv})."


def _difference_sentence(v: str, baseline: str, at: str, what: str, iv: Interval, unit: str = "nats") -> str:
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return f"{what}: {_sfmt(iv.estimate)} {unit} from {iv.n} seed pair(s), too few for an interval, so no claim"
    if iv.includes_zero:
        return f"{what}: no detectable difference to {baseline}, {_interval(iv, signed=True)} {unit} ({iv.n} seed pairs)"
    word = "more" if iv.estimate > 0 else "less"
    return (f"{what}: **{v}** loses {format_value(abs(iv.estimate))} {unit} {word} than **{baseline}** "
            f"{_interval(iv, signed=True)} ({iv.n} seed pairs)")


def summary_sentences(comparison: list[Comparison], sel: Selection, baseline: str, base_active,
                      variant_fits: dict[str, tuple[FitResult | None, list[str]]],
                      noise_floor: dict[int, float]) -> list[str]:
    at = f"at {sel.label}"
    out = []
    floor = noise_floor.get(sel.bits)
    for c in comparison:
        fit, _ = variant_fits.get(c.variant, (None, []))
        trend = _trend(fit)
        tok = f"{format_count(c.tokens)} tokens, {format_value(c.epochs, 2)} epochs" if math.isfinite(c.epochs) else \
            f"{format_count(c.tokens)} tokens"
        if c.is_baseline:
            seeds = f" over {c.seeds} seeds" if c.seeds > 1 else ""
            out.append(f"**{c.variant}** (baseline): final QiD {at} {_interval(c.qid)} nats{seeds} ({tok}).{trend}")
            continue
        if c.diff is None:
            out.append(f"**{c.variant}**: final QiD {at} {_interval(c.qid)} nats; no seed shared with {baseline}, so "
                       f"no paired comparison.{trend}")
            continue
        size = ""
        if c.params_active and base_active:
            rel = abs(c.params_active - base_active) / base_active
            size = (f" At equal active params ({format_count(c.params_active)})." if rel <= 0.05 else
                    f" Active params differ ({format_count(c.params_active)} vs {format_count(base_active)}), "
                    f"so part of any gap may be model size.")
        parts = [_difference_sentence(c.variant, baseline, at, "final checkpoint", c.diff)]
        if c.matched_diff is not None:
            parts.append(_difference_sentence(c.variant, baseline, at,
                                              f"at matched 16-bit loss {format_value(c.matched_loss)}", c.matched_diff))
        if c.rel_diff is not None and math.isfinite(c.rel_diff.lo):
            parts.append(f"relative QiD (QiD / loss_16) differs by {_interval(c.rel_diff, signed=True)}")
        out.append(f"**{c.variant}** vs **{baseline}** {at} ({tok}) — " + "; ".join(parts) + "." + size + trend)
    if floor is not None and comparison:
        out.append(f"Noise floor {at}: the median per-row standard error of QiD is {format_value(floor)} nats "
                   f"(paired over eval windows); differences below about twice that are not resolved by one row.")
    return out


_SLOPE_SHORT = {SLOPE_GROWS: "grows", SLOPE_FLAT: "no detectable trend", SLOPE_FALLS: "falls",
                SLOPE_ONE_SEED: "one seed, no claim", SLOPE_NONE: "no slope"}


def _slope_left_out(groups: list[SlopeGroup]) -> str:
    """'3 rows inside LR warmup, 2 rows with QiD ≤ 2·se, 1 run with fewer than 3 points, so no slope'
    (empty when nothing was left out)."""
    left = Counter()
    for g in groups:
        left.update(g.left_out)
    parts = [f"{left[k]} row{'s' if left[k] != 1 else ''} {what}" for k, what in
             (("warmup", "inside LR warmup"), ("unresolved", f"with QiD ≤ {RESOLVED_SE:g}·se"),
              ("nonfinite", "without a finite QiD or D")) if left[k]]
    few = sum(g.too_few for g in groups)
    if few:
        parts.append(f"{few} run{'s' if few != 1 else ''} with fewer than {MIN_SLOPE_POINTS} points, so no slope")
    return ", ".join(parts)


def slope_sentence(groups: list[SlopeGroup], method: str, bits: int) -> str | None:
    """One summary sentence: every variant's mean per-run slope of log QiD vs log D at (method, bits),
    with its interval over seeds and verdict, and a tally; None when there is no such group."""
    mine = [g for g in groups if g.method == method and g.bits == bits]
    if not mine:
        return None
    parts = []
    for g in mine:
        iv = "no run with a slope" if g.mean.n == 0 else _interval(g.mean, signed=True)
        parts.append(f"**{g.variant}** {iv} ({len(g.fitted)} run{'s' if len(g.fitted) != 1 else ''}): "
                     f"{_SLOPE_SHORT.get(g.verdict, g.verdict)}")
    tally = Counter(_SLOPE_SHORT.get(g.verdict, g.verdict) for g in mine)
    n = len(mine)
    words = {"grows": "QiD grows with D", "falls": "QiD falls with D", "no detectable trend": "no detectable trend",
             "one seed, no claim": "one seed (no interval, no claim)", "no slope": "no slope"}
    summary = ", ".join(f"{words.get(k, k)} in {c} of {n} variant{'s' if n != 1 else ''}"
                        for k, c in tally.most_common())
    left = _slope_left_out(mine)
    return (f"{bits}-bit {method_label(method)}, per-run slopes of log QiD vs log D (each run's OLS slope over its "
            f"checkpoints after warmup; mean over seeds with a 95% t-interval over seeds): " + "; ".join(parts)
            + f". {summary[0].upper() + summary[1:]}" + (f" (left out: {left})" if left else "") + ".")


# ----------------------------------------------------------------------------------------------
# Sections: one function each, in the order the report shows them
# ----------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What the sections share: the results, the output directory, the comparison's selection."""

    res: GridResults
    out: Path
    baseline: str
    n_boot: int
    labels: dict[str, str]  # cell key -> variant
    rows: list[dict]  # weight-only PTQ rows with a QiD (compare.is_weight_only), `cluster` set
    sel: Selection | None = None
    slice_rows: list[dict] = field(default_factory=list)  # rows at the selection's group size and format
    notes: list[str] = field(default_factory=list)
    pooled: dict[str, dict[str, tuple[FitResult | None, list[str]]]] = field(default_factory=dict)  # law->method->
    variant_fits: dict[str, dict[str, tuple[FitResult | None, list[str]]]] = field(default_factory=dict)
    comparison: list[Comparison] = field(default_factory=list)
    slopes: list[SlopeGroup] = field(default_factory=list)  # per-run slopes of log QiD vs log D, per variant
    noise_floor: dict[int, float] = field(default_factory=dict)  # bits -> median qid_se at the method
    all_rows: list[dict] = field(default_factory=list)  # every PTQ row with a QiD, scheme rows included

    def plot(self, what: str, fn, *args, **kwargs) -> Path | None:
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            self.notes.append(f"{what} not plotted: {e}")
            return None

    @property
    def main_keys(self) -> set[str]:
        return {r["key"] for r in self.res.runs if (r.get("kind") or "main") == "main"}


def analyse(ctx: Context, method: str | None, bits: int | None) -> None:
    """The numbers every section reads: the selection, pooled and per-variant fits, the comparison."""
    if not ctx.rows:
        ctx.notes.append("no weight-only PTQ rows yet: nothing to fit or compare" if ctx.all_rows else
                         "no PTQ rows yet: nothing to fit or compare")
        return
    # by default, not a weight method of issue 19 (a grid that adds BiLLM rows keeps its selection)
    usual = [r for r in ctx.rows if r["method"] not in SCHEME_WEIGHT_METHODS] if method is None else []
    sel = ctx.sel = choose_selection(usual or ctx.rows, method, bits)
    ctx.slice_rows = [r for r in ctx.rows if r["group_size"] == sel.group_size and r["format"] == sel.fmt]
    methods = sorted({r["method"] for r in ctx.slice_rows})
    for law in LAWS:
        ctx.pooled[law] = {m: fit_group([r for r in ctx.slice_rows if r["method"] == m], law, n_boot=ctx.n_boot,
                                        group={"method": m}) for m in methods}
        ctx.variant_fits[law] = {}
        sel_rows = [r for r in ctx.slice_rows if r["method"] == sel.method]
        for label in dict.fromkeys(ctx.labels[r["key"]] for r in ctx.res.runs):
            vrows = [r for r in sel_rows if ctx.labels.get(r["run_key"]) == label]
            if vrows:
                ctx.variant_fits[law][label] = fit_group(vrows, law, n_boot=ctx.n_boot,
                                                         group={"method": sel.method, "variant": label})
    ctx.comparison = compare_techniques(ctx.rows, ctx.res.runs, sel, ctx.baseline)
    ctx.slopes = slope_groups(run_slopes(ctx.rows, ctx.res.runs))
    fallback = Counter(r["method_label"] for r in ctx.rows if "fallback" in (r.get("method_label") or ""))
    if fallback:
        ctx.notes.append("rows where some MoE experts saw too few calibration tokens and fell back to RTN: "
                         + ", ".join(f"{n} {label}" for label, n in sorted(fallback.items())))
    for b in sorted({r["bits"] for r in ctx.slice_rows}):
        ses = [r["qid_se"] for r in ctx.slice_rows if r["bits"] == b and r["method"] == sel.method
               and r.get("qid_se") is not None]
        if ses:
            ctx.noise_floor[b] = float(np.median(ses))


def section_summary(ctx: Context, doc: Doc) -> None:
    doc.h(2, "Summary")
    sel = ctx.sel
    summary = []
    if sel is not None:
        doc.p(f"Comparison at {sel.label} (group {sel.group_size}, {sel.fmt}) against the baseline **{ctx.baseline}**: "
              f"differences are paired by seed, with 95% t-intervals over seeds.")
        base_active = next((r.get("params_active") for r in ctx.res.runs if r["replicate"] == ctx.baseline), None)
        summary = summary_sentences(ctx.comparison, sel, ctx.baseline, base_active,
                                    ctx.variant_fits.get("ouyang", {}), ctx.noise_floor)
        in_slice = [g for g in ctx.slopes if g.group_size == sel.group_size and g.fmt == sel.fmt]
        slope_methods = list(dict.fromkeys(g.method for g in in_slice if g.bits == sel.bits))
        for m, (fr, fnotes) in ctx.pooled.get("ouyang", {}).items():
            summary.append(_law_sentence(m, fr) if fr is not None else
                           f"{method_label(m)}: the Ouyang law could not be fitted ({'; '.join(fnotes)}).")
            if m in slope_methods:  # the per-run slopes beside the pooled fit of the same method
                summary.append(slope_sentence(in_slice, m, sel.bits))
                slope_methods.remove(m)
        summary += [slope_sentence(in_slice, m, sel.bits) for m in slope_methods]
        single = [c.variant for c in ctx.comparison if c.seeds < 2]
        if single:
            summary.append(f"{len(single)} variant(s) have a single seed ({', '.join(single)}): their numbers come "
                           f"without an interval over seeds and support no comparison on their own.")
    doc.ul(summary or ["No PTQ results yet, so no claims about quantization can be made."])
    incomplete = [r["name"] for r in ctx.res.runs if r["status"] != "done"]
    if incomplete:
        doc.p(f"Not finished: {', '.join(incomplete)} — numbers above cover the rows recorded so far.")


def section_grid(ctx: Context, doc: Doc) -> None:
    runs, res = ctx.res.runs, ctx.res
    doc.h(2, "Grid")
    last = {}
    for c in res.checkpoints:
        if c["run_key"] not in last or c["tokens"] > last[c["run_key"]]["tokens"]:
            last[c["run_key"]] = c
    n_q = {r["run_key"]: r.get("n_params") for r in ctx.rows}

    def epochs(r):
        c = last.get(r["key"])
        if c is None:
            return "n/a"
        e = c.get("epochs")
        if e is None and r.get("train_tokens"):
            e = c["tokens"] / r["train_tokens"]
        return format_value(e, 2) if e is not None else "n/a"

    def tokens_per_param(r):
        c, n = last.get(r["key"]), n_q.get(r["key"]) or r.get("params_nonembed")
        return format_value(c["tokens"] / n, 3) if c and n else "n/a"

    doc.table(["key", "cell", "variant", "seed", "kind", "status", "N (quantized)", "active", "checkpoints",
               "final tokens", "epochs", "tokens/N", "PTQ rows"],
              [[r["key"], r["name"], r["replicate"], f"{r['seed']}/{r['data_seed']}", r.get("kind"), r["status"],
                format_count(n_q.get(r["key"])), format_count(r.get("params_active")),
                sum(c["run_key"] == r["key"] for c in res.checkpoints),
                format_count(last[r["key"]]["tokens"]) if r["key"] in last else "n/a", epochs(r), tokens_per_param(r),
                sum(x["run_key"] == r["key"] for x in res.rows)] for r in runs])
    doc.p("seed = train.seed / data.shuffle_seed; epochs = passes over the run's train split by its last "
          "checkpoint; N = the parameters PTQ quantizes (the N of the fits).")
    diff = differing_fields([r["config"] for r in runs], ignore=("name", "train.seed", "data.shuffle_seed"))
    if diff:
        doc.p("Config fields that differ between the cells (besides the seeds):")
        flats = [flatten_dotted(r["config"]) for r in runs]
        doc.table(["cell"] + diff, [[r["name"]] + [json.dumps(f.get(k)) if isinstance(f.get(k), (list, dict))
                                                   else f.get(k) for k in diff] for r, f in zip(runs, flats)])


def section_training(ctx: Context, doc: Doc) -> None:
    labels = {r["key"]: r["name"] for r in ctx.res.runs}
    evals = [{"run": labels[c["run_key"]], "tokens": c["tokens"], "val_loss": c["val_loss"]}
             for c in ctx.res.checkpoints if c["val_loss"] is not None and c["run_key"] in labels]
    doc.h(2, "Training")
    img = ctx.plot("val loss vs tokens", plots.plot_loss_vs_tokens, evals, ctx.out / "loss_vs_tokens.png") \
        if evals else None
    if img:
        doc.image(img, "Validation loss of every series checkpoint against training tokens, one line per run.")


def section_noise(ctx: Context, doc: Doc) -> None:
    if ctx.sel is None:
        return
    doc.h(2, "Measurement noise")
    rows = [r for r in ctx.slice_rows if r["method"] == ctx.sel.method]
    table = []
    for b in sorted({r["bits"] for r in rows}):
        sub = [r for r in rows if r["bits"] == b]
        ses = [r["qid_se"] for r in sub if r.get("qid_se") is not None]
        kls = [r["kl"] for r in sub if r.get("kl") is not None]
        top1 = [r["top1_agree"] for r in sub if r.get("top1_agree") is not None]
        table.append([b, len(sub), format_value(float(np.median([r["qid"] for r in sub]))),
                      format_value(float(np.median(ses))) if ses else "n/a",
                      sum(abs(r["qid"]) < 2 * r["qid_se"] for r in sub if r.get("qid_se") is not None),
                      format_value(float(np.median(kls))) if kls else "n/a",
                      f"{100 * float(np.median(top1)):.1f}%" if top1 else "n/a"])
    windows = sorted({(r.get("eval_windows"), r.get("eval_tokens")) for r in rows if r.get("eval_windows")})
    doc.p(f"{method_label(ctx.sel.method)} rows per bit width: median QiD, median standard error of QiD (paired over "
          f"eval windows: the noise floor), rows with |QiD| < 2·se, median token KL(16-bit ‖ quantized) and the "
          f"median fraction of positions where both models pick the same next token."
          + (f" Eval set: {', '.join(f'{w} windows ({format_count(t)} tokens)' for w, t in windows)} per row, a seeded "
             f"random sample of the val split." if windows else " These rows predate per-window errors (no qid_se)."))
    doc.table(["bits", "rows", "median QiD", "median se", "|QiD| < 2·se", "median KL", "median top-1 agree"], table)


def section_qid(ctx: Context, doc: Doc) -> None:
    if ctx.sel is None:
        return
    sel, out = ctx.sel, ctx.out
    doc.h(2, "Quantization-induced degradation")
    doc.p(f"Rows with group size {sel.group_size} and format {sel.fmt}; QiD = loss(quantized) − loss(16-bit) on "
          f"the same held-out windows, in nats/token.")
    for m, (fr, fnotes) in ctx.pooled["ouyang"].items():
        mrows = [{**r, "method": ctx.labels.get(r["run_key"], r["variant"])} for r in ctx.slice_rows
                 if r["method"] == m]
        img = ctx.plot(f"QiD vs tokens ({m})", plots.plot_qid_vs_tokens, mrows, out / f"qid_vs_tokens_{m}.png",
                       fit=fr, title=f"QiD vs training tokens — {method_label(m)}")
        if img:
            doc.image(img, f"{method_label(m)}: QiD against training tokens; colour = bit width, line style = "
                           f"variant, marker = model size; thick lines: the pooled Ouyang fit"
                      + ("" if fr else " (no fit: " + "; ".join(fnotes) + ")") + ".")
    main_rows = [r for r in ctx.slice_rows if r["run_key"] in ctx.main_keys]
    img = ctx.plot("QiD vs N", plots.plot_qid_vs_params, main_rows, out / "qid_vs_params.png")
    if img:
        doc.image(img, "QiD against quantized parameters N at each main cell's final checkpoint.")
    last = {}
    for r in main_rows:
        last[r["run_key"]] = max(last.get(r["run_key"], 0), r["tokens"])
    kbit_rows = [r for r in main_rows if r["tokens"] == last[r["run_key"]] and r.get("params_total")
                 and r.get("eff_bits")]
    img = ctx.plot("k-bit plot", plots.plot_kbit, kbit_rows, out / "kbit.png") if kbit_rows else None
    if img:
        doc.image(img, "k-bit scaling (Dettmers & Zettlemoyer 2022): quantized loss of each main cell's final "
                       "checkpoint against total model bits = parameters × effective bits per parameter "
                       "(scales included).")


def section_comparison(ctx: Context, doc: Doc) -> None:
    if not ctx.comparison:
        return
    sel = ctx.sel
    doc.h(3, f"Variants at {sel.label}")
    img = ctx.plot("technique comparison", plots.plot_technique_qid,
                   [{"technique": c.variant.replace(",", ",\n").replace(" [", "\n["), "qid": c.qid.estimate,
                     "ci_lo": c.qid.lo, "ci_hi": c.qid.hi} for c in ctx.comparison], ctx.out / "technique_qid.png",
                   title=f"Final-checkpoint QiD at {sel.label} (group {sel.group_size}, {sel.fmt})",
                   ci_label="95% t-interval over seeds")
    if img:
        doc.image(img, f"Mean final-checkpoint QiD over seeds at {sel.label}; error bars: 95% t-interval over "
                       f"seeds (none with one seed).")
    doc.table(["variant", "seeds", "active params", "final tokens", "epochs", "final QiD [95% CI]",
               f"Δ vs {ctx.baseline}, paired [95% CI]", "Δ at matched 16-bit loss", "Δ relative QiD"],
              [[c.variant, c.seeds, format_count(c.params_active), format_count(c.tokens), format_value(c.epochs, 2),
                _interval(c.qid),
                "baseline" if c.is_baseline else _interval(c.diff, signed=True),
                "" if c.is_baseline else (_interval(c.matched_diff, signed=True) +
                                          (f" at {format_value(c.matched_loss)}" if c.matched_diff else "")),
                "" if c.is_baseline else _interval(c.rel_diff, signed=True)] for c in ctx.comparison])


def _percent(iv: Interval) -> str:
    """A relative difference as signed percent: '+0.12 % [-0.03, +0.27]'."""
    scaled = Interval(100 * iv.estimate, 100 * iv.lo, 100 * iv.hi, 100 * iv.se, iv.n, iv.level, iv.method)
    return _interval(scaled, signed=True).replace(" [", " % [", 1) if math.isfinite(iv.lo) else \
        _interval(scaled, signed=True).replace(" (", " % (", 1)


def fp8_gap_sentence(gaps: list[FP8Gap]) -> list[str]:
    """Per FP8 variant, its gap at the last series point both it and its BF16 twin reached."""
    out = []
    for variant in dict.fromkeys(g.variant for g in gaps):
        last = max((g for g in gaps if g.variant == variant), key=lambda g: g.tokens)
        iv = last.interval
        verdict = ("no detectable difference" if math.isfinite(iv.lo) and iv.lo <= 0 <= iv.hi else
                   "no interval (one seed pair), no claim" if not math.isfinite(iv.lo) else
                   "FP8 trains to a higher loss" if iv.lo > 0 else "FP8 trains to a lower loss")
        out.append(f"FP8 gap: **{variant}** vs **{last.twin}** at {format_count(last.tokens)} tokens, val loss "
                   f"{_percent(iv)} relative to BF16 over {iv.n} seed pair{'s' if iv.n != 1 else ''}: {verdict} "
                   f"(DeepSeek-V3 reports a relative loss error below 0.25 % for its FP8 recipe at 16B–671B "
                   f"parameters; the FP8 cells' '16-bit' loss in QiD rows is the FP8-trained model's).")
    return out


def section_technique_series(ctx: Context, doc: Doc) -> None:
    """MTP acceptance along the series and the FP8-vs-BF16 loss gap, from the checkpoints table."""
    mtp = checkpoint_metric_by_variant(ctx.res.runs, ctx.res.checkpoints, "mtp_acceptance", ctx.labels)
    gaps = fp8_gaps(ctx.res.runs, ctx.res.checkpoints, ctx.labels)
    if not (mtp or gaps):
        return
    doc.h(2, "Technique figures along the series")
    if mtp:
        doc.p("MTP acceptance: how often MTP module 1's draft of token i+2 equals the main model's own "
              "next-token guess on the training-time val batches (greedy speculative-decoding acceptance), "
              "at every series checkpoint; mean over seeds with a 95% t-interval over seeds.")
        doc.table(["variant", "tokens", "acceptance [95% CI]", "seeds"],
                  [[pt.variant, format_count(pt.tokens), _interval(pt.interval), pt.interval.n] for pt in mtp])
    if gaps:
        doc.p("FP8 gap: (val loss of the FP8-trained run − val loss of its BF16 twin, same config and "
              "seed) / BF16 val loss at each series checkpoint; mean over seed pairs with a 95% t-interval.")
        doc.table(["FP8 variant", "BF16 twin", "tokens", "relative gap [95% CI]", "pairs"],
                  [[g.variant, g.twin, format_count(g.tokens), _percent(g.interval), g.interval.n] for g in gaps])
        for sentence in fp8_gap_sentence(gaps):
            doc.p(sentence)


def _seed_label(seed: tuple[int, int]) -> str:
    return str(seed[0]) if seed[0] == seed[1] else f"{seed[0]}/{seed[1]}"


def section_slopes(ctx: Context, doc: Doc) -> None:
    if ctx.sel is None or not ctx.slopes:
        return
    sel = ctx.sel
    groups = [g for g in ctx.slopes if g.group_size == sel.group_size and g.fmt == sel.fmt]
    if not groups:
        return
    doc.h(2, "Per-run slopes of log QiD vs log D")
    others = len({(g.group_size, g.fmt) for g in ctx.slopes} - {(sel.group_size, sel.fmt)})
    doc.p(f"For each run and quantizer (group size {sel.group_size}, format {sel.fmt}): the ordinary least-squares "
          f"slope of log QiD against log D (training tokens) over the run's series checkpoints after LR warmup "
          f"(step > warmup_steps, as in the fits) whose QiD is resolved (QiD > {RESOLVED_SE:g}·se), with at least "
          f"{MIN_SLOPE_POINTS} of them; per-run slopes are listed as seed: slope ± its OLS standard error (points). "
          f"Per variant: the mean of its runs' slopes with a 95% t-interval over seeds (each run one replicate), "
          f"and \"grows\" or \"falls\" only when that interval excludes 0. Leaving out the unresolved rows "
          f"keeps the checkpoints whose noise pushed QiD up, so at a bit width near the noise floor the slopes "
          f"lean toward 0; the fitted laws below keep such rows."
          + (f" Slopes at {others} other group size/format combination(s) are computed but not shown." if others
             else ""))

    def per_run(s) -> str:
        pts = f"{s.n} pt{'s' if s.n != 1 else ''}"
        if not s.fitted:
            return f"{_seed_label(s.seed)}: none ({pts})"
        return f"{_seed_label(s.seed)}: {_sfmt(s.slope)} ± {format_value(s.se)} ({pts})"

    table = []
    for g in groups:
        fitted = g.fitted
        d_range = (f"{format_count(min(s.d_min for s in fitted))}–{format_count(max(s.d_max for s in fitted))}"
                   if fitted else "-")
        table.append([g.variant, method_label(g.method), g.bits, len(fitted) if not g.too_few else
                      f"{len(fitted)} of {len(g.runs)}", "-" if g.mean.n == 0 else _interval(g.mean, signed=True),
                      "; ".join(per_run(s) for s in g.runs), d_range, _slope_left_out([g]), g.verdict])
    doc.table(["variant", "method", "bits", "runs", "mean slope [95% CI over seeds]", "per-run slopes", "D range",
               "left out", "verdict"], table)
    left = _slope_left_out(groups)
    doc.p("Left out, counted: " + (left if left else "nothing (every checkpoint past warmup, every QiD resolved)")
          + ".")


def _fit_table_rows(entries: list[tuple[str, FitResult | None, list[str]]], law: str) -> tuple[list[str], list[list]]:
    names = LAWS[law].param_names
    header = ["group"] + [f"{n} [95% CI]" for n in names] + ["rows", "runs", "N", "left out", "notes"]
    rows = []
    for label, fr, notes in entries:
        if fr is None:
            rows.append([label] + ["-"] * len(names) + ["-", "-", "-", "-", "; ".join(notes)])
            continue
        rows.append([label] + [format_param(fr, n) for n in names] +
                    [fr.n_points, fr.n_clusters, fr.n_params_source, _exclusion_note(fr).removeprefix("left out: "),
                     "; ".join(notes)])
    return header, rows


def section_fits(ctx: Context, doc: Doc) -> None:
    if not ctx.pooled:
        return
    doc.h(2, "Fitted laws")
    doc.p("Weighted least squares in linear space (each row weighted by its QiD standard error and a fitted "
          "run-level relative noise; rows with QiD ≤ 0 are data); 95% intervals from a bootstrap over whole runs "
          "(a branch or average resampled with the run it came from). Left out by default, counted here: rows "
          "inside LR warmup and bit widths at the noise floor.")
    for law in LAWS:
        entries = [(f"method={m} (all cells)", *ctx.pooled[law][m]) for m in ctx.pooled[law]]
        entries += [(f"method={ctx.sel.method}, {label}", *fit) for label, fit in ctx.variant_fits[law].items()]
        doc.h(3, f"{law}: {LAWS[law].formula} ({LAWS[law].citation})")
        ref = PUBLISHED.get(law) or {}
        doc.p("Published: " + (", ".join(f"{k} = {v:g}" for k, v in ref.items()) + " (GPTQ on Pythia)" if ref
                               else PUBLISHED_NOTES.get(law, "no published values")) + ".")
        header, trows = _fit_table_rows(entries, law)
        doc.table(header, trows)
        excluded = sorted({e for _, fr, _ in entries if fr is not None for e in fr.excluded_rows})
        if excluded:
            doc.p(f"Left out of the {law} fits ({len(excluded)}): " + "; ".join(map(str, excluded[:40]))
                  + (" …" if len(excluded) > 40 else ""))


def section_diagnostics(ctx: Context, doc: Doc) -> None:
    res, out = ctx.res, ctx.out
    main_runs = [r for r in res.runs if r.get("kind", "main") == "main"]
    flat = {r["key"]: flatten_dotted(r["config"]) for r in main_runs}
    moe_imgs, fp8_imgs = [], []
    for r in main_runs:
        if not flat[r["key"]].get("model.moe.enabled"):
            continue
        recs = [{"step": m["step"], "layer": int(k.rsplit("/l", 1)[1]), "max_vio": v}
                for m in read_metrics(res.runs_dir / r["key"]) for k, v in m.items()
                if re.fullmatch(r"moe/max_vio/l\d+", k)]
        if recs:
            img = ctx.plot(f"MoE balance of {r['name']}", plots.plot_moe_balance, recs,
                           out / f"moe_balance_{r['key']}.png", title=f"MoE load balance (MaxVio) — {r['name']}")
            if img:
                moe_imgs.append((img, r["name"]))
    for r in main_runs:
        if not flat[r["key"]].get("fp8.enabled"):
            continue
        mine = {k: v for k, v in flat[r["key"]].items() if not k.startswith("fp8.") and k != "name"}
        twin = next((o for o in main_runs if o is not r and not flat[o["key"]].get("fp8.enabled") and
                     {k: v for k, v in flat[o["key"]].items() if not k.startswith("fp8.") and k != "name"} == mine),
                    None)
        if twin is None:
            ctx.notes.append(f"FP8 gap of {r['name']}: no BF16 cell with the same config and seed to compare with")
            continue
        a, b = read_metrics(res.runs_dir / twin["key"]), read_metrics(res.runs_dir / r["key"])
        img = ctx.plot(f"FP8 gap of {r['name']}", plots.plot_fp8_gap, a, b, out / f"fp8_gap_{r['key']}.png",
                       loss_key="loss", smooth=max(1, min(len(b) // 20, 25)),
                       title=f"FP8 vs BF16 training loss — {r['name']} vs {twin['name']}")
        if img:
            fp8_imgs.append((img, r["name"], twin["name"]))
    if moe_imgs or fp8_imgs:
        doc.h(2, "Technique diagnostics")
        for img, name in moe_imgs:
            doc.image(img, f"{name}: MaxVio (max expert load / mean load − 1) per MoE layer during training.")
        for img, name, twin in fp8_imgs:
            doc.image(img, f"{name} vs {twin} (same seed): relative training-loss gap of simulated FP8 to BF16; the "
                           f"FP8 cell's '16-bit' loss in the QiD rows is that of the FP8-trained model.")


# ---- recovery fine-tuning (issue #20; efftrain.quant.recovery, docs/RECOVERY.md) -----------------
RECOVERY_MIN_POINTS = 3  # a run needs this many usable checkpoints for a slope of its recovered fraction


def split_recovery_format(fmt: str) -> tuple[str, str] | None:
    """'int+lora-t65536-r8-a16' -> ('int', 'lora-t65536-r8-a16'); None for a plain PTQ format."""
    from efftrain.quant.recovery import RECOVERY_METHODS

    at = max(fmt.rfind(f"+{m}-") for m in RECOVERY_METHODS)
    return (fmt[:at], fmt[at + 1:]) if at >= 0 else None


@dataclass
class RecoveryGroup:
    """The recovery rows of one (setting, PTQ method, bits, group size, base format): the recovered
    fraction per (variant, checkpoint) over seeds, and its per-run slopes against log10(D/N)."""

    setting: str
    method: str
    bits: int
    group_size: int
    fmt: str
    points: list[dict] = field(default_factory=list)  # variant, tokens, d_per_n, fraction (Interval), seeds, qids
    runs: list[dict] = field(default_factory=list)  # variant, seed, n, slope, se (nan below RECOVERY_MIN_POINTS)
    left_out: Counter = field(default_factory=Counter)
    slope: Interval | None = None  # over runs (t-interval), or one run's OLS interval
    slope_method: str = ""

    @property
    def verdict(self) -> str:
        iv = self.slope
        if iv is None or not math.isfinite(iv.estimate):
            return f"no slope (no run has {RECOVERY_MIN_POINTS} usable checkpoints)"
        if not iv.defined:
            return "one run without an interval: no claim"
        if iv.includes_zero:
            return "no detectable trend"
        return "recoverability falls as D/N grows" if iv.hi < 0 else "recoverability rises as D/N grows"


def recovery_groups(rows: list[dict], runs: list[dict], labels: dict[str, str], level: float = 0.95
                    ) -> list[RecoveryGroup]:
    """Recovery rows grouped for the report. A row is used when its checkpoint is past LR warmup (as in
    the fits) and its QiD before recovery is resolved (qid_before > 2·qid_before_se); the others are
    counted in `left_out`. D/N = the checkpoint's training tokens / n_params (the fits' N)."""
    from efftrain.analysis.compare import _num, _seed_of, in_warmup, ols_slope
    from efftrain.analysis.stats import se_interval, t_interval

    by_key = {r["key"]: r for r in runs}
    groups: dict[tuple, RecoveryGroup] = {}
    usable: dict[tuple, list[tuple]] = {}  # (variant, seed, D, D/N, fraction, qid before, qid after)
    for r in rows:
        split = split_recovery_format(str(r.get("format") or ""))
        if not r.get("recovery_method") or split is None or r.get("run_key") not in by_key:
            continue
        key = (split[1], r["method"], int(r["bits"]), int(r["group_size"]), split[0])
        g = groups.setdefault(key, RecoveryGroup(*key))
        before, se, frac = _num(r.get("qid_before")), _num(r.get("qid_before_se")), _num(r.get("recovered_fraction"))
        d, n = _num(r.get("tokens")), _num(r.get("n_params"))
        if in_warmup(r):
            g.left_out["warmup"] += 1
        elif not all(math.isfinite(v) for v in (before, frac, d, n)) or d <= 0 or n <= 0:
            g.left_out["nonfinite"] += 1
        elif not (before > RESOLVED_SE * se if math.isfinite(se) and se > 0 else before > 0):
            g.left_out["unresolved"] += 1
        else:
            run = by_key[r["run_key"]]
            usable.setdefault(key, []).append((labels.get(run["key"], run["replicate"]), _seed_of(run), d, d / n,
                                               frac, before, _num(r.get("qid"))))
    for key, g in groups.items():
        pts = usable.get(key, [])
        for variant, tokens in dict.fromkeys((p[0], p[2]) for p in pts):
            mine = [p for p in pts if p[0] == variant and p[2] == tokens]
            g.points.append({"variant": variant, "tokens": tokens, "d_per_n": mine[0][3],
                             "fraction": t_interval([p[4] for p in mine], level), "seeds": len(mine),
                             "qid_before": float(np.mean([p[5] for p in mine])),
                             "qid": float(np.mean([p[6] for p in mine]))})
        g.points.sort(key=lambda p: (p["variant"], p["d_per_n"]))
        for variant, seed in dict.fromkeys((p[0], p[1]) for p in pts):
            mine = sorted((p for p in pts if p[0] == variant and p[1] == seed), key=lambda p: p[3])
            slope, se = (ols_slope([math.log10(p[3]) for p in mine], [p[4] for p in mine])
                         if len(mine) >= RECOVERY_MIN_POINTS else (math.nan, math.nan))
            g.runs.append({"variant": variant, "seed": seed, "n": len(mine), "slope": slope, "se": se})
        fitted = [x for x in g.runs if math.isfinite(x["slope"])]
        if len(fitted) >= 2:
            g.slope = t_interval([x["slope"] for x in fitted], level)
            g.slope_method = f"mean of {len(fitted)} runs' slopes, t-interval over runs"
        elif len(fitted) == 1:
            x = fitted[0]
            lo, hi = se_interval(x["slope"], x["se"], x["n"] - 2, level) if math.isfinite(x["se"]) else \
                (math.nan, math.nan)
            g.slope = Interval(x["slope"], lo, hi, x["se"], 1, level, "one run: OLS interval over its checkpoints")
            g.slope_method = "one run: OLS interval over its checkpoints, not over seeds"
    return sorted(groups.values(), key=lambda g: (g.setting, g.method, g.bits, g.group_size, g.fmt))


def _plot_recovery(groups: list[RecoveryGroup], path: Path, title: str) -> Path:
    """Recovered fraction against D/N (log), colour = bit width, line/marker = variant, error bars: the
    t-interval over seeds where a point has replicates."""
    pts = [p for g in groups for p in g.points]
    if not pts:
        raise ValueError("no usable recovery rows")
    bits = sorted({g.bits for g in groups})
    variants = list(dict.fromkeys(p["variant"] for p in pts))
    colors = dict(zip(bits, plots._colors(len(bits))))
    with plots._figure(path, title) as (fig, ax):
        for g in groups:
            for vi, v in enumerate(variants):
                mine = [p for p in g.points if p["variant"] == v]
                if not mine:
                    continue
                xs = [p["d_per_n"] for p in mine]
                ys = [p["fraction"].estimate for p in mine]
                ax.plot(xs, ys, color=colors[g.bits], linestyle=plots._LINESTYLES[vi % len(plots._LINESTYLES)],
                        marker=plots._MARKERS[vi % len(plots._MARKERS)],
                        label=f"{g.bits}-bit" + (f", {v}" if len(variants) > 1 else ""))
                ci = [p["fraction"] for p in mine]
                lo = [max(c.estimate - c.lo, 0.0) if c.defined else 0.0 for c in ci]
                hi = [max(c.hi - c.estimate, 0.0) if c.defined else 0.0 for c in ci]
                if any(lo) or any(hi):
                    ax.errorbar(xs, ys, yerr=np.array([lo, hi]), fmt="none", ecolor=colors[g.bits], capsize=2)
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("tokens per parameter D/N of the checkpoint")
        ax.set_ylabel("recovered fraction (QiD before − after) / before")
        plots._legend(ax)
    return Path(path)


def section_recovery(ctx: Context, doc: Doc) -> None:
    groups = recovery_groups(ctx.rows, ctx.res.runs, ctx.labels)
    if not groups:
        return
    doc.h(2, "Recovery fine-tuning")
    doc.p("Rows of `ptq.recovery` (docs/RECOVERY.md): after PTQ, LoRA adapters on the frozen quantized weights "
          "(lora) or a quantization-aware continuation from the 16-bit checkpoint, quantized afterwards (qat), "
          "trained for the setting's token budget on the train split. QiD before and after are measured on the same "
          "val windows against the same reference, the original checkpoint's 16-bit loss; recovered fraction = "
          "(QiD before − QiD after) / QiD before (1: all the damage gone; above 1: the recovery's extra training "
          "beat the 16-bit model; below 0: it made things worse). D/N = the checkpoint's training tokens per "
          f"quantized parameter. Used: rows past LR warmup whose QiD before is resolved (> {RESOLVED_SE:g}·se). "
          "Points are means over seeds with a 95% t-interval over seeds where a point has replicates. The trend: "
          "each run's OLS slope of the recovered fraction against log10(D/N) over its checkpoints (at least "
          f"{RECOVERY_MIN_POINTS}), averaged over runs with a 95% t-interval over runs (one run: its OLS interval); "
          "an interval that contains 0 is \"no detectable trend\".")
    sentences, table = [], []
    for g in groups:
        slope = "-" if g.slope is None else _interval(g.slope, signed=True)
        left = ", ".join(f"{g.left_out[k]} {what}" for k, what in
                         (("warmup", "in warmup"), ("unresolved", "unresolved before"), ("nonfinite", "not finite"))
                         if g.left_out[k])
        fr = [p["fraction"].estimate for p in g.points]
        median = (lambda key: format_value(float(np.median([p[key] for p in g.points]))) if g.points else "-")
        table.append([g.setting, method_label(g.method), g.bits, g.group_size, g.fmt,
                      sum(p["seeds"] for p in g.points), len(g.runs), median("qid_before"), median("qid"),
                      format_value(float(np.median(fr))) if fr else "-", slope, g.verdict, left])
        where = f"**{g.setting}** after {g.bits}-bit {method_label(g.method)} (group {g.group_size}, {g.fmt})"
        sentences.append(f"{where}: {g.verdict}." if g.slope is None else
                         f"{where}: slope of the recovered fraction per decade of D/N {slope} ({g.slope_method}): "
                         f"{g.verdict}.")
    doc.ul(sentences)
    for setting, method, gs, fmt in dict.fromkeys((g.setting, g.method, g.group_size, g.fmt) for g in groups):
        mine = [g for g in groups if (g.setting, g.method, g.group_size, g.fmt) == (setting, method, gs, fmt)]
        name = re.sub(r"[^\w.-]", "_", f"recovery_{setting}_{method}_g{gs}_{fmt}")
        img = ctx.plot(f"recovery {setting} ({method})", _plot_recovery, mine, ctx.out / f"{name}.png",
                       title=f"Recovered fraction vs D/N — {setting} after {method_label(method)}")
        if img:
            doc.image(img, f"{setting} after {method_label(method)} (group {gs}, {fmt}): recovered fraction against "
                           f"tokens per parameter; colour = bit width, line style = variant; error bars: 95% "
                           f"t-interval over seeds.")
    doc.table(["setting", "PTQ method", "bits", "group", "format", "rows", "runs", "median QiD before",
               "median QiD after", "median recovered fraction", "slope per decade of D/N [95% CI]", "verdict",
               "left out"], table)


# ---- PTQ schemes beyond weight-only (issue 19; efftrain.quant.kvcache, activations, rotation, ...) -------
KV_16 = "kv-16"  # the label of a 16-bit KV cache (kv_quant empty)
_KV_TOKEN = re.compile(r"^kv-")
_ROT_TOKEN = re.compile(r"^(rot-.*|rot|values)$")
_SCHEME_TOKEN = re.compile(r"^(a\d+|afp8|kv-.*|rot-.*|rot|values|sq[\d.]*)$")
_ATTENTION_FIELDS = ("model.attention", "model.n_kv_heads", "model.head_dim", "model.mla.")
SCHEME_FAMILIES = {  # scheme_family -> heading, in the order the report shows them
    "act": "Activation quantization",
    "smoothquant": "SmoothQuant",
    "fp8": "FP8: E4M3 block weights with E4M3 activations",
    "fp8-block": "FP8 block weights (16-bit activations)",
    "billm": "BiLLM (1-bit weights)",
    "rotation": "Rotations",
}


def _strip_format(fmt: str, token: re.Pattern) -> str:
    """The format without its '+'-parts (after the first) that match `token`: 'int+a8+kv-int4' -> 'int+a8'
    (the KV part), 'int+rot-hadamard' -> 'int' (the rotation), 'int+sq0.5+a8' -> 'int' (every scheme part)."""
    parts = str(fmt or "").split("+")
    return "+".join([parts[0]] + [p for p in parts[1:] if not token.match(p)])


def scheme_family(row: dict) -> str | None:
    """Which scheme section reports a row (a key of SCHEME_FAMILIES): 'billm', 'fp8' (FP8 block weights
    with an activation quantizer), 'fp8-block', 'rotation', 'smoothquant', 'act'; None for a KV-cache row
    (section_kv_cache) and for weight-only rows of the other methods."""
    if not _empty(row.get("kv_quant")):
        return None
    method = str(row.get("method"))
    if method == "billm":
        return "billm"
    if method == "fp8-block":
        return "fp8" if not _empty(row.get("act_quant")) else "fp8-block"
    if not _empty(row.get("rotation")):
        return "rotation"
    if not _empty(row.get("smooth_alpha")):
        return "smoothquant"
    if not _empty(row.get("act_quant")):
        return "act"
    return None


def _weights_label(method: str, bits: int, group_size: int, fmt: str) -> str:
    """'16-bit weights' (method none), '4-bit GPTQ weights (group 128, int)'."""
    if method == "none":
        rest = fmt.split("+", 1)[1] if "+" in fmt else ""
        return "16-bit weights" + (f" ({rest})" if rest else "")
    return f"{bits}-bit {method_label(method)} weights (group {group_size}, {fmt})"


def _bytes(b: float) -> str:
    return f"{format_count(b)} B/token"


@dataclass
class FinalQiD:
    """QiD of one variant at one setting, each run (seed) at its final checkpoint."""

    qid: dict = field(default_factory=dict)  # seed -> QiD
    se: dict = field(default_factory=dict)  # seed -> qid_se (nan when the row has none)
    tokens: dict = field(default_factory=dict)  # seed -> training tokens of the checkpoint
    base: dict = field(default_factory=dict)  # seed -> QiD of the reference setting at the same checkpoint

    @property
    def seeds(self) -> int:
        return len(self.qid)

    @property
    def interval(self) -> Interval:
        """Mean over seeds, t-interval over seeds (no interval with one seed)."""
        return t_interval(list(self.qid.values()))

    @property
    def window_se(self) -> float:
        """Standard error of the mean QiD from the eval windows alone: sqrt(Σ se²)/n (nan if a row lacks one)."""
        ses = list(self.se.values())
        return math.sqrt(sum(x * x for x in ses)) / len(ses) if ses and all(math.isfinite(x) for x in ses) else math.nan

    @property
    def final_tokens(self) -> float:
        return float(np.mean(list(self.tokens.values()))) if self.tokens else math.nan

    def qid_se_text(self) -> str:
        est = self.interval.estimate
        return format_value(est) + (f" ± {format_value(self.window_se)}" if math.isfinite(self.window_se) else "")

    def diff_to_base(self) -> Interval | None:
        """QiD − the reference's QiD at the same checkpoints, paired by seed (None without a reference)."""
        return paired_difference(self.qid, self.base) if self.base else None


def _final_by_run(rows: list[dict], by_key: dict, labels: dict[str, str]) -> dict[tuple, list[dict]]:
    """(variant, seed) -> its rows at its last checkpoint among `rows` (a run is (variant, seed), as in
    compare.run_series: the branches of one parent and seed are joined)."""
    runs_of: dict[tuple, list[dict]] = {}
    for r in rows:
        run = by_key[r["run_key"]]
        runs_of.setdefault((labels.get(run["key"], run["replicate"]), _seed_of(run)), []).append(r)
    out = {}
    for k, rs in runs_of.items():
        last = max(_num(r.get("tokens")) for r in rs)
        out[k] = [r for r in rs if _num(r.get("tokens")) == last]
    return out


def _fill(final: FinalQiD, seed, r: dict) -> None:
    final.qid[seed], final.se[seed], final.tokens[seed] = _num(r["qid"]), _num(r.get("qid_se")), _num(r.get("tokens"))


# ---- the KV cache --------------------------------------------------------------------------------
@dataclass
class KVPoint:
    """One variant with one KV-cache quantizer at one weight setting: its bytes per token and its QiD at
    the runs' final checkpoints."""

    weights: tuple  # (method, bits, group_size, format without the KV part)
    variant: str
    attention: str  # model.attention of the variant's runs: 'mha' | 'mla'
    kv: str  # kv_quant, KV_16 for a 16-bit cache
    bytes_per_token: float
    final: FinalQiD


@dataclass
class KVComparison:
    """MLA against MHA at one weight setting, at the pair of their points nearest in bytes per token:
    QiD(MLA) − QiD(MHA), paired by seed."""

    weights: tuple
    mha: KVPoint
    mla: KVPoint
    diff: Interval
    differ: list[str] = field(default_factory=list)  # config fields the two differ in besides attention


def kv_points(rows: list[dict], runs: list[dict], labels: dict[str, str]) -> list[KVPoint]:
    """The rows with kv_bytes_per_token of every weight setting (method, bits, group size, format without
    its KV part) that has KV-cache rows, as points per (variant, KV quantizer); rows of that setting with
    a 16-bit cache (kv_quant empty) are its KV_16 points. Each run counts at its final checkpoint among
    the setting's rows."""
    by_key = {r["key"]: r for r in runs}
    attention = {r["key"]: str(flatten_dotted(r["config"]).get("model.attention") or "mha") for r in runs}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        b, q = _num(r.get("kv_bytes_per_token")), _num(r.get("qid"))
        if r.get("run_key") in by_key and math.isfinite(b) and b > 0 and math.isfinite(q):
            w = (str(r["method"]), int(r["bits"]), int(r["group_size"]), _strip_format(r["format"], _KV_TOKEN))
            groups.setdefault(w, []).append(r)
    points: dict[tuple, KVPoint] = {}
    for w, grows in groups.items():
        if all(_empty(r.get("kv_quant")) for r in grows):
            continue
        for (variant, seed), finals in _final_by_run(grows, by_key, labels).items():
            for r in finals:
                kv = KV_16 if _empty(r.get("kv_quant")) else str(r["kv_quant"])
                p = points.setdefault((w, variant, kv), KVPoint(w, variant, attention[r["run_key"]], kv,
                                                                 float(r["kv_bytes_per_token"]), FinalQiD()))
                _fill(p.final, seed, r)
    return sorted(points.values(), key=lambda p: (p.weights[0] != "none", p.weights, p.attention, p.variant,
                                                  -p.bytes_per_token))


def _attention_signature(run: dict) -> str:
    flat = flatten_dotted(run["config"])
    keep = {k: v for k, v in flat.items() if k not in ("name", "train.seed", "data.shuffle_seed")
            and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in _ATTENTION_FIELDS)}
    return json.dumps(keep, sort_keys=True, default=str)


def kv_attention_comparisons(points: list[KVPoint], runs: list[dict], labels: dict[str, str]
                             ) -> list[KVComparison]:
    """Per weight setting, each MLA variant against its MHA twin (the MHA variant whose config differs only
    in the attention: model.attention, model.n_kv_heads, model.head_dim, model.mla.*; failing that, the
    setting's only MHA variant, its other differences listed), at the pair of their points nearest in
    log bytes per token (ties: the larger cache); QiD(MLA) − QiD(MHA) paired by seed."""
    run_of = {}
    for r in runs:
        run_of.setdefault(labels.get(r["key"], r["replicate"]), r)
    out = []
    for w in dict.fromkeys(p.weights for p in points):
        mine = [p for p in points if p.weights == w]
        mha = list(dict.fromkeys(p.variant for p in mine if p.attention == "mha"))
        for v_mla in dict.fromkeys(p.variant for p in mine if p.attention == "mla"):
            sig = _attention_signature(run_of[v_mla])
            twins = [v for v in mha if _attention_signature(run_of[v]) == sig]
            differ = []
            if not twins and len(mha) == 1:
                twins = mha
                differ = [k for k in differing_fields([run_of[mha[0]]["config"], run_of[v_mla]["config"]],
                                                      ignore=("name", "train.seed", "data.shuffle_seed"))
                          if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in _ATTENTION_FIELDS)]
            if len(twins) != 1:
                continue
            pairs = [(a, b) for a in mine if a.variant == twins[0] for b in mine if b.variant == v_mla]
            a, b = min(pairs, key=lambda ab: (abs(math.log(ab[1].bytes_per_token / ab[0].bytes_per_token)),
                                              -ab[0].bytes_per_token, -ab[1].bytes_per_token))
            out.append(KVComparison(w, a, b, paired_difference(b.final.qid, a.final.qid), differ))
    return out


def kv_sentence(c: KVComparison) -> str:
    """MLA vs MHA in words: which has the lower QiD at (nearly) equal bytes per token, with the interval."""
    a, b, iv = c.mha, c.mla, c.diff
    ratio = max(a.bytes_per_token, b.bytes_per_token) / min(a.bytes_per_token, b.bytes_per_token)
    at = (f"at equal KV-cache bytes per token ({_bytes(a.bytes_per_token)}: MHA {a.kv}, MLA {b.kv})" if ratio <= 1.01
          else f"at the nearest KV-cache bytes per token (MHA {a.kv}: {_bytes(a.bytes_per_token)}, MLA {b.kv}: "
               f"{_bytes(b.bytes_per_token)}, a factor {ratio:.2g} apart)")
    head = f"{_weights_label(*c.weights)}, **{b.variant}** (MLA) vs **{a.variant}** (MHA) {at}, final checkpoints: "
    what = f"QiD(MLA) − QiD(MHA) = {_interval(iv, signed=True)} nats"
    if iv.n == 0:
        verdict = "no seed shared, so no paired comparison"
    elif not iv.defined:
        verdict = (f"QiD(MLA) − QiD(MHA) = {_sfmt(iv.estimate)} nats from 1 seed pair, too few for an interval, "
                   f"so no claim")
    elif iv.includes_zero:
        verdict = f"no detectable difference, {what} ({iv.n} seed pairs)"
    else:
        verdict = f"**{'MLA' if iv.hi < 0 else 'MHA'}** has the lower QiD, {what} ({iv.n} seed pairs)"
    extra = (f" Their configs differ in more than the attention ({', '.join(c.differ)}), so part of any gap may "
             f"come from that." if c.differ else "")
    return head + verdict + "." + extra


def _plot_kv_cache(points: list[KVPoint], path: Path, title: str) -> Path:
    """QiD against KV bytes per token (log), one line per variant (colour), marker = attention; error bars:
    the t-interval over seeds, or ±1.96·se of the eval windows for one seed."""
    if not points:
        raise ValueError("no KV-cache points")
    variants = list(dict.fromkeys(p.variant for p in points))
    colors = dict(zip(variants, plots._colors(len(variants))))
    with plots._figure(path, title) as (fig, ax):
        for vi, v in enumerate(variants):
            mine = sorted((p for p in points if p.variant == v), key=lambda p: p.bytes_per_token)
            xs = [p.bytes_per_token for p in mine]
            ivs = [p.final.interval for p in mine]
            ys = [iv.estimate for iv in ivs]
            half = [((iv.estimate - iv.lo, iv.hi - iv.estimate) if iv.defined else
                     (1.96 * p.final.window_se,) * 2 if math.isfinite(p.final.window_se) else (0.0, 0.0))
                    for iv, p in zip(ivs, mine)]
            ax.errorbar(xs, ys, yerr=np.array(half).T, color=colors[v], capsize=2,
                        marker="o" if mine[0].attention == "mha" else "s",
                        linestyle=plots._LINESTYLES[vi % len(plots._LINESTYLES)],
                        label=f"{v} ({mine[0].attention.upper()})")
            for x, y, p in zip(xs, ys, mine):
                ax.annotate(p.kv, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colors[v])
        ax.axhline(0.0, color="0.4", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("KV-cache bytes per token (all layers, codes + scales)")
        ax.set_ylabel("QiD at the final checkpoint (nats/token)")
        plots._legend(ax)
    return Path(path)


def section_kv_cache(ctx: Context, doc: Doc) -> None:
    every = kv_points(ctx.all_rows, ctx.res.runs, ctx.labels)
    # the KV question on its own: weights alone (16-bit or one quantizer), no activation quantizer, rotation or
    # smoothing; a grid crossing every axis would otherwise give one sub-section per combination
    points = [p for p in every if _strip_format(p.weights[3], _SCHEME_TOKEN) == p.weights[3]]
    if not every:
        return
    doc.h(2, "KV-cache quantization")
    doc.p("Rows with a KV-cache quantizer (efftrain.quant.kvcache): the cached K and V (MHA) or latent c_kv and "
          "shared RoPE key (MLA) quantized token by token as decoding writes them, attention run on the dequantized "
          "cache. Bytes per token: codes + float16 scales summed over all layers (a 16-bit cache, kv-16: 2 bytes "
          "per element). Only rows of the same weight setting are compared: 16-bit weights (method none), or one "
          "weight quantizer and its format, each with its own table, plot and sentence. QiD at each run's final "
          "checkpoint: mean over seeds ± the standard error from the eval windows (qid_se), and a 95% t-interval "
          "over seeds where there are replicates. MLA vs MHA: each MLA variant against its MHA twin, at the pair of "
          "their points nearest in bytes per token, paired by seed; an interval that contains 0 is \"no detectable "
          "difference\".")
    left_out = len({p.weights for p in every}) - len({p.weights for p in points})
    if left_out:
        doc.p(f"Shown: the weight settings without an activation quantizer, rotation or SmoothQuant. {left_out} "
              "more setting(s) of this grid combine the KV cache with those; their rows are in the results store.")
    sentences = [kv_sentence(c) for c in kv_attention_comparisons(points, ctx.res.runs, ctx.labels)]
    if sentences:
        doc.ul(sentences)
    for w in dict.fromkeys(p.weights for p in points):
        mine = [p for p in points if p.weights == w]
        label = _weights_label(*w)
        name = re.sub(r"[^\w.-]", "_", f"kv_cache_{w[0]}_w{w[1]}_g{w[2]}_{w[3]}")
        doc.h(3, label)
        img = ctx.plot(f"KV cache ({label})", _plot_kv_cache, mine, ctx.out / f"{name}.png",
                       title=f"QiD vs KV-cache bytes per token — {label}")
        if img:
            doc.image(img, f"{label}: QiD at the final checkpoint against KV-cache bytes per token, one line per "
                           f"variant (marker: ○ MHA, □ MLA), each point labelled by its KV quantizer; error bars: "
                           f"95% t-interval over seeds (one seed: ±1.96·se of the eval windows).")
        doc.table(["variant", "attention", "KV cache", "bytes/token", "seeds", "final tokens",
                   "QiD ± se (eval windows)", "QiD [95% CI over seeds]"],
                  [[p.variant, p.attention.upper(), p.kv, format_count(p.bytes_per_token), p.final.seeds,
                    format_count(p.final.final_tokens), p.final.qid_se_text(), _interval(p.final.interval)]
                   for p in mine])


# ---- activation quantization, FP8, SmoothQuant, BiLLM, FP8 block weights, rotations -----------------
@dataclass
class SchemePoint:
    """One variant at one scheme row key (method, bits, group size, format), each run at its final
    checkpoint; `final.base` holds the same weights alone (weight-only, the format without its scheme
    parts) at the same checkpoints, where the grid has them."""

    family: str
    scheme: str
    method: str
    bits: int
    group_size: int
    fmt: str
    base_fmt: str | None  # the weight-only format it is compared with (None: the row is weight-only itself)
    variant: str
    final: FinalQiD


def scheme_points(rows: list[dict], runs: list[dict], labels: dict[str, str]) -> list[SchemePoint]:
    """The rows of scheme_family != None, per (family, method, bits, group, format, variant), in family order."""
    by_key = {r["key"]: r for r in runs}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        fam = scheme_family(r)
        if fam is not None and r.get("run_key") in by_key and math.isfinite(_num(r.get("qid"))):
            groups.setdefault((fam, str(r["method"]), int(r["bits"]), int(r["group_size"]), str(r["format"])),
                              []).append(r)
    weight_only = {(r["run_key"], int(r["step"]), str(r["method"]), int(r["bits"]), int(r["group_size"]),
                    str(r["format"])): _num(r["qid"]) for r in rows if is_weight_only(r)}
    points = []
    for (fam, method, bits, gs, fmt), grows in groups.items():
        base_fmt = None if is_weight_only(grows[0]) else _strip_format(fmt, _SCHEME_TOKEN)
        scheme = next((str(r["scheme"]) for r in grows if not _empty(r.get("scheme"))), fmt)
        per_variant: dict[str, SchemePoint] = {}
        for (variant, seed), finals in _final_by_run(grows, by_key, labels).items():
            r = finals[0]
            p = per_variant.setdefault(variant, SchemePoint(fam, scheme, method, bits, gs, fmt, base_fmt, variant,
                                                            FinalQiD()))
            _fill(p.final, seed, r)
            base = weight_only.get((r["run_key"], int(r["step"]), method, bits, gs, base_fmt))
            if base is not None and math.isfinite(base):
                p.final.base[seed] = base
        points += per_variant.values()
    order = list(SCHEME_FAMILIES)
    variants = list(dict.fromkeys(labels.values()))
    return sorted(points, key=lambda p: (order.index(p.family), p.method, p.bits, p.group_size, p.fmt,
                                         variants.index(p.variant) if p.variant in variants else len(variants)))


@dataclass
class RotationSlope:
    """Per-run slopes of log QiD vs log D of one variant with a rotation and without it (the same
    method, bits, group size, and the format without its rotation part), and their difference paired by
    seed (the same run's checkpoints measured both ways)."""

    variant: str
    method: str
    bits: int
    group_size: int
    fmt: str
    base_fmt: str
    rotation: str
    with_rotation: SlopeGroup
    without: SlopeGroup | None
    diff: Interval  # slope(with) − slope(without), paired by seed, t-interval over seeds

    @property
    def verdict(self) -> str:
        iv = self.diff
        if iv.n == 0:
            return "no run has a slope both with and without the rotation"
        if not iv.defined:
            return "one seed pair: no interval, no claim"
        if iv.includes_zero:
            return "no detectable difference"
        return "rotation shrinks QiD growth with tokens" if iv.hi < 0 else "rotation makes QiD grow faster with tokens"


def rotation_slopes(rows: list[dict], runs: list[dict], level: float = 0.95) -> list[RotationSlope]:
    """For every rotation row key (method, bits, group, format, kv_quant empty) and variant, the per-run
    slopes (compare.run_slopes: after warmup, QiD resolved, at least MIN_SLOPE_POINTS checkpoints) with the
    rotation and at the format without its rotation part, and slope(with) − slope(without) paired by seed."""
    rotated = [r for r in rows if not _empty(r.get("rotation")) and _empty(r.get("kv_quant"))]
    base_of, label_of = {}, {}
    for r in rotated:
        key = (str(r["method"]), int(r["bits"]), int(r["group_size"]), str(r["format"]))
        base_of[key] = _strip_format(r["format"], _ROT_TOKEN)
        label_of.setdefault(key, str(r["rotation"]))
    wanted = {(m, b, g, f) for (m, b, g, _), f in base_of.items()}
    base_rows = [r for r in rows if _empty(r.get("rotation")) and
                 (str(r["method"]), int(r["bits"]), int(r["group_size"]), str(r["format"])) in wanted]
    groups = slope_groups(run_slopes(rotated + base_rows, runs), level)
    index = {(g.variant, g.method, g.bits, g.group_size, g.fmt): g for g in groups}
    out = []
    for g in groups:
        key = (g.method, g.bits, g.group_size, g.fmt)
        if key not in base_of:
            continue
        base = index.get((g.variant, g.method, g.bits, g.group_size, base_of[key]))
        mine = {s.seed: s.slope for s in g.fitted}
        theirs = {s.seed: s.slope for s in base.fitted} if base is not None else {}
        out.append(RotationSlope(g.variant, g.method, g.bits, g.group_size, g.fmt, base_of[key], label_of[key], g,
                                 base, paired_difference(mine, theirs, level)))
    return out


def rotation_sentence(r: RotationSlope) -> str:
    base = "-" if r.without is None or r.without.mean.n == 0 else _interval(r.without.mean, signed=True)
    with_ = "-" if r.with_rotation.mean.n == 0 else _interval(r.with_rotation.mean, signed=True)
    diff = "" if r.diff.n == 0 else (f"; difference (with − without, paired by seed) {_interval(r.diff, signed=True)}"
                                     + (f" over {r.diff.n} seed pairs" if r.diff.n > 1 else ""))
    return (f"Does rotation ({r.rotation}) shrink QiD growth with tokens? **{r.variant}**, {r.bits}-bit "
            f"{method_label(r.method)} (group {r.group_size}): per-run slope of log QiD vs log D {with_} with the "
            f"rotation ({r.fmt}) vs {base} without ({r.base_fmt}){diff}: {r.verdict}.")


def section_schemes(ctx: Context, doc: Doc) -> None:
    points = scheme_points(ctx.all_rows, ctx.res.runs, ctx.labels)
    if not points:
        return
    doc.h(2, "Other PTQ schemes")
    doc.p("Rows beyond weight-only PTQ, other than the KV cache: activations quantized (a8 / a4 / afp8) before "
          "every quantized Linear, SmoothQuant (activation outliers migrated into the weights with exponent α), "
          "FP8 block weights (E4M3, with or without E4M3 activations), BiLLM (1-bit weights) and rotations "
          "(QuaRot-style, folded into the weights before they are quantized). QiD at each run's final checkpoint: "
          "mean over seeds ± the standard error from the eval windows (qid_se), and a 95% t-interval over seeds "
          "where there are replicates; Δ: against the same weights alone (the weight-only row of the same method, "
          "bits, group size and format without the scheme's parts) at the same checkpoints, paired by seed.")
    for fam, heading in SCHEME_FAMILIES.items():
        mine = [p for p in points if p.family == fam]
        if not mine:
            continue
        doc.h(3, heading)
        doc.table(["scheme", "weights", "format", "variant", "seeds", "final tokens", "QiD ± se (eval windows)",
                   "QiD [95% CI over seeds]", "vs weights alone", "Δ, paired [95% CI]"],
                  [[p.scheme, _weights_label(p.method, p.bits, p.group_size, p.base_fmt or p.fmt), p.fmt, p.variant,
                    p.final.seeds, format_count(p.final.final_tokens), p.final.qid_se_text(),
                    _interval(p.final.interval), p.base_fmt if p.final.base else "-",
                    _interval(p.final.diff_to_base(), signed=True) if p.final.base else "-"] for p in mine])
        if fam != "rotation":
            continue
        slopes = rotation_slopes(ctx.all_rows, ctx.res.runs)
        if not slopes:
            continue
        doc.p(f"Rotation and QiD growth: each run's OLS slope of log QiD against log D over its checkpoints after "
              f"LR warmup whose QiD is resolved (QiD > {RESOLVED_SE:g}·se), at least {MIN_SLOPE_POINTS} of them, "
              f"as in the per-run slopes above, with the rotation and without it (the same run's checkpoints); "
              f"the difference is paired by seed with a 95% t-interval over seeds, \"no detectable difference\" "
              f"when it contains 0.")
        doc.ul([rotation_sentence(r) for r in slopes])
        doc.table(["variant", "weights", "rotation", "slope with [95% CI]", "slope without [95% CI]",
                   "with − without, paired [95% CI]", "seed pairs", "left out", "verdict"],
                  [[r.variant, f"{r.bits}-bit {method_label(r.method)} (group {r.group_size})",
                    f"{r.rotation} ({r.fmt} vs {r.base_fmt})",
                    "-" if r.with_rotation.mean.n == 0 else _interval(r.with_rotation.mean, signed=True),
                    "-" if r.without is None or r.without.mean.n == 0 else _interval(r.without.mean, signed=True),
                    "-" if r.diff.n == 0 else _interval(r.diff, signed=True), r.diff.n,
                    _slope_left_out([r.with_rotation] + ([r.without] if r.without else [])), r.verdict]
                   for r in slopes])


def section_notes(ctx: Context, doc: Doc) -> None:
    if ctx.notes:
        doc.h(2, "Notes")
        doc.ul(ctx.notes)


# ----------------------------------------------------------------------------------------------
# Building the report
# ----------------------------------------------------------------------------------------------
def build_report(source: str | Path, out_dir: str | Path, *, method: str | None = None, bits: int | None = None,
                 baseline: str | None = None, n_boot: int = 300, log: Log = print) -> Path:
    """Write out_dir/report.html and out_dir/report.md (+ PNGs); returns the HTML path."""
    res = load_grid_results(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    old_md = out / "report.md"
    if old_md.exists():  # images of an earlier report here (other cells) would linger beside the new one
        for name in re.findall(r"!\[[^\]]*\]\(([\w.-]+\.png)\)", old_md.read_text()):
            (out / name).unlink(missing_ok=True)
    variants = list(dict.fromkeys(r["replicate"] for r in res.runs))
    if baseline is not None and baseline not in variants:
        raise GridError(f"--baseline '{baseline}' is not a variant (variants: {', '.join(variants)})")
    qid_rows = _cluster_rows([r for r in res.rows if r.get("qid") is not None], res.runs)
    ctx = Context(res=res, out=out, baseline=baseline or default_baseline(res.runs), n_boot=n_boot,
                  labels=series_labels(res.runs), rows=[r for r in qid_rows if is_weight_only(r)], all_rows=qid_rows)
    analyse(ctx, method, bits)
    n_scheme = len(qid_rows) - len(ctx.rows)
    if n_scheme:
        ctx.notes.append(f"{n_scheme} PTQ row{'s' if n_scheme != 1 else ''} of schemes beyond weight-only "
                         f"(activation or KV-cache quantization, rotations, SmoothQuant, 16-bit weights) "
                         f"{'are' if n_scheme != 1 else 'is'} kept out of the fits, comparisons, slopes and plots "
                         f"of weight-only PTQ and reported in their own sections")

    doc = Doc()
    status = Counter(r["status"] for r in res.runs)
    doc.h(1, f"efftrain grid report: {res.name}")
    doc.p(f"Source: {res.db_path} — {len(res.runs)} runs in {len(variants)} variants ("
          + ", ".join(f"{n} {s}" for s, n in sorted(status.items())) + f"), {len(res.checkpoints)} checkpoints, "
          f"{len(res.rows)} PTQ rows. Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.")
    for section in (section_summary, section_grid, section_training, section_noise, section_qid,
                    section_comparison, section_technique_series, section_diagnostics, section_slopes,
                    section_recovery, section_kv_cache, section_schemes, section_fits, section_notes):
        section(ctx, doc)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown())
    html_path.write_text(doc.html(f"efftrain grid report: {res.name}"))
    log(f"report: {html_path} (and {md_path})")
    return html_path
