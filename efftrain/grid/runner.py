"""Run a grid: train every cell, quantize every checkpoint, record everything in the results store.

For each cell (main cells first, each followed by its cooldown / average cells):
  1. skip it if its status is done and all its PTQ rows are in the store; skip a failed cell unless
     retry_failed; skip it (for now) if another process holds its lock (runs_dir/.locks/KEY.lock);
  2. mark it running and produce its run in runs_dir/KEY:
       main      train(cfg, run_dir), which resumes a partial run by itself;
       cooldown  copy the parent's series checkpoint at T into the branch's resume slot
                 (CheckpointStore.copy_from: listed once whole), write the branch config, then train
                 (= resume with the cooldown schedule);
       average   mean of the parent's parameters at the averaging steps, saved as one series
                 checkpoint (other state from the last of them) beside the parent's config;
  3. record its series checkpoints and parameter counts;
  4. backfill PTQ rows from RUN_DIR/ptq.csv, run the PTQ sweep (which skips rows already in
     ptq.csv) with on_row writing each new row to the store, backfill again; mark it done.
Any exception marks the cell failed with its message and the runner goes on with the next cell. A
KeyboardInterrupt (or a kill) leaves the cell pending/running; rerunning completes it: training
resumes from its checkpoints, the sweep from ptq.csv, and the store ignores rows it already has.

`workers > 1` runs the cell families (a main cell and its derived cells) in that many spawned worker
processes, each pinned to one GPU (CUDA_VISIBLE_DEVICES, round-robin) when GPUs are present, taking
the families in the order of efftrain.grid.schedule (costliest cells first, one replicate of each
before the next, a replicate held while its sibling compiles); the store takes concurrent writers
(WAL + busy timeout). `slurm="partition=...,time=..."` submits one
job per unfinished family through submitit instead.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import signal
import subprocess
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import absl.logging
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efftrain.data import prepare_data
from efftrain.data.corpus import DataError, check_paths
from efftrain.grid.spec import (AVERAGE, COOLDOWN, MAIN, WARN_EPOCHS, Cell, GridError, GridSpec,
                                expected_checkpoints, expected_ptq_keys, expected_ptq_rows, load_spec)
from efftrain.grid.schedule import ORDERS, FamilyQueue, ordered
from efftrain.grid.store import ResultsStore
from efftrain.model.transformer import build_model
from efftrain.quant.recovery import check_recovery
from efftrain.quant.sweep import PTQError, check_group_sizes, read_rows, row_key, run_ptq_sweep
from efftrain.train.checkpoint import CheckpointStore
from efftrain.train.loop import Interrupted, StopSignals, train
from efftrain.train.rundir import (CONFIG, PTQ_TABLE, abstract_train_state, adopt_run_files, finalized,
                                   make_val_loss, read_run_info, series_steps, write_config)

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# Locks: one process per cell at a time
# ----------------------------------------------------------------------------------------------
class CellLock:
    """Non-blocking exclusive flock on runs_dir/.locks/KEY.lock (released when the process dies)."""

    def __init__(self, runs_dir: Path, key: str):
        self.path = runs_dir / ".locks" / f"{key}.lock"
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------------------------
# Producing a cell's run
# ----------------------------------------------------------------------------------------------
def _train(cell: Cell, log: Log) -> None:
    train(cell.config, cell.run_dir, log=log)


def run_trained(cell: Cell) -> bool:
    """Whether the cell's run holds every series checkpoint it has when finished: its training is over,
    so a rerun does not restore its state only to find nothing to do (and the single-process step of a
    multi-node job never trains it on fewer devices)."""
    return set(expected_checkpoints(cell)) <= set(series_steps(cell.run_dir))


def _train_unless_trained(cell: Cell, no_train: bool, log: Log) -> None:
    if run_trained(cell):
        return
    if no_train:
        raise GridError(f"its run {cell.run_dir} did not finish training (--no-train: it was to be trained by the "
                        f"multi-node step before; see that job's log)")
    _train(cell, log)


def branch_prepared(cell: Cell) -> bool:
    """Whether the cooldown branch's run dir was prepared before (train resumes from its newest checkpoint)."""
    return (cell.run_dir / CONFIG).exists()


