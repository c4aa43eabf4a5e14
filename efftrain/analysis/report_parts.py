"""The parts of the grid report (efftrain.analysis.report) that every section module reads: the document
model the sections write into (Doc, rendered to Markdown and HTML), the grid's results as loaded from its
store (GridResults), the interval and number formatting the sentences and tables share, and Context, what
the sections share at run time.

report.py builds the report and holds the weight-only sections; report_recovery.py and report_schemes.py
hold the recovery fine-tuning and the PTQ-scheme sections. All three import this module; it imports none
of them.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efftrain.analysis.compare import MIN_SLOPE_POINTS, RESOLVED_SE, Comparison, Selection, SlopeGroup
from efftrain.analysis.fits import FitResult
from efftrain.analysis.stats import Interval
from efftrain.config import flatten_dotted
from efftrain.formatting import format_value
from efftrain.grid.spec import GridError, load_spec
from efftrain.grid.store import DB_NAME, ResultsStore
from efftrain.tables import with_n_params


# ----------------------------------------------------------------------------------------------
# A tiny document model rendered to Markdown and HTML
# ----------------------------------------------------------------------------------------------
@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def ul(self, items: list[str]):
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[Any]]):
        self.blocks.append(("table", header, [[("" if c is None else str(c)) for c in r] for r in rows]))

    def image(self, path: Path, caption: str):
        self.blocks.append(("img", Path(path), caption))

    def pre(self, text: str):
        self.blocks.append(("pre", text))

    # ---- renderers ---------------------------------------------------------------------------
    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "ul":
                out.append("\n".join(f"- {x}" for x in b[1]))
            elif b[0] == "table":
                esc = [[c.replace("|", "\\|") for c in r] for r in [b[1]] + b[2]]
                out.append("\n".join(["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])] +
                                     ["| " + " | ".join(r) + " |" for r in esc[1:]]))
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].name})\n\n*{b[2]}*")
            elif b[0] == "pre":
                out.append("```\n" + b[1].rstrip() + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:  # **bold** only
            return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))

        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{inline(b[1])}</p>")
            elif b[0] == "ul":
                body.append("<ul>" + "".join(f"<li>{inline(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
            elif b[0] == "pre":
                body.append(f"<pre>{html.escape(b[1])}</pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
                 "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.85em}"
                 "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}"
                 "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-size:0.85em;color:#555}"
                 "pre{background:#f7f7f7;padding:0.8em;overflow-x:auto;font-size:0.8em}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass
class GridResults:
    name: str
    db_path: Path
    runs_dir: Path
    runs: list[dict]  # runs table, config parsed into "config", "replicate" / "seed" filled in for old stores
    checkpoints: list[dict]
    rows: list[dict]  # ptq rows with n_params

    def run(self, key: str) -> dict | None:
        return next((r for r in self.runs if r["key"] == key), None)


def load_grid_results(source: str | Path) -> GridResults:
    path = Path(source)
    name = None
    if path.suffix in (".yaml", ".yml"):
        spec = load_spec(path)
        db, name = spec.db_path, spec.name
    elif path.is_dir():
        db = path / DB_NAME
    else:
        db = path
    with ResultsStore(db, read_only=True) as store:
        runs = store.runs()
        checkpoints = store.checkpoints()
        rows = with_n_params(store.ptq_rows())
    if not runs:
        raise GridError(f"{db}: no cells recorded (run `efftrain grid run SPEC` first)")
    for r in runs:
        r["config"] = json.loads(r["config_json"]) if r.get("config_json") else {}
        flat = flatten_dotted(r["config"])
        r["replicate"] = r.get("replicate") or r["name"]  # stores from before replicates: one run per cell
        r["seed"] = r.get("seed") if r.get("seed") is not None else flat.get("train.seed", 0)
        r["data_seed"] = r.get("data_seed") if r.get("data_seed") is not None else flat.get("data.shuffle_seed", 0)
    name = name or (runs[0]["config"].get("name") or db.parent.name)
    return GridResults(name=name, db_path=db, runs_dir=db.parent, runs=runs, checkpoints=checkpoints, rows=rows)


def differing_fields(configs: list[dict], ignore: tuple[str, ...] = ("name",)) -> list[str]:
    """Dotted config fields whose values differ between the configs (`ignore`d fields left out)."""
    flats = [flatten_dotted(c) for c in configs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if k not in ignore and len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]


# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------
def _sfmt(x: float) -> str:
    return format_value(x) if not (isinstance(x, (int, float)) and math.isfinite(x)) or x < 0 else "+" + format_value(x)


def _interval(iv: Interval | None, signed: bool = False) -> str:
    """'est [lo, hi]' (signed: with a + on positive numbers); 'est (1 seed: no interval)'."""
    if iv is None:
        return "-"
    f = _sfmt if signed else format_value
    if not (math.isfinite(iv.lo) and math.isfinite(iv.hi)):
        return f"{f(iv.estimate)} ({iv.n} seed{'s' if iv.n != 1 else ''}: no interval)"
    return f"{f(iv.estimate)} [{f(iv.lo)}, {f(iv.hi)}]"


def _slope_left_out(groups: list[SlopeGroup]) -> str:
    """'3 rows inside LR warmup, 2 rows with QiD ≤ 2·se, 1 run with fewer than 3 points, so no slope'
    (empty when nothing was left out)."""
    left = Counter()
    for g in groups:
        left.update(g.left_out)
    parts = [f"{left[k]} row{'s' if left[k] != 1 else ''} {what}" for k, what in
             (("warmup", "inside LR warmup"), ("unresolved", f"with QiD ≤ {RESOLVED_SE:g}·se"),
              ("nonfinite", "without a finite QiD or D")) if left[k]]
    few = sum(g.too_few for g in groups)
    if few:
        parts.append(f"{few} run{'s' if few != 1 else ''} with fewer than {MIN_SLOPE_POINTS} points, so no slope")
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# What the sections share
# ----------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What the sections share: the results, the output directory, the comparison's selection."""

    res: GridResults
    out: Path
    baseline: str
    n_boot: int
    labels: dict[str, str]  # cell key -> variant
    rows: list[dict]  # weight-only PTQ rows with a QiD (compare.is_weight_only), `cluster` set
    sel: Selection | None = None
    slice_rows: list[dict] = field(default_factory=list)  # rows at the selection's group size and format
    notes: list[str] = field(default_factory=list)
    pooled: dict[str, dict[str, tuple[FitResult | None, list[str]]]] = field(default_factory=dict)  # law->method->
    variant_fits: dict[str, dict[str, tuple[FitResult | None, list[str]]]] = field(default_factory=dict)
    comparison: list[Comparison] = field(default_factory=list)
    slopes: list[SlopeGroup] = field(default_factory=list)  # per-run slopes of log QiD vs log D, per variant
    noise_floor: dict[int, float] = field(default_factory=dict)  # bits -> median qid_se at the method
    all_rows: list[dict] = field(default_factory=list)  # every PTQ row with a QiD, scheme rows included

    def plot(self, what: str, fn, *args, **kwargs) -> Path | None:
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            self.notes.append(f"{what} not plotted: {e}")
            return None

    @property
    def main_keys(self) -> set[str]:
        return {r["key"] for r in self.res.runs if (r.get("kind") or "main") == "main"}
