"""The jitted, functional training step.

The model is split once, outside jit, into `graphdef` (static structure), `params` (nnx.Param) and
`rest` (every other Variable, e.g. the MoE aux-free router biases). The step is a pure function of
(state, batch, tokens_seen) with the state buffers donated:

  for each of `grad_accum` micro-batches (lax.scan):   loss, grads  (fp32 accumulation)
  loss = CE_main + Σ_layers MoE aux loss + (λ/D)·Σ_k CE_mtp_k
  updates = AdamW(clip(mean grads));  params += updates
  MoE router biases: b ← b − γ·sign(load − mean load), zero-mean (V3 §2.1.2), from the step's loads

Metrics stay on device; the loop fetches them only at log steps, so the loop never blocks on the host.

Evaluation (main model only, MTP and aux losses excluded): `make_eval_step` gives a batch's mean
token CE; `make_window_loss_fn` one mean token CE per window; `make_paired_eval_fn` runs 16-bit and
quantized parameters on the same windows and gives per window both losses, the mean token
KL(p_16 ‖ p_q) and the top-1 agreement (efftrain.eval batches and summarises them);
`make_paired_many_fn` scores K quantized parameter sets of one checkpoint in one pass.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from efftrain.config import Config
from efftrain.model.layers import cross_entropy, deterministic_gradients
from efftrain.model.mtp import mtp_loss_weight, mtp_losses_and_stats
from efftrain.model.placement import tracing_mesh
from efftrain.model.transformer import Transformer
from efftrain.xla import eval_jit, for_platform, step_options

TrainState = dict[str, Any]  # {"params": State, "rest": State, "opt": optax state}


def split_model(model: Transformer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def init_state(model: Transformer, tx: optax.GradientTransformation):
    graphdef, params, rest = split_model(model)
    return graphdef, {"params": params, "rest": rest, "opt": tx.init(params)}


def forward_losses(model: Transformer, window: jax.Array, tokens_seen: jax.Array, cfg: Config):
    """Total training loss and its parts for one micro-batch window [B, T+1]."""
    inputs, targets = window[:, :-1], window[:, 1:]
    out = model(inputs)
    ce = cross_entropy(out.logits, targets)
    loss = ce
    metrics = {"ce": ce}
    moe_stats = out.moe
    mcfg = cfg.model
    if mcfg.mtp.depth:
        ce_k, mtp_moe = mtp_losses_and_stats(model, out.hidden, inputs, targets)
        lam = mtp_loss_weight(mcfg.mtp, tokens_seen)
        loss = loss + lam / mcfg.mtp.depth * jnp.sum(ce_k)
        metrics["mtp_ce"] = ce_k
        metrics["mtp_lambda"] = lam
        if mtp_moe:  # MTP blocks that are MoE layers: their stats follow the main model's layers
            mtp_stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *mtp_moe)
            moe_stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), moe_stats, mtp_stacked)
    if moe_stats:
        loss = loss + jnp.sum(moe_stats["aux_loss"])
        metrics["moe"] = moe_stats
    metrics["loss"] = loss
    return loss, metrics


def make_train_step(graphdef, cfg: Config, tx: optax.GradientTransformation, compiler_options: dict | None = None,
                    *, state_sharding=None, mesh=None, platform: str | None = None, jit: bool = True):
    """Returns step(state, batch [accum, micro, T+1], tokens_seen) -> (state, metrics), jitted,
    with the state donated and compiled with `compiler_options` (default efftrain.xla.step_options).
    `jit=False`: the same step as a plain function, for a caller that composes it into its own
    top-level jit (compile options are only accepted there: efftrain.train.loop.guarded_step).
    With `train.deterministic` the gradients avoid scatter-adds and GPU attention uses a kernel without
    atomics (`deterministic_gradients`, read while tracing; docs/REPRODUCIBILITY.md).

    `state_sharding` (a pytree of NamedShardings like the state, efftrain.train.sharding): the gradients
    and the new state are constrained to it, so FSDP-sharded parameters and moments stay sharded and
    XLA reduce-scatters their gradients; `mesh` is the mesh model code may constrain activations on
    while tracing (MoE expert buffers). Both None (the default, and any all-replicated layout): the
    step is exactly the single-device program.

    `platform` ('cpu' | 'gpu' | 'tpu', or jax.export's 'cuda'): the platform the step is traced and its
    default compile options chosen for (efftrain.xla.for_platform: cuDNN / Pallas attention and the
    FP8 kernels on GPUs only, XLA's implementations elsewhere); None, JAX's default backend. Set it to
    lower the step on one host for another (tests/test_tpu_lowering.py exports it for 'tpu' on a CPU)."""
    def constrain(tree, shardings):
        return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)

    def micro_grads(params, rest, window, tokens_seen):
        def loss_of(p):
            model = nnx.merge(graphdef, p, rest)
            token = deterministic_gradients.set(cfg.train.deterministic)
            try:
                return forward_losses(model, window, tokens_seen, cfg)
            finally:
                deterministic_gradients.reset(token)

        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return grads, metrics

    def step(state: TrainState, batch: jax.Array, tokens_seen: jax.Array):
        with for_platform(platform), tracing_mesh(mesh):
            return sharded_step(state, batch, tokens_seen)

    def sharded_step(state: TrainState, batch: jax.Array, tokens_seen: jax.Array):
        params, rest = state["params"], state["rest"]
        n_micro = batch.shape[0]
        if n_micro == 1:
            grads, metrics = micro_grads(params, rest, batch[0], tokens_seen)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

            def body(acc, window):
                g, m = micro_grads(params, rest, window, tokens_seen)
                acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
                return acc, m

            grads, metrics = jax.lax.scan(body, zeros, batch)
            grads = jax.tree.map(lambda g, p: (g / n_micro).astype(p.dtype), grads, params)
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

        grads = constrain(grads, None if state_sharding is None else state_sharding["params"])
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt = tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        moe = cfg.model.moe
        if moe.enabled and moe.aux_free_bias and moe.bias_update_rate > 0:
            from efftrain.model.moe import update_router_bias

            model = nnx.merge(graphdef, params, rest)
            update_router_bias(model, metrics["moe"]["load"], moe.bias_update_rate)
            _, _, rest = split_model(model)
        return constrain({"params": params, "rest": rest, "opt": opt}, state_sharding), metrics

    if not jit:
        return step
    if compiler_options is None:
        with for_platform(platform):
            compiler_options = step_options(cfg.train.deterministic)
    return jax.jit(step, donate_argnums=(0,), compiler_options=compiler_options or None)


def make_eval_step(graphdef, cfg: Config):
    """Returns eval(params, rest, window [B, T+1]) -> main-model CE (MTP and aux losses excluded)."""

    def evaluate(params, rest, window):
        model = nnx.merge(graphdef, params, rest)
        out = model(window[:, :-1])
        return cross_entropy(out.logits, window[:, 1:])

    return eval_jit(evaluate)


def _token_log_probs(graphdef, params, rest, window):
    """fp32 log-softmax of the main model's logits [B, T, V] (MTP modules are not run)."""
    out = nnx.merge(graphdef, params, rest)(window[:, :-1])
    return jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)


def _window_ce(logp, window):
    """Per-window mean token cross-entropy [B] from log-probs [B, T, V]."""
    picked = jnp.take_along_axis(logp, window[:, 1:, None], axis=-1)[..., 0]
    return -jnp.mean(picked, axis=-1)


def make_window_loss_fn(graphdef):
    """Returns losses(params, rest, window [B, T+1]) -> [B]: each window's mean token CE of the main
    model (nats; MTP excluded, as `make_eval_step`). Jitted: one compile per batch shape."""

    def losses(params, rest, window):
        return _window_ce(_token_log_probs(graphdef, params, rest, window), window)

    return eval_jit(losses)


def make_hidden_fn(graphdef):
    """Returns hidden(params, rest, window [B, T+1]) -> [B, T, D]: the main model's last hidden state
    (before the final norm; the output head is not computed). Jitted."""

    def hidden(params, rest, window):
        return nnx.merge(graphdef, params, rest)(window[:, :-1]).hidden

    return eval_jit(hidden)


def _compare(lp16, lpq, window):
    kl = jnp.sum(jnp.exp(lp16) * (lp16 - lpq), axis=-1)
    agree = jnp.argmax(lp16, axis=-1) == jnp.argmax(lpq, axis=-1)
    return {"loss_16": _window_ce(lp16, window), "loss_q": _window_ce(lpq, window),
            "kl": jnp.mean(kl, axis=-1), "top1_agree": jnp.mean(agree.astype(jnp.float32), axis=-1)}


def make_paired_eval_fn(graphdef):
    """Returns paired(params_16, params_q, rest, window [B, T+1]) -> dict of [B] float32 arrays, one
    value per window of the 16-bit and the quantized model run on the same tokens:

      loss_16, loss_q  mean token CE (nats) of each model
      kl               mean token KL(p_16 ‖ p_q) = Σ_v p_16·(log p_16 − log p_q), nats, fp32 log-softmax
      top1_agree       fraction of positions where both models' argmax agree

    Jitted: one compile per batch shape (and parameter dtypes)."""

    def paired(params_16, params_q, rest, window):
        lp16 = _token_log_probs(graphdef, params_16, rest, window)
        return _compare(lp16, _token_log_probs(graphdef, params_q, rest, window), window)

    return eval_jit(paired)


def make_paired_from_hidden_fn(graphdef):
    """`make_paired_eval_fn` with the 16-bit model's hidden states given (`make_hidden_fn`, computed once
    per checkpoint and eval set): paired(hidden_16, params_16, params_q, rest, window); only the
    16-bit final norm and head run again, so a PTQ row costs one model forward instead of two."""

    def paired(hidden_16, params_16, params_q, rest, window):
        model_16 = nnx.merge(graphdef, params_16, rest)
        lp16 = jax.nn.log_softmax(model_16.head(model_16.final_norm(hidden_16)).astype(jnp.float32), axis=-1)
        return _compare(lp16, _token_log_probs(graphdef, params_q, rest, window), window)

    return eval_jit(paired)


def make_paired_many_fn(graphdef):
    """`make_paired_from_hidden_fn` for K quantized parameter sets of one checkpoint at once:
    paired(hidden_16, params_16, stacked_params_q, rest, window), stacked_params_q the K sets stacked
    along a new leading axis (every leaf [K, ...]); returns the same keys, each [K, B] (row k = the
    single-row values of set k; loss_16 is the same [B] in every row).

    The 16-bit side (final norm, head matmul over the vocab, fp32 log-softmax) is computed once per
    batch instead of once per row. The K sets are scored one after another with jax.lax.map, not in
    a Python loop or vmap: only one set's [B, T, V] logits are live at a time (vmap would hold K), and
    the program traces and compiles the per-row body once, whatever K is."""

    def paired(hidden_16, params_16, stacked_params_q, rest, window):
        model_16 = nnx.merge(graphdef, params_16, rest)
        lp16 = jax.nn.log_softmax(model_16.head(model_16.final_norm(hidden_16)).astype(jnp.float32), axis=-1)
        return jax.lax.map(lambda params_q: _compare(lp16, _token_log_probs(graphdef, params_q, rest, window), window),
                           stacked_params_q)

    return eval_jit(paired)


def make_paired_other_fn(graphdef_16, graphdef_x):
    """`make_paired_from_hidden_fn` with the second model of another structure (an adapted, rotated or
    runtime-quantized one): paired(hidden_16, params_16, rest_16, states_x, window), states_x the
    states nnx.merge(graphdef_x, ...) takes."""

    def paired(hidden_16, params_16, rest_16, states_x, window):
        model_16 = nnx.merge(graphdef_16, params_16, rest_16)
        lp16 = jax.nn.log_softmax(model_16.head(model_16.final_norm(hidden_16)).astype(jnp.float32), axis=-1)
        out = nnx.merge(graphdef_x, *states_x)(window[:, :-1])
        return _compare(lp16, jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1), window)

    return eval_jit(paired)
