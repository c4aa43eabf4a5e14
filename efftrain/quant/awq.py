"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv 2306.00978 §3) - the layer-level parts.

For ``y = x @ w``, ``w[in, out]``, calibration inputs ``X[n, in]``:

* §3.2 "Protecting salient weights by activation-aware scaling": scale input channel i by ``s_i`` before
  rounding and fold ``1/s_i`` into the input, ``y ≈ (x / s) @ Q(diag(s) w)``. The scale is searched
  (eq. 4-5)::

      s_x   = mean_tokens |x|                               (per input channel)
      s(α)  = max(s_x^α, 1e-4) / sqrt(max(.) · min(.))      (the reference code's normalisation)
      α*    = argmin_{α in grid} || X w - X · Q(diag(s) w) / s[:, None] ||^2

  with ``Q`` = RTN (efftrain.quant.rtn, any format) and α on ``linspace(0, 1, grid)`` (the reference
  uses ``i / grid``, i < grid; we include both ends). α = 0 gives s = 1, i.e. exactly RTN, so the chosen
  error is never above RTN's on the calibration set. For one Linear the error is measured through the
  Gram matrix ``X^T X`` (no activation tensor of size [n, out] is formed); the model-level AWQ
  (efftrain.quant.awq_model) measures it on a whole attention / MLP / MoE block's output instead, as the
  reference does, and uses ``awq_scale`` / ``weight_mean`` / the kernels below.

* ``duo_scaling`` (AutoAWQ, ``quantizer.py`` ``_search_best_scale``): ``s(α) = s_x^α / (s_w^(1-α) + 1e-4)``
  (clamped at 1e-4, same normalisation), with ``s_w`` = ``weight_mean``: per group, ``|w| / max_group |w|``,
  averaged over all output columns of all weights that read the input.

* Output of ``quantize_awq`` (one Linear, the scale kept explicit): the EFFECTIVE dequantized weight
  ``w_eff = Q(diag(s) w) / s[:, None]``, a drop-in replacement since ``x @ w_eff = (x / s) @ Q(diag(s) w)``;
  ``info['s']`` holds s, ``return_packed`` the codes of ``Q(diag(s) w)``. The division is done as a product
  with ``info['inv_s'] = 1/s`` (correctly rounded float32), so
  ``unpack(*info['packed'], ...) * info['inv_s'][:, None] == w_eff`` exactly. (Stored this way the 1/s
  costs 16 bits per input row; the model-level AWQ folds s into the preceding norm or Linear instead.)

* Clipping (on by default; the reference's ``auto_clip.py``, §3.3 "search to better clip"): on the
  scaled weight ``w' = diag(s) w`` with inputs ``x / s``, per group and output channel, the clip range
  ``±r · max|w'_G|`` is searched over the reference grid ``r = 1 - k / clip_grid``,
  ``k < max_shrink · clip_grid`` (1, 0.95, ..., 0.55 by default), minimising that group's share of the
  output error ``d^T X_G^T X_G d`` (``d = w'_G - Q(clip(w'_G))``; the reference's per-group error, here
  from all calibration tokens through the Gram matrix where the reference subsamples 512). The clipped
  result is kept only if it lowers the whole layer's calibration error (a guard the reference does not
  have); ``info['clip_applied']`` says whether.

Jitted XLA programs (``lax.map`` over the α grid and the clip ratios), float32 (float64 for float64
input under jax x64); the int bit width is data (``maxq``), so one program serves every int width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from efftrain.xla import ptq_jit
from .formats import (
    Packed,
    QuantFormat,
    check_weight,
    _compute_dtype,
    fake_quant,
    grouped,
    kernel_format,
    cast_like,
    _pack_jit,
    pack_kernel,
    pad_tokens,
    rtn_jit,
    rtn_kernel,
    to_compute,
    make_format,
    resolve_group_size,
)

__all__ = ["quantize_awq", "awq_scale", "weight_mean", "alpha_grid", "clip_ratios"]

_HIGHEST = lax.Precision.HIGHEST


def alpha_grid(grid: int) -> np.ndarray:
    """The α values searched: ``linspace(0, 1, grid)`` (just 0, i.e. RTN, for grid = 1)."""
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    return np.linspace(0.0, 1.0, int(grid)) if grid > 1 else np.zeros(1)


def clip_ratios(clip_grid: int = 20, max_shrink: float = 0.5) -> np.ndarray:
    """The reference's clip grid: ``1 - k / clip_grid`` for ``k < max_shrink · clip_grid`` (at least r = 1)."""
    if int(clip_grid) < 1 or not 0 <= max_shrink < 1:
        raise ValueError(f"clip needs clip_grid >= 1 and 0 <= max_shrink < 1, got {clip_grid}, {max_shrink}")
    n = max(1, int(max_shrink * int(clip_grid)))
    return 1.0 - np.arange(n) / int(clip_grid)


