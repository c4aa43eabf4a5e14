"""What the MoE expert exchange communicates: the collectives of the compiled train step, per mode.

    python benchmarks/bench_expert_exchange.py                      # 8 fake CPU devices (no GPU needed)
    python benchmarks/bench_expert_exchange.py --mesh data=2,expert=4 --mesh expert=8 --steps 5

For each mesh, dispatch (dropless, capacity) and `model.moe.expert_exchange` (gspmd: one global dispatch
that XLA partitions; all_to_all: efftrain/model/expert_parallel.py), the train step is compiled as the
trainer compiles it (state sharded by efftrain.train.sharding, batch over every mesh axis) and the
optimized HLO's collectives are listed: how many of each kind and the bytes of their results per step
(per device, forward + backward + optimizer). One JSON line per case. With `--steps N` it also times N
steps (median of 3 windows); on fake CPU devices those times say nothing about GPUs, only the
collective counts and bytes carry over. On a machine with GPUs run it without --cpu-devices.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import Counter

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}


def collective_bytes(hlo_text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": n, "bytes": result bytes}} of the collectives in an optimized HLO module (a tuple
    result counts all its elements; an async collective counts once, at its -done, whose result is the
    collective's result: a -start's tuple also holds the operand)."""
    found: dict[str, Counter] = {k: Counter() for k in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.+?) (all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)"
                     r"(-done)?\(", line)
        if not m:
            continue
        shapes = re.findall(r"\b(pred|[su](?:8|16|32|64)|bf16|f16|f32|f64)\[([\d,]*)\]", m.group(1))
        size = sum(_BYTES[t] * _prod(dims) for t, dims in shapes)
        found[m.group(2)]["count"] += 1
        found[m.group(2)]["bytes"] += size
    return {k: dict(v) for k, v in found.items() if v}


def _prod(dims: str) -> int:
    out = 1
    for d in filter(None, dims.split(",")):
        out *= int(d)
    return out


def case(mesh_spec: dict, dispatch: str, exchange: str, steps: int, shape: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from efftrain.config import from_dict
    from efftrain.model.transformer import build_model
    from efftrain.train.loop import total_steps_of
    from efftrain.train.optimizer import make_optimizer
    from efftrain.train.sharding import batch_sharding, make_mesh, state_shardings
    from efftrain.train.step import init_state, make_train_step

    raw = {"name": "bench-exchange",
           "model": {"vocab_size": shape["vocab"], "d_model": shape["d_model"], "n_layers": shape["layers"],
                     "n_heads": 4, "mlp_hidden": 4 * shape["d_model"], "compute_dtype": shape["dtype"],
                     "moe": {"enabled": True, "num_routed_experts": shape["experts"], "top_k": shape["top_k"],
                             "expert_hidden": shape["expert_hidden"], "num_shared_experts": 1,
                             "dispatch": dispatch, "expert_exchange": exchange}},
           "data": {"source": "pystdlib", "seq_len": shape["seq_len"]},
           "train": {"batch_size": shape["batch"], "max_steps": 100, "data_parallel": -1, "mesh": mesh_spec}}
    cfg = from_dict(raw)
    model = build_model(cfg.model, cfg.fp8, seed=0)
    tx = make_optimizer(cfg.optim, total_steps_of(cfg))
    graphdef, state = init_state(model, tx)
    mesh = make_mesh(cfg)
    shardings = state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    step = make_train_step(graphdef, cfg, tx, state_sharding=shardings, mesh=mesh)
    rng = np.random.default_rng(0)
    batch = jax.device_put(rng.integers(0, shape["vocab"], (1, shape["batch"], shape["seq_len"] + 1), dtype=np.int32),
                           batch_sharding(mesh))
    tokens = jnp.float32(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, tokens).compile()
    row = {"mesh": mesh_spec, "dispatch": dispatch, "expert_exchange": exchange, "shape": shape,
           "compile_s": time.perf_counter() - t0, "collectives": collective_bytes(compiled.as_text()),
           "device": jax.devices()[0].device_kind, "devices": len(jax.devices()), "jax": jax.__version__}
    if steps:
        windows = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = step(state, batch, tokens)
            jax.block_until_ready(metrics["loss"])
            windows.append((time.perf_counter() - t0) / steps)
        row["step_ms"] = 1e3 * statistics.median(windows)
        row["loss"] = float(metrics["loss"])
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", action="append", default=[], help="axis=size[,axis=size] (default data=2,expert=4)")
    p.add_argument("--dispatch", default="dropless,capacity")
    p.add_argument("--cpu-devices", type=int, default=8, help="fake CPU devices (0: the machine's own devices)")
    p.add_argument("--steps", type=int, default=0, help="also time this many steps per window")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.cpu_devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    meshes = [dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in m.split(",")) for m in args.mesh] \
        or [{"data": 2, "expert": 4}]
    shape = {"d_model": args.d_model, "layers": args.layers, "experts": args.experts, "top_k": args.top_k,
             "expert_hidden": args.expert_hidden, "batch": args.batch, "seq_len": args.seq_len,
             "vocab": args.vocab, "dtype": args.dtype}
    for mesh in meshes:
        for dispatch in args.dispatch.split(","):
            for exchange in ("gspmd", "all_to_all"):
                print(json.dumps(case(mesh, dispatch, exchange, args.steps, shape)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
