"""Multi-host training on JAX's own distributed runtime: who joins, what each process feeds, who writes.

Opting in is a property of the launch, not of the run (a run saved by 2 processes resumes on 1), so it
comes from the environment, never from the config. `launch_from_env` reads, in this order:

  EFFTRAIN_DISTRIBUTED=off            always one process (the escape hatch; default `auto`)
  EFFTRAIN_COORDINATOR=host:port      explicit: with EFFTRAIN_NUM_PROCESSES and EFFTRAIN_PROCESS_ID
                                      (0 <= id < N), optional EFFTRAIN_LOCAL_DEVICE_IDS=0,1,..
  SLURM_STEP_NUM_TASKS > 1            a SLURM job step (`srun --ntasks=N ...`): JAX's SLURM detection
                                      (coordinator: the step's first node, port from the job id) with
                                      the process id SLURM_PROCID; EFFTRAIN_LOCAL_DEVICE_IDS overrides
                                      JAX's default of one GPU per task (GPU = SLURM_LOCALID)
  anything else                       one process, nothing initialised (exactly as before)

SLURM_STEP_NUM_TASKS rather than SLURM_NTASKS: srun sets it for each task of a step, while a batch
script run on one process of an `sbatch --ntasks=2` job also sees SLURM_NTASKS=2 (and would wait for
a second process that never comes). EFFTRAIN_DISTRIBUTED_TIMEOUT (seconds, default 300) bounds the
wait for the other processes. A malformed variable is a one-line ConfigError naming it, a refused
connection (e.g. the coordinator's port in use) a one-line DistributedError (`error:` lines from the
CLI); a timeout, which JAX answers by aborting the process with a C++ stack trace, is reported on one
`error:` line by a watchdog that exits with status 1 just before JAX would.

`initialize_distributed()` must run before JAX starts its backends (`efftrain train` calls it first).
On CPU the cross-process collectives are gloo (JAX 0.10.2's default, kept unless the user chose one).

After it: every process runs the same program on the global mesh. Process p builds the batch's
rows that its devices hold (`process_batch_rows`, from the batch sharding) from the same seeded window
order as one process would (efftrain.data.pipeline: row r of step s is window `order[s*B + r]`), and
`global_batch` assembles them with `jax.make_array_from_process_local_data`; the union over processes
is the one-process batch. The data-iterator state is `{"next_index": step}` in every process. Process 0
(`is_main`) alone writes logs, metrics.jsonl, TensorBoard, run.json, config.yaml and tokenizer.json;
every process calls the checkpoint saves and restores (orbax writes each array's shards from the
process that holds them and the JSON items from process 0). Decisions a process takes alone (the run
lock, a stop signal, a setup error) are agreed with `check_all` / `any_process` so that no process
waits for another that has left.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import numpy as np

from efftrain.config import ConfigError

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300
_MESSAGE_BYTES = 400  # of an error message passed to the other processes by `check_all`


class DistributedError(RuntimeError):
    """Joining the multi-process job failed (timeout, refused or unreachable coordinator), or another
    process of the job failed."""


@dataclass(frozen=True)
class Launch:
    """How this process was launched: `single` (nothing to initialise), `env` or `slurm`."""

    mode: str
    num_processes: int = 1
    process_id: int = 0
    coordinator: str | None = None  # None under SLURM: JAX derives it from the step's node list
    local_device_ids: tuple[int, ...] | None = None
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def distributed(self) -> bool:
        return self.mode != "single"

    def describe(self) -> str:
        where = self.coordinator or "the SLURM step's first node"
        return f"process {self.process_id} of {self.num_processes} (coordinator {where})"


SINGLE = Launch("single")


# ---- the environment ------------------------------------------------------------------------------
def _int(env: Mapping[str, str], name: str, *, minimum: int) -> int:
    text = env.get(name, "").strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ConfigError(f"{name}={env.get(name, '')!r} is not an integer")
    value = int(text)
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def parse_coordinator(text: str, name: str = "EFFTRAIN_COORDINATOR") -> str:
    """`host:port` or `[ipv6]:port` with 1 <= port <= 65535 (ConfigError naming `name` otherwise)."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})", text.strip())
    if not m or not 1 <= int(m.group(2)) <= 65535:
        raise ConfigError(f"{name}={text!r} is not host:port (e.g. node001:12345, 10.0.0.1:12345, [::1]:12345)")
    return f"{m.group(1)}:{int(m.group(2))}"


