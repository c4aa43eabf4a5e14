"""Multi-host training on JAX's distributed runtime (efftrain.train.distributed): the launch environment
and its errors, each process's rows of the global batch, and two real processes on localhost (gloo
collectives, 4 fake CPU devices each) training as this process does on its 8 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efftrain.config import MESH_AXES, ConfigError, from_dict
from efftrain.train.distributed import (SINGLE, DistributedError, Launch, batch_rows, initialize_distributed,
                                        launch_from_env)

from conftest import tiny_raw

ROOT = Path(__file__).resolve().parent.parent
STEPS = 2
# 16 sequences a step in 2 micro-batches of 8, one row of each on every device of fsdp 8: process 0 feeds
# global rows 0-3 and 8-11, process 1 rows 4-7 and 12-15; the parameters are split across the processes
MULTI = {"data_parallel": -1, "mesh": {"fsdp": 8}, "batch_size": 16, "grad_accum": 2, "eval_batches": 1}


# ---- the launch environment ---------------------------------------------------------------------
EXPLICIT = {"EFFTRAIN_COORDINATOR": "node001:1234", "EFFTRAIN_NUM_PROCESSES": "4", "EFFTRAIN_PROCESS_ID": "3"}
SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_STEP_NUM_TASKS": "2",
         "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_launch_from_env():
    assert launch_from_env({}) == SINGLE
    assert launch_from_env(EXPLICIT) == Launch("env", 4, 3, "node001:1234", None, 300)
    assert launch_from_env({**EXPLICIT, "EFFTRAIN_LOCAL_DEVICE_IDS": "0,1", "EFFTRAIN_DISTRIBUTED_TIMEOUT": "30",
                            "EFFTRAIN_COORDINATOR": "[::1]:99"}) == Launch("env", 4, 3, "[::1]:99", (0, 1), 30)
    assert launch_from_env({**EXPLICIT, "EFFTRAIN_NUM_PROCESSES": "1", "EFFTRAIN_PROCESS_ID": "0"}) == SINGLE
    assert launch_from_env({**EXPLICIT, "EFFTRAIN_DISTRIBUTED": "off"}) == SINGLE
    assert launch_from_env(SLURM) == Launch("slurm", 2, 1, None, None, 300)
    assert launch_from_env({**SLURM, **EXPLICIT}).mode == "env"  # explicit wins
    # a batch script of an `sbatch --ntasks=2` job is one process: SLURM_NTASKS alone never opts in
    assert launch_from_env({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NUM_TASKS"}) == SINGLE
    assert launch_from_env({**SLURM, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) == SINGLE


@pytest.mark.parametrize("env, message", [
    ({**EXPLICIT, "EFFTRAIN_COORDINATOR": "node001"}, "EFFTRAIN_COORDINATOR='node001' is not host:port"),
    ({**EXPLICIT, "EFFTRAIN_COORDINATOR": "node001:0"}, "is not host:port"),
    ({**EXPLICIT, "EFFTRAIN_COORDINATOR": "node001:70000"}, "is not host:port"),
    ({**EXPLICIT, "EFFTRAIN_COORDINATOR": "http://node001:80"}, "is not host:port"),
    ({**EXPLICIT, "EFFTRAIN_PROCESS_ID": "4"}, "EFFTRAIN_PROCESS_ID=4 is out of range for EFFTRAIN_NUM_PROCESSES=4 "
                                               "(process ids are 0..3)"),
    ({**EXPLICIT, "EFFTRAIN_PROCESS_ID": "-1"}, "EFFTRAIN_PROCESS_ID=-1 must be >= 0"),
    ({**EXPLICIT, "EFFTRAIN_NUM_PROCESSES": "two"}, "EFFTRAIN_NUM_PROCESSES='two' is not an integer"),
    ({"EFFTRAIN_COORDINATOR": "h:1"}, "EFFTRAIN_COORDINATOR is set but EFFTRAIN_NUM_PROCESSES and "
                                      "EFFTRAIN_PROCESS_ID are not"),
    ({"EFFTRAIN_PROCESS_ID": "0"}, "EFFTRAIN_PROCESS_ID is set but EFFTRAIN_COORDINATOR"),
    ({**EXPLICIT, "EFFTRAIN_LOCAL_DEVICE_IDS": "0,,1"}, "EFFTRAIN_LOCAL_DEVICE_IDS='0,,1' is not a comma-separated"),
    ({**EXPLICIT, "EFFTRAIN_LOCAL_DEVICE_IDS": "0,0"}, "list of distinct device ids"),
    ({**EXPLICIT, "EFFTRAIN_DISTRIBUTED_TIMEOUT": "0"}, "EFFTRAIN_DISTRIBUTED_TIMEOUT=0 must be >= 1"),
    ({"EFFTRAIN_DISTRIBUTED": "yes"}, "EFFTRAIN_DISTRIBUTED='yes' must be auto or off"),
    ({**SLURM, "SLURM_PROCID": "2"}, "SLURM_PROCID=2 is out of range for SLURM_STEP_NUM_TASKS=2"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"},
     "SLURM_STEP_NUM_TASKS=2 asks for 2 processes but SLURM_STEP_NODELIST is not set"),
])
def test_malformed_launch_env_is_a_one_line_config_error(env, message):
    with pytest.raises(ConfigError) as e:
        launch_from_env(env)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_joining_after_jax_started_is_an_error():
    jax.devices()  # the backends are up in this process
    with pytest.raises(DistributedError, match="JAX has already started its backends in this process"):
        initialize_distributed({**EXPLICIT, "EFFTRAIN_COORDINATOR": "localhost:1"})


# ---- each process's rows of the global batch ------------------------------------------------------
@pytest.mark.parametrize("shape, accum, processes", [((2, 4, 1), 1, 2), ((1, 8, 1), 2, 2), ((2, 2, 2), 2, 4),
                                                      ((8, 1, 1), 1, 8)])
def test_process_rows_union_to_the_one_process_batch(shape, accum, processes):
    """Each 'process' (a contiguous group of the 8 devices) reads only its rows of every global batch
    from the same seeded order; together they are the one-process batches, exactly, across an epoch
    boundary; the iterator state is the step count in every process (and moves between them)."""
    from efftrain.data import make_train_iterator

    mesh = Mesh(np.array(jax.devices()).reshape(shape), MESH_AXES)
    layout = NamedSharding(mesh, P(None, MESH_AXES, None))
    batch, seq_len = 16, 8
    groups = np.array(jax.devices()).reshape(processes, -1)
    rows = [batch_rows(layout, accum, batch // accum, group) for group in groups]
    assert sorted(np.concatenate(rows).tolist()) == list(range(batch))
    tokens = (np.arange(40 * seq_len + 1) * 7 % 301).astype(np.uint16)  # 40 windows: 2.5 batches an epoch

    def iterator(r=None):
        return make_train_iterator(tokens, seq_len=seq_len, batch_size=batch, seed=5, rows=r)

    one, parts = iterator(), [iterator(r) for r in rows]
    for _ in range(6):
        full = next(one)
        for r, part in zip(rows, parts):
            np.testing.assert_array_equal(next(part), full[r])
    assert {json.dumps(p.get_state()) for p in parts} == {json.dumps(one.get_state())} == {'{"next_index": 6}'}
    moved = iterator(rows[-1])
    moved.set_state(one.get_state())
    np.testing.assert_array_equal(next(moved), next(one)[rows[-1]])
    if processes == 2 and accum == 2:  # rows of one process are not contiguous in the [batch] order
        assert rows[0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_all_rows_read_as_one_process_reads_them():
    from efftrain.data import make_train_iterator

    tokens = (np.arange(999) * 13 % 377).astype(np.uint16)
    a = make_train_iterator(tokens, seq_len=10, batch_size=8, seed=1)
    b = make_train_iterator(tokens, seq_len=10, batch_size=8, seed=1, rows=np.arange(8))
    for _ in range(30):
        x, y = next(a), next(b)
        assert x.dtype == y.dtype == np.int32
        np.testing.assert_array_equal(x, y)


# ---- two processes ----------------------------------------------------------------------------------
def clean_env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EFFTRAIN_", "JAX_COORDINATOR"))}
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=1"  # conftest.py
    return {**env, "XLA_FLAGS": flags, "TF_CPP_MIN_LOG_LEVEL": "3", "EFFTRAIN_DISTRIBUTED_TIMEOUT": "60", **extra}


def launch_train(config: Path, out: Path, env: dict, log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([sys.executable, "-m", "efftrain.cli", "train", str(config), "--out", str(out)],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, f"{log.name} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def params(run: Path, step: int) -> list[np.ndarray]:
    from flax import nnx

    from efftrain.train.rundir import load_model

    _, model, _ = load_model(run, step)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def two_processes(cache_dir, tmp_path_factory, lonely_process):
    """The same config in 2 processes of 4 devices each and, meanwhile, in this process on its 8 devices.
    Process 0 is launched with EFFTRAIN_COORDINATOR/NUM_PROCESSES/PROCESS_ID, process 1 as task 1 of a
    SLURM step (JAX's SLURM detection, its port from JAX_COORDINATOR_PORT): both paths join one job."""
    from efftrain.data import prepare_data
    from efftrain.train.loop import train

    tmp = tmp_path_factory.mktemp("distributed")
    raw = tiny_raw(cache_dir, checkpoint={"tokens": [1024], "resume_every": 1, "async_save": False})
    raw["train"] = {**raw["train"], **MULTI, "max_steps": STEPS}
    prepare_data(from_dict(raw))  # the token cache, before the two processes want it
    config = tmp / "multi.yaml"
    config.write_text(yaml.safe_dump(raw))
    port = portpicker.pick_unused_port()
    logs = {name: tmp / f"{name}.log" for name in ("p0", "p1")}
    p0 = launch_train(config, tmp / "two", clean_env(
        4, EFFTRAIN_COORDINATOR=f"localhost:{port}", EFFTRAIN_NUM_PROCESSES="2", EFFTRAIN_PROCESS_ID="0"), logs["p0"])
    p1 = launch_train(config, tmp / "two", clean_env(
        4, SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2",
        SLURM_PROCID="1", SLURM_LOCALID="1", JAX_COORDINATOR_PORT=str(port)), logs["p1"])
    try:
        one = train(from_dict(raw), tmp / "one", log=lambda *_: None)
    finally:
        text = {name: finish(proc, logs[name]) for name, proc in (("p0", p0), ("p1", p1))}
    return tmp, raw, one, text, p0.pid


def test_two_processes_train_like_one_process_on_as_many_devices(two_processes):
    tmp, _, one_result, logs, pid0 = two_processes
    one, two = tmp / "one", tmp / "two"
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))  # written once
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5)
    assert b[-1]["val_loss"] == pytest.approx(a[-1]["val_loss"], rel=1e-6)  # at the series checkpoint
    reference = [np.asarray(x) for x in jax.tree.leaves(one_result.final_state["params"])]
    # gathered from both processes' shards; Adam's m / sqrt(v) turns last-bit differences of near-zero
    # gradients (gloo sums in another order) into differences of up to the step size (lr 3e-3)
    for x, y in zip(reference, params(two, STEPS), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)
    info = json.loads((two / "run.json").read_text())
    assert info["processes"] == 2 and info["mesh"] == {"data": 1, "fsdp": 8, "expert": 1}
    assert "processes" not in json.loads((one / "run.json").read_text())
    assert (two / ".lock").read_text().split()[0] == str(pid0)  # process 0 held the run lock
    assert "devices 8x cpu in 2 processes" in logs["p0"] and "done: 2 steps" in logs["p0"]
    assert "efftrain test" not in logs["p1"] and "done:" not in logs["p1"]  # process 0 logs for the job


