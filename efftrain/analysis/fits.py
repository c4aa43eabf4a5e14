"""Scaling-law fits for quantization-induced degradation (QiD).

QiD = loss(quantized) - loss(16-bit), measured on the same held-out tokens.
Two published laws are supported; both are fitted by least squares on log QiD.

Ouyang et al. 2024, "Low-Bit Quantization Favors Undertrained LLMs" (arXiv 2411.17691)::

    QiD = k * D**beta / (N**alpha * P**gamma)
    log QiD = log k + beta*log D - alpha*log N - gamma*log P

with N = non-embedding parameters, D = training tokens, P = bit width. Published
GPTQ-on-Pythia fit: k = 0.017, alpha = 0.2261, beta = 0.5251, gamma = 5.4967.
The log form is linear in (log k, beta, alpha, gamma), so ordinary linear least
squares gives the exact least-squares solution (``numpy.linalg.lstsq``).

Kumar et al. 2024, "Scaling Laws for Precision" (arXiv 2411.04330), post-train
quantization term::

    QiD = C * D**gamma_D / N**gamma_N * exp(-P / gamma_post)
    log QiD = log C + gamma_D*log D - gamma_N*log N - P/gamma_post

which is linear in (log C, gamma_D, gamma_N, 1/gamma_post). We fit it with
``scipy.optimize.least_squares`` in its natural parameters (log C, gamma_D,
gamma_N, gamma_post) with gamma_post > 0, started from the linear solution, and
report gamma_post. Whenever the linear solution has 1/gamma_post > 0 the two
coincide (a re-parameterisation does not move the minimum); otherwise the fit
sits at the gamma_post bound, i.e. the data show no decrease of QiD with bits.

Data handling
-------------
* Rows with qid <= 0 (or non-finite qid) cannot enter a log fit: they are dropped
  and counted (``FitResult.n_dropped`` / ``FitResult.dropped``). Optionally,
  ``floor=x`` clips qid < x up to x instead (counted in ``n_floored``); this
  biases the fit and is off by default.
* A fit needs at least (number of free parameters + 1) usable points and enough
  spread in N, D and P to identify every free parameter; otherwise a ValueError
  names the group. Parameters can be held fixed (``fixed={"gamma": 5.4967}``),
  e.g. when a group has a single bit width.
* 95 % confidence intervals come from a percentile bootstrap that resamples rows
  with replacement (``numpy.random.default_rng(seed)``, so results are
  deterministic for a fixed seed). R^2 and RMSE are computed on log QiD.

Typical use::

    rows = load_rows("ptq.sqlite")                 # or a CSV
    res = fit_law(rows, "ouyang", n_boot=1000)
    print(format_table({"all": res}))
    d_star = tokens_to_reach(res, 0.1, n=1e9, p=4)  # tokens at which QiD = 0.1
"""

from __future__ import annotations

import csv
import math
import re
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy.optimize import least_squares

__all__ = [
    "LAWS",
    "REQUIRED_COLUMNS",
    "FitResult",
    "fit_law",
    "fit_table",
    "tokens_to_reach",
    "tokens_to_reach_ci",
    "format_table",
    "table_to_dict",
]

REQUIRED_COLUMNS: tuple[str, ...] = ("n_params", "tokens", "bits", "qid")


# --------------------------------------------------------------------------- laws
@dataclass(frozen=True)
class _Law:
    name: str
    citation: str
    formula: str
    param_names: tuple[str, ...]
    # linear coefficient names in log space (theta), same order as param_names
    coef_names: tuple[str, ...]

    # features: columns multiplying theta; log q = X @ theta
    def features(self, n: np.ndarray, d: np.ndarray, p: np.ndarray) -> np.ndarray:
        one = np.ones_like(n, dtype=float)
        if self.name == "ouyang":
            return np.column_stack([one, np.log(d), -np.log(n), -np.log(p)])
        return np.column_stack([one, np.log(d), -np.log(n), -p.astype(float)])

    def theta_to_params(self, theta: np.ndarray) -> dict[str, float]:
        t = [float(x) for x in theta]
        if self.name == "ouyang":
            return {"k": math.exp(t[0]), "beta": t[1], "alpha": t[2], "gamma": t[3]}
        inv = t[3]
        return {
            "C": math.exp(t[0]),
            "gamma_D": t[1],
            "gamma_N": t[2],
            "gamma_post": (1.0 / inv) if inv != 0 else math.inf,
        }

    def params_to_theta(self, params: Mapping[str, float]) -> np.ndarray:
        if self.name == "ouyang":
            return np.array([math.log(params["k"]), params["beta"], params["alpha"], params["gamma"]], float)
        gp = params["gamma_post"]
        return np.array(
            [math.log(params["C"]), params["gamma_D"], params["gamma_N"], 0.0 if math.isinf(gp) else 1.0 / gp],
            float,
        )


