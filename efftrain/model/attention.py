"""Causal multi-head / grouped-query attention with RoPE (the baseline the DeepSeek variants replace).

q = x Wq, k = x Wk, v = x Wv with n_kv_heads <= n_heads key/value heads (GQA, Ainslie et al. 2023;
n_kv_heads == n_heads is plain MHA), RoPE on q and k, softmax(q kᵀ / sqrt(head_dim)) v under a causal
mask, computed by `jax.nn.dot_product_attention` (cuDNN flash attention on GPU in bf16, XLA elsewhere).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from efftrain.config import FP8Config, ModelConfig
from efftrain.model.layers import Linear, apply_rope, apply_shared_input


def attention_implementation(cfg: ModelConfig, dtype) -> str | None:
    """The `implementation` argument for jax.nn.dot_product_attention."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and dtype in (jnp.bfloat16, jnp.float16) else "xla"


CUDNN_SEQ_MULTIPLE = 64  # cuDNN flash attention rejects other sequence lengths (e.g. MTP's T - k)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                     cfg: ModelConfig) -> jax.Array:
    """q [B,T,N,H], k/v [B,T,K,H] (K divides N) -> [B,T,N,H] with a causal mask.

    For cuDNN, T is zero-padded at the end to a multiple of 64 and the output sliced back: exact,
    since under the causal mask no real query attends to a padded key."""
    impl = attention_implementation(cfg, q.dtype)
    T = q.shape[1]
    pad = -T % CUDNN_SEQ_MULTIPLE if impl == "cudnn" else 0
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=impl)
    return out[:, :T] if pad else out


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8: FP8Config | None = None):
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        d = cfg.d_model
        self.q = Linear(d, self.n_heads * self.head_dim, cfg=cfg, rngs=rngs, fp8=fp8)
        self.k = Linear(d, self.n_kv * self.head_dim, cfg=cfg, rngs=rngs, fp8=fp8)
        self.v = Linear(d, self.n_kv * self.head_dim, cfg=cfg, rngs=rngs, fp8=fp8)
        self.o = Linear(self.n_heads * self.head_dim, d, cfg=cfg, rngs=rngs, fp8=fp8,
                        std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        q, k, v = apply_shared_input((self.q, self.k, self.v), x)
        q = rearrange(q, "b t (n h) -> b t n h", n=self.n_heads)
        k = rearrange(k, "b t (n h) -> b t n h", n=self.n_kv)
        v = rearrange(v, "b t (n h) -> b t n h", n=self.n_kv)
        theta = self.cfg.rope_theta
        q, k = apply_rope(q, positions, theta), apply_rope(k, positions, theta)
        out = causal_attention(q, k, v, scale=self.head_dim ** -0.5, cfg=self.cfg)
        return self.o(rearrange(out, "b t n h -> b t (n h)"))


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = 2) -> int:
    """KV-cache bytes per token per layer (keys + values of every kv head)."""
    if cfg.attention == "mla":
        from efftrain.model.mla import mla_cache_elements_per_token

        return mla_cache_elements_per_token(cfg) * bytes_per_element
    return 2 * cfg.resolved_kv_heads * cfg.resolved_head_dim * bytes_per_element
