"""Plots for checkpoint-series / QiD analysis (matplotlib, Agg backend).

Every function takes rows (a list of dicts, or a dict of equal-length columns)
and an output path, writes a PNG and returns the path as a ``pathlib.Path``.
Figures are rendered with the Agg canvas directly (``matplotlib.figure.Figure``
+ ``FigureCanvasAgg``), never through pyplot, so the global backend and pyplot's
figure registry are left untouched and nothing leaks between calls. Empty input (or input with no plottable rows) raises
ValueError; missing keys raise ValueError naming them.

Functions and the keys they read:

* plot_loss_vs_tokens(evals, path)            run, tokens, val_loss
* plot_qid_vs_tokens(rows, path, fit=None)     n_params, tokens, bits, qid [, method]
* plot_qid_vs_params(rows, path)               n_params, tokens, bits, qid [, method]
* plot_kbit(rows, path)                        loss_q, params_total, eff_bits, bits [, method]
  (Dettmers & Zettlemoyer 2022, arXiv 2212.09720: loss vs total model bits)
* plot_technique_qid(summary, path)            technique [, variant], qid [, ci_lo, ci_hi] [, bits]
* plot_moe_balance(metrics, path)              step, layer, max_vio   (or step, max_vio=[per layer])
* plot_fp8_gap(bf16_metrics, fp8_metrics, path) step, loss  (relative gap (fp8-bf16)/bf16)
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from efftrain.formatting import format_count

__all__ = [
    "plot_loss_vs_tokens",
    "plot_qid_vs_tokens",
    "plot_qid_vs_params",
    "plot_kbit",
    "plot_technique_qid",
    "plot_moe_balance",
    "plot_fp8_gap",
]

_STYLE = {
    "figure.figsize": (7.0, 4.6),
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "legend.fontsize": 8,
    "legend.framealpha": 0.85,
    "lines.linewidth": 1.6,
    "lines.markersize": 4.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1))]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


# --------------------------------------------------------------------------- helpers
@contextmanager
def _figure(path, title: str | None = None, **subplot_kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=subplot_kw.pop("figsize", None))
        FigureCanvasAgg(fig)
        ax = fig.subplots(**subplot_kw)
        yield fig, ax
        if title:
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, format="png", bbox_inches="tight")  # "tight": legends placed outside the axes


def _legend(ax, handles=None, labels=None, **kw):
    """ax.legend, moved outside the axes (to the right) when it would cover the data: many entries or
    long labels (a grid's variant names)."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 8 or max((len(str(l)) for l in labels), default=0) > 24:
        kw.update(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        w, h = ax.figure.get_size_inches()
        ax.figure.set_size_inches(w * 1.7, h)  # room for the legend beside the axes
    else:
        kw.setdefault("loc", "best")
    return ax.legend(handles, labels, **kw)


def _rows(rows, name: str, required: Sequence[str]) -> list[Mapping[str, Any]]:
    if rows is None:
        raise ValueError(f"{name}: no data (got None)")
    if isinstance(rows, Mapping):
        keys = list(rows)
        n = len(rows[keys[0]]) if keys else 0
        rows = [{k: rows[k][i] for k in keys} for i in range(n)]
    else:
        rows = list(rows)
    if not rows:
        raise ValueError(f"{name}: empty input, nothing to plot")
    missing = sorted({k for r in rows for k in required if k not in r})
    if missing:
        raise ValueError(f"{name}: rows are missing required keys {missing} (need {list(required)})")
    return rows


def _f(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _colors(n: int):
    cmap = matplotlib.colormaps["viridis" if n > 10 else "tab10"]
    if n > 10:
        return [cmap(i / max(n - 1, 1)) for i in range(n)]
    return [cmap(i) for i in range(n)]


def _sorted_unique(vals: Iterable) -> list:
    vals = set(vals)
    try:
        return sorted(vals)
    except TypeError:
        return sorted(vals, key=str)


def _fmt_bits(b) -> str:
    fb = _f(b)
    if math.isfinite(fb) and fb == int(fb):
        return f"{int(fb)}-bit"
    return f"{b}-bit" if math.isfinite(fb) else str(b)


# --------------------------------------------------------------------------- 1. loss vs tokens
def plot_loss_vs_tokens(evals, path, *, title: str | None = "Validation loss vs training tokens") -> Path:
    """One line per ``run``: val_loss against tokens (log x)."""
    rows = _rows(evals, "plot_loss_vs_tokens", ("run", "tokens", "val_loss"))
    runs = _sorted_unique(r["run"] for r in rows)
    colors = _colors(len(runs))
    n_plotted = 0
    with _figure(path, title) as (fig, ax):
        for c, run in zip(colors, runs):
            pts = sorted((_f(r["tokens"]), _f(r["val_loss"])) for r in rows if r["run"] == run)
            pts = [(t, v) for t, v in pts if t > 0 and math.isfinite(v)]
            if not pts:
                continue
            t, v = zip(*pts)
            ax.plot(t, v, marker="o", color=c, label=str(run))
            n_plotted += len(pts)
        if n_plotted == 0:
            raise ValueError("plot_loss_vs_tokens: no rows with tokens > 0 and finite val_loss")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens D (tokens, log scale)")
        ax.set_ylabel("validation loss (nats/token)")
        _legend(ax, title="run")
    return Path(path)


# --------------------------------------------------------------------------- 2. QiD vs tokens
def _method_of(r) -> str:
    m = r.get("method")
    return "" if m is None else str(m)


def plot_qid_vs_tokens(rows, path, fit=None, *, title: str | None = None) -> Path:
    """QiD against training tokens, log-log.

    Colour = bit width, linestyle = quantization method (``method`` key, optional),
    marker = model size (n_params). ``fit`` is a FitResult (or a dict
    {method: FitResult}); its law is drawn as a thick translucent line in the bit
    width's colour for every (bits, n_params) present, over the data's token range.
    Rows with qid <= 0 cannot be shown on a log axis; their count is noted.
    """
    rows = _rows(rows, "plot_qid_vs_tokens", ("n_params", "tokens", "bits", "qid"))
    good = [r for r in rows if _f(r["qid"]) > 0 and _f(r["tokens"]) > 0]
    n_hidden = len(rows) - len(good)
    if not good:
        raise ValueError("plot_qid_vs_tokens: no rows with qid > 0 (log axis)")
    bits = _sorted_unique(_f(r["bits"]) for r in good)
    methods = _sorted_unique(_method_of(r) for r in good)
    sizes = _sorted_unique(_f(r["n_params"]) for r in good)
    cmap = dict(zip(bits, _colors(len(bits))))
    lmap = {m: _LINESTYLES[i % len(_LINESTYLES)] for i, m in enumerate(methods)}
    mmap = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(sizes)}
    fits = _fit_lookup(fit)
    if title is None:
        title = "Quantization-induced degradation vs training tokens"
    with _figure(path, title) as (fig, ax):
        for b in bits:
            for m in methods:
                for s in sizes:
                    pts = sorted((_f(r["tokens"]), _f(r["qid"])) for r in good
                                 if _f(r["bits"]) == b and _method_of(r) == m and _f(r["n_params"]) == s)
                    if not pts:
                        continue
                    t, q = zip(*pts)
                    ax.plot(t, q, color=cmap[b], linestyle=lmap[m], marker=mmap[s], linewidth=1.0)
        if fits:
            tmin = min(_f(r["tokens"]) for r in good)
            tmax = max(_f(r["tokens"]) for r in good)
            tt = np.logspace(math.log10(tmin), math.log10(tmax), 100)
            for m in methods:
                fr = fits.get(m, fits.get(None))
                if fr is None:
                    continue
                combos = {(_f(r["bits"]), _f(r["n_params"])) for r in good if _method_of(r) == m}
                for b, s in sorted(combos):
                    ax.plot(tt, fr.predict(s, tt, b), color=cmap[b], linewidth=3.2, alpha=0.35,
                            linestyle="-", zorder=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training tokens D (tokens, log scale)")
        ax.set_ylabel("QiD = loss$_q$ − loss$_{16}$ (nats/token, log scale)")
        handles, labels = [], []
        for b in bits:
            handles.append(Line2D([], [], color=cmap[b], linewidth=2))
            labels.append(_fmt_bits(b))
        if len(methods) > 1 or methods[0]:
            for m in methods:
                handles.append(Line2D([], [], color="0.3", linestyle=lmap[m]))
                labels.append(m or "(no method)")
        if len(sizes) > 1:
            for s in sizes:
                handles.append(Line2D([], [], color="0.3", marker=mmap[s], linestyle="none"))
                labels.append(f"N={format_count(s)}")
        if fits:
            laws = sorted({fr.law for fr in fits.values()})
            handles.append(Line2D([], [], color="0.5", linewidth=3.2, alpha=0.35))
            labels.append("fit: " + ", ".join(laws))
        if n_hidden:
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(f"{n_hidden} rows with QiD≤0 not shown")
        _legend(ax, handles, labels)
    return Path(path)


def _fit_lookup(fit) -> dict:
    if fit is None:
        return {}
    if isinstance(fit, Mapping):
        out = {}
        for k, v in fit.items():
            if k == "all":
                out[None] = v
            else:
                out[str(k[0]) if isinstance(k, tuple) and len(k) == 1 else str(k)] = v
        return out
    return {None: fit}


# --------------------------------------------------------------------------- 3. QiD vs params
def plot_qid_vs_params(rows, path, *, at_tokens: str | float | None = "final", title: str | None = None) -> Path:
    """QiD against non-embedding parameters N, log-log.

    Colour = bit width, linestyle = method. ``at_tokens``: "final" (default) uses,
    for each (bits, method, N), the row with the most training tokens; a number
    uses the row whose token count is closest to it (log distance); None plots
    every row, one line per token count (marker size grows with tokens).
    """
    rows = _rows(rows, "plot_qid_vs_params", ("n_params", "tokens", "bits", "qid"))
    good = [r for r in rows if _f(r["qid"]) > 0 and _f(r["n_params"]) > 0 and _f(r["tokens"]) > 0]
    n_hidden = len(rows) - len(good)
    if not good:
        raise ValueError("plot_qid_vs_params: no rows with qid > 0 (log axis)")
    bits = _sorted_unique(_f(r["bits"]) for r in good)
    methods = _sorted_unique(_method_of(r) for r in good)
    cmap = dict(zip(bits, _colors(len(bits))))
    lmap = {m: _LINESTYLES[i % len(_LINESTYLES)] for i, m in enumerate(methods)}

    def select(sub):
        by_n: dict[float, list] = {}
        for r in sub:
            by_n.setdefault(_f(r["n_params"]), []).append(r)
        out = []
        for n, rs in by_n.items():
            if at_tokens == "final":
                out.append(max(rs, key=lambda r: _f(r["tokens"])))
            else:
                tgt = math.log(float(at_tokens))
                out.append(min(rs, key=lambda r: abs(math.log(_f(r["tokens"])) - tgt)))
        return sorted(out, key=lambda r: _f(r["n_params"]))

    if title is None:
        title = "QiD vs model size" + (
            " (final checkpoint)" if at_tokens == "final" else
            "" if at_tokens is None else f" (D ≈ {format_count(float(at_tokens))} tokens)")
    with _figure(path, title) as (fig, ax):
        toks = _sorted_unique(_f(r["tokens"]) for r in good)
        for b in bits:
            for m in methods:
                sub = [r for r in good if _f(r["bits"]) == b and _method_of(r) == m]
                if not sub:
                    continue
                if at_tokens is None:
                    for i, t in enumerate(toks):
                        pts = sorted((_f(r["n_params"]), _f(r["qid"])) for r in sub if _f(r["tokens"]) == t)
                        if pts:
                            x, y = zip(*pts)
                            ax.plot(x, y, color=cmap[b], linestyle=lmap[m], marker="o", linewidth=0.8,
                                    markersize=2.5 + 5.0 * i / max(len(toks) - 1, 1), alpha=0.8)
                else:
                    sel = select(sub)
                    ax.plot([_f(r["n_params"]) for r in sel], [_f(r["qid"]) for r in sel],
                            color=cmap[b], linestyle=lmap[m], marker="o")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("non-embedding parameters N (log scale)")
        ax.set_ylabel("QiD = loss$_q$ − loss$_{16}$ (nats/token, log scale)")
        handles = [Line2D([], [], color=cmap[b], linewidth=2) for b in bits]
        labels = [_fmt_bits(b) for b in bits]
        if len(methods) > 1 or methods[0]:
            handles += [Line2D([], [], color="0.3", linestyle=lmap[m]) for m in methods]
            labels += [m or "(no method)" for m in methods]
        if at_tokens is None and len(toks) > 1:
            handles.append(Line2D([], [], linestyle="none"))
            labels.append("marker size ∝ tokens")
        if n_hidden:
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(f"{n_hidden} rows with QiD≤0 not shown")
        _legend(ax, handles, labels)
    return Path(path)


# --------------------------------------------------------------------------- 4. k-bit plot
def plot_kbit(rows, path, *, title: str | None = "k-bit scaling: loss vs total model bits") -> Path:
    """Loss of the quantized model against total model bits = params_total × eff_bits,
    one line per precision ``bits`` (Dettmers & Zettlemoyer 2022, arXiv 2212.09720).
    eff_bits includes scale/zero-point overhead (e.g. 4.125 for g=128 with fp16 scales).
    Optional ``method`` key -> linestyle."""
    rows = _rows(rows, "plot_kbit", ("loss_q", "params_total", "eff_bits", "bits"))
    good = [r for r in rows if _f(r["params_total"]) > 0 and _f(r["eff_bits"]) > 0 and math.isfinite(_f(r["loss_q"]))]
    if not good:
        raise ValueError("plot_kbit: no rows with params_total > 0, eff_bits > 0 and finite loss_q")
    bits = _sorted_unique(_f(r["bits"]) for r in good)
    methods = _sorted_unique(_method_of(r) for r in good)
    cmap = dict(zip(bits, _colors(len(bits))))
    lmap = {m: _LINESTYLES[i % len(_LINESTYLES)] for i, m in enumerate(methods)}
    with _figure(path, title) as (fig, ax):
        for b in bits:
            for m in methods:
                pts = sorted((_f(r["params_total"]) * _f(r["eff_bits"]), _f(r["loss_q"])) for r in good
                             if _f(r["bits"]) == b and _method_of(r) == m)
                if not pts:
                    continue
                x, y = zip(*pts)
                lab = _fmt_bits(b) + (f" {m}" if m and len(methods) > 1 else "")
                ax.plot(x, y, color=cmap[b], linestyle=lmap[m], marker="o", label=lab)
        ax.set_xscale("log")
        ax.set_xlabel("total model bits = parameters × effective bits/param (bits, log scale)")
        ax.set_ylabel("loss of quantized model (nats/token)")
        _legend(ax, title="precision")
    return Path(path)


# --------------------------------------------------------------------------- 5. technique bars
def _ci_bounds(r) -> tuple[float, float] | None:
    for lo_k, hi_k in (("ci_lo", "ci_hi"), ("qid_lo", "qid_hi"), ("lo", "hi")):
        if lo_k in r and hi_k in r:
            return _f(r[lo_k]), _f(r[hi_k])
    if "ci" in r and r["ci"] is not None:
        c = r["ci"]
        if isinstance(c, (list, tuple)) and len(c) == 2:
            return _f(c[0]), _f(c[1])
        hw = _f(c)  # symmetric half-width
        return _f(r["qid"]) - hw, _f(r["qid"]) + hw
    return None


def plot_technique_qid(summary, path, *, title: str | None = "QiD by training technique",
                       ylabel: str = "QiD = loss$_q$ − loss$_{16}$ (nats/token)",
                       ci_label: str = "95% CI") -> Path:
    """Bar chart of QiD per technique/variant with confidence-interval error bars.

    summary rows: ``technique`` (or ``label``), optional ``variant``, ``qid``
    (point estimate), optional CI as ``ci_lo``/``ci_hi`` (absolute bounds) or
    ``ci`` = half-width or (lo, hi); optional ``bits`` -> grouped bars, one
    colour per bit width.
    """
    rows = _rows(summary, "plot_technique_qid", ("qid",))
    if any("technique" not in r and "label" not in r for r in rows):
        raise ValueError("plot_technique_qid: each row needs a 'technique' (or 'label') key")

    def label(r):
        base = str(r.get("technique", r.get("label")))
        v = r.get("variant")
        return base if v in (None, "") else f"{base}\n{v}"

    labels = list(dict.fromkeys(label(r) for r in rows))  # keep input order
    has_bits = any("bits" in r for r in rows)
    bit_vals = _sorted_unique(_f(r.get("bits")) for r in rows) if has_bits else [None]
    colors = _colors(len(bit_vals))
    width = 0.8 / len(bit_vals)
    x0 = np.arange(len(labels))
    fig_w = max(6.0, 0.9 * len(labels) * max(1, len(bit_vals) / 2) + 2)
    with _figure(path, title, figsize=(min(fig_w, 18), 4.8)) as (fig, ax):
        any_ci = False
        for j, (b, c) in enumerate(zip(bit_vals, colors)):
            xs, ys, ex, lo_err, hi_err = [], [], [], [], []
            for i, lab in enumerate(labels):
                match = [r for r in rows if label(r) == lab and (b is None or _f(r.get("bits")) == b
                                                                   or (math.isnan(b) and math.isnan(_f(r.get("bits")))))]
                if not match:
                    continue
                r = match[0]
                q = _f(r["qid"])
                xs.append(x0[i] + (j - (len(bit_vals) - 1) / 2) * width)
                ys.append(q)
                ci = _ci_bounds(r)
                if ci is not None and all(map(math.isfinite, ci)):
                    ex.append(xs[-1])
                    lo_err.append(max(q - ci[0], 0.0))
                    hi_err.append(max(ci[1] - q, 0.0))
            if not xs:
                continue
            ax.bar(xs, ys, width=width * 0.95, color=c, edgecolor="0.2", linewidth=0.5,
                   label=_fmt_bits(b) if b is not None else None)
            if ex:
                any_ci = True
                ey = [ys[xs.index(x)] for x in ex]
                ax.errorbar(ex, ey, yerr=np.array([lo_err, hi_err]), fmt="none", ecolor="0.15",
                            elinewidth=1.0, capsize=3)
        ax.set_xticks(x0)
        ax.set_xticklabels(labels, rotation=30 if len(labels) > 5 else 0, ha="right" if len(labels) > 5 else "center")
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        ax.set_xlabel("technique / variant")
        ax.set_ylabel(ylabel)
        ax.grid(axis="x", visible=False)
        handles, labs = ax.get_legend_handles_labels()
        if any_ci:
            handles.append(Line2D([], [], color="0.15", marker="|", markersize=10, linestyle="-"))
            labs.append(ci_label)
        if handles:
            _legend(ax, handles, labs, title="precision" if has_bits else None)
    return Path(path)


# --------------------------------------------------------------------------- 6. MoE balance
def plot_moe_balance(metrics, path, *, title: str | None = "MoE load balance: MaxVio per layer") -> Path:
    """MaxVio (max expert load / mean load − 1) against training step, one line per MoE layer.

    Rows are either (step, layer, max_vio) or (step, max_vio) where max_vio is a
    sequence with one value per layer. Optional ``max_vio_global`` -> a black line.
    """
    rows = _rows(metrics, "plot_moe_balance", ("step", "max_vio"))
    series: dict[Any, list[tuple[float, float]]] = {}
    glob: list[tuple[float, float]] = []
    for r in rows:
        mv = r["max_vio"]
        if isinstance(mv, (list, tuple, np.ndarray)):
            for li, v in enumerate(mv):
                series.setdefault(li, []).append((_f(r["step"]), _f(v)))
        else:
            if "layer" not in r:
                raise ValueError("plot_moe_balance: scalar max_vio rows need a 'layer' key")
            series.setdefault(r["layer"], []).append((_f(r["step"]), _f(mv)))
        if "max_vio_global" in r:
            glob.append((_f(r["step"]), _f(r["max_vio_global"])))
    series = {k: [p for p in v if all(map(math.isfinite, p))] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        raise ValueError("plot_moe_balance: no finite (step, max_vio) points")
    layers = _sorted_unique(series)
    colors = _colors(len(layers))
    with _figure(path, title) as (fig, ax):
        for c, l in zip(colors, layers):
            s, v = zip(*sorted(series[l]))
            ax.plot(s, v, color=c, label=f"layer {l}", linewidth=1.2)
        if glob:
            s, v = zip(*sorted(p for p in glob if all(map(math.isfinite, p))))
            ax.plot(s, v, color="black", linewidth=2.0, label="global")
        ax.set_xlabel("training step")
        ax.set_ylabel("MaxVio = max load / mean load − 1 (ratio)")
        ax.set_ylim(bottom=0)
        _legend(ax, title="MoE layer")
    return Path(path)


# --------------------------------------------------------------------------- 7. FP8 vs BF16
def _loss_key(rows, loss_key):
    if loss_key is not None:
        return loss_key
    for k in ("loss", "train_loss", "val_loss"):
        if all(k in r for r in rows):
            return k
    raise ValueError("plot_fp8_gap: rows need a 'loss' (or 'train_loss'/'val_loss') key; pass loss_key=")


def plot_fp8_gap(bf16_metrics, fp8_metrics, path, *, loss_key: str | None = None, smooth: int = 1,
                 reference: float | None = 0.25,
                 title: str | None = "FP8 vs BF16: relative loss gap") -> Path:
    """Relative loss gap 100·(loss_fp8 − loss_bf16)/loss_bf16 (%) against step, on the
    steps present in both runs. ``smooth`` > 1 adds a centred moving average of that
    window; ``reference`` draws ±reference % lines (DeepSeek-V3 reports < 0.25 %)."""
    a = _rows(bf16_metrics, "plot_fp8_gap (bf16)", ("step",))
    b = _rows(fp8_metrics, "plot_fp8_gap (fp8)", ("step",))
    ka, kb = _loss_key(a, loss_key), _loss_key(b, loss_key)
    da = {_f(r["step"]): _f(r[ka]) for r in a}
    db = {_f(r["step"]): _f(r[kb]) for r in b}
    steps = sorted(s for s in set(da) & set(db)
                   if math.isfinite(s) and math.isfinite(da[s]) and math.isfinite(db[s]) and da[s] != 0)
    if not steps:
        raise ValueError("plot_fp8_gap: no common steps with finite losses in the two runs")
    st = np.array(steps)
    gap = np.array([100.0 * (db[s] - da[s]) / da[s] for s in steps])
    with _figure(path, title) as (fig, ax):
        ax.plot(st, gap, color="tab:blue", linewidth=0.9, alpha=0.5 if smooth > 1 else 1.0,
                marker="o" if len(st) < 40 else None, label="(FP8 − BF16) / BF16")
        if smooth > 1 and len(gap) >= smooth:
            k = np.ones(smooth) / smooth
            sm = np.convolve(gap, k, mode="valid")
            off = (smooth - 1) // 2
            ax.plot(st[off:off + len(sm)], sm, color="tab:blue", linewidth=2.0, label=f"moving avg ({smooth})")
        ax.axhline(0.0, color="0.3", linewidth=0.8)
        if reference:
            ax.axhline(reference, color="tab:red", linestyle="--", linewidth=1.0,
                       label=f"±{reference:g} % (DeepSeek-V3)")
            ax.axhline(-reference, color="tab:red", linestyle="--", linewidth=1.0)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"relative {ka.replace('_', ' ')} gap (%)")
        _legend(ax)
    return Path(path)
