"""The recovery fine-tuning section of the grid report (issue #20; efftrain.quant.recovery,
docs/RECOVERY.md): the recovered fraction of each recovery row, grouped per (setting, PTQ method, bits,
group size, base format), against the checkpoint's tokens per parameter D/N, with per-run slopes of the
recovered fraction against log10(D/N) and their interval over runs.

Rows are used past LR warmup and with a resolved QiD before recovery (qid_before > 2·qid_before_se); the
rest are counted as left out. efftrain.analysis.report registers section_recovery in build_report.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from efftrain.analysis import plots
from efftrain.analysis.compare import RESOLVED_SE, _num, _seed_of, in_warmup, method_label, ols_slope
from efftrain.analysis.report_parts import Context, Doc, _interval
from efftrain.analysis.stats import Interval, se_interval, t_interval
from efftrain.formatting import format_value

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
