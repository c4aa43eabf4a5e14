"""Micro-benchmark: forward+backward of the DeepSeekMoE layer vs a dense SwiGLU of equal active params.

Times jit(value_and_grad) of sum(y·r) w.r.t. the layer's params and input, for
  capacity        dispatch=capacity (capacity_factor), batched einsum over [E, C, D]
  tiles[-T][:S]   dispatch=dropless, tile layout (T rows per tile; default picked by the layer);
                  S = onehot|scatter: how per-tile weight gradients are summed per expert
  ragged          dispatch=dropless, jax.lax.ragged_dot
  dense           MLP(D, (K + N_s)·H): the same active parameters per token (router excluded)
and prints one JSON line per path as it finishes (ms/step, tokens/s, model TFLOP/s of the active
expert GEMMs), then a summary line with tokens/s and time ratios to dense and capacity from the same run.

  python benchmarks/bench_moe.py                  # GPU-sized defaults
  python benchmarks/bench_moe.py --small          # tiny CPU check
  python benchmarks/bench_moe.py --paths dense,capacity,tiles,tiles-256,ragged --experts 64 --top-k 6
  python benchmarks/bench_moe.py --breakdown      # + route / move / gemm parts of each MoE path
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from efftrain.config import ModelConfig, MoEConfig
from efftrain.model.layers import MLP
import efftrain.model.dispatch as dispatch_lib
from efftrain.model.moe import MoE, default_tile_rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=65536, help="tokens per call (batch × seq)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length (batch = tokens / seq)")
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--shared", type=int, default=1, help="shared experts")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--score-func", default="sigmoid", choices=["sigmoid", "softmax"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--paths", default="dense,capacity,tiles",
                   help="comma list of capacity, tiles[-T][:onehot|scatter], ragged, dense")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU run")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the parts of each MoE path alone (fwd+bwd): route, move (sort + dispatch + "
                        "combine, identity experts) and gemm (the three expert GEMMs on the path's buffer)")
    a = p.parse_args(argv)
    if a.small:
        a.tokens, a.seq, a.d_model, a.experts, a.top_k, a.expert_hidden = 512, 128, 64, 8, 2, 32
        a.warmup, a.iters = 1, 5
    if a.tokens % a.seq:
        p.error(f"--tokens ({a.tokens}) must be a multiple of --seq ({a.seq})")
    return a


def model_config(a, dispatch: str) -> ModelConfig:
    moe = MoEConfig(enabled=True, num_routed_experts=a.experts, num_shared_experts=a.shared, top_k=a.top_k,
                    expert_hidden=a.expert_hidden, score_func=a.score_func, dispatch=dispatch,
                    capacity_factor=a.capacity_factor, first_dense_layers=0)
    return ModelConfig(d_model=a.d_model, n_layers=2, n_heads=8, compute_dtype=a.dtype, param_dtype="float32",
                       moe=moe)


def build(a, path: str):
    if path == "dense":
        cfg = model_config(a, "dropless")
        return MLP(a.d_model, (a.top_k + a.shared) * a.expert_hidden, cfg=cfg, rngs=nnx.Rngs(0)), False
    if path == "capacity":
        return MoE(model_config(a, "capacity"), rngs=nnx.Rngs(0)), True
    if path == "ragged":
        return MoE(model_config(a, "dropless"), rngs=nnx.Rngs(0), dropless_impl="ragged"), True
    if path.startswith("tiles"):
        name = path.split(":")[0]
        tile = int(name.split("-")[1]) if "-" in name else None
        return MoE(model_config(a, "dropless"), rngs=nnx.Rngs(0), dropless_impl="tiles", tile_rows=tile), True
    raise SystemExit(f"unknown path '{path}'")


def median_ms(a, fn, *args) -> tuple[float, float]:
    """(median ms per call, compile+first-call s) of a jitted fn."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(a.warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, first


