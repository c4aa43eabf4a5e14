"""`train(cfg, run_dir)`: corpus -> token cache -> grain windows -> jitted steps -> checkpoint series.

Re-running on an existing run directory resumes from its newest finalized checkpoint (series or
resume) and continues bitwise identically on CPU: the model, optimizer and MoE-bias state, the grain
iterator state and the step counter all come from the checkpoint. A run directory whose stored config
differs in anything but logging/eval/checkpoint-frequency fields, or whose corpus identity (run.json)
differs from the corpus the config now selects, is refused with the diff.

Faults (docs/RELIABILITY.md): the run directory is locked (flock on RUN_DIR/.lock) while a process
trains in it; SIGTERM/SIGINT/SIGUSR1 finish the current step, write a resume checkpoint, wait for the
saves and raise `Interrupted` (exit code 75), a second SIGTERM/SIGINT exits at once; a non-finite loss, gradient or
state halts training within one step (NonFiniteError), or with `skip_nonfinite=N` leaves the state
unchanged for up to N such steps; small files are written atomically and a torn metrics line is
dropped on resume; a damaged newest checkpoint is an error, or with `fallback=True` is moved to
checkpoints/corrupt/ and the previous finalized one is used.

Several processes (efftrain.train.distributed, docs/SCALING.md "Multi-host"): each feeds its own rows of
every global batch; process 0 alone holds the lock and writes logs, metrics and the run's files; all of
them save and restore the checkpoints; a stop signal is agreed at the next step that logs or saves.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint
from jax.sharding import Mesh

from efftrain.config import Config, ConfigError, config_warnings, flatten_dotted, resume_blocking_diff
from efftrain.data import make_train_iterator, prepare_data
from efftrain.formatting import format_count, format_duration
from efftrain.fp8 import implementation_record
from efftrain.model.block import kv_cache_bytes_per_token
from efftrain.model.transformer import build_model, flops_per_token, parameter_counts
from efftrain.train.checkpoint import (CheckpointError, CheckpointStore, NonFiniteError, abstract_like,
                                       checkpoints_dir, write_failure)
from efftrain.train.distributed import (any_process, global_batch, host_values, initialize_distributed, is_main,
                                        main_first, on_every_process, on_main, process_batch_rows, process_count)
from efftrain.train.optimizer import lr_schedule, make_optimizer
from efftrain.train.rundir import (CONFIG, LOCK, METRICS, RUN_INFO, TENSORBOARD, TOKENIZER, RunDirError,
                                   check_foreign_dir, load_run_config, make_mtp_acceptance, make_val_loss, read_run_info, total_steps_of,
                                   write_config, write_run_file, write_run_info, write_tokenizer)
from efftrain.train.series import series_points
from efftrain.train.sharding import batch_sharding, describe, make_mesh as mesh_of, state_bytes, state_shardings
from efftrain.train.step import init_state, make_train_step
from efftrain.xla import enable_compilation_cache, guard_first_compile, step_options


class RunLockedError(RunDirError):
    """Another process is training in the run directory."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGINT: training stopped after a step and wrote a resume checkpoint; re-run to resume.
    (A KeyboardInterrupt, so that `except Exception` handlers let it through.)"""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message, signum)
        self.message, self.signum = message, signum

    def __str__(self) -> str:
        return self.message


class RunLock:
    """Exclusive, non-blocking flock on RUN_DIR/.lock, holding the trainer's pid; the kernel releases it
    when the process dies, however it dies."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{run_dir} is being trained by another process (pid {holder}); wait for it "
                                 "to finish, stop it, or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {platform.node()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class StopSignals:
    """While active (in the main thread): SIGTERM, SIGINT and SIGUSR1 ask to stop: the first records
    itself in `signum` (and calls `on_signal`); a second SIGTERM/SIGINT ends the process at once with
    128 + its number. SIGUSR1 (SLURM's `--signal=USR1@T`, the grid forwarding a stop to its workers)
    never forces an exit, so a forwarded copy of a signal a process also got itself is harmless."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self, on_signal: Callable[[int], None] | None = None):
        self.signum: int | None = None
        self.on_signal = on_signal
        self.previous: dict[int, Any] = {}
        self.hard = 0  # SIGTERM/SIGINT received

    def _handle(self, signum, frame) -> None:
        if signum != signal.SIGUSR1:
            self.hard += 1
        if self.hard >= 2:
            os.write(2, f"second {signal.Signals(signum).name}: exiting at once (a checkpoint still being "
                        "written is abandoned; it is never listed)\n".encode())
            os._exit(128 + signum)
        if self.signum is None:
            self.signum = signum
            if self.on_signal is not None:
                self.on_signal(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


# bf16 dense peak FLOP/s per device, for the MFU estimate (None: unknown, MFU not shown)
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "l4": 121e12,
              "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "").lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


def diff_lines(diff: list[tuple[str, Any, Any]], old: str, new: str) -> str:
    return "\n".join(f"  {k}: {a!r} ({old}) -> {b!r} ({new})" for k, a, b in diff)


def check_run_dir(run_dir: Path, cfg: Config) -> bool:
    """True if run_dir already holds this run (resume); raises on an incompatible config."""
    check_foreign_dir(run_dir)
    if not (run_dir / CONFIG).exists():
        return False
    diff = resume_blocking_diff(load_run_config(run_dir), cfg)
    if diff:
        raise RunDirError(f"{run_dir} holds a run with a different config; refusing to resume:\n"
                          f"{diff_lines(diff, 'run', 'now')}\nUse another --out for a new run.")
    return True


def check_corpus(run_dir: Path, identity: dict, old: str = "run", new: str = "now") -> None:
    """Refuse to continue run_dir's training on another corpus: its run.json records the identity
    (content fingerprint, tokenizer, split) of the corpus it was trained on."""
    try:
        recorded = read_run_info(run_dir, missing_ok=False).get("corpus")
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        raise RunDirError(f"{Path(run_dir) / RUN_INFO}: unreadable ({e}); cannot check the corpus the run was "
                          "trained on") from None
    if recorded is None:
        return
    a, b = flatten_dotted(recorded), flatten_dotted(identity)
    diff = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        raise RunDirError(f"{run_dir} was trained on another corpus than the config now selects; refusing to "
                          f"continue it:\n{diff_lines(diff, old, new)}\nUse another --out for a new run.")


def environment_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": getattr(orbax.checkpoint, "__version__", "?"),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "argv": sys.argv,
    }


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """Device metrics -> flat JSON-able floats (per-layer MoE stats summarised and per layer)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "moe":
            for name, per_layer in value.items():
                arr = np.asarray(per_layer, dtype=np.float64)
                if name == "load":
                    continue
                out[f"moe/{name}"] = float(arr.mean())
                for i, v in enumerate(arr.reshape(arr.shape[0], -1)[:, 0]):
                    out[f"moe/{name}/l{i}"] = float(v)
        elif key == "mtp_ce":
            for k, v in enumerate(np.asarray(value).reshape(-1)):
                out[f"mtp_ce/{k + 1}"] = float(v)
        else:
            out[key] = float(np.asarray(value))
    return out


