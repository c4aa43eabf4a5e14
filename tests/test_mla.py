"""Multi-head latent attention: shapes, absorbed decoding == full forward, causality, cache contents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.model.block import kv_cache_bytes_per_token
from efftrain.model.mla import MLAttention, mla_cache_elements_per_token, mla_param_count
from efftrain.model.transformer import build_model

B, T, D = 2, 16, 64


def model_cfg(**mla):
    base = {"q_lora_rank": 0, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
            "v_head_dim": 16}
    base.update(mla)
    return from_dict({
        "model": {"vocab_size": 256, "d_model": D, "n_layers": 2, "n_heads": 4, "mlp_hidden": 128,
                  "compute_dtype": "float32", "attention": "mla", "mla": base},
        "data": {"seq_len": T}, "train": {"max_steps": 1},
    }).model


def make(seed=0, **mla):
    cfg = model_cfg(**mla)
    return cfg, MLAttention(cfg, rngs=nnx.Rngs(params=seed))


def inputs(seed=1):
    x = jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)
    return x, jnp.broadcast_to(jnp.arange(T), (B, T))


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_shapes_and_param_count(q_lora_rank):
    cfg, attn = make(q_lora_rank=q_lora_rank)
    x, pos = inputs()
    assert attn(x, pos).shape == (B, T, D)
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(attn, nnx.Param)))
    assert n_params == mla_param_count(cfg)
    assert (attn.q is None) == (q_lora_rank > 0)
    assert attn.kv_down.kernel.shape == (D, 32 + 8)  # W_dkv and W_kr fused
    assert attn.kv_up.kernel.shape == (32, 4 * (16 + 16))


# v_head_dim < qk dim (pad v), == qk dim, > qk dim (pad q and k)
@pytest.mark.parametrize("q_lora_rank,v_head_dim", [(0, 16), (24, 16), (0, 24), (24, 40)])
def test_absorbed_decode_matches_full_forward(q_lora_rank, v_head_dim):
    cfg, attn = make(q_lora_rank=q_lora_rank, v_head_dim=v_head_dim)
    x, pos = inputs()
    full = attn(x, pos)

    decode = nnx.jit(lambda m, xt, c, p: m.decode(xt, c, p))
    # prefill of 5 tokens, then one token at a time
    cache = attn.init_cache(B, T, jnp.float32)
    outs = []
    y, cache = decode(attn, x[:, :5], cache, pos[:, :5])
    outs.append(y)
    for t in range(5, T):
        y, cache = decode(attn, x[:, t:t + 1], cache, pos[:, t:t + 1])
        outs.append(y)
    inc = jnp.concatenate(outs, axis=1)
    assert int(cache["length"]) == T
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(np.asarray(inc), np.asarray(full), rtol=1e-5, atol=1e-5 * scale)


def test_causal():
    _, attn = make(q_lora_rank=24)
    x, pos = inputs()
    y = attn(x, pos)
    x2 = x.at[:, 9].add(3.0)
    y2 = attn(x2, pos)
    np.testing.assert_array_equal(np.asarray(y[:, :9]), np.asarray(y2[:, :9]))
    assert not np.allclose(np.asarray(y[:, 9:]), np.asarray(y2[:, 9:]))


def test_rope_key_shared_across_heads():
    _, attn = make()
    x, pos = inputs()
    c_kv, k_rope = attn.latents(x, pos)
    assert c_kv.shape == (B, T, 32) and k_rope.shape == (B, T, 8)  # one RoPE key per position
    k, v = attn.keys_values(c_kv, k_rope)
    assert k.shape == (B, T, 4, 16 + 8) and v.shape == (B, T, 4, 16)
    for head in range(4):
        np.testing.assert_array_equal(np.asarray(k[:, :, head, 16:]), np.asarray(k_rope))
    # the per-head non-RoPE keys differ (each head has its own W_uk)
    assert not np.allclose(np.asarray(k[:, :, 0, :16]), np.asarray(k[:, :, 1, :16]))


def test_rope_key_is_rotated_by_position():
    _, attn = make()
    x, pos = inputs()
    same = jnp.broadcast_to(x[:, :1], x.shape)  # same token at every position
    c_kv, k_rope = attn.latents(same, pos)
    np.testing.assert_allclose(np.asarray(c_kv[:, 0]), np.asarray(c_kv[:, 5]), rtol=1e-6)
    assert not np.allclose(np.asarray(k_rope[:, 0]), np.asarray(k_rope[:, 5]))
    # rotation preserves the norm
    np.testing.assert_allclose(np.linalg.norm(k_rope[:, 0], axis=-1), np.linalg.norm(k_rope[:, 5], axis=-1),
                               rtol=1e-5)


def test_cache_holds_only_latent_and_rope():
    cfg, attn = make()
    cache = attn.init_cache(3, 10, jnp.bfloat16)
    assert set(cache) == {"c_kv", "k_rope", "length"}
    assert cache["c_kv"].shape == (3, 10, 32) and cache["k_rope"].shape == (3, 10, 8)
    assert cache["c_kv"].dtype == jnp.bfloat16
    per_token = (cache["c_kv"].size + cache["k_rope"].size) // (3 * 10)
    assert per_token == mla_cache_elements_per_token(cfg) == 32 + 8


def test_grads_finite():
    _, attn = make(q_lora_rank=24)
    x, pos = inputs()
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, pos) ** 2)))(attn)  # (eagerly: ~200 small compiles)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert all(np.max(np.abs(g)) > 0 for g in leaves)  # every projection gets a gradient


def test_transformer_with_mla_forward_backward():
    cfg = model_cfg(q_lora_rank=24)
    model = build_model(cfg)
    assert isinstance(model.blocks[0].attn, MLAttention)
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)

    def loss(m):
        logits = m(tokens[:, :-1]).logits
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)  # (eagerly: ~200 small compiles)
    assert np.isfinite(float(value)) and abs(float(value) - np.log(cfg.vocab_size)) < 0.5
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["blocks"][0]["attn"]["kv_up"]["kernel"][...]).max()) > 0


def test_kv_cache_bytes_mha_gqa_mla():
    mla = model_cfg()
    mha = mla.model_copy(update={"attention": "mha"})
    gqa = mla.model_copy(update={"attention": "mha", "n_kv_heads": 2})
    assert kv_cache_bytes_per_token(mha) == 2 * 4 * 16 * 2  # k and v, 4 heads of 16, bf16
    assert kv_cache_bytes_per_token(gqa) == 2 * 2 * 16 * 2
    assert kv_cache_bytes_per_token(mla) == (32 + 8) * 2
    assert kv_cache_bytes_per_token(mla, bytes_per_element=1) == 32 + 8
