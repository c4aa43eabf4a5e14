"""Multi-token prediction (MTP): DeepSeek-V3 (arXiv 2412.19437) §2.2, eqs. 21–25.

D sequential modules extend the main model's prediction by one more token each, keeping the full causal
chain. With h^0 the main model's last hidden state (before its final norm), t the input tokens, T the
sequence length, module k = 1..D computes for positions i = 0..T-k-1:

    h'_i^k   = M_k [RMSNorm(h_i^{k-1}) ; RMSNorm(Emb(t_{i+k}))]       (eq. 21; M_k: `proj`, 2D -> D)
    h_{0:T-k}^k = TRM_k(h'_{0:T-k}^k)                                  (eq. 22; one transformer Block)
    P_{i+k+1}^k = OutHead(RMSNorm(h_i^k))                              (eq. 23; head shared with the main model)
    L_MTP^k  = CE(P^k, t_{k+1:T})   = mean_i -log P_{i+k+1}^k[t_{i+k+1}] (eq. 24)
    L        = L_main + (λ / D) Σ_k L_MTP^k                            (eq. 25)

Emb and OutHead are the main model's embedding and `Transformer.head` (no copies). Each module keeps its
own RMSNorm before the shared head, as DeepSeek's reference does (`shared_head.norm`); the concat order
[hidden ; embedding] follows eq. 21 (the reference code concatenates [embedding ; hidden], which a learned
M_k makes equivalent). The block is built with layer index n_layers - 1, so it is dense or MoE like the
main model's last layer. Positions i keep the main model's positions (RoPE), sliced to the first T-k.

Index bookkeeping: for a window w[0..T], inputs = w[:-1] and targets = w[1:]; depth k predicts
targets[:, k:] from logits_k [B, T-k, V] (position i -> token i+k+1) and reads inputs only up to i+k.

`acceptance_rate` measures how often module 1's greedy guess for token i+2 (made at position i) equals the
main model's greedy guess for the same token (made at position i+1): the acceptance probability of
self-speculative decoding with the MTP head as drafter (V3 §5.4.3 reports 85–90 %), here on teacher-forced
tokens.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from efftrain.config import FP8Config, ModelConfig, MTPConfig
from efftrain.model.block import Block
from efftrain.model.layers import Linear, RMSNorm, cross_entropy

# `model` below is the main model (efftrain.model.transformer.Transformer, which builds the MTP
# modules): its `embed`, `head` and `mtp` are used, so it is typed by what it offers, not imported.


class MTPModule(nnx.Module):
    """One depth k: two input norms, the projection M_k, a transformer block, an output norm."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8: FP8Config | None = None):
        d = cfg.d_model
        self.norm_hidden = RMSNorm(d, cfg=cfg)
        self.norm_embed = RMSNorm(d, cfg=cfg)
        self.proj = Linear(2 * d, d, cfg=cfg, rngs=rngs, fp8=fp8)
        self.block = Block(cfg, cfg.n_layers - 1, rngs=rngs, fp8=fp8)
        self.out_norm = RMSNorm(d, cfg=cfg)

    def __call__(self, h_prev: jax.Array, embedded: jax.Array, positions: jax.Array):
        """h_prev, embedded [B,L,D], positions [B,L] -> (h_k [B,L,D], normalised h_k, MoE stats or None)."""
        x = self.proj(jnp.concatenate([self.norm_hidden(h_prev), self.norm_embed(embedded)], axis=-1))
        h, stats = self.block(x, positions)
        return h, self.out_norm(h), stats


class MTP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8: FP8Config | None = None):
        self.depth = cfg.mtp.depth
        self.layers = nnx.List([MTPModule(cfg, rngs=rngs, fp8=fp8) for _ in range(self.depth)])

    def __call__(self, hidden: jax.Array, tokens: jax.Array, *, embed: Callable, head: Callable,
                 positions: jax.Array | None = None, depth: int | None = None):
        """hidden [B,T,D] (main model, pre final norm), tokens [B,T] (the main model's inputs).

        Returns ([logits_k [B,T-k,V] fp32 for k = 1..depth], [MoE stats of each MoE block]).
        `depth` runs only the first modules (default: all).
        """
        T = tokens.shape[-1]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), tokens.shape)
        h = hidden
        logits, moe_stats = [], []
        for k, module in enumerate(self.layers[: self.depth if depth is None else depth], start=1):
            h, h_normed, stats = module(h[:, : T - k], embed(tokens[:, k:]), positions[:, : T - k])
            logits.append(head(h_normed))
            if stats is not None:
                moe_stats.append(stats)
        return logits, moe_stats


# ----------------------------------------------------------------------------------------------
# Losses and metrics (used by the train step and eval)
# ----------------------------------------------------------------------------------------------
def mtp_loss_weight(cfg: MTPConfig, tokens_seen) -> jax.Array:
    """λ: cfg.loss_weight before `loss_weight_switch_tokens` tokens, `loss_weight_after` from then on.

    jit-safe: tokens_seen may be a traced integer.
    """
    if cfg.loss_weight_switch_tokens is None:
        return jnp.asarray(cfg.loss_weight, jnp.float32)
    return jnp.where(jnp.asarray(tokens_seen) >= cfg.loss_weight_switch_tokens,
                     jnp.float32(cfg.loss_weight_after), jnp.float32(cfg.loss_weight))


def mtp_total(ce_main: jax.Array, ce_mtp: jax.Array, lam) -> jax.Array:
    """L = L_main + (λ/D) Σ_k CE_k (eq. 25); exactly ce_main when D = 0."""
    if ce_mtp.shape[0] == 0:
        return ce_main
    return ce_main + lam * jnp.mean(ce_mtp)


def mtp_losses_and_stats(model: nnx.Module, hidden: jax.Array, inputs: jax.Array, targets: jax.Array,
                         positions: jax.Array | None = None) -> tuple[jax.Array, list]:
    """CE per depth [D] (fp32; shape [0] without MTP) and the MoE stats list of the MTP blocks."""
    if model.mtp is None:
        return jnp.zeros((0,), jnp.float32), []
    logits, stats = model.mtp(hidden, inputs, embed=model.embed, head=model.head, positions=positions)
    ce = jnp.stack([cross_entropy(lk, targets[:, k:]) for k, lk in enumerate(logits, start=1)])
    return ce, stats


def mtp_losses(model: nnx.Module, hidden: jax.Array, inputs: jax.Array, targets: jax.Array,
               positions: jax.Array | None = None) -> jax.Array:
    """CE_k for k = 1..D, each the mean over the T-k positions of depth k: shape [D]."""
    return mtp_losses_and_stats(model, hidden, inputs, targets, positions)[0]


def acceptance_rate(model: nnx.Module, inputs: jax.Array) -> jax.Array:
    """Fraction of positions i < T-1 where argmax MTP-1 logits at i == argmax main logits at i+1."""
    if model.mtp is None:
        raise ValueError("acceptance_rate needs a model with MTP modules (model.mtp.depth >= 1)")
    out = model(inputs)
    (mtp1,), _ = model.mtp(out.hidden, inputs, embed=model.embed, head=model.head, depth=1)
    main_next = jnp.argmax(out.logits[:, 1:], axis=-1)  # guesses for token i+2, made at i+1
    draft = jnp.argmax(mtp1, axis=-1)  # guesses for token i+2, made at i
    return jnp.mean((draft == main_next).astype(jnp.float32))
