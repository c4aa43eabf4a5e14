"""The `grid` commands; `register(subparsers)` adds them to the efftrain CLI.

  efftrain grid run SPEC [--workers N] [--retry-failed] [--only KEY ...] [--slurm partition=..,time=..]
  efftrain grid status SPEC [--json]
  efftrain grid export SPEC --format csv|parquet [--out PATH] [--table ptq|runs|checkpoints]

Errors are GridError (a ConfigError): the CLI prints them as one `error:` line and exits 2. The
`fit` and `report` commands, which read what a grid wrote, live in efftrain.analysis.commands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from efftrain.grid.spec import GridError

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def text_table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def fmt(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def parse_assignments(items: list[str], what: str) -> dict[str, Any]:
    from efftrain.config import yaml_load

    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise GridError(f"{what} '{item}' is not of the form key=value")
        try:
            out[key.strip()] = yaml_load(text) if text.strip() else ""
        except Exception:  # yaml.YAMLError: keep the text
            out[key.strip()] = text
    return out


# ----------------------------------------------------------------------------------------------
# grid run / status / export
# ----------------------------------------------------------------------------------------------
def cmd_grid_run(args) -> int:
    from efftrain.grid.runner import run_grid

    only = [k for item in args.only or [] for k in item.split(",") if k]
    results = run_grid(args.spec, workers=args.workers, retry_failed=args.retry_failed, only=only or None,
                       set_overrides=parse_assignments(args.set, "--set") or None, runs_dir=args.runs_dir,
                       slurm=args.slurm)
    failed = [k for k, s in results.items() if s == "failed"]
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)} (see `efftrain grid status "
              f"{args.spec}`; rerun with --retry-failed)", file=sys.stderr)
        return 1
    return 0


def cmd_grid_status(args) -> int:
    from efftrain.grid.runner import grid_status
    from efftrain.grid.spec import load_spec

    spec = load_spec(args.spec, set_overrides=parse_assignments(args.set, "--set") or None,
                     runs_dir=args.runs_dir)
    rows = grid_status(spec)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [[r["key"], r["name"], f"{r['seed']}/{r['data_seed']}", r["kind"], r["status"],
              f"{r['checkpoints']}/{r['checkpoints_expected']}", f"{r['ptq_rows']}/{r['ptq_expected']}",
              (r["error"] or "")[:60]] for r in rows]
    print(f"grid {spec.name} ({spec.path}): results in {spec.db_path}")
    print(text_table(table, ["key", "name", "seed", "kind", "status", "checkpoints", "ptq rows", "error"],
                     right={5, 6}))
    by = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "pending", "failed")}
    rows_done, rows_expected = sum(r["ptq_rows"] for r in rows), sum(r["ptq_expected"] for r in rows)
    print(f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in by.items() if n) +
          f"; PTQ rows {rows_done}/{rows_expected}")
    return 0


def cmd_grid_export(args) -> int:
    from efftrain.grid.spec import load_spec
    from efftrain.grid.store import ResultsStore, export_table

    spec = load_spec(args.spec, set_overrides=parse_assignments(args.set, "--set") or None,
                     runs_dir=args.runs_dir)
    out = Path(args.out) if args.out else spec.runs_dir / f"{args.table}.{args.format}"
    with ResultsStore(spec.db_path, read_only=True) as store:
        path = export_table(store, out, args.format, args.table)
        n = len(store.table(args.table)[1])
    print(f"{n} {args.table} rows -> {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# parsers
# ----------------------------------------------------------------------------------------------
def _spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", help="override the spec's runs_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted override for every cell (changes the cells' keys), repeatable")


def register(subparsers) -> None:
    """Add `grid` (run/status/export) to an argparse subparsers object."""
    grid = subparsers.add_parser("grid", help="run an experiment grid (train, PTQ-sweep, record)",
                                 description="Experiment grids: a YAML spec expands into cells keyed by config "
                                             "hash; results go to RUNS_DIR/results.sqlite.")
    gsub = grid.add_subparsers(dest="grid_command", required=True, metavar="{run,status,export}")

    p = gsub.add_parser("run", help="train and PTQ-sweep every cell; rerun to resume")
    p.add_argument("spec", help="grid spec YAML (see experiments/)")
    p.add_argument("--workers", type=int, default=1, help="cell families run in N processes (one GPU each)")
    p.add_argument("--retry-failed", action="store_true", help="also rerun cells that failed before")
    p.add_argument("--only", action="append", metavar="KEY",
                   help="only these cell keys (repeatable, or a,b); they run in the spec's order")
    p.add_argument("--slurm", metavar="OPTS", help="submit one job per unfinished family through submitit, "
                                                   "e.g. partition=gpu,time=2:00:00,gpus=1")
    _spec_options(p)
    p.set_defaults(func=cmd_grid_run)

    p = gsub.add_parser("status", help="cells, their status and progress")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true")
    _spec_options(p)
    p.set_defaults(func=cmd_grid_status)

    p = gsub.add_parser("export", help="write a results table as CSV or Parquet")
    p.add_argument("spec")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--out", help="output file (default RUNS_DIR/<table>.<format>)")
    p.add_argument("--table", choices=("ptq", "runs", "checkpoints"), default="ptq")
    _spec_options(p)
    p.set_defaults(func=cmd_grid_export)
