"""What a grid's report compares: a technique against the baseline, paired by seed.

A *variant* is a replicate group: the runs of one grid cell that differ only in their seeds (a
grid's cooldown branches of one group form the variant "<group> [cooldown]", its averages
"<group> [avg]"). The same seeds train every variant, so the variant's run with seed s and the
baseline's run with seed s form a pair, and a comparison is a t-interval over the seeds' paired
differences (efftrain.analysis.stats.paired_difference):

  * final:          QiD at each run's final checkpoint;
  * relative:       QiD / loss_16 at the final checkpoint;
  * matched loss:   QiD of both runs at the worse of their two final 16-bit losses, each interpolated
                    along its own series (loss_16 -> QiD), so that a technique that merely trains to a
                    lower loss, and so sits later on the QiD-vs-loss curve, is compared like for like.

One seed gives an estimate without an interval, and no claim.

What is compared is weight-only PTQ (is_weight_only): the rows of the schemes of issue 19 that quantize
more than the weights (activations, the KV cache, a rotation or SmoothQuant before the weights, or no
weight quantization at all: method 'none') are left to their own report sections, so a grid that adds
them compares, fits and plots its weight-only rows exactly as before. BiLLM and FP8-block weights alone
are weight-only methods: they join the fits as methods of their own, but are never the default selection.

Per-run slopes (run_slopes, slope_groups): each run's OLS slope of log QiD on log D over its checkpoints
after LR warmup whose QiD is resolved (QiD > 2·qid_se), at least 3 of them; per variant the mean over
seeds with a t-interval over the seeds' slopes, and a verdict that names a direction only when that
interval excludes 0.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from efftrain.analysis.stats import Interval, interpolate_at, paired_difference, t_interval
from efftrain.config import flatten_dotted
from efftrain.grid.spec import GridError

# config fields that are off in a baseline: the first main cell with all of them at these values
TECHNIQUE_FIELDS = {"model.attention": "mha", "model.moe.enabled": False, "model.mtp.depth": 0, "fp8.enabled": False}


def method_label(m: str) -> str:
    return {"gptq": "GPTQ", "rtn": "RTN", "awq": "AWQ", "awq-linear": "AWQ (per-Linear)", "billm": "BiLLM",
            "fp8-block": "FP8-block"}.get(m, m)


# ----------------------------------------------------------------------------------------------
# Which rows: weight-only PTQ, not the schemes of issue 19
# ----------------------------------------------------------------------------------------------
SCHEME_MARKERS = ("act_quant", "kv_quant", "rotation", "smooth_alpha")  # empty in a weight-only row
SCHEME_WEIGHT_METHODS = ("billm", "fp8-block")  # weight-only methods of issue 19, never picked by default


def _empty(v) -> bool:
    """None, '' (a CSV cell) or a nan: the column was not set for this row."""
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def is_weight_only(row: dict) -> bool:
    """True for a weight-only PTQ row: no activation quantizer, no KV-cache quantizer, no rotation, no
    SmoothQuant α (all empty, as in every row written before these columns existed) and weights that are
    quantized (method != 'none'). BiLLM and FP8-block weights without activation quantization are
    weight-only methods in this sense. Recovery rows are weight-only rows too (their format keeps them
    apart)."""
    return str(row.get("method")) != "none" and all(_empty(row.get(c)) for c in SCHEME_MARKERS)


# ----------------------------------------------------------------------------------------------
# What is compared
# ----------------------------------------------------------------------------------------------
@dataclass
class Selection:
    method: str
    bits: int
    group_size: int
    fmt: str

    def matches(self, r: dict) -> bool:
        return (r["method"] == self.method and r["bits"] == self.bits and r["group_size"] == self.group_size
                and r["format"] == self.fmt)

    @property
    def label(self) -> str:
        return f"{self.bits}-bit {method_label(self.method)}"


def choose_selection(rows: list[dict], method: str | None, bits: int | None) -> Selection:
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
    """The replicate group of the first main cell with every technique off (else the first cell's)."""
    for r in runs:
        flat = flatten_dotted(r["config"])
        if r.get("kind", "main") == "main" and all(flat.get(k) == v for k, v in TECHNIQUE_FIELDS.items()):
            return r["replicate"]
    return runs[0]["replicate"]


def series_labels(runs: list[dict]) -> dict[str, str]:
    """Cell key -> the variant its checkpoints belong to: a main cell's replicate group; all cooldown
    branches of a group form one variant "<group> [cooldown]", all its averages "<group> [avg]"."""
    group = {r["key"]: r["replicate"] for r in runs}
    out = {}
    for r in runs:
        tag = {"cooldown": "cooldown", "average": "avg"}.get(r.get("kind") or "main")
        out[r["key"]] = f"{group.get(r['parent'], r['parent'])} [{tag}]" if tag else r["replicate"]
    return out


def _seed_of(run: dict) -> tuple[int, int]:
    return int(run["seed"] or 0), int(run["data_seed"] or 0)


@dataclass
class RunSeries:
    """One run's checkpoints at the selection, in token order (a variant of cooldown branches or
    averages: one point per branch, the branches of one parent run and seed joined)."""

    variant: str
    seed: tuple[int, int]
    tokens: list[float] = field(default_factory=list)
    loss_16: list[float] = field(default_factory=list)
    qid: list[float] = field(default_factory=list)
    epochs: list[float] = field(default_factory=list)

    @property
    def final(self) -> int:
        return int(np.argmax(self.tokens))


def run_series(rows: list[dict], runs: list[dict], sel: Selection) -> dict[tuple[str, tuple[int, int]], RunSeries]:
    """(variant, seed) -> RunSeries of the rows at `sel`."""
    labels = series_labels(runs)
    by_key = {r["key"]: r for r in runs}
    out: dict[tuple[str, tuple[int, int]], RunSeries] = {}
    for r in sorted((r for r in rows if sel.matches(r) and r.get("qid") is not None and r["run_key"] in by_key),
                    key=lambda r: r["tokens"]):
        run = by_key[r["run_key"]]
        key = (labels[run["key"]], _seed_of(run))
        s = out.setdefault(key, RunSeries(variant=key[0], seed=key[1]))
        s.tokens.append(float(r["tokens"]))
        s.loss_16.append(float(r["loss_16"]) if r.get("loss_16") is not None else math.nan)
        s.qid.append(float(r["qid"]))
        s.epochs.append(float(r["epochs"]) if r.get("epochs") is not None else math.nan)
    return out


@dataclass
class Comparison:
    """One variant at the selection: its own final QiD over seeds, and the paired differences to the
    baseline (None for the baseline itself or when no seed is shared)."""

    variant: str
    is_baseline: bool
    seeds: int
    qid: Interval  # final-checkpoint QiD, t-interval over seeds
    rel_qid: Interval  # QiD / loss_16 at the final checkpoint
    tokens: float  # final checkpoint's tokens (mean over seeds)
    epochs: float
    params_active: int | None
    diff: Interval | None = None  # paired by seed, final checkpoints
    rel_diff: Interval | None = None
    matched_diff: Interval | None = None  # paired by seed, at matched 16-bit loss
    matched_loss: float = math.nan  # the 16-bit loss they were matched at (mean over pairs)


def _matched_qid(a: RunSeries, b: RunSeries) -> tuple[float, float, float]:
    """(QiD of a, QiD of b, loss) at the worse of their two final 16-bit losses, each interpolated
    along its own series; nan where a series never reaches that loss."""
    target = max(a.loss_16[a.final], b.loss_16[b.final])
    return interpolate_at(a.loss_16, a.qid, target), interpolate_at(b.loss_16, b.qid, target), target


def compare_techniques(rows: list[dict], runs: list[dict], sel: Selection, baseline: str) -> list[Comparison]:
    """Every variant at `sel` against `baseline`, paired by seed (see the module docstring)."""
    series = run_series(rows, runs, sel)
    variants = list(dict.fromkeys(v for v, _ in series))
    active = {r["replicate"]: r.get("params_active") for r in runs}
    base = {seed: s for (v, seed), s in series.items() if v == baseline}
    out = []
    for v in variants:
        mine = {seed: s for (vv, seed), s in series.items() if vv == v}
        finals = {seed: s.qid[s.final] for seed, s in mine.items()}
        rel = {seed: s.qid[s.final] / s.loss_16[s.final] for seed, s in mine.items()}
        c = Comparison(variant=v, is_baseline=v == baseline, seeds=len(mine), qid=t_interval(list(finals.values())),
                       rel_qid=t_interval(list(rel.values())),
                       tokens=float(np.mean([s.tokens[s.final] for s in mine.values()])),
                       epochs=float(np.mean([s.epochs[s.final] for s in mine.values()])),
                       params_active=active.get(v.split(" [")[0]))
        shared = sorted(set(mine) & set(base))
        if not c.is_baseline and shared:
            c.diff = paired_difference(finals, {s: base[s].qid[base[s].final] for s in shared})
            c.rel_diff = paired_difference(rel, {s: base[s].qid[base[s].final] / base[s].loss_16[base[s].final]
                                                 for s in shared})
            matched = {s: _matched_qid(mine[s], base[s]) for s in shared}
            ok = {s: m for s, m in matched.items() if math.isfinite(m[0]) and math.isfinite(m[1])}
            if ok:
                c.matched_diff = paired_difference({s: m[0] for s, m in ok.items()}, {s: m[1] for s, m in ok.items()})
                c.matched_loss = float(np.mean([m[2] for m in ok.values()]))
        out.append(c)
    return out


# ----------------------------------------------------------------------------------------------
# Per-run slopes of log QiD vs log D
# ----------------------------------------------------------------------------------------------
MIN_SLOPE_POINTS = 3  # a run needs this many usable checkpoints for a slope
RESOLVED_SE = 2.0  # a row's QiD is resolved when QiD > RESOLVED_SE·qid_se

SLOPE_GROWS = "QiD grows with D (slope > 0, interval excludes 0)"
SLOPE_FLAT = "no detectable trend (interval includes 0)"
SLOPE_FALLS = "QiD falls with D (slope < 0, interval excludes 0)"
SLOPE_ONE_SEED = "one seed: no interval, no claim"
SLOPE_NONE = f"no slope: no run has {MIN_SLOPE_POINTS} usable checkpoints"


def _num(x) -> float:
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def in_warmup(r: dict) -> bool:
    """A row inside LR warmup: step <= warmup_steps when the row carries both — the criterion of the
    fits (efftrain.analysis.fits._prepare)."""
    step, warm = _num(r.get("step")), _num(r.get("warmup_steps"))
    return math.isfinite(step) and math.isfinite(warm) and step <= warm


def ols_slope(x, y) -> tuple[float, float]:
    """(slope, its OLS standard error) of the least-squares line y = a + b·x; se = sqrt(SSR/(n − 2)/Sxx),
    nan with fewer than 3 points (and the slope nan with fewer than 2 or no spread in x)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 2:
        return math.nan, math.nan
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if sxx <= 0:
        return math.nan, math.nan
    b = float(dx @ (y - y.mean())) / sxx
    if n < 3:
        return b, math.nan
    resid = y - y.mean() - b * dx
    return b, math.sqrt(float(resid @ resid) / (n - 2) / sxx)


@dataclass
class RunSlope:
    """One run's OLS slope of log QiD against log D (training tokens) at one (method, bits, group, format),
    over its series checkpoints after LR warmup whose QiD is resolved (QiD > 2·qid_se; QiD > 0 where a
    row has no qid_se). A run is (variant, seed), as in run_series: a variant of cooldown branches or
    averages joins the branches of one parent run and seed."""

    variant: str
    seed: tuple[int, int]
    method: str
    bits: int
    group_size: int
    fmt: str
    slope: float = math.nan  # nan when fewer than MIN_SLOPE_POINTS points are left
    se: float = math.nan  # OLS standard error of the slope (within the run: checkpoint scatter about a line)
    n: int = 0  # points in the fit
    d_min: float = math.nan  # range of D over those points (tokens)
    d_max: float = math.nan
    left_out: dict[str, int] = field(default_factory=dict)  # "warmup", "unresolved", "nonfinite" -> rows
    no_se: int = 0  # points kept without a qid_se (QiD > 0 only)

    @property
    def fitted(self) -> bool:
        return self.n >= MIN_SLOPE_POINTS and math.isfinite(self.slope)


def run_slopes(rows: list[dict], runs: list[dict]) -> list[RunSlope]:
    """Every run's slope of log QiD vs log D at every (method, bits, group_size, format) it has rows for
    (see RunSlope); runs with fewer than MIN_SLOPE_POINTS usable points get no slope (nan) and are kept,
    so that they can be counted. In the order of the runs, then method, bits, group, format."""
    labels = series_labels(runs)
    by_key = {r["key"]: r for r in runs}
    order = {k: i for i, k in enumerate(by_key)}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        run = by_key.get(r.get("run_key"))
        if run is None:
            continue
        k = (labels[run["key"]], _seed_of(run), r["method"], int(r["bits"]), int(r["group_size"]), r["format"])
        groups.setdefault(k, []).append(r)
    first = {k: min(order[r["run_key"]] for r in g) for k, g in groups.items()}
    out = []
    for k in sorted(groups, key=lambda k: (first[k], k[2], k[3], k[4], k[5])):
        s = RunSlope(*k)
        left = Counter()
        xs, ys = [], []
        for r in sorted(groups[k], key=lambda r: _num(r.get("tokens"))):
            q, se, d = _num(r.get("qid")), _num(r.get("qid_se")), _num(r.get("tokens"))
            if in_warmup(r):
                left["warmup"] += 1
            elif not (math.isfinite(q) and math.isfinite(d) and d > 0):
                left["nonfinite"] += 1
            elif not (q > RESOLVED_SE * se if math.isfinite(se) and se > 0 else q > 0):
                left["unresolved"] += 1
            else:
                s.no_se += not (math.isfinite(se) and se > 0)
                xs.append(math.log(d))
                ys.append(math.log(q))
        s.left_out, s.n = dict(left), len(xs)
        if xs:
            s.d_min, s.d_max = math.exp(min(xs)), math.exp(max(xs))
        if s.n >= MIN_SLOPE_POINTS:
            s.slope, s.se = ols_slope(xs, ys)
        out.append(s)
    return out


@dataclass
class SlopeGroup:
    """The per-run slopes of one variant at one (method, bits, group, format): their mean over seeds with
    a 95 % t-interval over the seeds' slopes (each run one replicate), and the verdict in words."""

    variant: str
    method: str
    bits: int
    group_size: int
    fmt: str
    runs: list[RunSlope]  # every run of the variant, with or without a slope
    mean: Interval  # t-interval over the fitted runs' slopes

    @property
    def fitted(self) -> list[RunSlope]:
        return [r for r in self.runs if r.fitted]

    @property
    def too_few(self) -> int:
        """Runs left without a slope (fewer than MIN_SLOPE_POINTS usable points)."""
        return len(self.runs) - len(self.fitted)

    @property
    def left_out(self) -> Counter:
        c = Counter()
        for r in self.runs:
            c.update(r.left_out)
        return c

    @property
    def verdict(self) -> str:
        return slope_verdict(self.mean)


def slope_verdict(iv: Interval) -> str:
    """The plain-words verdict of a mean slope over seeds (see the SLOPE_* texts)."""
    if iv.n == 0:
        return SLOPE_NONE
    if not iv.defined:
        return SLOPE_ONE_SEED
    return iv.verdict(higher=SLOPE_GROWS, lower=SLOPE_FALLS, same=SLOPE_FLAT)


def slope_groups(slopes: list[RunSlope], level: float = 0.95) -> list[SlopeGroup]:
    """Per-run slopes grouped by (variant, method, bits, group_size, format), in their first order."""
    groups: dict[tuple, list[RunSlope]] = {}
    for s in slopes:
        groups.setdefault((s.variant, s.method, s.bits, s.group_size, s.fmt), []).append(s)
    variants = list(dict.fromkeys(s.variant for s in slopes))
    out = []
    for k in sorted(groups, key=lambda k: (variants.index(k[0]), k[1], k[2], k[3], k[4])):
        members = sorted(groups[k], key=lambda s: s.seed)
        iv = t_interval([s.slope for s in members if s.fitted], level)
        out.append(SlopeGroup(*k, runs=members, mean=iv))
    return out


# ----------------------------------------------------------------------------------------------
# Technique figures from the checkpoints table: MTP acceptance along the series, the FP8 loss gap
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesPoint:
    """One variant's checkpoint column at one series point: mean over its seeds, t-interval."""

    variant: str
    tokens: int
    interval: Interval


def _main_runs(runs: list[dict]) -> list[dict]:
    return [r for r in runs if (r.get("kind") or "main") == "main"]


def checkpoint_metric_by_variant(runs: list[dict], checkpoints: list[dict], column: str,
                                 labels: dict[str, str]) -> list[SeriesPoint]:
    """Per variant (main runs) and series point (tokens), the mean over the variant's seeds of the
    checkpoints' `column` (e.g. mtp_acceptance) with a t-interval over seeds; points where no run
    recorded the column are left out."""
    by_key = {r["key"]: r for r in _main_runs(runs)}
    values: dict[tuple[str, int], list[float]] = {}
    for c in checkpoints:
        if c["run_key"] in by_key and c.get(column) is not None:
            values.setdefault((labels[c["run_key"]], int(c["tokens"])), []).append(float(c[column]))
    order = list(dict.fromkeys(labels[k] for k in by_key))
    return [SeriesPoint(v, t, t_interval(vals)) for (v, t), vals in
            sorted(values.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1]))]


