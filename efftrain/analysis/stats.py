"""Statistics of the QiD analysis: intervals, paired comparisons, cluster resampling, variance components.

QiD = loss(quantized) − loss(16-bit) of one checkpoint, in nats/token, measured on the same validation
windows. Three sources of noise sit in a table of QiD rows, and each method below exists because of one:

1. **Window noise** (within one checkpoint). QiD is a mean over val windows of the per-window
   difference loss_q − loss_16. The two losses are computed on the same windows, so the standard error
   of QiD is that of a *paired* mean (:func:`paired_se`): the window-to-window spread of the
   differences over √windows, far smaller than the spread of either loss. This is ``qid_se``.
2. **Seed noise** (between training runs). Two runs of one config that differ only in their seed give
   different checkpoints and different QiD; PolyPythias (van der Wal et al. 2025, arXiv 2503.09543)
   shows this seed-to-seed spread is large next to many effects of interest. Rows of one run share
   their seed, so they are *not* independent: the independent units are runs. Every interval here
   is therefore over runs (seeds), never over rows: :func:`t_interval` and
   :func:`paired_difference` take one value per seed; :func:`cluster_bootstrap_weights` and
   :func:`cluster_robust_cov` resample / sum over whole runs.
3. **Model misfit**: a relative scatter about a fitted law (Ouyang et al. 2024, arXiv 2411.17691;
   Kumar et al. 2024, arXiv 2411.04330) that grows with QiD itself. :func:`variance_components`
   estimates it as τ² in Var(QiD_i) = se_i² + τ²·f_i².

Methods, and why
----------------
* :func:`t_interval` — mean ± t(n−1)·s/√n over n independent replicates (seeds). With 3–5 seeds the
  t quantile matters: t(2) = 4.30, t(4) = 2.78 against z = 1.96 for a 95 % interval.
* :func:`paired_difference` — technique A vs technique B, paired by seed: the per-seed differences
  a_s − b_s (or relative ones, a_s/b_s − 1) cancel the seed effect both share, and a t-interval over
  them tests "no difference" at the stated level. Only seeds present in both are used, and they are
  reported (``Interval.paired``). ``Interval.verdict()`` says "no detectable difference" whenever the
  interval includes 0: a reviewer accepts "higher" only when the interval excludes 0.
* :func:`cluster_bootstrap_weights` — the Rao & Wu (1988, JASA 83:231) rescaling bootstrap over
  clusters (runs), optionally stratified by design cell (e.g. the model size: seeds are replicates
  within a cell). Within a stratum of n_h runs it draws n_h − 1 runs with replacement and weights each
  drawn run by n_h/(n_h − 1). The plain bootstrap (draw n_h of n_h) has variance (n_h − 1)/n_h of
  the truth — two thirds with 3 seeds per size — which is why a percentile bootstrap over a
  handful of runs under-covers; with the rescaling, the bootstrap variance of a stratified mean is (in
  expectation over the resampling) exactly the unbiased stratified variance estimator. It has at most
  G − H degrees of freedom (runs minus strata); :func:`satterthwaite_df` gives the effective number.
* :func:`cluster_robust_cov` — the cluster-robust ("sandwich") covariance of an M-estimator with the
  same small-sample factor n_h/(n_h − 1) per stratum (Liang & Zeger 1986): the linearised
  counterpart of the Rao–Wu bootstrap, computed as a cross-check.
* :func:`satterthwaite_df` — the degrees of freedom of such a between-cluster variance estimate for
  one parameter (Satterthwaite 1946; Bell & McCaffrey 2002; Imbens & Kolesár 2016, REStat 98:701).
  G − H is right only when every cluster carries equal weight; an exponent estimated from a contrast
  between design cells (α from 4 model sizes) leans on the extreme cells and has fewer effective
  degrees of freedom (≈ 5 instead of 8 for 4 sizes × 3 seeds). Computed from working variances of
  each cluster's contribution, not from the noisy observed ones.
* :func:`se_interval` — estimate ± t(df)·se. Used with the bootstrap standard error and the
  Satterthwaite df: a percentile interval would use normal quantiles, too narrow for df ≈ 5–8.
* :func:`percentile_interval` — plain percentiles of replicates (nan-aware), for reference.
* :func:`variance_components` — moment estimates of the variance function by regressing squared
  residuals on (1, f²) with weights 1/Var² (the pseudo-likelihood / squared-residual method of
  Davidian & Carroll 1987, JASA 82:1079), non-negative, with an n/(n − p) correction for fitted
  parameters.
* :func:`interpolate_at` — y at x0 by linear interpolation along a series (used for "QiD at matched
  16-bit loss": x = loss_16 along a run's checkpoints, y = QiD), nan outside the observed range:
  no extrapolation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as _sps
from scipy.optimize import nnls

__all__ = [
    "Interval",
    "t_quantile",
    "t_interval",
    "se_interval",
    "paired_difference",
    "paired_se",
    "percentile_interval",
    "cluster_sums",
    "cluster_bootstrap_weights",
    "cluster_robust_cov",
    "satterthwaite_df",
    "variance_components",
    "interpolate_at",
]


# --------------------------------------------------------------------------- intervals
@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval.

    estimate, lo, hi and se are in the units of the quantity (nats/token for QiD, a fraction for a
    relative difference); ``n`` is the number of independent replicates (seeds, runs) behind it;
    ``level`` the coverage (0.95 = 95 %); ``method`` says how the interval was made; ``paired`` lists
    the replicate keys (seeds) used when the interval is over paired differences.
    Bounds are nan when there are too few replicates (n < 2) for an interval.
    """

    estimate: float
    lo: float
    hi: float
    se: float
    n: int
    level: float = 0.95
    method: str = ""
    paired: tuple = ()

    @property
    def defined(self) -> bool:
        """True when both bounds are finite numbers."""
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def includes_zero(self) -> bool:
        """True when 0 lies in [lo, hi], and also when the interval is undefined (nan bounds): without
        an interval a difference from 0 is not established."""
        return not self.defined or self.lo <= 0.0 <= self.hi

    def verdict(self, higher: str = "higher", lower: str = "lower",
                same: str = "no detectable difference") -> str:
        """``same`` when the interval includes 0, ``higher`` when it lies above 0, ``lower`` below;
        "too few replicates for an interval" when it is undefined."""
        if not self.defined:
            return "too few replicates for an interval"
        if self.includes_zero:
            return same
        return higher if self.lo > 0 else lower

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (non-finite numbers become None)."""

        def f(x):
            return float(x) if x is not None and math.isfinite(x) else None

        return {"estimate": f(self.estimate), "lo": f(self.lo), "hi": f(self.hi), "se": f(self.se),
                "n": int(self.n), "level": self.level, "method": self.method,
                "paired": [_plain(k) for k in self.paired]}


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def t_quantile(level: float, df: float) -> float:
    """Two-sided t quantile: t such that P(|T_df| <= t) = level (e.g. 2.306 for level 0.95, df 8)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if not df >= 1:
        return math.nan
    return float(_sps.t.ppf(0.5 + level / 2, df))


