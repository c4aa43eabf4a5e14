"""Time the simulated FP8 GEMMs of efftrain/fp8/ against plain matmuls, on whatever device JAX has.

    python benchmarks/bench_fp8.py            # GPU-sized shapes (GPT-2-small-like linears, 8192 tokens)
    python benchmarks/bench_fp8.py --small    # tiny shapes, runs on a CPU in seconds
    python benchmarks/bench_fp8.py --only check   # GPU: the fused accumulator kernels vs the XLA reference
    python benchmarks/bench_fp8.py --only kernels # GPU: those kernels alone vs a bf16 matmul

Prints one JSON line per measurement: (a) `fp8_matmul` vs a plain bf16 matmul (f32 accumulation);
(b) a linear layer forward + backward (y, dx, dw through jax.vjp) with `fp8_linear` vs bf16. Ratios are
against the bf16 baseline measured in the same run. Times: median of --iters runs after --warmup.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from efftrain.fp8 import KernelChoice, fake_quantize_many, fp8_linear, fp8_matmul

GPU_SHAPES = [(8192, 768, 2304), (8192, 768, 3072), (8192, 3072, 768), (4096, 4096, 4096)]
SMALL_SHAPES = [(256, 256, 384), (512, 384, 256)]


def fp8_config(**overrides):
    """An FP8Config (or, where pydantic is missing, e.g. on the GPU image, a namespace with its defaults)."""
    try:
        from efftrain.config import FP8Config

        return FP8Config(enabled=True, **overrides)
    except ImportError:
        fields = dict(enabled=True, fmt="e4m3", grad_fmt="e4m3", act_block=(1, 128), weight_block=(128, 128),
                      pow2_scales=False, accum_bits=14, accum_rounding="truncate", k_step=32, promote_every=128,
                      forward=True, input_grad=True, weight_grad=True, quantize_impl="auto", native_casts=True,
                      accumulate_impl="auto", pallas_block_m=64, pallas_block_n=128, pallas_num_warps=4,
                      pallas_num_stages=2, pallas_unroll=1, pallas_window_unroll=8, v3_fast_path=True)
        return types.SimpleNamespace(**{**fields, **overrides})


INNER = 10  # calls dispatched back to back per timed sample (hides the host's dispatch latency)


def time_fn(fn, *args, warmup: int, iters: int) -> float:
    """Median over `iters` samples of the mean wall time (ms) of INNER back-to-back calls of fn(*args)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(INNER):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) * 1e3 / INNER)
    return statistics.median(times)


def emit(**row):
    print(json.dumps(row), flush=True)


def bench_matmul(shapes, args):
    modes = {
        "bf16": lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32),
        "fp8_scaling_bf16": functools.partial(fp8_matmul, accum_bits=None, compute_dtype=jnp.bfloat16),
        "fp8_scaling_f32": functools.partial(fp8_matmul, accum_bits=None),
        "fp8_accum14_promote128": functools.partial(fp8_matmul, accum_bits=14, promote_every=128),
        "fp8_accum14_promote128_xla": functools.partial(fp8_matmul, accum_bits=14, promote_every=128, impl="xla"),
        "fp8_accum14_promote128_triton": functools.partial(fp8_matmul, accum_bits=14, promote_every=128,
                                                           impl="pallas"),
        "fp8_accum14_no_promotion": functools.partial(fp8_matmul, accum_bits=14, promote_every=None),
    }
    for m, k, n in shapes:
        rng = np.random.default_rng(0)
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        b = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
        base = None
        for mode, fn in modes.items():
            ms = time_fn(jax.jit(fn), a, b, warmup=args.warmup, iters=args.iters)
            base = ms if base is None else base
            emit(bench="matmul", device=jax.devices()[0].device_kind, shape=[m, k, n], mode=mode,
                 median_ms=round(ms, 4), ratio_vs_bf16=round(ms / base, 3),
                 tflops=round(2 * m * k * n / ms / 1e9, 2))