def awq_scale(x_mean, alpha, w_mean=None):
    """Per-input-channel scale s(α) (eq. 5 with the reference's normalisation; duo form with w_mean)."""
    if w_mean is None:
        s = jnp.maximum(x_mean**alpha, 1e-4)
    else:
        s = jnp.maximum(x_mean**alpha / (w_mean ** (1 - alpha) + 1e-4), 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


_scale = ptq_jit(awq_scale)


def weight_mean(ws, g: int):
    """AutoAWQ's ``w_mean``: per group (g rows of one column) ``|w| / max|w|``, averaged per input row over
    every output column of every weight in ``ws`` (each ``[..., in, out]``; leading dims count as columns)."""
    total, count = 0.0, 0
    for w in ws:
        a = jnp.abs(grouped(jnp.asarray(w, jnp.float32), g))
        a = (a / (jnp.max(a, axis=-2, keepdims=True) + 1e-6)).reshape(w.shape)
        axes = tuple(range(a.ndim - 2)) + (a.ndim - 1,)
        total = total + jnp.sum(a, axis=axes)
        count += int(np.prod(w.shape)) // w.shape[-2]
    return total / count


@ptq_jit
def _stats(x, n_tokens):
    """mean |x| per input channel and the Gram matrix X^T X (x may carry zero padding rows)."""
    return jnp.sum(jnp.abs(x), axis=0) / n_tokens, jnp.matmul(x.T, x, precision=_HIGHEST)


@ptq_jit
def gram(x):
    """X^T X of x [n, in] (float32, precision HIGHEST)."""
    x = x.astype(jnp.float32)
    return jnp.matmul(x.T, x, precision=_HIGHEST)


@ptq_jit
def _out_err(w, w_hat, G):
    """||X (w - w_hat)||^2 = sum(D * (X^T X) D)."""
    d = w - w_hat
    return jnp.sum(d * jnp.matmul(G, d, precision=_HIGHEST))


def _search_errors(w, G, sx, w_mean, alphas, maxq, f: QuantFormat, g: int):
    def one(alpha):
        s = awq_scale(sx, alpha, w_mean)[:, None]
        return _out_err(w, rtn_kernel(w * s, maxq, f=f, g=g) / s, G)

    return lax.map(one, alphas)


_search = ptq_jit(_search_errors, static_argnames=("f", "g"))


def _best_scale(w, G, sx, w_mean, alphas, maxq, f: QuantFormat, g: int):
    errors = _search_errors(w, G, sx, w_mean, alphas, maxq, f, g)
    return awq_scale(sx, alphas[jnp.argmin(errors)], w_mean)  # first minimum: ties go to the smaller α


@ptq_jit(static_argnames=("f", "g"))
def best_scales(w, G, sx, w_mean, alphas, maxq, *, f: QuantFormat, g: int):
    """The searched s of one Linear ``w[in, out]`` (Gram ``G[in, in]``, mean |x| ``sx[in]``) or of a stack
    ``w[E, in, out]`` (``G[E, in, in]``, ``sx[E, in]``, ``w_mean`` [E, in] or None), on the device."""
    core = functools.partial(_best_scale, f=f, g=g)
    if w.ndim == 3:
        return jax.vmap(core, in_axes=(0, 0, 0, None if w_mean is None else 0, None, None))(
            w, G, sx, w_mean, alphas, maxq)
    return core(w, G, sx, w_mean, alphas, maxq)


def _clip_core(ws, Gs, ratios, maxq, f: QuantFormat, g: int):
    n_in, n_out = ws.shape
    ng = n_in // g
    wg = ws.reshape(ng, g, n_out)
    ar = jnp.arange(ng)
    Gb = Gs.reshape(ng, g, ng, g)[ar, :, ar, :]  # diagonal blocks [ng, g, g]
    amax = jnp.max(jnp.abs(wg), axis=1, keepdims=True)

    def one(r):
        mv = amax * r
        d = wg - fake_quant(jnp.clip(wg, -mv, mv), f, axis=1, maxq=maxq)
        return jnp.sum(d * jnp.einsum("kij,kjo->kio", Gb, d, precision=_HIGHEST), axis=1)  # [ng, out]

    errs = lax.map(one, ratios)
    best = ratios[jnp.argmin(errs, axis=0)]  # [ng, out]
    mv = amax * best[:, None, :]
    return jnp.clip(wg, -mv, mv).reshape(n_in, n_out), best


_clip_search = ptq_jit(_clip_core, static_argnames=("f", "g"))


def _clip_quantize_one(w, G, allow, ratios, maxq, f: QuantFormat, g: int, clip: bool):
    """(RTN of w or of its clipped form, codes, scales, zeros, clip applied) for the scaled weight w."""
    if clip:
        wc, _ = _clip_core(w, G, ratios, maxq, f, g)
        better = _out_err(w, rtn_kernel(wc, maxq, f=f, g=g), G) < _out_err(w, rtn_kernel(w, maxq, f=f, g=g), G)
        applied = better & allow
        w = jnp.where(applied, wc, w)
    else:
        applied = jnp.zeros((), bool)
    codes, scales, zeros = pack_kernel(w, maxq, f=f, g=g)
    return rtn_kernel(w, maxq, f=f, g=g), codes, scales, zeros, applied


@ptq_jit(static_argnames=("f", "g", "clip"))
def clip_quantize(w, G, allow, ratios, maxq, *, f: QuantFormat, g: int, clip: bool):
    """RTN of the (already scaled) weight ``w[in, out]`` or stack ``w[E, in, out]``, after the clip search
    on its inputs' Gram ``G`` where ``clip`` and ``allow`` (bool, [E] for a stack) hold and the clipped
    form lowers the layer's calibration error. Returns (w_hat, codes, scales, zeros, clip applied)."""
    core = functools.partial(_clip_quantize_one, f=f, g=g, clip=clip)
    w = w.astype(jnp.float32)
    if w.ndim == 3:
        return jax.vmap(core, in_axes=(0, 0, 0, None, None))(w, G, allow, ratios, maxq)
    return core(w, G, allow, ratios, maxq)


def quantize_awq(w, x, *, bits: int, group_size: int = 128, symmetric: bool = False, fmt: str = "int",
                 grid: int = 20, duo_scaling: bool = False, clip: bool = True, clip_grid: int = 20,
                 max_shrink: float = 0.5, return_packed: bool = False):
    """AWQ of one Linear ``w[in, out]`` with calibration inputs ``x[..., in]``, the scale searched on this
    Linear's own output and kept explicit (``w_eff`` includes 1/s).

    Returns ``(w_eff, info)``: ``w_eff = Q(diag(s) w) / s[:, None]`` (same shape, dtype and array kind
    as w) and ``info = {alpha, error, rtn_error, alphas, errors, s, inv_s, clip_applied}`` (plus
    ``clip_error``/``clip_ratio`` with ``clip=True``, ``packed`` with ``return_packed=True``); errors are
    ``||X w - X w_hat||^2`` on the calibration inputs, ``errors`` one per α of ``alphas``.
    """
    check_weight(w)
    if w.ndim != 2:
        raise ValueError(f"AWQ quantizes one [in, out] matrix at a time, got shape {w.shape}")
    n_in = w.shape[0]
    if getattr(x, "ndim", 0) < 1 or x.shape[-1] != n_in:
        raise ValueError(f"x must be [..., {n_in}] for a weight of shape {tuple(w.shape)}, "
                         f"got {getattr(x, 'shape', None)}")
    f = make_format(bits, fmt, symmetric)
    g = resolve_group_size(group_size, n_in)
    alphas = alpha_grid(grid)
    ratios = clip_ratios(clip_grid, max_shrink) if clip else None
    dt = _compute_dtype(w)
    wc = to_compute(w, dt)
    x2d = x.reshape(-1, n_in)
    sx, G = _stats(to_compute(pad_tokens(x2d), dt), jnp.asarray(x2d.shape[0], dt))
    w_mean = weight_mean([wc], g).astype(dt) if duo_scaling else None

    fs, maxq = kernel_format(f)
    errors = np.asarray(_search(wc, G, sx, w_mean, jnp.asarray(alphas, dt), maxq, f=fs, g=g), dtype=np.float64)
    k = int(np.argmin(errors))  # first minimum: ties go to the smaller α (α = 0 is RTN)
    alpha = float(alphas[k])
    s = _scale(sx, jnp.asarray(alpha, dt), w_mean)
    s_np = np.asarray(s)
    inv_s_np = (np.ones((), s_np.dtype) / s_np).astype(s_np.dtype)  # correctly rounded (XLA's CPU divide is not)
    inv_s = jnp.asarray(inv_s_np)[:, None]
    ws = wc * s[:, None]
    w_eff = rtn_jit(ws, f, g) * inv_s
    error = float(_out_err(wc, w_eff, G))
    rtn_error = float(_out_err(wc, rtn_jit(wc, f, g), G))

    info = {"alpha": alpha, "error": error, "rtn_error": rtn_error, "alphas": alphas, "errors": errors,
            "s": s_np, "inv_s": inv_s_np, "clip_applied": False}
    if clip:
        Gs = G / (s[:, None] * s[None, :])
        ws_clip, ratio = _clip_search(ws, Gs, jnp.asarray(ratios, dt), maxq, f=fs, g=g)
        w_eff_clip = rtn_jit(ws_clip, f, g) * inv_s
        error_clip = float(_out_err(wc, w_eff_clip, G))
        info["clip_error"] = error_clip
        if error_clip < error:
            ws, w_eff, info["error"], info["clip_applied"] = ws_clip, w_eff_clip, error_clip, True
            info["clip_ratio"] = np.asarray(ratio)
    if return_packed:
        codes, scales, zeros = _pack_jit(ws.astype(jnp.float32), f, g)
        info["packed"] = Packed(np.asarray(codes), np.asarray(scales), np.asarray(zeros) if f.has_zero_point else None)
    return cast_like(w_eff, w), info
