"""BiLLM: 1-bit post-training quantization (Huang et al. 2024, arXiv 2402.04291 §3, Algorithm 1; the
authors' code github.com/Aaronhuang-778/BiLLM, `bigptq.py`, `binary.py`, `utils/autosearch.py`).

Layout as in efftrain.quant.gptq: ``y = x @ w``, ``w[in, out]``, ``H = 2 XᵀX [in, in]``; the paper's
*columns* (weights sharing one input channel) are our INPUT ROWS, its rows our output columns.

Binarization of a masked set of weights (per output column, over the masked input rows of one block;
the reference `high_order_residual`, with the mean shift of its "braq" method):

    μ = mean(w),  α = mean|w − μ|,  b(w) = α·sign(w − μ) + μ                  (`mean_shift=False`: μ = 0,
    the paper's eq. 1, α = ‖W‖₁/m)
    residual (order 2, eq. 5-6): B₁ = b(w), B₂ = b(w − B₁), ŵ = B₁ + B₂

Per block of β = `block` input rows (Algorithm 1), with U the upper Cholesky factor of the dampened
inverse Hessian, (H + λI)⁻¹ = UᵀU, λ = damp·mean(diag H), dead inputs (H_ii = 0) zeroed as in GPTQ:

  1. salience (eq. 4) s_j = Σ_out w_j² / [H⁻¹]²_jj per input row j of the block. The paper's [H⁻¹]_jj is
     the reference code's `Hinv`, i.e. U_jj (so [H⁻¹]²_jj = U_jj² = the OBS denominator [H_F⁻¹]_jj of the
     rows not yet quantized);
  2. structured selection (§3.1): the k rows of largest salience Σ_out s are salient, k ∈ {1, ...,
     max_salient} (the reference's `range(1, up_lim)`, up_lim = 50), chosen by minimising
     ‖T_b − (res₂(T_salient) + res₂(T_rest))‖²; the salient rows get residual (2-pass) binarization;
  3. bell-shaped splitting (§3.2): among the non-salient weights a break-point p, searched over the
     10th, 11th, ..., 90th percentiles of their |T| (81 candidates), splits the concentrated |T| < p from
     the sparse |T| ≥ p weights, p = argmin ‖T_c − b(T_c)‖² + ‖T_s − b(T_s)‖²; each group of *weights*
     is binarized once (order 1) with its own α, μ per output column;
  4. error compensation (OBC, as GPTQ's lazy batch update): the block is quantized as a whole, then the
     later rows absorb its error Δ = W_b − Ŵ_b [β, out]: W_rest ← W_rest − U_b,restᵀ E with
         E = Δ / diag(U_bb)             (the reference; `exact_compensation=False`, the default), or
         E = U_bbᵀ⁻¹ Δ, a triangular solve (`exact_compensation=True`), which makes the update
         W_rest + H_rr⁻¹ H_r,b Δ: the least-squares best later rows for a block fixed at once (the
         OBS optimum; the diagonal E ignores the coupling inside the block; on random problems neither
         gives the consistently lower final error, as the later rows are binarized in turn).

What T is (`search`): 'salience' (default), the reference code's choice — autosearch.py runs both
searches on the salience matrix T = w²/U_jj² (and splits the groups by it; within an input row that is
the order of |w|); 'weights': T = W, the paper's objective as written (eqs. 5, 9). On a Gaussian weight
with a random Hessian the reference search keeps few salient rows (eff_bits ≈ 1.05) while the weight
search takes about a third of them (≈ 1.3 bits, lower error). Scales stay float32 (as the reference);
they are charged 16 bits each below.

Bits per weight (what `quantize_billm` returns as eff_bits), the paper's accounting ("N_param"; ~1.08
reported for LLaMA/OPT):
    eff_bits = 1 + r + 1/out,   r = salient rows / in (their second binary plane), 1/out = the
    salient-row bitmap (one bit per input row of the matrix)
The paper does not count two more costs, reported separately (`storage_bits`, info of
`quantize_billm(return_info=True)`; efftrain.quant.apply charges this one as the row's eff_bits, like
every other method's scales and zero points):
    + (1 − r)                 the group bitmap: one bit per non-salient weight says concentrated or sparse
                              (the authors count it as a hardware flag, compressed in their memory table;
                              BiLLM issue #23)
    + n_scales·16/β           float16 α (and μ) per output column and block: salient 2 planes + 2 groups,
                              n_scales = 8 with the mean shift, 4 without (β = 128: 1.0 or 0.5 bits)
e.g. β = 128, r = 0.08: eff_bits ≈ 1.08, storage_bits ≈ 3.0 (mean shift) or 2.5.

Implementation: one jitted XLA program per matrix shape and option set (like gptq_on_device):
``lax.fori_loop`` over blocks, the k and p searches as ``lax.map`` over the candidates; a stack
``[E, in, out]`` with Hessians ``[E, in, in]`` (MoE experts) runs as one vmapped program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from efftrain.xla import ptq_jit

from .formats import cast_like, check_weight, to_compute

__all__ = ["quantize_billm", "billm_on_device", "residual_binarize", "obc_update", "binarize_sign_mean"]

_HIGHEST = lax.Precision.HIGHEST
MAX_SALIENT = 49  # the reference searches k in range(1, up_lim) with up_lim = 50
BREAKPOINT_PERCENTILES = np.linspace(0.10, 0.90, 81)  # the reference's split candidates
SEARCH_TARGETS = ("salience", "weights")
SEARCH_BATCH = 8  # candidates evaluated together inside lax.map


def residual_binarize(w: jax.Array, mask: jax.Array, order: int, mean_shift: bool = True) -> jax.Array:
    """Σ of `order` binary planes approximating w where mask (zero elsewhere): plane i binarizes the
    residual left by planes < i per output column (axis 0 = input rows), α·sign(r − μ) + μ."""
    w = w.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(mask, axis=0), 1).astype(jnp.float32)
    approx = jnp.zeros_like(w)
    for _ in range(order):
        r = jnp.where(mask, w - approx, 0.0)
        mu = jnp.sum(r, axis=0) / n if mean_shift else jnp.zeros_like(n)
        centred = jnp.where(mask, r - mu, 0.0)
        alpha = jnp.sum(jnp.abs(centred), axis=0) / n
        approx = approx + jnp.where(mask, alpha * jnp.sign(centred) + mu, 0.0)
    return approx


def binarize_sign_mean(w: jax.Array, block: int) -> jax.Array:
    """Plain binarization sign(w)·mean|w| per output column and block of input rows (the baseline)."""
    n_in, n_out = w.shape
    wb = jnp.asarray(w, jnp.float32).reshape(n_in // block, block, n_out)
    return (jnp.sign(wb) * jnp.mean(jnp.abs(wb), axis=1, keepdims=True)).reshape(n_in, n_out)


def _sq(x):
    return jnp.sum(jnp.square(x))


def _binarize_block(wb: jax.Array, u_diag: jax.Array, *, max_salient: int, mean_shift: bool, search: str):
    """BiLLM's steps 1-3 on one block wb [β, out]: (ŵ_b, number of salient rows). The k and p searches
    binarize `target` (the weights, or the reference code's salience matrix w²/U_jj²)."""
    beta = wb.shape[0]
    salience = jnp.square(wb) / jnp.square(u_diag)[:, None]  # [β, out]
    target = salience if search == "salience" else wb
    rank = jnp.argsort(jnp.argsort(-jnp.sum(salience, axis=1), stable=True), stable=True)  # 0: most salient row
    ks = jnp.arange(1, min(max_salient, beta - 1) + 1)

    def salient_mask(k):
        return jnp.broadcast_to((rank < k)[:, None], wb.shape)

    def split_error(k):
        m = salient_mask(k)
        approx = residual_binarize(target, m, 2, mean_shift) + residual_binarize(target, ~m, 2, mean_shift)
        return _sq(target - approx)

    k = ks[jnp.argmin(lax.map(split_error, ks, batch_size=SEARCH_BATCH))]
    salient = salient_mask(k)
    rest = ~salient
    size = jnp.abs(target)
    cuts = jnp.nanquantile(jnp.where(rest, size, jnp.nan), jnp.asarray(BREAKPOINT_PERCENTILES, jnp.float32))

    def groups(p):
        return rest & (size < p), rest & (size >= p)

    def group_error(p):
        concentrated, sparse = groups(p)
        approx = (residual_binarize(target, concentrated, 1, mean_shift)
                  + residual_binarize(target, sparse, 1, mean_shift))
        return _sq(jnp.where(rest, target - approx, 0.0))

    concentrated, sparse = groups(cuts[jnp.argmin(lax.map(group_error, cuts, batch_size=SEARCH_BATCH))])
    q = (residual_binarize(wb, salient, 2, mean_shift) + residual_binarize(wb, concentrated, 1, mean_shift)
         + residual_binarize(wb, sparse, 1, mean_shift))
    return q, k


def obc_update(W: jax.Array, U: jax.Array, i1, beta: int, delta: jax.Array, exact: bool = True) -> jax.Array:
    """W with the rows after block [i1, i1+β) compensated for the block's error delta = W_b − Ŵ_b
    (module docstring, step 4). Rows up to i1+β change too (they are done: the caller keeps Ŵ)."""
    u_rows = lax.dynamic_slice_in_dim(U, i1, beta, 0)  # [β, in]; zero left of the block (U is upper)
    u_bb = lax.dynamic_slice_in_dim(u_rows, i1, beta, 1)
    if exact:
        err = jax.scipy.linalg.solve_triangular(u_bb, delta, trans="T", lower=False)
    else:
        err = delta / jnp.diagonal(u_bb)[:, None]
    return W - jnp.matmul(u_rows.T, err, precision=_HIGHEST)


@ptq_jit(static_argnames=("beta", "max_salient", "mean_shift", "exact", "search"))
def _billm_core(W, H, damp, *, beta: int, max_salient: int, mean_shift: bool, exact: bool, search: str):
    n_in, n_out = W.shape
    eye = jnp.eye(n_in, dtype=W.dtype)
    dead = jnp.diagonal(H) == 0
    H = H + jnp.diag(dead.astype(W.dtype))
    W = jnp.where(dead[:, None], 0, W)
    H = H + damp * jnp.mean(jnp.diagonal(H)) * eye
    Hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(H), True), eye)
    U = jnp.triu(jnp.linalg.cholesky(Hinv).T)  # upper, H^-1 = UᵀU
    ok = jnp.all(jnp.isfinite(U))
    u_diag = jnp.diagonal(U)

    def block(b, carry):
        W, Q, salient = carry
        i1 = b * beta
        wb = lax.dynamic_slice_in_dim(W, i1, beta, 0)
        q, k = _binarize_block(wb, lax.dynamic_slice_in_dim(u_diag, i1, beta), max_salient=max_salient,
                               mean_shift=mean_shift, search=search)
        W = obc_update(W, U, i1, beta, wb - q, exact)
        return W, lax.dynamic_update_slice_in_dim(Q, q, i1, 0), salient + k

    _, Q, salient = lax.fori_loop(0, n_in // beta, block, (W, jnp.zeros_like(W), jnp.zeros((), jnp.int32)))
    r = salient.astype(jnp.float32) / n_in
    paper = 1.0 + r + 1.0 / n_out
    storage = paper + (1.0 - r) + (8 if mean_shift else 4) * 16.0 / beta
    return Q, paper, storage, ok


@ptq_jit(static_argnames=("beta", "max_salient", "mean_shift", "exact", "search"))
def _billm_core_stacked(Ws, Hs, damp, *, beta: int, max_salient: int, mean_shift: bool, exact: bool, search: str):
    core = functools.partial(_billm_core, beta=beta, max_salient=max_salient, mean_shift=mean_shift, exact=exact,
                             search=search)
    return jax.vmap(core, in_axes=(0, 0, None))(Ws, Hs, damp)


def _check(w, H, block: int, damp, max_salient: int, search: str) -> int:
    check_weight(w)
    if w.ndim not in (2, 3):
        raise ValueError(f"BiLLM quantizes one [in, out] matrix or a stack [E, in, out], got shape {w.shape}")
    n_in = w.shape[-2]
    if tuple(H.shape) != (*w.shape[:-2], n_in, n_in):
        raise ValueError(f"Hessian must be {[*w.shape[:-2], n_in, n_in]} for a weight of shape "
                         f"{tuple(w.shape)}, got {tuple(H.shape)}")
    beta = n_in if block == -1 else int(block)
    if beta < 2 or n_in % beta:
        raise ValueError(f"BiLLM block must be -1 (the whole input dim) or an integer >= 2 dividing the "
                         f"input dim {n_in}, got {block}")
    if not (isinstance(damp, (int, float, np.floating)) and damp >= 0):
        raise ValueError(f"damp must be a non-negative number, got {damp!r}")
    if search not in SEARCH_TARGETS:
        raise ValueError(f"BiLLM search must be one of {', '.join(SEARCH_TARGETS)}, got {search!r}")
    if int(max_salient) < 1:
        raise ValueError(f"max_salient must be at least 1, got {max_salient}")
    return beta


def billm_on_device(w, H, *, block: int = 128, damp: float = 0.01, max_salient: int = MAX_SALIENT,
                    mean_shift: bool = True, exact_compensation: bool = False, search: str = "salience"):
    """BiLLM in float32 on the device, no transfer: (ŵ float32, eff_bits, storage_bits, ok) as jax
    arrays (one value per matrix of a stack [E, in, out]); `ok` says whether the dampened Hessian's
    Cholesky factorisation succeeded (the caller checks it)."""
    beta = _check(w, H, block, damp, max_salient, search)
    core = _billm_core if w.ndim == 2 else _billm_core_stacked
    return core(to_compute(w, jnp.float32), to_compute(H, jnp.float32), jnp.asarray(damp, jnp.float32),
                beta=beta, max_salient=int(max_salient), mean_shift=bool(mean_shift),
                exact=bool(exact_compensation), search=search)


def quantize_billm(w, H, block: int = 128, *, damp: float = 0.01, max_salient: int = MAX_SALIENT,
                   mean_shift: bool = True, exact_compensation: bool = False, search: str = "salience",
                   return_info: bool = False):
    """BiLLM of ``w[in, out]`` given ``H = 2 XᵀX [in, in]`` (module docstring): returns (ŵ in w's shape,
    dtype and array kind, eff_bits = the paper's bits per weight), or with `return_info`
    (ŵ, eff_bits, {"storage_bits", "salient_fraction"}). A stack [E, in, out] with [E, in, in] gives one
    eff_bits per matrix. ValueError if the dampened Hessian is not positive definite."""
    Q, paper, storage, ok = billm_on_device(w, H, block=block, damp=damp, max_salient=max_salient,
                                            mean_shift=mean_shift, exact_compensation=exact_compensation,
                                            search=search)
    Q, paper, storage, ok = jax.device_get((Q, paper, storage, ok))
    if not np.all(ok):
        raise ValueError("BiLLM: the dampened Hessian is not positive definite (Cholesky failed); raise damp "
                         "or use more calibration data")
    w_hat = cast_like(jnp.asarray(Q), w)
    eff = float(paper) if np.ndim(paper) == 0 else np.asarray(paper, np.float64)
    if not return_info:
        return w_hat, eff
    n_out = w.shape[-1]
    info = {"storage_bits": float(storage) if np.ndim(storage) == 0 else np.asarray(storage, np.float64),
            "salient_fraction": np.asarray(paper, np.float64) - 1.0 - 1.0 / n_out}
    return w_hat, eff, info