def test_a_checkpoint_of_two_processes_resumes_in_one(two_processes, tmp_path):
    """The resume checkpoint of step 1, written by 2 processes (parameters split across them), resumes in
    one process on one device: its data-iterator state is the step, and step 2 is the one of the
    2-process run."""
    from efftrain.train.checkpoint import CheckpointStore
    from efftrain.train.loop import train
    from efftrain.train.rundir import CONFIG, adopt_run_files

    tmp, raw, _, _, _ = two_processes
    run = tmp_path / "resumed"
    source = CheckpointStore(tmp / "two", read_only=True)
    assert source.steps("resume") == [1] and source.steps("series") == [2]
    CheckpointStore(run, async_save=False).copy_from(source, "resume", 1, as_kind="resume")
    (run / CONFIG).write_bytes((tmp / "two" / CONFIG).read_bytes())
    adopt_run_files(tmp / "two", run)
    single = {k: v for k, v in raw["train"].items() if k not in ("mesh", "data_parallel")}
    result = train(from_dict({**raw, "train": {**single, "data_parallel": 1}}), run, log=lambda *_: None)
    assert sorted(result.losses) == [2]
    assert result.losses[2] == pytest.approx(metrics(tmp / "two")[1]["loss"], rel=1e-6)
    for x, y in zip(params(tmp / "two", STEPS), jax.tree.leaves(result.final_state["params"]), strict=True):
        np.testing.assert_allclose(np.asarray(y), x, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def lonely_process(cache_dir, tmp_path_factory):
    """`efftrain train` as process 1 of 2 whose coordinator never answers, with a 1 s timeout (started
    before the two-process training, which its wait then overlaps)."""
    tmp = tmp_path_factory.mktemp("lonely")
    config = tmp / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(cache_dir)))
    port = portpicker.pick_unused_port()
    proc = launch_train(config, tmp / "run", clean_env(
        1, EFFTRAIN_COORDINATOR=f"localhost:{port}", EFFTRAIN_NUM_PROCESSES="2", EFFTRAIN_PROCESS_ID="1",
        EFFTRAIN_DISTRIBUTED_TIMEOUT="1"), tmp / "lonely.log")
    return proc, tmp, port


def test_no_coordinator_is_a_one_line_error_after_the_timeout(lonely_process):
    proc, tmp, port = lonely_process
    assert proc.wait(timeout=60) == 1
    lines = [line for line in (tmp / "lonely.log").read_text().splitlines() if line.strip()]
    assert lines == [f"error: could not join the job as process 1 of 2 (coordinator localhost:{port}) within "
                     f"EFFTRAIN_DISTRIBUTED_TIMEOUT=1 s: no answer from the coordinator localhost:{port}: is "
                     "process 0 running, and is its address reachable from this host?"], lines
    assert not (tmp / "run").exists()  # nothing was written
