"""Scaling-law fits for quantization-induced degradation (QiD), with intervals over training runs.

QiD = loss(quantized) − loss(16-bit) of one checkpoint, in nats/token, on the same val windows.
A row of the table is one (checkpoint, quantizer) pair: ``n_params`` (N), ``tokens`` (D, training
tokens seen), ``bits`` (P), ``qid`` and, where measured, ``qid_se`` (the paired standard error of the
per-window differences, see :func:`efftrain.analysis.stats.paired_se`), ``run_id`` (the training run:
replicate seeds are different runs), ``step`` and ``warmup_steps``.

The laws
--------
Ouyang et al. 2024, "Low-Bit Quantization Favors Undertrained LLMs" (arXiv 2411.17691)::

    QiD = k * D**beta / (N**alpha * P**gamma)

Kumar et al. 2024, "Scaling Laws for Precision" (arXiv 2411.04330), post-train quantization term::

    QiD = C * D**gamma_D / N**gamma_N * exp(-P / gamma_post)

Both are f = exp(x·θ) with θ = (log k, β, α, γ), x = (1, log D, −log N, −log P) for Ouyang and
θ = (log C, γ_D, γ_N, 1/γ_post), x = (1, log D, −log N, −P) for Kumar. Intervals are made on this θ
scale and mapped to the natural parameters (k = exp θ₀, γ_post = 1/θ₃).

The fit: weighted least squares in linear space
-----------------------------------------------
QiD is a small difference of two noisy losses: at 8 bits it is ~1e-4 nats, below its own standard
error, and many rows are ≤ 0. Fitting log QiD has to drop those rows (selection on the outcome) and
takes the log of noise, which biases the exponents low (on grids simulated from a known law by 13–15 %
for β and up to 27 % for γ, and row-bootstrap intervals never covered the true γ). Here instead::

    q_i = f(θ; N_i, D_i, P_i) + ε_i,   Var ε_i = v_i = se_i² + τ²·f_i²

with se_i = ``qid_se`` (window noise, known) and τ a relative scatter (seed-to-seed and model misfit,
a fraction: 0.1 = 10 %) estimated from the data. θ̂ solves the weighted estimating equation
Σ_i (q_i − f_i)·∂f_i/∂θ / v_i = 0, by Levenberg–Marquardt (Gauss–Newton with damping), started from
the log-space least squares on the positive rows; v_i is recomputed from the current f_i and a new τ²
(:func:`~efftrain.analysis.stats.variance_components`) until θ and τ² stop changing (iteratively
reweighted least squares). Rows with QiD ≤ 0 are data. The equation is unbiased whenever E q_i = f_i,
whatever the correlation between rows of one run, so the point estimate does not need the runs to
be modelled; the intervals do (below). The weights use the *fitted* f_i, never the observed q_i.

When no row has ``qid_se`` (old tables), an additive component σ² (nats²) is estimated with τ²:
v_i = σ² + τ²·f_i². When some rows lack it, they get the median ``qid_se`` of the others
(``FitResult.n_se_imputed``).

Rows left out by default (each counted in ``FitResult.excluded`` and listed in ``excluded_rows``)
----------------------------------------------------------------------------------------------
* ``warmup``: rows inside LR warmup (``step <= warmup_steps``, when rows carry both): the model is
  still transient there and the laws are written for trained checkpoints; ``exclude_warmup=False``
  keeps them.
* ``nonfinite_qid``: qid missing or not finite.
* ``noise_floor``: every row of a bit width whose median |QiD|/se is below ``noise_floor`` (2): at
  the floor (typically 8 bits) QiD is indistinguishable from 0 and carries no information on the
  exponents, while any departure from the law there (a systematic offset of the eval) would pull
  them. The decision is made per bit width, not per row, on purpose: dropping single rows because
  *their* value is small truncates the distribution of the rows kept and biases the fit toward
  larger QiD; leaving out a whole bit width removes design points, and the rows that remain keep
  their full, untruncated noise. Without any ``qid_se`` a bit width is at the floor when 10 % or
  more of its rows have QiD ≤ 0 (with Gaussian noise that happens when the typical QiD is below
  ~1.3 standard errors). ``noise_floor=None`` keeps every bit width.

Identifiability
---------------
A parameter the data cannot determine is reported as not identified (``FitResult.identified``,
``FitResult.not_identified`` with the reason), shown as "not identified", and has no interval:

* α (Kumar γ_N) when N spans less than ``min_span`` (4×), β (γ_D) when D spans less than 4× or has
  fewer than 2 values, γ (γ_post) when there is a single bit width: the exponent is held at 0, so the
  prefactor absorbs the covariate's (almost constant) contribution — and is then no longer comparable
  with a published prefactor (a note says so).
* Kumar's γ_post with exactly 2 bit widths: any two-parameter curve in P passes through two points,
  so exp(−P/γ_post) is then only a reparametrisation of Ouyang's P^−γ. It is still fitted (as a
  nuisance, so that C, γ_D and γ_N are right) but reported as not identified.

Parameters can also be held at chosen values: ``fixed={"gamma": 5.4967}`` (shown as "(fixed)").

Intervals: resampling whole runs
--------------------------------
Rows of one run share its seed and its checkpoints, so they are not independent; the independent units
are runs (``cluster_key="run_id"``). Replicates come from the Rao–Wu rescaling bootstrap over runs
(:func:`~efftrain.analysis.stats.cluster_bootstrap_weights`), stratified by design cell (by default the
run's N: its seeds are the replicates of that cell) when every cell has ≥ 2 runs, else unstratified.
Each replicate refits θ by warm-started Gauss–Newton with the replicate's run weights (variance weights
v_i held at the full-data values), vectorised over replicates. The interval of each θ_j is
θ̂_j ± t(df_j)·se_j, se_j the standard deviation of its replicates, because with a handful of runs
normal-quantile (percentile) intervals under-cover. df_j is the Satterthwaite degrees of freedom of
that variance (:func:`~efftrain.analysis.stats.satterthwaite_df`): at most G − H (runs minus cells,
8 for 4 sizes × 3 seeds, t = 2.31 against z = 1.96), and fewer (≈ 4.9, t = 2.58) for α, which is a
contrast between the 4 sizes and leans on the outer ones. On data simulated from a known law
(``tests/test_fits.py``: 4 sizes × 3 seeds, 10 % run-level noise) the 95 % intervals of β, α and γ
cover the truth in 93–96 % of 250 experiments and the estimates are unbiased to < 0.5 %, where the
old log-space fit lost 13 % of β and α. A cluster-robust sandwich covariance with the same
small-sample factor is computed as a cross-check (``FitResult.se_sandwich``). Without ``run_id`` every
row is its own cluster, which assumes independent rows. Deterministic for a fixed ``seed``.

Goodness of fit: ``r2_weighted`` is the weighted R² (weights 1/v_i) of the fit in linear space,
``rmse_nats`` the root mean square of q_i − f_i (nats), ``chi2_dof`` the Pearson χ²/(n − p); ``r2`` and
``rmse`` are the familiar diagnostics on log QiD over the rows with QiD > 0 (they describe the fit; the
fit does not minimise them).

Typical use::

    rows = load_rows("results.sqlite")           # efftrain.tables
    res = fit_law(rows, "ouyang", n_boot=1000)
    print(format_table({"all": res}))
    d_star = tokens_to_reach(res, 0.1, n=1e9, p=4)  # tokens at which QiD = 0.1 nats
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from efftrain.analysis import stats
from efftrain.formatting import format_estimate

__all__ = [
    "LAWS",
    "REQUIRED_COLUMNS",
    "PUBLISHED",
    "PUBLISHED_NOTES",
    "FitResult",
    "ExcludedRow",
    "fit_law",
    "fit_table",
    "tokens_to_reach",
    "tokens_to_reach_ci",
    "format_param",
    "format_published",
    "format_table",
    "table_to_dict",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("n_params", "tokens", "bits", "qid")

# Each law's own published values: never show one law's numbers beside the other.
PUBLISHED: dict[str, dict[str, float]] = {
    "ouyang": {"k": 0.017, "beta": 0.5251, "alpha": 0.2261, "gamma": 5.4967},
    "kumar": {},
}
PUBLISHED_NOTES: dict[str, str] = {
    "ouyang": "Ouyang et al. 2024 (arXiv 2411.17691), GPTQ on Pythia",
    "kumar": "Kumar et al. report γD ≈ γN; no single fitted value is used here",
}

# Rows with bit widths at the floor, without any qid_se: fraction of rows with QiD <= 0 that marks it.
_NONPOS_FRACTION_FLOOR = 0.1


# --------------------------------------------------------------------------- laws
@dataclass(frozen=True)
class _Law:
    name: str
    citation: str
    formula: str
    param_names: tuple[str, ...]
    # the theta layout: [log prefactor, D exponent, N exponent, P coefficient]
    coef_names: tuple[str, ...]

    def features(self, n: np.ndarray, d: np.ndarray, p: np.ndarray) -> np.ndarray:
        """x_i with log f_i = x_i·θ."""
        one = np.ones_like(n, dtype=float)
        last = -np.log(p) if self.name == "ouyang" else -np.asarray(p, dtype=float)
        return np.column_stack([one, np.log(d), -np.log(n), last])

    def to_natural(self, theta: np.ndarray) -> np.ndarray:
        """θ (..., 4) -> natural parameters in param_names order (γ_post = 1/θ₃, inf at 0)."""
        t = np.asarray(theta, float)
        out = t.copy()
        with np.errstate(over="ignore", divide="ignore"):
            out[..., 0] = np.exp(t[..., 0])
            if self.name == "kumar":
                out[..., 3] = 1.0 / t[..., 3]
        return out

    def params_to_theta(self, params: Mapping[str, float]) -> np.ndarray:
        v = [float(params[k]) for k in self.param_names]
        t = np.array([math.log(v[0]), v[1], v[2], v[3]], float)
        if self.name == "kumar":
            t[3] = 0.0 if math.isinf(v[3]) else 1.0 / v[3]
        return t

    def natural_interval(self, j: int, lo: float, hi: float) -> tuple[float, float]:
        """An interval of θ_j mapped to the natural parameter (monotone maps keep coverage)."""
        if j == 0:
            return math.exp(min(lo, 700.0)), math.exp(min(hi, 700.0))
        if j == 3 and self.name == "kumar":
            if lo > 0:
                return 1.0 / hi, 1.0 / lo
            if hi > 0:  # 1/γ_post may be 0 (no bit dependence): γ_post unbounded above
                return 1.0 / hi, math.inf
            return -math.inf, math.inf
        return lo, hi

    def natural_se(self, j: int, theta_j: float, se: float) -> float:
        """Delta-method standard error of the natural parameter from that of θ_j."""
        if j == 0:
            return math.exp(theta_j) * se
        if j == 3 and self.name == "kumar":
            return se / theta_j**2 if theta_j != 0 else math.inf
        return se


_OUYANG = _Law(
    name="ouyang",
    citation="Ouyang et al. 2024, arXiv 2411.17691",
    formula="QiD = k * D^beta / (N^alpha * P^gamma)",
    param_names=("k", "beta", "alpha", "gamma"),
    coef_names=("log_k", "beta", "alpha", "gamma"),
)
_KUMAR = _Law(
    name="kumar",
    citation="Kumar et al. 2024, arXiv 2411.04330",
    formula="QiD = C * D^gamma_D / N^gamma_N * exp(-P / gamma_post)",
    param_names=("C", "gamma_D", "gamma_N", "gamma_post"),
    coef_names=("log_C", "gamma_D", "gamma_N", "inv_gamma_post"),
)
LAWS: dict[str, _Law] = {"ouyang": _OUYANG, "kumar": _KUMAR}


def _get_law(law: str) -> _Law:
    try:
        return LAWS[str(law).lower()]
    except KeyError:
        raise ValueError(f"unknown law {law!r}; expected one of {sorted(LAWS)}") from None


# --------------------------------------------------------------------------- result
@dataclass
class FitResult:
    """Outcome of :func:`fit_law` (see the module docstring for the method).

    ``params``: point estimates in the law's natural parameters (ouyang: k, beta, alpha, gamma;
    kumar: C, gamma_D, gamma_N, gamma_post). A parameter that is not identified keeps the value the fit
    used (an exponent held at 0, γ_post at inf, or a Kumar nuisance γ_post) so that :meth:`predict`
    works, but has ``identified[name] = False``, a reason in ``not_identified`` and nan ``ci``/``se``.
    ``ci``: (lo, hi) at ``ci_level`` (a parameter in ``fixed`` gets (value, value)); ``se``: bootstrap
    standard error (delta method for k and γ_post); ``se_sandwich``: the cluster-robust cross-check.
    ``excluded``: {reason: rows}; ``excluded_rows``: one :class:`ExcludedRow` (reason, run_id, step,
    tokens, bits, method) per excluded row; ``n_dropped``: their total. ``tau``: relative scatter (fraction);
    ``sigma_add``: additive noise (nats) estimated when no qid_se was given, else 0.
    ``r2``/``rmse``: on log QiD of the rows with QiD > 0; ``r2_weighted``/``rmse_nats``/``chi2_dof``: of
    the weighted fit in linear space. ``se_mode``: "given", "imputed" (``n_se_imputed`` rows got the
    median qid_se) or "estimated" (no qid_se). ``bits_snr``: per bit width, the median |QiD|/se behind
    the noise-floor decision. ``n_params_source``: the column N came from (tables.with_n_params).
    ``n_clusters``/``n_strata``: runs and design cells resampled; ``df_clusters`` = runs − cells;
    ``df``: per free parameter, the Satterthwaite degrees of freedom of its t interval.
    ``boot``: (replicates, 4) natural parameters of the bootstrap replicates.
    """

    law: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    se: dict[str, float]
    r2: float
    rmse: float
    n_points: int
    n_dropped: int
    excluded: dict[str, int] = field(default_factory=dict)
    excluded_rows: list[ExcludedRow] = field(default_factory=list)
    fixed: dict[str, float] = field(default_factory=dict)
    identified: dict[str, bool] = field(default_factory=dict)
    not_identified: dict[str, str] = field(default_factory=dict)
    se_sandwich: dict[str, float] = field(default_factory=dict)
    r2_weighted: float = math.nan
    rmse_nats: float = math.nan
    tau: float = 0.0
    sigma_add: float = 0.0
    chi2_dof: float = math.nan
    se_mode: str = "given"
    n_se_imputed: int = 0
    bits_snr: dict[float, float] = field(default_factory=dict)
    n_params_source: str = "n_params"
    cluster_key: str | None = "run_id"
    n_clusters: int = 0
    n_strata: int = 1
    df: dict[str, float] = field(default_factory=dict)
    df_clusters: int = 0
    ci_method: str = ""
    n_boot: int = 0
    n_boot_failed: int = 0
    ci_level: float = 0.95
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    group: dict[str, Any] | None = None
    theta: np.ndarray | None = field(default=None, repr=False)
    boot: np.ndarray | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ helpers
    @property
    def label(self) -> str:
        if not self.group:
            return "all"
        return ",".join(f"{k}={v}" for k, v in self.group.items())

    @property
    def param_names(self) -> tuple[str, ...]:
        return _get_law(self.law).param_names

    def predict(self, n, d, p, params: Mapping[str, float] | None = None):
        """Predicted QiD (nats/token) at N = ``n`` params, D = ``d`` tokens, P = ``p`` bits
        (numpy broadcasting; scalar in -> float out)."""
        return _predict(self.law, self.params if params is None else params, n, d, p)

    def to_dict(self, include_boot: bool = False) -> dict[str, Any]:
        """JSON-serialisable summary (inf/nan become None)."""
        L = _get_law(self.law)
        out = {
            "law": self.law,
            "formula": L.formula,
            "citation": L.citation,
            "published": dict(PUBLISHED[self.law]),
            "published_note": PUBLISHED_NOTES[self.law],
            "group": None if self.group is None else {k: _jsonable(v) for k, v in self.group.items()},
            "params": {k: _num(v) for k, v in self.params.items()},
            "ci": {k: [_num(lo), _num(hi)] for k, (lo, hi) in self.ci.items()},
            "se": {k: _num(v) for k, v in self.se.items()},
            "se_sandwich": {k: _num(v) for k, v in self.se_sandwich.items()},
            "identified": dict(self.identified),
            "not_identified": dict(self.not_identified),
            "fixed": {k: _num(v) for k, v in self.fixed.items()},
            "ci_level": self.ci_level,
            "ci_method": self.ci_method,
            "r2_log": _num(self.r2),
            "rmse_log": _num(self.rmse),
            "r2_weighted": _num(self.r2_weighted),
            "rmse_nats": _num(self.rmse_nats),
            "chi2_dof": _num(self.chi2_dof),
            "tau": _num(self.tau),
            "sigma_add": _num(self.sigma_add),
            "se_mode": self.se_mode,
            "n_se_imputed": int(self.n_se_imputed),
            "bits_snr": {str(_jsonable(b)): _num(s) for b, s in self.bits_snr.items()},
            "n_points": int(self.n_points),
            "n_dropped": int(self.n_dropped),
            "excluded": {k: int(v) for k, v in self.excluded.items()},
            "excluded_rows": [r._asdict() for r in self.excluded_rows],
            "n_params_source": self.n_params_source,
            "cluster_key": self.cluster_key,
            "n_clusters": int(self.n_clusters),
            "n_strata": int(self.n_strata),
            "df": {k: _num(v) for k, v in self.df.items()},
            "df_clusters": int(self.df_clusters),
            "n_boot": int(self.n_boot),
            "n_boot_failed": int(self.n_boot_failed),
            "seed": int(self.seed),
            "notes": list(self.notes),
        }
        if include_boot and self.boot is not None:
            out["boot"] = [[_num(x) for x in row] for row in self.boot]
        return out

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return format_table({self.label: self})


def _num(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(v):
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _log_predict(law: str, params: Mapping[str, float], n, d, p) -> np.ndarray:
    """log f at (n, d, p), broadcast to their common shape."""
    L = _get_law(law)
    n, d, p = np.broadcast_arrays(*(np.asarray(a, dtype=float) for a in (n, d, p)))
    return (L.features(n.ravel(), d.ravel(), p.ravel()) @ L.params_to_theta(params)).reshape(n.shape)


def _predict(law: str, params: Mapping[str, float], n, d, p):
    out = np.exp(_log_predict(law, params, n, d, p))
    return float(out) if np.ndim(out) == 0 else out


# --------------------------------------------------------------------------- derived quantities
def tokens_to_reach(result: FitResult, qid_threshold, n, p, *, params: Mapping[str, float] | None = None):
    """Training tokens D at which the fitted law's QiD reaches ``qid_threshold`` (nats/token)
    for a model with ``n`` params quantized to ``p`` bits.

    Closed form (the D exponent must be positive, i.e. QiD grows with D):
      ouyang: D = (thr * N^alpha * P^gamma / k)^(1/beta)
      kumar:  D = (thr * N^gamma_N * exp(P/gamma_post) / C)^(1/gamma_D)
    Broadcasts over arrays. ``params`` overrides the point estimate (used for the bootstrap
    intervals of :func:`tokens_to_reach_ci`).
    """
    pr = result.params if params is None else params
    thr = np.asarray(qid_threshold, dtype=float)
    if np.any(thr <= 0):
        raise ValueError("qid_threshold must be > 0")
    L = _get_law(result.law)
    e = pr[L.param_names[1]]
    if not e > 0:
        raise ValueError(f"D exponent is {e:.4g} <= 0: fitted QiD does not grow with tokens, no crossing point")
    # log f(D) = log f(D=1) + e·log D  ->  log D = (log thr − log f(D=1)) / e
    out = np.exp((np.log(thr) - _log_predict(result.law, pr, n, 1.0, p)) / e)
    return float(out) if np.ndim(out) == 0 else out


def tokens_to_reach_ci(result: FitResult, qid_threshold, n, p, level: float | None = None):
    """(estimate, lo, hi) of :func:`tokens_to_reach` (tokens).

    The interval is exp(log D̂ ∓ t(df)·se), se the standard deviation of log D over the stored bootstrap
    replicates (replicates with a non-positive D exponent are skipped), df the smallest of the fitted
    parameters' degrees of freedom (conservative): the same recipe as the parameters' intervals."""
    est = tokens_to_reach(result, qid_threshold, n, p)
    if result.boot is None or len(result.boot) == 0:
        raise ValueError("result has no bootstrap replicates (n_boot=0)")
    level = result.ci_level if level is None else level
    vals = []
    for row in result.boot:
        pr = dict(zip(result.param_names, row))
        try:
            vals.append(np.log(np.asarray(tokens_to_reach(result, qid_threshold, n, p, params=pr), float)))
        except ValueError:
            continue
    if len(vals) < 2:
        raise ValueError("fewer than 2 bootstrap replicates have a positive D exponent")
    se = np.std(np.stack(vals), axis=0, ddof=1)
    df = min(result.df.values(), default=result.df_clusters)
    lo, hi = stats.se_interval(np.log(est), se, df, level)
    lo, hi = np.exp(lo), np.exp(hi)
    sq = lambda x: float(x) if np.ndim(x) == 0 else x  # noqa: E731
    return est, sq(lo), sq(hi)


# --------------------------------------------------------------------------- rows
def _row_list(rows) -> list[Mapping[str, Any]]:
    """rows: list of mappings, or a mapping of column -> sequence."""
    if isinstance(rows, Mapping):
        keys = list(rows)
        n = len(rows[keys[0]]) if keys else 0
        return [{k: rows[k][i] for k in keys} for i in range(n)]
    return list(rows)


def _float(v) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _columns(rl: list[Mapping[str, Any]], keys: Sequence[str]) -> list[np.ndarray]:
    if not rl:
        raise ValueError("no rows given")
    missing = sorted({k for r in rl for k in keys if k not in r})
    if missing:
        raise ValueError(f"rows are missing required keys {missing}; need {list(keys)}")
    try:
        return [np.array([float(r[k]) if r[k] is not None else np.nan for r in rl]) for k in keys]
    except (TypeError, ValueError) as e:
        raise ValueError(f"non-numeric value in columns {list(keys)}: {e}") from None


@dataclass
class _Prepared:
    """The rows a fit uses, after the default exclusions."""

    n: np.ndarray
    d: np.ndarray
    p: np.ndarray
    q: np.ndarray
    se2: np.ndarray | None  # None: no qid_se anywhere, estimate the additive component
    clusters: list
    runs_given: bool  # False: no row had a run id, every row is its own cluster
    rows: list
    excluded: dict[str, int]
    excluded_rows: list[ExcludedRow]
    se_mode: str
    n_se_imputed: int
    bits_snr: dict[float, float]
    notes: list[str]


class ExcludedRow(NamedTuple):
    """One row left out of a fit, and why (hashable and sortable, so a report can merge the lists of
    several fits). ``reason``: "warmup", "nonfinite_qid" or "noise_floor"."""

    reason: str
    run_id: Any
    step: Any
    tokens: Any
    bits: Any
    method: Any

    def __str__(self) -> str:
        where = [f"run {self.run_id}" if self.run_id is not None else "",
                 f"step {self.step}" if self.step is not None else "",
                 f"{format_estimate(float(self.tokens))} tokens" if self.tokens is not None else "",
                 f"{self.bits}-bit" if self.bits is not None else "", str(self.method or "")]
        return f"{self.reason}: " + " ".join(w for w in where if w)


def _excluded_entry(reason: str, r: Mapping[str, Any], keys: Sequence[str], cluster_key) -> ExcludedRow:
    return ExcludedRow(reason, _jsonable(r.get(cluster_key)) if cluster_key else None, _jsonable(r.get("step")),
                       _jsonable(r.get(keys[1])), _jsonable(r.get(keys[2])), r.get("method"))


def _prepare(rl, keys, se_key, cluster_key, exclude_warmup, noise_floor, where) -> _Prepared:
    n, d, p, q = _columns(rl, keys)
    for name, arr in ((keys[0], n), (keys[1], d), (keys[2], p)):
        bad = ~np.isfinite(arr) | (arr <= 0)
        if bad.any():
            raise ValueError(f"{where}: column {name!r} must be finite and > 0 ({int(bad.sum())} bad rows)")
    se = np.array([_float(r.get(se_key)) for r in rl]) if se_key else np.full(len(rl), np.nan)
    se = np.where(np.isfinite(se) & (se > 0), se, np.nan)
    reason = np.array([""] * len(rl), dtype=object)
    notes: list[str] = []

    if exclude_warmup:
        step = np.array([_float(r.get("step")) for r in rl])
        warm = np.array([_float(r.get("warmup_steps")) for r in rl])
        reason[np.isfinite(step) & np.isfinite(warm) & (step <= warm)] = "warmup"
    reason[(reason == "") & ~np.isfinite(q)] = "nonfinite_qid"

    alive = reason == ""
    have = alive & np.isfinite(se)
    if not have.any():
        se_mode, n_imputed, se2 = "estimated", 0, None
    else:
        n_imputed = int((alive & ~np.isfinite(se)).sum())
        se_mode = "imputed" if n_imputed else "given"
        if n_imputed:
            med = float(np.median(se[have]))
            notes.append(f"{n_imputed} rows without qid_se use the median qid_se of the others ({med:.3g} nats)")
            se = np.where(np.isfinite(se), se, med)
        se2 = se * se

    bits_snr: dict[float, float] = {}
    floor_on = noise_floor is not None and noise_floor > 0
    for b in sorted({float(x) for x in p[alive]}):
        in_b = alive & (p == b)
        if se2 is not None:
            bits_snr[b] = snr = float(np.median(np.abs(q[in_b]) / se[in_b]))
            at_floor, why = snr < (noise_floor or 0), f"median |QiD|/se = {snr:.2g} < {noise_floor}"
        else:
            bits_snr[b] = math.nan
            frac = float(np.mean(q[in_b] <= 0))
            at_floor, why = frac >= _NONPOS_FRACTION_FLOOR, f"{frac:.0%} of its rows have QiD <= 0 (no qid_se)"
        if floor_on and at_floor:
            reason[in_b] = "noise_floor"
            notes.append(f"bits {b:g} left out as the noise floor: {why}")

    keep = reason == ""
    excluded = dict(Counter(str(x) for x in reason[~keep]))
    excluded_rows = [_excluded_entry(str(reason[i]), rl[i], keys, cluster_key) for i in np.flatnonzero(~keep)]
    idx = np.flatnonzero(keep)
    labels = [rl[i].get(cluster_key) if cluster_key else None for i in idx]
    clusters = [lab if lab is not None else ("__row__", int(i)) for lab, i in zip(labels, idx)]
    return _Prepared(n[keep], d[keep], p[keep], q[keep], None if se2 is None else se2[keep], clusters,
                     any(lab is not None for lab in labels), [rl[i] for i in idx], excluded, excluded_rows,
                     se_mode, n_imputed, bits_snr, notes)


def _n_params_source(rows: list[Mapping[str, Any]], n_key: str) -> tuple[str, str | None]:
    """(the N column the rows used, a warning when they mix definitions of N)."""
    counts = Counter(str(r.get("n_params_source") or n_key) for r in rows)
    if len(counts) <= 1:
        return (next(iter(counts)) if counts else n_key), None
    text = ", ".join(f"{k} ({v} rows)" for k, v in counts.most_common())
    return f"mixed: {text}", f"rows mix definitions of N: {text}"


# --------------------------------------------------------------------------- identifiability
def _identifiability(L: _Law, prep: _Prepared, min_span: float) -> tuple[dict[int, str], dict[int, str]]:
    """({θ index: reason} held at 0, {θ index: reason} fitted as nuisance but not identified)."""
    held, nuisance = {}, {}
    n_span = float(prep.n.max() / prep.n.min())
    d_vals = np.unique(prep.d)
    d_span = float(d_vals.max() / d_vals.min())
    n_bits = len(np.unique(prep.p))
    if len(d_vals) < 2 or d_span < min_span:
        held[1] = (f"tokens (D) span {d_span:.3g}x over {len(d_vals)} value(s) (needs >= 2 values spanning "
                   f">= {min_span:g}x); exponent held at 0, absorbed into the prefactor")
    if n_span < min_span:
        held[2] = (f"n_params (N) spans {n_span:.3g}x (< {min_span:g}x); exponent held at 0, absorbed into "
                   f"the prefactor")
    if n_bits < 2:
        held[3] = "a single bit width; exponent held at 0, absorbed into the prefactor"
    elif n_bits == 2 and L.name == "kumar":
        nuisance[3] = ("2 bit widths: exp(-P/gamma_post) is then a reparametrisation of Ouyang's P^-gamma "
                       "(needs >= 3); fitted as a nuisance, not reported")
    return held, nuisance


# --------------------------------------------------------------------------- solver
def _lm(Xc: np.ndarray, off: np.ndarray, q: np.ndarray, v: np.ndarray, c: np.ndarray | None,
        theta0: np.ndarray, iters: int, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg–Marquardt for min Σ_i c_bi (q_i − exp(off_i + Xc_i·θ_b))² / v_i, batched over b.

    Xc (n, k); off, q, v (n,); c (B, n) row weights or None (all 1); theta0 (B, k).
    Returns (theta (B, k), converged (B,)). Steps that do not lower the objective are refused and the
    damping raised (Marquardt scaling by diag(JᵀWJ)), so the objective never increases."""
    theta = np.array(theta0, float, copy=True)
    B, k = theta.shape
    w = (1.0 / v)[None, :] if c is None else c / v[None, :]
    w = np.broadcast_to(w, (B, len(q)))

    def evaluate(th, rows):
        with np.errstate(over="ignore", invalid="ignore"):
            f = np.exp(off[None, :] + th @ Xc.T)
            s = np.sum(w[rows] * (q[None, :] - f) ** 2, axis=1)
        return np.where(np.isfinite(s), s, np.inf), f

    S, f = evaluate(theta, np.arange(B))
    lam = np.full(B, 1e-4)
    active = np.isfinite(S)
    converged = np.zeros(B, bool)
    eye = np.eye(k)
    for _ in range(iters):
        rows = np.flatnonzero(active)
        if not len(rows):
            break
        J = f[rows][:, :, None] * Xc[None, :, :]
        WJ = w[rows][:, :, None] * J
        A = np.matmul(WJ.transpose(0, 2, 1), J)
        g = np.einsum("bni,bn->bi", WJ, q[None, :] - f[rows])
        dg = np.einsum("bii->bi", A)
        damp = lam[rows][:, None] * dg + 1e-15 * dg.max(axis=1, keepdims=True) + 1e-300
        with np.errstate(all="ignore"):
            step = np.linalg.solve(A + damp[:, :, None] * eye, g[:, :, None])[:, :, 0]
        new = theta[rows] + step
        Sn, fn = evaluate(new, rows)
        acc = np.isfinite(step).all(axis=1) & (Sn <= S[rows])
        ar = rows[acc]
        theta[ar], S[ar], f[ar] = new[acc], Sn[acc], fn[acc]
        lam[rows] = np.where(acc, np.maximum(lam[rows] / 10, 1e-12), lam[rows] * 10)
        small = np.max(np.abs(step), axis=1) < tol
        done = acc & small
        converged[rows[done]] = True
        stuck = (~acc) & (lam[rows] > 1e12)
        converged[rows[stuck & (S[rows] < np.inf)]] = True  # no step improves: at the minimum to precision
        active[rows[done | stuck]] = False
    return theta, converged


