"""Is training bitwise reproducible? Train one config twice, in two fresh processes, and compare bits.

    python benchmarks/check_determinism.py --preset dense-25m --steps 100 --out /tmp/det
    python benchmarks/check_determinism.py --preset deepseek-25m --modes true --no-resume --out /tmp/det
    python benchmarks/check_determinism.py --small --out /tmp/det        # CPU smoke test (dense-tiny)

For each `train.deterministic` mode in --modes, in separate processes with the same seed and the same
batches (random tokens, a fixed function of the step: data loading is tested on CPU, tests/test_train.py):
  run A and run B     --steps steps each, from scratch;
  resume (optional)   one process trains --steps // 2 steps and writes the whole train state to disk,
                      a second loads it and trains the rest: resuming as efftrain does after a kill.
Compared bitwise against run A: the loss of every step and every leaf of the final state (params, MoE
router biases, optimizer moments), and, with --ptq, the weights of the final model after RTN and GPTQ
(3-bit, group 128, 16 random calibration sequences) and the scores of their PTQ rows (QiD, KL, top-1 ...
on 64 random windows, computed as the sweep does). Each mode gets its own fresh per-fusion autotune cache
(EFFTRAIN_AUTOTUNE_CACHE), so run A autotunes and later processes reuse its choices, as successive
efftrain processes on one machine do. The JAX compilation cache is off: every process compiles.

Prints one line per comparison and writes them, with the device and versions, to OUT/determinism.json
(rewritten after every comparison, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from efftrain.cli import parse_choice_list
from efftrain.config import ConfigError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dense-25m")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--modes", default="false,true", help="train.deterministic values to check")
    p.add_argument("--no-resume", action="store_true", help="skip the interrupted-and-resumed run")
    p.add_argument("--ptq", action="store_true", help="also compare the final model quantized by RTN and GPTQ")
    p.add_argument("--small", action="store_true", help="dense-tiny, 6 steps (a CPU smoke test)")
    p.add_argument("--out", required=True, help="directory for determinism.json and the runs' files")
    p.add_argument("--timeout", type=int, default=900, help="seconds per process")
    p.add_argument("--step-options", help="JSON: compile the step with these XLA options instead of "
                   "efftrain.xla.step_options' (to find which option a mode needs)")
    # worker mode (one training process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--deterministic", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--last", type=int, help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.small:
        a.preset, a.steps = "dense-tiny", 6
    return a


# ----------------------------------------------------------------------------------------------
# One training process
# ----------------------------------------------------------------------------------------------
def worker(a) -> int:
    import jax
    import jax.numpy as jnp

    from efftrain.config import load_config
    from efftrain.model.transformer import build_model
    from efftrain.train.rundir import total_steps_of
    from efftrain.train.optimizer import make_optimizer
    from efftrain.train.step import init_state, make_train_step

    if a.step_options is not None:
        import efftrain.train.step as step_module

        options = json.loads(a.step_options)
        step_module.step_options = lambda deterministic: options
    cfg = load_config(a.preset, [*a.set, f"train.deterministic={a.deterministic}"])
    model = build_model(cfg.model, cfg.fp8, seed=cfg.train.seed)
    tx = make_optimizer(cfg.optim, total_steps_of(cfg))
    graphdef, state = init_state(model, tx)
    del model
    leaves, treedef = jax.tree.flatten(state)
    if a.load:
        with np.load(a.load) as saved:
            leaves = [jnp.asarray(saved[f"leaf{i}"]) for i in range(len(leaves))]
        state = jax.tree.unflatten(treedef, leaves)
    step = make_train_step(graphdef, cfg, tx)
    accum, b, t = cfg.train.grad_accum, cfg.train.batch_size, cfg.data.seq_len
    batches = [jnp.asarray(np.random.default_rng(i).integers(0, cfg.model.vocab_size, (accum, b // accum, t + 1),
                                                              dtype=np.int32)) for i in range(8)]
    losses, t_first = [], None
    t0 = time.perf_counter()
    for i in range(a.first, a.last):
        state, metrics = step(state, batches[i % 8], jnp.float32(i * cfg.tokens_per_step))
        losses.append(metrics["loss"])
        if t_first is None:
            jax.block_until_ready(metrics["loss"])
            t_first = time.perf_counter()
    losses = np.asarray(jax.device_get(losses), np.float32)
    elapsed = time.perf_counter() - t_first
    host = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(state))]
    if a.save:
        np.savez(a.save, **{f"leaf{i}": x for i, x in enumerate(host)})
    groups = ["state"] * len(host)
    if a.ptq:
        ptq_groups, ptq_leaves = quantized_leaves(graphdef, state, cfg)
        host, groups = host + ptq_leaves, groups + ptq_groups
    steps_timed = max(a.last - a.first - 1, 1)
    result = {"losses": [float(x) for x in losses], "loss_bits": losses.view(np.uint32).tolist(),
              "leaf_sha256": [hashlib.sha256(x.tobytes()).hexdigest() for x in host], "leaf_groups": groups,
              "first_step_s": t_first - t0, "tokens_per_s": steps_timed * cfg.tokens_per_step / max(elapsed, 1e-9),
              "device": str(jax.devices()[0]), "jax": jax.__version__}
    Path(a.result).write_text(json.dumps(result))
    return 0


def quantized_leaves(graphdef, state, cfg) -> tuple[list[str], list[np.ndarray]]:
    """(group names, leaves): the final model's weights after RTN and after GPTQ (3 bits, g128, 16 random calibration
    sequences of the config's length), and their PTQ rows' scores (loss_16, loss_q, qid, kl, top1 and
    standard errors, as float64 arrays) against the 16-bit model on 64 random windows, computed as the
    sweep computes them (16-bit hidden states once, rows scored together, PTQSpec.eval_rows), as host
    arrays; groups "rtn weights", "gptq weights", "rtn row", "gptq row"."""
    import jax
    from flax import nnx

    from efftrain.eval import EvalSet, compare_params_many, reference_states
    from efftrain.quant.apply import QuantSettings, quantize_model
    from efftrain.quant.sweep import PTQSpec

    rng = np.random.default_rng(1)
    calib = rng.integers(0, cfg.model.vocab_size, (16, cfg.data.seq_len)).astype(np.int32)
    windows = EvalSet(rng.integers(0, cfg.model.vocab_size, (64, cfg.data.seq_len + 1)).astype(np.int32), 16)
    params, rest = state["params"], state["rest"]
    methods, groups, out, quantized = ("rtn", "gptq"), [], [], []
    for method in methods:
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x.copy(), params), rest)
        quantize_model(model, calib, QuantSettings(method=method, bits=3))
        quantized.append(nnx.state(model, nnx.Param))
        weights = [np.asarray(x) for x in jax.device_get(jax.tree.leaves(quantized[-1]))]
        out, groups = out + weights, groups + [f"{method} weights"] * len(weights)
    scored = compare_params_many(graphdef, params, quantized, rest, windows, reference_states(graphdef, params, rest, windows),
                                 pad_to=PTQSpec.model_fields["eval_rows"].default)
    out += [np.array([row[k] for k in sorted(row)], np.float64) for row in scored]
    return groups + [f"{method} row" for method in methods], out


# ----------------------------------------------------------------------------------------------
# The comparisons
# ----------------------------------------------------------------------------------------------
def run_worker(a, mode: str, name: str, first: int, last: int, load=None, save=None) -> dict:
    out = Path(a.out)
    result = out / f"{name}.json"
    cmd = [sys.executable, __file__, "--worker", "--preset", a.preset, "--deterministic", mode, "--first",
           str(first), "--last", str(last), "--result", str(result), "--out", a.out,
           *[x for kv in a.set for x in ("--set", kv)]]
    if a.step_options is not None:
        cmd += ["--step-options", a.step_options]
    if a.ptq and save is None and load is None:  # whole runs only (the resumed pair is compared by state)
        cmd += ["--ptq"]
    if load:
        cmd += ["--load", load]
    if save:
        cmd += ["--save", save]
    env = {**os.environ, "EFFTRAIN_AUTOTUNE_CACHE": str(out / f"autotune-{mode}"),
           "EFFTRAIN_COMPILATION_CACHE": "off", "JAX_ENABLE_COMPILATION_CACHE": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.timeout)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
        return {"error": f"exit {proc.returncode}", "stderr_tail": tail, "wall_s": time.perf_counter() - t0}
    data = json.loads(result.read_text())
    data["wall_s"] = time.perf_counter() - t0
    return data


def compare(x: dict, y: dict) -> dict:
    if "error" in x or "error" in y:
        return {"bitwise": None, "error": x.get("error") or y.get("error"),
                "stderr_tail": x.get("stderr_tail") or y.get("stderr_tail")}
    la, lb = np.asarray(x["losses"], np.float64), np.asarray(y["losses"], np.float64)
    same_loss = [p == q for p, q in zip(x["loss_bits"], y["loss_bits"])]
    n = min(len(x["leaf_sha256"]), len(y["leaf_sha256"]))  # a resumed run has no PTQ leaves: the state's
    differing = [g for p, q, g in zip(x["leaf_sha256"][:n], y["leaf_sha256"][:n], x["leaf_groups"][:n]) if p != q]
    first_diff = next((i for i, s in enumerate(same_loss) if not s), None)
    return {"bitwise": all(same_loss) and not differing, "max_abs_dloss": float(np.max(np.abs(la - lb))),
            "first_differing_step": None if first_diff is None else first_diff + 1,
            "differing_state_leaves": len(differing), "state_leaves": n,
            "differing_by_group": {g: differing.count(g) for g in dict.fromkeys(differing)}}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        modes = parse_choice_list(a.modes.lower(), "--modes", ("true", "false"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"preset": a.preset, "overrides": a.set, "steps": a.steps, "comparisons": []}

    def record(mode, what, cmp, runs):
        speed = [r.get("tokens_per_s") for r in runs if "tokens_per_s" in r]
        row = {"deterministic": mode, "comparison": what, **cmp,
               "tokens_per_s": speed, "wall_s": [round(r["wall_s"], 1) for r in runs]}
        report["comparisons"].append(row)
        if "device" not in report and runs and "device" in runs[0]:
            report["device"], report["jax"] = runs[0]["device"], runs[0]["jax"]
        (out / "determinism.json").write_text(json.dumps(report, indent=2))
        verdict = {True: "bitwise identical", False: f"DIFFER (max |Δloss| {cmp.get('max_abs_dloss', 0):.3g}, "
                   f"first at step {cmp.get('first_differing_step')}, {cmp.get('differing_state_leaves')}/"
                   f"{cmp.get('state_leaves')} state leaves: {cmp.get('differing_by_group')})", None: f"failed: {cmp.get('error')}"}[cmp["bitwise"]]
        print(f"{a.preset} deterministic={mode} {what}: {verdict}", flush=True)
        if cmp.get("stderr_tail"):
            print("  " + "\n  ".join(cmp["stderr_tail"]), flush=True)

    for mode in modes:
        run_a = run_worker(a, mode, f"{mode}-a", 0, a.steps)
        run_b = run_worker(a, mode, f"{mode}-b", 0, a.steps)
        record(mode, "two runs", compare(run_a, run_b), [run_a, run_b])
        if a.no_resume:
            continue
        half = a.steps // 2
        state = str(out / f"{mode}-state.npz")
        first = run_worker(a, mode, f"{mode}-r1", 0, half, save=state)
        rest = run_worker(a, mode, f"{mode}-r2", half, a.steps, load=state) if "error" not in first else first
        if "error" not in rest:
            rest = {**rest, "losses": first["losses"] + rest["losses"],
                    "loss_bits": first["loss_bits"] + rest["loss_bits"]}
        record(mode, f"resumed at step {half} vs uninterrupted", compare(run_a, rest), [first, rest])
        Path(state).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
