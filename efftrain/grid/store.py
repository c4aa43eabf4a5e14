"""The results store of a grid: one SQLite database, runs_dir/results.sqlite.

Tables
  runs         one row per cell: key (PK), name, kind (main|cooldown|average), parent, schedule, axes
               (JSON of the values that define the cell), config_json, status (pending|running|done|
               failed), error, started, finished, host, pid, params_total/active/nonembed/embedding,
               ckpt_expected, ptq_expected, replicate (the cell's name without its seed: the runs of
               one replicate group share it), seed (train.seed), data_seed (data.shuffle_seed),
               train_tokens (tokens of the run's train split)
  checkpoints  (run_key, step) PK: tokens, val_loss, target_tokens, epochs (tokens / train_tokens:
               how many times the run had seen its training data)
  ptq          one row per (run_key, step, method, bits, group_size, format) (UNIQUE): every column
               of the PTQ sweep's rows (efftrain.quant.sweep.CSV_COLUMNS, the recovery columns of
               recovery rows and the scheme columns scheme, act_quant, kv_quant, kv_bytes_per_token,
               rotation, smooth_alpha included) + variant (the cell name),
               replicate, run_key, axes (JSON), schedule, cell_kind, extra (JSON of any other row keys),
               recorded

A store written by an older efftrain gains the columns added since when it is opened for writing
(ALTER TABLE ... ADD COLUMN; old rows read NULL there); opened read-only it is read as it is.

The database runs in WAL mode with a long busy timeout, so several worker processes write to it at
once (on a network filesystem shared by several nodes, set EFFTRAIN_SQLITE_JOURNAL=delete: WAL
needs shared memory). Each PTQ row is its own transaction and inserts are INSERT OR IGNORE: recording a row twice
(a resumed sweep, a backfill from ptq.csv) leaves one row, and a killed writer loses nothing that
was committed.

A grid run in pieces (several machines or sessions) merges into one store: `merge_from` /
`merge_stores` (`efftrain grid merge DEST SRC ...`) copy runs, checkpoints and PTQ rows by the same
natural keys, in one transaction, refusing rows whose values disagree unless told which side wins.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from efftrain.files import atomic_path
from efftrain.grid.spec import GridError, load_spec
from efftrain.tables import load_rows, parse_value, with_n_params

DB_NAME = "results.sqlite"
STATUSES = ("pending", "running", "done", "failed")

PTQ_COLUMNS: list[tuple[str, str]] = [
    ("run_id", "TEXT"), ("step", "INTEGER NOT NULL"), ("tokens", "INTEGER"), ("params_total", "INTEGER"),
    ("params_active", "INTEGER"), ("params_nonembed", "INTEGER"), ("method", "TEXT NOT NULL"),
    ("bits", "INTEGER NOT NULL"), ("group_size", "INTEGER NOT NULL"), ("format", "TEXT NOT NULL"),
    ("loss_16", "REAL"), ("loss_q", "REAL"), ("qid", "REAL"), ("eff_bits", "REAL"), ("model_bytes", "INTEGER"),
    ("n_quantized", "INTEGER"), ("expert_fallbacks", "INTEGER"), ("calib_samples", "INTEGER"),
    ("calib_seq_len", "INTEGER"), ("seconds", "REAL"),
    ("qid_se", "REAL"), ("kl", "REAL"), ("kl_se", "REAL"), ("top1_agree", "REAL"), ("eval_windows", "INTEGER"),
    ("eval_tokens", "INTEGER"), ("eval_seed", "INTEGER"), ("calib_seed", "INTEGER"),
    ("params_quantized", "INTEGER"), ("epochs", "REAL"), ("warmup_steps", "INTEGER"), ("seed", "INTEGER"),
    ("data_seed", "INTEGER"), ("method_label", "TEXT"),
    # recovery rows (efftrain.quant.recovery.RECOVERY_COLUMNS; NULL in plain PTQ rows)
    ("recovery_method", "TEXT"), ("recovery_tokens", "INTEGER"), ("recovery_tokens_seen", "INTEGER"),
    ("recovery_steps", "INTEGER"), ("recovery_rank", "INTEGER"), ("recovery_alpha", "REAL"), ("recovery_lr", "REAL"),
    ("adapter_params", "INTEGER"), ("recovery_trainable_params", "INTEGER"), ("loss_q_before", "REAL"),
    ("qid_before", "REAL"), ("qid_before_se", "REAL"), ("recovered_fraction", "REAL"),
    ("recovered_fraction_se", "REAL"), ("recovery_train_loss", "REAL"),
    # PTQ schemes beyond weight-only (issue 19; NULL in rows written before them: weight-only rows):
    # the scheme's name ('w8a8', 'w16a16+kv-int4', ...), the activation and KV-cache quantizers' labels,
    # the KV cache's bytes per token over all layers, the rotation, SmoothQuant's alpha
    ("scheme", "TEXT"), ("act_quant", "TEXT"), ("kv_quant", "TEXT"), ("kv_bytes_per_token", "REAL"),
    ("rotation", "TEXT"), ("smooth_alpha", "REAL"),
    # added by the grid
    ("variant", "TEXT"), ("replicate", "TEXT"), ("run_key", "TEXT NOT NULL"), ("axes", "TEXT"), ("schedule", "TEXT"),
    ("cell_kind", "TEXT"), ("extra", "TEXT"), ("recorded", "REAL"),
]
PTQ_UNIQUE = ("run_key", "step", "method", "bits", "group_size", "format")
GRID_COLUMNS = ("variant", "replicate", "run_key", "axes", "schedule", "cell_kind", "extra", "recorded")
TIMING_COLUMNS = ("seconds", "recorded")

RUN_COLUMNS: list[tuple[str, str]] = [
    ("key", "TEXT PRIMARY KEY"), ("name", "TEXT"), ("kind", "TEXT"), ("parent", "TEXT"), ("schedule", "TEXT"),
    ("axes", "TEXT"), ("config_json", "TEXT"), ("status", "TEXT NOT NULL DEFAULT 'pending'"), ("error", "TEXT"),
    ("started", "REAL"), ("finished", "REAL"), ("host", "TEXT"), ("pid", "INTEGER"),
    ("params_total", "INTEGER"), ("params_active", "INTEGER"), ("params_nonembed", "INTEGER"),
    ("params_embedding", "INTEGER"), ("ckpt_expected", "INTEGER"), ("ptq_expected", "INTEGER"),
    ("replicate", "TEXT"), ("seed", "INTEGER"), ("data_seed", "INTEGER"), ("train_tokens", "INTEGER"),
]
CHECKPOINT_COLUMNS: list[tuple[str, str]] = [
    ("run_key", "TEXT NOT NULL"), ("step", "INTEGER NOT NULL"), ("tokens", "INTEGER"), ("val_loss", "REAL"),
    ("target_tokens", "INTEGER"), ("epochs", "REAL"), ("mtp_acceptance", "REAL"),
]

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs ({", ".join(f"{c} {t}" for c, t in RUN_COLUMNS)});
CREATE TABLE IF NOT EXISTS checkpoints ({", ".join(f"{c} {t}" for c, t in CHECKPOINT_COLUMNS)},
    PRIMARY KEY (run_key, step));
CREATE TABLE IF NOT EXISTS ptq ({", ".join(f"{c} {t}" for c, t in PTQ_COLUMNS)},
    UNIQUE ({", ".join(PTQ_UNIQUE)}));
"""