def _irls(Xc, off, q, se2, theta0, max_outer: int = 60):
    """Weighted fit with variance weights re-estimated from the fit; returns (θc, v, τ², σ²)."""
    k = Xc.shape[1]
    theta = theta0.copy()
    tau2 = sigma2 = 0.0
    known = se2 if se2 is not None else 0.0
    v = None
    for _ in range(max_outer):
        f = np.exp(off + Xc @ theta)
        tau2, sigma2 = stats.variance_components(q - f, f, se2, n_params=k)
        v = known + sigma2 + tau2 * f * f
        v = np.maximum(v, 1e-24 * max(float(np.mean(q * q)), 1e-300))
        new, _ = _lm(Xc, off, q, v, None, theta[None, :], iters=500, tol=1e-13)
        new = new[0]
        moved = float(np.max(np.abs(new - theta)))
        theta = new
        if moved < 1e-11:
            break
    return theta, v, tau2, sigma2


def _start(des: "_Design", q: np.ndarray) -> np.ndarray:
    """Log-space least squares on the positive rows: the starting point of the weighted fit."""
    pos = q > 0
    k = des.Xc.shape[1]
    if pos.sum() > k:
        sol = np.linalg.lstsq(des.Xc[pos], np.log(q[pos]) - des.off[pos], rcond=None)[0]
        if np.all(np.isfinite(sol)):
            return sol
    theta = np.zeros(k)
    if des.has_intercept:
        theta[0] = math.log(max(float(np.mean(np.abs(q))), 1e-12))
    return theta


