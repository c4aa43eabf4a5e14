"""The learning-rate schedule section of the grid report (efftrain.analysis.schedule): cooldown branches
and checkpoint averages against their stable run and the runs trained to their budget at equal tokens,
and the per-run slopes of each schedule against the stable run's over the same range of D, all paired
by seed. Shown when the grid has cooldown or average cells; efftrain.analysis.report registers
section_schedule in build_report and adds schedule_sentences to the summary.
"""

from __future__ import annotations

from collections import Counter

from efftrain.analysis.compare import method_label
from efftrain.analysis.report_parts import Context, Doc, _interval
from efftrain.analysis.schedule import (BUDGET_MATCH, STABLE, EqualTokens, SlopeDifference,
                                        equal_token_comparisons, stable_slope_differences)
from efftrain.formatting import format_count


def schedule_results(ctx: Context) -> tuple[list[EqualTokens], list[SlopeDifference]]:
    """The equal-token comparisons and slope differences at the selection's group size and format
    (empty when the grid has no cooldown or average cells)."""
    if ctx.sel is None or not any(r.get("kind") in ("cooldown", "average") for r in ctx.res.runs):
        return [], []
    sel = ctx.sel
    return (equal_token_comparisons(ctx.rows, ctx.res.runs, sel.group_size, sel.fmt),
            stable_slope_differences(ctx.rows, ctx.res.runs, sel.group_size, sel.fmt))


def _delta(iv) -> str:
    return _interval(iv, signed=True)


def schedule_sentences(ctx: Context) -> list[str]:
    """Summary lines at the selection: cooldowns and averages vs the stable run, cooldowns vs the runs
    trained to their budget, schedules' slopes vs the stable run's."""
    comparisons, slopes = schedule_results(ctx)
    sel = ctx.sel
    if sel is None:
        return []
    here = [c for c in comparisons if c.method == sel.method and c.bits == sel.bits]
    out = []
    for kind, relation, lead in (("cooldown", "stable run", "Cooldown end vs the stable run at the same step"),
                                 ("cooldown", "trained to this budget", "Cooldown end vs a run trained to that budget"),
                                 ("average", "stable run", "Checkpoint average vs the stable run at the same step"),
                                 ("average", "its run", "Checkpoint average vs its own run at the same step")):
        group = [c for c in here if c.kind == kind and c.relation == relation]
        if group:
            verdicts = Counter(c.verdict for c in group)
            out.append(f"{lead}, {sel.label} (ΔQiD paired by seed; Δ 16-bit loss in brackets): "
                       + "; ".join(f"**{c.branch}** vs {c.reference} at {format_count(c.tokens)} tokens "
                                   f"{_delta(c.diff)} (loss {_delta(c.loss_diff)})" for c in group)
                       + " — " + ", ".join(f"{n} of {len(group)}: {v}" for v, n in verdicts.most_common()) + ".")
    for d in (d for d in slopes if d.method == sel.method and d.bits == sel.bits):
        verdict = d.diff.verdict(higher="steeper than the stable run", lower="flatter than the stable run")
        out.append(f"Slope of log QiD vs log D at {sel.label}: **{d.variant}** {_delta(d.slope)} vs the stable run "
                   f"**{d.stable}** {_delta(d.stable_slope)} over {format_count(d.d_min)}–{format_count(d.d_max)} "
                   f"tokens, paired difference {_delta(d.diff)}: {verdict}.")
    return out


def section_schedule(ctx: Context, doc: Doc) -> None:
    comparisons, slopes = schedule_results(ctx)
    if not comparisons and not slopes:
        return
    sel = ctx.sel
    doc.h(2, "Learning-rate schedule at equal tokens")
    doc.p(f"Catalan-Tatjer et al. (arXiv 2510.06213) report that QiD jumps when the learning rate decays rather "
          f"than growing with tokens; Kumar et al. (arXiv 2411.04330) compare against cosine runs trained to each "
          f"budget. Each cooldown branch's final model and each checkpoint average is compared with models of the "
          f"same tokens: its parent run's checkpoint at the same step (the *stable run* when the parent is a "
          f"'{STABLE}' cell), and, for a cooldown, every other main variant that is not a stable run and whose "
          f"final checkpoint lies within {BUDGET_MATCH:.0%} of the branch's tokens (*trained to this budget*). "
          f"Branch and reference are paired by seed (the branch of seed s against the run of seed s), with a 95% "
          f"t-interval over seeds; the 16-bit loss difference uses the same pairs. Group size {sel.group_size}, "
          f"format {sel.fmt}.")
    here = [c for c in comparisons if c.method == sel.method and c.bits == sel.bits]
    if here:
        doc.h(3, f"At {sel.label}")
        doc.table(["branch", "compared with", "relation", "tokens", "seeds", "QiD branch", "QiD reference",
                   "ΔQiD, paired [95% CI]", "Δ 16-bit loss, paired", "verdict"],
                  [[c.branch, c.reference, c.relation, format_count(c.tokens), c.diff.n, _interval(c.qid_branch),
                    _interval(c.qid_reference), _delta(c.diff), _delta(c.loss_diff), c.verdict] for c in here])
    if comparisons:
        doc.h(3, "Every method and bit width: verdicts counted")
        tally: dict[tuple, Counter] = {}
        for c in comparisons:
            tally.setdefault((c.kind, c.relation, method_label(c.method), c.bits), Counter())[c.verdict] += 1
        doc.table(["branch kind", "compared with", "method", "bits", "comparisons", "verdicts"],
                  [[k, rel, m, b, sum(n.values()), "; ".join(f"{v}: {x}" for v, x in n.most_common())]
                   for (k, rel, m, b), n in tally.items()])
    if slopes:
        doc.h(3, "Slopes of log QiD vs log D against the stable run")
        doc.p("Each run's OLS slope over its checkpoints after warmup whose QiD is resolved (as in the per-run "
              "slopes section); the stable run's slopes are refitted over the other variant's range of D only, "
              "and the two are paired by seed.")
        doc.table(["variant", "stable run", "method", "bits", "D range", "slope [95% CI]", "stable slope [95% CI]",
                   "Δ slope, paired", "verdict"],
                  [[d.variant, d.stable, method_label(d.method), d.bits,
                    f"{format_count(d.d_min)}–{format_count(d.d_max)}", _delta(d.slope), _delta(d.stable_slope),
                    _delta(d.diff), d.diff.verdict(higher="steeper", lower="flatter")] for d in slopes])
