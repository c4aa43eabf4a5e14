"""The decoder-only transformer: embedding -> L pre-norm blocks -> final RMSNorm -> output head.

Each block (`block.py`) is  h = x + Attn(RMSNorm(x));  out = h + FFN(RMSNorm(h)),  with MHA/GQA or
MLA attention and a SwiGLU MLP or DeepSeekMoE. Optional MTP modules (`mtp.py`) ride on the final
hidden state.

`Transformer.__call__(tokens)` returns `ModelOutput(logits, hidden, moe)`: logits [B,T,V] in fp32,
the last block's hidden state [B,T,D] (input to MTP) and the per-MoE-layer router statistics.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efftrain.config import FP8Config, ModelConfig
from efftrain.model.block import Block, attention_class, is_moe_layer
from efftrain.model.layers import Embedding, Linear, RMSNorm
from efftrain.model.mtp import MTP


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] fp32
    hidden: jax.Array  # [B, T, D] last block output, before the final norm
    moe: dict  # stacked router statistics of the MoE layers ({} without MoE)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8: FP8Config | None = None):
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, cfg=cfg, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs, fp8=fp8) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg=cfg)
        self.lm_head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, cfg=cfg, rngs=rngs, fp8=fp8, fp8_role="output_head")
        self.mtp = MTP(cfg, rngs=rngs, fp8=fp8) if cfg.mtp.depth > 0 else None

    def head(self, h: jax.Array) -> jax.Array:
        """Output head on an already-normalised hidden state -> fp32 logits."""
        logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        return logits.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> ModelOutput:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        x = self.embed(tokens)
        moe_stats = []
        for block in self.blocks:
            x, stats = block(x, positions)
            if stats is not None:
                moe_stats.append(stats)
        logits = self.head(self.final_norm(x))
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *moe_stats) if moe_stats else {}
        return ModelOutput(logits, x, stacked)


def build_model(cfg: ModelConfig, fp8: FP8Config | None = None, seed: int = 0) -> Transformer:
    return Transformer(cfg, rngs=nnx.Rngs(params=seed), fp8=fp8)


# ----------------------------------------------------------------------------------------------
# Accounting
# ----------------------------------------------------------------------------------------------
def _numel(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def parameter_counts(model: Transformer) -> dict[str, int]:
    """total, embedding, non_embedding (the N of the scaling fits: excludes the token embedding and
    MTP modules, includes the output head unless tied), active (per token: only top-k + shared
    experts counted), mtp."""
    cfg = model.cfg
    params = nnx.state(model, nnx.Param)
    total = _numel(params)
    embedding = _numel(nnx.state(model.embed, nnx.Param))
    mtp = _numel(nnx.state(model.mtp, nnx.Param)) if model.mtp is not None else 0
    inactive = 0
    if cfg.moe.enabled:
        per_expert = 3 * cfg.d_model * cfg.moe.expert_hidden
        n_moe = sum(is_moe_layer(cfg, i) for i in range(cfg.n_layers))
        inactive = n_moe * (cfg.moe.num_routed_experts - cfg.moe.top_k) * per_expert
    non_embedding = total - embedding - mtp
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": non_embedding,
        "active": total - inactive - mtp,
        "active_non_embedding": non_embedding - inactive,
        "mtp": mtp,
    }


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward+backward FLOPs of the attention core (q·k scores and the weighted sum of values).

    Per token and layer the forward pass costs 2·T·n_heads·(d_qk + d_v) FLOPs against T positions,
    and backward twice that: 6·L·T·n_heads·(d_qk + d_v). For MHA (d_qk = d_v = head_dim) this is the
    familiar 12·L·T·D (Kaplan et al.; nanoGPT), counting the full T×T square, i.e. ignoring the causal
    mask, as the MFU convention of PaLM (appendix B) does.
    """
    d_qk, d_v = attention_class(cfg).core_dims(cfg)
    return 6 * cfg.n_layers * seq_len * cfg.n_heads * (d_qk + d_v)


def flops_per_token(model: Transformer, seq_len: int) -> int:
    """Model FLOPs per trained token: 6 * (active matmul params, incl. output head, excl. the
    embedding lookup and MTP) + attention core. MTP modules add their own share when enabled."""
    counts = parameter_counts(model)
    cfg = model.cfg
    matmul_params = counts["active_non_embedding"] + (counts["embedding"] if cfg.tie_embeddings else 0)
    # norms are not matmuls; their parameters are negligible and left in for simplicity
    flops = 6 * matmul_params + attention_flops_per_token(cfg, seq_len)
    if cfg.mtp.depth:
        flops += 6 * counts["mtp"] + attention_flops_per_token(cfg, seq_len) * cfg.mtp.depth // cfg.n_layers
        flops += 6 * cfg.d_model * cfg.vocab_size * cfg.mtp.depth  # the shared head, once per depth
    return int(flops)
