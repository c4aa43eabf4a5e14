"""Causal multi-head / grouped-query attention with RoPE (the baseline the DeepSeek variants replace).

q = x Wq, k = x Wk, v = x Wv with n_kv_heads <= n_heads key/value heads (GQA, Ainslie et al. 2023;
n_kv_heads == n_heads is plain MHA), RoPE on q and k, softmax(q kᵀ / sqrt(head_dim)) v under a causal
mask, computed by `jax.nn.dot_product_attention` (cuDNN flash attention on GPU in bf16, XLA elsewhere).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from efftrain.config import FP8Config, ModelConfig
from efftrain.model.layers import Linear, apply_rope, apply_shared_input, deterministic_gradients
from efftrain.xla import on_gpu


def attention_implementation(cfg: ModelConfig, dtype) -> str:
    """The kernel of `causal_attention`: cfg.attention_impl, or for `auto` cuDNN on a GPU in 16-bit
    (Pallas' flash attention when the step is traced for train.deterministic: cuDNN's backward
    accumulates dQ with atomics), XLA elsewhere (TPU, CPU). "On a GPU": traced for one
    (efftrain.xla.on_gpu, the train step's `platform`), whatever the host."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    if not (on_gpu() and dtype in (jnp.bfloat16, jnp.float16)):
        return "xla"
    return "pallas" if deterministic_gradients.get() else "cudnn"


def padding_for(impl: str, T: int) -> int:
    """Zero rows to append to a length-T sequence for the kernel: cuDNN takes multiples of 64, Pallas
    blocks of 128 rows (or one power-of-two block when T <= 128); XLA any length (e.g. MTP's T - k)."""
    if impl == "cudnn":
        return -T % 64
    if impl == "pallas":
        return -T % 128 if T > 128 else (1 << (T - 1).bit_length()) - T
    return 0


@dataclasses.dataclass(frozen=True)
class PallasTiles:
    """Tile sizes of Pallas' flash attention (jax.experimental.pallas.ops.gpu.attention.BlockSizes):
    block_q x block_k for the forward; the backward's dK/dV loop takes block_kv_dkv keys against
    block_q_dkv queries at a time, its dQ loop block_q_dq queries against block_kv_dq keys (the kernel
    needs block_q_dq == block_kv_dkv). num_warps None: Pallas' heuristic. Tiles change the order of
    the float32 sums inside a tile, never the function: any choice is exact and bitwise repeatable."""

    block_q: int = 128
    block_k: int = 128
    block_q_dkv: int = 32
    block_kv_dkv: int = 32
    block_q_dq: int = 32
    block_kv_dq: int = 32
    num_warps: int | None = None
    num_stages: int = 2

    @classmethod
    def parse(cls, text: str) -> "PallasTiles":
        """From "bq,bk,bq_dkv,bkv_dkv,bq_dq,bkv_dq[,warps[,stages]]" (benchmarks' sweeps)."""
        values = [int(v) for v in text.split(",")]
        if len(values) == 7:
            values.append(2)
        if len(values) != 8 and len(values) != 6:
            raise ValueError(f"pallas tiles {text!r}: want 6 to 8 comma-separated integers")
        return cls(*values[:6], *(values[6:] or [None, 2]))

    def describe(self) -> str:
        return ",".join(str(v) for v in dataclasses.astuple(self))


# Measured on an H200 (docs/BENCHMARKS.md, "Deterministic attention and embedding gradient"): forward+
# backward of [64,512,6,64] 0.393 ms with these tiles against 0.584 ms with Pallas' defaults
# (128,128,32,32,32,32) and 0.371 ms for cuDNN; [32,1024,12,64] 1.126 vs 1.967 ms (cuDNN 0.805 ms).
PALLAS_TILES = PallasTiles(block_q=128, block_k=128, block_q_dkv=64, block_kv_dkv=128, block_q_dq=128,
                           block_kv_dq=64)


def _pallas_attention(q, k, v, scale: float, interpret: bool = False, tiles: PallasTiles | None = None):
    """Pallas' Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha): its backward
    computes dK/dV and dQ in separate loops, without atomics, so it is bitwise repeatable. It wants one
    head count: GQA's k/v heads are repeated (their gradient is a sum over the copies)."""
    from jax.experimental.pallas.ops.gpu.attention import BlockSizes, mha

    t = tiles or PALLAS_TILES
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = (jnp.repeat(a, groups, axis=2) for a in (k, v))
    blocks = BlockSizes(block_q=t.block_q, block_k=t.block_k, block_q_dkv=t.block_q_dkv,
                        block_kv_dkv=t.block_kv_dkv, block_q_dq=t.block_q_dq, block_kv_dq=t.block_kv_dq)
    return mha(q, k, v, segment_ids=None, sm_scale=scale, causal=True, block_sizes=blocks,
               num_warps=t.num_warps, num_stages=t.num_stages, interpret=interpret)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                     cfg: ModelConfig) -> jax.Array:
    """q [B,T,N,H], k/v [B,T,K,H] (K divides N) -> [B,T,N,H] with a causal mask.

    For cuDNN and Pallas, T is zero-padded at the end (`padding_for`) and the output sliced back: exact,
    since under the causal mask no real query attends to a padded key."""
    impl = attention_implementation(cfg, q.dtype)
    T = q.shape[1]
    pad = padding_for(impl, T)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    if impl == "pallas":
        if not on_gpu():
            raise ValueError("model.attention_impl=pallas needs a GPU (Pallas' Triton kernel); use auto or xla")
        out = _pallas_attention(q, k, v, scale)
    else:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation=impl)
    return out[:, :T] if pad else out


class Attention(nnx.Module):
    @staticmethod
    def cache_elements_per_token(cfg: ModelConfig) -> int:
        """KV-cache elements per token and layer: keys and values of every kv head."""
        return 2 * cfg.resolved_kv_heads * cfg.resolved_head_dim

    @staticmethod
    def core_dims(cfg: ModelConfig) -> tuple[int, int]:
        """(query/key head dim, value head dim) of the attention core."""
        return cfg.resolved_head_dim, cfg.resolved_head_dim

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8: FP8Config | None = None):
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim
        d = cfg.d_model
        self.q = Linear(d, self.n_heads * self.head_dim, cfg=cfg, rngs=rngs, fp8=fp8)
        self.k = Linear(d, self.n_kv * self.head_dim, cfg=cfg, rngs=rngs, fp8=fp8)
        self.v = Linear(d, self.n_kv * self.head_dim, cfg=cfg, rngs=rngs, fp8=fp8)
        self.o = Linear(self.n_heads * self.head_dim, d, cfg=cfg, rngs=rngs, fp8=fp8,
                        std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        self.kv_quant = None  # KVQuant | None (efftrain.quant.kvcache): fake-quantized cache entries

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        q, k, v = apply_shared_input((self.q, self.k, self.v), x)
        q = rearrange(q, "b t (n h) -> b t n h", n=self.n_heads)
        k = rearrange(k, "b t (n h) -> b t n h", n=self.n_kv)
        v = rearrange(v, "b t (n h) -> b t n h", n=self.n_kv)
        theta = self.cfg.rope_theta
        q, k = apply_rope(q, positions, theta), apply_rope(k, positions, theta)
        if self.kv_quant is not None:  # what a KV cache stores: rotated keys and values, per kv head
            k, v = self.kv_quant(k), self.kv_quant(v)
        out = causal_attention(q, k, v, scale=self.head_dim ** -0.5, cfg=self.cfg)
        return self.o(rearrange(out, "b t n h -> b t (n h)"))
