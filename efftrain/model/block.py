"""One pre-norm transformer block, shared by the main model and the MTP modules.

    h = x + Attn(RMSNorm(x));  out = h + FFN(RMSNorm(h))

Attn is MHA/GQA (`attention.py`) or MLA (`mla.py`), chosen by `model.attention`; FFN is a SwiGLU MLP
(`layers.py`) or DeepSeekMoE (`moe.py`) for layers >= moe.first_dense_layers. Each attention class
answers for its own KV-cache size and attention-core shape (`cache_elements_per_token`, `core_dims`).
"""

from __future__ import annotations

import jax
from flax import nnx

from efftrain.config import FP8Config, ModelConfig
from efftrain.model.attention import Attention
from efftrain.model.layers import MLP, RMSNorm
from efftrain.model.mla import MLAttention
from efftrain.model.moe import MoE


def attention_class(cfg: ModelConfig) -> type[Attention] | type[MLAttention]:
    return MLAttention if cfg.attention == "mla" else Attention


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """KV-cache bytes per token per layer: what the layer's attention stores for decoding."""
    return attention_class(cfg).cache_elements_per_token(cfg) * bytes_per_element


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    return cfg.moe.enabled and layer >= cfg.moe.first_dense_layers


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, fp8: FP8Config | None = None):
        self.attn_norm = RMSNorm(cfg.d_model, cfg=cfg)
        self.attn = attention_class(cfg)(cfg, rngs=rngs, fp8=fp8)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg=cfg)
        self.is_moe = is_moe_layer(cfg, layer)
        if self.is_moe:
            self.ffn = MoE(cfg, rngs=rngs, fp8=fp8)
        else:
            self.ffn = MLP(cfg.d_model, cfg.mlp_hidden, cfg=cfg, rngs=rngs, fp8=fp8)

    def __call__(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, dict | None]:
        x = x + self.attn(self.attn_norm(x), positions)
        if self.is_moe:
            y, stats = self.ffn(self.ffn_norm(x))
            return x + y, stats
        return x + self.ffn(self.ffn_norm(x)), None