def prepare_branch(parent: Cell, cell: Cell, log: Log, *, writer: bool = True) -> None:
    """Make cell.run_dir a run that resumes from the parent's series checkpoint at the branch step.
    writer=False (the processes other than 0 of a multi-process job): open the same checkpoint stores,
    which orbax's managers do together across processes, but leave the copy and the config to process 0."""
    step = cell.branch_step
    available = series_steps(parent.run_dir)
    if step not in available:
        raise GridError(f"cooldown branch {cell.key}: the parent run {parent.run_dir} has no series checkpoint "
                        f"at step {step} (it has {available})")
    src = CheckpointStore(parent.run_dir, read_only=True)
    try:
        dst = CheckpointStore(cell.run_dir, async_save=False)
        try:
            if writer:
                dst.copy_from(src, "series", step, as_kind="resume")
        finally:
            dst.close()
    finally:
        src.close()
    if not writer:
        return
    write_config(cell.run_dir, cell.config)
    log(f"cooldown branch: starts from {src.path('series', step)} "
        f"({cell.branch_tokens:,} tokens), decays over {cell.config.train.max_steps - step} steps")


def build_average(parent: Cell, cell: Cell, log: Log) -> None:
    """One series checkpoint whose parameters are the mean of the parent's at cell.average_steps."""
    run_dir, step = cell.run_dir, cell.branch_step
    if step not in series_steps(run_dir):
        missing = sorted(set(cell.average_steps) - set(series_steps(parent.run_dir)))
        if missing:
            raise GridError(f"average cell {cell.key}: the parent run {parent.run_dir} lacks series checkpoints "
                            f"at steps {missing}")
        cfg = cell.config
        graphdef, abstract = abstract_train_state(cfg)
        src = CheckpointStore(parent.run_dir, read_only=True)
        total = None
        for s in cell.average_steps:  # running sum in float64, one checkpoint in memory at a time
            state, data_state, meta = src.restore("series", s, abstract)
            params64 = jax.tree.map(lambda a: np.asarray(a, np.float64), state["params"])
            total = params64 if total is None else jax.tree.map(np.add, total, params64)
        src.close()
        n = len(cell.average_steps)
        # jax arrays, as the trainer saves them (a checkpoint written from numpy restores as numpy)
        state["params"] = jax.tree.map(lambda t, a: jnp.asarray((t / n).astype(np.asarray(a).dtype)), total,
                                       state["params"])
        val = make_val_loss(graphdef, cfg, prepare_data(cfg).val)(state["params"], state["rest"])
        meta = {**meta, "val_loss": val, "averaged_steps": list(cell.average_steps), "time": time.time()}
        dst = CheckpointStore(run_dir, async_save=False)
        dst.save("series", step, state, data_state, meta)
        dst.wait()
        dst.close()
        log(f"average: mean of the parameters at steps {list(cell.average_steps)} -> "
            f"{dst.path('series', step)} (val loss {val:.4f})")
    adopt_run_files(parent.run_dir, run_dir)
    if not (run_dir / CONFIG).exists():
        write_config(run_dir, cell.config)


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------
def record_run(store: ResultsStore, cell: Cell) -> int:
    """Series checkpoints and parameter counts of the cell's run into the store; returns #checkpoints."""
    series = finalized(cell.run_dir)
    info = read_run_info(cell.run_dir)
    train_tokens = info.get("train_tokens_available")
    store.add_checkpoints(cell.key, series, train_tokens=train_tokens)
    if info:
        store.set_params(cell.key, info.get("params", {}), train_tokens=train_tokens)
    return len(series)


