"""Reading result tables: the one reader that `grid`, `analysis` and the CLI share.

A result table is a CSV file (a run's ptq.csv, an export), a SQLite database (a grid's
results.sqlite) or a Parquet file. Rows come back as dicts; numeric columns are numbers, key and
name columns stay text.

The N of the QiD laws
---------------------
``with_n_params`` sets each row's ``n_params``, the N the scaling fits use, following Ouyang et al.'s
Pythia convention: the parameters post-training quantization actually quantizes (``params_quantized``:
every Linear of the blocks and each routed expert; not the embedding, not an untied output head kept
in 16 bits, not MTP modules). Rows written before that column existed fall back to
``params_nonembed`` (which counts an untied head). ``n_params_source`` names the column used, so a fit
can say which N it saw.
"""

from __future__ import annotations

import csv
import re
import sqlite3
from pathlib import Path
from typing import Any, Sequence

__all__ = ["TEXT_COLUMNS", "load_rows", "with_n_params", "N_PARAM_COLUMNS", "parse_value"]

# preferred first: what PTQ quantizes, then the older non-embedding count
N_PARAM_COLUMNS = ("params_quantized", "params_nonembed")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_value(v: Any) -> Any:
    """A table cell's text as what it holds: None for an empty cell, an int for an integer ('12', '-3'),
    a float for any other number ('0.5', '1e6', 'nan'), else the text without surrounding spaces.
    Anything but a str is returned as it is."""
    if isinstance(v, str):
        s = v.strip()
        if s == "":
            return None
        try:
            f = float(s)
        except ValueError:
            return s
        if re.fullmatch(r"[+-]?\d+", s):
            return int(s)
        return f
    return v


# Columns of efftrain's tables that hold names and keys: never numbers, even when a hex key such as
# "867e70887370" happens to parse as one (as a float it is inf).
TEXT_COLUMNS = frozenset({"run_id", "run_key", "key", "name", "parent", "method", "format", "variant", "axes",
                          "schedule", "cell_kind", "kind", "extra", "host", "status", "error", "replicate",
                          "n_params_source", "method_label"})


def _coerce_csv(rows: list[dict[str, str]], cols: list[str]) -> list[dict[str, Any]]:
    """Numbers for the columns whose every non-empty value is one (ints stay ints), text otherwise and
    for TEXT_COLUMNS; empty cells become None."""
    numeric = {c for c in cols if c not in TEXT_COLUMNS
               and not any(isinstance(parse_value(r.get(c)), str) for r in rows)}
    return [{k: (parse_value(v) if k in numeric else (v if v not in ("", None) else None)) for k, v in r.items()}
            for r in rows]


def load_rows(
    path: str | Path,
    *,
    table: str = "ptq",
    query: str | None = None,
    required: Sequence[str] = ("n_params", "tokens", "bits", "qid"),
) -> list[dict[str, Any]]:
    """Read rows from a CSV file, a SQLite database or a Parquet file.

    CSV: header row with at least ``required`` columns; a column whose values all look numeric is
    converted (ints stay ints) unless it is one of TEXT_COLUMNS (keys, names), empty cells become
    None, extra columns are kept.
    SQLite (.sqlite/.sqlite3/.db, or any file with the SQLite header): ``SELECT *``
    from ``table`` (default "ptq"), or the given ``query``. Parquet: via pyarrow.
    Raises ValueError listing any missing required columns.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    with open(path, "rb") as fh:
        head = fh.read(16)
    suffix = path.suffix.lower()
    if head.startswith(b"SQLite format 3") or suffix in (".sqlite", ".sqlite3", ".db"):
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if query is None:
                if not _IDENT.match(table):
                    raise ValueError(f"invalid table name {table!r}")
                names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type IN ('table','view')")]
                if table not in names:
                    raise ValueError(f"{path}: no table {table!r} (tables: {names})")
                query = f'SELECT * FROM "{table}"'
            cur = con.execute(query)
            cols = [c[0] for c in cur.description]
            rows = [dict(zip(cols, r)) for r in cur.fetchall()]
        finally:
            con.close()
    elif suffix == ".parquet" or head.startswith(b"PAR1"):
        import pyarrow.parquet as pq  # optional reader: only Parquet input needs pyarrow

        t = pq.read_table(path)
        cols = list(t.column_names)
        rows = t.to_pylist()
    else:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            cols = list(reader.fieldnames or [])
            rows = _coerce_csv(list(reader), cols)
    if "n_params" in required and "n_params" not in cols and any(c in cols for c in N_PARAM_COLUMNS):
        rows = with_n_params(rows)
        cols = cols + ["n_params", "n_params_source"]
    missing = [c for c in required if c not in cols]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; found columns {cols}")
    return rows


def with_n_params(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with ``n_params`` (the N of the QiD laws) and ``n_params_source`` (the column it came from):
    ``params_quantized`` where recorded, else ``params_nonembed``. A row that already has n_params keeps it."""
    out = []
    for r in rows:
        if r.get("n_params") is None:
            for col in N_PARAM_COLUMNS:
                if r.get(col) is not None:
                    r = {**r, "n_params": r[col], "n_params_source": col}
                    break
        elif r.get("n_params_source") is None:
            r = {**r, "n_params_source": "n_params"}
        out.append(r)
    return out
