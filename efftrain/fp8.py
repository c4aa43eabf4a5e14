"""Simulated FP8 GEMMs: formats, fine-grained scaling, limited-precision accumulation, custom-VJP linear.

Follows DeepSeek-V3 (arXiv 2412.19437) §3.3 "FP8 Training" and App. B.1 "FP8 vs. BF16 training".
Everything is computed in float32 with ordinary jnp arithmetic, so it runs (and is jit-able) on any
backend; the FP8 values themselves are float32 numbers that happen to be representable in the format.

Formats (eXmY, X exponent bits, Y mantissa bits, bias b = 2^(X-1) - 1)
    normal     v = (-1)^s · 2^(E-b) · (1 + M/2^Y),    1 <= E <= E_top
    subnormal  v = (-1)^s · 2^(1-b) · (M/2^Y),        E = 0
  IEEE-like ("e5m2", any "eXmY"): the all-ones exponent is inf/NaN, so e_max = 2^X - 2 - b and
  max = (2 - 2^-Y) · 2^e_max (e5m2: 57344). "fn" variants ("e4m3" = "e4m3fn", any "eXmYfn"): no inf, only
  the all-ones pattern is NaN, so e_max = 2^X - 1 - b and max = (2 - 2^(1-Y)) · 2^e_max (e4m3: 448);
  fn formats under 8 bits follow OCP MX FP6/FP4 (e2m3fn, e3m2fn, e2m1fn): no NaN, max = (2 - 2^-Y) · 2^e_max.
  Rounding, `cast_to_format`:   e = clip(floor(log2|x|), e_min, e_max), e_min = 1 - b,
      q(x) = sign(x) · min( RNE(|x| · 2^(Y-e)) · 2^(e-Y), max )
  i.e. round-to-nearest-even on the grid of x's binade (the e_min binade grid gives the subnormals) and
  saturation to the largest finite value (±inf saturates too; NaN stays NaN). Bit-exact with ml_dtypes'
  float8_e4m3fn / float8_e5m2 on |x| <= max. Caveat: XLA flushes float32 subnormals to zero, so formats
  whose subnormals lie below 2^-126 (X = 8) lose those; every X <= 7 format is exact.

Scaling (V3 §3.3.2 "fine-grained quantization")
  For each block B of an operand: s_B = amax_B / max (1 for an all-zero block; with pow2_scales rounded
  up to a power of two), q = cast(x · (1/s_B)), x ≈ q · s_B (the reciprocal is taken once per block, as
  a kernel would; XLA rewrites a broadcast division that way in any case). Blocks are (rows, cols) of
  the operand seen as 2-D (leading dims flattened into rows), -1 = the whole dimension:
      (1, 128)   activation tiles: one token, 128 channels          (V3: activations, forward)
      (128, 128) weight blocks: 128 input × 128 output channels     (V3: weights)
      (1, -1) per row, (-1, -1) per tensor.
  A dimension not divisible by its block is zero-padded to a multiple internally; padding changes no
  amax and contributes exact zeros to every product, so results equal the unpadded maths.

Accumulation (V3 §3.3.2 "increasing accumulation precision", Fig. 7b)
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

Linear layer (V3 Fig. 6), y = x @ w, w [K, N], with a custom VJP:
      Fprop  y  = x  @ w      x: fmt, act_block tiles along K;       w: fmt, weight_block
      Dgrad  dx = dy @ wᵀ     dy: grad_fmt, act_block tiles along N; wᵀ: fmt, weight_block transposed
                              (square 128×128 blocks of w are the same blocks of wᵀ)
      Wgrad  dw = xᵀ @ dy     both tiled 128×1 along the token dim (the contraction): xᵀ with act_block
                              (1 channel × 128 tokens), dy with its transpose (128 tokens × 1 column).
                              As in V3, x for Wgrad is the forward's FP8 x (dequantized, re-tiled and
                              quantized again), mirroring V3's cached FP8 activations.
  Each GEMM is simulated only if its flag (forward / input_grad / weight_grad) is set, otherwise it is
  the plain matmul autodiff would have done. Straight-through: gradients flow as if quantization were
  the identity, exactly like real FP8 training.

Speed. With accum_bits=None the cost is one quantize pass per operand plus one matmul in the compute
dtype (bf16 in training; exact for the dequantized values when pow2_scales, else one extra bf16
rounding of the dequantized operand, ~2^-9 relative, far below FP8's 2^-4); the backward GEMMs contract
the stored layouts with dot_general (no transposed copies) and every GEMM writes the compute dtype
(one rounding of its float32 accumulator, never a float32 [M, N] round trip). Linears that read the
same x (q/k/v, gate/up: fp8_linear_shared) quantize it once, and the forward pass also makes x's
Wgrad tiling and keeps it, with the quantized weights, for the backward. On GPU the quantize pass is a Pallas kernel
(`fake_quantize_many`) that reads a [128, 128] tile once and writes every tiling asked for (dy: 1×128
and 128×1), using Triton's e4m3 convert (bit-identical to cast_to_format on an H100).
With the accumulator model, the linear layer's default recipe (1×128 / 128×128 blocks, promotion
every 128, 128-aligned shapes) takes a fast path: each operand is quantized once, straight into the
kernels' layouts (`quantize_many`: FP8 values in bf16 plus the block scales; x's Wgrad tiling made in
the forward and kept), and Wgrad reads x in its stored [tokens, K] layout; bit-identical to fp8_matmul
per GEMM. The accumulation model has three implementations of the same maths:
  * 'mosaic' (default on Hopper GPUs, efftrain/fp8_mosaic.py): two accumulators per warpgroup in
    ping-pong, so one accumulator's MMA overlaps the other's rounding (2.3-2.7x a bf16 GEMM on an
    H100). The MMA adds the products straight into the accumulator (and the compiler may fuse the
    promotion's multiply-add into an FMA), so about half of the outputs differ from 'xla' in the last
    bits (≤ 4.4e-6 of Σ|a||b| on an H100, the Triton kernel's bound too).
  * 'pallas' (default on other GPUs): one Triton program per output tile walks K in k_step slices (bf16
    MMA with an fp32 result = the exact FP8 products; each promotion window unrolled in the loop over
    windows), rounds the accumulator in registers and promotes every window; the per-step rounding
    serializes the MMAs (2.8-3.3x a bf16 GEMM on an H100). Bit-identical to 'xla' through Pallas'
    interpreter on CPU; on an H100 ~1e-4 of outputs differ by one accumulator ulp (≤ 5e-6 of
    Σ|a||b|), because the MMA and cuBLAS sum the 32 products of a K-step in different orders.
  * 'xla' (CPU; reference): lax.scan over promotion windows; each window's per-step partial products
    ([k_steps_per_window, M, N] float32, one batched einsum) go through the unrolled recurrence, so
    memory is bounded by one window, not by K. Memory-bound: several times a bf16 matmul on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

from efftrain import fp8_mosaic

if TYPE_CHECKING:  # the config module needs pydantic; this module must not (GPU image has none)
    from efftrain.config import FP8Config

__all__ = [
    "FloatFormat",
    "float_format",
    "cast_to_format",
    "quantize",
    "dequantize",
    "fake_quantize",
    "round_mantissa",
    "fp8_matmul",
    "fp8_linear",
    "fp8_linear_shared",
]

Block = tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """An IEEE-like binary float format eXmY (finite_only: the 'fn' variant with no infinities)."""

    name: str
    exp_bits: int
    man_bits: int
    finite_only: bool

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        top = 2**self.exp_bits - 1 if self.finite_only else 2**self.exp_bits - 2
        return top - self.bias

    @property
    def has_nan_pattern(self) -> bool:
        """An fn format spends its all-ones pattern on NaN if it is 8 bits or wider (OCP FP8); the OCP MX
        FP6/FP4 'fn' formats (e2m3fn, e3m2fn, e2m1fn) have no NaN at all."""
        return self.finite_only and 1 + self.exp_bits + self.man_bits >= 8

    @property
    def max(self) -> float:
        frac = 2.0 - 2.0 ** (1 - self.man_bits) if self.has_nan_pattern else 2.0 - 2.0**-self.man_bits
        return frac * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)


_FORMAT_RE = re.compile(r"e(\d+)m(\d+)(fn)?")
_ALIASES = {"e4m3": "e4m3fn", "fp8_e4m3": "e4m3fn", "fp8_e5m2": "e5m2"}


@functools.lru_cache(maxsize=None)
def float_format(fmt: str | FloatFormat) -> FloatFormat:
    """Parse 'e4m3' (= e4m3fn, max 448), 'e5m2' (max 57344), any 'eXmY' (IEEE-like) or 'eXmYfn'."""
    if isinstance(fmt, FloatFormat):
        return fmt
    name = _ALIASES.get(fmt.strip().lower(), fmt.strip().lower())
    match = _FORMAT_RE.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown float format {fmt!r}: expected e4m3, e5m2, eXmY or eXmYfn")
    exp_bits, man_bits, fn = int(match[1]), int(match[2]), bool(match[3])
    result = FloatFormat(name, exp_bits, man_bits, fn)
    if not 2 <= exp_bits <= 8 or not 0 <= man_bits <= 23 or (result.has_nan_pattern and man_bits < 1):
        raise ValueError(f"float format {fmt!r}: need 2 <= X <= 8 exponent and 0 <= Y <= 23 mantissa bits "
                         "(Y >= 1 for an fn variant of 8+ bits)")
    return result


def _exp2i(k: jax.Array) -> jax.Array:
    """2.0**k as float32 for an int32 array k in [-126, 127] (exact, by building the bits)."""
    return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def _mul_exp2(v: jax.Array, k: jax.Array, k_lo: int, k_hi: int) -> jax.Array:
    """v · 2^k exactly; k (int32) is known to lie in [k_lo, k_hi]."""
    if -126 <= k_lo and k_hi <= 127:
        return v * _exp2i(k)
    half = k >> 1  # two factors keep each power of two a normal float32
    return v * _exp2i(half) * _exp2i(k - half)


def cast_to_format(x: jax.Array, fmt: str | FloatFormat = "e4m3") -> jax.Array:
    """Round x to the nearest value of `fmt` (RNE, subnormals, saturating); float32 result.

    Integer arithmetic on the float32 bits (no round op, so it also runs inside Pallas kernels): the
    24-bit significand m of |x| = m · 2^(e-23) is rounded half-to-even to a multiple of the format's
    quantum 2^(max(e, e_min) - Y), i.e. d = 23 - Y + max(0, e_min - e) low bits are dropped.
    """
    f = float_format(fmt)
    x = jnp.asarray(x).astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.int32)
    mag = bits & jnp.int32(0x7FFFFFFF)
    biased = mag >> 23
    exponent = jnp.minimum(biased - 127, f.emax + 1)  # beyond e_max + 1 everything saturates alike
    significand = jnp.where(biased == 0, 0, (mag & jnp.int32(0x7FFFFF)) | jnp.int32(0x800000))  # FTZ input
    quantum_exp = jnp.maximum(exponent, f.emin)
    drop = jnp.clip(23 - f.man_bits + quantum_exp - exponent, 0, 30)  # >= 25 already rounds to 0
    half_minus_one = (jnp.int32(1) << drop >> 1) - 1
    rounded = (significand + half_minus_one + ((significand >> drop) & 1)) >> drop  # RNE
    rounded = jnp.where(drop == 0, significand, rounded)
    y = _mul_exp2(rounded.astype(jnp.float32), quantum_exp - f.man_bits, f.emin - f.man_bits,
                  f.emax + 1 - f.man_bits)
    y = jnp.where(mag > jnp.int32(0x7F800000), jnp.float32(jnp.nan), jnp.minimum(y, jnp.float32(f.max)))
    sign = bits & jnp.int32(-(2**31))  # copysign, as bit arithmetic
    return lax.bitcast_convert_type(lax.bitcast_convert_type(y, jnp.int32) | sign, jnp.float32)


# Hardware float8 converts, for the two formats that have them, inside the Pallas quantizer only.
# cast_to_format is the definition; Triton's e4m3 convert matched it on every value tried on an H100,
# while an XLA-compiled f32 → float8 → f32 round trip on that GPU (jax 0.11.2) came back unrounded for
# most values (likely XLA's allow-excess-precision simplification), so XLA paths never use astype.
_NATIVE_DTYPES = {"e4m3fn": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def _native_cast(x: jax.Array, f: FloatFormat) -> jax.Array:
    dtype = _NATIVE_DTYPES.get(f.name)
    if dtype is None:
        return cast_to_format(x, f)
    return jnp.clip(x, -f.max, f.max).astype(dtype).astype(jnp.float32)


def round_mantissa(x: jax.Array, bits: int, rounding: str = "truncate", keep_specials: bool = True) -> jax.Array:
    """Keep `bits` explicit mantissa bits of float32 x: 'truncate' (toward zero) or 'nearest' (RNE).

    Plain int32 bit arithmetic (also inside the Pallas kernel); inf and NaN pass through unless
    keep_specials=False (the kernel's cheaper variant, where a NaN may turn into inf).
    """
    drop = 23 - bits
    if drop <= 0:
        return x
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
    u = lax.bitcast_convert_type(x, jnp.int32)  # sign-magnitude: integer ops act on the magnitude
    v = u
    if rounding == "nearest":
        v = v + (jnp.int32((1 << (drop - 1)) - 1) + ((v >> drop) & 1))
    v = v & jnp.int32(-(1 << drop))
    if not keep_specials:
        return lax.bitcast_convert_type(v, jnp.float32)
    special = (u & jnp.int32(0x7F800000)) == jnp.int32(0x7F800000)
    return lax.bitcast_convert_type(jnp.where(special, u, v), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Blockwise scaling
# ----------------------------------------------------------------------------------------------
def _as_2d(x: jax.Array) -> jax.Array:
    """[..., C] → [R, C] with the leading dims flattened into rows (a vector is one row)."""
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])


def _resolve_block(block: Block, rows: int, cols: int) -> Block:
    """-1 (or anything >= the dim) → the whole dim."""
    r, c = block
    if r == 0 or c == 0 or r < -1 or c < -1:
        raise ValueError(f"block {block}: sizes must be positive or -1 (whole dimension)")
    return (rows if r == -1 else min(r, max(rows, 1)), cols if c == -1 else min(c, max(cols, 1)))


def _pad_to(x: jax.Array, r: int, c: int) -> jax.Array:
    rows, cols = x.shape
    pad_r, pad_c = -rows % r, -cols % c
    return jnp.pad(x, ((0, pad_r), (0, pad_c))) if pad_r or pad_c else x


def _scale_from_amax(amax: jax.Array, fmt_max: float, pow2: bool) -> jax.Array:
    scale = amax * jnp.float32(1.0 / fmt_max)  # what XLA makes of amax / max anyway; same in kernels
    if pow2:  # round up to a power of two: set the mantissa to zero after carrying it into the exponent
        bits = lax.bitcast_convert_type(scale, jnp.int32)
        scale = lax.bitcast_convert_type((bits + jnp.int32(0x7FFFFF)) & jnp.int32(-(1 << 23)), jnp.float32)
    return jnp.where(scale > 0, scale, jnp.float32(1.0))  # zero blocks: scale 1, q = 0, no NaN


def _expand_scale(scale: jax.Array, r: int, c: int, rows: int, cols: int) -> jax.Array:
    """[Rb, Cb] block scales → [rows, cols] per element."""
    rb, cb = scale.shape
    full = jnp.broadcast_to(scale[:, None, :, None], (rb, r, cb, c)).reshape(rb * r, cb * c)
    return full[:rows, :cols]


def quantize(x: jax.Array, fmt: str | FloatFormat = "e4m3", block: Block = (1, 128),
             pow2_scales: bool = False) -> tuple[jax.Array, jax.Array]:
    """Blockwise FP8 quantization from the current amax.

    Returns (q, scale): q has x's shape and holds float32 values representable in `fmt`; scale is
    [ceil(R/r), ceil(C/c)] float32 for x seen as [R, C] (leading dims flattened into rows), and
    x ≈ dequantize(q, scale, block).
    """
    f = float_format(fmt)
    x = jnp.asarray(x)
    x2 = _as_2d(x).astype(jnp.float32)
    rows, cols = x2.shape
    r, c = _resolve_block(block, rows, cols)
    xp = _pad_to(x2, r, c)
    rb, cb = xp.shape[0] // r, xp.shape[1] // c
    x4 = xp.reshape(rb, r, cb, c)
    scale = _scale_from_amax(jnp.max(jnp.abs(x4), axis=(1, 3)), f.max, pow2_scales)
    inv_scale = 1.0 / scale  # explicit: XLA would turn x / broadcast(s) into an inexact x · (1/s) anyway
    q = cast_to_format(x4 * inv_scale[:, None, :, None], f).reshape(rb * r, cb * c)
    return q[:rows, :cols].reshape(x.shape), scale


def dequantize(q: jax.Array, scale: jax.Array, block: Block = (1, 128)) -> jax.Array:
    """q · s per block (inverse of `quantize` up to the rounding); float32."""
    q2 = _as_2d(jnp.asarray(q)).astype(jnp.float32)
    rows, cols = q2.shape
    r, c = _resolve_block(block, rows, cols)
    return (q2 * _expand_scale(scale, r, c, rows, cols)).reshape(jnp.shape(q))


def fake_quantize(x: jax.Array, fmt: str | FloatFormat = "e4m3", block: Block = (1, 128),
                  pow2_scales: bool = False) -> jax.Array:
    """dequantize(quantize(x)): x rounded to the blockwise-scaled FP8 grid, float32."""
    return dequantize(*quantize(x, fmt, block, pow2_scales), block)


Chain = tuple[tuple[str, Block], ...]  # fake-quantization stages applied one after the other
_KERNEL_TILE = 128
PALLAS_QUANTIZE = True  # one-pass Pallas quantizer on GPU (see fake_quantize_many)
KERNEL_NATIVE_CASTS = True  # Triton's e4m3 convert in that kernel (bit-exact, ~1.6x faster on H100)
_KERNEL_BLOCKS = ((1, _KERNEL_TILE), (_KERNEL_TILE, 1), (_KERNEL_TILE, _KERNEL_TILE))


def fake_quantize_many(x: jax.Array, chains: tuple[Chain, ...], pow2_scales: bool = False,
                       dtype: Any = jnp.float32, impl: str = "auto") -> tuple[jax.Array, ...]:
    """Several fake-quantizations of one 2-D x, e.g. dy tiled 1×128 and 128×1, in one pass over x.

    Each chain is a sequence of (fmt, block) stages applied in turn (x_fp8 re-tiled: ((fmt, (1, 128)),
    (fmt, (128, 1)))). impl 'auto' uses a Pallas kernel on GPU (reads x once, writes each result once)
    when both dims are multiples of 128 and every block is 1×128, 128×1 or 128×128; else XLA.
    """
    if _pallas_quantizer_fits(x, chains, impl):
        return _pallas_quantize(x, chains, pow2_scales, dtype, with_scales=False)
    return tuple(dequantize(q, scale, chain[-1][1]).astype(dtype)
                 for chain, (q, scale) in zip(chains, _xla_quantize_many(x, chains, pow2_scales)))


def quantize_many(x: jax.Array, chains: tuple[Chain, ...], pow2_scales: bool = False,
                  dtype: Any = jnp.bfloat16, impl: str = "auto") -> tuple[tuple[jax.Array, jax.Array], ...]:
    """`fake_quantize_many`, except that each chain's last stage gives (q, scale) as `quantize` does:
    the FP8 values q in `dtype` (bf16 holds every value of a format with <= 7 mantissa bits) and the
    float32 scale of each block, instead of q · scale. What the accumulator kernels read."""
    if _pallas_quantizer_fits(x, chains, impl):
        out = _pallas_quantize(x, chains, pow2_scales, dtype, with_scales=True)
        return tuple(zip(out[::2], out[1::2]))
    return tuple((q.astype(dtype), scale) for q, scale in _xla_quantize_many(x, chains, pow2_scales))


def _pallas_quantizer_fits(x, chains, impl) -> bool:
    if impl not in ("auto", "xla", "pallas"):
        raise ValueError(f"impl must be 'auto', 'xla' or 'pallas', got {impl!r}")
    rows, cols = x.shape
    fits = rows % _KERNEL_TILE == 0 and cols % _KERNEL_TILE == 0 and all(
        tuple(block) in _KERNEL_BLOCKS for chain in chains for _, block in chain)
    return impl == "pallas" or (impl == "auto" and PALLAS_QUANTIZE and fits and jax.default_backend() == "gpu")


def _xla_quantize_many(x, chains, pow2_scales):
    results = []
    for chain in chains:
        y = x
        for fmt, block in chain[:-1]:
            y = fake_quantize(y, fmt, block, pow2_scales)
        results.append(quantize(y, chain[-1][0], chain[-1][1], pow2_scales))
    return results


def _quantize_tile(v, fmt, block, pow2_scales):
    """quantize of one [128, 128] tile held in registers (same arithmetic as `quantize`): (q, scale),
    the scale shaped [128, 1] (1×128 blocks), [1, 128] (128×1) or [1, 1] (128×128)."""
    magnitude = jnp.abs(v)
    if block == (1, _KERNEL_TILE):
        amax = jnp.max(magnitude, axis=1)[:, None]
    elif block == (_KERNEL_TILE, 1):
        amax = jnp.max(magnitude, axis=0)[None, :]
    else:
        amax = jnp.max(jnp.max(magnitude, axis=1)[:, None], axis=0)[None, :]
    f = float_format(fmt)
    scale = _scale_from_amax(amax, f.max, pow2_scales)
    # Triton's e4m3 convert was checked bit for bit on an H100; e5m2 (not checked there) keeps the bit maths
    cast = _native_cast if KERNEL_NATIVE_CASTS and f.name == "e4m3fn" else cast_to_format
    return cast(v * (1.0 / scale), f), scale


def _pallas_quantize(x, chains, pow2_scales, dtype, with_scales):
    """One Triton program per [128, 128] tile of x: every chain's stages in registers, then per chain
    q · scale (with_scales=False) or q and the scales (with_scales=True)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    rows, cols = x.shape
    t = _KERNEL_TILE
    tile = pl.BlockSpec((t, t), lambda i, j: (i, j))
    scale_specs = {(1, t): ((rows, cols // t), (t, 1)), (t, 1): ((rows // t, cols), (1, t)),
                   (t, t): ((rows // t, cols // t), (1, 1))}
    out_shape, out_specs = [], []
    for chain in chains:
        out_shape.append(jax.ShapeDtypeStruct((rows, cols), dtype))
        out_specs.append(tile)
        if with_scales:
            shape, block = scale_specs[tuple(chain[-1][1])]
            out_shape.append(jax.ShapeDtypeStruct(shape, jnp.float32))
            out_specs.append(pl.BlockSpec(block, lambda i, j: (i, j)))

    def kernel(x_ref, *out_refs):
        v = x_ref[...].astype(jnp.float32)
        refs = iter(out_refs)
        for chain in chains:
            y = v
            for fmt, block in chain[:-1]:
                y = _fake_quantize_tile(y, fmt, tuple(block), pow2_scales)
            q, scale = _quantize_tile(y, chain[-1][0], tuple(chain[-1][1]), pow2_scales)
            if with_scales:
                next(refs)[...] = q.astype(dtype)
                next(refs)[...] = scale
            else:
                next(refs)[...] = (q * scale).astype(dtype)

    interpret = jax.default_backend() != "gpu"
    return tuple(pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(rows // t, cols // t),
        in_specs=[tile],
        out_specs=out_specs,
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=8, num_stages=1),
        interpret=interpret,
    )(x))


def _fake_quantize_tile(v, fmt, block, pow2_scales):
    q, scale = _quantize_tile(v, fmt, block, pow2_scales)
    return q * scale


# ----------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------
def _operand_dtype(*fmts: FloatFormat):
    """bf16 holds every value of formats with <= 7 mantissa bits exactly (same exponent range as fp32)."""
    return jnp.bfloat16 if all(f.man_bits <= 7 for f in fmts) else jnp.float32


def _precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def fp8_matmul(a: jax.Array, b: jax.Array, *, fmt: str = "e4m3", b_fmt: str | None = None,
               a_block: Block = (1, 128), b_block: Block = (128, 128), accum_bits: int | None = 14,
               promote_every: int | None = 128, k_step: int = 32, rounding: str = "truncate",
               pow2_scales: bool = False, compute_dtype: Any = None, impl: str = "auto",
               out_dtype: Any = jnp.float32) -> jax.Array:
    """Simulated FP8 GEMM a @ b → float32, a [..., M, K] (leading dims flattened into M), b [K, N].

    a is quantized in `fmt` with `a_block` over [M, K], b in `b_fmt` (default fmt) with `b_block` over
    [K, N]. accum_bits=None: exact FP32 accumulation (fast path: one matmul of the dequantized operands
    in `compute_dtype`, default float32 at HIGHEST precision; bf16 is exact for them when pow2_scales).
    Otherwise the Hopper accumulator model of the module docstring, computed by `impl`: 'xla' (lax.scan
    over promotion windows, any backend), 'pallas' (fused Triton kernel; interpreted off GPU), 'mosaic'
    (Hopper ping-pong kernel: V3-style scales, one per promotion window, k_step 16/32/64; GPU only) or
    'auto' (on GPU, for formats exact in bf16: mosaic on Hopper where it applies, else pallas; off GPU
    xla). Not meant to be
    differentiated (use fp8_linear). out_dtype: the float32 result rounded once on output (the linear
    layers ask for bf16, which saves writing and re-reading a float32 [M, N]).
    """
    fa, fb = float_format(fmt), float_format(b_fmt if b_fmt is not None else fmt)
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim < 2 or b.ndim != 2 or a.shape[-1] != b.shape[0]:
        raise ValueError(f"fp8_matmul needs a [..., M, K] and b [K, N], got {a.shape} and {b.shape}")
    lead, (m, k), n = a.shape[:-2], a.shape[-2:], b.shape[1]
    a2 = a.reshape(-1, k)
    if accum_bits is None:
        cd = jnp.float32 if compute_dtype is None else compute_dtype
        (da,) = fake_quantize_many(a2, (((fa, tuple(a_block)),),), pow2_scales, cd)
        (db,) = fake_quantize_many(b, (((fb, tuple(b_block)),),), pow2_scales, cd)
        out = jnp.dot(da, db, precision=_precision(cd), preferred_element_type=jnp.float32).astype(out_dtype)
    else:
        out = _simulated_accumulation(a2, b, fa, fb, a_block, b_block, accum_bits, promote_every,
                                      k_step, rounding, pow2_scales, impl, out_dtype)
    return out.reshape(*lead, m, n)


MOSAIC_ACCUMULATION = True  # on Hopper, the ping-pong Mosaic GPU kernel (efftrain.fp8_mosaic)


def _auto_accumulation_impl(bf16_operands: bool, mosaic_fits: bool) -> str:
    """On a Hopper GPU the ping-pong Mosaic kernel where it applies, on other GPUs the Triton kernel
    (both need the operands exact in bf16), else the XLA scan."""
    if jax.default_backend() != "gpu" or not bf16_operands:
        return "xla"
    hopper = str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")
    return "mosaic" if MOSAIC_ACCUMULATION and mosaic_fits and hopper else "pallas"


def _steps_per_chunk(n_steps: int, cap: int = 8) -> int:
    return max(d for d in range(1, min(cap, n_steps) + 1) if n_steps % d == 0)


def _simulated_accumulation(a, b, fa, fb, a_block, b_block, accum_bits, promote_every, k_step,
                            rounding, pow2_scales, impl, out_dtype=jnp.float32):
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
    ra, cb = _resolve_block(ab, m, kp)[0], _resolve_block(bb, kp, n)[1]
    sa_step = jnp.repeat(jnp.repeat(sa, ra, axis=0)[:m], ab[1] // k_step, axis=1)
    sb_step = jnp.repeat(jnp.repeat(sb, cb, axis=1)[:, :n], bb[0] // k_step, axis=0)
    window = promote_every or kp
    granule = math.gcd(*k_blocks) if k_blocks else kp  # scales are constant over K-ranges of this length
    scale_at_promotion = granule % window == 0
    steps_per_window = window // k_step
    op_dtype = _operand_dtype(fa, fb)
    qa, qb = qa.astype(op_dtype), qb.astype(op_dtype)
    if promote_every is not None and scale_at_promotion:  # the V3 recipe: scales applied at promotion
        return _accumulate_windows(qa, qb, sa_step[:, ::steps_per_window].T, sb_step[::steps_per_window, :],
                                   k_step=k_step, steps_per_window=steps_per_window, accum_bits=accum_bits,
                                   rounding=rounding, impl=impl, out_dtype=out_dtype)
    if impl == "mosaic":
        raise ValueError("impl='mosaic' needs promotion windows with one scale per window (scaling "
                         "blocks along K a multiple of promote_every, as in the V3 recipe)")
    if impl == "auto":
        impl = _auto_accumulation_impl(op_dtype == jnp.bfloat16, mosaic_fits=False)
    if impl == "pallas":
        _check_bf16_operands(qa, qb, impl)
        stride = steps_per_window if scale_at_promotion else 1
        return _pallas_accumulation(qa, qb, sa_step[:, ::stride].T, sb_step[::stride, :], steps_per_window,
                                    k_step, accum_bits, rounding, scale_per_step=not scale_at_promotion,
                                    out_dtype=out_dtype)
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
    return jnp.einsum("mck,ckn->cmn", a_chunk, b_chunk, precision=_precision(a_chunk.dtype),
                      preferred_element_type=jnp.float32)


def _round_steps(acc, p, accum_bits, rounding):
    """The limited-precision accumulator over the K-steps p [C, M, N] (unrolled: C <= 8)."""
    for step in range(p.shape[0]):
        acc = round_mantissa(acc + p[step], accum_bits, rounding)
    return acc


def _check_bf16_operands(qa, qb, impl):
    if qa.dtype != jnp.bfloat16 or qb.dtype != jnp.bfloat16:
        raise ValueError(f"impl={impl!r} needs formats with <= 7 mantissa bits (exact in bf16)")


def _accumulate_windows(qa, qb, sa, sb, *, k_step, steps_per_window, accum_bits, rounding, impl="auto",
                        out_dtype=jnp.float32, a_transposed=False):
    """qa [M, Kp] (a_transposed: qa [Kp, M]) @ qb [Kp, N], exact FP8 values, through the accumulator
    model with the scales of each promotion window, sa [G, M] and sb [G, N] (G = Kp / window), applied
    at promotion. Kp is a multiple of the window. impl 'auto': on a Hopper GPU the ping-pong Mosaic
    kernel where it applies, on other GPUs the Triton kernel, else the XLA scan."""
    bf16 = qa.dtype == jnp.bfloat16 and qb.dtype == jnp.bfloat16
    mosaic_fits = fp8_mosaic.supported(k_step, steps_per_window)
    if impl == "auto":
        impl = _auto_accumulation_impl(bf16, mosaic_fits)
    if impl in ("pallas", "mosaic"):
        _check_bf16_operands(qa, qb, impl)
    if impl == "mosaic":
        if not mosaic_fits:
            raise ValueError(f"impl='mosaic' needs k_step 16, 32 or 64, got {k_step}")
        if jax.default_backend() != "gpu":
            raise ValueError(f"impl='mosaic' runs only on a Hopper GPU (backend here: {jax.default_backend()}); "
                             "use impl='auto'")
        return fp8_mosaic.accumulate(qa, qb, sa, sb, k_step=k_step, steps_per_window=steps_per_window,
                                     accum_bits=accum_bits, rounding=rounding, out_dtype=out_dtype,
                                     a_transposed=a_transposed)
    if a_transposed:
        qa = qa.T
    if impl == "pallas":
        return _pallas_accumulation(qa, qb, sa, sb, steps_per_window, k_step, accum_bits, rounding,
                                    scale_per_step=False, out_dtype=out_dtype)
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


# Fused GPU kernel: one program per [block_m, block_n] output tile loops over the K-steps, keeping the
# limited-precision accumulator and the FP32 total in registers; nothing [steps, M, N]-sized is stored.
# Best of two sweeps (28 + 14 configs) on the H100 over three dense-125m GEMM shapes (benchmarks/bench_fp8.py
# --only sweep; docs/BENCHMARKS.md): one m64n128 MMA per K-step beats two m64n64, and unrolling each
# promotion window into the body of the loop over windows lets the pipeliner prefetch across windows.
PALLAS_BLOCK = {"block_m": 64, "block_n": 128, "num_warps": 4, "num_stages": 2, "unroll": 1, "window_unroll": 8}


def _pallas_accumulation(qa, qb, sa, sb, steps_per_window, k_step, accum_bits, rounding, scale_per_step,
                         out_dtype=jnp.float32, **block):
    """qa [M, Kp] @ qb [Kp, N] (exact FP8 values in bf16) through the accumulator model → [M, N] f32.

    sa [G, M], sb [G, N]: scales per promotion window (G = windows), or per K-step (G = steps) when
    scale_per_step, in which case each step's partial sum is scaled before it enters the accumulator.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    cfg = {**PALLAS_BLOCK, **block}
    m, kp = qa.shape
    n = qb.shape[1]
    n_windows = kp // (steps_per_window * k_step)
    bm = min(cfg["block_m"], max(16, pl.next_power_of_2(m)))
    bn = min(cfg["block_n"], max(16, pl.next_power_of_2(n)))
    mp, np_ = -(-m // bm) * bm, -(-n // bn) * bn
    qa, sa = jnp.pad(qa, ((0, mp - m), (0, 0))), jnp.pad(sa, ((0, 0), (0, mp - m)))
    qb, sb = jnp.pad(qb, ((0, 0), (0, np_ - n))), jnp.pad(sb, ((0, 0), (0, np_ - n)))

    # K-steps whose products are issued together before they enter the accumulator one by one (they are
    # independent, so the MMAs need not wait for each rounding); a divisor of the steps per window
    unroll = max(d for d in range(1, min(cfg["unroll"], steps_per_window) + 1) if steps_per_window % d == 0)
    # Windows of up to `window_unroll` K-steps are unrolled into the body of one loop over windows, so
    # the software pipeliner prefetches the next window's operands while this one is accumulated; a
    # two-level loop (windows, then groups of `unroll` steps) would only pipeline the short inner loop.
    flat = steps_per_window <= cfg["window_unroll"]

    def kernel(a_ref, b_ref, sa_ref, sb_ref, out_ref):
        def steps(w, g, acc):  # `unroll` K-steps starting at step g of window w
            first = w * steps_per_window + g * unroll
            products = []
            for u in range(unroll):
                k0 = pl.multiple_of((first + u) * k_step, k_step)
                products.append(jnp.dot(a_ref[:, pl.ds(k0, k_step)], b_ref[pl.ds(k0, k_step), :],
                                        preferred_element_type=jnp.float32))  # exact products of one K-step
            for u, p in enumerate(products):
                if scale_per_step:
                    p = p * sa_ref[first + u][:, None] * sb_ref[first + u][None, :]
                acc = round_mantissa(acc + p, accum_bits, rounding, keep_specials=False)
            return acc

        def window(w, total):
            acc = jnp.zeros((bm, bn), jnp.float32)
            if flat:
                for g in range(steps_per_window // unroll):
                    acc = steps(w, g, acc)
            else:
                acc = lax.fori_loop(0, steps_per_window // unroll, functools.partial(steps, w), acc)
            if not scale_per_step:  # promotion with the window's scales
                acc = acc * sa_ref[w][:, None] * sb_ref[w][None, :]
            return total + acc

        out_ref[...] = lax.fori_loop(0, n_windows, window, jnp.zeros((bm, bn), jnp.float32)).astype(out_ref.dtype)

    interpret = jax.default_backend() != "gpu"
    groups = sa.shape[0]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((groups, bm), lambda i, j: (0, i)),
                  pl.BlockSpec((groups, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=cfg["num_warps"],
                                                                        num_stages=cfg["num_stages"]),
        interpret=interpret,
    )(qa, qb, sa, sb)
    return out[:m, :n]


# ----------------------------------------------------------------------------------------------
# Linear layer with FP8 forward, input-gradient and weight-gradient GEMMs
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _LinearSpec:
    """The hashable subset of FP8Config that fp8_linear uses (a static argument of the custom VJP)."""

    fmt: str
    grad_fmt: str
    act_block: Block
    weight_block: Block
    pow2_scales: bool
    accum_bits: int | None
    accum_rounding: str
    k_step: int
    promote_every: int | None
    forward: bool
    input_grad: bool
    weight_grad: bool

    @classmethod
    def of(cls, cfg: Any) -> _LinearSpec:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    def windows(self) -> dict:
        """The accumulator model's arguments of `_accumulate_windows` (the fast path's windows = 128)."""
        return dict(k_step=self.k_step, steps_per_window=_KERNEL_TILE // self.k_step,
                    accum_bits=self.accum_bits, rounding=self.accum_rounding)

    def gemm(self, a, b, a_fmt, b_fmt, a_block, b_block, compute_dtype):
        return fp8_matmul(a, b, fmt=a_fmt, b_fmt=b_fmt, a_block=tuple(a_block), b_block=tuple(b_block),
                          accum_bits=self.accum_bits, promote_every=self.promote_every,
                          k_step=self.k_step, rounding=self.accum_rounding, pow2_scales=self.pow2_scales,
                          compute_dtype=compute_dtype, out_dtype=compute_dtype)


def fp8_linear(x: jax.Array, w: jax.Array, cfg: FP8Config) -> jax.Array:
    """y = x @ w (x [..., K], w [K, N]) with the FP8 GEMMs that `cfg` enables; y has x's dtype.

    `cfg` is an FP8Config (or any object with its fields). Gradients: dx in x.dtype, dw in w.dtype.
    """
    return fp8_linear_shared(x, (w,), cfg)[0]


def fp8_linear_shared(x: jax.Array, ws: tuple[jax.Array, ...] | list[jax.Array], cfg: FP8Config
                      ) -> tuple[jax.Array, ...]:
    """(x @ w for w in ws) for linears that read the same x (q/k/v, gate/up): the same numbers as
    separate fp8_linear calls, but x is quantized once for all of them, and with scaling only
    (accum_bits=None) the Wgrad tiling of x is made in that same forward pass (kept instead of x)."""
    spec = _LinearSpec.of(cfg)
    ws = tuple(ws)
    if not (spec.forward or spec.input_grad or spec.weight_grad):
        return tuple(jnp.dot(x, w) for w in ws)
    return _fp8_linear(x, ws, spec)


def _plain(x, w):
    return jnp.dot(x, w)


def _dot(u, v, dims, cd):
    """Contract the stored layouts (no transposed copies) with float32 accumulation; the result in the
    compute dtype cd: the GEMM rounds its float32 accumulator once on output, the same single rounding
    as a float32 result cast to bf16, without writing and re-reading a float32 [M, N] (on the H100 that
    round trip cost most of the scaling-only overhead)."""
    return lax.dot_general(u, v, (dims, ((), ())), precision=_precision(cd), preferred_element_type=cd)


def _wgrad_x_chain(spec: _LinearSpec) -> Chain:
    """x for Wgrad: tiled 128 tokens × 1 channel; as in V3, starting from the forward's FP8 x."""
    ab = tuple(spec.act_block)
    return ((spec.fmt, ab),) * spec.forward + ((spec.fmt, ab[::-1]),)


V3_FAST_PATH = True  # the accumulator model's V3 recipe through `_forward_v3` / `_backward_v3`


def _v3_fast_path(spec: _LinearSpec, rows: int, k: int, ns) -> bool:
    """The default recipe with the accumulator model (all three GEMMs simulated, 1×128 / 128×128
    blocks, promotion every 128) on 128-aligned shapes: every operand is quantized once, straight
    into the accumulator kernels' layouts, and Wgrad reads the FP8 x kept from the forward."""
    t = _KERNEL_TILE
    return (V3_FAST_PATH and spec.accum_bits is not None and spec.forward and spec.input_grad
            and spec.weight_grad and tuple(spec.act_block) == (1, t) and tuple(spec.weight_block) == (t, t)
            and spec.promote_every == t and t % spec.k_step == 0
            and _operand_dtype(float_format(spec.fmt), float_format(spec.grad_fmt)) == jnp.bfloat16
            and rows % t == 0 and k % t == 0 and all(n % t == 0 for n in ns))


def _forward_v3(x2, ws, spec, keep_residuals, cd):
    """Fprop y = x @ w: x quantized 1×128 (and, for Wgrad, that FP8 x re-tiled 128 tokens × 1 in the
    same pass), w 128×128; the residuals are those (q, scale) pairs instead of x and w."""
    chains = (((spec.fmt, tuple(spec.act_block)),),) + (_wgrad_x_chain(spec),) * keep_residuals
    (qx, sx), *x_wgrad = quantize_many(x2, chains, spec.pow2_scales)
    w_q = tuple(quantize_many(w, (((spec.fmt, tuple(spec.weight_block)),),), spec.pow2_scales)[0] for w in ws)
    # scales per promotion window: sa [K/128, tokens], sb [K/128, N] (one weight block per 128 columns)
    ys = tuple(_accumulate_windows(qx, qw, sx.T, jnp.repeat(sw, _KERNEL_TILE, axis=1), out_dtype=cd,
                                   **spec.windows()) for qw, sw in w_q)
    return ys, (tuple(x_wgrad[0]) if keep_residuals else x2, w_q)


def _backward_v3(spec, x_wgrad, w_q, dys, x_shape, cd):
    """Dgrad dx = dy @ wᵀ and Wgrad dw = xᵀ @ dy from one quantization pass over each dy (1×128 and
    128 tokens × 1 tiles); the Wgrad kernel reads x in its stored [tokens, K] layout."""
    qxt, sxt = x_wgrad
    tokens = tuple(spec.act_block)[::-1]
    dx, dws = 0, []
    for dy, (qw, sw) in zip(dys, w_q):
        dy2 = dy.reshape(-1, qw.shape[1])
        chains = (((spec.grad_fmt, tuple(spec.act_block)),), ((spec.grad_fmt, tokens),))
        (qd, sd), (qdt, sdt) = quantize_many(dy2, chains, spec.pow2_scales)
        dx = dx + _accumulate_windows(qd, qw.T, sd.T, jnp.repeat(sw.T, _KERNEL_TILE, axis=1), out_dtype=cd,
                                      **spec.windows()).reshape(x_shape)
        dws.append(_accumulate_windows(qxt, qdt, sxt, sdt, a_transposed=True, out_dtype=cd, **spec.windows()))
    return dx, dws


def _forward(x, ws, spec, keep_residuals):
    """The forward GEMMs and (keep_residuals) what the backward needs: for Wgrad the token-tiled FP8 x
    (scaling only, or the V3 fast path) or x, for Dgrad the quantized weights (likewise) or the weights."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    cd = jnp.promote_types(x.dtype, ws[0].dtype)
    ab, wb = tuple(spec.act_block), tuple(spec.weight_block)
    x_res, w_res = x2, ws
    if _v3_fast_path(spec, *x2.shape, [w.shape[1] for w in ws]):
        ys, (x_res, w_res) = _forward_v3(x2, ws, spec, keep_residuals, cd)
    elif spec.accum_bits is None:
        chains = (((spec.fmt, ab),),) * spec.forward + (_wgrad_x_chain(spec),) * (keep_residuals and spec.weight_grad)
        xq = list(fake_quantize_many(x2, chains, spec.pow2_scales, cd)) if chains else []
        x_fwd = xq.pop(0) if spec.forward else None
        x_res = xq.pop(0) if keep_residuals and spec.weight_grad else x2
        if spec.forward or (keep_residuals and spec.input_grad):
            wq = tuple(fake_quantize_many(w, (((spec.fmt, wb),),), spec.pow2_scales, cd)[0] for w in ws)
            w_res = wq if spec.input_grad else ws
        if spec.forward:
            ys = tuple(_dot(x_fwd, w_q, ((1,), (0,)), cd) for w_q in wq)
    elif spec.forward:
        ys = tuple(spec.gemm(x2, w, spec.fmt, spec.fmt, ab, wb, cd) for w in ws)
    if spec.forward:
        ys = tuple(y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype) for y in ys)
    else:
        ys = tuple(_plain(x, w) for w in ws)
    return ys, (x_res, w_res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_linear(x, ws, spec: _LinearSpec):
    return _forward(x, ws, spec, keep_residuals=False)[0]


def _fp8_linear_fwd(x, ws, spec):
    ys, residuals = _forward(x, ws, spec, keep_residuals=True)
    dtype_tags = (jnp.zeros((0,), x.dtype), tuple(jnp.zeros((0,), w.dtype) for w in ws))
    return ys, (residuals, dtype_tags)


def _fp8_linear_bwd(spec, residuals, dys):
    (x_res, w_res), (x_tag, w_tags) = residuals
    cd = jnp.promote_types(x_tag.dtype, w_tags[0].dtype)
    if isinstance(x_res, tuple):  # the forward took the V3 fast path: x_res = (q, scale) of x for Wgrad
        x_shape = (*dys[0].shape[:-1], x_res[0].shape[1])
        dx, dws = _backward_v3(spec, x_res, w_res, dys, x_shape, cd)
        return dx.astype(x_tag.dtype), tuple(dw.astype(w_tag.dtype) for dw, w_tag in zip(dws, w_tags))
    x_shape = (*dys[0].shape[:-1], x_res.shape[1])
    ab, wb = tuple(spec.act_block), tuple(spec.weight_block)
    tokens = ab[::-1]  # Wgrad tiles: 128 tokens × 1 channel
    dx, dws = 0, []
    if spec.accum_bits is not None and spec.weight_grad:  # V3: Wgrad reads the forward's FP8 x
        x_fp8 = fake_quantize(x_res, spec.fmt, ab, spec.pow2_scales) if spec.forward else x_res
    for dy, w, w_tag in zip(dys, w_res, w_tags):
        dy2 = dy.reshape(-1, w.shape[1])
        dw = None
        if not (spec.input_grad and spec.weight_grad):  # what autodiff of x @ w gives, for the plain GEMM
            # (dx does not read x's values, dw not w's, so the quantized residuals stand in for them)
            dx_plain, dw = jax.vjp(_plain, x_res.reshape(x_shape).astype(x_tag.dtype), w.astype(w_tag.dtype))[1](dy)
            if not spec.input_grad:
                dx = dx + dx_plain
        if spec.accum_bits is None:  # scaling only: one pass over dy makes every tiling it needs
            chains = (((spec.grad_fmt, ab),),) * spec.input_grad + (((spec.grad_fmt, tokens),),) * spec.weight_grad
            dy_q = list(fake_quantize_many(dy2, chains, spec.pow2_scales, cd))
            if spec.input_grad:  # w is quantized already (wᵀ with the transposed blocks: the same values)
                dx = dx + _dot(dy_q.pop(0), w, ((1,), (1,)), cd).reshape(x_shape)
            if spec.weight_grad:  # x_res is the token-tiled FP8 x
                dw = _dot(x_res, dy_q.pop(0), ((0,), (0,)), cd)
        else:
            if spec.input_grad:  # Dgrad: dy [M, N] tiles along N  ×  wᵀ [N, K] with the transposed blocks
                dx = dx + spec.gemm(dy2, w.T, spec.grad_fmt, spec.fmt, ab, wb[::-1], cd).reshape(x_shape)
            if spec.weight_grad:  # Wgrad: xᵀ [K, M] (1 × 128 tokens)  ×  dy [M, N] (128 tokens × 1)
                dw = spec.gemm(x_fp8.T, dy2, spec.fmt, spec.grad_fmt, ab, tokens, cd)
        dws.append(dw.astype(w_tag.dtype))
    return dx.astype(x_tag.dtype), tuple(dws)


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)