def breakdown(a, path: str, x: jax.Array, r: jax.Array) -> dict:
    """Times of the parts of one MoE path, each alone, forward + backward."""
    m, _ = build(a, path)
    n, d = a.tokens, a.d_model
    x2d = x.reshape(n, d)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    r2d = r.reshape(n, d)

    def route_loss(p, x2d):
        mm = nnx.merge(graphdef, p, rest)
        routing = mm.route(x2d)
        return jnp.sum(routing.gates) + jnp.sum(routing.scores * 1e-3)

    out = {"path": path, "part": "breakdown"}
    out["route_ms"], _ = median_ms(a, jax.jit(jax.grad(route_loss, argnums=(0, 1))), params, x2d)
    routing = jax.jit(lambda p, x2d: nnx.merge(graphdef, p, rest).route(x2d))(params, x2d)
    idx, gates = routing.expert_idx, routing.gates
    flat = idx.reshape(-1)
    E, K = a.experts, a.top_k
    if path == "capacity":
        C = dispatch_lib.capacity_of(n, K, E, a.capacity_factor)
        dispatch = lambda f: dispatch_lib.capacity_dispatch(f, E, C)  # noqa: E731
        rows, groups = E * C, None
    else:
        t = m.tile_rows or default_tile_rows(n * K, E)
        dispatch = lambda f: dispatch_lib.tile_dispatch(f, E, t)  # noqa: E731
        rows, groups = dispatch_lib.num_tiles(n * K, E, t) * t, t

    def move_loss(x2d, gates):
        dd = dispatch(flat)
        buf = dispatch_lib.dispatch_rows(x2d, dd.slot_assign, dd.assign_slot, K)
        y = dispatch_lib.combine_rows(buf, gates, dd.slot_assign, dd.assign_slot, K)
        return jnp.sum(y * r2d)

    out["move_ms"], _ = median_ms(a, jax.jit(jax.grad(move_loss, argnums=(0, 1))), x2d.astype(m.compute_dtype), gates)
    wg, wu, wd = m._expert_weights()
    buf = jax.random.normal(jax.random.key(1), (rows, d), jnp.float32).astype(m.compute_dtype)
    if groups is None:
        def gemm_loss(buf, wg, wu, wd):
            b = buf.reshape(E, -1, d)
            return jnp.sum(m._swiglu_grouped(b, wg, wu, wd).astype(jnp.float32))
    else:
        ge = dispatch_lib.tile_dispatch(flat, E, groups).group_expert

        def gemm_loss(buf, wg, wu, wd):
            b = buf.reshape(-1, groups, d)
            mm = lambda u, w: dispatch_lib.tile_matmul(u, w, ge)  # noqa: E731
            return jnp.sum(mm(jax.nn.silu(mm(b, wg)) * mm(b, wu), wd).astype(jnp.float32))
    out["gemm_ms"], _ = median_ms(a, jax.jit(jax.grad(gemm_loss, argnums=(0, 1, 2, 3))), buf, wg, wu, wd)
    out["gemm_rows"] = rows
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def time_path(a, path: str, x: jax.Array, r: jax.Array) -> dict:
    module, is_moe = build(a, path)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(p, x):
        out = nnx.merge(graphdef, p, rest)(x)
        y, aux = (out[0], out[1]["aux_loss"]) if is_moe else (out, 0.0)
        return jnp.sum(y.astype(jnp.float32) * r) + aux, (out[1] if is_moe else {})

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    t0 = time.perf_counter()
    default_sum = dispatch_lib.TILE_WEIGHT_GRAD_SUM
    if ":" in path:  # the variant is read while tracing
        dispatch_lib.TILE_WEIGHT_GRAD_SUM = path.split(":")[1]
    try:
        out = step(params, x)
    finally:
        dispatch_lib.TILE_WEIGHT_GRAD_SUM = default_sum
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    print(f"# {path}: compiled and ran once in {compile_s:.1f} s", file=sys.stderr, flush=True)
    for _ in range(a.warmup):
        jax.block_until_ready(step(params, x))
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    (_, stats), _ = out
    # 3 GEMMs of 2·D·H FLOPs per active expert and token, ×3 for forward + backward
    active = (a.top_k + a.shared) * 3 * a.d_model * a.expert_hidden
    row = {"path": path, "ms": round(ms, 3), "tokens_per_s": round(a.tokens / ms * 1e3),
           "active_tflops": round(6 * active * a.tokens / (ms * 1e-3) / 1e12, 2), "compile_s": round(compile_s, 2)}
    if is_moe:
        row["max_vio"] = round(float(stats["max_vio"]), 3)
        row["dropped_frac"] = round(float(stats["dropped_frac"]), 4)
        if path.startswith("tiles"):
            row["tile_rows"] = module.tile_rows or default_tile_rows(a.tokens * a.top_k, a.experts)
    return row


def main(argv=None):
    a = parse_args(argv)
    dev = jax.devices()[0]
    header = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
              **{k: v for k, v in vars(a).items() if k not in ("small",)}}
    print(json.dumps({"header": header}), flush=True)
    kx, kr = jax.random.split(jax.random.key(0))
    dt = jnp.bfloat16 if a.dtype == "bfloat16" else jnp.float32
    x = jax.random.normal(kx, (a.tokens // a.seq, a.seq, a.d_model), jnp.float32).astype(dt)
    r = jax.random.normal(kr, x.shape, jnp.float32)
    rows = []
    for path in a.paths.split(","):
        path = path.strip()
        print(f"# {path}: building", file=sys.stderr, flush=True)
        try:
            row = time_path(a, path, x, r)
        except Exception as e:  # report and go on (e.g. out of memory for one path)
            row = {"path": path, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if a.breakdown and (path == "capacity" or path.startswith("tiles")) and "ms" in row:
            print(json.dumps(breakdown(a, path.split(":")[0], x, r)), flush=True)
    ms = {row["path"]: row["ms"] for row in rows if "ms" in row}
    summary = {p: {"tokens_per_s": round(a.tokens / t * 1e3)} for p, t in ms.items()}
    for p, t in ms.items():
        for ref in ("dense", "capacity"):
            if ref in ms:
                summary[p][f"time_vs_{ref}"] = round(t / ms[ref], 3)
    print(json.dumps({"summary": summary}), flush=True)

if __name__ == "__main__":
    main()
