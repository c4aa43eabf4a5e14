"""PTQ throughput: rows/s of RTN / GPTQ / AWQ on a run's checkpoint or a randomly initialised preset.

    python benchmarks/bench_ptq.py --preset dense-25m --methods rtn,gptq,awq --bits 4 --out ptq.json
    python benchmarks/bench_ptq.py --run runs/dense-25m --step 1000 --calib-samples 128
    python benchmarks/bench_ptq.py --small --out /tmp/ptq.json        # CPU smoke test, well under a minute
    python benchmarks/bench_ptq.py --methods rtn --bits 3,4 --eval-windows 2048 --eval-rows 4 --repeats 3

    # the first row of a new model of known shapes, its programs compiled by an earlier process:
    python benchmarks/bench_ptq.py --methods rtn --eval-windows 2048 --compilation-cache /tmp/jax-cache --out a.json
    python benchmarks/bench_ptq.py --methods rtn --eval-windows 2048 --compilation-cache /tmp/jax-cache \
        --init-seed 1 --out b.json                                    # b.json's first_row_s: from the cache

A "row" is one `quantize_model` call (one (method, bits, group, format) of one checkpoint, as a PTQ sweep
row, without its evaluation unless --eval-windows > 0). For each method, in one process: the first row's
latency (compilation included), then --repeats warm rows (median; every one starts from the unquantized
weights, rows of other bit widths reuse the compiled programs), each ending in a device sync. With
--eval-windows the 16-bit model's hidden states are computed once, before the rows, and reused by every
row, as the sweep does per checkpoint (`reference_s` in the JSON; --no-reuse runs the 16-bit model in
each row). With --eval-rows K the warm rows run as the sweep's PTQSpec.eval_rows: in chunks of K rows
(bit widths alternating) scored together in one pass over the windows (compare_params_many), a row's
time = its chunk's / K (the JSON's eval_rows); the first row stays a single row, and a first chunk, kept
out of the median (`first_chunk`: its seconds and compile times), compiles the K-row evaluation before
the --repeats timed chunks.
--compilation-cache DIR turns on JAX's persistent compilation cache there (efftrain.xla), so that a
second process with the same DIR and another --init-seed times the first row of a new model whose
programs are already compiled. Calibration tokens are random ids (the speed does not depend on them);
with --run, the weights are the checkpoint's.
Prints a table and writes the rows, the device and the settings as JSON to --out, with the seconds the
first row spent compiling, per jitted function (jax.monitoring), and those spent by the warm rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efftrain.cli import parse_choice_list
from efftrain.config import ConfigError, load_config
from efftrain.model.transformer import build_model
from efftrain.quant.apply import METHODS, QuantSettings, quantize_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="dense-25m", help="randomly initialised preset (default dense-25m)")
    src.add_argument("--run", help="a run directory: quantize its series checkpoint --step")
    p.add_argument("--step", type=int, help="series checkpoint of --run (default: the last)")
    p.add_argument("--methods", default="rtn,gptq,awq", help=f"comma-separated: {', '.join(METHODS)}")
    p.add_argument("--bits", default="4", help="comma-separated bit widths; the first is timed cold")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, help="default: the config's seq_len")
    p.add_argument("--repeats", type=int, help="warm rows per method, median reported (default 2, 1 with "
                   "--small); chunks of --eval-rows rows with that")
    p.add_argument("--eval-windows", type=int, default=0, help="also score this many val windows per row")
    p.add_argument("--no-reuse", action="store_true", help="with --eval-windows: run the 16-bit model in every "
                   "row instead of reusing its hidden states per checkpoint (the sweep reuses them)")
    p.add_argument("--eval-rows", type=int, default=1, help="warm rows scored together per pass over the "
                   "eval windows, as PTQSpec.eval_rows (default 1: one pass per row)")
    p.add_argument("--compilation-cache", metavar="DIR", help="JAX's persistent compilation cache in DIR")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random preset's weights (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--small", action="store_true", help="dense-tiny, 8 x 64 calibration tokens, 1 repeat unless "
                   "--repeats")
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    if a.small:
        a.preset, a.calib_samples, a.calib_seq_len = "dense-tiny", 8, 64
    if a.repeats is None:
        a.repeats = 1 if a.small else 2
    return a


def load(a):
    """(cfg, graphdef, params, rest) of the checkpoint or the random preset."""
    if a.run:
        from efftrain.train.rundir import load_model

        from efftrain.train.checkpoint import CheckpointStore

        step = a.step
        if step is None:
            store = CheckpointStore(a.run, read_only=True)
            step = store.series()[-1]["step"]
            store.close()
        cfg, model, _ = load_model(a.run, step)
    else:
        cfg = load_config(a.preset, a.set)
        model = build_model(cfg.model, cfg.fp8, seed=a.init_seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return cfg, graphdef, params, rest


class CompileTimes:
    """Seconds of XLA compilation per jitted function, from jax.monitoring (event durations carry the
    function's name): where a first row's time goes."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.seconds: dict[str, float] = {}
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if event == self.EVENT:
            name = kwargs.get("fun_name", "?")
            self.seconds[name] = self.seconds.get(name, 0.0) + duration

    def take(self, top: int = 8) -> dict:
        """{"total_s", "by_function": [(name, s), ...]} since the last take, largest first."""
        items = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        self.seconds = {}
        return {"total_s": round(sum(v for _, v in items), 2),
                "by_function": [[k, round(v, 2)] for k, v in items[:top]]}


def rows(graphdef, params, rest, calib, settings: list[QuantSettings], windows=None, reference=None) -> float:
    """Seconds to quantize a fresh copy of the weights with each of `settings` and, with `windows`,
    score them: one row with compare_params, more together with compare_params_many (the sweep's
    chunks). The copies are made before the clock starts."""
    models = [nnx.merge(graphdef, jax.tree.map(jnp.array, params), rest) for _ in settings]
    jax.block_until_ready(jax.tree.leaves([nnx.state(m) for m in models]))
    t0 = time.perf_counter()
    qparams = []
    for model, s in zip(models, settings):
        quantize_model(model, calib, s)
        qparams.append(nnx.split(model, nnx.Param, ...)[1])
    jax.block_until_ready(jax.tree.leaves(qparams))
    if windows is not None:
        from efftrain.eval import compare_params, compare_params_many

        if len(qparams) == 1:
            compare_params(graphdef, params, qparams[0], rest, windows, reference)
        else:
            compare_params_many(graphdef, params, qparams, rest, windows, reference)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.compilation_cache:
        from efftrain.xla import COMPILATION_CACHE_ENV, enable_compilation_cache

        os.environ[COMPILATION_CACHE_ENV] = a.compilation_cache
        enable_compilation_cache()
    try:
        methods = parse_choice_list(a.methods, "--methods", METHODS)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bits = [int(b) for b in a.bits.split(",") if b.strip()]
    cfg, graphdef, params, rest = load(a)
    seq = a.calib_seq_len or cfg.data.seq_len
    calib = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (a.calib_samples, seq)).astype(np.int32)
    windows = None
    if a.eval_windows:
        from efftrain.eval import eval_set

        windows = eval_set(cfg, a.eval_windows, seed=0)
    reference, reference_s = None, None
    if windows is not None and not a.no_reuse:  # the 16-bit hidden states, once per checkpoint (as the sweep)
        from efftrain.eval import reference_states

        t0 = time.perf_counter()
        reference = jax.block_until_ready(reference_states(graphdef, params, rest, windows))
        reference_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(params))
    results = []
    compiles = CompileTimes()
    k = a.eval_rows  # rows per warm chunk
    for method in methods:
        def settings(first_row, n):  # n rows, bit widths alternating from the first row's index on
            return [QuantSettings(method=method, bits=bits[i % len(bits)], group_size=a.group_size)
                    for i in range(first_row, first_row + n)]

        compiles.take()
        cold = rows(graphdef, params, rest, calib, settings(0, 1), windows, reference)
        first_compiles = compiles.take()
        first_chunk = None
        if k > 1:  # compiles the K-row evaluation, outside the warm rows
            first_chunk = rows(graphdef, params, rest, calib, settings(1, k), windows, reference)
            first_chunk = {"seconds": first_chunk, "compile": compiles.take()}
        warm = [rows(graphdef, params, rest, calib, settings(1 + i * k, k), windows, reference) / k
                for i in range(a.repeats)]
        per_row = statistics.median(warm) if warm else cold
        results.append({"method": method, "bits": bits, "group_size": a.group_size, "first_row_s": cold,
                        "first_chunk": first_chunk, "warm_row_s": per_row, "warm_rows_s": warm,
                        "rows_per_s": 1 / per_row, "first_row_compile": first_compiles,
                        "warm_rows_compile_s": compiles.take()["total_s"]})
    result = {"source": a.run or a.preset, "step": a.step, "params": int(n_params), "layers": cfg.model.n_layers,
              "init_seed": None if a.run else a.init_seed, "calib_tokens": int(calib.size),
              "eval_windows": a.eval_windows, "eval_rows": k, "compilation_cache": a.compilation_cache,
              "reuse_16bit_hidden": reference is not None, "reference_s": reference_s, "device": str(jax.devices()[0]),
              "backend": jax.default_backend(), "jax": jax.__version__, "rows": results}
    print(f"{result['source']}: {n_params / 1e6:.1f}M params, {cfg.model.n_layers} layers, "
          f"{calib.size:,} calibration tokens, {a.eval_windows} eval windows, warm rows scored {k} at a time, "
          f"{result['device']}")
    print(f"{'method':10s} {'first row (s)':>14s} {'warm row (s)':>13s} {'rows/s':>8s}")
    for r in results:
        print(f"{r['method']:10s} {r['first_row_s']:14.2f} {r['warm_row_s']:13.2f} {r['rows_per_s']:8.3f}")
        top = ", ".join(f"{name} {v:.1f}s" for name, v in r["first_row_compile"]["by_function"][:4])
        print(f"{'':10s} first row: {r['first_row_compile']['total_s']:.1f} s compiling ({top})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
