"""The work of the `fit` command, as plain functions of typed arguments (efftrain.cli parses the
command line and prints what these return; the `report` command is analysis.report.build_report).

  run_fit(table, law=..., group_by=..., filters=..., n_boot=..., fixed=..., predict=..., threshold=..., at=...)
      -> FitOutput: the fitted laws per group, the predicted QiD at given (N, D, P), the tokens at
         which QiD reaches a threshold at given (N, P); as JSON (`to_json`) or text tables

TABLE is a grid spec (its results.sqlite), a results.sqlite, or a CSV/Parquet table with columns
n_params (or params_quantized / params_nonembed), tokens, bits, qid (qid_se and run_id when present).
A filter is COLUMN OP VALUE (`parse_filter`). Errors are GridError (a ConfigError): the CLI prints
them as one `error:` line and exits 2.
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from efftrain.analysis.compare import SCHEME_MARKERS, is_weight_only
from efftrain.analysis.fits import (FitResult, fit_table, format_table, table_to_dict, tokens_to_reach,
                                    tokens_to_reach_ci)
from efftrain.formatting import text_table
from efftrain.grid.spec import GridError
from efftrain.grid.store import load_results
from efftrain.tables import parse_value

_OPS = {"<=": operator.le, ">=": operator.ge, "!=": operator.ne, "=": operator.eq, "<": operator.lt,
        ">": operator.gt}
_FILTER = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|!=|==|=|<|>)\s*(.*?)\s*$")


def parse_filter(text: str):
    """'method=gptq', 'method=gptq,awq' (any of), 'bits<=4', 'schedule!=wsd-cooldown' -> (column, predicate)."""
    m = _FILTER.match(text)
    if not m:
        raise GridError(f"--filter '{text}' is not COLUMN=VALUE (operators: = != < <= > >=; "
                        "'=' and '!=' take comma-separated alternatives)")
    col, op, value = m.group(1), m.group(2).replace("==", "="), m.group(3)
    if op in ("=", "!="):
        wanted = {str(parse_value(v)) for v in value.split(",")}
        return col, (lambda x: (str(parse_value(x)) in wanted) == (op == "="))
    try:
        target = float(value)
    except ValueError:
        raise GridError(f"'{value}' is not a number") from None
    return col, (lambda x: x is not None and _OPS[op](float(x), target))


def apply_filters(rows: list[dict], filters: Sequence[str]) -> list[dict]:
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


@dataclass
class FitOutput:
    """What `run_fit` found: per law, {group: FitResult}; predictions and thresholds as rows."""

    source: str
    filters: list[str]
    n_rows: int
    tables: dict[str, dict[Any, FitResult]]
    notes: list[str] = field(default_factory=list)  # groups skipped, fit warnings: "law: message"
    predictions: list[dict] = field(default_factory=list)
    thresholds: list[dict] = field(default_factory=list)
    threshold: float | None = None

    def to_json(self) -> Any:
        """The fits (the one law's, or {law: ...}), with predictions, thresholds and notes when any."""
        fits = {law: table_to_dict(res) for law, res in self.tables.items()}
        out: Any = next(iter(fits.values())) if len(fits) == 1 else fits
        if self.predictions or self.thresholds or self.notes:
            out = {"fits": out, "predictions": self.predictions, "thresholds": self.thresholds, "notes": self.notes}
        return out

    def fits_text(self) -> str:
        head = f"{self.n_rows} rows from {self.source}" + (
            f" (filter: {' and '.join(self.filters)})" if self.filters else "")
        return "\n".join([head] + [format_table(res) for res in self.tables.values()])

    def predictions_text(self) -> str:
        return text_table([[r["law"], r["group"], f"{r['n_params']:.4g}", f"{r['tokens']:.4g}", f"{r['bits']:g}",
                            f"{r['qid']:.4g}"] for r in self.predictions],
                          ["law", "group", "N", "D", "P", "predicted QiD"], right={2, 3, 4, 5})

    def thresholds_text(self, at_label: str) -> str:
        """The thresholds table; `at_label` names the (N, P) in its header as the user wrote it."""
        def t(x):
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"

        return text_table([[r["law"], r["group"], t(r["tokens"]), f"[{t(r.get('tokens_lo'))}, {t(r.get('tokens_hi'))}]",
                            r.get("note", "")] for r in self.thresholds],
                          ["law", "group", f"tokens to QiD {self.threshold:g} at N={at_label}", "95% CI", "note"])


def run_fit(table: str | Path, *, law: str = "ouyang", group_by: Sequence[str] = (), filters: Sequence[str] = (),
            n_boot: int = 1000, seed: int = 0, fixed: dict[str, float] | None = None,
            predict: Sequence[tuple[float, float, float]] = (), threshold: float | None = None,
            at: tuple[float, float] | None = None) -> FitOutput:
    """Fit `law` ('ouyang', 'kumar' or 'both') to the table's rows (those passing every filter; only the
    weight-only ones, efftrain.analysis.compare.is_weight_only, unless a filter is on a scheme column or
    the method), per
    group of the `group_by` columns, with `n_boot` bootstrap resamples and the `fixed` parameters held;
    predict QiD at each (N, D, P) of `predict`; with `threshold`, the tokens at which QiD reaches it at
    `at` = (N, P), with an interval when the fit has bootstrap replicates."""
    rows = load_results(table)
    scheme_filtered = any(parse_filter(text)[0] in ("scheme", *SCHEME_MARKERS, "method") for text in filters)
    if not scheme_filtered:  # as the report: the weight-only rows, unless a filter picks schemes itself
        rows = [r for r in rows if is_weight_only(r)] or rows
    rows = apply_filters(rows, filters)
    group_by = tuple(group_by)
    missing = [g for g in group_by if g not in rows[0]]
    if missing:
        raise GridError(f"--group-by: no column(s) {missing} (columns: {', '.join(sorted(rows[0]))})")
    out = FitOutput(source=str(table), filters=list(filters), n_rows=len(rows), tables={}, threshold=threshold)
    for name in (["ouyang", "kumar"] if law == "both" else [law]):
        out.tables[name], notes = fit_rows(rows, name, group_by, n_boot=n_boot, seed=seed, fixed=fixed)
        out.notes += [f"{name}: {x}" for x in notes]
    for n, d, p in predict:
        for name, res in out.tables.items():
            for fr in res.values():
                out.predictions.append({"law": name, "group": fr.label, "n_params": n, "tokens": d, "bits": p,
                                        "qid": fr.predict(n, d, p)})
    if threshold is not None:
        if at is None:
            raise GridError("--threshold needs --at N,P (non-embedding params, bits)")
        n, p = at
        for name, res in out.tables.items():
            for fr in res.values():
                row = {"law": name, "group": fr.label, "qid": threshold, "n_params": n, "bits": p}
                try:
                    est, lo, hi = (tokens_to_reach_ci(fr, threshold, n, p) if fr.n_boot
                                   else (tokens_to_reach(fr, threshold, n, p), math.nan, math.nan))
                    row.update(tokens=est, tokens_lo=lo, tokens_hi=hi)
                except ValueError as e:
                    row.update(tokens=None, note=str(e))
                out.thresholds.append(row)
    return out
