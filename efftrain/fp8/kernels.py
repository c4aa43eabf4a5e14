"""The Triton kernels (Pallas' Triton backend, GPU; run by Pallas' interpreter elsewhere).

Layer 3 of efftrain.fp8 (formats -> scaling -> kernels -> matmul -> linear), beside the Mosaic GPU
kernel in efftrain/fp8/mosaic.py. Same numbers as the XLA paths of efftrain/fp8/scaling.py and
efftrain/fp8/matmul.py; which one runs is decided in matmul.py from FP8Config's kernel fields.

One-pass quantizer (`pallas_quantize`; DeepSeek-V3, arXiv 2412.19437, §3.3.2 "fine-grained
quantization"): one program per [128, 128] tile of x reads it once and writes every tiling asked for
(dy: 1×128 and 128×1), as q · scale or as q and the block scales. With native_casts
(`fp8.native_casts`) it uses Triton's e4m3 convert (bit-identical to cast_to_format on an H100).

Fused accumulator kernel (`pallas_accumulation`, impl 'pallas'; V3 §3.3.2 "increasing accumulation
precision", the model in efftrain/fp8/matmul.py): one Triton program per output tile walks K in k_step
slices (bf16 MMA with an fp32 result = the exact FP8 products; each promotion window unrolled in the
loop over windows), rounds the accumulator in registers and promotes every window; the per-step
rounding serializes the MMAs (2.8-3.3x a bf16 GEMM on an H100). Bit-identical to 'xla' through Pallas'
interpreter on CPU; on an H100 ~1e-4 of outputs differ by one accumulator ulp (≤ 5e-6 of Σ|a||b|),
because the MMA and cuBLAS sum the 32 products of a K-step in different orders. Its tiling is a
`PallasBlock` (the `fp8.pallas_*` fields).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from efftrain.fp8.formats import cast_to_format, float_format, native_cast, round_mantissa
from efftrain.fp8.scaling import KERNEL_TILE, scale_from_amax
from efftrain.xla import on_gpu


def quantize_tile(v, fmt, block, pow2_scales, native_casts=True):
    """quantize of one [128, 128] tile held in registers (same arithmetic as `quantize`): (q, scale),
    the scale shaped [128, 1] (1×128 blocks), [1, 128] (128×1) or [1, 1] (128×128)."""
    magnitude = jnp.abs(v)
    if block == (1, KERNEL_TILE):
        amax = jnp.max(magnitude, axis=1)[:, None]
    elif block == (KERNEL_TILE, 1):
        amax = jnp.max(magnitude, axis=0)[None, :]
    else:
        amax = jnp.max(jnp.max(magnitude, axis=1)[:, None], axis=0)[None, :]
    f = float_format(fmt)
    scale = scale_from_amax(amax, f.max, pow2_scales)
    # Triton's e4m3 convert was checked bit for bit on an H100; e5m2 (not checked there) keeps the bit maths
    cast = native_cast if native_casts and f.name == "e4m3fn" else cast_to_format
    return cast(v * (1.0 / scale), f), scale


def pallas_quantize(x, chains, pow2_scales, dtype, with_scales, native_casts=True):
    """One Triton program per [128, 128] tile of x: every chain's stages in registers, then per chain
    q · scale (with_scales=False) or q and the scales (with_scales=True)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    rows, cols = x.shape
    t = KERNEL_TILE
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
                y = _fake_quantize_tile(y, fmt, tuple(block), pow2_scales, native_casts)
            q, scale = quantize_tile(y, chain[-1][0], tuple(chain[-1][1]), pow2_scales, native_casts)
            if with_scales:
                next(refs)[...] = q.astype(dtype)
                next(refs)[...] = scale
            else:
                next(refs)[...] = (q * scale).astype(dtype)

    interpret = not on_gpu()
    return tuple(pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(rows // t, cols // t),
        in_specs=[tile],
        out_specs=out_specs,
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=8, num_stages=1),
        interpret=interpret,
    )(x))


def _fake_quantize_tile(v, fmt, block, pow2_scales, native_casts):
    q, scale = quantize_tile(v, fmt, block, pow2_scales, native_casts)
    return q * scale


# Fused GPU kernel: one program per [block_m, block_n] output tile loops over the K-steps, keeping the
# limited-precision accumulator and the FP32 total in registers; nothing [steps, M, N]-sized is stored.
# Best of two sweeps (28 + 14 configs) on the H100 over three dense-125m GEMM shapes (benchmarks/bench_fp8.py
# --only sweep; docs/BENCHMARKS.md): one m64n128 MMA per K-step beats two m64n64, and unrolling each
# promotion window into the body of the loop over windows lets the pipeliner prefetch across windows.
@dataclasses.dataclass(frozen=True)
class PallasBlock:
    """Tiling of the fused accumulator kernel: FP8Config's pallas_* fields (same defaults)."""

    block_m: int = 64  # output tile rows (capped at the next power of two >= M, at least 16)
    block_n: int = 128  # output tile columns (likewise)
    num_warps: int = 4
    num_stages: int = 2  # software-pipeline stages
    unroll: int = 1  # K-steps whose MMAs are issued before they enter the accumulator in turn
    window_unroll: int = 8  # promotion windows of up to this many K-steps are unrolled in the loop


def pallas_accumulation(qa, qb, sa, sb, steps_per_window, k_step, accum_bits, rounding, scale_per_step,
                        out_dtype=jnp.float32, block: PallasBlock = PallasBlock()):
    """qa [M, Kp] @ qb [Kp, N] (exact FP8 values in bf16) through the accumulator model → [M, N] f32.

    sa [G, M], sb [G, N]: scales per promotion window (G = windows), or per K-step (G = steps) when
    scale_per_step, in which case each step's partial sum is scaled before it enters the accumulator.
    block: the kernel's tiling and Triton's compiler parameters.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    m, kp = qa.shape
    n = qb.shape[1]
    n_windows = kp // (steps_per_window * k_step)
    bm = min(block.block_m, max(16, pl.next_power_of_2(m)))
    bn = min(block.block_n, max(16, pl.next_power_of_2(n)))
    mp, np_ = -(-m // bm) * bm, -(-n // bn) * bn
    qa, sa = jnp.pad(qa, ((0, mp - m), (0, 0))), jnp.pad(sa, ((0, 0), (0, mp - m)))
    qb, sb = jnp.pad(qb, ((0, 0), (0, np_ - n))), jnp.pad(sb, ((0, 0), (0, np_ - n)))

    # K-steps whose products are issued together before they enter the accumulator one by one (they are
    # independent, so the MMAs need not wait for each rounding); a divisor of the steps per window
    unroll = max(d for d in range(1, min(block.unroll, steps_per_window) + 1) if steps_per_window % d == 0)
    # Windows of up to `window_unroll` K-steps are unrolled into the body of one loop over windows, so
    # the software pipeliner prefetches the next window's operands while this one is accumulated; a
    # two-level loop (windows, then groups of `unroll` steps) would only pipeline the short inner loop.
    flat = steps_per_window <= block.window_unroll

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

    interpret = not on_gpu()
    groups = sa.shape[0]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((groups, bm), lambda i, j: (0, i)),
                  pl.BlockSpec((groups, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=None if interpret else pl_triton.CompilerParams(num_warps=block.num_warps,
                                                                        num_stages=block.num_stages),
        interpret=interpret,
    )(qa, qb, sa, sb)
    return out[:m, :n]


