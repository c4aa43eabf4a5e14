"""Simulated FP8 GEMMs (`fp8_matmul`) and the choice of the implementation that computes each part.

Layer 4 of efftrain.fp8 (formats -> scaling -> kernels -> matmul -> linear): the XLA reference of the
accumulator model, and the dispatch between it, the XLA quantizer of efftrain/fp8/scaling.py and the
GPU kernels (efftrain/fp8/kernels.py: Triton; efftrain/fp8/mosaic.py: Mosaic GPU).

Accumulation (DeepSeek-V3, arXiv 2412.19437, §3.3.2 "increasing accumulation precision", Fig. 7b)
  C[m,n] = Σ_k A[m,k] B[k,n] ≈ Σ_k qa[m,k] sa[m,k] · qb[k,n] sb[k,n]  (s = the scale of the element's block)
  Hopper's FP8 MMA keeps only ~14 mantissa bits when it adds aligned products into its accumulator. Model:
      p_j   = Σ_{k in K-step j} qa·qb                    (k_step = 32 products, summed exactly)
      acc   ← round_b(acc + p_j)                         (b = accum_bits mantissa bits, truncate or RNE)
      every promote_every (N_C = 128) elements of K:  C ← C + acc · sa·sb  (FP32, CUDA cores);  acc ← 0
  When the scaling blocks along K are a multiple of the promotion interval (1×128 / 128×128 with
  N_C = 128, the V3 recipe) the scales are applied at promotion, as V3 does; otherwise (no promotion,
  or blocks finer than N_C) each K-step's p_j is scaled before it enters the accumulator. A K-step
  never straddles a scaling block: K-blocks must be multiples of k_step (else ValueError), and K is
  zero-padded to whole promotion windows (zero steps add nothing). The "exact" within-step sum is
  computed as a float32 matmul of the quantized values (products of FP8 values are exact; the float32
  sum of 32 of them is exact to 2^-24 relative, far below the 2^-14 being simulated).
  accum_bits=None is exact FP32 accumulation: the operands are dequantized (q · s) and multiplied in one
  ordinary matmul, which equals the blockwise-scaled sum up to FP32 rounding for any block shapes.

The accumulation model has three implementations of the same maths:
  * 'mosaic' (default on Hopper GPUs, efftrain/fp8/mosaic.py): two accumulators per warpgroup in
    ping-pong, so one accumulator's MMA overlaps the other's rounding (2.3-2.7x a bf16 GEMM on an
    H100). The MMA adds the products straight into the accumulator (and the compiler may fuse the
    promotion's multiply-add into an FMA), so about half of the outputs differ from 'xla' in the last
    bits (≤ 4.4e-6 of Σ|a||b| on an H100, the Triton kernel's bound too).
  * 'pallas' (default on other GPUs, efftrain/fp8/kernels.py): one Triton program per output tile;
    the per-step rounding serializes the MMAs (2.8-3.3x a bf16 GEMM on an H100). Bit-identical to
    'xla' through Pallas' interpreter on CPU; on an H100 ~1e-4 of outputs differ by one accumulator ulp.
  * 'xla' (CPU; reference): lax.scan over promotion windows; each window's per-step partial products
    ([k_steps_per_window, M, N] float32, one batched einsum) go through the unrolled recurrence, so
    memory is bounded by one window, not by K. Memory-bound: several times a bf16 matmul on a GPU.

Which implementation runs is a `KernelChoice`, made from FP8Config's fields (`KernelChoice.of(cfg)`):
fp8.quantize_impl (the one-pass Pallas quantizer on GPU, or XLA), fp8.native_casts (Triton's e4m3
convert in it), fp8.accumulate_impl (the accumulator model's kernel) and fp8.pallas_* (the Triton
kernel's tiling); an explicit `impl` argument overrides the first two. `kernels_in_effect(cfg)` is
what a config resolves to on this backend, for run.json.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from efftrain.fp8.formats import float_format, operand_dtype, round_mantissa
from efftrain.fp8.kernels import PallasBlock, pallas_accumulation, pallas_quantize
from efftrain.fp8.mosaic import accumulate as mosaic_accumulate
from efftrain.fp8.mosaic import supported as mosaic_supported
from efftrain.fp8.scaling import (KERNEL_BLOCKS, KERNEL_TILE, Block, Chain, dequantize, quantize, resolve_block,
                                   xla_quantize_many)
from efftrain.xla import on_gpu

QUANTIZE_IMPLS = ("auto", "xla")
ACCUMULATE_IMPLS = ("auto", "pallas", "xla")


@dataclasses.dataclass(frozen=True)
class KernelChoice:
    """Which implementation computes each part: FP8Config's kernel fields, with the same defaults.

    quantize_impl 'auto': the one-pass Pallas quantizer on GPU where the shapes fit, else XLA; 'xla'.
    accumulate_impl 'auto': Mosaic on Hopper GPUs where it applies, the Triton kernel on other GPUs;
    'pallas': the Triton kernel on any GPU; 'xla': the lax.scan reference. Off a GPU, and for formats
    not exact in bf16, always 'xla'. native_casts: Triton's e4m3 convert in the Pallas quantizer.
    pallas_block: the Triton accumulator kernel's tiling.
    """

    quantize_impl: str = "auto"
    accumulate_impl: str = "auto"
    native_casts: bool = True
    pallas_block: PallasBlock = PallasBlock()

    def __post_init__(self):
        if self.quantize_impl not in QUANTIZE_IMPLS:
            raise ValueError(f"quantize_impl must be one of {QUANTIZE_IMPLS}, got {self.quantize_impl!r}")
        if self.accumulate_impl not in ACCUMULATE_IMPLS:
            raise ValueError(f"accumulate_impl must be one of {ACCUMULATE_IMPLS}, got {self.accumulate_impl!r}")

    @classmethod
    def of(cls, cfg: Any) -> KernelChoice:
        """The choice an FP8Config (or any object with its fields) makes."""
        block = PallasBlock(**{f.name: getattr(cfg, f"pallas_{f.name}") for f in dataclasses.fields(PallasBlock)})
        return cls(cfg.quantize_impl, cfg.accumulate_impl, cfg.native_casts, block)


DEFAULT_KERNELS = KernelChoice()


def fake_quantize_many(x: jax.Array, chains: tuple[Chain, ...], pow2_scales: bool = False,
                       dtype: Any = jnp.float32, impl: str = "auto", kernels: KernelChoice = DEFAULT_KERNELS
                       ) -> tuple[jax.Array, ...]:
    """Several fake-quantizations of one 2-D x, e.g. dy tiled 1×128 and 128×1, in one pass over x.

    Each chain is a sequence of (fmt, block) stages applied in turn (x_fp8 re-tiled: ((fmt, (1, 128)),
    (fmt, (128, 1)))). impl 'auto' uses a Pallas kernel on GPU (reads x once, writes each result once)
    when both dims are multiples of 128 and every block is 1×128, 128×1 or 128×128, unless
    kernels.quantize_impl is 'xla'; else XLA.
    """
    if _pallas_quantizer_fits(x, chains, impl, kernels):
        return pallas_quantize(x, chains, pow2_scales, dtype, with_scales=False, native_casts=kernels.native_casts)
    return tuple(dequantize(q, scale, chain[-1][1]).astype(dtype)
                 for chain, (q, scale) in zip(chains, xla_quantize_many(x, chains, pow2_scales)))


def quantize_many(x: jax.Array, chains: tuple[Chain, ...], pow2_scales: bool = False,
                  dtype: Any = jnp.bfloat16, impl: str = "auto", kernels: KernelChoice = DEFAULT_KERNELS
                  ) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """`fake_quantize_many`, except that each chain's last stage gives (q, scale) as `quantize` does:
    the FP8 values q in `dtype` (bf16 holds every value of a format with <= 7 mantissa bits) and the
    float32 scale of each block, instead of q · scale. What the accumulator kernels read."""
    if _pallas_quantizer_fits(x, chains, impl, kernels):
        out = pallas_quantize(x, chains, pow2_scales, dtype, with_scales=True, native_casts=kernels.native_casts)
        return tuple(zip(out[::2], out[1::2]))
    return tuple((q.astype(dtype), scale) for q, scale in xla_quantize_many(x, chains, pow2_scales))


def _pallas_quantizer_fits(x, chains, impl, kernels) -> bool:
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'pallas', got {impl!r}")
    rows, cols = x.shape
    fits = rows % KERNEL_TILE == 0 and cols % KERNEL_TILE == 0 and all(
        tuple(block) in KERNEL_BLOCKS for chain in chains for _, block in chain)
    return impl == "pallas" or (impl == "auto" and kernels.quantize_impl == "auto" and fits
                                 and on_gpu())


def precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def fp8_matmul(a: jax.Array, b: jax.Array, *, fmt: str = "e4m3", b_fmt: str | None = None,
               a_block: Block = (1, 128), b_block: Block = (128, 128), accum_bits: int | None = 14,
               promote_every: int | None = 128, k_step: int = 32, rounding: str = "truncate",
               pow2_scales: bool = False, compute_dtype: Any = None, impl: str = "auto",
               out_dtype: Any = jnp.float32, kernels: KernelChoice = DEFAULT_KERNELS) -> jax.Array:
    """Simulated FP8 GEMM a @ b → float32, a [..., M, K] (leading dims flattened into M), b [K, N].

    a is quantized in `fmt` with `a_block` over [M, K], b in `b_fmt` (default fmt) with `b_block` over
    [K, N]. accum_bits=None: exact FP32 accumulation (fast path: one matmul of the dequantized operands
    in `compute_dtype`, default float32 at HIGHEST precision; bf16 is exact for them when pow2_scales).
    Otherwise the Hopper accumulator model of the module docstring, computed by `impl`: 'xla' (lax.scan
    over promotion windows, any backend), 'pallas' (fused Triton kernel; interpreted off GPU), 'mosaic'
    (Hopper ping-pong kernel: V3-style scales, one per promotion window, k_step 16/32/64; GPU only) or
    'auto' (kernels.accumulate_impl: by default, on GPU, for formats exact in bf16: mosaic on Hopper
    where it applies, else pallas; off GPU xla). Not meant to be differentiated (use fp8_linear).
    out_dtype: the float32 result rounded once on output (the linear layers ask for bf16, which saves
    writing and re-reading a float32 [M, N]). kernels: the kernel choice (KernelChoice.of(FP8Config)).
    """
    fa, fb = float_format(fmt), float_format(b_fmt if b_fmt is not None else fmt)
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim < 2 or b.ndim != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"fp8_matmul needs a [..., M, K] and b [K, N], got {a.shape} and {b.shape}")
    lead, (m, k), n = a.shape[:-2], a.shape[-2:], b.shape[1]
    a2 = a.reshape(-1, k)
    if accum_bits is None:
        cd = jnp.float32 if compute_dtype is None else compute_dtype
        (da,) = fake_quantize_many(a2, (((fa, tuple(a_block)),),), pow2_scales, cd, kernels=kernels)
        (db,) = fake_quantize_many(b, (((fb, tuple(b_block)),),), pow2_scales, cd, kernels=kernels)
        out = jnp.dot(da, db, precision=precision(cd), preferred_element_type=jnp.float32).astype(out_dtype)
    else:
        out = _simulated_accumulation(a2, b, fa, fb, a_block, b_block, accum_bits, promote_every,
                                      k_step, rounding, pow2_scales, impl, out_dtype, kernels)
    return out.reshape(*lead, m, n)


def auto_accumulation_impl(bf16_operands: bool, mosaic_fits: bool, kernels: KernelChoice = DEFAULT_KERNELS) -> str:
    """What impl 'auto' runs: on a Hopper GPU the ping-pong Mosaic kernel where it applies, on other GPUs
    (or with accumulate_impl 'pallas') the Triton kernel (both need the operands exact in bf16), else
    (or with accumulate_impl 'xla') the XLA scan."""
    if kernels.accumulate_impl == "xla" or not on_gpu() or not bf16_operands:
        return "xla"
    hopper = str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")
    return "mosaic" if kernels.accumulate_impl == "auto" and mosaic_fits and hopper else "pallas"


def _steps_per_chunk(n_steps: int, cap: int = 8) -> int:
    return max(d for d in range(1, min(cap, n_steps) + 1) if n_steps % d == 0)


def _simulated_accumulation(a, b, fa, fb, a_block, b_block, accum_bits, promote_every, k_step,
                            rounding, pow2_scales, impl, out_dtype=jnp.float32, kernels=DEFAULT_KERNELS):
    """[M, K] @ [K, N] with per-K-step partial sums fed through the limited-precision accumulator."""
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
    if impl not in ("auto", "xla", "pallas", "mosaic"):
        raise ValueError(f"impl must be 'auto', 'xla', 'pallas' or 'mosaic', got {impl!r}")
    if not 0 <= accum_bits <= 23:
        raise ValueError(f"accum_bits must be in [0, 23] or None, got {accum_bits}")
    if k_step < 1 or (promote_every is not None and (promote_every < 1 or promote_every % k_step)):
        raise ValueError(f"promote_every ({promote_every}) must be a positive multiple of k_step ({k_step})")
    m, k = a.shape
    n = b.shape[1]
    # Scaling blocks along K (None = one block over the whole of K).
    ca = None if a_block[1] == -1 or a_block[1] >= k else a_block[1]
    rb = None if b_block[0] == -1 or b_block[0] >= k else b_block[0]
    k_blocks = [s for s in (ca, rb) if s is not None]
    for s in k_blocks:
        if s % k_step:
            raise ValueError(f"scaling block of {s} along K is not a multiple of k_step={k_step}: "
                             "a K-step would straddle two scales")
    unit = math.lcm(k_step, promote_every or 1, *k_blocks)
    kp = -(-k // unit) * unit
    if kp != k:  # zero K-steps add exactly nothing
        a, b = jnp.pad(a, ((0, 0), (0, kp - k))), jnp.pad(b, ((0, kp - k), (0, 0)))
    ab = (a_block[0], kp if ca is None else ca)
    bb = (kp if rb is None else rb, b_block[1])
    qa, sa = quantize(a, fa, ab, pow2_scales)
    qb, sb = quantize(b, fb, bb, pow2_scales)
    n_steps = kp // k_step
    # Per-step scales: sa_step [M, S], sb_step [S, N] (constant within a step by construction).
    ra, cb = resolve_block(ab, m, kp)[0], resolve_block(bb, kp, n)[1]
    sa_step = jnp.repeat(jnp.repeat(sa, ra, axis=0)[:m], ab[1] // k_step, axis=1)
    sb_step = jnp.repeat(jnp.repeat(sb, cb, axis=1)[:, :n], bb[0] // k_step, axis=0)
    window = promote_every or kp
    granule = math.gcd(*k_blocks) if k_blocks else kp  # scales are constant over K-ranges of this length
    scale_at_promotion = granule % window == 0
    steps_per_window = window // k_step
    op_dtype = operand_dtype(fa, fb)
    qa, qb = qa.astype(op_dtype), qb.astype(op_dtype)
    if promote_every is not None and scale_at_promotion:  # the V3 recipe: scales applied at promotion
        return accumulate_windows(qa, qb, sa_step[:, ::steps_per_window].T, sb_step[::steps_per_window, :],
                                  k_step=k_step, steps_per_window=steps_per_window, accum_bits=accum_bits,
                                  rounding=rounding, impl=impl, out_dtype=out_dtype, kernels=kernels)
    if impl == "mosaic":
        raise ValueError("impl='mosaic' needs promotion windows with one scale per window (scaling "
                         "blocks along K a multiple of promote_every, as in the V3 recipe)")
    if impl == "auto":
        impl = auto_accumulation_impl(op_dtype == jnp.bfloat16, mosaic_fits=False, kernels=kernels)
    if impl == "pallas":
        _check_bf16_operands(qa, qb, impl)
        stride = steps_per_window if scale_at_promotion else 1
        return pallas_accumulation(qa, qb, sa_step[:, ::stride].T, sb_step[::stride, :], steps_per_window,
                                   k_step, accum_bits, rounding, scale_per_step=not scale_at_promotion,
                                   out_dtype=out_dtype, block=kernels.pallas_block)
    # XLA, the two remaining cases: scales finer than the promotion window (each K-step's partial sum
    # is scaled before it enters the accumulator), or no promotion (one accumulator over all of K)
    chunk = steps_per_window if promote_every is not None else _steps_per_chunk(n_steps)
    n_chunks = n_steps // chunk
    a_c = qa.reshape(m, n_chunks, chunk, k_step).transpose(1, 0, 2, 3)  # [nc, M, C, ks]
    b_c = qb.reshape(n_chunks, chunk, k_step, n)  # [nc, C, ks, N]
    step_scales = (sa_step.T.reshape(n_chunks, chunk, m), sb_step.reshape(n_chunks, chunk, n))

    def scaled_partial_sums(a_chunk, b_chunk, sa_chunk, sb_chunk):
        p = _partial_sums(a_chunk, b_chunk)
        return p if scale_at_promotion else p * sa_chunk[:, :, None] * sb_chunk[:, None, :]

    zeros = jnp.zeros((m, n), jnp.float32)
    if promote_every is not None:
        def window_body(total, xs_w):
            return total + _round_steps(zeros, scaled_partial_sums(*xs_w), accum_bits, rounding), None

        total, _ = lax.scan(window_body, zeros, (a_c, b_c, *step_scales))
        return total.astype(out_dtype)

    def chunk_body(acc, xs_c):
        return _round_steps(acc, scaled_partial_sums(*xs_c), accum_bits, rounding), None

    acc, _ = lax.scan(chunk_body, zeros, (a_c, b_c, *step_scales))
    if scale_at_promotion:  # whole-K scales (per tensor / per row / per column)
        acc = acc * sa_step[:, 0][:, None] * sb_step[0][None, :]
    return acc.astype(out_dtype)


def _partial_sums(a_chunk, b_chunk):
    """[M, C, ks] x [C, ks, N] → [C, M, N]: each of C K-steps' products summed exactly (float32)."""
    return jnp.einsum("mck,ckn->cmn", a_chunk, b_chunk, precision=precision(a_chunk.dtype),
                      preferred_element_type=jnp.float32)