def parse_device_ids(text: str, name: str = "EFFTRAIN_LOCAL_DEVICE_IDS") -> tuple[int, ...]:
    items = [x.strip() for x in text.split(",")]
    if not items or not all(re.fullmatch(r"\d+", x) for x in items) or len(set(items)) != len(items):
        raise ConfigError(f"{name}={text!r} is not a comma-separated list of distinct device ids (e.g. 0,1,2,3)")
    return tuple(int(x) for x in items)


def _process_id(env: Mapping[str, str], name: str, n: int, count_name: str) -> int:
    pid = _int(env, name, minimum=0)
    if pid >= n:
        raise ConfigError(f"{name}={pid} is out of range for {count_name}={n} (process ids are 0..{n - 1})")
    return pid


# what JAX's SLURM detection reads (jax._src.clusters.slurm_cluster)
SLURM_NEEDS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch:
    """The Launch the environment asks for (module docstring); ConfigError on a malformed variable."""
    env = os.environ if env is None else env
    switch = env.get("EFFTRAIN_DISTRIBUTED", "auto").strip().lower() or "auto"
    if switch not in ("auto", "off"):
        raise ConfigError(f"EFFTRAIN_DISTRIBUTED={env['EFFTRAIN_DISTRIBUTED']!r} must be auto or off")
    if switch == "off":
        return SINGLE
    timeout = _int(env, "EFFTRAIN_DISTRIBUTED_TIMEOUT", minimum=1) if env.get("EFFTRAIN_DISTRIBUTED_TIMEOUT") \
        else DEFAULT_TIMEOUT_S
    devices = parse_device_ids(env["EFFTRAIN_LOCAL_DEVICE_IDS"]) if env.get("EFFTRAIN_LOCAL_DEVICE_IDS") else None
    if env.get("EFFTRAIN_COORDINATOR", "").strip():
        coordinator = parse_coordinator(env["EFFTRAIN_COORDINATOR"])
        missing = [k for k in ("EFFTRAIN_NUM_PROCESSES", "EFFTRAIN_PROCESS_ID") if not env.get(k, "").strip()]
        if missing:
            raise ConfigError(f"EFFTRAIN_COORDINATOR is set but {' and '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not")
        n = _int(env, "EFFTRAIN_NUM_PROCESSES", minimum=1)
        pid = _process_id(env, "EFFTRAIN_PROCESS_ID", n, "EFFTRAIN_NUM_PROCESSES")
        if n == 1:
            return SINGLE
        return Launch("env", n, pid, coordinator, devices, timeout)
    stray = [k for k in ("EFFTRAIN_NUM_PROCESSES", "EFFTRAIN_PROCESS_ID") if env.get(k, "").strip()]
    if stray:
        raise ConfigError(f"{stray[0]} is set but EFFTRAIN_COORDINATOR (host:port of process 0) is not")
    if env.get("SLURM_STEP_NUM_TASKS", "").strip():
        n = _int(env, "SLURM_STEP_NUM_TASKS", minimum=1)
        if n > 1:
            missing = [k for k in SLURM_NEEDS if not env.get(k, "").strip()]
            if missing:
                raise ConfigError(f"SLURM_STEP_NUM_TASKS={n} asks for {n} processes but {', '.join(missing)} "
                                  f"{'is' if len(missing) == 1 else 'are'} not set (launch with srun, or set "
                                  "EFFTRAIN_DISTRIBUTED=off)")
            pid = _process_id(env, "SLURM_PROCID", n, "SLURM_STEP_NUM_TASKS")
            return Launch("slurm", n, pid, None, devices, timeout)
    return SINGLE


