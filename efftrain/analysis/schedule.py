"""Learning-rate schedules and QiD at equal tokens: the comparisons of Catalan-Tatjer et al. (2025,
arXiv 2510.06213: QiD jumps when the learning rate decays, not with the tokens seen) with Kumar et al.'s
control (2024, arXiv 2411.04330: a cosine run trained to each budget).

A grid with cooldown branches or checkpoint averages (the spec's `cooldown:` and `average:`) has its
main cells save a series checkpoint at every step where a branch ends or an average is taken
(efftrain.grid.spec), so each branch point is compared with other models of exactly the same tokens:

  * branch vs its stable run: the QiD of a cooldown branch's final model, or of a checkpoint average,
    minus the QiD of its parent run's checkpoint at the same step. The branch of seed s is paired with
    the parent run of seed s (same initialisation, same batches up to the branch point), and the
    t-interval is over the seeds' differences (efftrain.analysis.stats.paired_difference). The same
    pairing gives the 16-bit loss difference, so that "the cooldown lowers the loss by x and raises QiD
    by y" is read from one table.
  * cooldown vs a run trained to that budget: the branch's end against every other main variant, not a
    stable run, whose final checkpoint lies within BUDGET_MATCH of the branch's tokens (Kumar et al.'s
    cosine-to-end run), at the same step when that variant has a checkpoint there, else at its nearest
    one. An average of a run that is not a stable run (a cosine run's) is compared with that run.
  * slopes: each main variant's per-run slope of log QiD on log D (efftrain.analysis.compare.run_slopes)
    minus the slope of the stable run of the same peak learning rate over the same range of D (the stable
    run's rows restricted to the variant's first..last checkpoint tokens), paired by seed: is QiD's growth
    with tokens a property of the tokens (equal slopes) or of the schedule?

A stable run is a main cell whose PTQ rows carry the schedule label 'wsd-stable' (a WSD cell whose
cooldowns are branches); "the same peak learning rate" is equal `optim.lr`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from efftrain.analysis.compare import _num, _seed_of, run_slopes, series_labels
from efftrain.analysis.stats import Interval, paired_difference, t_interval
from efftrain.config import flatten_dotted

BUDGET_MATCH = 0.01  # a variant was trained to a branch's budget when its final tokens are this close (relative)
STABLE = "wsd-stable"  # the schedule label of a stable run's rows (efftrain.grid)
BRANCH_KINDS = {"cooldown": "cooldown", "average": "average"}


@dataclass
class EqualTokens:
    """A branch variant (all seeds of one cooldown or average point) against a reference variant at the
    same tokens, at one (method, bits): each side's QiD over seeds, and their paired differences."""

    branch: str  # the branch's variant, e.g. 'wsd,cooldown@12.5M'
    kind: str  # 'cooldown' | 'average'
    reference: str  # the variant compared with, e.g. 'wsd' or 'cosine-15M'
    relation: str  # 'stable run' | 'its run' (the parent, not a stable run) | 'trained to this budget'
    method: str
    bits: int
    tokens: float  # the branch's tokens (mean over seeds)
    reference_tokens: float  # the reference's (mean over seeds; equal to tokens at the same step)
    qid_branch: Interval
    qid_reference: Interval
    diff: Interval  # QiD(branch) - QiD(reference), paired by seed
    loss_diff: Interval  # loss_16(branch) - loss_16(reference), paired by seed

    @property
    def verdict(self) -> str:
        what = "the cooldown" if self.kind == "cooldown" else "averaging"
        return self.diff.verdict(higher=f"{what} raises QiD", lower=f"{what} lowers QiD")


@dataclass
class SlopeDifference:
    """A main variant's per-run slope of log QiD vs log D minus its stable run's over the same D range,
    paired by seed, at one (method, bits)."""

    variant: str
    stable: str
    method: str
    bits: int
    d_min: float
    d_max: float
    slope: Interval  # the variant's slopes over seeds
    stable_slope: Interval  # the stable run's slopes over [d_min, d_max]
    diff: Interval  # paired by seed


def _schedules(rows: list[dict]) -> dict[str, str]:
    """Cell key -> the schedule label of its PTQ rows ('wsd-stable', 'cosine', ...)."""
    out: dict[str, str] = {}
    for r in rows:
        out.setdefault(r.get("run_key"), r.get("schedule"))
    return out


def _points(rows: list[dict], runs: list[dict], group_size: int, fmt: str) -> dict:
    """(variant, seed, method, bits) -> {step: (tokens, qid, loss_16)} of the weight-only rows given."""
    labels, by_key = series_labels(runs), {r["key"]: r for r in runs}
    out: dict[tuple, dict[int, tuple[float, float, float]]] = {}
    for r in rows:
        run = by_key.get(r.get("run_key"))
        if run is None or r["group_size"] != group_size or r["format"] != fmt or r.get("qid") is None:
            continue
        if (run.get("kind") or "main") != "main":  # a branch variant is one point per seed: name it by its cell
            variant = run["replicate"]
        else:
            variant = labels[run["key"]]
        key = (variant, _seed_of(run), r["method"], int(r["bits"]))
        out.setdefault(key, {})[int(r["step"])] = (float(r["tokens"]), float(r["qid"]), _num(r.get("loss_16")))
    return out