_OUYANG = _Law(
    name="ouyang",
    citation="Ouyang et al. 2024, arXiv 2411.17691",
    formula="QiD = k * D^beta / (N^alpha * P^gamma)",
    # order follows the theta layout [log k, beta, alpha, gamma]
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

# upper bound of gamma_post in units of max |P| (exp(-P/gamma_post) ~ 1: no bit dependence)
_GP_MAX_FACTOR = 1e6

# which data column each coefficient needs variation in (for error messages)
_COEF_VARIABLE = {1: "tokens (D)", 2: "n_params (N)", 3: "bits (P)"}


def _get_law(law: str) -> _Law:
    try:
        return LAWS[str(law).lower()]
    except KeyError:
        raise ValueError(f"unknown law {law!r}; expected one of {sorted(LAWS)}") from None


# --------------------------------------------------------------------------- result
@dataclass
class FitResult:
    """Outcome of :func:`fit_law`.

    ``params`` holds the point estimates in the law's natural parameters
    (ouyang: k, alpha, beta, gamma; kumar: C, gamma_D, gamma_N, gamma_post);
    ``ci`` maps each name to its (lo, hi) percentile-bootstrap interval
    (a fixed parameter gets (value, value)); ``se`` the bootstrap std. dev.
    ``r2`` / ``rmse`` are on log QiD over the points used.
    """

    law: str
    params: dict[str, float]
    ci: dict[str, tuple[float, float]]
    se: dict[str, float]
    r2: float
    rmse: float
    n_points: int
    n_dropped: int
    dropped: dict[str, int] = field(default_factory=dict)
    n_floored: int = 0
    fixed: dict[str, float] = field(default_factory=dict)
    n_boot: int = 0
    n_boot_failed: int = 0
    ci_level: float = 0.95
    seed: int = 0
    robust_loss: str = "linear"
    group: dict[str, Any] | None = None
    boot: np.ndarray | None = field(default=None, repr=False)  # (n_ok, 4) in params order

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
        """Predicted QiD at non-embedding params ``n``, tokens ``d``, bits ``p``
        (numpy broadcasting; scalar in -> float out)."""
        return _predict(self.law, self.params if params is None else params, n, d, p)

    def to_dict(self, include_boot: bool = False) -> dict[str, Any]:
        """JSON-serialisable summary (inf/nan become None)."""

        def f(x):
            x = float(x)
            return x if math.isfinite(x) else None

        out = {
            "law": self.law,
            "formula": _get_law(self.law).formula,
            "citation": _get_law(self.law).citation,
            "group": None if self.group is None else {k: _jsonable(v) for k, v in self.group.items()},
            "params": {k: f(v) for k, v in self.params.items()},
            "ci": {k: [f(lo), f(hi)] for k, (lo, hi) in self.ci.items()},
            "se": {k: f(v) for k, v in self.se.items()},
            "ci_level": self.ci_level,
            "r2_log": f(self.r2),
            "rmse_log": f(self.rmse),
            "n_points": int(self.n_points),
            "n_dropped": int(self.n_dropped),
            "dropped": {k: int(v) for k, v in self.dropped.items()},
            "n_floored": int(self.n_floored),
            "fixed": {k: f(v) for k, v in self.fixed.items()},
            "n_boot": int(self.n_boot),
            "n_boot_failed": int(self.n_boot_failed),
            "seed": int(self.seed),
            "robust_loss": self.robust_loss,
        }
        if include_boot and self.boot is not None:
            out["boot"] = [[f(x) for x in row] for row in self.boot]
        return out

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return format_table({self.label: self})


def _jsonable(v):
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def _predict(law: str, params: Mapping[str, float], n, d, p):
    n = np.asarray(n, dtype=float)
    d = np.asarray(d, dtype=float)
    p = np.asarray(p, dtype=float)
    L = _get_law(law)
    if L.name == "ouyang":
        out = params["k"] * d ** params["beta"] / (n ** params["alpha"] * p ** params["gamma"])
    else:
        out = params["C"] * d ** params["gamma_D"] / n ** params["gamma_N"] * np.exp(-p / params["gamma_post"])
    return float(out) if np.ndim(out) == 0 else out


def tokens_to_reach(result: FitResult, qid_threshold, n, p, *, params: Mapping[str, float] | None = None):
    """Training tokens D at which the fitted law's QiD reaches ``qid_threshold``
    for a model with ``n`` non-embedding params quantized to ``p`` bits.

    Closed form (the D exponent must be positive, i.e. QiD grows with D):
      ouyang: D = (thr * N^alpha * P^gamma / k)^(1/beta)
      kumar:  D = (thr * N^gamma_N * exp(P/gamma_post) / C)^(1/gamma_D)
    Broadcasts over arrays. ``params`` overrides the point estimate (used for
    bootstrap intervals, see :func:`tokens_to_reach_ci`).
    """
    pr = result.params if params is None else params
    thr = np.asarray(qid_threshold, dtype=float)
    if np.any(thr <= 0):
        raise ValueError("qid_threshold must be > 0")
    n = np.asarray(n, dtype=float)
    p = np.asarray(p, dtype=float)
    if result.law == "ouyang":
        e = pr["beta"]
        base = thr * n ** pr["alpha"] * p ** pr["gamma"] / pr["k"]
    else:
        e = pr["gamma_D"]
        base = thr * n ** pr["gamma_N"] * np.exp(p / pr["gamma_post"]) / pr["C"]
    if not e > 0:
        raise ValueError(f"D exponent is {e:.4g} <= 0: fitted QiD does not grow with tokens, no crossing point")
    out = base ** (1.0 / e)
    return float(out) if np.ndim(out) == 0 else out


def tokens_to_reach_ci(result: FitResult, qid_threshold, n, p, level: float | None = None):
    """(estimate, lo, hi) of :func:`tokens_to_reach`, interval from the stored
    bootstrap replicates (replicates with a non-positive D exponent are skipped)."""
    est = tokens_to_reach(result, qid_threshold, n, p)
    if result.boot is None or len(result.boot) == 0:
        raise ValueError("result has no bootstrap replicates (n_boot=0)")
    level = result.ci_level if level is None else level
    vals = []
    for row in result.boot:
        pr = dict(zip(result.param_names, row))
        try:
            vals.append(np.asarray(tokens_to_reach(result, qid_threshold, n, p, params=pr), float))
        except ValueError:
            continue
    if not vals:
        raise ValueError("no bootstrap replicate has a positive D exponent")
    arr = np.stack(vals)
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(arr, [a, 100 - a], axis=0)
    sq = lambda x: float(x) if np.ndim(x) == 0 else x  # noqa: E731
    return est, sq(lo), sq(hi)


# --------------------------------------------------------------------------- row handling
def _columns(rows, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """rows: list of mappings, or a mapping of column -> sequence."""
    if isinstance(rows, Mapping):
        missing = [k for k in keys if k not in rows]
        if missing:
            raise ValueError(f"missing columns {missing}; have {sorted(rows)}")
        return {k: np.asarray(rows[k], dtype=float) for k in keys}
    rows = list(rows)
    if not rows:
        raise ValueError("no rows given")
    missing = sorted({k for r in rows for k in keys if k not in r})
    if missing:
        raise ValueError(f"rows are missing required keys {missing}; need {list(keys)}")
    try:
        return {k: np.array([float(r[k]) if r[k] is not None else np.nan for r in rows]) for k in keys}
    except (TypeError, ValueError) as e:
        raise ValueError(f"non-numeric value in columns {list(keys)}: {e}") from None


def _row_list(rows) -> list[Mapping[str, Any]]:
    if isinstance(rows, Mapping):
        keys = list(rows)
        n = len(rows[keys[0]]) if keys else 0
        return [{k: rows[k][i] for k in keys} for i in range(n)]
    return list(rows)


def _prepare(rows, keys, floor, where: str):
    cols = _columns(rows, keys)
    n, d, p, q = (cols[k] for k in keys)
    for name, arr in ((keys[0], n), (keys[1], d), (keys[2], p)):
        bad = ~np.isfinite(arr) | (arr <= 0)
        if bad.any():
            raise ValueError(f"{where}: column {name!r} must be finite and > 0 ({int(bad.sum())} bad rows)")
    dropped: dict[str, int] = {}
    nonfinite = ~np.isfinite(q)
    if nonfinite.any():
        dropped["nonfinite"] = int(nonfinite.sum())
    n_floored = 0
    if floor is not None:
        if not floor > 0:
            raise ValueError("floor must be > 0")
        low = np.isfinite(q) & (q < floor)
        n_floored = int(low.sum())
        q = np.where(low, floor, q)
    nonpos = np.isfinite(q) & (q <= 0)
    if nonpos.any():
        dropped["qid<=0"] = int(nonpos.sum())
    keep = np.isfinite(q) & (q > 0)
    return n[keep], d[keep], p[keep], q[keep], dropped, n_floored


# --------------------------------------------------------------------------- core solver
def _solve(L: _Law, X: np.ndarray, y: np.ndarray, free: np.ndarray, fixed_theta: np.ndarray,
           robust_loss: str, f_scale: float) -> np.ndarray:
    """Least-squares theta (full length 4) for log q = X theta; free mask selects
    the fitted coefficients, the rest are held at fixed_theta. Raises
    np.linalg.LinAlgError if the free design is rank-deficient."""
    Xf = X[:, free]
    yo = y - X[:, ~free] @ fixed_theta[~free]
    # centre the non-intercept columns for conditioning; intercept is column 0
    has_int = bool(free[0])
    mu = Xf.mean(axis=0)
    if has_int:
        mu[0] = 0.0
        ymu = yo.mean()
    else:
        mu[:] = 0.0
        ymu = 0.0
    Xc = Xf - mu
    if has_int:
        Xc[:, 0] = 1.0
    sc = np.sqrt((Xc**2).mean(axis=0))
    sc[sc == 0] = 1.0
    Xs = Xc / sc
    yc = yo - ymu if has_int else yo
    if has_int:
        # intercept column is constant 1 and orthogonal to centred columns; handle it analytically
        Z = Xs[:, 1:]
        if Z.shape[1] and np.linalg.matrix_rank(Z) < Z.shape[1]:
            raise np.linalg.LinAlgError("rank-deficient")
        b = np.linalg.lstsq(Z, yc, rcond=None)[0] if Z.shape[1] else np.zeros(0)
        coef_s = np.concatenate([[0.0], b])
    else:
        if np.linalg.matrix_rank(Xs) < Xs.shape[1]:
            raise np.linalg.LinAlgError("rank-deficient")
        coef_s = np.linalg.lstsq(Xs, yc, rcond=None)[0]
    coef = coef_s / sc
    if has_int:
        coef[0] = ymu - mu[1:] @ coef[1:] if Xf.shape[1] > 1 else ymu
        # (columns were centred: intercept = mean(y) - mean(x) . b)
    theta = fixed_theta.copy()
    theta[free] = coef

    kumar_nat = L.name == "kumar" and bool(free[3])
    if robust_loss == "linear" and not kumar_nat:
        return theta  # linear least squares is the exact solution

    # natural parameters: ouyang -> theta itself; kumar -> theta with gamma_post instead of 1/gamma_post
    z0 = theta[free].copy()
    lb = np.full(z0.shape, -np.inf)
    ub = np.full(z0.shape, np.inf)
    idx_free = np.flatnonzero(free)
    gp_pos = None
    if kumar_nat:
        gp_pos = int(np.flatnonzero(idx_free == 3)[0])
        Pmax = float(np.max(np.abs(X[:, 3]))) or 1.0
        inv = theta[3]
        z0[gp_pos] = 1.0 / inv if inv > 0 else 1e3 * Pmax
        lb[gp_pos] = 1e-9
        ub[gp_pos] = _GP_MAX_FACTOR * Pmax
        z0[gp_pos] = min(max(z0[gp_pos], lb[gp_pos] * 10), ub[gp_pos])

    def to_theta(z):
        t = fixed_theta.copy()
        t[free] = z
        if gp_pos is not None:
            t[3] = 1.0 / z[gp_pos]
        return t

    def resid(z):
        return X @ to_theta(z) - y

    def jac(z):
        J = X[:, free].copy()
        if gp_pos is not None:
            J[:, gp_pos] = X[:, 3] * (-1.0 / z[gp_pos] ** 2)
        return J

    sol = least_squares(resid, z0, jac=jac, bounds=(lb, ub), loss=robust_loss, f_scale=f_scale,
                        x_scale="jac", method="trf", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=2000)
    return to_theta(sol.x)


def _check_identifiable(L: _Law, X: np.ndarray, free: np.ndarray, where: str):
    for j in (1, 2, 3):
        if free[j] and np.ptp(X[:, j]) == 0:
            pname = L.param_names[j]
            raise ValueError(
                f"{where}: {_COEF_VARIABLE[j]} takes a single value, so {pname!r} of the {L.name} law is not "
                f"identifiable; hold it fixed (fixed={{{pname!r}: value}}) or fit a group with more spread")


def fit_law(
    rows,
    law: str,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci_level: float = 0.95,
    fixed: Mapping[str, float] | None = None,
    floor: float | None = None,
    robust_loss: str = "linear",
    f_scale: float = 1.0,
    keys: Sequence[str] = REQUIRED_COLUMNS,
    group: Mapping[str, Any] | None = None,
) -> FitResult:
    """Fit ``law`` ("ouyang" | "kumar") to rows with keys n_params, tokens, bits, qid.

    rows: list of dicts (or dict of columns). Rows with qid <= 0 or non-finite are
    dropped and counted; ``floor`` clips qid < floor to floor instead.
    fixed: natural parameters to hold fixed, e.g. {"gamma": 5.4967} (ouyang) or
    {"gamma_post": 1.0} (kumar). robust_loss: "linear" (ordinary least squares,
    default) or a scipy least_squares robust loss ("soft_l1", "huber", "cauchy",
    "arctan") applied to log residuals with scale ``f_scale``.
    keys: column names for (N, D, P, QiD), e.g. ("n_params", "tokens", "eff_bits", "qid").
    Bootstrap: ``n_boot`` row resamples with replacement, rng seeded by ``seed``;
    percentile intervals at ``ci_level``. Replicates whose resample cannot identify
    the parameters are skipped and counted in ``n_boot_failed``.
    """
    L = _get_law(law)
    where = "group " + (",".join(f"{k}={v}" for k, v in group.items()) if group else "'all'")
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(L.param_names)
    if unknown:
        raise ValueError(f"unknown fixed parameter(s) {sorted(unknown)} for {L.name}; params are {L.param_names}")
    for name in ("k", "C", "gamma_post"):
        if name in fixed and not fixed[name] > 0:
            raise ValueError(f"fixed {name} must be > 0")
    if len(keys) != 4:
        raise ValueError("keys must name (N, D, P, QiD) columns")
    n, d, p, q, dropped, n_floored = _prepare(rows, tuple(keys), floor, where)
    free = np.array([name not in fixed for name in L.param_names])
    n_free = int(free.sum())
    n_drop = int(sum(dropped.values()))
    if n_free == 0:
        raise ValueError("all parameters are fixed; nothing to fit")
    if len(q) < n_free + 1:
        extra = f" ({n_drop} rows dropped: {dropped})" if n_drop else ""
        raise ValueError(
            f"{where}: only {len(q)} usable points{extra}, but the {L.name} law needs at least "
            f"{n_free + 1} (free parameters + 1)")

    # theta for fixed values
    fixed_theta = np.zeros(4)
    full_guess = {name: fixed.get(name, 1.0) for name in L.param_names}
    t_fixed = L.params_to_theta(full_guess)
    fixed_theta[~free] = t_fixed[~free]

    X = L.features(n, d, p)
    y = np.log(q)
    _check_identifiable(L, X, free, where)
    try:
        theta = _solve(L, X, y, free, fixed_theta, robust_loss, f_scale)
    except np.linalg.LinAlgError:
        raise ValueError(f"{where}: design matrix is rank-deficient (N, D, P are collinear in this data); "
                         f"fix a parameter or add points") from None
    params = L.theta_to_params(theta)
    if L.name == "kumar" and free[3] and params["gamma_post"] >= _GP_MAX_FACTOR * float(np.max(p)) * (1 - 1e-6):
        warnings.warn(f"{where}: gamma_post hit its upper bound ({params['gamma_post']:.3g}): QiD does not "
                      f"decrease with bits in this data", stacklevel=2)
    res = y - X @ theta
    ss_res = float(res @ res)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    rmse = math.sqrt(ss_res / len(y))

    # bootstrap
    rng = np.random.default_rng(seed)
    boot = []
    n_failed = 0
    m = len(y)
    for _ in range(int(n_boot)):
        idx = rng.integers(0, m, size=m)
        Xb, yb = X[idx], y[idx]
        if any(free[j] and np.ptp(Xb[:, j]) == 0 for j in (1, 2, 3)):
            n_failed += 1
            continue
        try:
            tb = _solve(L, Xb, yb, free, fixed_theta, robust_loss, f_scale)
            pb = L.theta_to_params(tb)
        except (np.linalg.LinAlgError, OverflowError):  # a degenerate resample: count it, skip it
            n_failed += 1
            continue
        boot.append([pb[k] for k in L.param_names])
    boot_arr = np.array(boot, dtype=float).reshape(-1, 4)
    if n_boot and n_failed > 0.1 * n_boot:
        warnings.warn(f"{where}: {n_failed}/{n_boot} bootstrap resamples could not identify the parameters",
                      stacklevel=2)
    a = (1 - ci_level) / 2 * 100
    ci, se = {}, {}
    for j, name in enumerate(L.param_names):
        if not free[j]:
            ci[name] = (params[name], params[name])
            se[name] = 0.0
        elif len(boot_arr) >= 2:
            col = boot_arr[:, j]
            lo, hi = np.percentile(col, [a, 100 - a])
            ci[name] = (float(lo), float(hi))
            se[name] = float(np.std(col, ddof=1)) if np.all(np.isfinite(col)) else math.inf
        else:
            ci[name] = (math.nan, math.nan)
            se[name] = math.nan

    return FitResult(
        law=L.name, params=params, ci=ci, se=se, r2=r2, rmse=rmse, n_points=int(m), n_dropped=n_drop,
        dropped=dropped, n_floored=n_floored, fixed=fixed, n_boot=int(n_boot), n_boot_failed=n_failed,
        ci_level=ci_level, seed=seed, robust_loss=robust_loss, group=dict(group) if group else None,
        boot=boot_arr,
    )


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
def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    ax = abs(x)
    if ax != 0 and (ax < 1e-3 or ax >= 1e4):
        return f"{x:.3e}"
    return f"{x:.4g}"


def format_param(result: "FitResult", name: str) -> str:
    """'value [lo, hi]' with the bootstrap CI, or 'value (fixed)' for a parameter held fixed."""
    v = result.params[name]
    if name in result.fixed:
        return f"{_fmt(v)} (fixed)"
    lo, hi = result.ci[name]
    return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"


def format_table(results: Mapping[Any, FitResult] | FitResult | Iterable[FitResult]) -> str:
    """Plain-text table: one row per fit, each parameter as "est [lo, hi]",
    then R^2 and RMSE (log space), points used and dropped."""
    if isinstance(results, FitResult):
        items = [(results.label, results)]
    elif isinstance(results, Mapping):
        items = [("all" if k == "all" else r.label, r) for k, r in results.items()]
    else:
        items = [(r.label, r) for r in results]
    if not items:
        return "(no fits)"
    lines = []
    # group consecutive results by law so headers match the parameters
    by_law: dict[str, list] = {}
    for lab, r in items:
        by_law.setdefault(r.law, []).append((lab, r))
    for law, its in by_law.items():
        L = _get_law(law)
        pct = int(round(its[0][1].ci_level * 100))
        header = ["group"] + [f"{n} [{pct}% CI]" for n in L.param_names] + ["R2(log)", "RMSE(log)", "n", "dropped"]
        body = []
        for lab, r in its:
            cells = [lab]
            cells += [format_param(r, nme) for nme in L.param_names]
            cells += [f"{r.r2:.4f}", f"{r.rmse:.4f}", str(r.n_points), str(r.n_dropped)]
            body.append(cells)
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
        lines.append(f"{L.name}: {L.formula}  ({L.citation})")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for row in body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
