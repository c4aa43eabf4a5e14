"""The order in which parallel workers take a grid's cell families, and when a family waits.

A grid's small cells spend most of their wall time compiling, not training (docs/BENCHMARKS.md,
"A grid's cells per hour", 2026-12-04: a 12M-token cell of d256 L4 trains in 2-12 s of H200 time and
compiles for 20-150 s). Replicates of one cell differ only in their seeds, so they run the same compiled
programs, which the persistent compilation cache (efftrain.xla) hands from the first replicate to the
others. Three rules follow, applied by `FamilyQueue` for `grid run --workers N`:

  costliest first  distinct cells are started in decreasing order of `family_cost`, so the slowest one
                   (the all-on cell) does not start last and set the grid's tail alone (the longest-
                   processing-time-first rule of list scheduling, Graham 1969);
  spread           one replicate of every distinct cell before the second of any (`spread_replicates`):
                   W workers then compile W distinct programs instead of W copies of one;
  hold             a replicate whose sibling is running but has not yet finished compiling (no
                   evaluated step in its metrics.jsonl, `programs_compiled`) is passed over for any
                   other family; a worker waits only when every waiting family is held, since the held
                   one would otherwise compile the same programs again, only to finish after its
                   sibling.

Order "spread" applies the second rule alone, "spec" none (the spec's order, as before 93fd806); both
stay for benchmarks/bench_grid.py's comparisons.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from flax import nnx

from efftrain.grid.spec import COOLDOWN, Cell, GridError
from efftrain.model.transformer import build_model, flops_per_token
from efftrain.train.rundir import METRICS, total_steps_of

ORDERS = ("costliest", "spread", "spec")
Families = dict[str, list[Cell]]


def techniques_enabled(cell: Cell) -> int:
    """How many of the four DeepSeek techniques the cell's config turns on (MLA, MoE, MTP, FP8)."""
    m, fp8 = cell.config.model, cell.config.fp8
    return int(m.attention == "mla") + int(m.moe.enabled) + int(m.mtp.depth > 0) + int(fp8.enabled)


def family_cost(cells: list[Cell], flops_of: Callable[[Cell], int]) -> float:
    """A relative estimate of a family's GPU time: the model FLOPs it trains (its main cell's tokens plus
    its cooldown branches', with `flops_of` per token) times (1 + the techniques it enables). The factor
    stands for what FLOPs miss: each technique adds programs to compile and kernels slower than their
    FLOPs (H200, d256 L4: MLA 1.08x, MoE 1.40x, MTP 1.53x, FP8 2.42x, all four 6.2x the dense step,
    docs/BENCHMARKS.md 2026-12-04). Only the order of the estimates is used."""
    main = cells[0]
    tokens = total_steps_of(main.config) * main.config.tokens_per_step
    tokens += sum((total_steps_of(c.config) - c.branch_step) * c.config.tokens_per_step
                  for c in cells[1:] if c.kind == COOLDOWN)
    return float(flops_of(main)) * tokens * (1 + techniques_enabled(main))


def model_flops_per_token(cell: Cell) -> int:
    """Training FLOPs per token of the cell's model, from its abstract shapes (nothing is allocated)."""
    cfg = cell.config
    model = nnx.eval_shape(lambda: build_model(cfg.model, cfg.fp8, seed=cfg.train.seed))
    return flops_per_token(model, cfg.data.seq_len)


def costliest_first(families: Families, flops_of: Callable[[Cell], int] = model_flops_per_token) -> Families:
    """The families sorted by decreasing `family_cost`; equal costs (the replicates of one cell) keep the
    spec's order. FLOPs are computed once per distinct model config."""
    memo: dict[str, int] = {}

    def flops(cell: Cell) -> int:
        key = cell.config.model.model_dump_json() + cell.config.fp8.model_dump_json() + str(cell.config.data.seq_len)
        if key not in memo:
            memo[key] = flops_of(cell)
        return memo[key]

    costs = {fam: family_cost(cells, flops) for fam, cells in families.items()}
    return {fam: families[fam] for fam in sorted(families, key=lambda f: -costs[f])}


