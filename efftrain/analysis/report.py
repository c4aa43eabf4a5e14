"""The report of a grid: DIR/report.html (self-contained, PNGs inlined as data URIs) and DIR/report.md
(PNGs beside it), built from the grid's results store and its runs' metrics.jsonl.

Each section is one function, called by build_report in the order the report shows them: summary
(plain-language verdicts generated from the numbers, each with its interval), the grid (cells, seeds,
tokens, epochs, tokens per parameter, the config fields that differ), training curves, the measurement's
noise floor, QiD vs tokens per method with the fitted law, QiD vs N, the k-bit plot, the technique
comparison, MoE balance and FP8-vs-BF16 gap plots when runs have those metrics, the per-run slopes of log
QiD vs log D, the learning-rate schedule at equal tokens (cooldown branches and checkpoint averages
against their stable run and the runs trained to their budget, when the grid has such cells), recovery
fine-tuning (recovered fraction against D/N per bit width, when the grid has
recovery rows), the KV cache (QiD against KV-cache bytes per token, MHA against MLA, when the grid has
KV-cache rows), the other PTQ schemes (activation quantization, FP8, SmoothQuant, BiLLM, FP8 block
weights, rotations, with the effect of a rotation on the per-run slopes, when the grid has such rows),
and the fitted laws.

Modules: this one builds the report and holds the weight-only sections; report_schedule holds the
learning-rate schedule section, report_recovery the recovery fine-tuning section, report_schemes the KV-cache and other PTQ-scheme sections; report_parts
holds what they all share (the document model Doc, the loaded GridResults, the interval formatting,
Context). The section modules import report_parts, never this module.

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

import datetime as _dt
import json
import math
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from efftrain.analysis import plots
from efftrain.analysis.compare import (MIN_SLOPE_POINTS, RESOLVED_SE, SCHEME_WEIGHT_METHODS, SLOPE_FALLS,
                                       SLOPE_FLAT, SLOPE_GROWS, SLOPE_NONE, SLOPE_ONE_SEED, Comparison, FP8Gap,
                                       Selection, SlopeGroup, checkpoint_metric_by_variant, choose_selection,
                                       compare_techniques, default_baseline, fp8_gaps, is_weight_only,
                                       method_label, run_slopes, series_labels, slope_groups)
from efftrain.analysis.fits import LAWS, PUBLISHED, PUBLISHED_NOTES, FitResult, fit_law, format_param
from efftrain.analysis.report_parts import (Context, Doc, _interval, _sfmt, _slope_left_out, differing_fields,
                                            load_grid_results)
from efftrain.analysis.report_recovery import section_recovery
from efftrain.analysis.report_schedule import schedule_sentences, section_schedule
from efftrain.analysis.report_schemes import section_kv_cache, section_schemes
from efftrain.analysis.stats import Interval
from efftrain.config import flatten_dotted
from efftrain.formatting import format_count, format_value
from efftrain.grid.spec import GridError
from efftrain.train.rundir import read_metrics

Log = Callable[[str], None]


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
# Sections: one function each, in the order the report shows them (recovery fine-tuning in
# report_recovery, the KV cache and the other PTQ schemes in report_schemes)
# ----------------------------------------------------------------------------------------------
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
        summary += schedule_sentences(ctx)
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
                    section_schedule, section_recovery, section_kv_cache, section_schemes, section_fits, section_notes):
        section(ctx, doc)
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(doc.markdown())
    html_path.write_text(doc.html(f"efftrain grid report: {res.name}"))
    log(f"report: {html_path} (and {md_path})")
    return html_path
