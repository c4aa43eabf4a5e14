"""Multi-token prediction: shapes, sharing with the main model, causality, losses, acceptance rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.model.mtp import (acceptance_rate, mtp_loss_weight, mtp_losses, mtp_losses_and_stats,
                                mtp_total)
from efftrain.model.layers import cross_entropy as token_cross_entropy
from efftrain.model.transformer import build_model, parameter_counts

B, T, D, V = 2, 16, 64, 256


def model_cfg(depth=1, vocab=V, **model):
    m = {"vocab_size": vocab, "d_model": D, "n_layers": 2, "n_heads": 4, "mlp_hidden": 128,
         "compute_dtype": "float32", "mtp": {"depth": depth}}
    m.update(model)
    return from_dict({"model": m, "data": {"seq_len": T}, "train": {"max_steps": 1}}).model


def window(seed=0, batch=B, vocab=V):
    w = jax.random.randint(jax.random.key(seed), (batch, T + 1), 0, vocab)
    return w[:, :-1], w[:, 1:]  # inputs, targets


@nnx.jit
def mtp_logits(model, inputs):
    out = model(inputs)
    logits, _ = model.mtp(out.hidden, inputs, embed=model.embed, head=model.head)
    return logits


# the models run jitted, as in training (eagerly, each primitive compiles on its own: seconds per test)
forward = nnx.jit(lambda model, inputs: model(inputs))
losses = nnx.jit(lambda model, inputs, targets: mtp_losses(model, model(inputs).hidden, inputs, targets))


def param_paths(model):
    return ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def test_depth0_adds_nothing_and_loss_is_baseline():
    base, with_mtp = build_model(model_cfg(depth=0)), build_model(model_cfg(depth=1))
    assert base.mtp is None and not any("mtp" in p for p in param_paths(base))
    assert parameter_counts(base)["mtp"] == 0
    assert parameter_counts(with_mtp)["total"] == parameter_counts(base)["total"] + parameter_counts(with_mtp)["mtp"]
    inputs, targets = window()
    out0, out1 = forward(base, inputs), forward(with_mtp, inputs)
    ce_main = token_cross_entropy(out0.logits, targets)
    # the main model is untouched by MTP: same parameters (MTP is built last), same logits, same CE
    np.testing.assert_array_equal(np.asarray(out0.logits), np.asarray(out1.logits))
    ce = mtp_losses(base, out0.hidden, inputs, targets)
    assert ce.shape == (0,)
    total = mtp_total(ce_main, ce, mtp_loss_weight(base.cfg.mtp, 0))
    assert float(total) == float(ce_main)
    assert float(mtp_total(ce_main, losses(with_mtp, inputs, targets), 0.3)) != float(ce_main)


@pytest.mark.parametrize("depth,attention", [(1, "mha"), (2, "mha"), (2, "mla")])
def test_shapes_and_losses(depth, attention):
    model = build_model(model_cfg(depth=depth, attention=attention))
    assert len(model.mtp.layers) == depth
    inputs, targets = window()
    logits = mtp_logits(model, inputs)
    assert [lk.shape for lk in logits] == [(B, T - k, V) for k in range(1, depth + 1)]
    assert all(lk.dtype == jnp.float32 for lk in logits)
    ce = losses(model, inputs, targets)
    assert ce.shape == (depth,)
    np.testing.assert_allclose(np.asarray(ce), np.log(V), atol=0.3)  # near-uniform at init
    for k, lk in enumerate(logits, start=1):  # CE_k scores logits_k against targets[:, k:]
        assert float(ce[k - 1]) == pytest.approx(float(token_cross_entropy(lk, targets[:, k:])), rel=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_and_head_shared(tie):
    model = build_model(model_cfg(depth=2, tie_embeddings=tie))
    # no second embedding table or output head: no MTP parameter has a vocabulary-sized axis
    mtp_shapes = [x.shape for x in jax.tree.leaves(nnx.state(model.mtp, nnx.Param))]
    assert mtp_shapes and not any(V in shape for shape in mtp_shapes)
    # per module: 3 RMSNorms, M_k [2D, D], one block like the main model's last one
    block = sum(x.size for x in jax.tree.leaves(nnx.state(model.blocks[-1], nnx.Param)))
    assert parameter_counts(model)["mtp"] == 2 * (3 * D + 2 * D * D + block)

    inputs, targets = window()

    @nnx.jit
    def grads(m):
        def loss(m):
            hidden = jax.lax.stop_gradient(m(inputs).hidden)  # only the MTP path reaches embed/head
            return jnp.sum(mtp_losses(m, hidden, inputs, targets))
        return nnx.grad(loss)(m)

    g = grads(model)
    assert float(jnp.abs(g["embed"]["embedding"][...]).max()) > 0
    if not tie:
        assert float(jnp.abs(g["lm_head"]["kernel"][...]).max()) > 0
    assert float(jnp.abs(g["blocks"][0]["attn"]["q"]["kernel"][...]).max()) == 0  # main trunk cut off
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))


@pytest.mark.parametrize("k", [1, 2])
def test_depth_k_at_position_i_reads_tokens_up_to_i_plus_k(k):
    model = build_model(model_cfg(depth=2))
    inputs, _ = window()
    j = 9  # perturbed input token
    perturbed = inputs.at[:, j].set((inputs[:, j] + 1) % V)
    a, b = mtp_logits(model, inputs)[k - 1], mtp_logits(model, perturbed)[k - 1]
    i_last = j - k - 1  # the last position that must not see token j = i + k + 1
    np.testing.assert_array_equal(np.asarray(a[:, : i_last + 1]), np.asarray(b[:, : i_last + 1]))
    assert not np.allclose(np.asarray(a[:, i_last + 1]), np.asarray(b[:, i_last + 1]))  # reads t_{i+k}


def test_acceptance_rate_matches_brute_force():
    vocab = 16  # small vocabulary so that agreements happen at random init
    model = build_model(model_cfg(depth=1, vocab=vocab), seed=3)
    inputs, _ = window(seed=5, batch=8, vocab=vocab)
    rate = float(nnx.jit(acceptance_rate)(model, inputs))
    main = np.asarray(forward(model, inputs).logits)
    draft = np.asarray(mtp_logits(model, inputs)[0])
    hits = [np.argmax(draft[b, i]) == np.argmax(main[b, i + 1]) for b in range(8) for i in range(T - 1)]
    assert 0.0 <= rate <= 1.0
    assert rate == pytest.approx(np.mean(hits), abs=1e-7)


def test_acceptance_rate_is_one_when_drafts_agree():
    model = build_model(model_cfg(depth=1))
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])  # every guess is token 0
    inputs, _ = window()
    assert float(nnx.jit(acceptance_rate)(model, inputs)) == 1.0


def test_mtp_loss_weight_switch_under_jit():
    cfg = model_cfg().mtp.model_copy(update={"loss_weight": 0.3, "loss_weight_after": 0.1,
                                               "loss_weight_switch_tokens": 1000})
    lam = jax.jit(lambda n: mtp_loss_weight(cfg, n))
    assert float(lam(jnp.int32(999))) == pytest.approx(0.3)
    assert float(lam(jnp.int32(1000))) == pytest.approx(0.1)
    assert float(lam(jnp.int32(10**9))) == pytest.approx(0.1)
    assert float(jax.jit(lambda n: mtp_loss_weight(model_cfg().mtp, n))(5)) == pytest.approx(0.3)
    lam_total = mtp_total(jnp.float32(2.0), jnp.array([1.0, 3.0]), 0.1)
    assert float(lam_total) == pytest.approx(2.0 + 0.1 * 2.0)


def test_mtp_block_follows_last_layer_moe():
    cfg = model_cfg(depth=2, moe={"enabled": True, "num_routed_experts": 4, "top_k": 2, "expert_hidden": 32,
                                  "first_dense_layers": 1})
    model = build_model(cfg)
    assert all(layer.block.is_moe for layer in model.mtp.layers)
    inputs, targets = window()
    ce, stats = nnx.jit(lambda m: mtp_losses_and_stats(m, m(inputs).hidden, inputs, targets))(model)
    assert ce.shape == (2,) and len(stats) == 2