# --------------------------------------------------------------------------- the fit
def fit_law(
    rows,
    law: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
    fixed: Mapping[str, float] | None = None,
    keys: Sequence[str] = REQUIRED_COLUMNS,
    se_key: str | None = "qid_se",
    cluster_key: str | None = "run_id",
    strata: str | None = "auto",
    exclude_warmup: bool = True,
    noise_floor: float | None = 2.0,
    min_span: float = 4.0,
    group: Mapping[str, Any] | None = None,
) -> FitResult:
    """Fit ``law`` ("ouyang" | "kumar") to QiD rows by weighted least squares (module docstring).

    rows: list of dicts (or a dict of columns) with the ``keys`` columns (N, D, P, QiD; default
    n_params, tokens, bits, qid) and optionally ``se_key`` (qid_se), ``cluster_key`` (run_id), step,
    warmup_steps, n_params_source.
    fixed: natural parameters held at given values, e.g. {"gamma": 5.4967}.
    exclude_warmup / noise_floor: the default exclusions (False / None keep those rows).
    min_span: the smallest max/min ratio of N and of D that identifies their exponents.
    n_boot: bootstrap replicates over runs (0: no intervals); seed: their rng seed.
    strata: "auto" (the run's N when every N has >= 2 runs), None (unstratified) or a column name.
    group: the group's labels, for messages and FitResult.label.
    Raises ValueError naming the group when too few rows remain or N, D, P are collinear.
    """
    L = _get_law(law)
    where = "group " + (",".join(f"{k}={v}" for k, v in group.items()) if group else "'all'")
    fixed = {k: float(v) for k, v in (fixed or {}).items()}
    unknown = set(fixed) - set(L.param_names)
    if unknown:
        raise ValueError(f"unknown fixed parameter(s) {sorted(unknown)} for {L.name}; params are {L.param_names}")
    for name in ("k", "C", "gamma_post"):
        if name in fixed and not fixed[name] > 0:
            raise ValueError(f"fixed {name} must be > 0")
    if len(keys) != 4:
        raise ValueError("keys must name (N, D, P, QiD) columns")
    rl = _row_list(rows)
    prep = _prepare(rl, tuple(keys), se_key, cluster_key, exclude_warmup, noise_floor, where)
    n_excl = int(sum(prep.excluded.values()))
    notes = list(prep.notes)
    m = len(prep.q)

    user_fixed = np.array([name in fixed for name in L.param_names])
    if user_fixed.all():
        raise ValueError("all parameters are fixed; nothing to fit")
    if m == 0:
        raise ValueError(f"{where}: only 0 usable points ({n_excl} rows excluded: {prep.excluded})")
    held, nuisance = _identifiability(L, prep, min_span)
    free = ~user_fixed
    for j in held:
        free[j] = False
    if held and not user_fixed[0]:
        notes.append(f"{L.param_names[0]} absorbs the covariates of the exponents held at 0, so it is not "
                     f"comparable with a published value")
    n_free = int(free.sum())
    if m < n_free + 1:
        extra = f" ({n_excl} rows excluded: {prep.excluded})" if n_excl else ""
        raise ValueError(f"{where}: only {m} usable points{extra}, but the {L.name} fit needs at least "
                         f"{n_free + 1} (free parameters + 1)")
    theta_fixed = np.zeros(4)
    if user_fixed.any():
        theta_fixed[user_fixed] = L.params_to_theta({k: fixed.get(k, 1.0) for k in L.param_names})[user_fixed]
    des = _design(L, prep, free, theta_fixed, where)

    tc, v, tau2, sigma2 = _irls(des.Xc, des.off, prep.q, prep.se2, _start(des, prep.q))
    theta = des.T @ tc + des.theta_fixed
    params = dict(zip(L.param_names, (float(x) for x in L.to_natural(theta))))
    f = np.exp(des.off + des.Xc @ tc)
    r = prep.q - f
    w = 1.0 / v
    if L.name == "kumar" and free[3] and theta[3] <= 0:
        warnings.warn(f"{where}: 1/gamma_post = {theta[3]:.3g} <= 0: QiD does not decrease with bits in this "
                      f"data", stacklevel=2)

    # ---- intervals over runs ------------------------------------------------------------------
    strata_labels, ci_method = _strata(prep, strata, cluster_key)
    J = f[:, None] * des.Xc
    bread_inv = np.linalg.pinv((J * w[:, None]).T @ J)
    cov_c, df_clusters = stats.cluster_robust_cov(J * (r * w)[:, None], bread_inv, prep.clusters, strata_labels)
    G = len(set(prep.clusters))
    add_var = (prep.se2 if prep.se2 is not None else np.zeros(m)) + sigma2
    df = _parameter_df(J @ bread_inv @ des.T.T, w, f, add_var, tau2, prep.clusters, strata_labels)
    boot_theta, n_failed = np.zeros((0, 4)), 0
    if n_boot and df_clusters >= 1:
        boot_theta, n_failed = _bootstrap(des, prep, v, tc, strata_labels, int(n_boot), seed)
        if n_failed > 0.1 * n_boot:
            warnings.warn(f"{where}: {n_failed}/{n_boot} bootstrap replicates did not converge", stacklevel=2)
    elif n_boot:
        notes.append(f"{G} run(s) in {G - df_clusters} design cell(s): too few to resample, no intervals")

    # ---- per parameter: fixed, not identified, or estimate with its interval -------------------
    ci, se, se_sw, identified, not_identified = {}, {}, {}, {}, {}
    se_theta = np.std(boot_theta, axis=0, ddof=1) if len(boot_theta) >= 2 else np.full(4, np.nan)
    cov = des.T @ cov_c @ des.T.T
    for j, name in enumerate(L.param_names):
        reason = None if user_fixed[j] else held.get(j) or nuisance.get(j)
        identified[name] = reason is None
        if user_fixed[j]:
            ci[name], se[name], se_sw[name] = (params[name], params[name]), 0.0, 0.0
        elif reason is not None:
            not_identified[name] = reason
            notes.append(f"{name} not identified: {reason}")
            ci[name], se[name], se_sw[name] = (math.nan, math.nan), math.nan, math.nan
        else:
            se_sw[name] = L.natural_se(j, theta[j], math.sqrt(max(cov[j, j], 0.0)))
            lo, hi = stats.se_interval(theta[j], se_theta[j], df[j], ci_level)
            ci[name] = L.natural_interval(j, lo, hi) if math.isfinite(lo) else (math.nan, math.nan)
            se[name] = L.natural_se(j, theta[j], float(se_theta[j]))

    src, mixed = _n_params_source(prep.rows, keys[0])
    if mixed:
        warnings.warn(f"{where}: {mixed}", stacklevel=2)
        notes.append(mixed)
    pos = prep.q > 0
    log_res = np.log(prep.q[pos]) - np.log(f[pos])
    return FitResult(
        law=L.name, params=params, ci=ci, se=se,
        r2=_r2(np.log(prep.q[pos]), np.log(f[pos]), np.ones(int(pos.sum()))) if pos.any() else math.nan,
        rmse=math.sqrt(float(np.mean(log_res**2))) if pos.any() else math.nan,
        n_points=m, n_dropped=n_excl, excluded=prep.excluded, excluded_rows=prep.excluded_rows, fixed=fixed,
        identified=identified, not_identified=not_identified, se_sandwich=se_sw,
        r2_weighted=_r2(prep.q, f, w), rmse_nats=math.sqrt(float(np.mean(r * r))),
        tau=math.sqrt(tau2), sigma_add=math.sqrt(sigma2), chi2_dof=float(np.sum(w * r * r)) / max(m - n_free, 1),
        se_mode=prep.se_mode, n_se_imputed=prep.n_se_imputed, bits_snr=prep.bits_snr, n_params_source=src,
        cluster_key=cluster_key if prep.runs_given else None, n_clusters=G, n_strata=G - df_clusters,
        df={name: float(df[j]) for j, name in enumerate(L.param_names) if free[j]}, df_clusters=int(df_clusters),
        ci_method=ci_method, n_boot=int(n_boot), n_boot_failed=n_failed, ci_level=ci_level, seed=seed,
        notes=notes, group=dict(group) if group else None, theta=theta, boot=L.to_natural(boot_theta),
    )


