"""The `fit` and `report` commands: what the analysis makes of a grid's (or any) table of QiD rows.

  efftrain fit TABLE [--law ouyang|kumar|both] [--group-by method,variant] [--filter 'method=gptq']
                     [--n-boot N] [--json] [--predict N,D,P] [--threshold Q --at N,P] [--fix gamma=5.5]
  efftrain report SPEC_OR_DB --out DIR [--method gptq] [--bits 3] [--baseline VARIANT]

TABLE is a grid spec (its results.sqlite), a results.sqlite, or a CSV/Parquet table with columns
n_params (or params_quantized / params_nonembed), tokens, bits, qid (qid_se and run_id when present).
Errors are GridError (a ConfigError): the CLI prints them as one `error:` line and exits 2.
"""

from __future__ import annotations

import json
import math
import operator
import re
import sys
import warnings
from typing import Any

from efftrain.analysis.fits import fit_table, format_table, table_to_dict, tokens_to_reach, tokens_to_reach_ci
from efftrain.grid.commands import parse_assignments, text_table
from efftrain.grid.spec import GridError
from efftrain.grid.store import load_results


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
    rows = apply_filters(load_results(args.table), args.filter)
    group_by = tuple(g for g in (args.group_by or "").split(",") if g)
    missing = [g for g in group_by if g not in rows[0]]
    if missing:
        raise GridError(f"--group-by: no column(s) {missing} (columns: {', '.join(sorted(rows[0]))})")
    laws = ["ouyang", "kumar"] if args.law == "both" else [args.law]
    fixed = {k: float(v) for k, v in parse_assignments(args.fix, "--fix").items()} or None
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
        print(text_table([[r["law"], r["group"], f"{r['n_params']:.4g}", f"{r['tokens']:.4g}", f"{r['bits']:g}",
                            f"{r['qid']:.4g}"] for r in predictions],
                          ["law", "group", "N", "D", "P", "predicted QiD"], right={2, 3, 4, 5}))
    if thresholds:
        def t(x):
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"

        print(text_table([[r["law"], r["group"], t(r["tokens"]), f"[{t(r.get('tokens_lo'))}, {t(r.get('tokens_hi'))}]",
                            r.get("note", "")] for r in thresholds],
                          ["law", "group", f"tokens to QiD {args.threshold:g} at N={args.at}", "95% CI", "note"]))
    return 0


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def cmd_report(args) -> int:
    from efftrain.analysis.report import build_report  # imports matplotlib: only this command needs it

    path = build_report(args.source, args.out, method=args.method, bits=args.bits, baseline=args.baseline,
                        n_boot=args.n_boot, log=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0


# ----------------------------------------------------------------------------------------------
# parsers
# ----------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add `fit` and `report` to an argparse subparsers object."""
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