def backfill_ptq(store: ResultsStore, cell: Cell) -> int:
    """Rows of RUN_DIR/ptq.csv missing from the store (a kill between the CSV and the DB); returns #new."""
    rows = read_rows(cell.run_dir / PTQ_TABLE)
    if not rows:
        return 0
    have = store.ptq_keys(cell.key).get(cell.key, set())
    return sum(store.add_ptq_row(r, cell) for r in rows if row_key(r) not in have)


def _sweep(spec: GridSpec, cell: Cell, store: ResultsStore, log: Log) -> None:
    run_ptq_sweep(cell.run_dir, spec.ptq_for(cell), on_row=lambda row: store.add_ptq_row(row, cell), log=log)


# ----------------------------------------------------------------------------------------------
# One cell, one family
# ----------------------------------------------------------------------------------------------
def ptq_progress(store: ResultsStore, spec: GridSpec, cell: Cell) -> tuple[int, int]:
    """(rows of the current PTQ spec recorded, rows expected) for the cell."""
    expected = expected_ptq_keys(spec, cell)
    return len(expected & store.ptq_keys(cell.key).get(cell.key, set())), len(expected)


def cell_complete(store: ResultsStore, spec: GridSpec, cell: Cell) -> bool:
    rec = store.run(cell.key)
    have, expected = ptq_progress(store, spec, cell)
    return bool(rec) and rec["status"] == "done" and have == expected


def run_cell(spec: GridSpec, cell: Cell, store: ResultsStore, *, retry_failed: bool = False, no_train: bool = False,
             log: Log = print) -> str:
    """Bring one cell to done. Returns its status: done | failed | busy (locked by another process).
    no_train: a main or cooldown cell whose run is not trained yet fails instead of training."""
    lock = CellLock(spec.runs_dir, cell.key)
    if not lock.acquire():
        log(f"cell {cell.key} ({cell.name}): running in another process, skipped")
        return "busy"
    try:
        rec = store.run(cell.key)
        if rec is None:
            store.register_cell(cell, ckpt_expected=len(expected_checkpoints(cell)),
                                ptq_expected=expected_ptq_rows(spec, cell))
            rec = store.run(cell.key)
        have, expected = ptq_progress(store, spec, cell)
        if rec["status"] == "done" and have == expected:
            log(f"cell {cell.key} ({cell.name}): done ({expected} PTQ rows), skipped")
            return "done"
        if rec["status"] == "failed" and not retry_failed:
            log(f"cell {cell.key} ({cell.name}): failed before ({rec['error']}); skipped (use --retry-failed)")
            return "failed"
        store.set_status(cell.key, "running")
        log(f"cell {cell.key} ({cell.name}): {cell.kind}, run dir {cell.run_dir}")
        try:
            if cell.kind == MAIN:
                _train_unless_trained(cell, no_train, log)
            elif cell.kind == COOLDOWN:
                if not branch_prepared(cell):
                    prepare_branch(spec.cell(cell.parent), cell, log)
                _train_unless_trained(cell, no_train, log)
            else:
                build_average(spec.cell(cell.parent), cell, log)
            record_run(store, cell)
            backfill_ptq(store, cell)
            _sweep(spec, cell, store, log)
            backfill_ptq(store, cell)
            have, expected = ptq_progress(store, spec, cell)
            note = None if have == expected else f"incomplete: {have} of {expected} PTQ rows"
            if note:
                log(f"cell {cell.key}: warning: {note}")
            store.set_status(cell.key, "done", error=note)
            log(f"cell {cell.key} ({cell.name}): done, {have} PTQ rows")
            return "done"
        except KeyboardInterrupt:
            store.set_status(cell.key, "pending", error="interrupted")
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one cell must not stop the grid
            message = f"{type(e).__name__}: {e}"
            store.set_status(cell.key, "failed", error=message)
            log(f"cell {cell.key} ({cell.name}): FAILED: {message}")
            log("".join(traceback.format_exception(e)[-3:]).rstrip())
            return "failed"
    finally:
        lock.release()


