"""Checkpoint series: token counts -> optimizer steps.

A series is given in tokens, as researchers think of it (Pythia's log-spaced early checkpoints,
gpt-neox `extra_save_iters`): an explicit list, a log-spaced range (`log_start`, `log_stop`,
`per_decade` points per factor of ten, both ends included), or both. Each target becomes the step
whose cumulative token count is nearest (at least step 1), except that a target first reached during
the last step is the last step (log_stop = max_tokens would otherwise add a checkpoint one step before
the final one); the tokens actually seen at that step are what the checkpoint records. Targets beyond
the end of training are reported and dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from efftrain.config import CheckpointConfig


@dataclass(frozen=True)
class SeriesPoint:
    step: int  # optimizer steps completed when the checkpoint is written
    target_tokens: int  # what was asked for (the nearest target when several map to one step)
    tokens: int  # tokens actually seen = step * tokens_per_step


def log_spaced_tokens(start: int, stop: int, per_decade: int) -> list[int]:
    n = int(math.floor(per_decade * math.log10(stop / start) + 1e-9)) + 1
    points = [round(start * 10 ** (i / per_decade)) for i in range(n)]
    if points[-1] != stop:
        points.append(stop)
    return sorted(set(points))


def target_tokens(cfg: CheckpointConfig) -> list[int]:
    targets = set(cfg.tokens)
    if cfg.log_start is not None and cfg.log_stop is not None:
        targets.update(log_spaced_tokens(cfg.log_start, cfg.log_stop, cfg.per_decade))
    return sorted(targets)


def series_points(cfg: CheckpointConfig, tokens_per_step: int, total_steps: int) -> tuple[list[SeriesPoint], list[int]]:
    """(points sorted by step, targets dropped because they lie beyond total_steps)."""
    by_step: dict[int, int] = {}
    dropped = []
    for t in target_tokens(cfg):
        step = max(1, round(t / tokens_per_step))
        if (total_steps - 1) * tokens_per_step < t <= total_steps * tokens_per_step:
            step = total_steps  # reached only during the last step: the final checkpoint, not one step before
        if step > total_steps:
            dropped.append(t)
            continue
        # keep the target closest to the step's real token count
        if step not in by_step or abs(t - step * tokens_per_step) < abs(by_step[step] - step * tokens_per_step):
            by_step[step] = t
    if cfg.include_final and total_steps not in by_step:
        by_step[total_steps] = total_steps * tokens_per_step
    points = [SeriesPoint(s, by_step[s], s * tokens_per_step) for s in sorted(by_step)]
    return points, dropped