def bench_linear(shapes, args):
    configs = {
        "bf16": None,
        "fp8_scaling": fp8_config(accum_bits=None),
        "fp8_scaling_pow2": fp8_config(accum_bits=None, pow2_scales=True),
        "fp8_accum14_promote128": fp8_config(),
    }

    def fwd_bwd(cfg, x, w, dy):
        y, vjp = jax.vjp(lambda x, w: jnp.dot(x, w) if cfg is None else fp8_linear(x, w, cfg), x, w)
        return (y, *vjp(dy))

    for m, k, n in shapes:
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)
        dy = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
        base = None
        for mode, cfg in configs.items():
            fn = jax.jit(functools.partial(fwd_bwd, cfg))
            ms = time_fn(fn, x, w, dy, warmup=args.warmup, iters=args.iters)
            base = ms if base is None else base
            emit(bench="linear_fwd_bwd", device=jax.devices()[0].device_kind, shape=[m, k, n], mode=mode,
                 median_ms=round(ms, 4), ratio_vs_bf16=round(ms / base, 3),
                 tflops=round(6 * m * k * n / ms / 1e9, 2))


def _gpu_accumulation_impls():
    """The fused accumulator kernels this device runs: the Triton kernel, and on Hopper the Mosaic one."""
    from efftrain.fp8.matmul import auto_accumulation_impl

    return ("pallas", "mosaic") if auto_accumulation_impl(True, True) == "mosaic" else ("pallas",)


