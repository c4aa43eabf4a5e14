"""The `grid`, `fit` and `report` commands; `register(subparsers)` adds them to the efftrain CLI.

  efftrain grid run SPEC [--workers N] [--retry-failed] [--only KEY ...] [--slurm partition=..,time=..]
  efftrain grid status SPEC [--json]
  efftrain grid export SPEC --format csv|parquet [--out PATH] [--table ptq|runs|checkpoints]
  efftrain fit TABLE [--law ouyang|kumar|both] [--group-by method,variant] [--filter 'method=gptq']
                     [--n-boot N] [--json] [--predict N,D,P] [--threshold Q --at N,P] [--fix gamma=5.5]
  efftrain report SPEC_OR_DB --out DIR [--method gptq] [--bits 3] [--baseline VARIANT]

TABLE is a grid spec (its results.sqlite), a results.sqlite, or a CSV/Parquet table with columns
n_params (or params_nonembed), tokens, bits, qid. Errors are GridError (a ConfigError): the CLI
prints them as one `error:` line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from efftrain.grid.spec import GridError

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _text_table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def fmt(r):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _parse_assignments(items: list[str], what: str) -> dict[str, Any]:
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


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise GridError(f"'{text}' is not a number") from None


def _numbers(text: str, n: int, what: str) -> list[float]:
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != n:
        raise GridError(f"{what} expects {n} comma-separated numbers, got '{text}'")
    return [_number(p) for p in parts]


# ----------------------------------------------------------------------------------------------
# grid run / status / export
# ----------------------------------------------------------------------------------------------
def cmd_grid_run(args) -> int:
    from efftrain.grid.runner import run_grid

    only = [k for item in args.only or [] for k in item.split(",") if k]
    results = run_grid(args.spec, workers=args.workers, retry_failed=args.retry_failed, only=only or None,
                       set_overrides=_parse_assignments(args.set, "--set") or None, runs_dir=args.runs_dir,
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

    spec = load_spec(args.spec, set_overrides=_parse_assignments(args.set, "--set") or None,
                     runs_dir=args.runs_dir)
    rows = grid_status(spec)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [[r["key"], r["name"], r["kind"], r["status"], f"{r['checkpoints']}/{r['checkpoints_expected']}",
              f"{r['ptq_rows']}/{r['ptq_expected']}", (r["error"] or "")[:60]] for r in rows]
    print(f"grid {spec.name} ({spec.path}): results in {spec.db_path}")
    print(_text_table(table, ["key", "name", "kind", "status", "checkpoints", "ptq rows", "error"], right={4, 5}))
    by = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "pending", "failed")}
    rows_done, rows_expected = sum(r["ptq_rows"] for r in rows), sum(r["ptq_expected"] for r in rows)
    print(f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in by.items() if n) +
          f"; PTQ rows {rows_done}/{rows_expected}")
    return 0


def cmd_grid_export(args) -> int:
    from efftrain.grid.spec import load_spec
    from efftrain.grid.store import ResultsStore, export_table

    spec = load_spec(args.spec, set_overrides=_parse_assignments(args.set, "--set") or None,
                     runs_dir=args.runs_dir)
    out = Path(args.out) if args.out else spec.runs_dir / f"{args.table}.{args.format}"
    with ResultsStore(spec.db_path, read_only=True) as store:
        path = export_table(store, out, args.format, args.table)
        n = len(store.table(args.table)[1])
    print(f"{n} {args.table} rows -> {path}")
    return 0


# ----------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------
_OPS = {"<=": operator.le, ">=": operator.ge, "!=": operator.ne, "=": operator.eq, "<": operator.lt,
        ">": operator.gt}
_FILTER = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|!=|==|=|<|>)\s*(.*?)\s*$")


def _coerce(v: Any) -> Any:
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if f.is_integer() and re.fullmatch(r"[+-]?\d+", v.strip()) else f
    return v


def parse_filter(text: str):
    """'method=gptq', 'method=gptq,awq' (any of), 'bits<=4', 'schedule!=wsd-cooldown' -> predicate."""
    m = _FILTER.match(text)
    if not m:
        raise GridError(f"--filter '{text}' is not COLUMN=VALUE (operators: = != < <= > >=; "
                        "'=' and '!=' take comma-separated alternatives)")
    col, op, value = m.group(1), m.group(2).replace("==", "="), m.group(3)
    if op in ("=", "!="):
        wanted = {str(_coerce(v)) for v in value.split(",")}
        return col, (lambda x: (str(_coerce(x)) in wanted) == (op == "="))
    target = _number(value)
    return col, (lambda x: x is not None and _OPS[op](float(x), target))


def apply_filters(rows: list[dict], filters: list[str]) -> list[dict]:
    for text in filters or []:
        col, pred = parse_filter(text)
        if rows and col not in rows[0]:
            raise GridError(f"--filter '{text}': no column '{col}' (columns: {', '.join(sorted(rows[0]))})")
        rows = [r for r in rows if pred(r.get(col))]
    if not rows:
        raise GridError("no rows left after --filter " + " ".join(filters))
    return rows


def fit_rows(rows: list[dict], law: str, group_by: tuple[str, ...], *, n_boot: int, seed: int = 0,
             fixed: dict[str, float] | None = None) -> tuple[dict, list[str]]:
    """fit_table with failing groups skipped; returns (results, notes)."""
    from efftrain.analysis.fits import fit_table

    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            results = fit_table(rows, law, group_by, on_error="skip", n_boot=n_boot, seed=seed, fixed=fixed)
        except (ValueError, ArithmeticError) as e:  # OverflowError: exp() of a wild bootstrap replicate
            raise GridError(f"{law} fit: {e}") from None
    notes += [str(w.message) for w in caught]
    return results, notes


def cmd_fit(args) -> int:
    from efftrain.analysis.fits import format_table, table_to_dict, tokens_to_reach, tokens_to_reach_ci
    from efftrain.grid.store import load_results

    rows = apply_filters(load_results(args.table), args.filter)
    group_by = tuple(g for g in (args.group_by or "").split(",") if g)
    missing = [g for g in group_by if g not in rows[0]]
    if missing:
        raise GridError(f"--group-by: no column(s) {missing} (columns: {', '.join(sorted(rows[0]))})")
    laws = ["ouyang", "kumar"] if args.law == "both" else [args.law]
    fixed = {k: float(v) for k, v in _parse_assignments(args.fix, "--fix").items()} or None
    tables, notes = {}, []
    for law in laws:
        tables[law], n = fit_rows(rows, law, group_by, n_boot=args.n_boot, seed=args.seed, fixed=fixed)
        notes += [f"{law}: {x}" for x in n]

    predictions, thresholds = [], []
    for text in args.predict or []:
        n, d, p = _numbers(text, 3, "--predict")
        for law, res in tables.items():
            for key, fr in res.items():
                predictions.append({"law": law, "group": fr.label, "n_params": n, "tokens": d, "bits": p,
                                    "qid": fr.predict(n, d, p)})
    if args.threshold is not None:
        if not args.at:
            raise GridError("--threshold needs --at N,P (non-embedding params, bits)")
        n, p = _numbers(args.at, 2, "--at")
        for law, res in tables.items():
            for key, fr in res.items():
                row = {"law": law, "group": fr.label, "qid": args.threshold, "n_params": n, "bits": p}
                try:
                    est, lo, hi = (tokens_to_reach_ci(fr, args.threshold, n, p) if fr.n_boot
                                   else (tokens_to_reach(fr, args.threshold, n, p), math.nan, math.nan))
                    row.update(tokens=est, tokens_lo=lo, tokens_hi=hi)
                except ValueError as e:
                    row.update(tokens=None, note=str(e))
                thresholds.append(row)

    if args.json:
        fits = {law: table_to_dict(res) for law, res in tables.items()}
        out: Any = fits[laws[0]] if len(laws) == 1 else fits
        if predictions or thresholds or notes:
            out = {"fits": out, "predictions": predictions, "thresholds": thresholds, "notes": notes}
        print(json.dumps(out, indent=2, default=lambda x: None))
        return 0
    print(f"{len(rows)} rows from {args.table}" + (f" (filter: {' and '.join(args.filter)})" if args.filter else ""))
    for law in laws:
        print(format_table(tables[law]))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if predictions:
        print(_text_table([[r["law"], r["group"], f"{r['n_params']:.4g}", f"{r['tokens']:.4g}", f"{r['bits']:g}",
                            f"{r['qid']:.4g}"] for r in predictions],
                          ["law", "group", "N", "D", "P", "predicted QiD"], right={2, 3, 4, 5}))
    if thresholds:
        def t(x):
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"

        print(_text_table([[r["law"], r["group"], t(r["tokens"]), f"[{t(r.get('tokens_lo'))}, {t(r.get('tokens_hi'))}]",
                            r.get("note", "")] for r in thresholds],
                          ["law", "group", f"tokens to QiD {args.threshold:g} at N={args.at}", "95% CI", "note"]))
    return 0


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def cmd_report(args) -> int:
    from efftrain.analysis.report import build_report

    path = build_report(args.source, args.out, method=args.method, bits=args.bits, baseline=args.baseline,
                        n_boot=args.n_boot, log=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0


# ----------------------------------------------------------------------------------------------
# parsers
# ----------------------------------------------------------------------------------------------
def _spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", help="override the spec's runs_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted override for every cell (changes the cells' keys), repeatable")


def register(subparsers) -> None:
    """Add `grid` (run/status/export), `fit` and `report` to an argparse subparsers object."""
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

    p = subparsers.add_parser("fit", help="fit QiD scaling laws (Ouyang, Kumar) with bootstrap CIs",
                              description="Fit QiD = f(N, D, P) to PTQ rows. TABLE: grid spec, results.sqlite, "
                                          "CSV or Parquet (n_params or params_nonembed, tokens, bits, qid).")
    p.add_argument("table", help="grid spec, results.sqlite, CSV or Parquet table of PTQ rows")
    p.add_argument("--law", choices=("ouyang", "kumar", "both"), default="ouyang")
    p.add_argument("--group-by", default="", metavar="COLS", help="comma-separated columns, e.g. method,variant")
    p.add_argument("--filter", action="append", default=[], metavar="EXPR",
                   help="keep rows matching, e.g. method=gptq, bits<=4, schedule!=wsd-cooldown (repeatable)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (0 = none; "
                                                            "default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fix", action="append", default=[], metavar="PARAM=VALUE",
                   help="hold a parameter fixed, e.g. gamma=5.4967 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the fits as JSON")
    p.add_argument("--predict", action="append", metavar="N,D,P", help="predicted QiD per group (repeatable)")
    p.add_argument("--threshold", type=float, metavar="Q", help="tokens at which QiD reaches Q (needs --at)")
    p.add_argument("--at", metavar="N,P", help="non-embedding params and bits for --threshold")
    p.set_defaults(func=cmd_fit)

    p = subparsers.add_parser("report", help="HTML + Markdown report of a grid's results",
                              description="Writes DIR/report.html (self-contained) and DIR/report.md (+ PNGs).")
    p.add_argument("source", help="grid spec or results.sqlite")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", help="PTQ method of the technique comparison (default gptq if present)")
    p.add_argument("--bits", type=int, help="bit width of the technique comparison (default 3 if present)")
    p.add_argument("--baseline", help="variant (cell name) the others are compared with (default: the first "
                                      "cell with every technique off)")
    p.add_argument("--n-boot", type=int, default=300, help="bootstrap resamples")
    p.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m efftrain.grid.commands ...`) until the efftrain CLI wires register()."""
    from efftrain.config import ConfigError

    parser = argparse.ArgumentParser(prog="efftrain")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