def _round_steps(acc, p, accum_bits, rounding):
    """The limited-precision accumulator over the K-steps p [C, M, N] (unrolled: C <= 8)."""
    for step in range(p.shape[0]):
        acc = round_mantissa(acc + p[step], accum_bits, rounding)
    return acc


def _check_bf16_operands(qa, qb, impl):
    if qa.dtype != jnp.bfloat16 or qb.dtype != jnp.bfloat16:
        raise ValueError(f"impl={impl!r} needs formats with <= 7 mantissa bits (exact in bf16)")


def accumulate_windows(qa, qb, sa, sb, *, k_step, steps_per_window, accum_bits, rounding, impl="auto",
                       out_dtype=jnp.float32, a_transposed=False, kernels=DEFAULT_KERNELS):
    """qa [M, Kp] (a_transposed: qa [Kp, M]) @ qb [Kp, N], exact FP8 values, through the accumulator
    model with the scales of each promotion window, sa [G, M] and sb [G, N] (G = Kp / window), applied
    at promotion. Kp is a multiple of the window. impl 'auto': on a Hopper GPU the ping-pong Mosaic
    kernel where it applies, on other GPUs the Triton kernel, else the XLA scan."""
    bf16 = qa.dtype == jnp.bfloat16 and qb.dtype == jnp.bfloat16
    mosaic_fits = mosaic_supported(k_step, steps_per_window)
    if impl == "auto":
        impl = auto_accumulation_impl(bf16, mosaic_fits, kernels)
    if impl in ("pallas", "mosaic"):
        _check_bf16_operands(qa, qb, impl)
    if impl == "mosaic":
        if not mosaic_fits:
            raise ValueError(f"impl='mosaic' needs k_step 16, 32 or 64, got {k_step}")
        if not on_gpu():
            raise ValueError(f"impl='mosaic' runs only on a Hopper GPU (backend here: {jax.default_backend()}); "
                             "use impl='auto'")
        return mosaic_accumulate(qa, qb, sa, sb, k_step=k_step, steps_per_window=steps_per_window,
                                 accum_bits=accum_bits, rounding=rounding, out_dtype=out_dtype,
                                 a_transposed=a_transposed)
    if a_transposed:
        qa = qa.T
    if impl == "pallas":
        return pallas_accumulation(qa, qb, sa, sb, steps_per_window, k_step, accum_bits, rounding,
                                   scale_per_step=False, out_dtype=out_dtype, block=kernels.pallas_block)
    m, kp = qa.shape
    n, n_windows = qb.shape[1], sa.shape[0]
    a_w = qa.reshape(m, n_windows, steps_per_window, k_step).transpose(1, 0, 2, 3)  # [G, M, C, ks]
    b_w = qb.reshape(n_windows, steps_per_window, k_step, n)  # [G, C, ks, N]
    zeros = jnp.zeros((m, n), jnp.float32)

    def window_body(total, xs):
        a_c, b_c, s_a, s_b = xs
        acc = _round_steps(zeros, _partial_sums(a_c, b_c), accum_bits, rounding)
        return total + acc * s_a[:, None] * s_b[None, :], None  # promotion: FP32 on the CUDA cores

    total, _ = lax.scan(window_body, zeros, (a_w, b_w, sa, sb))
    return total.astype(out_dtype)