_INT_COLUMNS = {c for c, t in PTQ_COLUMNS if t.startswith("INTEGER")}
_REAL_COLUMNS = {c for c, t in PTQ_COLUMNS if t.startswith("REAL")}


class StoreError(GridError):
    """The results database (or table) cannot be found or read."""


def _jsonable(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _column_value(column: str, value: Any) -> Any:
    """A row's value (CSV text, a number, a numpy scalar) as the column's SQLite type; None for empty."""
    value = _jsonable(value)
    if column in _INT_COLUMNS or column in _REAL_COLUMNS:
        value = parse_value(value)
        if value is None:
            return None
        return int(value) if column in _INT_COLUMNS else float(value)
    return None if value is None or value == "" else str(value)


class ResultsStore:
    """One grid's SQLite database. Safe to open from several processes at once."""

    def __init__(self, path: str | Path, *, read_only: bool = False, timeout_s: float = 120.0):
        self.path = Path(path)
        self.read_only = read_only
        if read_only:
            if not self.path.is_file():
                raise StoreError(f"no results database at {self.path} (has the grid run yet?)")
            self.con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout_s,
                                       isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.con = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None)
        self.con.row_factory = sqlite3.Row
        self.con.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
        if not read_only:
            # WAL lets many local processes write at once; it needs shared memory, so on a network
            # filesystem (several SLURM nodes) set EFFTRAIN_SQLITE_JOURNAL=delete
            mode = os.environ.get("EFFTRAIN_SQLITE_JOURNAL", "wal").upper()
            if mode not in ("WAL", "DELETE", "TRUNCATE", "PERSIST"):
                raise StoreError(f"EFFTRAIN_SQLITE_JOURNAL={mode.lower()}: expected wal, delete, truncate or persist")
            self.con.execute(f"PRAGMA journal_mode = {mode}")
            self.con.execute("PRAGMA synchronous = NORMAL")
            with self.transaction():
                for stmt in SCHEMA.strip().split(";"):
                    if stmt.strip():
                        self.con.execute(stmt)
                self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Bring a store written by an older efftrain up to the current columns (old rows: NULL)."""
        for table, columns in (("runs", RUN_COLUMNS), ("checkpoints", CHECKPOINT_COLUMNS), ("ptq", PTQ_COLUMNS)):
            have = {r[1] for r in self.con.execute(f"PRAGMA table_info({table})")}
            for name, sql_type in columns:
                if name not in have:  # ADD COLUMN cannot carry NOT NULL without a default; none of these do
                    self.con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type.split()[0]}")

    # ---- plumbing ----------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (rolled back on any exception, KeyboardInterrupt included)."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- runs --------------------------------------------------------------------------------
    def register_cell(self, cell, *, ckpt_expected: int, ptq_expected: int) -> None:
        """Insert the cell (status pending) or refresh its description; the status is left alone."""
        fields = {"name": cell.name, "kind": cell.kind, "parent": cell.parent, "schedule": cell.schedule,
                  "axes": json.dumps(cell.values, sort_keys=True, default=str),
                  "config_json": json.dumps(cell.config.to_dict(), sort_keys=True),
                  "ckpt_expected": ckpt_expected, "ptq_expected": ptq_expected,
                  "replicate": cell.replicate or cell.name, "seed": cell.seed, "data_seed": cell.data_seed}
        cols = ", ".join(fields)
        with self.transaction() as con:
            con.execute(f"INSERT INTO runs (key, {cols}) VALUES (?, {', '.join('?' * len(fields))}) "
                        f"ON CONFLICT(key) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in fields)}",
                        (cell.key, *fields.values()))

    def set_status(self, key: str, status: str, *, error: str | None = None) -> None:
        assert status in STATUSES, status
        now = time.time()
        with self.transaction() as con:
            if status == "running":
                con.execute("UPDATE runs SET status = ?, error = NULL, started = ?, finished = NULL, host = ?, "
                            "pid = ? WHERE key = ?", (status, now, socket.gethostname(), os.getpid(), key))
            else:
                con.execute("UPDATE runs SET status = ?, error = ?, finished = ? WHERE key = ?",
                            (status, error, now if status in ("done", "failed") else None, key))

    def set_params(self, key: str, counts: dict[str, int], train_tokens: int | None = None) -> None:
        """Parameter counts (run.json's `params`) and the size of the run's train split in tokens."""
        with self.transaction() as con:
            con.execute("UPDATE runs SET params_total = ?, params_active = ?, params_nonembed = ?, "
                        "params_embedding = ?, train_tokens = COALESCE(?, train_tokens) WHERE key = ?",
                        (counts.get("total"), counts.get("active"), counts.get("non_embedding"),
                         counts.get("embedding"), train_tokens, key))

    def run(self, key: str) -> dict[str, Any] | None:
        row = self.con.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
        return dict(row) if row else None

    def runs(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.con.execute("SELECT * FROM runs ORDER BY rowid")]

    # ---- checkpoints -------------------------------------------------------------------------
    def add_checkpoints(self, key: str, series: Iterable[dict[str, Any]], train_tokens: int | None = None) -> None:
        """Series checkpoint metadata (step, tokens_seen, val_loss, target_tokens, mtp_acceptance);
        idempotent. With `train_tokens` (the run's train split), each checkpoint's epochs = tokens /
        train_tokens."""
        with self.transaction() as con:
            for m in series:
                tokens = int(m.get("tokens_seen", m.get("tokens", 0)))
                epochs = tokens / train_tokens if train_tokens else None
                con.execute("INSERT INTO checkpoints (run_key, step, tokens, val_loss, target_tokens, epochs, "
                            "mtp_acceptance) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_key, step) DO UPDATE SET "
                            "val_loss = COALESCE(excluded.val_loss, val_loss), "
                            "epochs = COALESCE(excluded.epochs, epochs), "
                            "mtp_acceptance = COALESCE(excluded.mtp_acceptance, mtp_acceptance)",
                            (key, int(m["step"]), tokens, m.get("val_loss"), m.get("target_tokens"), epochs,
                             m.get("mtp_acceptance")))

    def checkpoints(self, key: str | None = None) -> list[dict[str, Any]]:
        if key is None:
            cur = self.con.execute("SELECT * FROM checkpoints ORDER BY run_key, step")
        else:
            cur = self.con.execute("SELECT * FROM checkpoints WHERE run_key = ? ORDER BY step", (key,))
        return [dict(r) for r in cur]

    # ---- PTQ rows ----------------------------------------------------------------------------
    def add_ptq_row(self, row: dict[str, Any], cell) -> bool:
        """Record one PTQ sweep row of `cell` (one transaction). True if it was new."""
        known = {c for c, _ in PTQ_COLUMNS} - set(GRID_COLUMNS)
        values = {c: _column_value(c, row.get(c)) for c in known}
        extra = {k: _jsonable(v) for k, v in row.items() if k not in known}
        values.update(variant=cell.name, replicate=cell.replicate or cell.name, run_key=cell.key, schedule=cell.schedule, cell_kind=cell.kind,
                      axes=json.dumps(cell.values, sort_keys=True, default=str),
                      extra=json.dumps(extra, sort_keys=True, default=str) if extra else None,
                      recorded=time.time())
        cols = list(values)
        with self.transaction() as con:
            cur = con.execute(f"INSERT OR IGNORE INTO ptq ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                              [values[c] for c in cols])
            return cur.rowcount == 1

    def ptq_keys(self, key: str | None = None) -> dict[str, set[tuple]]:
        """run_key -> {(step, method, bits, group_size, format)} of the recorded PTQ rows."""
        sql = "SELECT run_key, step, method, bits, group_size, format FROM ptq"
        cur = self.con.execute(sql + " WHERE run_key = ?", (key,)) if key else self.con.execute(sql)
        out: dict[str, set[tuple]] = {}
        for r in cur:
            out.setdefault(r[0], set()).add(tuple(r[1:]))
        return out

    def ptq_count(self, key: str) -> int:
        return self.con.execute("SELECT COUNT(*) FROM ptq WHERE run_key = ?", (key,)).fetchone()[0]

    def ptq_rows(self, key: str | None = None) -> list[dict[str, Any]]:
        if key is None:
            cur = self.con.execute("SELECT * FROM ptq ORDER BY rowid")
        else:
            cur = self.con.execute("SELECT * FROM ptq WHERE run_key = ? ORDER BY rowid", (key,))
        return [dict(r) for r in cur]

    def counts(self) -> dict[str, tuple[int, int]]:
        """key -> (checkpoints recorded, PTQ rows recorded)."""
        ck = dict(self.con.execute("SELECT run_key, COUNT(*) FROM checkpoints GROUP BY run_key").fetchall())
        pq = dict(self.con.execute("SELECT run_key, COUNT(*) FROM ptq GROUP BY run_key").fetchall())
        return {k: (ck.get(k, 0), pq.get(k, 0)) for k in set(ck) | set(pq)}

    # ---- merging the store of another piece of the grid ------------------------------------------
    def merge_from(self, source: str | Path, *, prefer: str | None = None) -> MergeSummary:
        """Merge another results store into this one (one transaction, all or nothing). Rows are matched
        by their natural keys (a run by its key; a checkpoint by run key + step; a PTQ row by run key +
        step, method, bits, group size, format, as in ptq_keys): identical rows are skipped, rows that
        disagree refuse the merge (MergeConflict) unless prefer is "dest" or "source". Each cell keeps
        the further along of its two statuses. The source is only read."""
        return self.merge_many([source], prefer=prefer)[0]

    def merge_many(self, sources: Iterable[str | Path], *, prefer: str | None = None) -> list[MergeSummary]:
        """merge_from for several sources in ONE transaction, so that a command merging N pieces either
        merges them all or (an unreadable source, a conflict) leaves this store unchanged."""
        if prefer not in (None, *PREFERENCES):
            raise StoreError(f"--prefer {prefer}: expected one of {', '.join(PREFERENCES)}")
        loaded = [(Path(s), read_store_rows(s)) for s in sources]  # all read before anything is written
        with self.transaction() as con:
            return [_merge_rows(con, path, rows, prefer) for path, rows in loaded]

    # ---- export ------------------------------------------------------------------------------
    def table(self, name: str) -> tuple[list[str], list[tuple]]:
        if name not in ("ptq", "runs", "checkpoints"):
            raise StoreError(f"unknown table '{name}' (tables: ptq, runs, checkpoints)")
        cur = self.con.execute(f"SELECT * FROM {name} ORDER BY rowid")
        return [c[0] for c in cur.description], [tuple(r) for r in cur.fetchall()]


def export_table(store: ResultsStore, out: str | Path, fmt: str, table: str = "ptq") -> Path:
    """Write a table of the store as CSV or Parquet (atomically); returns the path."""
    if fmt not in ("csv", "parquet"):
        raise StoreError(f"unknown export format '{fmt}' (csv or parquet)")
    columns, rows = store.table(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if fmt == "csv":
            with tmp.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(columns)
                writer.writerows(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in r]
                                 for r in rows)
        else:
            import pyarrow as pa  # lazy: only a Parquet export needs pyarrow
            import pyarrow.parquet as pq

            types = dict(RUN_COLUMNS if table == "runs" else PTQ_COLUMNS if table == "ptq" else [])
            types.update(dict(CHECKPOINT_COLUMNS) if table == "checkpoints" else {})
            arrow = {"INTEGER": pa.int64(), "REAL": pa.float64(), "TEXT": pa.string()}
            fields = [pa.field(c, arrow[types.get(c, "TEXT").split()[0]]) for c in columns]
            data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
            pq.write_table(pa.table(data, schema=pa.schema(fields)), tmp)
    return out


# ----------------------------------------------------------------------------------------------
# Reading results for fits and reports
# ----------------------------------------------------------------------------------------------
def resolve_results(source: str | Path) -> Path:
    """A grid spec (-> its runs_dir/results.sqlite), a runs dir, or a table file itself."""
    p = Path(source)
    if p.suffix in (".yaml", ".yml"):
        return load_spec(p).db_path
    if p.is_dir():
        return p / DB_NAME
    return p


def load_results(source: str | Path) -> list[dict[str, Any]]:
    """PTQ rows from a grid spec, results.sqlite, a CSV or a Parquet file, with n_params set."""
    path = resolve_results(source)
    if not path.exists():
        raise StoreError(f"no results at {path}" + (" (has the grid run yet?)" if path.name == DB_NAME else ""))
    rows = load_rows(path, required=())
    rows = with_n_params(rows)
    missing = [c for c in ("n_params", "tokens", "bits", "qid") if rows and c not in rows[0]]
    if missing:
        raise StoreError(f"{path}: missing column(s) {missing} (need n_params or params_nonembed, tokens, "
                         f"bits, qid); found {sorted(rows[0])}")
    return rows


# ----------------------------------------------------------------------------------------------
# Merging the stores of a split grid
# ----------------------------------------------------------------------------------------------
# A grid run in pieces (`grid run --only ...` on several machines or sessions, or a piece whose
# machine was lost and whose results.sqlite was copied back) leaves several stores. Merging copies
# every run record, checkpoint row and PTQ row of a source into the destination, identified by the
# natural keys the store already deduplicates on, in one transaction per merge.
PREFERENCES = ("dest", "source")
# A cell's life: pending -> running -> done | failed. The merged status is the one further along: a
# `running` left behind by a lost machine gives way to an outcome, and `done` beats everything.
STATUS_PROGRESS = {"pending": 0, "running": 1, "failed": 2, "done": 3}
# What the runner writes with a status (set_status): they travel with the status that wins.
RUN_STATE_COLUMNS = ("status", "error", "started", "finished", "host", "pid")
INCOMPLETE_NOTE = "incomplete:"  # prefix of the runner's note on a done cell that lacks PTQ rows


@dataclass(frozen=True)
class MergeTable:
    """How one table merges: the columns that identify a row, and which values may differ between two
    records of the same result (`timing`: when and how fast it was measured, not what was measured) or
    follow their own rule (`state`: a run's status, merged by STATUS_PROGRESS)."""

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    timing: tuple[str, ...] = ()
    state: tuple[str, ...] = ()

    @property
    def compared(self) -> tuple[str, ...]:
        skip = set(self.key) | set(self.timing) | set(self.state)
        return tuple(c for c in self.columns if c not in skip)

    def describe(self, row: dict[str, Any]) -> str:
        """The row's identity in words, for messages."""
        if self.name == "runs":
            return f"run {row['key']}" + (f" ({row['name']})" if row.get("name") else "")
        if self.name == "checkpoints":
            return f"checkpoint of run {row['run_key']} at step {row['step']}"
        return (f"PTQ row of run {row['run_key']} at step {row['step']} ({row['method']} {row['bits']}-bit, "
                f"group {row['group_size']}, {row['format']})")


MERGE_TABLES = (
    MergeTable("runs", tuple(c for c, _ in RUN_COLUMNS), ("key",), state=RUN_STATE_COLUMNS),
    MergeTable("checkpoints", tuple(c for c, _ in CHECKPOINT_COLUMNS), ("run_key", "step")),
    MergeTable("ptq", tuple(c for c, _ in PTQ_COLUMNS), PTQ_UNIQUE, timing=TIMING_COLUMNS),
)


@dataclass
class TableTally:
    """What merging one source did to one table. `filled`: rows present on both sides whose values
    agree where both have one, and the source supplied values the destination lacked (NULL: an older
    schema, or not recorded yet). `conflicts`: rows whose values disagree."""

    added: int = 0
    duplicates: int = 0
    filled: int = 0
    conflicts: int = 0
    first_conflict: str | None = None

    def __add__(self, other: "TableTally") -> "TableTally":
        return TableTally(self.added + other.added, self.duplicates + other.duplicates, self.filled + other.filled,
                          self.conflicts + other.conflicts, self.first_conflict or other.first_conflict)


@dataclass
class MergeSummary:
    """What merging one source into a store did: a TableTally per table, and how many cells took the
    source's (further along) status."""

    source: Path
    tables: dict[str, TableTally] = field(default_factory=dict)
    statuses_advanced: int = 0

    def total(self, what: str) -> int:
        """added | duplicates | filled | conflicts, summed over the tables."""
        return sum(getattr(t, what) for t in self.tables.values())


class MergeConflict(StoreError):
    """Rows of a source disagree with the destination's and no --prefer says which to keep."""


@dataclass(frozen=True)
class Reconciled:
    """Two records of one row, compared: outcome duplicate | filled | conflict, the destination's
    updates that the merge makes, and the first column whose values disagree (None unless conflict)."""

    outcome: str
    updates: dict[str, Any]
    differing: str | None = None


def reconcile(table: MergeTable, dest: dict[str, Any], source: dict[str, Any], prefer: str | None) -> Reconciled:
    """Compare two records of the same row. NULL means "not known" (an older schema, a value not yet
    recorded), so it never disagrees: the merge fills it from the other side. Values that differ make a
    conflict; with prefer="source" the source's record wins (its timing too: it is one measurement),
    otherwise the destination's stays."""
    differing = [c for c in table.compared
                 if dest[c] is not None and source[c] is not None and dest[c] != source[c]]
    source_wins = bool(differing) and prefer == "source"
    updates = {c: source[c] for c in table.columns
               if c not in table.key and c not in table.state and source[c] is not None
               and (dest[c] is None or (source_wins and dest[c] != source[c]))}
    if differing:
        return Reconciled("conflict", updates, differing[0])
    return Reconciled("filled" if updates else "duplicate", updates)


def advanced_run_state(dest: dict[str, Any], source: dict[str, Any]) -> dict[str, Any] | None:
    """The source's state columns if its status is further along than the destination's, else None
    (an equal status keeps the destination's record)."""
    def progress(run):
        return STATUS_PROGRESS.get(run["status"], -1)

    if progress(source) > progress(dest):
        return {c: source[c] for c in RUN_STATE_COLUMNS}
    return None


def _conflict_text(table: MergeTable, dest: dict[str, Any], source: dict[str, Any], column: str) -> str:
    def short(v):
        text = repr(v)
        return text if len(text) <= 40 else text[:37] + "..."

    return f"{table.describe(source)}: {column} {short(dest[column])} here, {short(source[column])} in the source"


@contextmanager
def open_results_store(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a results store whose schema merge_from can copy. The store is never
    changed (no columns are added to an older one: a piece may be a read-only copy, and an aborted merge
    must leave its sources as they were). StoreError if the path is missing, not SQLite, corrupt, not a
    results store, or has columns this efftrain does not know."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"no results database at {path}")
    try:
        with ResultsStore(path, read_only=True) as store:
            _check_results_schema(store.con, path)
            yield store.con
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        raise StoreError(f"{path}: cannot be read as a results store ({e})") from None


def read_store_rows(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every row of a results store, table -> rows (in insertion order), each with the current schema's
    columns: a column that an older schema lacks reads NULL, as it does once a store opened for writing
    has gained it (_add_missing_columns)."""
    with open_results_store(path) as con:
        return {t.name: [_conform(t, dict(r)) for r in con.execute(f"SELECT * FROM {t.name} ORDER BY rowid")]
                for t in MERGE_TABLES}


def _check_results_schema(con: sqlite3.Connection, path: Path) -> None:
    """StoreError unless the database holds the three tables of a results store, with no column that
    this efftrain would not copy (a newer store's: merging it here would drop its values)."""
    have = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    missing = [t.name for t in MERGE_TABLES if t.name not in have]
    if missing:
        raise StoreError(f"{path} is not a results store (no table {', '.join(missing)}; a grid's is "
                         f"RUNS_DIR/{DB_NAME})")
    for t in MERGE_TABLES:
        unknown = sorted({r[1] for r in con.execute(f"PRAGMA table_info({t.name})")} - set(t.columns))
        if unknown:
            raise StoreError(f"{path}: table {t.name} has column(s) {unknown} that this efftrain does not know "
                             f"(written by a newer version?); merge with that version")


def _conform(table: MergeTable, row: dict[str, Any]) -> dict[str, Any]:
    return {c: row.get(c) for c in table.columns}


def _key_of(table: MergeTable, row: dict[str, Any]) -> tuple:
    return tuple(row[c] for c in table.key)


def _merge_table(con: sqlite3.Connection, table: MergeTable, rows: list[dict[str, Any]],
                 prefer: str | None) -> TableTally:
    """Insert the source's new rows, fill or (prefer=source) overwrite rows both have; count each."""
    existing = {_key_of(table, r): _conform(table, dict(r)) for r in con.execute(f"SELECT * FROM {table.name}")}
    tally = TableTally()
    where = " AND ".join(f"{c} = ?" for c in table.key)
    for row in rows:
        key = _key_of(table, row)
        dest = existing.get(key)
        if dest is None:
            con.execute(f"INSERT INTO {table.name} ({', '.join(table.columns)}) "
                        f"VALUES ({', '.join('?' * len(table.columns))})", [row[c] for c in table.columns])
            existing[key] = row
            tally.added += 1
            continue
        result = reconcile(table, dest, row, prefer)
        if result.outcome == "conflict":
            tally.conflicts += 1
            tally.first_conflict = tally.first_conflict or _conflict_text(table, dest, row, result.differing)
        elif result.outcome == "filled":
            tally.filled += 1
        else:
            tally.duplicates += 1
        if result.updates and (result.outcome != "conflict" or prefer is not None):
            con.execute(f"UPDATE {table.name} SET {', '.join(f'{c} = ?' for c in result.updates)} WHERE {where}",
                        [*result.updates.values(), *key])
            existing[key] = {**dest, **result.updates}
    return tally


def _merge_run_states(con: sqlite3.Connection, runs: list[dict[str, Any]]) -> int:
    """Give every cell the further-along of its two statuses (with that status's error, times, host);
    returns how many took the source's. Run records new to the destination came with their state."""
    advanced = 0
    for source in runs:
        dest = con.execute(f"SELECT {', '.join(RUN_STATE_COLUMNS)} FROM runs WHERE key = ?",
                           (source["key"],)).fetchone()
        state = advanced_run_state(dict(dest), source)
        if state is not None:
            con.execute(f"UPDATE runs SET {', '.join(f'{c} = ?' for c in state)} WHERE key = ?",
                        (*state.values(), source["key"]))
            advanced += 1
    return advanced


def _refresh_incomplete_notes(con: sqlite3.Connection, keys: Iterable[str]) -> None:
    """A done cell's "incomplete: N of M PTQ rows" note counts the rows its own piece had; after a merge
    it counts the rows now present (and is cleared once all M are), so that the note, `grid status` and
    the rows agree."""
    for key in keys:
        run = con.execute("SELECT status, error, ptq_expected FROM runs WHERE key = ?", (key,)).fetchone()
        if not run or run["status"] != "done" or not (run["error"] or "").startswith(INCOMPLETE_NOTE) \
                or run["ptq_expected"] is None:
            continue
        have = con.execute("SELECT COUNT(*) FROM ptq WHERE run_key = ?", (key,)).fetchone()[0]
        note = None if have >= run["ptq_expected"] else f"incomplete: {have} of {run['ptq_expected']} PTQ rows"
        con.execute("UPDATE runs SET error = ? WHERE key = ?", (note, key))


def _merge_rows(con: sqlite3.Connection, source: Path, rows: dict[str, list[dict[str, Any]]],
                prefer: str | None) -> MergeSummary:
    """One source's rows into the open transaction; MergeConflict (before anything is committed) if
    rows disagree and no preference was given."""
    summary = MergeSummary(source=source)
    for table in MERGE_TABLES:
        summary.tables[table.name] = _merge_table(con, table, rows[table.name], prefer)
    conflicts = summary.total("conflicts")
    if conflicts and prefer is None:
        first = next(t.first_conflict for t in summary.tables.values() if t.first_conflict)
        raise MergeConflict(f"merge of {source} refused, nothing changed: {conflicts} row(s) differ from the "
                            f"destination's; first: {first}. Keep one side with --prefer dest or --prefer source")
    summary.statuses_advanced = _merge_run_states(con, rows["runs"])
    _refresh_incomplete_notes(con, [r["key"] for r in rows["runs"]])
    return summary


def resolve_store_path(target: str | Path) -> Path:
    """A results.sqlite path from a grid spec, a runs dir or the database file. A path that does not
    exist yet names a database if it ends in .sqlite / .sqlite3 / .db, else a runs dir to create."""
    p = Path(target)
    if not p.exists() and p.suffix not in (".yaml", ".yml", ".sqlite", ".sqlite3", ".db"):
        return p / DB_NAME
    return resolve_results(p)


def merge_stores(dest: str | Path, sources: Iterable[str | Path], *, prefer: str | None = None
                 ) -> tuple[Path, list[MergeSummary]]:
    """`efftrain grid merge`: merge the source stores into dest (created if missing) in one transaction.
    On any failure dest is as before: an existing one unchanged, a new one (and the folder made for
    it) removed. Returns dest's database path and one MergeSummary per source."""
    path = resolve_store_path(dest)
    source_paths = [resolve_results(s) for s in sources]
    created = not path.exists()
    new_dirs = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    if not created:
        with open_results_store(path):  # a database that is not a results store must not gain our tables
            pass
    try:
        with ResultsStore(path) as store:
            summaries = store.merge_many(source_paths, prefer=prefer)
    except BaseException as e:
        if created:
            _remove_new_store(path, new_dirs)
        if isinstance(e, sqlite3.DatabaseError):
            raise StoreError(f"{path}: cannot be merged into ({e})") from None
        raise
    return path, summaries


def _remove_new_store(path: Path, new_dirs: list[Path]) -> None:
    for leftover in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        leftover.unlink(missing_ok=True)
    for d in new_dirs:  # innermost first
        try:
            d.rmdir()
        except OSError:
            break
