"""The dense transformer: shapes, parameter counts, attention numerics, RoPE, accounting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.model.attention import Attention
from efftrain.model.block import kv_cache_bytes_per_token
from efftrain.model.layers import RMSNorm, apply_rope, cross_entropy
from efftrain.model.transformer import build_model, flops_per_token, parameter_counts


# the models run jitted, as in training and eval (eagerly, every primitive compiles on its own)
forward = nnx.jit(lambda model, tokens: model(tokens))


def cfg_of(**model):
    base = {"vocab_size": 128, "d_model": 32, "n_layers": 2, "n_heads": 4, "mlp_hidden": 48,
            "compute_dtype": "float32"}
    return from_dict({"model": {**base, **model}, "train": {"max_steps": 1}})


def test_shapes_and_param_counts_match_closed_form():
    cfg = cfg_of()
    model = build_model(cfg.model)
    out = forward(model, jnp.zeros((3, 10), jnp.int32))
    assert out.logits.shape == (3, 10, 128) and out.logits.dtype == jnp.float32
    assert out.hidden.shape == (3, 10, 32) and out.moe == {}
    d, f, v, L = 32, 48, 128, 2
    per_layer = 4 * d * d + 3 * d * f + 2 * d
    counts = parameter_counts(model)
    assert counts["embedding"] == v * d
    assert counts["total"] == v * d + L * per_layer + d + d * v
    assert counts["non_embedding"] == counts["total"] - v * d == counts["active"] - v * d
    tied = parameter_counts(build_model(cfg_of(tie_embeddings=True).model))
    assert tied["total"] == counts["total"] - d * v


def test_gqa_shares_kv_heads_and_shrinks_cache():
    mha, gqa = cfg_of(), cfg_of(n_kv_heads=2)
    m = build_model(gqa.model)
    assert m.blocks[0].attn.k.kernel[...].shape == (32, 2 * 8)
    assert kv_cache_bytes_per_token(gqa.model) * 2 == kv_cache_bytes_per_token(mha.model) == 2 * 4 * 8 * 2


def naive_attention(x, attn: Attention, cfg):
    """float64 numpy reference: per-head softmax(q k^T / sqrt(d)) v with a causal mask, GQA by repeat."""
    x = np.asarray(x, np.float64)
    T = x.shape[1]
    pos = jnp.broadcast_to(jnp.arange(T), x.shape[:2])
    n, kv, hd = attn.n_heads, attn.n_kv, attn.head_dim
    q = np.asarray(apply_rope(jnp.asarray(x @ np.asarray(attn.q.kernel[...])).reshape(*x.shape[:2], n, hd), pos, cfg.rope_theta), np.float64)
    k = np.asarray(apply_rope(jnp.asarray(x @ np.asarray(attn.k.kernel[...])).reshape(*x.shape[:2], kv, hd), pos, cfg.rope_theta), np.float64)
    v = (x @ np.asarray(attn.v.kernel[...], np.float64)).reshape(*x.shape[:2], kv, hd)
    k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", p, v).reshape(*x.shape[:2], n * hd)
    return o @ np.asarray(attn.o.kernel[...], np.float64)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_matches_float64_reference(kv_heads):
    cfg = cfg_of(n_kv_heads=kv_heads).model
    attn = Attention(cfg, rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 32))
    y = nnx.jit(lambda m, x: m(x, jnp.broadcast_to(jnp.arange(9), (2, 9))))(attn, x)
    np.testing.assert_allclose(np.asarray(y), naive_attention(x, attn, cfg), rtol=2e-4, atol=1e-6)


def test_model_is_causal():
    model = build_model(cfg_of().model)
    a = jnp.array([[5, 6, 7, 8, 9, 10]])
    b = a.at[0, 4].set(99)
    la, lb = forward(model, a).logits, forward(model, b).logits
    np.testing.assert_array_equal(la[0, :4], lb[0, :4])
    assert not np.allclose(la[0, 4], lb[0, 4])


def test_rope_is_a_rotation_with_relative_positions():
    x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    pos = jnp.arange(4)[None]
    y = apply_rope(x, pos, 10000.0)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    q, k = x[:, :1], x[:, 1:2]
    dots = [float(jnp.sum(apply_rope(q, jnp.array([[p]]), 1e4) * apply_rope(k, jnp.array([[p + 3]]), 1e4)))
            for p in (0, 5, 11)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)  # depends only on the offset


def test_rmsnorm_and_cross_entropy_against_numpy():
    cfg = cfg_of().model
    norm = RMSNorm(32, cfg=cfg)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + cfg.norm_eps)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), ref, rtol=1e-5)
    logits = np.random.default_rng(1).standard_normal((4, 10))
    targets = np.array([1, 2, 3, 9])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(targets))) == pytest.approx(
        -logp[np.arange(4), targets].mean(), rel=1e-6)


def test_bf16_compute_keeps_fp32_params_and_stays_close():
    f32 = build_model(cfg_of().model)
    b16 = build_model(cfg_of(compute_dtype="bfloat16").model)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(b16, nnx.Param)))
    tokens = jnp.arange(12).reshape(2, 6)
    np.testing.assert_allclose(forward(b16, tokens).logits, forward(f32, tokens).logits, atol=3e-2)


def test_flops_per_token_convention():
    cfg = cfg_of()
    model = build_model(cfg.model)
    counts = parameter_counts(model)
    T = 64
    assert flops_per_token(model, T) == 6 * counts["non_embedding"] + 12 * cfg.model.n_layers * T * cfg.model.d_model


def test_cudnn_path_pads_odd_sequence_lengths_exactly(monkeypatch):
    """cuDNN flash attention needs T % 64 == 0 (MTP runs on T - k): the padded call equals the plain one."""
    from efftrain.model import attention

    cfg = cfg_of().model
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 37, 4, 8)) for i in range(3))
    attend = lambda q, k, v: attention.causal_attention(q, k, v, scale=0.3, cfg=cfg)  # noqa: E731
    plain = jax.jit(attend)(q, k, v)
    seen = []
    real = jax.nn.dot_product_attention

    def fake_cudnn(q, k, v, *, implementation, **kw):
        seen.append(q.shape[1])
        return real(q, k, v, implementation="xla", **kw)

    monkeypatch.setattr(attention, "attention_implementation", lambda cfg, dtype: "cudnn")
    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    padded = jax.jit(lambda q, k, v: attend(q, k, v))(q, k, v)  # a new function: traced anew
    assert seen == [64]
    np.testing.assert_allclose(padded, plain, rtol=1e-6, atol=1e-7)
