"""KV-cache quantization (efftrain.quant.kvcache): grids against float64 / ml_dtypes references, the parallel
forward against decoding with a quantized cache (MHA reference loop, MLA absorbed decode), bytes per token."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.model.attention import Attention
from efftrain.model.layers import apply_rope
from efftrain.model.mla import MLAttention
from efftrain.model.transformer import build_model
from efftrain.quant.kvcache import KVQuant, kv_bytes_per_token, kv_bytes_per_token_per_layer, set_kv_quant

B, T, D = 2, 12, 64


def model_cfg(attention="mha", n_layers=2, **model):
    """MHA: 4 heads, GQA with 2 kv heads of 16; MLA: d_c 32, d_r 8."""
    raw = {"vocab_size": 256, "d_model": D, "n_layers": n_layers, "n_heads": 4, "mlp_hidden": 128,
           "compute_dtype": "float32", "init_std": 0.08, "attention": attention}
    if attention == "mla":
        raw["mla"] = {"q_lora_rank": 0, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                      "v_head_dim": 16}
    else:
        raw["n_kv_heads"] = 2
    raw.update(model)
    return from_dict({"model": raw, "data": {"seq_len": T}, "train": {"max_steps": 1}}).model


@pytest.fixture(scope="module")
def models():
    """One tiny MHA and one tiny MLA Transformer (2 layers), shared: tests leave kv_quant None."""
    return {attention: build_model(model_cfg(attention)) for attention in ("mha", "mla")}


def inputs(seed=1):
    x = jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float32)
    return x, jnp.broadcast_to(jnp.arange(T), (B, T))


def heavy_tailed(shape, seed=0):
    """Cache-like vectors with outliers, and one all-zero vector."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * np.exp(rng.standard_normal(shape))
    x[0, 0] = 0.0
    return x.astype(np.float32)


def f16_up(s):
    """float64 scales rounded up to the float16 grid, clamped to [2^-24, 65504] (independent of jax)."""
    s = np.clip(s, 2.0**-24, 65504.0)
    h = s.astype(np.float16)
    h = np.where(h.astype(np.float64) < s, np.nextafter(h, np.float16(np.inf)), h)
    return h.astype(np.float64)


def grouped(x, g):
    return x.astype(np.float64).reshape(*x.shape[:-1], x.shape[-1] // g, g)


# -- the grids --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("granularity", ["token", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_matches_float64_reference(kind, granularity, symmetric):
    kvq = KVQuant(kind, granularity, group=8, symmetric=symmetric)
    x = heavy_tailed((3, 5, 2, 32))
    g = 32 if granularity == "token" else 8
    xg, maxq = grouped(x, g), 2 ** kvq.bits - 1
    if symmetric:
        amax = np.max(np.abs(xg), axis=-1, keepdims=True)
        s = f16_up(2 * np.where(amax == 0, 1.0, amax) / maxq)
        z = np.full_like(s, 2 ** (kvq.bits - 1))
    else:
        lo, hi = np.minimum(xg.min(-1, keepdims=True), 0), np.maximum(xg.max(-1, keepdims=True), 0)
        empty = (lo == 0) & (hi == 0)
        lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
        s = f16_up((hi - lo) / maxq)
        z = np.round(-lo / s)
    ratio = xg / s
    codes = np.clip(np.round(ratio) + z, 0, maxq)  # numpy rounds half to even
    want = s * (codes - z)

    q = kvq.encode(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(q.scale), s)
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5  # float32 vs float64 x/s may differ there
    assert near_tie.mean() < 1e-3
    got_codes = np.asarray(q.codes)
    np.testing.assert_array_equal(got_codes[~near_tie], codes[~near_tie])
    assert np.all(np.abs(got_codes - codes) <= 1)
    got = np.asarray(kvq(jnp.asarray(x))).reshape(want.shape)
    np.testing.assert_array_equal(got[~near_tie], want[~near_tie])  # s·(q − z) is exact in float32
    assert np.all(got[0, 0] == 0)
    # the worst error is half a step, s/2, also at the clipped extremes
    assert np.all(np.abs(got - xg) <= s / 2 * (1 + 1e-6))


@pytest.mark.parametrize("granularity", ["token", "group"])
def test_fp8_matches_ml_dtypes(granularity):
    kvq = KVQuant("fp8", granularity, group=8)
    x = heavy_tailed((4, 6, 32), seed=3)
    g = 32 if granularity == "token" else 8
    xg = grouped(x, g)
    amax = np.max(np.abs(xg), axis=-1, keepdims=True)
    s = np.where(amax == 0, 1.0, f16_up(amax / 448.0))
    q = kvq.encode(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(q.scale), s)  # the same scales ...
    s32 = s.astype(np.float32)
    ref = (xg.astype(np.float32) / s32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.codes), ref)  # ... and ml_dtypes' E4M3 rounding
    got = np.asarray(kvq(jnp.asarray(x)))
    np.testing.assert_array_equal(got, (ref * s32).reshape(x.shape))
    assert np.max(np.abs(ref)) <= 448  # scales rounded up: nothing saturates
    # a bfloat16 cache: the same values, rounded to bfloat16 after dequantizing
    xb = jnp.asarray(x, jnp.bfloat16)
    yb = kvq(xb)
    assert yb.dtype == jnp.bfloat16 and yb.shape == x.shape
    np.testing.assert_array_equal(np.asarray(yb), np.asarray(kvq(xb.astype(jnp.float32)).astype(jnp.bfloat16)))