def se_interval(estimate, se, df: float, level: float = 0.95):
    """(lo, hi) = estimate ∓ t_quantile(level, df)·se (broadcasts over arrays)."""
    t = t_quantile(level, df)
    est = np.asarray(estimate, float)
    half = t * np.asarray(se, float)
    lo, hi = est - half, est + half
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def _finite(values: Iterable) -> np.ndarray:
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
    return arr[np.isfinite(arr)]


def paired_se(differences: Sequence[float]) -> float:
    """Standard error of the mean of paired differences, s/√n (ddof = 1).

    For QiD: ``differences`` are the per-window loss_q − loss_16 of one checkpoint on the same val
    windows, so the result is the standard error of that checkpoint's QiD (nats/token). Non-finite
    entries are ignored; nan when fewer than 2 remain."""
    d = _finite(differences)
    if len(d) < 2:
        return math.nan
    return float(np.std(d, ddof=1) / math.sqrt(len(d)))


def t_interval(values: Iterable[float], level: float = 0.95) -> Interval:
    """Mean of independent replicates with the t interval mean ± t(n−1)·s/√n.

    ``values``: one number per independent replicate (per seed / run), never per row of one run.
    Non-finite values and None are left out; with n < 2 the bounds (and se) are nan."""
    v = _finite(values)
    n = len(v)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0, level, "t interval (no values)")
    mean = float(v.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, math.nan, 1, level, "t interval (n < 2: no interval)")
    se = float(np.std(v, ddof=1) / math.sqrt(n))
    lo, hi = se_interval(mean, se, n - 1, level)
    return Interval(mean, lo, hi, se, n, level, f"t interval over {n} replicates (df {n - 1})")


def paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = 0.95,
                      relative: bool = False) -> Interval:
    """Mean difference a − b paired by seed, with a t interval over the per-seed differences.

    a, b: {seed: value}, e.g. QiD of technique A and of technique B for each seed (or relative QiD =
    QiD/loss_16 when the caller passes those). Only seeds in both mappings with finite values are
    used; they are listed, sorted, in ``Interval.paired``. Pairing cancels everything the two share
    per seed (the seed's data order and initialisation), so the interval reflects only how the
    difference varies between seeds.
    relative=True: the per-seed relative difference a_s/b_s − 1 (a fraction; 0.2 = A is 20 % higher),
    which needs b_s ≠ 0.
    """
    common = [k for k in a if k in b]
    try:
        keys = sorted(common)
    except TypeError:  # mixed key types: order by their text
        keys = sorted(common, key=str)
    seeds, diffs = [], []
    for k in keys:
        x, y = a[k], b[k]
        if x is None or y is None or not (math.isfinite(float(x)) and math.isfinite(float(y))):
            continue
        x, y = float(x), float(y)
        if relative:
            if y == 0:
                continue
            diffs.append(x / y - 1.0)
        else:
            diffs.append(x - y)
        seeds.append(k)
    iv = t_interval(diffs, level)
    what = "relative difference a/b − 1" if relative else "difference a − b"
    return Interval(iv.estimate, iv.lo, iv.hi, iv.se, iv.n, level,
                    f"paired {what} over {iv.n} seeds, t interval (df {max(iv.n - 1, 0)})", tuple(seeds))


def percentile_interval(replicates, level: float = 0.95, axis: int = 0):
    """(lo, hi): the (1 − level)/2 and (1 + level)/2 percentiles of the finite replicates along
    ``axis`` (nan when fewer than 2 are finite)."""
    r = np.asarray(replicates, dtype=float)
    a = (1 - level) / 2 * 100
    if r.ndim == 1:
        f = r[np.isfinite(r)]
        if len(f) < 2:
            return math.nan, math.nan
        lo, hi = np.percentile(f, [a, 100 - a])
        return float(lo), float(hi)
    with np.errstate(all="ignore"):
        r = np.where(np.isfinite(r), r, np.nan)
        ok = np.sum(np.isfinite(r), axis=axis) >= 2
        lo, hi = np.nanpercentile(r, [a, 100 - a], axis=axis)
    return np.where(ok, lo, np.nan), np.where(ok, hi, np.nan)


# --------------------------------------------------------------------------- clusters
def _factorize(labels: Sequence[Hashable]) -> tuple[np.ndarray, list]:
    """Integer codes 0..G−1 for labels, numbered in order of first appearance."""
    index: dict = {}
    codes = np.empty(len(labels), dtype=np.int64)
    for i, lab in enumerate(labels):
        codes[i] = index.setdefault(lab, len(index))
    return codes, list(index)


def cluster_sums(values: np.ndarray, cluster_ids: Sequence[Hashable]) -> tuple[np.ndarray, list]:
    """(per-cluster sums of ``values`` (n_rows, ...) -> (G, ...), the cluster labels), clusters in order of
    first appearance."""
    codes, labels = _factorize(list(cluster_ids))
    values = np.asarray(values, float)
    out = np.zeros((len(labels),) + values.shape[1:])
    np.add.at(out, codes, values)
    return out, labels


def _cluster_strata(codes: np.ndarray, n_clusters: int, strata: Sequence[Hashable] | None) -> np.ndarray:
    """Stratum code of each cluster; every row of a cluster must lie in one stratum."""
    if strata is None:
        return np.zeros(n_clusters, dtype=np.int64)
    scodes, _ = _factorize(list(strata))
    if len(scodes) != len(codes):
        raise ValueError("strata must have one label per row")
    per = np.full(n_clusters, -1, dtype=np.int64)
    for c, s in zip(codes, scodes):
        if per[c] == -1:
            per[c] = s
        elif per[c] != s:
            raise ValueError("a cluster's rows lie in more than one stratum")
    return per