def kernels_in_effect(cfg: Any) -> dict:
    """What FP8Config `cfg`'s kernel fields resolve to on this backend, for the V3-style GEMMs it runs:
    quantize ('pallas' | 'xla': the quantizer of operands whose dims are multiples of 128, in 1×128 /
    128×1 / 128×128 blocks; others always take XLA's), native_casts (Triton's e4m3 convert in that
    quantizer, where it quantizes to e4m3), accumulate ('mosaic' | 'pallas' | 'xla'; None with
    accum_bits=None: one ordinary matmul of the dequantized operands) and, with 'pallas', its tiling."""
    kernels = KernelChoice.of(cfg)
    gpu = on_gpu()
    quantize = "pallas" if gpu and kernels.quantize_impl == "auto" else "xla"
    e4m3 = any(float_format(f).name == "e4m3fn" for f in (cfg.fmt, cfg.grad_fmt))
    record = {"quantize": quantize, "native_casts": quantize == "pallas" and kernels.native_casts and e4m3}
    if cfg.accum_bits is None:
        record["accumulate"] = None
        return record
    # the scales are applied at promotion (the windows kernels) when every block along a GEMM's K is
    # a multiple of the window: act_block[1] (x, dy and the token tiles of Wgrad), weight_block (w, wᵀ)
    window = cfg.promote_every
    k_blocks = (cfg.act_block[1], cfg.weight_block[0], cfg.weight_block[1])
    at_promotion = window is not None and all(b == -1 or b % window == 0 for b in k_blocks)
    mosaic_fits = at_promotion and mosaic_supported(cfg.k_step, window // cfg.k_step)
    bf16 = operand_dtype(float_format(cfg.fmt), float_format(cfg.grad_fmt)) == jnp.bfloat16
    record["accumulate"] = auto_accumulation_impl(bf16, mosaic_fits, kernels)
    if record["accumulate"] == "pallas":
        record["pallas_block"] = dataclasses.asdict(kernels.pallas_block)
    return record