def test_labels_and_validation(models):
    assert KVQuant("int8").label == "kv-int8"
    assert KVQuant("int4", "group", 64).label == "kv-int4-g64"
    assert KVQuant("fp8").label == "kv-fp8"
    assert KVQuant("int4", "group", 32, symmetric=False).label == "kv-int4-g32-asym"
    assert hash(KVQuant("int8")) == hash(KVQuant("int8"))
    for bad in [dict(kind="int3"), dict(kind="int8", granularity="channel"), dict(kind="int8", group=0),
                dict(kind="int8", group=True), dict(kind="int8", group=8.0), dict(kind="fp8", symmetric=False)]:
        with pytest.raises(ValueError):
            KVQuant(**bad)
    with pytest.raises(ValueError, match="does not divide"):
        KVQuant("int4", "group", 12)(jnp.ones((2, 16)))
    mla = model_cfg("mla")  # d_c 32, d_r 8: group 16 divides c_kv but not k_rope
    with pytest.raises(ValueError, match="k_rope"):
        kv_bytes_per_token(mla, KVQuant("int4", "group", 16))
    with pytest.raises(ValueError, match="does not divide"):
        set_kv_quant(models["mla"], KVQuant("int8", "group", 16))
    with pytest.raises(TypeError):
        set_kv_quant(models["mha"], "int8")
    assert all(block.attn.kv_quant is None for m in models.values() for block in m.blocks)


# -- bytes per token ---------------------------------------------------------------------------------
def test_bytes_per_token_by_hand():
    mha = model_cfg("mha", n_layers=3)  # 2 kv heads x 16 dims: 4 cached vectors, 64 elements per layer
    assert kv_bytes_per_token(mha, None) == 3 * 64 * 2
    assert kv_bytes_per_token_per_layer(mha, KVQuant("int8")) == 64 + 4 * 2
    assert kv_bytes_per_token(mha, KVQuant("int8")) == 3 * 72
    assert kv_bytes_per_token(mha, KVQuant("fp8")) == 3 * 72
    assert kv_bytes_per_token(mha, KVQuant("int4", "group", 8)) == 3 * (32 + 8 * 2)
    assert kv_bytes_per_token(mha, KVQuant("int4", "group", 8, symmetric=False)) == 3 * (32 + 8 * 2 * 2)
    mla = model_cfg("mla", n_layers=2)  # c_kv 32 + k_rope 8 = 40 elements per layer
    assert kv_bytes_per_token(mla, None) == 2 * 40 * 2
    assert kv_bytes_per_token(mla, KVQuant("int8")) == 2 * (40 + 2 * 2)
    assert kv_bytes_per_token(mla, KVQuant("int4")) == 2 * (20 + 2 * 2)
    assert kv_bytes_per_token(mla, KVQuant("int4", "group", 8)) == 2 * (20 + (4 + 1) * 2)
    assert kv_bytes_per_token(mla, KVQuant("fp8", "group", 4)) == 2 * (40 + (8 + 2) * 2)


