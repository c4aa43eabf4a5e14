"""train.deterministic: the scatter-free gradient formulations, the attention choice, and run.json.

The GPU check itself (two processes, bitwise) is benchmarks/check_determinism.py, run on an H200
(docs/BENCHMARKS.md); these tests pin down, on CPU, that every formulation computes the same numbers
as the plain one, against independent references.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efftrain.config import load_config
from efftrain.model import attention, layers, moe
from efftrain.model.transformer import build_model
from efftrain.train.optimizer import make_optimizer
from efftrain.train.step import init_state, make_train_step


@pytest.mark.parametrize("method", layers.EMBED_GRAD_METHODS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n_ids", [4, 11])
def test_deterministic_embedding_gradient_matches_a_float64_scatter(monkeypatch, dtype, method, n_ids):
    """Forward = table[tokens]; gradient = np.add.at in float64 (repeated tokens in any order; for
    onehot a chunk size that does not divide the token count, so the padding rows are exercised; for
    sorted, ids at both ends of the table and ids never seen)."""
    monkeypatch.setattr(layers, "EMBED_GRAD_CHUNK", 5)
    monkeypatch.setattr(layers, "EMBED_GRAD_METHOD", method)
    rng = np.random.default_rng(n_ids)
    V, D = 11, 6
    table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, n_ids, (3, 7)), jnp.int32)
    g = jnp.asarray(rng.normal(size=(3, 7, D)), dtype)

    out, vjp = jax.vjp(lambda t: layers.deterministic_embed(t, tokens, dtype), table)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.take(table, tokens, axis=0).astype(dtype)))
    (grad,) = vjp(g)
    ref = np.zeros((V, D))
    np.add.at(ref, np.asarray(tokens).reshape(-1), np.asarray(g, np.float64).reshape(-1, D))
    assert grad.dtype == table.dtype
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref, rtol=1e-6, atol=1e-6)
    unseen = np.setdiff1d(np.arange(V), np.asarray(tokens))
    assert not np.asarray(grad)[unseen].any()  # ids never seen get exactly zero


def test_sorted_embedding_gradient_on_many_tokens():
    """The segmented scan over 3,000 tokens of a Zipf-like id distribution (long segments and
    singletons) against float64, and the same bits twice."""
    rng = np.random.default_rng(7)
    ids = jnp.asarray(np.minimum(rng.zipf(1.3, 3000), 200) - 1, jnp.int32)
    g = jnp.asarray(rng.normal(size=(3000, 8)), jnp.float32)
    grad = jax.jit(layers.sorted_segment_grad, static_argnums=2)(ids, g, 200)
    ref = np.zeros((200, 8))
    np.add.at(ref, np.asarray(ids), np.asarray(g, np.float64))
    np.testing.assert_allclose(np.asarray(grad, np.float64), ref, rtol=1e-5, atol=1e-5)
    # again, from a second, separately traced program (eagerly, the scan's ~270 primitives would each
    # compile on their own: ~10 s)
    again = jax.jit(lambda i, x: layers.sorted_segment_grad(i, x, 200))(ids, g)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(again))


def test_pick_equals_take_along_axis_bitwise_with_the_same_gradient():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 5, 9)), jnp.float32)
    idx1 = jnp.asarray(rng.integers(0, 9, (2, 5)), jnp.int32)
    idx3 = jnp.asarray(np.stack([rng.permutation(9)[:3] for _ in range(10)]).reshape(2, 5, 3), jnp.int32)
    for idx, ref in ((idx1, lambda v: jnp.take_along_axis(v, idx1[..., None], -1)[..., 0]),
                     (idx3, lambda v: jnp.take_along_axis(v, idx3, -1))):
        np.testing.assert_array_equal(np.asarray(layers.pick(x, idx)), np.asarray(ref(x)))
        w = jnp.asarray(rng.normal(size=idx.shape), jnp.float32)
        g_pick = jax.grad(lambda v: jnp.sum(layers.pick(v, idx) * w))(x)
        g_ref = jax.grad(lambda v: jnp.sum(ref(v) * w))(x)
        np.testing.assert_array_equal(np.asarray(g_pick), np.asarray(g_ref))


def test_per_sequence_counts_are_bincounts():
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 6, (3, 8, 2)).astype(np.int32)
    got = np.asarray(moe.per_sequence_counts(jnp.asarray(idx), 6))
    ref = np.stack([np.bincount(idx[b].reshape(-1), minlength=6) for b in range(3)]).astype(np.float32)
    np.testing.assert_array_equal(got, ref)


def test_auto_attention_is_pallas_only_for_a_deterministic_step_on_gpu(monkeypatch):
    cfg = load_config("dense-tiny").model
    monkeypatch.setattr(attention, "on_gpu", lambda: True)
    assert attention.attention_implementation(cfg, jnp.bfloat16) == "cudnn"
    token = layers.deterministic_gradients.set(True)
    try:
        assert attention.attention_implementation(cfg, jnp.bfloat16) == "pallas"
        assert attention.attention_implementation(cfg, jnp.float32) == "xla"
        forced = cfg.model_copy(update={"attention_impl": "cudnn"})
        assert attention.attention_implementation(forced, jnp.bfloat16) == "cudnn"
    finally:
        layers.deterministic_gradients.reset(token)
    monkeypatch.setattr(attention, "on_gpu", lambda: False)
    assert attention.attention_implementation(cfg, jnp.bfloat16) == "xla"


def test_pallas_off_gpu_is_a_clear_error():
    cfg = load_config("dense-tiny", ["model.attention_impl=pallas"]).model
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="model.attention_impl=pallas needs a GPU"):
        attention.causal_attention(q, q, q, scale=0.5, cfg=cfg)


def test_kernel_paddings():
    assert [attention.padding_for("pallas", t) for t in (63, 64, 100, 128, 129, 511, 512)] == [1, 0, 28, 0, 127, 1, 0]
    assert [attention.padding_for("cudnn", t) for t in (63, 511, 512)] == [1, 1, 0]
    assert attention.padding_for("xla", 511) == 0


@pytest.mark.parametrize("tiles,T", [(None, 64), (None, 256), ("32,16,16,32,32,16", 64), ("64,64,64,64,64,64,4,3", 64)])
def test_pallas_attention_matches_xla_with_gqa_and_its_gradients(tiles, T):
    """The Pallas kernel (interpreted on CPU) against jax's XLA attention: GQA with 4 query heads over 2
    kv heads, forward and the gradients of q, k and v; the default tiles and tunings whose blocks split
    the causal diagonal differently in the forward, dK/dV and dQ loops."""
    tiles = tiles and attention.PallasTiles.parse(tiles)
    q = jax.random.normal(jax.random.key(0), (1, T, 4, 16))
    k, v = (jax.random.normal(jax.random.key(i), (1, T, 2, 16)) for i in (1, 2))
    w = jax.random.normal(jax.random.key(3), (1, T, 4, 16))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    def pallas(q, k, v):
        return attention._pallas_attention(q, k, v, 0.25, interpret=True, tiles=tiles)

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=0.25, is_causal=True, implementation="xla")

    # jitted (eagerly, every primitive of the interpreted kernel compiles on its own)
    np.testing.assert_allclose(jax.jit(pallas)(q, k, v), jax.jit(xla)(q, k, v), atol=2e-6)
    for a, b in zip(jax.jit(jax.grad(loss(pallas), (0, 1, 2)))(q, k, v),
                    jax.jit(jax.grad(loss(xla), (0, 1, 2)))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=2e-5)


SMALL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.vocab_size=512", "data.seq_len=32",
         "train.batch_size=4", "train.grad_accum=1"]  # still MLA + an MoE layer + MTP, compiled in seconds


def _three_steps(preset: str, deterministic: bool):
    cfg = load_config(preset, [*SMALL, f"train.deterministic={str(deterministic).lower()}"])
    model = build_model(cfg.model, cfg.fp8, seed=0)
    tx = make_optimizer(cfg.optim, 10)
    graphdef, state = init_state(model, tx)
    step = make_train_step(graphdef, cfg, tx)
    shape = (cfg.train.grad_accum, cfg.train.batch_size // cfg.train.grad_accum, cfg.data.seq_len + 1)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.model.vocab_size, shape), jnp.int32)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, jnp.float32(0))
        losses.append(float(metrics["loss"]))
    return losses, jax.tree.leaves(state["params"])


def test_deterministic_step_computes_the_same_training(monkeypatch):
    """The deterministic formulations traced as on a GPU (one-hot embedding gradient; MoE, MTP, router
    bias all on in deepseek-tiny) give the default step's losses and parameters up to fp32 summation
    order; attention stays XLA's on CPU."""
    base_losses, base_params = _three_steps("deepseek-tiny", False)
    monkeypatch.setattr(layers, "on_gpu", lambda: True)
    det_losses, det_params = _three_steps("deepseek-tiny", True)
    np.testing.assert_allclose(det_losses, base_losses, rtol=1e-6)
    for a, b in zip(det_params, base_params):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_run_json_records_the_mode(tiny_config, tmp_path, monkeypatch):
    from efftrain.train import loop

    calls = []
    monkeypatch.setattr(loop, "enable_compilation_cache", lambda: calls.append(1))
    cfg = tiny_config(train__deterministic=False, train__max_steps=2)
    loop.train(cfg, tmp_path / "run", log=lambda _: None)
    assert calls == [1]  # training loads the programs other runs of these shapes compiled
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["deterministic"] is False and info["xla_step_options"] == {}  # CPU: no options needed
    assert info["fp8_kernels"] == {"enabled": False}
