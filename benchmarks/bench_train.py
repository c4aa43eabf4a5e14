"""Training-step throughput of efftrain presets: tokens/s, model TFLOP/s and MFU.

    python benchmarks/bench_train.py dense-125m deepseek-125m --steps 30 [--set fp8.enabled=true ...]
    python benchmarks/bench_train.py dense-125m --variant fp8=fp8.enabled=true --variant ...
    python benchmarks/bench_train.py dense-25m --variant det=train.deterministic=true \
        --variant-options 'det={"xla_gpu_exclude_nondeterministic_ops": true}'
    python benchmarks/bench_train.py dense-25m --replicas 1,3   # seeds trained together (vmapped)
    python benchmarks/bench_train.py dense-25m --profile /tmp/prof  # + where the device time goes

Each (preset, variant) is timed in the same process on random tokens (data loading excluded: it is
measured separately by the trainer), after `--warmup` compiled steps, as the median over `--repeats`
windows of `--steps` steps, each window ending in one device sync. One JSON line per case, with ratios
against the first case, so compared numbers come from the same run on the same device. `--replicas R`
trains R seeds together in one program, the step vmapped over a leading replica axis of the state and
the batch; its tokens/s count all R replicas' tokens (docs/BENCHMARKS.md: measured, not adopted). `--profile DIR` traces
`--steps` more steps of each case with jax.profiler (DIR/<case>/, a Perfetto trace) and adds to its
line the device's busy fraction of the traced wall time and the ops that took most device time.
FLOPs per token: efftrain.model.transformer.flops_per_token (6·active matmul params + attention core).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from efftrain.config import load_config
from efftrain.model.transformer import build_model, flops_per_token, parameter_counts
from efftrain.train.loop import peak_flops, total_steps_of
from efftrain.train.optimizer import make_optimizer
from efftrain.train.step import init_state, make_train_step
from efftrain.xla import step_options


def replicate_step(step, compiler_options: dict):
    """One jitted program running the plain `step` for R replicas: state and batch [R, ...], tokens_seen shared."""
    return jax.jit(jax.vmap(step, in_axes=(0, 0, None)), donate_argnums=(0,), compiler_options=compiler_options or None)


def _union_us(spans: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals (microseconds)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def device_time_summary(trace_dir: str, steps: int, top: int = 25) -> dict:
    """From the Perfetto trace jax.profiler wrote under trace_dir: per device thread (GPU streams, the
    "XLA Ops" line) the busy time per step, and the `top` event names by total device time per step.
    Busy time over the traced wall time is how far the step keeps the device fed (launch-bound: low)."""
    path = sorted(glob.glob(f"{trace_dir}/**/*perfetto_trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    wall = (max(e["ts"] + e["dur"] for e in spans) - min(e["ts"] for e in spans)) if spans else 0.0
    out = {"trace": path, "traced_wall_ms_per_step": wall / 1e3 / steps, "threads": {}}
    for (pid, tid), name in threads.items():
        if not procs.get(pid, "").startswith("/device:"):
            continue
        mine = [e for e in spans if e["pid"] == pid and e["tid"] == tid]
        if not mine:
            continue
        by_name = collections.Counter()
        for e in mine:
            by_name[e["name"]] += e["dur"]
        busy = _union_us([(e["ts"], e["ts"] + e["dur"]) for e in mine])
        out["threads"][f"{procs[pid]} {name}"] = {
            "events_per_step": len(mine) / steps, "busy_ms_per_step": busy / 1e3 / steps,
            "busy_fraction_of_wall": busy / wall if wall else None,
            "top_ms_per_step": {k: round(v / 1e3 / steps, 4) for k, v in by_name.most_common(top)}}
    return out


def bench_case(preset: str, overrides: list[str], steps: int, warmup: int, repeats: int,
               extra_options: dict | None = None, replicas: int = 1, profile: str | None = None) -> dict:
    cfg = load_config(preset, overrides)
    tx = make_optimizer(cfg.optim, total_steps_of(cfg))
    states = []
    for seed in range(replicas):
        model = build_model(cfg.model, cfg.fp8, seed=seed)
        counts = parameter_counts(model)
        fpt = flops_per_token(model, cfg.data.seq_len)
        graphdef, state = init_state(model, tx)
        states.append(state)
        del model
    options = step_options(cfg.train.deterministic)
    if extra_options:  # on top of what efftrain itself compiles the step with
        options = {**options, **extra_options}
    step = make_train_step(graphdef, cfg, tx, compiler_options=options, jit=replicas == 1)
    accum, b, t = cfg.train.grad_accum, cfg.train.batch_size, cfg.data.seq_len
    shape = (accum, b // accum, t + 1)
    if replicas > 1:
        step, state, shape = replicate_step(step, options), jax.tree.map(lambda *xs: jnp.stack(xs), *states), (replicas, *shape)
    del states
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32)) for _ in range(4)]
    tokens_seen = jnp.float32(0)
    t0 = time.perf_counter()
    for i in range(warmup):
        state, metrics = step(state, batches[i % 4], tokens_seen)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    windows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            state, metrics = step(state, batches[i % 4], tokens_seen)
        jax.block_until_ready(metrics["loss"])
        windows.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(windows)
    tok_s = replicas * cfg.tokens_per_step / step_s
    profiled = None
    if profile:
        with jax.profiler.trace(profile, create_perfetto_trace=True):
            for i in range(steps):
                state, metrics = step(state, batches[i % 4], tokens_seen)
            jax.block_until_ready(metrics["loss"])
        profiled = device_time_summary(profile, steps)
    peak = peak_flops(jax.devices()[0])
    return {
        "preset": preset, "overrides": overrides, "replicas": replicas, "params_total": counts["total"],
        "params_active": counts["active"], "params_non_embedding": counts["non_embedding"],
        "flops_per_token": fpt, "tokens_per_step": cfg.tokens_per_step, "step_ms": 1e3 * step_s,
        "tokens_per_s": tok_s, "model_tflops": tok_s * fpt / 1e12,
        "mfu": tok_s * fpt / peak if peak else None, "compile_and_warmup_s": compile_s,
        "loss": float(jnp.mean(metrics["loss"])), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        **({"profile": profiled} if profiled else {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("presets", nargs="+")
    p.add_argument("--set", action="append", default=[], help="override applied to every case")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=key=value[,key=value]: also time each preset with these overrides")
    p.add_argument("--variant-options", action="append", default=[], metavar="NAME=JSON",
                   help="extra XLA compile options of the step of variant NAME (base: the presets' own)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--replicas", default="1", help="comma list: time each case with R seeds trained together")
    p.add_argument("--profile", metavar="DIR", help="also trace --steps steps of each case into DIR/<case>")
    args = p.parse_args()
    extra = {}
    for v in args.variant_options:
        name, _, options = v.partition("=")
        extra[name] = json.loads(options)
    cases = []
    for preset in args.presets:
        cases.append((preset, "base", list(args.set)))
        for v in args.variant:
            name, _, spec = v.partition("=")
            cases.append((preset, name, list(args.set) + spec.split(",")))
    first = None
    for (preset, name, overrides), replicas in ((c, int(r)) for c in cases for r in args.replicas.split(",")):
        try:
            trace = str(Path(args.profile) / f"{preset}-{name}-r{replicas}") if args.profile else None
            row = bench_case(preset, overrides, args.steps, args.warmup, args.repeats, extra.get(name), replicas, trace)
        except Exception as e:  # noqa: BLE001 - a variant XLA cannot compile is a result, not the end
            print(json.dumps({"preset": preset, "variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"}),
                  flush=True)
            continue
        row["variant"] = name
        row["xla_options"] = extra.get(name, {})
        if first is None:
            first = row
        row["step_time_ratio_vs_first"] = row["step_ms"] / first["step_ms"]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
