"""Causal attention forward+backward: speed and run-to-run determinism of each implementation.

    python benchmarks/bench_attention.py --shape 64,512,6,64 --out attention.json
    python benchmarks/bench_attention.py --layers 6 --cases cudnn+exclude_nondeterministic,cudnn+exclude+no_command_buffer --out a.json
    python benchmarks/bench_attention.py --cases pallas --tiles 128,128,32,32,32,32 --tiles 128,128,64,64,64,64 --out t.json
    python benchmarks/bench_attention.py --small --out /tmp/attention.json       # CPU smoke test

Cases (`CASES`): jax.nn.dot_product_attention with cuDNN or XLA, cuDNN under XLA's determinism options
(compiled per program), and Pallas' Triton flash attention (jax.experimental.pallas.ops.gpu.attention),
whose backward computes dK/dV and dQ in separate loops without atomics, once per `--tiles` setting
(efftrain.model.attention.PallasTiles). `--layers L` chains L attention calls (each output, times a
fixed matrix, feeds the next one's q, k and v), as a model's step holds L of them: XLA 0.11.2's
determinism option compiles one cuDNN attention but crashes on two or more. Each case runs in its own
process (a compiler crash ends only that case). Per case: compile seconds, median milliseconds of one
jitted forward+backward ([B, T, N, H] bf16 q/k/v, loss = sum(out * cotangent)), and whether --repeats
gradient evaluations on the same inputs are bitwise identical. One JSON object per case in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from efftrain.cli import parse_choice_list
from efftrain.config import ConfigError

CASES = {
    "cudnn": ("cudnn", {}),
    "cudnn+exclude_nondeterministic": ("cudnn", {"xla_gpu_exclude_nondeterministic_ops": True}),
    "cudnn+deterministic_ops": ("cudnn", {"xla_gpu_deterministic_ops": True}),
    "cudnn+exclude+autotune0": ("cudnn", {"xla_gpu_exclude_nondeterministic_ops": True, "xla_gpu_autotune_level": 0}),
    "cudnn+exclude+no_command_buffer": ("cudnn", {"xla_gpu_exclude_nondeterministic_ops": True,
                                                  "xla_gpu_enable_command_buffer": ""}),
    "xla": ("xla", {}),
    "pallas": ("pallas", {}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="64,512,6,64", help="B,T,N,H")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--layers", type=int, default=1, help="attention calls chained in one program")
    p.add_argument("--tiles", action="append", help="Pallas tiles bq,bk,bq_dkv,bkv_dkv,bq_dq,bkv_dq[,warps[,stages]] "
                   "(repeatable: one pallas case each; default efftrain's PALLAS_TILES)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="gradient evaluations compared bitwise")
    p.add_argument("--small", action="store_true", help="2,64,2,32 and the XLA case only (CPU)")
    p.add_argument("--out", required=True)
    p.add_argument("--case", help=argparse.SUPPRESS)  # worker: run one case, print its JSON
    a = p.parse_args(argv)
    if a.small:
        a.shape, a.cases, a.iters, a.repeats = "2,64,2,32", "xla", 2, 2
    return a


def attention_fn(impl: str, tiles: str | None):
    import jax

    from efftrain.model.attention import PallasTiles, _pallas_attention

    if impl == "pallas":
        parsed = PallasTiles.parse(tiles) if tiles else None
        return lambda q, k, v: _pallas_attention(q, k, v, q.shape[-1] ** -0.5, tiles=parsed)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def run_case(a) -> dict:
    import hashlib

    import jax
    import jax.numpy as jnp
    import numpy as np

    impl, options = CASES[a.case]
    B, T, N, H = map(int, a.shape.split(","))
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, ct = (jax.random.normal(kk, (B, T, N, H), jnp.bfloat16) for kk in keys)
    attn = attention_fn(impl, a.tiles[0] if a.tiles else None)
    mix = (jax.random.normal(jax.random.key(9), (H, H), jnp.float32) / H ** 0.5).astype(jnp.bfloat16)

    def loss(q, k, v):
        x = attn(q, k, v)
        for _ in range(a.layers - 1):
            x = attn(q + x @ mix, k + x, v + x)
        return jnp.sum(x.astype(jnp.float32) * ct.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), compiler_options=options or None)
    t0 = time.perf_counter()
    out = jax.block_until_ready(grad(q, k, v))
    compile_s = time.perf_counter() - t0
    digests = {hashlib.sha256(b"".join(np.asarray(g.astype(jnp.float32)).tobytes() for g in out)).hexdigest()}
    for _ in range(a.repeats - 1):
        digests.add(hashlib.sha256(b"".join(np.asarray(g.astype(jnp.float32)).tobytes()
                                            for g in grad(q, k, v))).hexdigest())
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(a.iters):
            out = grad(q, k, v)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / a.iters * 1e3)
    return {"case": a.case, "shape": [B, T, N, H], "layers": a.layers, "tiles": a.tiles[0] if a.tiles else None,
            "compile_s": round(compile_s, 2),
            "fwd_bwd_ms": round(statistics.median(times), 3), "bitwise_repeatable": len(digests) == 1,
            "device": str(jax.devices()[0]), "jax": jax.__version__}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.case:
        print(json.dumps(run_case(a)))
        return 0
    try:
        names = parse_choice_list(a.cases, "--cases", tuple(CASES))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = [(name, tiles) for name in names
            for tiles in ((a.tiles or [None]) if CASES[name][0] == "pallas" else [None])]
    results = []
    for name, tiles in runs:
        cmd = [sys.executable, __file__, "--case", name, "--shape", a.shape, "--iters", str(a.iters),
               "--repeats", str(a.repeats), "--layers", str(a.layers), "--out", a.out]
        cmd += ["--tiles", tiles] if tiles else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            row = {"case": name, "tiles": tiles, "layers": a.layers, "error": f"exit {proc.returncode}",
                   "stderr_tail": tail}
        else:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(row)
        print(json.dumps(row), flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