class MetricsLog:
    """metrics.jsonl (+ TensorBoard events when tensorboardX is installed and enabled)."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int, log: Callable[[str], None] = print):
        self.path = run_dir / METRICS
        if self.path.exists():  # drop records newer than the checkpoint we resume from, and torn lines
            kept, torn = [], 0
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except (ValueError, AttributeError):  # cut short by a kill or a full disk
                    torn += 1
            if torn:
                log(f"note: {self.path}: dropped {torn} torn line(s)")
            write_run_file(self.path, "".join(line + "\n" for line in kept))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter  # lazy: optional, only with logging.tensorboard

                self.tb = SummaryWriter(str(run_dir / TENSORBOARD))
            except ImportError:
                print("note: tensorboardX not installed; TensorBoard events disabled", file=sys.stderr)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_failure(f"a line of {self.path}", e, "the checkpoints are intact and a cut line is "
                                "dropped on resume") from None
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "event"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens_seen: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss of that step (logged steps)
    val_losses: dict[int, float] = field(default_factory=dict)
    series: list[dict] = field(default_factory=list)
    final_state: Any = None  # the train state after the last step (params, other variables, optimizer)
    graphdef: Any = None


def _quiet(*_args) -> None:
    """The log of a process other than 0."""


def make_mesh(cfg: Config) -> Mesh:
    """The (data, fsdp, expert) mesh of train.mesh (default: train.data_parallel devices on data);
    efftrain.train.sharding, docs/SCALING.md."""
    return mesh_of(cfg)


def _all_finite(tree) -> jax.Array:
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.asarray(True)


def guarded_step(train_step, *, skip: bool, compiler_options: dict | None = None, state_sharding=None):
    """step(state, batch, tokens_seen) -> (state, metrics, ok) from the plain step function
    `train_step` (make_train_step(jit=False)), jitted with the state donated and `compiler_options`.
    `ok` is a device-side bool: the loss, the gradient norm and every float of the new state are
    finite. The loop reads it one step late (while the next step runs) or where it syncs anyway, so it
    adds no stall. With `skip`, a step that is not ok returns the state it was given (the select is
    inside the jitted step; the state is briefly held twice); its batch is consumed. `state_sharding`:
    the layout the kept state is constrained to (that of train_step's state, efftrain.train.sharding)."""

    def finite(metrics, new):
        return jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"]) & _all_finite(new)

    if not skip:  # the step's own program, the flag in a second one
        jitted, flag = jax.jit(train_step, donate_argnums=(0,), compiler_options=compiler_options or None), jax.jit(finite)

        def step(state, batch, tokens_seen):
            new, metrics = jitted(state, batch, tokens_seen)
            return new, metrics, flag(metrics, new)

        return step

    def skipping(state, batch, tokens_seen):
        new, metrics = train_step(state, batch, tokens_seen)
        ok = finite(metrics, new)
        kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
        if state_sharding is not None:
            kept = jax.lax.with_sharding_constraint(kept, state_sharding)
        return kept, metrics, ok

    return jax.jit(skipping, donate_argnums=(0,), compiler_options=compiler_options or None)


def restore_latest(store: CheckpointStore, abstract, accept: Callable[[Any, dict, dict], None], *,
                   fallback: bool, log: Callable[[str], None]) -> tuple[str, int, Any, dict] | None:
    """(kind, step, state, meta) of the newest finalized checkpoint that restores, verifies and is
    accepted by `accept(state, data_state, meta)` (which may raise CheckpointError); None if the run has
    none. A damaged one is an error naming it, or with `fallback` is moved to checkpoints/corrupt/
    (so that it is written again when training gets there) and the next older one is tried."""
    candidates = store.finalized()
    for i, (kind, step) in enumerate(candidates):
        try:
            state, data_state, meta = store.restore(kind, step, abstract)
            accept(state, data_state, meta)
            return kind, step, state, meta
        except CheckpointError as e:
            older = candidates[i + 1:]
            if not fallback:
                hint = (f"; re-run with --fallback to set it aside and resume from the previous finalized "
                        f"checkpoint ({older[0][0]} step {older[0][1]})" if older else "")
                raise CheckpointError(f"{e}{hint}") from None
            log(f"warning: {e}")
            log(f"fallback: moved it to {on_main(lambda: store.quarantine(kind, step))}")
    if candidates:
        raise CheckpointError(f"{store.root}: no checkpoint of the run restores (the damaged ones are in "
                              f"{store.root / 'corrupt'}); use another --out for a new run")
    return None


def train(cfg: Config, run_dir: str | Path, *, stop_at_step: int | None = None, skip_nonfinite: int = 0,
          fallback: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) the run in run_dir. `stop_at_step` ends early as if interrupted after that
    step's resume checkpoint (used by tests and for chunked jobs). `skip_nonfinite`: how many steps
    with a non-finite loss/gradient/state may be skipped (state unchanged) before training halts with
    NonFiniteError (0: the first one halts). `fallback`: if the newest checkpoint is damaged, set it
    aside and resume from the previous finalized one. Raises RunLockedError if another process trains
    in run_dir, and Interrupted after a SIGTERM/SIGINT (once the resume checkpoint is written)."""
    if skip_nonfinite < 0:
        raise ConfigError(f"--skip-nonfinite ({skip_nonfinite}) must be >= 0")
    initialize_distributed()  # several processes when the environment asks (before JAX starts); else nothing
    # a program compiled once on this machine is loaded by later runs of the same shapes (the other seeds
    # and variants of a grid, a resumed piece, the eval and PTQ programs): the same executable, so the
    # same bits, and seconds to a minute less of an idle GPU per cell (docs/BENCHMARKS.md, 2026-12-03)
    enable_compilation_cache()
    run_dir = Path(run_dir)
    check_foreign_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = on_main(lambda: RunLock(run_dir))  # process 0 holds it for the whole job
    opened: list[Callable[[], None]] = []  # close() of the store and the metrics log while training
    try:
        return _train(cfg, run_dir, stop_at_step=stop_at_step, skip_nonfinite=skip_nonfinite, fallback=fallback,
                      log=log, opened=opened)
    except BaseException:
        for close in reversed(opened):  # the first error is the one to report
            try:
                close()
            except Exception:  # noqa: BLE001
                pass
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, run_dir: Path, *, stop_at_step: int | None, skip_nonfinite: int, fallback: bool,
           log: Callable[[str], None], opened: list[Callable[[], None]]) -> TrainResult:
    main = is_main()
    if not main:
        log = _quiet  # noqa: F811 - process 0 logs for the job
    # every process sees the run directory as it was before process 0 writes into it
    resuming, has_dir = on_every_process(lambda: (check_run_dir(run_dir, cfg), checkpoints_dir(run_dir).is_dir()))
    for warning in config_warnings(cfg):
        log(f"warning: {warning}")
    store = None  # opened before anything is written when resuming: that drops a failed save's leftovers
    if resuming and has_dir:
        store = CheckpointStore(run_dir, async_save=cfg.checkpoint.async_save)
        opened.append(store.close)
    has_checkpoint = store is not None and bool(store.finalized())

    # ---- data --------------------------------------------------------------------------------
    cache = main_first(lambda: prepare_data(cfg, progress=lambda msg: log(f"data: {msg}")))  # one builds it
    if has_checkpoint:
        check_corpus(run_dir, cache.identity)
    on_main(lambda: (write_config(run_dir, cfg), write_tokenizer(run_dir, cache.tokenizer_path)))
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size

    # ---- model, optimizer, state -------------------------------------------------------------
    total_steps = total_steps_of(cfg)
    model = build_model(cfg.model, cfg.fp8, seed=cfg.train.seed)
    counts = parameter_counts(model)
    flops_tok = flops_per_token(model, seq_len)
    tx = make_optimizer(cfg.optim, total_steps)
    graphdef, state = init_state(model, tx)
    del model
    mesh = make_mesh(cfg)
    if process_count() > 1 and mesh.devices.size != jax.device_count():
        raise ConfigError(f"train.data_parallel ({cfg.train.data_parallel}) uses {mesh.devices.size} of the "
                          f"{jax.device_count()} devices of {process_count()} processes: a multi-process run "
                          "uses them all (set train.data_parallel to -1, or train.mesh)")
    shardings = state_shardings(state, mesh)  # replicated unless the mesh has fsdp or expert > 1
    batch_layout = batch_sharding(mesh)
    accum = cfg.train.grad_accum
    batch_shape = (accum, batch // accum, seq_len + 1)
    rows = process_batch_rows(batch_layout, accum, batch // accum) if process_count() > 1 else None
    data_iter = make_train_iterator(cache.train, seq_len=seq_len, batch_size=batch, seed=cfg.data.shuffle_seed,
                                    rows=rows)  # this process's rows of each global batch (one process: all)
    sharded = mesh.shape["fsdp"] > 1 or mesh.shape["expert"] > 1  # else: exactly the data-parallel program
    state = jax.device_put(state, shardings)
    step_xla = step_options(cfg.train.deterministic)
    train_step = guarded_step(
        make_train_step(graphdef, cfg, tx, step_xla, state_sharding=shardings if sharded else None,
                        mesh=mesh if sharded else None, jit=False),
        skip=skip_nonfinite > 0, compiler_options=step_xla, state_sharding=shardings if sharded else None)
    train_step = guard_first_compile(train_step, step_xla, f"train.deterministic={str(cfg.train.deterministic).lower()}")
    val_loss_of = make_val_loss(graphdef, cfg, cache.val)
    mtp_acceptance_of = make_mtp_acceptance(graphdef, cfg, cache.val)
    schedule = lr_schedule(cfg.optim, total_steps)

    def set_data_state(_state, data_state, _meta) -> None:
        try:
            data_iter.set_state(data_state)
        except Exception as e:  # noqa: BLE001 - grain raises assorted types for a state it cannot use
            raise CheckpointError(f"the data-iterator state does not fit this data pipeline "
                                  f"({type(e).__name__}: {e})") from None

    if store is None:
        store = CheckpointStore(run_dir, async_save=cfg.checkpoint.async_save)
        opened.append(store.close)
    start_step, skipped, last_checkpoint = 0, [], "none"
    restored = restore_latest(store, abstract_like(state), set_data_state, fallback=fallback,
                              log=log) if resuming else None
    if restored is not None:
        kind, start_step, state, meta = restored
        state = jax.device_put(state, shardings)
        skipped = list(meta.get("skipped_steps", []))
        last_checkpoint = str(store.path(kind, start_step))
        log(f"resuming {run_dir} from the {kind} checkpoint at step {start_step} "
            f"({format_count(meta['tokens_seen'])} tokens)")
    elif cfg.train.init_from is not None:
        state, data_state, start_step = restore_branch_point(cfg, state, cache.identity)
        state = jax.device_put(state, shardings)
        data_iter.set_state(data_state)
        log(f"branching from {cfg.train.init_from} at step {start_step}")

    points, dropped = series_points(cfg.checkpoint, cfg.tokens_per_step, total_steps)
    if dropped:
        log(f"note: series targets beyond the end of training ({total_steps * cfg.tokens_per_step} tokens) "
            f"are skipped: {dropped}")
    series_at = {p.step: p for p in points}
    done_series = set(store.steps("series"))

    run_info = {
        "name": cfg.name, "config_hash": cfg.hash(), "environment": environment_info(),
        "corpus": cache.identity, "tokenizer": str(run_dir / TOKENIZER),
        "params": counts, "flops_per_token": flops_tok, "tokens_per_step": cfg.tokens_per_step,
        "total_steps": total_steps, "series_steps": [p.step for p in points],
        "train_tokens_available": int(len(cache.train)), "val_tokens": int(len(cache.val)),
        "kv_cache_bytes_per_token_per_layer_bf16": kv_cache_bytes_per_token(cfg.model),
        "deterministic": cfg.train.deterministic, "xla_step_options": step_xla,
        "fp8_kernels": implementation_record(cfg.fp8),
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
    }
    if process_count() > 1:
        run_info["processes"] = process_count()
    on_main(lambda: write_run_info(run_dir, run_info))
    if start_step == 0:
        log(f"efftrain {cfg.name}: {format_count(counts['total'])} params "
            f"({format_count(counts['non_embedding'])} non-embedding, {format_count(counts['active'])} active), "
            f"{total_steps} steps x {cfg.tokens_per_step} tokens, {len(points)} series checkpoints, "
            f"devices {len(mesh.devices.flat)}x {jax.devices()[0].device_kind}"
            + (f" in {process_count()} processes" if process_count() > 1 else ""))
        if sharded:
            total, per_device = state_bytes(state, shardings)
            log(f"mesh {describe(mesh)}: train state {format_count(total)}B, {format_count(per_device)}B per device")
        log(f"versions: jax {jax.__version__}, python {platform.python_version()}; config hash {cfg.hash()}")

    metrics_log = on_main(lambda: MetricsLog(run_dir, cfg.logging.tensorboard, start_step, log))  # process 0's
    if metrics_log is not None:
        opened.append(metrics_log.close)
    peak = peak_flops(jax.devices()[0])
    n_dev = len(mesh.devices.flat)
    result = TrainResult(run_dir=run_dir, steps=start_step, tokens_seen=start_step * cfg.tokens_per_step)

    def checkpoint(kind: str, step: int, st, val_loss: float | None, target: int | None = None):
        nonlocal last_checkpoint
        meta = {"tokens_seen": step * cfg.tokens_per_step, "target_tokens": target, "val_loss": val_loss,
                "wall_time_s": time.time() - t_start, "config_hash": cfg.hash(), "time": time.time()}
        if kind == "series" and mtp_acceptance_of is not None:
            meta["mtp_acceptance"] = mtp_acceptance_of(st["params"], st["rest"])
        if skipped:
            meta["skipped_steps"] = list(skipped)
        store.save(kind, step, st, data_iter.get_state(), meta)
        last_checkpoint = str(store.path(kind, step))

    def settle(step: int, ok, metrics) -> bool:
        """Read one finished step's finite flag: True if it was skipped; NonFiniteError if it may not be."""
        if bool(ok):
            return False
        loss, gnorm = float(metrics["loss"]), float(metrics["grad_norm"])
        what = (f"non-finite loss/gradient at step {step} (loss {loss}, grad_norm {gnorm})"
                if not np.isfinite([loss, gnorm]).all() else
                f"the update of step {step} made the parameters or optimizer state non-finite")
        if len(skipped) < skip_nonfinite:
            skipped.append(step)
            log(f"warning: {what}: step skipped, state unchanged ({len(skipped)} of --skip-nonfinite "
                f"{skip_nonfinite})")
            return True
        spent = f" (--skip-nonfinite {skip_nonfinite} spent on steps {skipped})" if skip_nonfinite else ""
        raise NonFiniteError(f"{what}{spent}: training halted; nothing from this step on is checkpointed "
                             f"(newest checkpoint: {last_checkpoint}). Lower optim.lr or check the data, or "
                             "re-run with --skip-nonfinite N to skip up to N such steps")

    def log_record(step: int, metrics, val_loss: float | None, was_skipped: bool) -> None:
        nonlocal t_window, steps_in_window, data_time
        flat = flatten_metrics(host_values(metrics))
        elapsed = time.time() - t_window
        tok_s = steps_in_window * cfg.tokens_per_step / max(elapsed, 1e-9)
        record = {"step": step, "tokens": step * cfg.tokens_per_step, "lr": float(schedule(step - 1)),
                  **flat, "tokens_per_s": tok_s, "data_time_s": data_time, "step_time_s": elapsed}
        if peak:
            record["mfu"] = tok_s * flops_tok / (peak * n_dev)
        if val_loss is not None:
            record["val_loss"] = val_loss
        if was_skipped:
            record["skipped"] = True
        on_main(lambda: metrics_log.write(record))
        result.losses[step] = flat["loss"]
        if cfg.logging.progress:
            log(progress_line(step, total_steps, record, t_start, start_step))
        t_window, steps_in_window, data_time = time.time(), 0, 0.0

    t_start = time.time()
    t_window, steps_in_window, data_time = time.time(), 0, 0.0
    step = start_step
    pending = None  # (step, ok, metrics) of the last step whose finite flag was not read yet
    with StopSignals() as stop:
        while step < total_steps:
            t0 = time.time()
            window = np.asarray(next(data_iter)).reshape(accum, -1, seq_len + 1)  # this process's rows
            data_time += time.time() - t0
            tokens_seen = jnp.asarray(step * cfg.tokens_per_step, jnp.float32)
            state, metrics, ok = train_step(state, global_batch(window, batch_layout, batch_shape), tokens_seen)
            step += 1
            steps_in_window += 1
            if pending is not None:
                settle(*pending)  # the previous step: done by now, or finishing while this one is queued
            pending = (step, ok, metrics)
            is_series = step in series_at and step not in done_series
            periodic = step % cfg.checkpoint.resume_every == 0 or step == stop_at_step
            want_eval = (cfg.train.eval_every and step % cfg.train.eval_every == 0) or is_series \
                or step == total_steps
            want_log = step % cfg.train.log_every == 0 or want_eval
            signalled = stop.signum is not None
            if process_count() > 1:  # agreed where the loop waits for the step anyway (log, eval, checkpoint)
                signalled = (want_log or is_series or periodic) and any_process(signalled)
            stopping = signalled and step < total_steps  # a signal arrived: save, leave
            is_resume = not is_series and (periodic or stopping)
            if not (want_log or is_series or is_resume):
                continue
            was_skipped = settle(*pending)
            pending = None
            val_loss = None
            if want_eval:
                val_loss = val_loss_of(state["params"], state["rest"])
                result.val_losses[step] = val_loss
            if want_log:
                log_record(step, metrics, val_loss, was_skipped)
            if is_series:
                checkpoint("series", step, state, val_loss, series_at[step].target_tokens)
                done_series.add(step)
            elif is_resume:
                checkpoint("resume", step, state, val_loss)
            if stopping:
                store.wait()
                raise Interrupted(f"{stop.name or 'a signal to another process'} received: stopped after step "
                                  f"{step} with the checkpoint {last_checkpoint} written; re-run the same command "
                                  "to resume", stop.signum or signal.SIGTERM)
            if stop_at_step is not None and step >= stop_at_step:
                break
        if pending is not None:
            settle(*pending)
        store.wait()
    opened.clear()
    try:
        if metrics_log is not None:
            metrics_log.close()
    except OSError as e:
        raise write_failure(str(metrics_log.path), e) from None
    store.close()

    result.steps, result.tokens_seen = step, step * cfg.tokens_per_step
    result.final_state = state
    result.graphdef = graphdef
    result.series = CheckpointStore(run_dir, read_only=True).series()
    if step >= total_steps:
        log(f"done: {step} steps, {format_count(result.tokens_seen)} tokens, {len(result.series)} series "
            f"checkpoints in {store.directory('series')} ({format_duration(time.time() - t_start)})")
    return result


def restore_branch_point(cfg: Config, state, identity: dict | None = None):
    """(state, data-iterator state, step) from the series checkpoint a branch run starts at.

    A branch must share the source run's architecture, data (and corpus identity, when given) and batch
    size; its optimizer schedule may differ from there on (e.g. a WSD cooldown starting at the branch
    step)."""
    src = Path(cfg.train.init_from)
    src_cfg = load_run_config(src)
    same = ("model", "data", "fp8")
    diff = [d for d in resume_blocking_diff(src_cfg, cfg) if d[0].split(".")[0] in same
            or d[0] in ("train.batch_size", "train.seed")]
    if diff:
        raise RunDirError(f"train.init_from={src} has a different model/data config:\n"
                          f"{diff_lines(diff, 'source', 'branch')}")
    if identity is not None:
        check_corpus(src, identity, "source", "branch")
    step = cfg.train.init_from_step
    store = CheckpointStore(src, read_only=True)
    if step not in store.steps("series"):
        raise RunDirError(f"train.init_from={src} has no series checkpoint at step {step} "
                          f"(available: {store.steps('series')})")
    restored, data_state, _ = store.restore("series", step, abstract_like(state))
    store.close()
    return restored, data_state, step


def progress_line(step: int, total: int, rec: dict, t_start: float, start_step: int) -> str:
    done = step - start_step
    eta = (time.time() - t_start) / max(done, 1) * (total - step)
    parts = [f"step {step:0{len(str(total))}d}/{total} ({100 * step / total:.1f}%)",
             f"tokens {format_count(rec['tokens'])}", f"loss {rec['loss']:.4f}"]
    if "val_loss" in rec:
        parts.append(f"val {rec['val_loss']:.4f}")
    parts += [f"lr {rec['lr']:.2e}", f"{format_count(rec['tokens_per_s'])} tok/s"]
    if "mfu" in rec:
        parts.append(f"mfu {100 * rec['mfu']:.0f}%")
    if "moe/max_vio" in rec:
        parts.append(f"maxvio {rec['moe/max_vio']:.2f}")
    parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)
