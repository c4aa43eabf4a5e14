"""GPTQ: second-order weight quantization with error feedback (Frantar et al. 2022, arXiv 2210.17323).

Problem (§3, eq. 1): with calibration inputs ``X[n, in]`` and ``y = x @ w``, ``w[in, out]``, find grid
weights ``W_hat`` minimising ``||X W - X W_hat||^2``; every output column is independent and shares
the Hessian ``H = 2 X^T X`` (``hessian_from_inputs``; sums over batches add up).

Algorithm 1 (§4, "Step 1-3"), with our layout: GPTQ's *columns* are our INPUT rows.

1. dead inputs: ``H_ii = 0`` -> ``H_ii = 1`` and ``W[i, :] = 0`` (the reference code's rule);
2. act-order (optional, §4 note / reference ``--act-order``): process rows by decreasing ``H_ii``
   (permute W's rows and H's rows and columns);
3. dampening: ``H += lambda I``, ``lambda = damp * mean(diag H)`` (``damp`` = "percdamp", 0.01);
4. ``U = chol(H^-1)``, upper (``H^-1 = U^T U``): row i of U holds ``[H_F^-1]_{i,:} / sqrt([H_F^-1]_ii)``
   of the remaining set F, so no inverse is ever updated (§4 "Step 3: Cholesky Reformulation");
5. for each row i in order (§4 "Step 1: Arbitrary Order Insight"): ``q_i = Q(w_i)`` on its group
   grid, ``e_i = (w_i - q_i) / U_ii``, ``w_j -= U_ij e_i`` for all ``j > i`` (OBS update, eq. 2);
6. lazy batches (§4 "Step 2"): the update of step 5 is applied at once only inside a block of
   ``B = block_size`` rows; rows after the block get ``W[i2:] -= U[i1:i2, i2:]^T E`` once per block.
   This is exact algebra, so the result does not depend on ``B`` (up to float rounding).

Groups (§4 "Additional details"/reference ``--groupsize``): a group's scale/zero are computed when the
sweep reaches its first row, from the *current*, error-updated weights of its g rows. We take them from
fully updated weights also when a group starts inside a block (the reference code then reads rows that
still miss the in-block updates; both agree whenever groups start at block starts, e.g. g = B = 128).
The block size is lowered, if needed, to the largest divisor of ``in`` that is <= ``block_size`` and is
a multiple or a divisor of g, so groups never straddle a block boundary the hard way.

act_order with groups (the "static groups" choice): groups stay g consecutive rows in the ORIGINAL
order (so storage is the same layout as RTN: no per-row group index), and their scale/zero are computed
once, before the sweep, from the original weights (after the dead-row zeroing) - the reference code's
``static_groups=True``. Rows are then quantized in act-order, each on its own group's grid. (The
reference default without static groups instead forms groups of g consecutive *permuted* rows, which
needs a g_idx in storage.) Result rows are returned in the original order.

Implementation: one jitted XLA program, ``lax.fori_loop`` over blocks, over the groups of a block and
over the rows of a group, all with static shapes; the in-block update is a rank-1 update of the
``[B, out]`` block, the lazy update one ``[in, B] x [B, out]`` matmul (precision HIGHEST). Runs on
whatever device jax uses (GPU when there is one). ``compute_dtype="float64"`` runs it in float64
(jax x64, enabled locally), which the tests use to match a row-by-row float64 reference exactly.
"""

from __future__ import annotations

import contextlib
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
    kernel_format,
    cast_like,
    pad_tokens,
    to_compute,
    decode,
    encode,
    group_params,
    make_format,
    resolve_group_size,
)

__all__ = ["hessian_from_inputs", "quantize_gptq", "quantize_gptq_from_hessian", "gptq_on_device"]

_HIGHEST = lax.Precision.HIGHEST
_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def _dtype_of(compute_dtype: str):
    if compute_dtype not in _DTYPES:
        raise ValueError(f"compute_dtype must be 'float32' or 'float64', got {compute_dtype!r}")
    return _DTYPES[compute_dtype]


def _precision_ctx(dt):
    """float64 needs jax x64: enable it for this call only (thread-local); float32 changes nothing."""
    return jax.enable_x64(True) if dt == jnp.float64 else contextlib.nullcontext()


@ptq_jit
def _xtx2(x):
    return 2 * jnp.matmul(x.T, x, precision=_HIGHEST)


