"""Fine-grained (tile / block) FP8 scaling: quantize, dequantize, fake-quantize (the XLA path).

Layer 2 of efftrain.fp8 (formats -> scaling -> kernels -> matmul -> linear); the one-pass GPU quantizer
in efftrain/fp8/kernels.py computes the same numbers tile by tile.

Scaling (DeepSeek-V3, arXiv 2412.19437, §3.3.2 "fine-grained quantization")
  For each block B of an operand: s_B = amax_B / max (1 for an all-zero block; with pow2_scales rounded
  up to a power of two), q = cast(x · (1/s_B)), x ≈ q · s_B (the reciprocal is taken once per block, as
  a kernel would; XLA rewrites a broadcast division that way in any case). Blocks are (rows, cols) of
  the operand seen as 2-D (leading dims flattened into rows), -1 = the whole dimension:
      (1, 128)   activation tiles: one token, 128 channels          (V3: activations, forward)
      (128, 128) weight blocks: 128 input × 128 output channels     (V3: weights)
      (1, -1) per row, (-1, -1) per tensor.
  A dimension not divisible by its block is zero-padded to a multiple internally; padding changes no
  amax and contributes exact zeros to every product, so results equal the unpadded maths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from efftrain.fp8.formats import FloatFormat, cast_to_format, float_format

Block = tuple[int, int]
Chain = tuple[tuple[str, Block], ...]  # fake-quantization stages applied one after the other
KERNEL_TILE = 128  # the GPU kernels' tile: 1×128, 128×1 and 128×128 blocks, promotion every 128
KERNEL_BLOCKS = ((1, KERNEL_TILE), (KERNEL_TILE, 1), (KERNEL_TILE, KERNEL_TILE))


def as_2d(x: jax.Array) -> jax.Array:
    """[..., C] → [R, C] with the leading dims flattened into rows (a vector is one row)."""
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])


def resolve_block(block: Block, rows: int, cols: int) -> Block:
    """-1 (or anything >= the dim) → the whole dim."""
    r, c = block
    if r == 0 or c == 0 or r < -1 or c < -1:
        raise ValueError(f"block {block}: sizes must be positive or -1 (whole dimension)")
    return (rows if r == -1 else min(r, max(rows, 1)), cols if c == -1 else min(c, max(cols, 1)))


def _pad_to(x: jax.Array, r: int, c: int) -> jax.Array:
    rows, cols = x.shape
    pad_r, pad_c = -rows % r, -cols % c
    return jnp.pad(x, ((0, pad_r), (0, pad_c))) if pad_r or pad_c else x


def scale_from_amax(amax: jax.Array, fmt_max: float, pow2: bool) -> jax.Array:
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
    x2 = as_2d(x).astype(jnp.float32)
    rows, cols = x2.shape
    r, c = resolve_block(block, rows, cols)
    xp = _pad_to(x2, r, c)
    rb, cb = xp.shape[0] // r, xp.shape[1] // c
    x4 = xp.reshape(rb, r, cb, c)
    scale = scale_from_amax(jnp.max(jnp.abs(x4), axis=(1, 3)), f.max, pow2_scales)
    inv_scale = 1.0 / scale  # explicit: XLA would turn x / broadcast(s) into an inexact x · (1/s) anyway
    q = cast_to_format(x4 * inv_scale[:, None, :, None], f).reshape(rb * r, cb * c)
    return q[:rows, :cols].reshape(x.shape), scale


def dequantize(q: jax.Array, scale: jax.Array, block: Block = (1, 128)) -> jax.Array:
    """q · s per block (inverse of `quantize` up to the rounding); float32."""
    q2 = as_2d(jnp.asarray(q)).astype(jnp.float32)
    rows, cols = q2.shape
    r, c = resolve_block(block, rows, cols)
    return (q2 * _expand_scale(scale, r, c, rows, cols)).reshape(jnp.shape(q))


def fake_quantize(x: jax.Array, fmt: str | FloatFormat = "e4m3", block: Block = (1, 128),
                  pow2_scales: bool = False) -> jax.Array:
    """dequantize(quantize(x)): x rounded to the blockwise-scaled FP8 grid, float32."""
    return dequantize(*quantize(x, fmt, block, pow2_scales), block)



def xla_quantize_many(x, chains, pow2_scales):
    """(q, scale) of each chain's last stage, its earlier stages applied as fake-quantizations."""
    results = []
    for chain in chains:
        y = x
        for fmt, block in chain[:-1]:
            y = fake_quantize(y, fmt, block, pow2_scales)
        results.append(quantize(y, chain[-1][0], chain[-1][1], pow2_scales))
    return results