@dataclass
class _Design:
    """The free part of the log-linear model: log f = off + Xc·θc, and θ = T·θc + theta_fixed."""

    Xc: np.ndarray  # (n, free) free columns, the exponent columns centred when the prefactor is free
    off: np.ndarray  # (n,) the fixed columns' contribution
    T: np.ndarray  # (4, free)
    theta_fixed: np.ndarray  # (4,) the held values, 0 where free
    has_intercept: bool


def _design(L: _Law, prep: _Prepared, free: np.ndarray, theta_fixed: np.ndarray, where: str) -> _Design:
    X = L.features(prep.n, prep.d, prep.p)
    n_free = int(free.sum())
    mu = np.zeros(4)
    if free[0]:  # centre the exponent columns about their means, for conditioning
        mu[1:] = np.where(free[1:], X[:, 1:].mean(axis=0), 0.0)
    Xc = X[:, free] - mu[free]
    if free[0]:
        Xc[:, 0] = 1.0
    if np.linalg.matrix_rank(Xc) < n_free:
        raise ValueError(f"{where}: design matrix is rank-deficient (N, D, P are collinear in this data); "
                         f"fix a parameter or add points")
    T = np.zeros((4, n_free))
    T[np.flatnonzero(free), np.arange(n_free)] = 1.0
    if free[0]:  # the intercept of the centred parametrisation carries −Σ θ_j μ_j
        T[0] -= mu @ T
    return _Design(Xc, X[:, ~free] @ theta_fixed[~free], T, theta_fixed, bool(free[0]))


