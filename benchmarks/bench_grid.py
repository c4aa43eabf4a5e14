"""Grid throughput: cells per hour of a whole `efftrain grid run`, and how long the GPU stood idle.

    python benchmarks/bench_grid.py experiments/deepseek_ablation.yaml --workers 3 \
        --set train.max_tokens=20000000 --runs-dir /tmp/g1 [--order spec,costliest]

Runs the grid (training, checkpoints, PTQ rows: everything a real run does) into a fresh runs dir, while
a thread samples `nvidia-smi` every `--sample-s` seconds (GPU utilisation and memory in use), then
prints one JSON line: cells done, wall time from the first cell's start to the last cell's end (the
store's `runs` timestamps), cells per hour, the fraction of samples at 0 % utilisation, and each
variant's mean cell duration. `--order` takes one or more of efftrain.grid.schedule's orders
("costliest", what `grid run` does; "spread"; "spec", the runner before 93fd806), comma-separated: they
run one after the other in this process, each grid into RUNS_DIR/ORDER with its own fresh compilation
and autotune caches (RUNS_DIR/ORDER-caches), so none inherits another's compiled programs; one JSON line
each.

The grid's cells per hour depend on the cell size, the PTQ spec and the workers; quote them with the
spec, its overrides and the device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from efftrain.cli import parse_assignments
from efftrain.grid.runner import run_grid
from efftrain.grid.schedule import ORDERS
from efftrain.grid.spec import load_spec
from efftrain.xla import AUTOTUNE_CACHE_ENV, COMPILATION_CACHE_ENV


class GPUSampler(threading.Thread):
    """nvidia-smi every `interval` s: [(time, utilisation %, memory used MiB)] (empty without a GPU)."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.samples, self.stop = interval, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=10, check=True).stdout.splitlines()[0]
                util, mem = (float(v) for v in out.split(","))
                self.samples.append((time.time(), util, mem))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                return  # no GPU: nothing to sample
            self.stop.wait(self.interval)


def summarize(db: Path, samples: list[tuple[float, float, float]]) -> dict:
    con = sqlite3.connect(db)
    runs = con.execute("SELECT replicate, kind, status, started, finished FROM runs").fetchall()
    rows = con.execute("SELECT COUNT(*) FROM ptq").fetchone()[0]
    con.close()
    done = [r for r in runs if r[2] == "done" and r[3] and r[4]]
    out = {"cells": len(runs), "cells_done": len(done), "ptq_rows": rows}
    if done:
        t0, t1 = min(r[3] for r in done), max(r[4] for r in done)
        out.update(wall_s=round(t1 - t0, 1), cells_per_hour=round(len(done) / (t1 - t0) * 3600, 1))
        per: dict[str, list[float]] = {}
        for replicate, kind, _, start, end in done:
            per.setdefault(replicate if kind == "main" else f"{replicate} ({kind})", []).append(end - start)
        out["mean_cell_s"] = {k: round(statistics.mean(v), 1) for k, v in per.items()}
        inside = [s for s in samples if t0 <= s[0] <= t1]
        if inside:
            out.update(gpu_samples=len(inside), gpu_idle_fraction=round(sum(s[1] == 0 for s in inside) / len(inside), 3),
                       gpu_mean_util=round(statistics.mean(s[1] for s in inside), 1),
                       gpu_peak_mem_mib=max(s[2] for s in inside))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("spec")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="override applied to every cell (as grid run)")
    p.add_argument("--runs-dir", required=True, help="a fresh directory (removed first if it exists)")
    p.add_argument("--order", default="costliest", help=f"comma-separated, of {', '.join(ORDERS)}")
    p.add_argument("--sample-s", type=float, default=1.0)
    p.add_argument("--quiet", action="store_true", help="no per-cell log lines")
    args = p.parse_args(argv)
    orders = args.order.split(",")
    if not set(orders) <= set(ORDERS):
        p.error(f"--order: each of {', '.join(ORDERS)}, got {args.order}")
    root = Path(args.runs_dir)
    shutil.rmtree(root, ignore_errors=True)
    overrides = parse_assignments(args.set, "--set") or None
    ok = True
    for order in orders:
        runs_dir, caches = root / order, root / f"{order}-caches"
        os.environ[COMPILATION_CACHE_ENV] = str(caches / "jax")  # read by the spawned workers
        os.environ[AUTOTUNE_CACHE_ENV] = str(caches / "autotune")
        sampler = GPUSampler(args.sample_s)
        sampler.start()
        t0 = time.time()
        statuses = run_grid(args.spec, workers=args.workers, set_overrides=overrides, runs_dir=runs_dir,
                            order=order, log=(lambda _m: None) if args.quiet else print)
        elapsed = time.time() - t0
        sampler.stop.set()
        spec = load_spec(args.spec, set_overrides=overrides, runs_dir=runs_dir)
        result = {"spec": args.spec, "set": args.set, "workers": args.workers, "order": order,
                  "command_wall_s": round(elapsed, 1), "statuses": sorted(set(statuses.values())),
                  **summarize(spec.db_path, sampler.samples)}
        print(json.dumps(result), flush=True)
        ok &= set(statuses.values()) == {"done"}
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
