"""Learning-rate schedules and the token -> step conversion of checkpoint series."""

import numpy as np
import pytest

from efftrain.config import CheckpointConfig, OptimConfig
from efftrain.train.optimizer import decay_mask, lr_schedule
from efftrain.train.series import log_spaced_tokens, series_points


def lrs(total, **kw):
    sched = lr_schedule(OptimConfig(**kw), total)
    return np.array([float(sched(s)) for s in range(total)])


def test_warmup_then_cosine_to_floor():
    lr = lrs(100, lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert np.all(np.diff(lr[10:]) <= 1e-7)
    assert lr[-1] == pytest.approx(0.1, abs=1e-3)


def test_wsd_is_flat_then_decays_in_last_fraction():
    lr = lrs(100, lr=1.0, schedule="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.0)
    assert np.allclose(lr[:80], 1.0)
    assert lr[81] < 1.0 and lr[-1] == pytest.approx(1 / 20, abs=1e-6)  # linear: 1 - 19/20
    sqrt = lrs(100, lr=1.0, schedule="wsd", warmup_steps=0, decay_fraction=0.2, decay_shape="sqrt",
               min_lr_ratio=0.0)
    assert sqrt[90] < lr[90]  # 1 - sqrt(q) drops faster early than linear


def test_constant_and_linear():
    assert np.allclose(lrs(50, lr=0.5, schedule="constant", warmup_steps=0), 0.5)
    lin = lrs(11, lr=1.0, schedule="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert np.allclose(lin, 1 - np.arange(11) / 11)


def test_log_spaced_tokens_include_both_ends():
    pts = log_spaced_tokens(1000, 1_000_000, 2)
    assert pts[0] == 1000 and pts[-1] == 1_000_000 and len(pts) == 7
    assert pts[1] == round(1000 * 10 ** 0.5)


def test_series_points_convert_tokens_to_steps():
    cfg = CheckpointConfig(tokens=[100, 1000, 1050, 10**9], log_start=None, log_stop=None)
    points, dropped = series_points(cfg, tokens_per_step=100, total_steps=50)
    assert [p.step for p in points] == [1, 10, 50]  # 1000 and 1050 both map to step 10; final added
    assert points[1].target_tokens == 1000 and points[1].tokens == 1000
    assert dropped == [10**9]


def test_series_target_within_the_last_step_is_the_final_checkpoint():
    # 80M tokens at 32768 per step: training runs ceil(...) = 2442 steps; the 80M target is nearest to
    # step 2441 but only reached during step 2442, which is the final checkpoint anyway (no near-duplicate)
    cfg = CheckpointConfig(tokens=[], log_start=1_000_000, log_stop=80_000_000, per_decade=3)
    points, dropped = series_points(cfg, tokens_per_step=32768, total_steps=2442)
    steps = [p.step for p in points]
    assert steps[-1] == 2442 and 2441 not in steps and not dropped
    assert points[-1].target_tokens == 80_000_000 and len(points) == 7


def test_weight_decay_mask_skips_embedding_and_vectors():
    params = {"embed": {"embedding": np.zeros((4, 2))}, "w": {"kernel": np.zeros((2, 2))}, "n": np.zeros(2)}
    mask = decay_mask(params)
    assert mask == {"embed": {"embedding": False}, "w": {"kernel": True}, "n": False}
