"""A grid cell trained on several nodes (efftrain.grid.multinode): the sbatch job that `grid run --slurm
nodes=2` submits, and that job run here, its srun step simulated by two processes on localhost (4 fake
CPU devices each, joined through JAX's SLURM detection), its second step in this machine's one process."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from efftrain.grid import runner as grid_runner
from efftrain.grid.spec import GridError, expected_ptq_rows, load_spec
from efftrain.grid.store import ResultsStore

from conftest import tiny_raw

ROOT = Path(__file__).resolve().parent.parent

FAKE_SBATCH = """#!/bin/bash
# records the submitted script and answers as `sbatch --parsable` does
cp "${@: -1}" "$FAKE_SBATCH_COPY"
echo "4242;cluster"
"""

# the tasks of a job step: 2 processes of 4 fake CPU devices on localhost, as SLURM would set them up
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for i in 0 1; do
  SLURM_JOB_ID=4242 SLURM_STEP_NODELIST=localhost SLURM_STEP_NUM_TASKS=2 SLURM_NTASKS=2 SLURM_PROCID=$i \\
  SLURM_LOCALID=$i XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=1" "$@" > "$FAKE_SRUN_LOG.$i" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait $p || status=$?; done
exit $status
"""


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def write_grid(tmp: Path, cache_dir: str) -> Path:
    """One family: a main cell sharded over 8 devices (fsdp) and a cooldown branch; RTN 4-bit rows."""
    raw = tiny_raw(cache_dir, optim={"lr": 3e-3, "warmup_steps": 2, "min_lr_ratio": 0.0})
    raw["train"] = {**raw["train"], "max_steps": 6, "batch_size": 8, "data_parallel": -1, "mesh": {"fsdp": 8}}
    raw["checkpoint"] = {"tokens": [512], "resume_every": 2, "async_save": False}
    (tmp / "base.yaml").write_text(yaml.safe_dump(raw))
    spec = {"name": "mn", "base": "base.yaml", "runs_dir": str(tmp / "runs"), "axes": {"optim.schedule": ["wsd"]},
            "cooldown": [1024], "cooldown_fraction": 0.5,
            "ptq": {"methods": ["rtn"], "bits": [4], "eval_tokens": 2048}}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "sbatch", FAKE_SBATCH)
    _executable(bin_dir / "srun", FAKE_SRUN)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_COPY", str(tmp_path / "submitted.sbatch"))
    return tmp_path / "submitted.sbatch"


def test_nodes_above_one_submit_a_two_step_batch_job(tmp_path, cache_dir, fake_slurm):
    spec_path = write_grid(tmp_path, cache_dir)
    out = grid_runner.run_grid(spec_path, slurm="nodes=2,gpus=8,partition=gpu,time=1:30:00,account=abc,mem=64",
                               log=lambda *_: None)
    spec = load_spec(spec_path)
    assert out == {c.key: "submitted 4242" for c in spec.cells()}
    script = fake_slurm.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --account=abc", "#SBATCH --mem=64G"):
        assert line in script.splitlines()
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    single = next(line for line in script.splitlines() if line.startswith("exec "))
    keys = ",".join(c.key for c in spec.cells())
    assert srun.endswith(f"--only {keys} --train-only") and single.endswith(f"--only {keys} --no-train")
    assert (spec.runs_dir / "slurm" / f"{spec.cells()[0].key}.sbatch").read_text() == script


def test_a_missing_or_refusing_sbatch_is_one_error_line(tmp_path, cache_dir, monkeypatch):
    spec_path = write_grid(tmp_path, cache_dir)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(GridError, match="submits with sbatch, which is not on PATH"):
        grid_runner.run_grid(spec_path, slurm="nodes=2", log=lambda *_: None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "sbatch", "#!/bin/bash\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin:/bin")
    with pytest.raises(GridError, match="sbatch refused .*: sbatch: error: invalid partition specified: gpu$"):
        grid_runner.run_grid(spec_path, slurm="nodes=2,partition=gpu", log=lambda *_: None)
    with pytest.raises(GridError, match="--train-only is the training step"):
        grid_runner.run_grid(spec_path, train_only=True, workers=2, log=lambda *_: None)


def test_the_job_trains_on_two_processes_and_quantizes_in_one(tmp_path, cache_dir, fake_slurm):
    """Run the submitted script as SLURM would: step 1 (2 processes, 8 devices in all) trains the main cell
    on its fsdp-8 mesh and then the cooldown branch; step 2, one process here, records both runs and
    writes every PTQ row, without training anything."""
    from efftrain.data import prepare_data
    from efftrain.config import load_config

    spec_path = write_grid(tmp_path, cache_dir)
    prepare_data(load_config(str(tmp_path / "base.yaml")))  # the token cache, before two processes want it
    grid_runner.run_grid(spec_path, slurm="nodes=2", log=lambda *_: None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EFFTRAIN_", "JAX_COORDINATOR"))}
    import portpicker

    env.update(FAKE_SRUN_LOG=str(tmp_path / "task"), JAX_COORDINATOR_PORT=str(portpicker.pick_unused_port()),
               EFFTRAIN_DISTRIBUTED_TIMEOUT="60", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1", EFFTRAIN_COMPILATION_CACHE="off")
    job = subprocess.run(["bash", str(fake_slurm)], env=env, capture_output=True, text=True, timeout=300)
    tasks = [(tmp_path / f"task.{i}").read_text() for i in (0, 1)]
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:] + tasks[0][-3000:] + tasks[1][-2000:]
    assert "efftrain: training step exited with status 0" in job.stdout

    spec = load_spec(spec_path)
    main, branch = spec.cells()
    for cell in (main, branch):  # both trained by the two processes of step 1
        info = json.loads((cell.run_dir / "run.json").read_text())
        assert info["processes"] == 2 and info["mesh"]["fsdp"] == 8, cell.kind
    assert "training step: " in tasks[0] and "training step" not in tasks[1]  # process 0 logs for the job
    with ResultsStore(spec.db_path) as store:
        assert {store.run(c.key)["status"] for c in (main, branch)} == {"done"}
        rows = store.ptq_rows()
    assert len(rows) == sum(expected_ptq_rows(spec, c) for c in (main, branch)) >= 2
    assert all(r["qid"] is not None for r in rows)
    assert "resuming" not in job.stdout and "step 0001" not in job.stdout  # step 2 trained nothing