# ---- joining ------------------------------------------------------------------------------------
def initialize_distributed(env: Mapping[str, str] | None = None) -> Launch:
    """Join the multi-process job the environment asks for (once; later calls return the same Launch).
    Must run before JAX initialises its backends. One process: nothing happens."""
    launch = launch_from_env(env)
    if not launch.distributed:
        return launch
    import jax
    from jax._src import xla_bridge

    if jax.distributed.is_initialized():
        if jax.process_count() != launch.num_processes or jax.process_index() != launch.process_id:
            raise DistributedError(f"JAX's distributed runtime is already initialised as process "
                                   f"{jax.process_index()} of {jax.process_count()}, not as {launch.describe()}")
        return launch
    if xla_bridge.backends_are_initialized():
        raise DistributedError(f"the environment asks for {launch.describe()}, but JAX has already started "
                               "its backends in this process: call efftrain.train.distributed."
                               "initialize_distributed() before any JAX computation (efftrain train does)")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's runtime ends the process with a fatal log and a C++ stack trace when the connection times out
    # (jaxlib 0.10.2: client.h "Terminating process because the JAX distributed service detected fatal
    # errors ... DEADLINE_EXCEEDED"); a watchdog a little before its deadline reports it on one line.
    watchdog = threading.Timer(launch.timeout_s, _give_up, args=(launch,))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator, num_processes=launch.num_processes,
            process_id=launch.process_id,
            local_device_ids=list(launch.local_device_ids) if launch.local_device_ids is not None else None,
            cluster_detection_method="slurm" if launch.mode == "slurm" else "deactivate",
            initialization_timeout=launch.timeout_s + _RUNTIME_GRACE_S)
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError, ValueError, RuntimeError from the runtime
        watchdog.cancel()
        jax.distributed.shutdown()
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise DistributedError(f"could not join the job as {launch.describe()}: {first}") from None
    watchdog.cancel()
    return launch


_RUNTIME_GRACE_S = 15  # JAX's own deadline is this much later than the watchdog's


def _give_up(launch: Launch) -> None:
    """The watchdog: one `error:` line and exit status 1 (EXIT_FAILURE), from any thread."""
    if launch.process_id == 0:
        why = (f"not all {launch.num_processes} processes connected to the coordinator "
               f"({launch.coordinator or 'on this node'}) it started")
    else:
        why = (f"no answer from the coordinator {launch.coordinator or '(SLURM step: its first node)'}: is process 0 "
               "running, and is its address reachable from this host?")
    os.write(2, f"error: could not join the job as {launch.describe()} within EFFTRAIN_DISTRIBUTED_TIMEOUT="
                f"{launch.timeout_s} s: {why}\n".encode())
    os._exit(1)


# ---- who am I -----------------------------------------------------------------------------------
def process_count() -> int:
    import jax

    return jax.process_count()


def is_main() -> bool:
    """Process 0: the one that writes the run's own files and logs."""
    import jax

    return jax.process_index() == 0


# ---- agreeing ---------------------------------------------------------------------------------------
def _gather_rows(row: np.ndarray) -> np.ndarray:
    """[process_count, len(row)]: every process's `row` (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(row)).reshape(process_count(), -1)


def check_all(error: BaseException | None) -> None:
    """Every process calls this with the error it hit (or None): if any process failed, all raise, the
    failed ones their own error and the others a DistributedError quoting the first failure."""
    if process_count() == 1:
        if error is not None:
            raise error
        return
    text = "" if error is None else (str(error) or type(error).__name__)
    row = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
    row[0] = error is not None
    data = text.encode()[:_MESSAGE_BYTES]
    row[1:1 + len(data)] = np.frombuffer(data, np.uint8)
    rows = _gather_rows(row)
    failed = np.flatnonzero(rows[:, 0])
    if error is not None:
        raise error
    if failed.size:
        p = int(failed[0])
        message = bytes(rows[p, 1:]).rstrip(b"\0").decode(errors="replace")
        raise DistributedError(f"process {p} failed: {message}")


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective)."""
    if process_count() == 1:
        return flag
    return bool(_gather_rows(np.array([flag], np.uint8)).any())


