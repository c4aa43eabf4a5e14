"""Hopper (sm_90) kernel for the FP8 accumulator model: two accumulators per warpgroup in ping-pong.

Layer 3 of efftrain.fp8 (formats -> scaling -> kernels -> matmul -> linear), beside the Triton kernels
of efftrain/fp8/kernels.py, and the default on Hopper GPUs (`fp8.accumulate_impl: auto`). Same maths
as the Triton kernel (DeepSeek-V3 arXiv 2412.19437 §3.3.2, "increasing accumulation precision"; the
model is written out in efftrain/fp8/matmul.py's docstring):

    per K-step j (k_step = 32 products):  acc <- round_b(acc + Σ_{k in step j} qa·qb)
    every promotion window (128 = 4 K-steps):  total <- total + acc · sa · sb;  acc <- 0

Why a second kernel. In the model every K-step's MMA result must come back to registers and be
rounded before the next MMA into the same accumulator may start, so a kernel with one accumulator
alternates between the tensor cores (MMA) and the integer units (the bit mask) and keeps each busy
about half of the time. Mosaic GPU exposes the asynchronous WGMMA queue: here each warpgroup owns two
accumulators, the left and right halves of its output tile, and issues the MMA of one while the other
is rounded:

    MMA L(j) ─┐            ┌─ MMA R(j) ─┐            ┌─ MMA L(j+1) ...
              └ round R(j-1)┘            └ round L(j) ┘

`wgmma_accumulator_load(acc, wait_n=1)` waits for all but the most recent MMA, i.e. for the
accumulator about to be rounded while the other one's MMA keeps the tensor cores busy.

The MMA adds the K-step's products straight into the accumulator (acc + Σ qa·qb inside the tensor
core), as the hardware does, where the XLA reference first sums the 32 products in FP32 and then adds
them to acc (and the compiler may contract the promotion's multiply-add into one FMA). So results differ
from the reference in the last bits: on the H100 (`benchmarks/bench_fp8.py --only check`, [4096, 768]
@ [768, 2304], K-step 32, 14 bits) 48 % of the outputs differ from the XLA reference in some bit, by
at most 4.4e-6 of Σ|a||b|: the same bound as the Triton kernel's (one accumulator ulp where a
truncation falls the other way), whose sums differ only in 1.2e-4 of the outputs.

Operands come through a TMA pipeline, one promotion window per stage: a [tile_m, window] tile of qa
(FP8 values held exactly in bf16), a [window, tile_n] tile of qb and the window's scales (sa [G, M],
sb [G, N], G = windows).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from efftrain.fp8.formats import round_mantissa

TILE_M = 64  # one warpgroup's WGMMA height
TILE_N = 128  # two accumulators of 64 columns
MAX_CONCURRENT_STEPS = 2  # pipeline stages (2 × 48 KiB of SMEM per CTA: two CTAs fit on an SM)


def supported(k_step: int, steps_per_window: int) -> bool:
    """Whether this kernel implements these K-steps and windows (else use the Triton kernel): one
    K-step is one to four k16 WGMMAs, and a window's operands fit the SMEM pipeline."""
    return k_step in (16, 32, 64) and 1 <= steps_per_window and k_step * steps_per_window <= 256