def run_family(spec: GridSpec, cells: list[Cell], *, retry_failed: bool = False, only: set[str] | None = None,
               no_train: bool = False, log: Log = print) -> dict[str, str]:
    """A main cell then its derived cells (which need the main run's checkpoints)."""
    store = ResultsStore(spec.db_path)
    out: dict[str, str] = {}
    try:
        main = cells[0]
        for cell in cells:
            if only is not None and cell.key not in only and cell.kind != MAIN:
                continue
            needed = {cell.branch_step, *cell.average_steps} if cell.kind != MAIN else set()
            if needed - set(series_steps(main.run_dir)):
                log(f"[{cell.key}] cell {cell.key} ({cell.name}): waits for the checkpoints of its parent "
                    f"{main.key} (now {out.get(main.key, 'not run')}), skipped")
                out[cell.key] = "pending"
                continue
            prefix = f"[{cell.key}] "
            out[cell.key] = run_cell(spec, cell, store, retry_failed=retry_failed, no_train=no_train,
                                     log=lambda msg, p=prefix: log(p + msg))
    finally:
        store.close()
    return out


def train_family(spec: GridSpec, cells: list[Cell], *, only: set[str] | None = None, log: Log = print) -> dict[str, str]:
    """The training of a family's main cell and cooldown branches, in every process of a multi-process job
    (step 1 of a multi-node SLURM cell, efftrain.grid.multinode: `grid run --train-only`). Every process
    takes the same decisions (a cell is trained when any process finds its run unfinished); no results
    store writes, no locks, no PTQ; averages are left to the single-process step. Returns
    {cell key: trained | failed | pending}."""
    from efftrain.train.distributed import any_process, is_main, sync

    out: dict[str, str] = {}
    for cell in cells:
        if cell.kind == AVERAGE or (only is not None and cell.key not in only and cell.kind != MAIN):
            continue
        if cell.kind == COOLDOWN and out.get(cell.parent) != "trained":
            out[cell.key] = "pending"
            continue
        prefix = f"[{cell.key}] "
        try:
            if any_process(not run_trained(cell)):
                log(f"{prefix}cell {cell.key} ({cell.name}): {cell.kind}, training in run dir {cell.run_dir}")
                if cell.kind == COOLDOWN and any_process(not branch_prepared(cell)):
                    prepare_branch(spec.cell(cell.parent), cell, lambda msg, p=prefix: log(p + msg), writer=is_main())
                    sync(f"branch {cell.key}")  # the copy and its config are in place for every process
                _train(cell, lambda msg, p=prefix: log(p + msg))
            out[cell.key] = "trained"
        except Interrupted:
            raise
        except Exception as e:  # noqa: BLE001 - as in run_cell: the next step marks the cell failed
            out[cell.key] = "failed"
            print(f"{prefix}cell {cell.key} ({cell.name}): training FAILED: {type(e).__name__}: {e}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------
def _select(spec: GridSpec, only) -> tuple[dict[str, list[Cell]], set[str] | None]:
    families = spec.families()
    if not only:
        return families, None
    keys = {spec.cell(k).key for k in only}  # resolves unique prefixes; GridError for unknown keys
    chosen = {fam: cells for fam, cells in families.items() if any(c.key in keys for c in cells)}
    return chosen, keys


def cell_epochs(cell: Cell, train_tokens: int) -> float:
    """Passes over its train split that the cell's run makes by its last step (a branch: by its end)."""
    cfg = cell.config
    steps = cell.branch_step if cell.kind == AVERAGE else \
        (cfg.train.max_steps or -(-cfg.train.max_tokens // cfg.tokens_per_step))
    return steps * cfg.tokens_per_step / max(train_tokens, 1)


def check_epochs(spec: GridSpec, cells: list[Cell], log: Log = print) -> dict[str, float]:
    """Epochs of every cell (key -> passes over the train split): a warning per cell above WARN_EPOCHS,
    a GridError naming the cells above the spec's max_epochs. Builds (or reuses) each distinct token
    cache, which training needs anyway."""
    train_tokens: dict[str, int] = {}
    epochs = {}
    for cell in cells:
        data_key = cell.config.data.model_dump_json() + f"|{cell.config.model.vocab_size}"
        if data_key not in train_tokens:
            train_tokens[data_key] = len(prepare_data(cell.config).train)
        epochs[cell.key] = cell_epochs(cell, train_tokens[data_key])
    over = {c.name: epochs[c.key] for c in cells if epochs[c.key] > spec.max_epochs}
    if over:
        worst = ", ".join(f"{n} ({e:.1f})" for n, e in sorted(over.items(), key=lambda x: -x[1])[:5])
        raise GridError(f"grid spec {spec.path}: {len(over)} cell(s) would repeat their training data more than "
                        f"max_epochs={spec.max_epochs:g} times: {worst}; the D axis would then measure data "
                        f"repetition. Use a larger corpus, fewer tokens, or raise max_epochs in the spec")
    for c in cells:
        if epochs[c.key] > WARN_EPOCHS:
            log(f"warning: cell {c.key} ({c.name}) sees its training data {epochs[c.key]:.1f} times "
                f"(> {WARN_EPOCHS:g}): its late checkpoints measure repetition as well as tokens")
    return epochs


def preflight(spec: GridSpec, cells: list[Cell], log: Log = print) -> None:
    """Refuse a grid, before any training starts, whose data paths find no files, whose PTQ settings
    cannot apply to some cell's weights (e.g. a group size that does not divide a layer's input dim, a
    recovery rank above a layer's width or a recovery budget below one batch), or whose cells would
    repeat their training data more than `max_epochs` times."""
    first_of_data: dict[str, Cell] = {}
    for c in cells:
        first_of_data.setdefault(c.config.data.model_dump_json(), c)
    for cell in first_of_data.values():  # each distinct data config once
        try:
            check_paths(cell.config.data)
        except DataError as e:
            raise GridError(f"grid spec {spec.path}, cell {cell.key} ({cell.name}): data: {e}") from None
    seen = set()
    for cell in cells:
        model_cfg = (cell.config.model, cell.config.fp8)
        if (model_cfg, tuple(spec.ptq.group_sizes)) in seen:
            continue
        seen.add((model_cfg, tuple(spec.ptq.group_sizes)))
        abstract = nnx.eval_shape(lambda c=cell.config: build_model(c.model, c.fp8, seed=c.train.seed))
        try:
            check_group_sizes(abstract, spec.ptq)
        except PTQError as e:
            raise GridError(f"grid spec {spec.path}, cell {cell.key} ({cell.name}): {e}; "
                            f"change ptq.group_sizes") from None
    checked = set()
    for cell in cells if spec.ptq.recovery else []:  # budgets (batches), ranks (layer widths), targets
        c = cell.config
        what = (c.model, c.fp8, c.train.batch_size, c.train.grad_accum, c.data.seq_len)
        if what in checked:
            continue
        checked.add(what)
        try:
            check_recovery(nnx.eval_shape(lambda c=c: build_model(c.model, c.fp8, seed=c.train.seed)), c,
                           spec.ptq.recovery)
        except PTQError as e:
            raise GridError(f"grid spec {spec.path}, cell {cell.key} ({cell.name}): {e}; change ptq.recovery") from None
    check_epochs(spec, cells, log)


def register_all(spec: GridSpec) -> None:
    with ResultsStore(spec.db_path) as store:
        for cell in spec.cells():
            store.register_cell(cell, ckpt_expected=len(expected_checkpoints(cell)),
                                ptq_expected=expected_ptq_rows(spec, cell))


def run_grid(spec_path: str | Path, *, workers: int = 1, retry_failed: bool = False, only=None,
             log: Log = print, set_overrides: dict[str, Any] | None = None, runs_dir: str | Path | None = None,
             slurm: str | None = None, train_only: bool = False, no_train: bool = False,
             order: str = "costliest") -> dict[str, str]:
    """Run (or complete) the grid; returns {cell key: status} for the cells it handled.

    only: cell keys (or unique prefixes); their families' main cells run first when needed.
    order: how `workers > 1` take the families (efftrain.grid.schedule): "costliest" (costliest distinct
    cells first, one replicate of each before the next, a replicate held while its sibling compiles),
    "spread" (the replicates spread alone) or "spec" (the spec's order); benchmarks/bench_grid.py
    compares them.
    set_overrides / runs_dir: as in `load_spec` (e.g. a data.cache_dir for every cell).
    train_only / no_train: the two steps of a multi-node cell (efftrain.grid.multinode): only the training,
    in every process of a multi-process launch; everything but the training, in one process.
    """
    absl.logging.set_verbosity(absl.logging.ERROR)
    if train_only and (no_train or slurm or workers != 1):
        raise GridError("--train-only is the training step of a multi-node job: it takes no --no-train, --slurm "
                        "or --workers")
    if train_only:
        from efftrain.train.distributed import initialize_distributed

        initialize_distributed()  # the srun step's tasks join one job before JAX starts
    spec = load_spec(spec_path, set_overrides=set_overrides, runs_dir=runs_dir)
    families, keys = _select(spec, only)
    if workers < 1:
        raise GridError(f"--workers must be >= 1, got {workers}")
    if order not in ORDERS:
        raise GridError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    if train_only:
        from efftrain.train.distributed import is_main

        log = log if is_main() else (lambda _msg: None)  # process 0 logs for the job, as train() does
        results = {}
        for cells in families.values():
            results.update(train_family(spec, cells, only=keys, log=log))
        log(f"grid {spec.name}: training step: " + ", ".join(f"{k} {s}" for k, s in results.items()))
        return results
    preflight(spec, [c for cells in families.values() for c in cells], log)
    register_all(spec)
    n_cells = sum(len(c) for c in families.values())
    log(f"grid {spec.name}: {n_cells} cells in {len(families)} families, results in {spec.db_path}")
    if slurm:
        return submit_slurm(spec, families, keys, slurm, retry_failed=retry_failed, set_overrides=set_overrides,
                            log=log)
    if workers > 1 and len(families) > 1:
        if no_train:
            raise GridError("--no-train runs in one process (the second step of a multi-node job): no --workers")
        queue = FamilyQueue(ordered(families, order), hold=order == "costliest")
        results = _run_parallel(spec, queue, keys, workers, retry_failed=retry_failed,
                                set_overrides=set_overrides, log=log)
    else:
        results = {}
        for cells in families.values():
            results.update(run_family(spec, cells, retry_failed=retry_failed, only=keys, no_train=no_train, log=log))
    counts = {s: sum(v == s for v in results.values()) for s in sorted(set(results.values()))}
    log(f"grid {spec.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; results in {spec.db_path}")
    return results


# ---- worker processes -------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """GPU ids to spread workers over: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


_stop_asked = False  # in a worker: the grid forwarded a stop (SIGUSR1); families not yet begun are skipped


def _note_stop(signum, frame) -> None:
    global _stop_asked
    _stop_asked = True


def _init_worker(slots, share_gpu: bool) -> None:
    """Pin the worker to its GPU. Importing this module loads JAX but starts no backend (that waits for
    the first computation), so the variables set here still decide which device the worker gets. A stop
    forwarded outside training (SIGUSR1, whose default would kill the worker mid-sweep) is noted, not fatal:
    the sweep running finishes its row loop and the worker takes no further family."""
    signal.signal(signal.SIGUSR1, _note_stop)
    gpu = slots.get()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        if share_gpu:  # several workers on one GPU: no worker may take 75 % of its memory up front
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _worker(spec_path: str, keys: list[str], retry_failed: bool, set_overrides, runs_dir: str) -> dict[str, str]:
    global _stop_asked
    if _stop_asked:  # a stop came while this family waited in the pool's queue: leave it for the next run
        return {}
    absl.logging.set_verbosity(absl.logging.ERROR)
    spec = load_spec(spec_path, set_overrides=set_overrides, runs_dir=runs_dir)
    cells = [spec.cell(k) for k in keys]
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    tag = f"[worker {os.getpid()}" + (f" gpu {gpu}]" if gpu else "]")
    try:
        return run_family(spec, cells, retry_failed=retry_failed, only=set(keys),
                          log=lambda msg: print(f"{tag} {msg}", flush=True))
    except Interrupted:
        _stop_asked = True
        raise


POLL_S = 2.0  # how often the grid looks whether a held family may start


def _run_parallel(spec: GridSpec, queue: FamilyQueue, keys: set[str] | None, workers: int, *,
                  retry_failed: bool, set_overrides, log: Log) -> dict[str, str]:
    """Hand the queue's families to `workers` processes, one family per free worker, as `queue.take()`
    allows (efftrain.grid.schedule), until every family has run or a stop came."""
    gpus = visible_gpus()
    workers = min(workers, len(queue))
    ctx = mp.get_context("spawn")
    slots = ctx.Queue()
    for i in range(workers):
        slots.put(gpus[i % len(gpus)] if gpus else None)
    log(f"{workers} worker processes" + (f" on GPUs {', '.join(gpus[:workers])}" if gpus else " (no GPUs)"))
    results: dict[str, str] = {}
    running = {}  # future -> family
    said_held: set[str] = set()

    def stop_all(pool):  # families not yet handed to a worker are left, the running ones told to stop
        queue.close()
        _ask_workers_to_stop(pool)

    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(slots, bool(gpus) and workers > len(gpus))) as pool, \
            StopSignals(lambda _: stop_all(pool)) as stop:
        while True:
            while len(running) < workers and (item := queue.take()) is not None:
                fam, cells = item
                fam_keys = [c.key for c in cells if keys is None or c.key in keys or c.kind == MAIN]
                running[pool.submit(_worker, str(spec.path), fam_keys, retry_failed, set_overrides,
                                    str(spec.runs_dir))] = fam
            if not running:
                break
            if len(running) < workers:
                for fam in [f for f in queue.held() if f not in said_held]:
                    said_held.add(fam)
                    log(f"family {fam} ({spec.cell(fam).name}): waits until its replicate's programs are compiled")
            done, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for fut in done:
                fam = running.pop(fut)
                queue.finish(fam)
                try:
                    results.update(fut.result())
                except Exception as e:  # noqa: BLE001 - a crashed worker (e.g. OOM-killed) fails only its family
                    log(f"family {fam}: worker died: {type(e).__name__}: {e}")
                    results[fam] = "failed"
    if stop.signum is not None:  # a worker's own Interrupted, if any, was raised above
        raise Interrupted(f"{stop.name} received: the workers stopped (those training wrote resume checkpoints); "
                          "re-run the same command to resume", stop.signum)
    return results


def _ask_workers_to_stop(pool: ProcessPoolExecutor) -> None:
    """Forward a stop to the workers as SIGUSR1: a worker that is training finishes its step, writes a
    resume checkpoint and stops (exit code 75 for the grid); SIGUSR1 never forces an exit, so a worker
    that got the signal itself (SLURM, Ctrl-C: the whole process group) is not stopped twice."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            os.kill(proc.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass


# ---- SLURM ---------------------------------------------------------------------------------------
SLURM_ALIASES = {"partition": "slurm_partition", "time": "timeout_min", "gpus": "gpus_per_node",
                 "gpus_per_node": "gpus_per_node", "cpus": "cpus_per_task", "cpus_per_task": "cpus_per_task",
                 "mem": "mem_gb", "mem_gb": "mem_gb", "nodes": "nodes", "name": "name",
                 "tasks_per_node": "tasks_per_node", "ntasks_per_node": "tasks_per_node"}


def _minutes(text: str) -> int:
    """SLURM time: MINUTES, HH:MM:SS, MM:SS or D-HH:MM:SS -> minutes."""
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[-3:]
    return days * 1440 + h * 60 + m + (1 if s else 0)


def parse_slurm(text: str) -> dict[str, Any]:
    """'partition=gpu,time=2:00:00,gpus=1,account=abc' -> submitit AutoExecutor parameters."""
    params: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise GridError(f"--slurm: '{item}' is not key=value (e.g. --slurm partition=gpu,time=60)")
        name = SLURM_ALIASES.get(key, key if key.startswith("slurm_") else f"slurm_{key}")
        if name == "timeout_min":
            try:
                params[name] = _minutes(value)
            except ValueError:
                raise GridError(f"--slurm: time '{value}' is not MINUTES or [D-]HH:MM:SS") from None
        else:
            params[name] = int(value) if value.isdigit() else value
    return params


def submit_slurm(spec: GridSpec, families: dict[str, list[Cell]], keys: set[str] | None, slurm: str, *,
                 retry_failed: bool, set_overrides, log: Log) -> dict[str, str]:
    """One SLURM job per family with unfinished cells, each running `run_grid(..., only=family)`; with
    nodes > 1, a two-step batch job per family instead (efftrain.grid.multinode)."""
    params = parse_slurm(slurm)
    if int(params.get("nodes", 1)) > 1:
        from efftrain.grid.multinode import submit_multinode

        with ResultsStore(spec.db_path) as store:
            return submit_multinode(spec, families, keys, params,
                                    pending=lambda cells: not all(cell_complete(store, spec, c) for c in cells),
                                    retry_failed=retry_failed, set_overrides=set_overrides, log=log)
    try:
        import submitit  # lazy: an optional dependency (efftrain[cluster]), needed only with --slurm
    except ImportError:
        raise GridError("--slurm needs the 'submitit' package: pip install 'efftrain[cluster]' "
                        "(or pip install submitit)") from None
    folder = spec.runs_dir.resolve() / "slurm"
    executor = submitit.AutoExecutor(folder=str(folder / "%j"))
    executor.update_parameters(**{"name": f"efftrain-{spec.name}", **params})
    out: dict[str, str] = {}
    with ResultsStore(spec.db_path) as store:
        for fam, cells in families.items():
            chosen = [c for c in cells if keys is None or c.key in keys or c.kind == MAIN]
            if all(cell_complete(store, spec, c) for c in chosen):
                continue
            job = executor.submit(run_grid, str(spec.path.resolve()), only=[c.key for c in chosen],
                                  retry_failed=retry_failed, set_overrides=set_overrides,
                                  runs_dir=str(spec.runs_dir.resolve()))
            log(f"family {fam} ({cells[0].name}): SLURM job {job.job_id}")
            out.update({c.key: f"submitted {job.job_id}" for c in chosen})
    log(f"{len(set(out.values()))} SLURM jobs submitted; logs in {folder}; `efftrain grid status` follows them")
    return out


# ----------------------------------------------------------------------------------------------
# Status
# ----------------------------------------------------------------------------------------------
def grid_status(spec: GridSpec) -> list[dict[str, Any]]:
    """One row per cell: key, name, kind, status, checkpoints done/expected, PTQ rows done/expected."""
    runs, counts, keys = {}, {}, {}
    if spec.db_path.exists():
        with ResultsStore(spec.db_path, read_only=True) as store:
            runs = {r["key"]: r for r in store.runs()}
            counts = store.counts()
            keys = store.ptq_keys()
    rows = []
    for cell in spec.cells():
        rec = runs.get(cell.key, {})
        expected = expected_ptq_keys(spec, cell)
        rows.append({
            "key": cell.key, "name": cell.name, "replicate": cell.replicate, "seed": cell.seed,
            "data_seed": cell.data_seed, "kind": cell.kind, "status": rec.get("status", "pending"),
            "checkpoints": max(counts.get(cell.key, (0, 0))[0], len(series_steps(cell.run_dir))),
            "checkpoints_expected": len(expected_checkpoints(cell)),
            "ptq_rows": len(expected & keys.get(cell.key, set())), "ptq_expected": len(expected),
            "error": rec.get("error"),
        })
    return rows