def check_pallas(shapes, args):
    """On GPU: the fused kernels against the lax.scan reference (same maths; the summation order and
    the FMA contraction of the promotion may differ). max_diff_over_abs_sum: the largest difference
    relative to Σ|a||b| of that output; frac_differing: outputs that differ in any bit."""
    for m, k, n in shapes:
        rng = np.random.default_rng(2)
        a = jnp.asarray(rng.uniform(0, 1, (m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        magnitude = np.abs(np.asarray(a)) @ np.abs(np.asarray(b))  # error scale of each output
        for rounding in ("truncate", "nearest"):
            run = {impl: np.asarray(jax.jit(functools.partial(fp8_matmul, impl=impl, rounding=rounding))(a, b))
                   for impl in ("xla", *_gpu_accumulation_impls())}
            for impl in _gpu_accumulation_impls():
                diff = np.abs(run["xla"] - run[impl]) / magnitude
                emit(bench="kernel_vs_xla", impl=impl, shape=[m, k, n], rounding=rounding,
                     max_diff_over_abs_sum=float(diff.max()), frac_differing=float(np.mean(diff > 0)))
        # batched (MoE experts call the linear layer under vmap): kernel per expert vs the XLA reference
        a2, b2 = jnp.stack([a, a[::-1]]), jnp.stack([b, -b])
        run = {impl: np.asarray(jax.jit(jax.vmap(functools.partial(fp8_matmul, impl=impl)))(a2, b2))
               for impl in ("xla", *_gpu_accumulation_impls())}
        magnitude = np.abs(np.asarray(a2)) @ np.abs(np.asarray(b2))
        for impl in _gpu_accumulation_impls():
            diff = np.abs(run["xla"] - run[impl]) / magnitude
            emit(bench="kernel_vs_xla_vmap", impl=impl, shape=[2, m, k, n], max_diff_over_abs_sum=float(diff.max()),
                 frac_differing=float(np.mean(diff > 0)))


def bench_kernels(shapes, args):
    """The accumulator kernels alone (operands already quantized, V3 scales per window, bf16 output)
    against a bf16 matmul of the same operands; a_transposed: A read as [K, M], the Wgrad layout."""
    from efftrain.fp8.matmul import accumulate_windows

    rng = np.random.default_rng(4)
    model = dict(k_step=32, steps_per_window=4, accum_bits=14, rounding="truncate", out_dtype=jnp.bfloat16)
    for m, k, n in shapes:
        for a_transposed in (False, True):
            qa = jnp.asarray(rng.standard_normal((k, m) if a_transposed else (m, k)), jnp.bfloat16)
            qb = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
            sa, sb = jnp.ones((k // 128, m), jnp.float32), jnp.ones((k // 128, n), jnp.float32)
            base = time_fn(jax.jit(lambda a, b, t=a_transposed: jnp.dot(a.T if t else a, b)), qa, qb,
                           warmup=args.warmup, iters=args.iters)
            for impl in _gpu_accumulation_impls():
                fn = jax.jit(functools.partial(accumulate_windows, impl=impl, a_transposed=a_transposed, **model))
                ms = time_fn(fn, qa, qb, sa, sb, warmup=args.warmup, iters=args.iters)
                emit(bench="kernel", impl=impl, shape=[m, k, n], a_transposed=a_transposed,
                     median_ms=round(ms, 4), bf16_ms=round(base, 4), ratio_vs_bf16=round(ms / base, 3))


def bench_quantize(shapes, args):
    """The fake-quantization pass alone: dy [M, N] tiled 1×128 and 128×1 (two outputs), XLA vs the Pallas
    kernel (bit arithmetic or Triton float8 converts), against a plain elementwise pass (read once, write
    twice) as the bandwidth floor; each variant's results are compared with XLA's bit for bit."""
    chains = ((("e4m3", (1, 128)),), (("e4m3", (128, 1)),))
    for m, _, n in shapes:
        dy = jnp.asarray(np.random.default_rng(4).standard_normal((m, n)), jnp.bfloat16)
        floor = time_fn(jax.jit(lambda v: (v * 2, v * 3)), dy, warmup=args.warmup, iters=args.iters)
        variants = {"xla": ("xla", False), "pallas_generic_cast": ("pallas", False),
                    "pallas_native_cast": ("pallas", True)}
        outs = {}
        for name, (impl, native_casts) in variants.items():
            kernels = KernelChoice.of(fp8_config(native_casts=native_casts))
            try:
                fn = jax.jit(functools.partial(fake_quantize_many, chains=chains, dtype=jnp.bfloat16, impl=impl,
                                               kernels=kernels))
                ms = time_fn(fn, dy, warmup=args.warmup, iters=args.iters)
                outs[name] = [np.asarray(o) for o in jax.jit(functools.partial(
                    fake_quantize_many, chains=chains, dtype=jnp.float32, impl=impl, kernels=kernels))(dy)]
                emit(bench="fake_quantize_dy_two_tilings", shape=[m, n], variant=name, median_ms=round(ms, 4),
                     ratio_vs_elementwise_floor=round(ms / floor, 3),
                     gbytes_per_s=round(3 * dy.nbytes / ms / 1e6, 1),
                     frac_differing_from_xla=[float(np.mean(p != q)) for p, q in zip(outs[name], outs["xla"])])
            except Exception as err:  # noqa: BLE001 - report and go on
                emit(bench="fake_quantize_dy_two_tilings", shape=[m, n], variant=name, error=str(err)[:300])


def bench_dequant_gemm(shapes, args):
    """Can the GEMM read FP8 storage? x is held as float8_e4m3fn values plus one float32 scale per 1×128
    tile (quantized in a separate jit, as a kernel would hand it over) and the matmul dequantizes in its
    prologue; if XLA fuses that into the GEMM it costs about a bf16 matmul while moving half the bytes.
    Compared with a bf16 matmul of the same shape (ratio) and with the bf16-storage path (fake-quantized
    x in bf16, the current implementation)."""
    for m, k, n in shapes:
        rng = np.random.default_rng(5)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.bfloat16)

        @jax.jit
        def to_fp8(x):
            t = x.astype(jnp.float32).reshape(m, k // 128, 128)
            s = jnp.maximum(jnp.max(jnp.abs(t), axis=-1), 1e-30) / 448.0
            return (t / s[..., None]).astype(jnp.float8_e4m3fn).reshape(m, k), s

        q, s = to_fp8(x)
        xq = jax.jit(lambda q, s: (q.astype(jnp.float32).reshape(m, k // 128, 128) * s[..., None])
                     .reshape(m, k).astype(jnp.bfloat16))(q, s)
        plain = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))
        fused = jax.jit(lambda q, s, w: jnp.dot(
            (q.astype(jnp.float32).reshape(m, k // 128, 128) * s[..., None]).reshape(m, k).astype(jnp.bfloat16),
            w, preferred_element_type=jnp.float32))
        base = time_fn(plain, x, w, warmup=args.warmup, iters=args.iters)
        t_bf16 = time_fn(plain, xq, w, warmup=args.warmup, iters=args.iters)
        t_fp8 = time_fn(fused, q, s, w, warmup=args.warmup, iters=args.iters)
        same = bool(np.array_equal(np.asarray(fused(q, s, w)), np.asarray(plain(xq, w))))
        emit(bench="dequant_gemm", shape=[m, k, n], bf16_ms=round(base, 4),
             bf16_storage_ratio=round(t_bf16 / base, 3), fp8_storage_ratio=round(t_fp8 / base, 3),
             same_result=same)


SWEEP_CONFIGS = [  # (block_m, block_n, num_warps, num_stages, unroll, window_unroll)
    *[(128, 64, 4, st, u, wu) for st in (2, 3, 4) for u in (1, 2) for wu in (0, 8)],
    *[(64, 64, 4, st, u, wu) for st in (3, 4) for u in (1, 2) for wu in (0, 8)],
    *[(128, 64, 8, 3, u, wu) for u in (1, 2) for wu in (0, 8)],
    (64, 128, 4, 3, 1, 8), (64, 128, 4, 3, 2, 8), (128, 128, 8, 3, 1, 8), (128, 128, 8, 3, 2, 8),
]
SWEEP_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "unroll", "window_unroll")  # fp8.pallas_<key>


def sweep_pallas(shapes, args, top: int = 4):
    """Time block configurations of the fused accumulation kernel: every SWEEP_CONFIGS entry on the
    first shape, then the `top` fastest on the others too; returns the best config (summed ratio), as the
    values of the fp8.pallas_* config fields."""
    rng = np.random.default_rng(3)

    def run(shape, configs):
        m, k, n = shape
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        base = time_fn(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)), a, b,
                       warmup=args.warmup, iters=args.iters)
        ratios = {}
        for cfg in configs:
            try:
                kernels = KernelChoice.of(fp8_config(**{f"pallas_{k}": v for k, v in zip(SWEEP_KEYS, cfg)}))
                ms = time_fn(jax.jit(functools.partial(fp8_matmul, impl="pallas", kernels=kernels)), a, b,
                             warmup=args.warmup, iters=args.iters)
                ratios[cfg] = ms / base
                emit(bench="pallas_sweep", shape=list(shape), config=dict(zip(SWEEP_KEYS, cfg)),
                     median_ms=round(ms, 4), bf16_ms=round(base, 4), ratio_vs_bf16=round(ms / base, 3))
            except Exception as err:  # noqa: BLE001 - report and go on
                emit(bench="pallas_sweep", shape=list(shape), config=dict(zip(SWEEP_KEYS, cfg)),
                     error=str(err)[:300])
        return ratios

    first = run(shapes[0], SWEEP_CONFIGS)
    if not first:
        return {key: getattr(fp8_config(), f"pallas_{key}") for key in SWEEP_KEYS}
    totals = {cfg: first[cfg] for cfg in sorted(first, key=first.get)[:top]}
    for shape in shapes[1:]:
        for cfg, r in run(shape, list(totals)).items():
            totals[cfg] += r
    winner = min(totals, key=totals.get)
    emit(bench="pallas_sweep_best", config=dict(zip(SWEEP_KEYS, winner)),
         mean_ratio=round(totals[winner] / len(shapes), 3))
    return dict(zip(SWEEP_KEYS, winner))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU)")
    parser.add_argument("--shapes", type=str, default=None, help="'M,K,N;M,K,N' overrides the shape list")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (default 20, --small 5)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", choices=["matmul", "linear", "check", "kernels", "sweep", "quantize", "dequant"],
                        default=None)
    args = parser.parse_args(argv)
    args.iters = args.iters or (5 if args.small else 20)
    global INNER
    INNER = 2 if args.small else INNER
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    else:
        shapes = SMALL_SHAPES if args.small else GPU_SHAPES
    emit(bench="env", jax=jax.__version__, backend=jax.default_backend(), device=jax.devices()[0].device_kind)
    if args.only == "check" or (args.only is None and jax.default_backend() == "gpu"):
        check_pallas(shapes[:2], args)
    if args.only == "kernels" or (args.only is None and jax.default_backend() == "gpu"):
        bench_kernels(shapes, args)
    if args.only == "sweep":
        sweep_pallas(shapes, args)
    if args.only in (None, "quantize"):
        bench_quantize(shapes, args)
    if args.only in (None, "dequant"):
        bench_dequant_gemm(shapes, args)
    if args.only in (None, "matmul"):
        bench_matmul(shapes, args)
    if args.only in (None, "linear"):
        bench_linear(shapes, args)


if __name__ == "__main__":
    main()