def _bootstrap(des: _Design, prep: _Prepared, v: np.ndarray, tc: np.ndarray, strata_labels, n_boot: int,
               seed: int) -> tuple[np.ndarray, int]:
    """θ of each Rao–Wu replicate over runs: the weighted fit redone with the replicate's run weights,
    warm-started at θ̂, variance weights v held; vectorised over replicates in chunks of ~4M numbers.
    Returns (replicates (n_ok, 4) on the full θ scale, number that did not converge)."""
    rng = np.random.default_rng(seed)
    cw, _ = stats.cluster_bootstrap_weights(prep.clusters, n_boot, rng, strata_labels)
    chunk = max(8, min(256, 4_000_000 // (des.Xc.size or 1)))
    reps, n_failed = [], 0
    for lo in range(0, n_boot, chunk):
        c = cw[lo:lo + chunk]
        tb, ok = _lm(des.Xc, des.off, prep.q, v, c, np.repeat(tc[None, :], len(c), axis=0), iters=60, tol=1e-9)
        ok &= np.isfinite(tb).all(axis=1)
        n_failed += int((~ok).sum())
        reps.append(tb[ok])
    return np.concatenate(reps) @ des.T.T + des.theta_fixed, n_failed


def _r2(y: np.ndarray, fit: np.ndarray, w: np.ndarray) -> float:
    """Weighted R² = 1 − Σw(y − fit)²/Σw(y − ȳ_w)²."""
    ybar = float(np.sum(w * y) / np.sum(w))
    ss_tot = float(np.sum(w * (y - ybar) ** 2))
    ss_res = float(np.sum(w * (y - fit) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


def _parameter_df(influence: np.ndarray, w: np.ndarray, f: np.ndarray, add_var: np.ndarray, tau2: float,
                  clusters: list, strata_labels: list | None) -> np.ndarray:
    """Satterthwaite df of each θ_j's interval (:func:`~efftrain.analysis.stats.satterthwaite_df`).

    influence (n, 4): J_i·(JᵀWJ)⁻¹ mapped to θ, so that θ̂ − θ ≈ Σ_i influence_i·w_i·ε_i. The working
    model for the variance of cluster g's contribution treats the additive noise (``add_var``: se² or
    σ², nats²) as independent rows and the relative component τ²·f² as shared by all rows of a run
    (a run-level random effect): s_gj² = Σ_i∈g (a_ij)²·add_var_i + τ²·(Σ_i∈g a_ij·f_i)², a = influence·w.
    Sharing τ within runs is what makes between-run contrasts (α, and k through α) lean on few
    clusters; within-run exponents (β, γ) are barely touched by it."""
    a = influence * w[:, None]
    indep, _ = stats.cluster_sums(a * a * add_var[:, None], clusters)
    shared, _ = stats.cluster_sums(a * f[:, None], clusters)
    s2 = indep + tau2 * shared**2
    cell = None if strata_labels is None else list(dict(zip(clusters, strata_labels)).values())
    return np.array([stats.satterthwaite_df(s2[:, j], cell) for j in range(s2.shape[1])])


def _strata(prep: _Prepared, strata: str | None, cluster_key: str | None) -> tuple[list | None, str]:
    """Per-row stratum labels for the run resampling, and a sentence saying how intervals are made."""
    G = len(set(prep.clusters))
    unit = f"{G} runs ({cluster_key})" if prep.runs_given else f"{G} rows (no run id: rows taken as independent)"
    base = f"Rao-Wu rescaled bootstrap over {unit}"
    tail = "; interval = estimate +- t(df) x bootstrap se on the log-linear scale"
    if strata is None:
        return None, base + ", unstratified" + tail
    if strata == "auto":
        per_cluster: dict = {}
        for c, n in zip(prep.clusters, prep.n):
            per_cluster.setdefault(c, set()).add(float(n))
        cell = {c: tuple(sorted(s)) for c, s in per_cluster.items()}
        labels = [cell[c] for c in prep.clusters]
        what = "N"
    else:
        labels = [r.get(strata) for r in prep.rows]
        what = strata
        per_cluster = {}
        for c, s in zip(prep.clusters, labels):
            per_cluster.setdefault(c, set()).add(s)
        if any(len(s) > 1 for s in per_cluster.values()):
            raise ValueError(f"strata column {strata!r} varies within a run")
        cell = {c: next(iter(s)) for c, s in per_cluster.items()}
    sizes = Counter(cell.values())
    if len(sizes) < 2 or min(sizes.values()) < 2:
        return None, base + f", unstratified (some {what} cell has a single run)" + tail
    return labels, base + f", stratified by {what} ({len(sizes)} cells)" + tail


def fit_table(
    rows,
    law: str,
    group_by: Sequence[str] = (),
    *,
    on_error: str = "raise",
    **kwargs,
) -> dict[Any, FitResult]:
    """Fit ``law`` jointly ("all") and per group of ``group_by`` columns.

    Returns {"all": FitResult, group_key: FitResult, ...} where group_key is the
    tuple of the group's values in ``group_by`` order (e.g. ("gptq",) or
    ("gptq", "wsd")). ``kwargs`` go to :func:`fit_law`. on_error="raise"
    (default) propagates a group's ValueError (which names the group);
    "skip" leaves failing groups out of the table (with a warning).
    """
    if isinstance(group_by, str):
        group_by = (group_by,)
    group_by = tuple(group_by)
    rl = _row_list(rows)
    if not rl:
        raise ValueError("no rows given")
    out: dict[Any, FitResult] = {"all": fit_law(rl, law, **kwargs)}
    if not group_by:
        return out
    missing = sorted({g for r in rl for g in group_by if g not in r})
    if missing:
        raise ValueError(f"group_by columns {missing} missing from some rows")
    groups: dict[tuple, list] = {}
    for r in rl:
        groups.setdefault(tuple(r[g] for g in group_by), []).append(r)
    for key in sorted(groups, key=lambda t: tuple(str(x) for x in t)):
        try:
            out[key] = fit_law(groups[key], law, group=dict(zip(group_by, key)), **kwargs)
        except ValueError as e:
            if on_error == "skip":
                warnings.warn(f"skipping group {key}: {e}", stacklevel=2)
                continue
            raise
    return out


def table_to_dict(results: Mapping[Any, FitResult]) -> dict[str, Any]:
    """JSON-able {label: FitResult.to_dict()} for a :func:`fit_table` result."""
    return {(r.label if k != "all" else "all"): r.to_dict() for k, r in results.items()}


# --------------------------------------------------------------------------- formatting
def format_param(result: "FitResult", name: str) -> str:
    """'value [lo, hi]' with the interval, 'value (fixed)' for a parameter held at a given value,
    'not identified' for one the data cannot determine."""
    v = result.params[name]
    if name in result.fixed:
        return f"{format_estimate(v)} (fixed)"
    if not result.identified.get(name, True):
        return "not identified"
    lo, hi = result.ci[name]
    if not (math.isfinite(lo) and math.isfinite(hi)):  # e.g. one run: nothing to resample
        return f"{format_estimate(v)} (no interval: {result.n_clusters} run{'s' if result.n_clusters != 1 else ''})"
    return f"{format_estimate(v)} [{format_estimate(lo)}, {format_estimate(hi)}]"


def format_published(law: str) -> str:
    """One line with the law's own published values (or its note when there are none)."""
    L = _get_law(law)
    pub = PUBLISHED[L.name]
    if not pub:
        return f"published: {PUBLISHED_NOTES[L.name]}"
    vals = ", ".join(f"{k} = {pub[k]:g}" for k in L.param_names if k in pub)
    return f"published: {vals} ({PUBLISHED_NOTES[L.name]})"


def format_table(results: Mapping[Any, FitResult] | FitResult | Iterable[FitResult]) -> str:
    """Plain-text table per law: one row per fit, each parameter as "est [lo, hi]" (or "not
    identified" / "(fixed)"), R² and RMSE on log QiD, rows used and excluded; then the law's published
    values and, per fit, what was excluded and why parameters are not identified."""
    if isinstance(results, FitResult):
        items = [(results.label, results)]
    elif isinstance(results, Mapping):
        items = [("all" if k == "all" else r.label, r) for k, r in results.items()]
    else:
        items = [(r.label, r) for r in results]
    if not items:
        return "(no fits)"
    lines = []
    by_law: dict[str, list] = {}
    for lab, r in items:
        by_law.setdefault(r.law, []).append((lab, r))
    for law, its in by_law.items():
        L = _get_law(law)
        pct = int(round(its[0][1].ci_level * 100))
        header = ["group"] + [f"{n} [{pct}% CI]" for n in L.param_names] + ["R2(log)", "RMSE(log)", "n", "excluded"]
        body = []
        for lab, r in its:
            cells = [lab] + [format_param(r, nme) for nme in L.param_names]
            cells += [f"{r.r2:.4f}", f"{r.rmse:.4f}", str(r.n_points), str(r.n_dropped)]
            body.append(cells)
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
        lines.append(f"{L.name}: {L.formula}  ({L.citation})")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for row in body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        lines.append(format_published(law))
        for lab, r in its:
            if r.excluded:
                lines.append(f"  {lab}: excluded " + ", ".join(f"{k} {v}" for k, v in r.excluded.items()))
            for name, why in r.not_identified.items():
                lines.append(f"  {lab}: {name} not identified ({why})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