def replicate_group(fam: str, cells: list[Cell]) -> str:
    """The name shared by the replicates (seeds) of one cell: families of one group run the same programs."""
    return cells[0].replicate or fam


def spread_replicates(families: Families) -> Families:
    """The families in the order workers take them: the first replicate (seed) of every distinct cell in
    the given order, then the second of each, and so on. Replicates differ only in their seeds, so they
    run the same compiled programs: taken one after another (the spec's order), W workers start W copies
    of one program together, each compiling it while the GPU waits; spread, the workers start W distinct
    programs, and a later replicate loads its programs from the compilation cache the first one filled."""
    groups: dict[str, list[str]] = {}
    for fam, cells in families.items():
        groups.setdefault(replicate_group(fam, cells), []).append(fam)
    order = [fams[i] for i in range(max(map(len, groups.values()), default=0)) for fams in groups.values()
             if i < len(fams)]
    return {fam: families[fam] for fam in order}


def ordered(families: Families, order: str) -> Families:
    """The families in the order `order` ("costliest", "spread" or "spec") hands them to workers."""
    if order not in ORDERS:
        raise GridError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    if order == "spec":
        return families
    return spread_replicates(costliest_first(families) if order == "costliest" else families)


def programs_compiled(cells: list[Cell]) -> bool:
    """Whether the family's main run has evaluated a step (a record with a val_loss in its metrics.jsonl):
    its train step and its evaluation programs are compiled by then, so in the compilation cache."""
    path = Path(cells[0].run_dir) / METRICS
    try:
        with path.open() as f:
            for line in f:
                if '"val_loss"' in line:
                    try:
                        return "val_loss" in json.loads(line)
                    except ValueError:  # a line being written
                        continue
    except OSError:
        return False
    return False


class FamilyQueue:
    """The families waiting for a worker, in the order given; `take()` hands out the first that may start.

    hold: a family is passed over while another family of its replicate group is running and
    `compiled(running family's cells)` is False and no family of the group has finished; with
    hold=False, `take()` hands the families out strictly in order."""

    def __init__(self, families: Families, *, hold: bool,
                 compiled: Callable[[list[Cell]], bool] = programs_compiled):
        self.waiting = list(families.items())
        self.running: Families = {}
        self.hold, self.compiled = hold, compiled
        self.warm: set[str] = set()  # groups whose programs are in the cache
        self.closed = False

    def take(self) -> tuple[str, list[Cell]] | None:
        """The next family to start (now running), or None: nothing waits, the queue is closed, or every
        waiting family is held (a running family's progress or end releases it)."""
        if self.closed:
            return None
        for i, (fam, cells) in enumerate(self.waiting):
            if not (self.hold and self._held(fam, cells)):
                del self.waiting[i]
                self.running[fam] = cells
                return fam, cells
        return None

    def held(self) -> list[str]:
        """The waiting families that `take()` passes over now."""
        return [fam for fam, cells in self.waiting if self.hold and self._held(fam, cells)]

    def _held(self, fam: str, cells: list[Cell]) -> bool:
        group = replicate_group(fam, cells)
        if group in self.warm:
            return False
        siblings = [c for f, c in self.running.items() if replicate_group(f, c) == group]
        if not siblings:
            return False
        if any(self.compiled(c) for c in siblings):
            self.warm.add(group)
            return False
        return True

    def finish(self, fam: str) -> None:
        """A running family ended (done, failed or crashed): its group's later replicates may start."""
        cells = self.running.pop(fam)
        self.warm.add(replicate_group(fam, cells))

    def close(self) -> None:
        """Hand out nothing more (a stop): the waiting families are left for the next run."""
        self.closed = True

    def __len__(self) -> int:
        return len(self.waiting)