def _at(series: dict[int, tuple], step: int, tokens: float) -> tuple | None:
    """The checkpoint of a series at `step`, else its nearest by tokens within BUDGET_MATCH; None if none."""
    if step in series:
        return series[step]
    near = min(series.values(), key=lambda p: abs(p[0] - tokens), default=None)
    return near if near is not None and abs(near[0] - tokens) <= BUDGET_MATCH * tokens else None


def equal_token_comparisons(rows: list[dict], runs: list[dict], group_size: int, fmt: str) -> list[EqualTokens]:
    """Every cooldown and average variant against its stable run, and every cooldown variant against the
    runs trained to its budget, at every (method, bits) of the rows (see the module docstring); in the
    order of the runs, then method and bits."""
    points = _points(rows, runs, group_size, fmt)
    by_key, labels, schedules = {r["key"]: r for r in runs}, series_labels(runs), _schedules(rows)
    branches = list(dict.fromkeys((r["replicate"], r["kind"], labels[r["parent"]], schedules.get(r["parent"]) == STABLE)
                                  for r in runs if r.get("kind") in BRANCH_KINDS and r.get("parent") in by_key))
    mains = list(dict.fromkeys(labels[r["key"]] for r in runs if (r.get("kind") or "main") == "main"
                               and schedules.get(r["key"]) != STABLE))
    finals: dict[str, list[float]] = {}  # main variant (not a stable run) -> final tokens of its runs
    for (variant, _, _, _), series in points.items():
        if variant in mains:
            finals.setdefault(variant, []).append(max(p[0] for p in series.values()))
    method_bits = sorted({(m, b) for (_, _, m, b) in points})
    out = []
    for branch, kind, parent, parent_stable in branches:
        for method, bits in method_bits:
            mine = {seed: next(iter(s.items())) for (v, seed, m, b), s in points.items()
                    if v == branch and m == method and b == bits and s}
            if not mine:
                continue
            tokens = float(np.mean([p[0] for _, p in mine.values()]))
            refs = [(parent, "stable run" if parent_stable else "its run")]
            if kind == "cooldown":
                refs += [(v, "trained to this budget") for v in mains if v != parent and v in finals
                         and abs(np.mean(finals[v]) - tokens) <= BUDGET_MATCH * tokens]
            for ref, relation in refs:
                theirs = {}
                for seed, (step, p) in mine.items():
                    series = points.get((ref, seed, method, bits))
                    q = _at(series, step, p[0]) if series else None
                    if q is not None:
                        theirs[seed] = q
                if not theirs:
                    continue
                out.append(EqualTokens(
                    branch=branch, kind=kind, reference=ref, relation=relation, method=method, bits=bits,
                    tokens=tokens, reference_tokens=float(np.mean([q[0] for q in theirs.values()])),
                    qid_branch=t_interval([p[1] for _, p in mine.values()]),
                    qid_reference=t_interval([q[1] for q in theirs.values()]),
                    diff=paired_difference({s: p[1] for s, (_, p) in mine.items()}, {s: q[1] for s, q in theirs.items()}),
                    loss_diff=paired_difference({s: p[2] for s, (_, p) in mine.items()},
                                                {s: q[2] for s, q in theirs.items()})))
    return out


def _peak_lr(run: dict) -> float:
    return _num(flatten_dotted(run["config"]).get("optim.lr"))


def stable_slope_differences(rows: list[dict], runs: list[dict], group_size: int, fmt: str) -> list[SlopeDifference]:
    """Every main variant that is not a stable run against the stable run of its peak learning rate:
    per-run slopes over the variant's D range, paired by seed (see the module docstring)."""
    labels = series_labels(runs)
    main = [r for r in runs if (r.get("kind") or "main") == "main"]
    schedule = _schedules(rows)
    stable = {labels[r["key"]]: _peak_lr(r) for r in main if schedule.get(r["key"]) == STABLE}
    if not stable:
        return []
    rows = [r for r in rows if r["group_size"] == group_size and r["format"] == fmt]
    main_keys = {r["key"] for r in main}
    by_variant: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("run_key") in main_keys:
            by_variant.setdefault(labels[r["run_key"]], []).append(r)
    out = []
    for r in main:
        variant = labels[r["key"]]
        if variant in stable or any(d.variant == variant for d in out):
            continue
        for s_variant, lr in stable.items():
            if not math.isclose(lr, _peak_lr(r), rel_tol=1e-6):
                continue
            mine = run_slopes(by_variant.get(variant, []), main)
            for m, b in sorted({(x.method, x.bits) for x in mine if x.fitted}):
                fitted = [x for x in mine if x.method == m and x.bits == b and x.fitted]
                lo, hi = min(x.d_min for x in fitted), max(x.d_max for x in fitted)
                window = [x for x in by_variant.get(s_variant, []) if x["method"] == m and int(x["bits"]) == b
                          and lo * (1 - BUDGET_MATCH) <= float(x["tokens"]) <= hi * (1 + BUDGET_MATCH)]
                theirs = {x.seed: x.slope for x in run_slopes(window, main) if x.fitted}
                ours = {x.seed: x.slope for x in fitted}
                if not theirs:
                    continue
                out.append(SlopeDifference(variant=variant, stable=s_variant, method=m, bits=b, d_min=lo, d_max=hi,
                                           slope=t_interval(list(ours.values())),
                                           stable_slope=t_interval(list(theirs.values())),
                                           diff=paired_difference(ours, theirs)))
    return out
