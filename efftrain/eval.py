"""Evaluation of a run's finalized checkpoints on held-out tokens.

Val loss is the main model's mean token cross-entropy (nats) over a fixed set of val windows: the
first `train.eval_batches` batches of non-overlapping windows from the start of the val split
(documents routed to val by path hash), identical for every checkpoint of the run. MTP modules are
excluded from the loss; with MTP, the acceptance rate of module 1's greedy draft is reported too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from efftrain.config import Config
from efftrain.model.transformer import Transformer, build_model
from efftrain.train.checkpoint import CheckpointError, CheckpointStore
from efftrain.train.loop import load_run_config, total_steps_of
from efftrain.train.optimizer import make_optimizer
from efftrain.train.step import init_state, make_eval_step


def abstract_train_state(cfg: Config):
    """(graphdef, abstract state) of the run's train state without allocating it."""
    tx = make_optimizer(cfg.optim, total_steps_of(cfg))

    def build():
        return init_state(build_model(cfg.model, cfg.fp8, seed=cfg.train.seed), tx)[1]

    abstract = jax.eval_shape(build)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.model, cfg.fp8, seed=cfg.train.seed)))
    return graphdef, abstract


def select_checkpoints(store: CheckpointStore, steps: list[int] | None = None,
                       tokens: list[int] | None = None) -> list[dict[str, Any]]:
    series = store.series()
    if not series:
        raise CheckpointError(f"{store.root}: no finalized series checkpoints")
    if steps:
        chosen = [m for m in series if m["step"] in set(steps)]
        missing = set(steps) - {m["step"] for m in chosen}
        if missing:
            raise CheckpointError(f"no series checkpoint at step(s) {sorted(missing)}; "
                                  f"available: {[m['step'] for m in series]}")
        return chosen
    if tokens:
        chosen = []
        for t in tokens:  # nearest checkpoint by tokens seen
            chosen.append(min(series, key=lambda m: abs(m["tokens_seen"] - t)))
        return list({m["step"]: m for m in chosen}.values())
    return series


def load_model(run_dir: Path, step: int, kind: str = "series") -> tuple[Config, Transformer, dict]:
    """The model of one finalized checkpoint (params and other variables restored)."""
    cfg = load_run_config(run_dir)
    graphdef, abstract = abstract_train_state(cfg)
    store = CheckpointStore(run_dir, read_only=True)
    state, _, meta = store.restore(kind, step, abstract)
    store.close()
    return cfg, nnx.merge(graphdef, state["params"], state["rest"]), meta


def val_set(cfg: Config, n_batches: int | None = None) -> list[np.ndarray]:
    from efftrain.data import prepare_data, val_batches

    cache = prepare_data(cfg)
    return val_batches(cache.val, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
                       n_batches=n_batches or cfg.train.eval_batches)


def evaluate_model(model: Transformer, cfg: Config, batches: list[np.ndarray]) -> dict[str, float]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = make_eval_step(graphdef, cfg)
    losses = jax.device_get([step(params, rest, b) for b in batches])
    weights = [b.shape[0] for b in batches]
    loss = float(np.average(losses, weights=weights))
    out = {"val_loss": loss, "perplexity": math.exp(min(loss, 700))}
    if cfg.model.mtp.depth:
        from efftrain.model.mtp import acceptance_rate

        acc = jax.device_get([acceptance_rate(model, b[:, :-1]) for b in batches])
        out["mtp_acceptance"] = float(np.average(acc, weights=weights))
    return out


def eval_run(run_dir: str | Path, *, steps: list[int] | None = None, tokens: list[int] | None = None,
             n_batches: int | None = None, progress=None) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    store = CheckpointStore(run_dir, read_only=True)
    chosen = select_checkpoints(store, steps, tokens)
    store.close()
    batches = val_set(cfg, n_batches)
    rows = []
    for meta in chosen:
        _, model, _ = load_model(run_dir, meta["step"])
        row = {"step": meta["step"], "tokens": meta["tokens_seen"], **evaluate_model(model, cfg, batches)}
        rows.append(row)
        if progress:
            progress(row)
    return rows
