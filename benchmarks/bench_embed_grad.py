"""The token-embedding gradient: speed and run-to-run determinism of each formulation.

    python benchmarks/bench_embed_grad.py --shape 32768,16384,384 --shape 32768,50304,768 --out embed.json
    python benchmarks/bench_embed_grad.py --small --out /tmp/embed.json     # CPU smoke test

Cases: `scatter` (autodiff of the gather: XLA's scatter-add, atomics on GPUs), and efftrain's
deterministic formulations (efftrain.model.layers.EMBED_GRAD_METHODS: `sorted`, a stable sort plus a
segmented scan; `onehot`, chunked one-hot matmuls). Per case and shape [N tokens, V vocab, D width]:
median milliseconds of one jitted gradient of sum(table[ids] * g) with bf16 g and Zipf-distributed
ids (as text is), whether --repeats evaluations are bitwise identical, and the largest difference from
the scatter's result. One JSON object per case in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", help="N,V,D (repeatable); default 32768,16384,384")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small", action="store_true", help="one 2048,512,64 shape, few iterations (CPU)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.small:
        a.shape, a.iters, a.repeats = ["2048,512,64"], 2, 2
    a.shape = a.shape or ["32768,16384,384"]
    return a


def gradient_fn(method: str):
    import jax
    import jax.numpy as jnp

    from efftrain.model import layers

    if method == "scatter":
        def embed(table, ids):
            return jnp.take(table, ids, axis=0).astype(jnp.bfloat16)
    else:
        def embed(table, ids):
            layers.EMBED_GRAD_METHOD = method  # read while tracing
            return layers.deterministic_embed(table, ids, jnp.bfloat16)

    def loss(table, ids, g):
        return jnp.sum(embed(table, ids).astype(jnp.float32) * g.astype(jnp.float32))

    return jax.jit(jax.grad(loss))


def run_shape(shape: str, a) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from efftrain.model import layers

    N, V, D = map(int, shape.split(","))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.minimum(rng.zipf(1.2, N), V) - 1, jnp.int32)
    table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(N, D)), jnp.bfloat16)
    rows, reference = [], None
    for method in ("scatter", *layers.EMBED_GRAD_METHODS):
        grad = gradient_fn(method)
        t0 = time.perf_counter()
        out = jax.block_until_ready(grad(table, ids, g))
        compile_s = time.perf_counter() - t0
        bits = {np.asarray(out).tobytes()} | {np.asarray(grad(table, ids, g)).tobytes() for _ in range(a.repeats - 1)}
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(a.iters):
                out = grad(table, ids, g)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t0) / a.iters * 1e3)
        reference = out if reference is None else reference
        rows.append({"case": method, "shape": [N, V, D], "compile_s": round(compile_s, 2),
                     "grad_ms": round(statistics.median(times), 3), "bitwise_repeatable": len(bits) == 1,
                     "max_abs_diff_vs_scatter": float(jnp.max(jnp.abs(out - reference))),
                     "device": str(jax.devices()[0]), "jax": jax.__version__})
    return rows


def main(argv=None) -> int:
    a = parse_args(argv)
    results = []
    for shape in a.shape:
        for row in run_shape(shape, a):
            results.append(row)
            print(json.dumps(row), flush=True)
            with open(a.out, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