def on_every_process(fn: Callable[[], T]) -> T:
    """`fn()` on every process, agreed: if it raised anywhere, it raises everywhere (check_all)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised by check_all
        error = e
    check_all(error)
    return result


def on_main(fn: Callable[[], T]) -> T | None:
    """`fn()` on process 0 only (the run's own files), agreed; None on the other processes."""
    return on_every_process(lambda: fn() if is_main() else None)


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on process 0, then (if it succeeded) on the others: work that fills a shared cache once
    (the token cache), which the others then read."""
    if process_count() == 1:
        return fn()
    first = on_main(fn)
    rest = on_every_process(lambda: None if is_main() else fn())
    return first if is_main() else rest


def sync(name: str) -> None:
    """A barrier across processes (no-op for one)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---- data ---------------------------------------------------------------------------------------
def batch_rows(layout, accum: int, micro: int, devices) -> np.ndarray:
    """Indices into the global batch [accum * micro] (row a * micro + m is micro-batch a's row m) of the
    rows that `devices` hold under `layout` (the batch sharding of [accum, micro, T+1]), in the order
    `jax.make_array_from_process_local_data` reads a process's local data: accumulation-major, the held
    micro-rows ascending."""
    devices = set(devices)
    index_map = layout.devices_indices_map((accum, micro, 1))
    held = sorted({m for device, index in index_map.items() if device in devices
                   for m in range(*index[1].indices(micro))})
    return (np.arange(accum)[:, None] * micro + np.asarray(held, np.int64)[None, :]).reshape(-1)


def process_batch_rows(layout, accum: int, micro: int) -> np.ndarray:
    """`batch_rows` of this process's devices (one process: every row, in order)."""
    return batch_rows(layout, accum, micro, layout.addressable_devices)


def global_batch(local: np.ndarray, layout, global_shape: tuple[int, ...]):
    """The global batch array from this process's rows `local` ([accum, held micro-rows, T+1]); one
    process: `jax.device_put(local, layout)`, as always."""
    import jax

    if process_count() == 1:
        return jax.device_put(local, layout)
    return jax.make_array_from_process_local_data(layout, local, global_shape)


# ---- host copies ------------------------------------------------------------------------------------
def host_values(tree: Any) -> Any:
    """numpy copies of every array of `tree`; an array split over several processes' devices is
    gathered first (a collective then: every process must call it). One process: jax.device_get."""
    import jax

    if process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            if _every_process_covers(x.sharding, x.shape):
                return _assemble(x)
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))  # one leaf at a time
        return jax.device_get(x)

    return jax.tree.map(host, tree)


def _every_process_covers(sharding, shape: tuple[int, ...]) -> bool:
    """Whether every process's devices hold the whole array (e.g. FSDP inside each process, data-parallel
    across them): then each assembles its own copy, without a collective. Computed from the global
    sharding, so that every process takes the same branch."""
    blocks: dict[int, set] = {}
    for device, index in sharding.devices_indices_map(tuple(shape)).items():
        blocks.setdefault(device.process_index, set()).add(
            tuple((s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape)))
    total = int(np.prod(shape))
    return all(sum(int(np.prod([b - a for a, b in block])) for block in held) == total
               for held in blocks.values())


def _assemble(x) -> np.ndarray:
    out = np.empty(x.shape, x.dtype)
    for s in x.addressable_shards:
        out[s.index] = np.asarray(s.data)
    return out