def _swizzle(minor_elems: int) -> tuple:
    """Tiling + swizzle transforms for a bf16 SMEM tile whose minor dim is sliced every `minor_elems`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    swizzle = min(128, minor_elems * 2)
    return plgpu.TilingTransform((8, swizzle // 2)), plgpu.SwizzleTransform(swizzle)


# Jitted so that a model's many call sites of one kernel shape (every layer's Fprop, Dgrad and Wgrad)
# share one traced and lowered function: each lowering is ~190 kB of MLIR, and on the H100 a
# dense-125m step otherwise spent ~0.4 s per call site in lowering and ~0.75 s in XLA's compile.
@functools.partial(jax.jit, static_argnames=("k_step", "steps_per_window", "accum_bits", "rounding",
                                             "out_dtype", "a_transposed"))
def accumulate(qa: jax.Array, qb: jax.Array, sa: jax.Array, sb: jax.Array, *, k_step: int,
               steps_per_window: int, accum_bits: int, rounding: str, out_dtype=jnp.float32,
               a_transposed: bool = False) -> jax.Array:
    """qa [M, Kp] @ qb [Kp, N] (exact FP8 values in bf16) through the accumulator model → [M, N].

    a_transposed: qa is given as [Kp, M] (a weight gradient's activations in their stored layout; the
    MMA reads the transposed tile from SMEM, no copy). sa [G, M], sb [G, N]: the scales of each
    promotion window (G = Kp / window). M, N are padded to the tile internally; Kp must be a multiple
    of the window.
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kp, n = qb.shape
    m = qa.shape[0] if not a_transposed else qa.shape[1]
    window = k_step * steps_per_window
    if kp % window:
        raise ValueError(f"K={kp} is not a multiple of the promotion window {window}")
    n_windows = kp // window
    tm, tn, half = TILE_M, TILE_N, TILE_N // 2
    mp, np_ = -(-m // tm) * tm, -(-n // tn) * tn
    qa = jnp.pad(qa.astype(jnp.bfloat16), ((0, 0), (0, mp - m)) if a_transposed else ((0, mp - m), (0, 0)))
    qb = jnp.pad(qb.astype(jnp.bfloat16), ((0, 0), (0, np_ - n)))
    sa = jnp.pad(sa.astype(jnp.float32), ((0, 0), (0, mp - m)))
    sb = jnp.pad(sb.astype(jnp.float32), ((0, 0), (0, np_ - n)))
    # One swizzle for both operands (WGMMA wants them equal), spanning one K-step: A [M, K] is sliced
    # along its minor dim (K) into K-steps, and an MMA's K must be a multiple of the swizzle's width
    # (so A [K, M] and B [K, N], sliced along rows, use it too; their minor dims are multiples of it).
    transforms = _swizzle(k_step)
    a_block, a_index = ((window, tm), lambda w, i: (w, i)) if a_transposed else ((tm, window), lambda w, i: (i, w))

    def rnd(v):
        return round_mantissa(v, accum_bits, rounding, keep_specials=False)

    def body(a_gmem, b_gmem, sa_gmem, sb_gmem, o_gmem):
        mi, ni = lax.axis_index("m"), lax.axis_index("n")

        def window_step(_, a_smem, b_smem, sa_smem, sb_smem, totals):
            def steps(accs):
                left, right = accs
                for s in range(steps_per_window):
                    if a_transposed:
                        a_s = plgpu.transpose_ref(a_smem.at[pl.ds(s * k_step, k_step)], (1, 0))
                    else:
                        a_s = a_smem.at[:, pl.ds(s * k_step, k_step)]
                    b_s = b_smem.at[pl.ds(s * k_step, k_step)]
                    plgpu.wgmma(left, a_s, b_s.at[:, pl.ds(0, half)])
                    if s:  # right's previous step is done once only left's MMA may be in flight
                        right[...] = rnd(plgpu.wgmma_accumulator_load(right, wait_n=1))
                    plgpu.wgmma(right, a_s, b_s.at[:, pl.ds(half, half)])
                    left[...] = rnd(plgpu.wgmma_accumulator_load(left, wait_n=1))
                right[...] = rnd(plgpu.wgmma_accumulator_load(right, wait_n=0))

            zeros = jnp.zeros((tm, half), jnp.float32)
            left, right = pl.run_state(steps)((plgpu.ACC.init(zeros), plgpu.ACC.init(zeros)))
            s_a = lax.broadcast_in_dim(sa_smem[0, :], (tm, half), [0])
            s_left = sb_smem[0, pl.ds(0, half)]
            s_right = sb_smem[0, pl.ds(half, half)]
            total_l, total_r = totals
            total_l = total_l + left * s_a * lax.broadcast_in_dim(s_left, (tm, half), [1])
            total_r = total_r + right * s_a * lax.broadcast_in_dim(s_right, (tm, half), [1])
            return total_l, total_r

        zeros = jnp.zeros((tm, half), jnp.float32)
        total_l, total_r = plgpu.emit_pipeline(
            window_step,
            grid=(n_windows,),
            in_specs=[
                plgpu.BlockSpec(a_block, lambda w: a_index(w, mi), transforms=transforms),
                plgpu.BlockSpec((window, tn), lambda w: (w, ni), transforms=transforms),
                plgpu.BlockSpec((1, tm), lambda w: (w, mi)),
                plgpu.BlockSpec((1, tn), lambda w: (w, ni)),
            ],
            max_concurrent_steps=min(MAX_CONCURRENT_STEPS, n_windows),
            init_carry=(zeros, zeros),
        )(a_gmem, b_gmem, sa_gmem, sb_gmem)

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((tm, tn), out_dtype))
        def _store(o_smem):
            o_smem[:, pl.ds(0, half)] = total_l.astype(out_dtype)
            o_smem[:, pl.ds(half, half)] = total_r.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)])
            plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((mp, np_), out_dtype),
        grid=(mp // tm, np_ // tn),
        grid_names=("m", "n"),
        # Warpgroup semantics: Mosaic infers the register layouts (same speed as explicit ones, measured)
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(qa, qb, sa, sb)
    return out[:m, :n]
