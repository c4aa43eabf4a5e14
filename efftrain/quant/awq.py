"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv 2306.00978 §3).

For ``y = x @ w``, ``w[in, out]``, calibration inputs ``X[n, in]``:

* §3.2 "Protecting salient weights by activation-aware scaling": scale input channel i by ``s_i`` before
  rounding and fold ``1/s_i`` into the input, ``y ≈ (x / s) @ Q(diag(s) w)``. The scale is searched
  (eq. 4-5)::

      s_x   = mean_tokens |x|                               (per input channel)
      s(α)  = max(s_x^α, 1e-4) / sqrt(max(.) · min(.))      (the reference code's normalisation)
      α*    = argmin_{α in grid} || X w - X · Q(diag(s) w) / s[:, None] ||^2

  with ``Q`` = RTN (efftrain.quant.rtn, any format) and α on ``linspace(0, 1, grid)`` (the reference
  uses ``i / grid``, i < grid; we include both ends). α = 0 gives s = 1, i.e. exactly RTN, so the chosen
  error is never above RTN's on the calibration set. The error is measured per linear layer, through
  the Gram matrix ``X^T X`` (no activation tensor of size [n, out] is formed).

* Output: the EFFECTIVE dequantized weight ``w_eff = Q(diag(s) w) / s[:, None]``, a drop-in
  replacement since ``x @ w_eff = (x / s) @ Q(diag(s) w)``; ``info['s']`` holds s for a deployment
  that folds 1/s into the previous op, and ``return_packed`` the codes of ``Q(diag(s) w)``. The
  division is done as a product with ``info['inv_s'] = 1/s`` (correctly rounded float32), so
  ``unpack(*info['packed'], ...) * info['inv_s'][:, None] == w_eff`` exactly.

* Optional clipping (``clip=True``; AWQ code's ``auto_clip``, §3.3 "search to better clip"): on the
  scaled weight ``w' = diag(s) w`` with inputs ``x / s``, per group and output channel, the clip range
  ``±r · max|w'_G|`` is searched over ``r = 1 - k/clip_grid · max_shrink`` (k < clip_grid) to minimise
  that group's share of the output error ``d^T X_G^T X_G d`` (``d = w'_G - Q(clip(w'_G))``, the
  reference's per-group approximation). The clipped result is kept only if it lowers the full-layer
  calibration error (a guard the reference does not have); ``info['clip_applied']`` says whether.

One jitted XLA program for the α grid (``lax.map``), float32 (float64 for float64 input under jax x64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .formats import (
    Packed,
    QuantFormat,
    _check_weight,
    _compute_dtype,
    _fake_quant,
    _kernel_format,
    _like,
    _pack_jit,
    _pad_tokens,
    _rtn_jit,
    _rtn_kernel,
    _to_compute,
    make_format,
    resolve_group_size,
)

__all__ = ["quantize_awq"]

_HIGHEST = lax.Precision.HIGHEST


@jax.jit
def _stats(x, n_tokens):
    """mean |x| per input channel and the Gram matrix X^T X (x may carry zero padding rows)."""
    return jnp.sum(jnp.abs(x), axis=0) / n_tokens, jnp.matmul(x.T, x, precision=_HIGHEST)


@jax.jit
def _scale(sx, alpha):
    s = jnp.maximum(sx**alpha, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@jax.jit
def _out_err(w, w_hat, G):
    """||X (w - w_hat)||^2 = sum(D * (X^T X) D)."""
    d = w - w_hat
    return jnp.sum(d * jnp.matmul(G, d, precision=_HIGHEST))


@functools.partial(jax.jit, static_argnames=("f", "g"))
def _search(w, G, sx, alphas, maxq, *, f: QuantFormat, g: int):
    def one(alpha):
        s = _scale(sx, alpha)[:, None]
        return _out_err(w, _rtn_kernel(w * s, maxq, f=f, g=g) / s, G)

    return lax.map(one, alphas)


@functools.partial(jax.jit, static_argnames=("f", "g", "clip_grid"))
def _clip_search(ws, Gs, max_shrink, maxq, *, f: QuantFormat, g: int, clip_grid: int):
    n_in, n_out = ws.shape
    ng = n_in // g
    wg = ws.reshape(ng, g, n_out)
    ar = jnp.arange(ng)
    Gb = Gs.reshape(ng, g, ng, g)[ar, :, ar, :]  # diagonal blocks [ng, g, g]
    amax = jnp.max(jnp.abs(wg), axis=1, keepdims=True)
    ratios = 1 - jnp.arange(clip_grid, dtype=ws.dtype) / clip_grid * max_shrink

    def one(r):
        mv = amax * r
        d = wg - _fake_quant(jnp.clip(wg, -mv, mv), f, axis=1, maxq=maxq)
        return jnp.sum(d * jnp.einsum("kij,kjo->kio", Gb, d, precision=_HIGHEST), axis=1)  # [ng, out]

    errs = lax.map(one, ratios)
    best = ratios[jnp.argmin(errs, axis=0)]  # [ng, out]
    mv = amax * best[:, None, :]
    return jnp.clip(wg, -mv, mv).reshape(n_in, n_out), best


def quantize_awq(w, x, *, bits: int, group_size: int = 128, symmetric: bool = False, fmt: str = "int",
                 grid: int = 20, clip: bool = False, clip_grid: int = 20, max_shrink: float = 0.5,
                 return_packed: bool = False):
    """AWQ of ``w[in, out]`` with calibration inputs ``x[..., in]``.

    Returns ``(w_eff, info)``: ``w_eff = Q(diag(s) w) / s[:, None]`` (same shape, dtype and array kind
    as w) and ``info = {alpha, error, rtn_error, alphas, errors, s, inv_s, clip_applied}`` (plus
    ``clip_error``/``clip_ratio`` with ``clip=True``, ``packed`` with ``return_packed=True``); errors are
    ``||X w - X w_hat||^2`` on the calibration inputs, ``errors`` one per α of ``alphas``.
    """
    _check_weight(w)
    if w.ndim != 2:
        raise ValueError(f"AWQ quantizes one [in, out] matrix at a time, got shape {w.shape}")
    n_in = w.shape[0]
    if getattr(x, "ndim", 0) < 1 or x.shape[-1] != n_in:
        raise ValueError(f"x must be [..., {n_in}] for a weight of shape {tuple(w.shape)}, "
                         f"got {getattr(x, 'shape', None)}")
    f = make_format(bits, fmt, symmetric)
    g = resolve_group_size(group_size, n_in)
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 1:
        raise ValueError(f"grid must be a positive int, got {grid!r}")
    if clip and (int(clip_grid) < 1 or not 0 <= max_shrink < 1):
        raise ValueError(f"clip needs clip_grid >= 1 and 0 <= max_shrink < 1, got {clip_grid}, {max_shrink}")
    dt = _compute_dtype(w)
    wc = _to_compute(w, dt)
    x2d = x.reshape(-1, n_in)
    sx, G = _stats(_to_compute(_pad_tokens(x2d), dt), jnp.asarray(x2d.shape[0], dt))

    alphas = np.linspace(0.0, 1.0, int(grid)) if grid > 1 else np.zeros(1)
    fs, maxq = _kernel_format(f)
    errors = np.asarray(_search(wc, G, sx, jnp.asarray(alphas, dt), maxq, f=fs, g=g), dtype=np.float64)
    k = int(np.argmin(errors))  # first minimum: ties go to the smaller α (α = 0 is RTN)
    alpha = float(alphas[k])
    s = _scale(sx, jnp.asarray(alpha, dt))
    s_np = np.asarray(s)
    inv_s_np = (np.ones((), s_np.dtype) / s_np).astype(s_np.dtype)  # correctly rounded (XLA's CPU divide is not)
    inv_s = jnp.asarray(inv_s_np)[:, None]
    ws = wc * s[:, None]
    w_eff = _rtn_jit(ws, f, g) * inv_s
    error = float(_out_err(wc, w_eff, G))
    rtn_error = float(_out_err(wc, _rtn_jit(wc, f, g), G))

    info = {"alpha": alpha, "error": error, "rtn_error": rtn_error, "alphas": alphas, "errors": errors,
            "s": s_np, "inv_s": inv_s_np, "clip_applied": False}
    if clip:
        Gs = G / (s[:, None] * s[None, :])
        ws_clip, ratio = _clip_search(ws, Gs, jnp.asarray(max_shrink, dt), maxq, f=fs, g=g,
                                      clip_grid=int(clip_grid))
        w_eff_clip = _rtn_jit(ws_clip, f, g) * inv_s
        error_clip = float(_out_err(wc, w_eff_clip, G))
        info["clip_error"] = error_clip
        if error_clip < error:
            ws, w_eff, info["error"], info["clip_applied"] = ws_clip, w_eff_clip, error_clip, True
            info["clip_ratio"] = np.asarray(ratio)
    if return_packed:
        codes, scales, zeros = _pack_jit(ws.astype(jnp.float32), f, g)
        info["packed"] = Packed(np.asarray(codes), np.asarray(scales), np.asarray(zeros) if f.has_zero_point else None)
    return _like(w_eff, w), info
