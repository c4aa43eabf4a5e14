"""Evaluation of a run's finalized checkpoints on held-out tokens, one loss per val window.

The eval set is a seeded random sample of disjoint val windows (seq_len+1 tokens each) spread over
the whole val split (`efftrain.data.pipeline.val_window_indices`): it depends only on the val tokens,
seq_len, the number of windows and the eval seed, so every checkpoint and every replicate of a run
(whatever its train.seed / data.shuffle_seed) is evaluated on identical windows. Training-time val
loss and `efftrain eval` use ``train.eval_batches × train.batch_size`` windows with eval seed 0
(`val_set`); the PTQ sweep draws its own, larger set (`eval_set`, PTQSpec.eval_tokens).

Every window is scored separately: its mean token cross-entropy (nats) of the main model (MTP modules
excluded). Windows run in batches of one fixed shape (`eval_batch_size`: the run's micro-batch, or
more for tiny models; a ragged last batch is padded with copies of a real window whose results are
dropped), so each jitted function compiles once, and the device results are fetched once, after the
last batch. On a run whose train.mesh splits parameters, `eval_run` restores each checkpoint sharded
over that mesh (efftrain.train.sharding.checkpoint_mesh) and splits every batch over it (`EvalSet.laid_over`), so that
the same jitted functions run sharded. Reported:
  val_loss     mean of the per-window losses (every window has seq_len scored tokens: = token mean)
  val_loss_se  its standard error over windows, std(ddof=1)/sqrt(windows) (NaN for one window)
  windows      number of val windows scored
  perplexity   exp(val_loss); with MTP, also the acceptance rate of module 1's greedy draft
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efftrain.config import Config
from efftrain.data import prepare_data
from efftrain.data.pipeline import val_set_windows, val_windows
from efftrain.model.mtp import acceptance_rate
from efftrain.model.transformer import Transformer
from efftrain.train.checkpoint import CheckpointError, checkpoints_dir
from efftrain.train.rundir import finalized, load_model, load_run_config
from efftrain.train.sharding import BATCH_AXES, checkpoint_mesh
from efftrain.train.step import (make_hidden_fn, make_paired_eval_fn, make_paired_from_hidden_fn, make_paired_many_fn,
                                 make_paired_other_fn, make_window_loss_fn)

# one jitted function per model structure (GraphDefs of equal models compare equal)
window_loss_fn = functools.lru_cache(maxsize=8)(make_window_loss_fn)
paired_eval_fn = functools.lru_cache(maxsize=8)(make_paired_eval_fn)
paired_from_hidden_fn = functools.lru_cache(maxsize=8)(make_paired_from_hidden_fn)
paired_many_fn = functools.lru_cache(maxsize=8)(make_paired_many_fn)
paired_other_fn = functools.lru_cache(maxsize=8)(make_paired_other_fn)
hidden_fn = functools.lru_cache(maxsize=8)(make_hidden_fn)


def select_checkpoints(run_dir: str | Path, steps: list[int] | None = None,
                       tokens: list[int] | None = None) -> list[dict[str, Any]]:
    """The run's finalized series checkpoints (metadata): those at `steps`, else the nearest to each of
    `tokens`, else all; CheckpointError if the run has none, or none at a requested step."""
    series = finalized(run_dir)
    if not series:
        raise CheckpointError(f"{checkpoints_dir(run_dir)}: no finalized series checkpoints")
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


@dataclass
class EvalSet:
    """Sampled val windows and the fixed batch shape they are scored in."""

    windows: np.ndarray  # int32 [n, seq_len + 1], the real windows in index order
    batch_size: int
    seed: int = 0
    requested: int | None = None  # windows asked for (None: as many as there are)
    mesh: Mesh | None = None  # each batch split over every axis of it (`laid_over`); None: on the default device
    _device: list[jax.Array] | None = field(default=None, repr=False, compare=False)

    @property
    def n(self) -> int:
        return len(self.windows)

    @property
    def tokens(self) -> int:
        """Scored (target) tokens: seq_len per window."""
        return self.n * (self.windows.shape[1] - 1)

    def batches(self) -> list[jax.Array]:
        """The windows as device batches of one shape [batch_size, seq_len + 1] (the last one padded
        with copies of the first window; `scores` drops their results). Transferred once. On a mesh,
        each batch is split over all its devices, as training splits a micro-batch, so that jitted
        functions of sharded parameters run sharded (GSPMD); its size is rounded up to a multiple of the
        device count, so that every device holds whole windows."""
        if self._device is None:
            b = min(self.batch_size, self.n)
            if self.mesh is not None:
                b = -(-b // self.mesh.size) * self.mesh.size
            pad = -self.n % b
            padded = np.concatenate([self.windows, np.repeat(self.windows[:1], pad, axis=0)])
            if self.mesh is None:
                self._device = list(jnp.asarray(padded).reshape(-1, b, padded.shape[1]))
            else:
                split = NamedSharding(self.mesh, P(BATCH_AXES))
                self._device = [jax.device_put(x, split) for x in padded.reshape(-1, b, padded.shape[1])]
        return self._device

    def laid_over(self, mesh: Mesh | None) -> "EvalSet":
        """These windows with their batches split over `mesh` (None: on the default device)."""
        return dataclasses.replace(self, mesh=mesh, _device=None)


EVAL_BATCH_TOKENS = 8192  # an eval batch grows past the micro-batch up to this many tokens ...
EVAL_LOGITS_BYTES = 256 << 20  # ... while its fp32 logits (x3: two log-softmaxes and their product) fit in this


def eval_batch_size(cfg: Config) -> int:
    """Windows per eval batch: the run's micro-batch (its training step already fits that in memory), or
    more for short windows and a small vocab, up to EVAL_BATCH_TOKENS tokens and EVAL_LOGITS_BYTES of
    logits: far fewer dispatches for tiny models, the same per-window values."""
    micro = max(1, cfg.train.batch_size // cfg.train.grad_accum)
    seq_len, vocab = cfg.data.seq_len, cfg.model.vocab_size
    return max(micro, min(EVAL_BATCH_TOKENS // seq_len, EVAL_LOGITS_BYTES // (3 * 4 * seq_len * vocab)))


def eval_set(cfg: Config, n_windows: int, *, seed: int = 0, val_tokens: np.ndarray | None = None) -> EvalSet:
    """min(n_windows, available) seeded val windows of the run (`val_window_indices`)."""
    if val_tokens is None:
        val_tokens = prepare_data(cfg).val
    windows = val_windows(val_tokens, seq_len=cfg.data.seq_len, n_windows=n_windows, seed=seed)
    return EvalSet(windows, eval_batch_size(cfg), seed=seed, requested=n_windows)


def val_set(cfg: Config, n_batches: int | None = None, *, seed: int = 0) -> EvalSet:
    """The windows of the run's training-time val loss: (n_batches or train.eval_batches) × batch_size
    windows (whole batches; `efftrain.data.pipeline.val_set_windows`), eval seed 0 by default."""
    tokens = prepare_data(cfg).val
    wanted = cfg.train.eval_batches if n_batches is None else n_batches
    n, _ = val_set_windows(len(tokens), seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size, n_batches=wanted)
    if n_batches is not None and n < wanted * cfg.train.batch_size:
        print(f"note: {wanted} batches ask for {wanted * cfg.train.batch_size} val windows; the val split has "
              f"{n} whole batches' worth: using {n}", file=sys.stderr)
    return eval_set(cfg, n, seed=seed, val_tokens=tokens)


def scores(fn: Callable, windows: EvalSet, *args, per_batch: list | None = None, axis: int = 0) -> Any:
    """fn(*args, batch) over every batch (fn(per_batch[i], *args, batch) with `per_batch`), with one
    device_get at the end; each output leaf (one value per window along `axis`: 1 for the [K, B]
    leaves of `paired_many_fn`) concatenated over batches along that axis as a numpy array of
    `windows.n` values there (padding dropped)."""
    batches = windows.batches()
    outs = [fn(*args, b) for b in batches] if per_batch is None else \
        [fn(extra, *args, b) for extra, b in zip(per_batch, batches)]
    host = jax.device_get(outs)
    return jax.tree.map(lambda *xs: np.take(np.concatenate(xs, axis=axis), np.arange(windows.n), axis=axis), *host)


def reference_states(graphdef, params_16, rest, windows: EvalSet) -> list[jax.Array]:
    """The 16-bit model's last hidden states on every batch of `windows` (device arrays, [B, T, D] each:
    windows × seq_len × d_model values in the compute dtype), for `compare_params(reference=...)`."""
    fn = hidden_fn(graphdef)
    return [fn(params_16, rest, b) for b in windows.batches()]


def mean_and_se(x: np.ndarray) -> tuple[float, float]:
    """(mean, standard error of the mean = std(ddof=1)/sqrt(n)) in float64; the error is NaN for n < 2."""
    x = np.asarray(x, np.float64)
    se = float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan
    return float(np.mean(x)), se


def evaluate_model(model: Transformer, cfg: Config, windows: EvalSet | list[np.ndarray]) -> dict[str, float]:
    """val_loss, val_loss_se, windows, perplexity (and mtp_acceptance) of `model` on the windows (an
    EvalSet, or a list of window batches)."""
    if not isinstance(windows, EvalSet):
        windows = EvalSet(np.concatenate([np.asarray(b, np.int32) for b in windows]), eval_batch_size(cfg))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, se = mean_and_se(scores(window_loss_fn(graphdef), windows, params, rest))
    out = {"val_loss": loss, "val_loss_se": se, "windows": windows.n, "perplexity": math.exp(min(loss, 700))}
    if cfg.model.mtp.depth:
        chunks = [windows.windows[i:i + windows.batch_size] for i in range(0, windows.n, windows.batch_size)]
        acc = jax.device_get([acceptance_rate(model, jnp.asarray(c[:, :-1])) for c in chunks])
        out["mtp_acceptance"] = float(np.average(acc, weights=[len(c) for c in chunks]))
    return out


def compare_params(graphdef, params_16, params_q, rest, windows: EvalSet,
                   reference: list[jax.Array] | None = None) -> dict[str, float]:
    """The 16-bit and the quantized parameters on the same windows (`make_paired_eval_fn`):
    loss_16, loss_q (means over windows), qid (mean of the per-window differences loss_q − loss_16)
    and qid_se (its standard error), kl and kl_se (mean token KL(p_16 ‖ p_q), nats), top1_agree.
    `reference` (`reference_states` of params_16 on these windows) skips the 16-bit blocks' forward,
    which every row of one checkpoint shares."""
    if reference is None:
        per_window = scores(paired_eval_fn(graphdef), windows, params_16, params_q, rest)
    else:
        per_window = scores(paired_from_hidden_fn(graphdef), windows, params_16, params_q, rest, per_batch=reference)
    return summarize_paired(per_window)


def compare_params_many(graphdef, params_16, params_q_list: list, rest, windows: EvalSet,
                        reference: list[jax.Array] | None = None, pad_to: int | None = None) -> list[dict[str, float]]:
    """`compare_params` of each parameter set in `params_q_list` (all of graphdef's structure, with the
    shapes and dtypes of one another), scored together in one pass over the windows
    (`make_paired_many_fn`): the 16-bit head and log-softmax run once per batch for all of them, not
    once per set. One dict per set, in order, with compare_params' keys and formulas (equal to its
    values up to float rounding). The sets are stacked into one more copy on the device while they are
    scored. `reference` None: the 16-bit hidden states are computed here first (`reference_states`).
    `pad_to`: score that many sets, the list padded with copies of its last set (their results dropped),
    so that every call runs the one pad_to-set program whatever the list's length: rows then do not
    depend on how they were grouped (the sweep's PTQSpec.eval_rows)."""
    n = len(params_q_list)
    if pad_to is not None:
        params_q_list = list(params_q_list) + [params_q_list[-1]] * (pad_to - n)
    layouts = {tuple((x.shape, x.dtype) for x in jax.tree.leaves(p)) for p in params_q_list}
    if len(layouts) != 1:  # jnp.stack would promote mixed dtypes, changing some rows' numbers
        raise ValueError("compare_params_many: the parameter sets differ in shapes or dtypes")
    if reference is None:
        reference = reference_states(graphdef, params_16, rest, windows)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *params_q_list)
    per_window = scores(paired_many_fn(graphdef), windows, params_16, stacked, rest, per_batch=reference, axis=1)
    return [summarize_paired({key: v[k] for key, v in per_window.items()}) for k in range(n)]