def cluster_bootstrap_weights(cluster_ids: Sequence[Hashable], n_boot: int, rng: np.random.Generator,
                              strata: Sequence[Hashable] | None = None) -> tuple[np.ndarray, int]:
    """Rao–Wu rescaled bootstrap weights that resample whole clusters (runs).

    cluster_ids: one label per row (the run it comes from); strata: optional one label per row, constant
    within a cluster (the design cell, e.g. model size, whose runs are seed replicates). Within each
    stratum of n_h ≥ 2 clusters, each replicate draws n_h − 1 clusters with replacement; a cluster drawn
    m times gets weight m·n_h/(n_h − 1), every row inheriting its cluster's weight. A weighted fit with
    these weights is one bootstrap replicate. The variance of replicates of a (stratified) mean equals
    the unbiased between-cluster variance estimator, unlike the plain n-out-of-n bootstrap whose
    variance is (n_h − 1)/n_h of it (see the module docstring).

    Returns (weights of shape (n_boot, n_rows), df) with df = G − H (clusters minus strata), the degrees
    of freedom of the variance estimate. Deterministic for a given ``rng`` state. Raises ValueError when
    a stratum has fewer than 2 clusters.
    """
    codes, labels = _factorize(list(cluster_ids))
    G = len(labels)
    per = _cluster_strata(codes, G, strata)
    H = int(per.max()) + 1 if G else 0
    cw = np.zeros((int(n_boot), G))
    for h in range(H):
        members = np.flatnonzero(per == h)
        n_h = len(members)
        if n_h < 2:
            raise ValueError(f"stratum {h} has {n_h} cluster(s); the rescaling bootstrap needs at least 2")
        m_h = n_h - 1
        draws = rng.integers(0, n_h, size=(int(n_boot), m_h))
        flat = draws + np.arange(int(n_boot))[:, None] * n_h
        counts = np.bincount(flat.ravel(), minlength=int(n_boot) * n_h).reshape(int(n_boot), n_h)
        cw[:, members] = counts * (n_h / m_h)
    return cw[:, codes], G - H


def cluster_robust_cov(scores: np.ndarray, bread_inv: np.ndarray, cluster_ids: Sequence[Hashable],
                       strata: Sequence[Hashable] | None = None) -> tuple[np.ndarray, int]:
    """Cluster-robust (sandwich) covariance B⁻¹ M B⁻¹ of an M-estimator.

    scores: (n_rows, p) per-row contributions to the estimating equation at the estimate (for weighted
    least squares: J_i·r_i/v_i); bread_inv: (p, p) inverse of the summed derivative (JᵀWJ)⁻¹. The
    meat M sums, per stratum, n_h/(n_h − 1)·Σ_g (u_g − ū_h)(u_g − ū_h)ᵀ over the cluster score sums
    u_g — the linearised Rao–Wu bootstrap variance. Strata with one cluster contribute nothing (their
    variance cannot be estimated). Returns (covariance, df = G − H)."""
    codes, _ = _factorize(list(cluster_ids))
    u, labels = cluster_sums(scores, cluster_ids)
    G = len(labels)
    per = _cluster_strata(codes, G, strata)
    meat = np.zeros((scores.shape[1],) * 2)
    H = int(per.max()) + 1 if G else 0
    for h in range(H):
        ug = u[per == h]
        if len(ug) < 2:
            continue
        c = ug - ug.mean(axis=0)
        meat += len(ug) / (len(ug) - 1) * c.T @ c
    return bread_inv @ meat @ bread_inv, G - H


