"""Training-step throughput of efftrain presets: tokens/s, model TFLOP/s and MFU.

    python benchmarks/bench_train.py dense-125m deepseek-125m --steps 30 [--set fp8.enabled=true ...]
    python benchmarks/bench_train.py dense-125m --variant fp8=fp8.enabled=true --variant ...
    python benchmarks/bench_train.py dense-25m --variant det=train.deterministic=true \
        --variant-options 'det={"xla_gpu_exclude_nondeterministic_ops": true}'

Each (preset, variant) is timed in the same process on random tokens (data loading excluded: it is
measured separately by the trainer), after `--warmup` compiled steps, as the median over `--repeats`
windows of `--steps` steps, each window ending in one device sync. One JSON line per case, with ratios
against the first case, so compared numbers come from the same run on the same device.
FLOPs per token: efftrain.model.transformer.flops_per_token (6·active matmul params + attention core).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from efftrain.config import load_config
from efftrain.model.transformer import build_model, flops_per_token, parameter_counts
from efftrain.train.loop import peak_flops, total_steps_of
from efftrain.train.optimizer import make_optimizer
from efftrain.train.step import init_state, make_train_step
from efftrain.xla import step_options


def bench_case(preset: str, overrides: list[str], steps: int, warmup: int, repeats: int,
               extra_options: dict | None = None) -> dict:
    cfg = load_config(preset, overrides)
    model = build_model(cfg.model, cfg.fp8, seed=0)
    counts = parameter_counts(model)
    fpt = flops_per_token(model, cfg.data.seq_len)
    tx = make_optimizer(cfg.optim, total_steps_of(cfg))
    graphdef, state = init_state(model, tx)
    del model
    options = None
    if extra_options:  # on top of what efftrain itself compiles the step with
        options = {**step_options(cfg.train.deterministic), **extra_options}
    step = make_train_step(graphdef, cfg, tx, compiler_options=options)
    accum, b, t = cfg.train.grad_accum, cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.integers(0, cfg.model.vocab_size, (accum, b // accum, t + 1), dtype=np.int32))
               for _ in range(4)]
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
    tok_s = cfg.tokens_per_step / step_s
    peak = peak_flops(jax.devices()[0])
    return {
        "preset": preset, "overrides": overrides, "params_total": counts["total"],
        "params_active": counts["active"], "params_non_embedding": counts["non_embedding"],
        "flops_per_token": fpt, "tokens_per_step": cfg.tokens_per_step, "step_ms": 1e3 * step_s,
        "tokens_per_s": tok_s, "model_tflops": tok_s * fpt / 1e12,
        "mfu": tok_s * fpt / peak if peak else None, "compile_and_warmup_s": compile_s,
        "loss": float(metrics["loss"]), "device": jax.devices()[0].device_kind, "jax": jax.__version__,
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
    for preset, name, overrides in cases:
        try:
            row = bench_case(preset, overrides, args.steps, args.warmup, args.repeats, extra.get(name))
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
