"""The sections of the grid report on PTQ schemes beyond weight-only (issue 19; efftrain.quant.kvcache,
activations, rotation, smoothquant, billm): KV-cache quantization (QiD against KV-cache bytes per token,
MLA against its MHA twin) and the other schemes (activation quantization, SmoothQuant, FP8, FP8 block
weights, BiLLM, rotations, with the effect of a rotation on the per-run slopes of log QiD vs log D).

Each run counts at its final checkpoint: a mean over seeds with a t-interval, and a difference between two
variants or two settings paired by seed. These sections read every PTQ row with a QiD (Context.all_rows);
the weight-only sections of efftrain.analysis.report, which registers these in build_report, read the
weight-only rows alone.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from efftrain.analysis import plots
from efftrain.analysis.compare import (MIN_SLOPE_POINTS, RESOLVED_SE, SlopeGroup, _empty, _num, _seed_of,
                                       is_weight_only, method_label, run_slopes, slope_groups)
from efftrain.analysis.report_parts import Context, Doc, _interval, _sfmt, _slope_left_out, differing_fields
from efftrain.analysis.stats import Interval, paired_difference, t_interval
from efftrain.config import flatten_dotted
from efftrain.formatting import format_count, format_value


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