# -- the model: static attribute, None is a no-op, int4 hurts more than int8 --------------------------
def next_token_loss(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_none_is_bitwise_and_int4_hurts_more(attention, models):
    model = models[attention]
    tokens = jax.random.randint(jax.random.key(5), (B, T), 0, 256)
    forward = nnx.jit(lambda m, t: m(t).logits)  # kv_quant is static: a change must retrace
    graphdef = nnx.graphdef(model)
    base = forward(model, tokens)
    loss16 = float(next_token_loss(base, tokens))
    delta, kl = {}, {}
    for kvq in [KVQuant("int8"), KVQuant("int4"), KVQuant("fp8")]:
        assert set_kv_quant(model, kvq) == 2
        assert all(block.attn.kv_quant == kvq for block in model.blocks)
        logits = forward(model, tokens)
        delta[kvq.kind] = abs(float(next_token_loss(logits, tokens)) - loss16)
        p = jax.nn.log_softmax(base)
        kl[kvq.kind] = float(jnp.mean(jnp.sum(jnp.exp(p) * (p - jax.nn.log_softmax(logits)), -1)))
    assert 0 < delta["int8"] < delta["int4"]
    assert 0 < kl["int8"] < kl["fp8"] < kl["int4"]
    assert set_kv_quant(model, None) == 2
    assert nnx.graphdef(model) == graphdef
    np.testing.assert_array_equal(np.asarray(forward(model, tokens)), np.asarray(base))


# -- parallel forward == decoding with a quantized cache -----------------------------------------------
KV_QUANTS = [KVQuant("int4", "group", 8), KVQuant("fp8"), KVQuant("int8", "token", symmetric=False)]


@pytest.mark.parametrize("kvq", KV_QUANTS, ids=lambda q: q.label)
def test_mha_forward_equals_decode_over_quantized_cache(kvq):
    cfg = model_cfg("mha")
    attn = Attention(cfg, rngs=nnx.Rngs(params=0))
    x, pos = inputs()
    n, n_kv, h = attn.n_heads, attn.n_kv, attn.head_dim
    forward = nnx.jit(lambda m, x, p: m(x, p))
    plain = np.asarray(forward(attn, x, pos))
    attn.kv_quant = kvq
    full = np.asarray(forward(attn, x, pos))

    # reference decoding: each step projects one token, writes Q(k), Q(v) into the cache, then its query
    # reads the cache (its own entry included), in float64
    k_cache = np.zeros((B, T, n_kv, h))
    v_cache = np.zeros((B, T, n_kv, h))

    @nnx.jit
    def project(m, xt, pt):  # one token's query and cache entries
        q = apply_rope(m.q(xt).reshape(B, 1, n, h), pt, cfg.rope_theta)
        k = apply_rope(m.k(xt).reshape(B, 1, n_kv, h), pt, cfg.rope_theta)
        return q, kvq(k), kvq(m.v(xt).reshape(B, 1, n_kv, h))

    outs = []
    for t in range(T):
        q, k_cache[:, t:t + 1], v_cache[:, t:t + 1] = project(attn, x[:, t:t + 1], pos[:, t:t + 1])
        keys = np.repeat(k_cache[:, :t + 1], n // n_kv, axis=2)  # GQA: query head i reads kv head i // (n/n_kv)
        values = np.repeat(v_cache[:, :t + 1], n // n_kv, axis=2)
        scores = np.einsum("bnh,bsnh->bns", np.asarray(q, np.float64)[:, 0], keys) / np.sqrt(h)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        o = np.einsum("bns,bsnh->bnh", p, values).reshape(B, 1, n * h)
        outs.append(np.asarray(attn.o(jnp.asarray(o, jnp.float32))))
    ref = np.concatenate(outs, axis=1)
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(full, ref, rtol=1e-5, atol=1e-5 * scale)
    assert np.max(np.abs(plain - ref)) > 100 * 1e-5 * scale  # the cache really was quantized


@pytest.mark.parametrize("kvq", KV_QUANTS, ids=lambda q: q.label)
def test_mla_naive_equals_absorbed_decode_with_quantized_cache(kvq):
    cfg = model_cfg("mla")
    attn = MLAttention(cfg, rngs=nnx.Rngs(params=0))
    x, pos = inputs()
    forward = nnx.jit(lambda m, x, p: m(x, p))
    plain = forward(attn, x, pos)
    attn.kv_quant = kvq
    full = forward(attn, x, pos)

    decode = nnx.jit(lambda m, xt, c, p: m.decode(xt, c, p))
    cache = attn.init_cache(B, T, jnp.float32)
    y, cache = decode(attn, x[:, :5], cache, pos[:, :5])  # prefill of 5 tokens, then one at a time
    outs = [y]
    for t in range(5, T):
        y, cache = decode(attn, x[:, t:t + 1], cache, pos[:, t:t + 1])
        outs.append(y)
    inc = jnp.concatenate(outs, axis=1)
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(np.asarray(inc), np.asarray(full), rtol=1e-5, atol=1e-5 * scale)
    assert float(jnp.max(jnp.abs(plain - full))) > 100 * 1e-5 * scale
    # what the cache holds is the quantized latent of the full forward
    c_kv, k_rope = nnx.jit(lambda m, x, p: m.latents(x, p))(attn, x, pos)
    np.testing.assert_allclose(np.asarray(cache["c_kv"]), np.asarray(c_kv), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cache["k_rope"]), np.asarray(k_rope), rtol=1e-6, atol=1e-6)