def hessian_from_inputs(x, *, compute_dtype: str = "float32"):
    """``H = 2 X^T X`` ``[in, in]`` of calibration inputs ``x[..., in]`` (all leading dims are tokens).

    float32: a jax array (stays on the device; matmul precision HIGHEST). float64: a numpy float64
    array, so that sums stay float64 outside jax's x64 mode. Accumulate over batches by adding:
    ``H = H + hessian_from_inputs(x_b)``.
    """
    dt = _dtype_of(compute_dtype)
    if getattr(x, "ndim", 0) < 1:
        raise ValueError("x must be [..., in]")
    with _precision_ctx(dt):
        H = _xtx2(to_compute(pad_tokens(x.reshape(-1, x.shape[-1])), dt))
        return np.asarray(H) if dt == jnp.float64 else H


def _pick_block(n_in: int, g: int, block_size: int) -> int:
    """Largest divisor d of n_in, d <= block_size, with d % g == 0 or g % d == 0."""
    for d in range(min(block_size, n_in), 0, -1):
        if n_in % d == 0 and (d % g == 0 or g % d == 0):
            return d
    return 1


def _sweep(W, U, rows_s, rows_z, maxq, *, f: QuantFormat, g: int, B: int, static: bool):
    """Algorithm 1 over rows 0..in-1 of W (already permuted). Returns dequantized rows, codes and,
    for dynamic groups, the per-group scale/zero [in/g, out]."""
    n_in, n_out = W.shape
    dt = W.dtype
    nb = n_in // B
    L = min(g, B)  # rows between two possible group starts inside a block
    nseg = B // L
    ng = n_in // g

    def row_step(i, s, z, W1, U1, Q1, C1, E1):
        w = lax.dynamic_index_in_dim(W1, i, 0, keepdims=False)
        u = lax.dynamic_index_in_dim(U1, i, 0, keepdims=False)
        code = encode(w, s, z, f, maxq)
        q = decode(code, s, z, f)
        err = (w - q) / lax.dynamic_index_in_dim(u, i, 0, keepdims=False)
        W1 = W1 - u[:, None] * err[None, :]  # U1 is upper triangular: rows < i are untouched
        Q1 = lax.dynamic_update_index_in_dim(Q1, q, i, 0)
        C1 = lax.dynamic_update_index_in_dim(C1, code, i, 0)
        E1 = lax.dynamic_update_index_in_dim(E1, err, i, 0)
        return W1, Q1, C1, E1

    def block(b, carry):
        W, Q, C, S, Z, cs, cz = carry
        i1 = b * B
        W1 = lax.dynamic_slice_in_dim(W, i1, B, 0)
        U1 = lax.dynamic_slice(U, (i1, i1), (B, B))
        if not static and g > B:  # a group spans several blocks: it starts at a block start

            def new_group():
                s, z = group_params(lax.dynamic_slice_in_dim(W, i1, g, 0), f, axis=0, maxq=maxq)
                return (s[0], z[0], lax.dynamic_update_slice_in_dim(S, s, i1 // g, 0),
                        lax.dynamic_update_slice_in_dim(Z, z, i1 // g, 0))

            cs, cz, S, Z = lax.cond(i1 % g == 0, new_group, lambda: (cs, cz, S, Z))

        def segment(k, c):
            W1, Q1, C1, E1, cs, cz, S, Z = c
            j0 = k * L
            if not static and g <= B:  # every segment is one whole group, inside this block
                s, z = group_params(lax.dynamic_slice_in_dim(W1, j0, g, 0), f, axis=0, maxq=maxq)
                cs, cz = s[0], z[0]
                S = lax.dynamic_update_slice_in_dim(S, s, (i1 + j0) // g, 0)
                Z = lax.dynamic_update_slice_in_dim(Z, z, (i1 + j0) // g, 0)

            def row(j, c2):
                i = j0 + j
                if static:
                    s = lax.dynamic_index_in_dim(rows_s, i1 + i, 0, keepdims=False)
                    z = lax.dynamic_index_in_dim(rows_z, i1 + i, 0, keepdims=False)
                else:
                    s, z = cs, cz
                W1, Q1, C1, E1 = c2
                return row_step(i, s, z, W1, U1, Q1, C1, E1)

            W1, Q1, C1, E1 = lax.fori_loop(0, L, row, (W1, Q1, C1, E1))
            return W1, Q1, C1, E1, cs, cz, S, Z

        zeros_blk = jnp.zeros((B, n_out), dt)
        W1, Q1, C1, E1, cs, cz, S, Z = lax.fori_loop(
            0, nseg, segment, (W1, zeros_blk, jnp.zeros((B, n_out), jnp.int32), zeros_blk, cs, cz, S, Z))
        Q = lax.dynamic_update_slice_in_dim(Q, Q1, i1, 0)
        C = lax.dynamic_update_slice_in_dim(C, C1, i1, 0)
        # lazy batch update of all later rows (rows <= i2 get garbage/zero: U is upper, they are done)
        U_rows = lax.dynamic_slice_in_dim(U, i1, B, 0)  # [B, in]
        W = W - jnp.matmul(U_rows.T, E1, precision=_HIGHEST)
        return W, Q, C, S, Z, cs, cz

    init = (W, jnp.zeros_like(W), jnp.zeros((n_in, n_out), jnp.int32), jnp.zeros((ng, n_out), dt),
            jnp.zeros((ng, n_out), dt), jnp.zeros((n_out,), dt), jnp.zeros((n_out,), dt))
    _, Q, C, S, Z, _, _ = lax.fori_loop(0, nb, block, init)
    return Q, C, S, Z


@ptq_jit(static_argnames=("f", "g", "B", "act_order"))
def _gptq_core(W, H, damp, maxq, *, f: QuantFormat, g: int, B: int, act_order: bool):
    n_in, n_out = W.shape
    dt = W.dtype
    eye = jnp.eye(n_in, dtype=dt)
    d = jnp.diagonal(H)
    dead = d == 0
    H = H + jnp.diag(jnp.where(dead, 1, 0).astype(dt))  # H_ii = 0 -> 1
    W = jnp.where(dead[:, None], 0, W)
    ng = n_in // g
    rows_s = rows_z = None
    if act_order:
        s_st, z_st = group_params(W.reshape(ng, g, n_out), f, axis=1, maxq=maxq)  # static groups, original order
        s_st, z_st = s_st[:, 0], z_st[:, 0]
        perm = jnp.argsort(-jnp.diagonal(H), stable=True)
        W = W[perm]
        H = H[perm][:, perm]
        rows_s, rows_z = s_st[perm // g], z_st[perm // g]
    H = H + damp * jnp.mean(jnp.diagonal(H)) * eye
    L = jnp.linalg.cholesky(H)
    Hinv = jax.scipy.linalg.cho_solve((L, True), eye)
    U = jnp.triu(jnp.linalg.cholesky(Hinv).T)  # upper, H^-1 = U^T U
    ok = jnp.all(jnp.isfinite(U))
    Q, C, S, Z = _sweep(W, U, rows_s, rows_z, maxq, f=f, g=g, B=B, static=act_order)
    if act_order:
        inv = jnp.argsort(perm)
        Q, C, S, Z = Q[inv], C[inv], s_st, z_st
    return Q, C.astype(jnp.uint8), S.astype(jnp.float16), Z.astype(jnp.float16), ok


@ptq_jit(static_argnames=("f", "g", "B", "act_order"))
def _gptq_core_stacked(Ws, Hs, damp, maxq, *, f: QuantFormat, g: int, B: int, act_order: bool):
    """``_gptq_core`` over a stack ``[E, in, out]`` of matrices with their own Hessians ``[E, in, in]``:
    one program whose row loop runs once for all E (MoE experts), not E times."""
    core = functools.partial(_gptq_core, f=f, g=g, B=B, act_order=act_order)
    return jax.vmap(core, in_axes=(0, 0, None, None))(Ws, Hs, damp, maxq)


def _check_gptq_args(w, H, group_size, damp, block_size):
    check_weight(w)
    if w.ndim not in (2, 3):
        raise ValueError(f"GPTQ quantizes one [in, out] matrix or a stack [E, in, out] of them, "
                         f"got shape {w.shape}")
    n_in = w.shape[-2]
    if tuple(H.shape) != (*w.shape[:-2], n_in, n_in):
        raise ValueError(f"Hessian must be {[*w.shape[:-2], n_in, n_in]} for a weight of shape "
                         f"{tuple(w.shape)}, got {tuple(H.shape)}")
    g = resolve_group_size(group_size, n_in)
    if not (isinstance(damp, (int, float, np.floating)) and damp >= 0):
        raise ValueError(f"damp must be a non-negative number, got {damp!r}")
    if int(block_size) < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    return g


def gptq_on_device(w, H, *, bits: int, group_size: int = 128, damp: float = 0.01, act_order: bool = False,
                   symmetric: bool = False, fmt: str = "int", block_size: int = 128):
    """``quantize_gptq_from_hessian`` in float32 without any transfer to the host: returns the jax arrays
    ``(w_hat float32, codes uint8, scales float16, zeros float16, ok)``, where ``ok`` (bool, one per
    matrix of a stack) says whether the dampened Hessian's Cholesky factorisation succeeded; the caller
    checks it (efftrain.quant.apply checks all of a model's at the end, so layers never wait on the host)."""
    f = make_format(bits, fmt, symmetric)
    g = _check_gptq_args(w, H, group_size, damp, block_size)
    B = _pick_block(w.shape[-2], g, int(block_size))
    fs, maxq = kernel_format(f)
    core = _gptq_core if w.ndim == 2 else _gptq_core_stacked
    return core(to_compute(w, jnp.float32), to_compute(H, jnp.float32), jnp.asarray(damp, jnp.float32), maxq,
                f=fs, g=g, B=B, act_order=bool(act_order))


def not_positive_definite(ok, stacked: bool) -> str:
    """The error message for failed Cholesky factorisations (``ok``: numpy bool per matrix)."""
    which = f" for matrices {np.flatnonzero(~ok).tolist()} of the stack" if stacked else ""
    return (f"GPTQ: the dampened Hessian is not positive definite{which} (Cholesky failed); raise damp or "
            "use more calibration data")


def quantize_gptq_from_hessian(w, H, *, bits: int, group_size: int = 128, damp: float = 0.01,
                               act_order: bool = False, symmetric: bool = False, fmt: str = "int",
                               block_size: int = 128, compute_dtype: str = "float32",
                               return_packed: bool = False):
    """GPTQ of ``w[in, out]`` given ``H = 2 X^T X`` ``[in, in]`` (any positive multiple works too).

    A stack ``w[E, in, out]`` with ``H[E, in, in]`` quantizes E independent matrices (e.g. the routed
    experts of an MoE layer) in one program. Returns the dequantized weight (same shape, dtype and
    array kind as ``w``, rows in the original order), or ``(w_hat, Packed)`` with
    ``return_packed=True`` (``unpack`` of it equals ``w_hat``; stacked arrays for a stack).
    """
    f = make_format(bits, fmt, symmetric)
    g = _check_gptq_args(w, H, group_size, damp, block_size)
    dt = _dtype_of(compute_dtype)
    B = _pick_block(w.shape[-2], g, int(block_size))
    with _precision_ctx(dt):
        fs, maxq = kernel_format(f)
        core = _gptq_core if w.ndim == 2 else _gptq_core_stacked
        Q, C, S, Z, ok = core(to_compute(w, dt), to_compute(H, dt), jnp.asarray(damp, dt), maxq,
                              f=fs, g=g, B=B, act_order=bool(act_order))
        ok = np.asarray(ok)
        if not ok.all():
            raise ValueError(not_positive_definite(ok, w.ndim == 3))
    w_hat = cast_like(Q, w)
    if not return_packed:
        return w_hat
    packed = Packed(np.asarray(C), np.asarray(S), np.asarray(Z) if f.has_zero_point else None)
    return w_hat, packed


def quantize_gptq(w, x, *, bits: int, group_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  symmetric: bool = False, fmt: str = "int", block_size: int = 128,
                  compute_dtype: str = "float32", return_packed: bool = False):
    """GPTQ of ``w[in, out]`` with calibration inputs ``x[..., in]`` (``H = 2 X^T X``); see
    ``quantize_gptq_from_hessian`` for the options and the return value."""
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} input channels but w has {w.shape[0]} rows")
    H = hessian_from_inputs(x, compute_dtype=compute_dtype)
    return quantize_gptq_from_hessian(w, H, bits=bits, group_size=group_size, damp=damp, act_order=act_order,
                                      symmetric=symmetric, fmt=fmt, block_size=block_size,
                                      compute_dtype=compute_dtype, return_packed=return_packed)

