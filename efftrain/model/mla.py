"""Multi-head latent attention (MLA): DeepSeek-V2 (arXiv 2405.04434) §2.1, DeepSeek-V3 §2.1.1 eqs. 1–11.

Keys and values are rebuilt from one low-rank latent per token, so at inference only that latent (plus one
small decoupled RoPE key) is cached. For an input h_t [D], n heads, latent rank d_c = kv_lora_rank,
d_h = qk_nope_head_dim, d_r = qk_rope_head_dim, d_v = v_head_dim:

    c_kv_t     = RMSNorm(W_dkv h_t)                          (eq. 1; the norm is the reference's kv_norm)
    k_nope_t,i = W_uk,i c_kv_t                    [d_h]      (eq. 2, per head i)
    k_rope_t   = RoPE(W_kr h_t)                   [d_r]      (eq. 3; ONE key shared by all heads)
    k_t,i      = [k_nope_t,i ; k_rope_t]                     (eq. 4)
    v_t,i      = W_uv,i c_kv_t                    [d_v]      (eq. 5)
    c_q_t      = RMSNorm(W_dq h_t)   if q_lora_rank > 0, else c_q_t = h_t      (eq. 6)
    q_nope_t,i = W_uq,i c_q_t,  q_rope_t,i = RoPE(W_qr,i c_q_t),  q_t,i = [q_nope ; q_rope]  (eqs. 7–9)
    o_t,i      = Σ_{j<=t} softmax_j(q_t,i · k_j,i / sqrt(d_h + d_r)) v_j,i                    (eq. 10)
    u_t        = W_o [o_t,1 ; ... ; o_t,n]                                                    (eq. 11)

Parameters (all `Linear`, so FP8 simulation and PTQ see every projection), following the reference
implementation (DeepSeek-V3 `inference/model.py`: wq_a/q_norm/wq_b, wkv_a/kv_norm/wkv_b, wo):
    q            D -> n·(d_h+d_r)                     (q_lora_rank == 0; W_uq and W_qr fused)
    q_down       D -> q_lora_rank  (W_dq), q_norm, q_up  q_lora_rank -> n·(d_h+d_r)
    kv_down      D -> d_c + d_r   (W_dkv and W_kr fused), kv_norm on the first d_c outputs
    kv_up        d_c -> n·(d_h+d_v) (W_uk and W_uv fused; per head the first d_h columns are W_uk,i)
    o            n·d_v -> D
RoPE uses the "half" rotation layout of `layers.apply_rope` (the reference rotates interleaved pairs; the
two are a fixed permutation of the RoPE dims apart, which a learned projection absorbs).

Two execution paths, equal up to float rounding (tested):
  * `__call__` (training / prefill): materialise k, v per head and run `causal_attention`
    (jax.nn.dot_product_attention). It needs one head dim for q, k and v: when d_v != d_h + d_r the
    smaller side is zero-padded (v with zero columns, or q and k with zero columns, which leaves q·k and
    therefore the scores unchanged since the scale is passed explicitly) and the output is sliced back to
    d_v. Both are exact.
  * `decode` (inference, V2 §2.1.2 "absorb W_UK into W_UQ and W_UV into W_O"): the cache holds only the
    normalised latent c_kv [B,S,d_c] and the rotated shared key k_rope [B,S,d_r]. Since
    q_nope,i · k_nope_j,i = (W_uk,iᵀ q_nope,i) · c_kv_j, scores are computed in latent space,
        s_t,j,i = (q_lat_t,i · c_kv_j + q_rope_t,i · k_rope_j) / sqrt(d_h + d_r),  q_lat_t,i = W_uk,iᵀ q_nope_t,i,
    the latent is averaged with the softmax weights, o_lat_t,i = Σ_j p_t,j,i c_kv_j, and only then
    mapped up per head, o_t,i = W_uv,i o_lat_t,i, and through W_o. Decode multiplies the stored `kv_up`
    kernel directly (the absorbed matmuls have no Linear of their own), so it sees PTQ-quantised weights
    but no FP8 GEMM simulation.
Cache elements per token and layer: d_c + d_r (`mla_cache_elements_per_token`), against 2·n·head_dim for MHA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from efftrain.config import FP8Config, ModelConfig
from efftrain.model.attention import causal_attention
from efftrain.model.layers import Linear, RMSNorm, apply_rope, dtype_of


def mla_cache_elements_per_token(cfg: ModelConfig) -> int:
    """Cached elements per token per layer: the latent c_kv plus the shared RoPE key."""
    return cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim


def mla_param_count(cfg: ModelConfig) -> int:
    """Parameters of one MLAttention (projections + RMSNorm scales)."""
    m, d, n = cfg.mla, cfg.d_model, cfg.n_heads
    d_qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    if m.q_lora_rank > 0:
        q = d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * d_qk
    else:
        q = d * n * d_qk
    kv = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank + m.kv_lora_rank * n * (
        m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + n * m.v_head_dim * d


def _pad_last(x: jax.Array, size: int) -> jax.Array:
    extra = size - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class MLAttention(nnx.Module):
    @staticmethod
    def cache_elements_per_token(cfg: ModelConfig) -> int:
        return mla_cache_elements_per_token(cfg)

    @staticmethod
    def core_dims(cfg: ModelConfig) -> tuple[int, int]:
        """(query/key head dim incl. the RoPE part, value head dim) of the attention core."""
        return cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8: FP8Config | None = None):
        self.cfg = cfg
        m = cfg.mla
        d, n = cfg.d_model, cfg.n_heads
        self.n_heads = n
        self.kv_lora_rank, self.nope_dim, self.rope_dim, self.v_dim = (
            m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim)
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = self.qk_dim ** -0.5
        if m.q_lora_rank > 0:
            self.q = None
            self.q_down = Linear(d, m.q_lora_rank, cfg=cfg, rngs=rngs, fp8=fp8)
            self.q_norm = RMSNorm(m.q_lora_rank, cfg=cfg)
            self.q_up = Linear(m.q_lora_rank, n * self.qk_dim, cfg=cfg, rngs=rngs, fp8=fp8)
        else:
            self.q = Linear(d, n * self.qk_dim, cfg=cfg, rngs=rngs, fp8=fp8)
            self.q_down = self.q_norm = self.q_up = None
        self.kv_down = Linear(d, self.kv_lora_rank + self.rope_dim, cfg=cfg, rngs=rngs, fp8=fp8)
        self.kv_norm = RMSNorm(self.kv_lora_rank, cfg=cfg)
        self.kv_up = Linear(self.kv_lora_rank, n * (self.nope_dim + self.v_dim), cfg=cfg, rngs=rngs, fp8=fp8)
        self.o = Linear(n * self.v_dim, d, cfg=cfg, rngs=rngs, fp8=fp8,
                        std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        self.kv_quant = None  # KVQuant | None (efftrain.quant.kvcache): fake-quantized c_kv and k_rope

    # -- shared projections ---------------------------------------------------------------------
    def queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,T,D] -> q_nope [B,T,n,d_h], q_rope [B,T,n,d_r] (rotated)."""
        q = self.q(x) if self.q is not None else self.q_up(self.q_norm(self.q_down(x)))
        q = rearrange(q, "b t (n h) -> b t n h", n=self.n_heads)
        q_nope, q_rope = q[..., : self.nope_dim], q[..., self.nope_dim:]
        return q_nope, apply_rope(q_rope, positions, self.cfg.rope_theta)

    def latents(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B,T,D] -> what the cache stores: c_kv [B,T,d_c] (normalised), k_rope [B,T,d_r] (rotated)."""
        kv = self.kv_down(x)
        c_kv = self.kv_norm(kv[..., : self.kv_lora_rank])
        k_rope = apply_rope(kv[..., None, self.kv_lora_rank:], positions, self.cfg.rope_theta)[..., 0, :]
        if self.kv_quant is not None:  # quantized here, so that __call__ and decode both read the cache
            c_kv, k_rope = self.kv_quant(c_kv), self.kv_quant(k_rope)  # each with its own scales
        return c_kv, k_rope

    def keys_values(self, c_kv: jax.Array, k_rope: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Naive up-projection: k [B,T,n,d_h+d_r] (k_rope broadcast to every head), v [B,T,n,d_v]."""
        kv = rearrange(self.kv_up(c_kv), "b t (n h) -> b t n h", n=self.n_heads)
        k_nope, v = kv[..., : self.nope_dim], kv[..., self.nope_dim:]
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:-1] + (self.rope_dim,))
        return jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], axis=-1), v

    # -- training / full path -------------------------------------------------------------------
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        q_nope, q_rope = self.queries(x, positions)
        k, v = self.keys_values(*self.latents(x, positions))
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        width = max(self.qk_dim, self.v_dim)  # dot_product_attention wants one head dim: zero-pad
        out = causal_attention(_pad_last(q, width), _pad_last(k, width), _pad_last(v, width),
                               scale=self.scale, cfg=self.cfg)[..., : self.v_dim]
        return self.o(rearrange(out, "b t n h -> b t (n h)"))

    # -- absorbed inference path ----------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        """Empty cache: only the latent c_kv and the shared RoPE key, plus the filled length."""
        dtype = dtype_of(self.cfg.compute_dtype) if dtype is None else dtype
        return {
            "c_kv": jnp.zeros((batch, max_len, self.kv_lora_rank), dtype),
            "k_rope": jnp.zeros((batch, max_len, self.rope_dim), dtype),
            "length": jnp.zeros((), jnp.int32),
        }

    def decode(self, x: jax.Array, cache: dict, positions: jax.Array) -> tuple[jax.Array, dict]:
        """Append x [B,t,D] (t >= 1, at cache slots length..length+t-1) and attend in latent space.

        Returns y [B,t,D] and the updated cache. One length for the whole batch; slot j of the cache is
        visible to new token i iff j <= length + i. `positions` [B,t] only feed RoPE.
        """
        t = x.shape[1]
        start = cache["length"]
        c_new, kr_new = self.latents(x, positions)
        c_kv = jax.lax.dynamic_update_slice_in_dim(cache["c_kv"], c_new.astype(cache["c_kv"].dtype), start, 1)
        k_rope = jax.lax.dynamic_update_slice_in_dim(
            cache["k_rope"], kr_new.astype(cache["k_rope"].dtype), start, 1)
        new_cache = {"c_kv": c_kv, "k_rope": k_rope, "length": start + t}

        q_nope, q_rope = self.queries(x, positions)
        dtype = q_nope.dtype
        w_up = rearrange(self.kv_up.kernel[...].astype(dtype), "r (n h) -> r n h", n=self.n_heads)
        w_uk, w_uv = w_up[..., : self.nope_dim], w_up[..., self.nope_dim:]  # [d_c,n,d_h], [d_c,n,d_v]
        q_lat = jnp.einsum("btnh,rnh->btnr", q_nope, w_uk)  # absorb W_uk into the query
        scores = (jnp.einsum("btnr,bsr->btns", q_lat, c_kv.astype(dtype))
                  + jnp.einsum("btnh,bsh->btns", q_rope, k_rope.astype(dtype))).astype(jnp.float32)
        slots = jnp.arange(c_kv.shape[1])
        visible = slots[None, :] <= (start + jnp.arange(t))[:, None]  # [t, S]
        scores = jnp.where(visible[None, :, None, :], scores * self.scale, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        o_lat = jnp.einsum("btns,bsr->btnr", probs, c_kv.astype(dtype))
        out = jnp.einsum("btnr,rnv->btnv", o_lat, w_uv)  # W_uv applied after the average
        return self.o(rearrange(out, "b t n v -> b t (n v)")), new_cache