def satterthwaite_df(cluster_var: Sequence[float], strata: Sequence[Hashable] | None = None) -> float:
    """Satterthwaite degrees of freedom of the stratified between-cluster variance estimator.

    cluster_var: per cluster (not per row), the working variance s_g² of its contribution to the
    estimate; strata: per cluster, its stratum (None: one stratum). The estimator
    V̂ = Σ_h n_h/(n_h − 1)·Σ_g∈h (z_g − z̄_h)² is, for independent normal z_g, a quadratic form with
    E V̂ = Σ_g s_g² and Var V̂ = 2·Σ_h (n_h/(n_h − 1))²·[(1 − 2/n_h)·Σ s_g⁴ + (Σ s_g²)²/n_h²]; the
    result is 2·(E V̂)²/Var V̂. Equal s_g give G − H; unequal ones fewer. Strata with one cluster add
    nothing (their term is not estimated)."""
    s2 = np.asarray(cluster_var, float)
    labels = np.zeros(len(s2), dtype=np.int64) if strata is None else _factorize(list(strata))[0]
    num = den = 0.0
    for h in np.unique(labels):
        sh = s2[labels == h]
        n_h = len(sh)
        if n_h < 2:
            continue
        num += float(sh.sum())
        den += (n_h / (n_h - 1)) ** 2 * ((1 - 2 / n_h) * float(np.sum(sh * sh)) + float(sh.sum()) ** 2 / n_h**2)
    return num * num / den if den > 0 else math.nan


# --------------------------------------------------------------------------- variance function
def variance_components(resid: np.ndarray, f: np.ndarray, se2: np.ndarray | None = None, n_params: int = 0,
                        iters: int = 30) -> tuple[float, float]:
    """(τ², σ²) in the variance model Var(r_i) = se2_i + σ² + τ²·f_i².

    resid: residuals q_i − f_i (nats); f: fitted values (nats); se2: known measurement variances
    (qid_se², nats²) or None. With se2 given, σ² is 0 and only the relative component τ² (a squared
    fraction: τ = 0.1 is 10 % scatter) is estimated; without, the additive σ² (nats²) is estimated too.
    Method: non-negative weighted least squares of the squared residuals, scaled by n/(n − n_params)
    for the fitted parameters, on (1, f²), with weights 1/Var² (Var(r²) = 2·Var² for Gaussian r),
    iterated to a fixed point (Davidian & Carroll 1987)."""
    r = np.asarray(resid, float)
    f = np.asarray(f, float)
    n = len(r)
    scale = n / max(n - n_params, 1)
    r2 = r * r * scale
    known = np.zeros(n) if se2 is None else np.asarray(se2, float)
    Z = np.column_stack([f * f]) if se2 is not None else np.column_stack([np.ones(n), f * f])
    target = r2 - known
    v = np.full(n, max(float(np.mean(r2)), 1e-300))
    coef = np.zeros(Z.shape[1])
    for _ in range(iters):
        w = 1.0 / np.maximum(v, 1e-300)
        sw = np.sqrt(w)  # weights 1/Var² on squared residuals -> rows scaled by 1/Var
        Zs = Z * sw[:, None]
        cs = np.sqrt(np.mean(Zs * Zs, axis=0))
        cs[cs == 0] = 1.0
        new, _ = nnls(Zs / cs, target * sw)
        new = new / cs
        v_new = known + Z @ new
        floor = 1e-24 * max(float(np.mean(r2)), float(np.mean(known)), 1e-300)
        v_new = np.maximum(v_new, floor)
        done = np.allclose(new, coef, rtol=1e-8, atol=0)
        coef, v = new, v_new
        if done:
            break
    if se2 is not None:
        return float(coef[0]), 0.0
    return float(coef[1]), float(coef[0])


# --------------------------------------------------------------------------- series
def interpolate_at(x: Sequence[float], y: Sequence[float], x0):
    """y at x0 by linear interpolation along the series (x, y).

    x need not be sorted (e.g. x = 16-bit loss along a run's checkpoints, which falls as the run trains,
    y = QiD): points are ordered by x, repeated x values are averaged, non-finite pairs dropped.
    Outside [min x, max x] the result is nan (no extrapolation); with one point, y is returned only at
    that exact x. Scalar x0 gives a float, an array gives an array."""
    xa = np.asarray(x, float)
    ya = np.asarray(y, float)
    if xa.shape != ya.shape:
        raise ValueError(f"x and y differ in shape: {xa.shape} vs {ya.shape}")
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    x0a = np.asarray(x0, float)
    if len(xa) == 0:
        out = np.full(x0a.shape, np.nan)
    else:
        ux, inv = np.unique(xa, return_inverse=True)
        uy = np.bincount(inv, weights=ya) / np.bincount(inv)
        out = np.interp(x0a, ux, uy)
        out = np.where((x0a >= ux[0]) & (x0a <= ux[-1]), out, np.nan)
    return float(out) if np.ndim(out) == 0 else out
