"""Recovery-row throughput: seconds per LoRA / QAT recovery row (efftrain.quant.recovery) of a preset.

    python benchmarks/bench_recovery.py --preset dense-25m --tokens 2000000 --out recovery.json
    python benchmarks/bench_recovery.py --small --out /tmp/recovery.json     # CPU smoke test

A row as the sweep makes it (`recovery_row`): quantize a randomly initialised preset with RTN at --bits
(group 128 or whole channels), score it, train the recovery for --tokens train tokens, score again on
--eval-windows val windows against the 16-bit model's reused hidden states. Tokens are random ids (the
speed does not depend on them). Per method, in one process: the first row (compilation included), then
--repeats warm rows (median), each ending in a device sync. The issue's target: a recovery row of a
<= 25M model with a 2M-token budget in <= 10 s on an H200. One JSON object per method in --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import numpy as np
from flax import nnx

from efftrain.config import load_config
from efftrain.eval import EvalSet, eval_batch_size, reference_states
from efftrain.model.transformer import build_model
from efftrain.quant.apply import QuantSettings
from efftrain.quant.recovery import RecoverySpec, recovery_row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dense-25m")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--methods", default="lora,qat")
    p.add_argument("--tokens", type=int, default=2_000_000, help="recovery budget in train tokens")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--small", action="store_true", help="dense-tiny shrunk, 2 steps of budget, 1 repeat")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.small:
        a.preset, a.repeats, a.calib_samples, a.eval_windows, a.group_size = "dense-tiny", 1, 4, 8, -1
        a.set = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.mlp_hidden=64",
                 "model.vocab_size=256", "data.seq_len=32", "train.batch_size=4", *a.set]
        a.tokens = 2 * 4 * 32
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    cfg = load_config(a.preset, a.set)
    rng = np.random.default_rng(0)
    graphdef, params, rest = nnx.split(build_model(cfg.model, cfg.fp8, seed=0), nnx.Param, ...)
    T, V = cfg.data.seq_len, cfg.model.vocab_size
    calib = rng.integers(0, V, (a.calib_samples, T), dtype=np.int32)
    windows = EvalSet(rng.integers(0, V, (a.eval_windows, T + 1), dtype=np.int32), eval_batch_size(cfg))
    train_tokens = rng.integers(0, V, max(4 * a.tokens, 16 * (T + 1)), dtype=np.int32)
    reference = reference_states(graphdef, params, rest, windows)
    s = QuantSettings(method="rtn", bits=a.bits, group_size=a.group_size)
    results = []
    for method in a.methods.split(","):
        entry = RecoverySpec(method=method, tokens=a.tokens)
        times, row = [], None
        for _ in range(1 + a.repeats):
            t0 = time.perf_counter()
            row, _, _ = recovery_row(cfg, graphdef, params, rest, s, entry, calib=calib, windows=windows,
                                     reference=reference, train_tokens=train_tokens)
            jax.effects_barrier()
            times.append(time.perf_counter() - t0)
        result = {"preset": a.preset, "overrides": a.set, "method": method, "tokens": a.tokens,
                  "steps": row.get("recovery_steps"), "bits": a.bits, "group_size": a.group_size,
                  "eval_windows": a.eval_windows, "first_row_s": round(times[0], 2),
                  "warm_row_s": round(statistics.median(times[1:]), 2) if len(times) > 1 else None,
                  "device": jax.devices()[0].device_kind, "jax": jax.__version__}
        results.append(result)
        print(json.dumps(result), flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
