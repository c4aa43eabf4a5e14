"""A grid cell trained on several nodes: one SLURM batch job per cell family, in two steps.

`efftrain grid run SPEC --slurm nodes=2,gpus=8,...` (nodes > 1) writes RUNS_DIR/slurm/FAMILY.sbatch and
submits it with `sbatch`. The job runs

  1. `srun efftrain grid run SPEC --only KEYS --train-only`: every task of the step joins one JAX
     distributed job (efftrain.train.distributed: SLURM_STEP_NUM_TASKS, SLURM_PROCID) and trains the
     family's main cell and its cooldown branches on the global mesh (the cells' `train.mesh`), each
     process feeding its rows of every batch; process 0 writes logs and run files, every process its
     checkpoint shards. Nothing is written to the results store and nothing is quantized.
  2. `efftrain grid run SPEC --only KEYS --no-train`, once, in the batch script on the first node: one
     process records the runs, builds the checkpoint averages and runs the PTQ sweeps, restoring each
     checkpoint over the devices of that node (a mesh resized to them, or one device:
     efftrain.train.sharding.checkpoint_mesh). A cell whose training did not finish in step 1 is marked
     failed there instead of being trained on one node.

So the store has a single writer, and PTQ needs no cross-node collectives. Other --slurm keys become
`#SBATCH --key=value` lines (time in minutes or [D-]HH:MM:SS; gpus -> --gpus-per-node; tasks_per_node,
default: one per GPU, each of which JAX's SLURM detection pins to GPU SLURM_LOCALID).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from efftrain.grid.spec import Cell, GridError, GridSpec

Log = Callable[[str], None]

# --slurm keys (after efftrain.grid.runner.parse_slurm's aliases) -> sbatch options
SBATCH_OPTIONS = {"slurm_partition": "partition", "gpus_per_node": "gpus-per-node", "cpus_per_task": "cpus-per-task",
                  "nodes": "nodes", "tasks_per_node": "ntasks-per-node", "name": "job-name"}


def _sbatch_lines(params: dict[str, Any], name: str, log_path: Path) -> list[str]:
    params = {"tasks_per_node": params.get("gpus_per_node", 1), **params}  # one task per GPU by default
    lines = [f"#SBATCH --job-name={params.pop('name', name)}", f"#SBATCH --output={log_path}"]
    for key, value in params.items():
        if key == "timeout_min":
            lines.append(f"#SBATCH --time={int(value)}")
        elif key == "mem_gb":
            lines.append(f"#SBATCH --mem={value}G")
        else:
            option = SBATCH_OPTIONS.get(key, key.removeprefix("slurm_").replace("_", "-"))
            lines.append(f"#SBATCH --{option}={value}")
    return lines


def grid_command(spec: GridSpec, keys: list[str], set_overrides: dict[str, Any] | None, mode: str) -> str:
    """The `efftrain grid run` command line of one step (mode --train-only or --no-train)."""
    cmd = [sys.executable, "-m", "efftrain.cli", "grid", "run", str(spec.path.resolve()), "--runs-dir",
           str(spec.runs_dir.resolve()), "--only", ",".join(keys), mode]
    for key, value in (set_overrides or {}).items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    return shlex.join(cmd)


def batch_script(spec: GridSpec, family: str, keys: list[str], params: dict[str, Any], *,
                 set_overrides: dict[str, Any] | None = None, retry_failed: bool = False) -> str:
    """The sbatch script of one family's multi-node job (see the module docstring)."""
    folder = spec.runs_dir.resolve() / "slurm"
    retry = " --retry-failed" if retry_failed else ""
    return "\n".join([
        "#!/bin/bash",
        *_sbatch_lines(dict(params), f"efftrain-{spec.name}-{family}", folder / f"{family}-%j.out"),
        f"# efftrain grid {spec.name}, family {family}: cells {', '.join(keys)}",
        f"cd {shlex.quote(str(Path.cwd()))}",
        "# 1. every task trains (one JAX distributed job over the step's tasks); no store writes, no PTQ",
        f"srun --kill-on-bad-exit=1 {grid_command(spec, keys, set_overrides, '--train-only')}{retry}",
        "echo \"efftrain: training step exited with status $?\"",
        "# 2. one process on this node: record the runs, averages, PTQ sweeps; untrained cells are failed",
        f"exec {grid_command(spec, keys, set_overrides, '--no-train')}{retry}",
        ""])


def submit_multinode(spec: GridSpec, families: dict[str, list[Cell]], keys: set[str] | None, params: dict[str, Any], *,
                     pending: Callable[[list[Cell]], bool], retry_failed: bool, set_overrides, log: Log) -> dict[str, str]:
    """Write and `sbatch` one job per family with unfinished cells (`pending(cells)`); {cell key: 'submitted ID'}."""
    folder = spec.runs_dir.resolve() / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    for fam, cells in families.items():
        chosen = [c for c in cells if keys is None or c.key in keys or c.kind == "main"]
        if not pending(chosen):
            continue
        script = folder / f"{fam}.sbatch"
        script.write_text(batch_script(spec, fam, [c.key for c in chosen], params, set_overrides=set_overrides,
                                       retry_failed=retry_failed))
        try:
            proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            raise GridError("--slurm nodes>1 submits with sbatch, which is not on PATH (run this on a SLURM login "
                            f"node; the job script is {script})") from None
        except subprocess.TimeoutExpired:
            raise GridError(f"sbatch did not answer within 120 s (the job script is {script})") from None
        if proc.returncode:
            first = (proc.stderr or proc.stdout).strip().splitlines()[:1]
            raise GridError(f"sbatch refused {script}: {first[0] if first else f'exit {proc.returncode}'}")
        job = proc.stdout.strip().split(";")[0]
        log(f"family {fam} ({cells[0].name}): SLURM job {job} on {params.get('nodes')} nodes ({script})")
        out.update({c.key: f"submitted {job}" for c in chosen})
    log(f"{len(set(out.values()))} multi-node SLURM jobs submitted; logs in {folder}")
    return out