@dataclass(frozen=True)
class FP8Gap:
    """Relative val-loss gap (loss_fp8 − loss_bf16) / loss_bf16 of an FP8 variant against its BF16
    twin at one series point: mean over the seed pairs with a t-interval."""

    variant: str
    twin: str
    tokens: int
    interval: Interval


def _without_fp8(run: dict) -> dict:
    return {k: v for k, v in flatten_dotted(run["config"]).items() if not k.startswith("fp8.") and k != "name"}


def fp8_gaps(runs: list[dict], checkpoints: list[dict], labels: dict[str, str]) -> list[FP8Gap]:
    """For every main run with fp8.enabled and a BF16 twin (a main run whose config differs only in
    the fp8 section, seeds included): the relative val-loss gap at each step both recorded, paired
    by seed, as a t-interval per (variant, tokens) over the pairs."""
    mains = _main_runs(runs)
    loss = {(c["run_key"], int(c["step"])): (int(c["tokens"]), c["val_loss"]) for c in checkpoints
            if c.get("val_loss") is not None}
    gaps: dict[tuple[str, str, int], list[float]] = {}
    for r in mains:
        if not flatten_dotted(r["config"]).get("fp8.enabled"):
            continue
        mine = _without_fp8(r)
        twin = next((o for o in mains if not flatten_dotted(o["config"]).get("fp8.enabled")
                     and _without_fp8(o) == mine), None)
        if twin is None:
            continue
        for (key, step), (tokens, value) in loss.items():
            other = loss.get((twin["key"], step))
            if key == r["key"] and other is not None:
                gaps.setdefault((labels[r["key"]], labels[twin["key"]], tokens), []).append(
                    (value - other[1]) / other[1])
    return [FP8Gap(v, t, tok, t_interval(vals)) for (v, t, tok), vals in sorted(gaps.items())]