def paired_windows(graphdef_16, params_16, rest_16, windows: EvalSet, reference: list, graphdef_x,
                   states_x: tuple) -> dict[str, np.ndarray]:
    """Per eval window: loss_16, loss_q, kl, top1_agree of the 16-bit checkpoint (its `reference` hidden
    states) and a model x of another structure (graphdef_x with its states)."""
    return scores(paired_other_fn(graphdef_16, graphdef_x), windows, params_16, rest_16, states_x, per_batch=reference)


def summarize_paired(per_window: dict[str, np.ndarray]) -> dict[str, float]:
    """A PTQ row's loss columns from per-window paired values (loss_16, loss_q, kl, top1_agree):
    means, and standard errors over the windows of QiD and KL."""
    diff = per_window["loss_q"].astype(np.float64) - per_window["loss_16"]
    qid, qid_se = mean_and_se(diff)
    kl, kl_se = mean_and_se(per_window["kl"])
    return {"loss_16": mean_and_se(per_window["loss_16"])[0], "loss_q": mean_and_se(per_window["loss_q"])[0],
            "qid": qid, "qid_se": qid_se, "kl": kl, "kl_se": kl_se,
            "top1_agree": float(np.mean(per_window["top1_agree"], dtype=np.float64))}


def eval_run(run_dir: str | Path, *, steps: list[int] | None = None, tokens: list[int] | None = None,
             n_batches: int | None = None, progress=None) -> list[dict[str, Any]]:
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    chosen = select_checkpoints(run_dir, steps, tokens)
    mesh = checkpoint_mesh(cfg)  # the run's own mesh where it shards parameters (efftrain.train.sharding)
    windows = val_set(cfg, n_batches).laid_over(mesh)
    rows = []
    for meta in chosen:
        _, model, _ = load_model(run_dir, meta["step"], mesh=mesh)
        row = {"step": meta["step"], "tokens": meta["tokens_seen"], **evaluate_model(model, cfg, windows)}
        rows.append(row)
        if progress:
            progress(row)
    return rows
