"""Residual-stream rotations (QuaRot / SpinQuant-style, efftrain.quant.rotation): the matrices are orthogonal,
the rotated model computes the same function in float32 (dense MHA, GQA with tied embeddings, MLA, MoE;
with and without per-head value rotations), and on a model with an outlier channel the rotation flattens the
Linear inputs and lowers RTN's QiD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.model.layers import RMSNorm, cross_entropy
from efftrain.model.transformer import build_model
from efftrain.quant.apply import QuantSettings, _block_pass, quantize_model
from efftrain.quant.rotation import outlier_ratio, rotate_model, rotation_matrix, sylvester_hadamard

from conftest import tiny_raw

VOCAB = 384
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (8, 33))
QID_TOKENS = np.random.default_rng(1).integers(0, VOCAB, (64, 32))

MODELS = {
    "mha": {"d_model": 32, "n_heads": 2, "mtp": {"depth": 1}},
    "gqa_tied": {"d_model": 48, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": True},  # 48 = 16·3, head 12
    "mla": {"d_model": 32, "n_heads": 2, "attention": "mla",
            "mla": {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                    "v_head_dim": 12}},
    "moe": {"d_model": 32, "n_heads": 2, "moe": {"enabled": True, "num_routed_experts": 4, "top_k": 2,
                                                 "expert_hidden": 32, "first_dense_layers": 1}},
}


def make_model(name: str, seed: int = 0):
    model_cfg = {"vocab_size": VOCAB, "n_layers": 2, "mlp_hidden": 64, "compute_dtype": "float32",
                 "init_std": 0.1, **MODELS[name]}
    cfg = from_dict(tiny_raw("unused", model=model_cfg, train={"max_steps": 1}))
    model = build_model(cfg.model, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for _, norm in nnx.iter_modules(model):  # non-trivial norm scales, so that the fold matters
        if isinstance(norm, RMSNorm):
            norm.scale[...] = jnp.asarray(rng.uniform(0.5, 2.0, norm.scale[...].shape), jnp.float32)
    return model


@nnx.jit
def logits_of(model, tokens):
    return model(tokens).logits


def loss_of(model, tokens=TOKENS) -> float:
    tokens = jnp.asarray(tokens)
    return float(cross_entropy(logits_of(model, tokens[:, :-1]), tokens[:, 1:]))


@pytest.mark.parametrize("d", [1, 7, 32, 48, 384])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_matrices_are_orthogonal(d, kind):
    q, how = rotation_matrix(d, kind, np.random.default_rng(3))
    assert q.shape == (d, d) and q.dtype == np.float64
    np.testing.assert_allclose(q.T @ q, np.eye(d), atol=1e-12)
    again, _ = rotation_matrix(d, kind, np.random.default_rng(3))
    np.testing.assert_array_equal(q, again)  # the seed decides
    if kind == "hadamard" and d in (32, 384):  # a Hadamard factor: equal magnitudes on the 2^k stride
        assert ("⊗" in how) == (d == 384)
    if kind == "hadamard" and d == 32:
        np.testing.assert_allclose(np.abs(q), 1 / np.sqrt(32), atol=1e-15)
    h = sylvester_hadamard(8)
    np.testing.assert_array_equal(h @ h.T, 8 * np.eye(8))


CASES = [("mha", "hadamard", True), ("mha", "orthogonal", False), ("gqa_tied", "hadamard", True),
         ("mla", "orthogonal", True), ("mla", "hadamard", False), ("moe", "hadamard", True)]


@pytest.mark.parametrize("name,kind,values", CASES)
def test_rotated_model_computes_the_same_function(name, kind, values):
    model = make_model(name)
    before = np.asarray(logits_of(model, jnp.asarray(TOKENS[:, :-1])))
    loss_before = loss_of(model)
    embedding = np.asarray(model.embed.embedding[...]).copy()
    report = rotate_model(model, kind, seed=5, rotate_values=values)
    after = np.asarray(logits_of(model, jnp.asarray(TOKENS[:, :-1])))
    assert abs(loss_of(model) - loss_before) < 1e-5
    assert np.std(before) > 0.1  # a function worth comparing: logits far from uniform noise
    np.testing.assert_allclose(after, before, atol=2e-4 * np.abs(before).max())
    assert not np.allclose(model.embed.embedding[...], embedding, atol=1e-3)  # the stream is rotated
    for block in model.blocks:  # the residual norms now have unit scale (MLA's latent norms keep theirs)
        for norm in (block.attn_norm, block.ffn_norm):
            np.testing.assert_array_equal(norm.scale[...], 1.0)
    np.testing.assert_array_equal(model.final_norm.scale[...], 1.0)
    assert report.kind == kind and report.folded_norms == 2 * 2 + 1 and not report.mtp_rotated
    attn = model.blocks[0].attn
    heads_per_block = attn.n_heads if name == "mla" else attn.n_kv  # GQA: one rotation per kv head
    assert report.value_heads == (2 * heads_per_block if values else 0)
    assert report.untied_head == (name == "gqa_tied")
    if name == "gqa_tied":  # the head is now its own (rotated) matrix, and the config says so
        assert model.lm_head is not None and not model.cfg.tie_embeddings
        assert "⊗" in report.construction


def test_rotation_checks_its_options():
    model = make_model("mha")
    with pytest.raises(ValueError, match="unknown rotation 'givens'"):
        rotate_model(model, "givens", seed=0)
    with pytest.raises(ValueError, match="non-negative integer"):
        rotate_model(model, "hadamard", seed=-1)


OUTLIER = 5  # residual channel with massive activations and large norm weights


def outlier_model():
    """The dense model with an outlier channel: a large embedding column (activations) and large norm
    scales there (after the fold: large weight rows), as LLMs' massive activations."""
    model = make_model("mha")
    model.embed.embedding[...] = model.embed.embedding[...].at[:, OUTLIER].multiply(30.0)
    for block in model.blocks:
        for norm in (block.attn_norm, block.ffn_norm):
            norm.scale[...] = norm.scale[...].at[OUTLIER].set(12.0)
    return model


def reader_ratios(model) -> list[float]:
    """outlier_ratio of the inputs of the residual readers (q and gate) of every block."""
    tokens = jnp.asarray(TOKENS[:, :-1])
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h, ratios = model.embed(tokens), []
    for block in model.blocks:
        inputs, h = _block_pass(block, h, positions)
        ratios += [outlier_ratio(inputs["attn/q"]), outlier_ratio(inputs["ffn/gate"])]
    return ratios


def rtn3_qid_and_kl(model) -> tuple[float, float]:
    """QiD and KL(p_16 ‖ p_q) of RTN 3-bit (whole-channel groups), on targets drawn from the 16-bit model
    itself: a random-init model has no data of its own, and on its own text QiD estimates the KL (on
    uniform random targets it would be dominated by the first-order change of the logits, of either sign)."""
    inputs = jnp.asarray(QID_TOKENS)
    logp_16 = jax.nn.log_softmax(logits_of(model, inputs))
    targets = jax.random.categorical(jax.random.key(0), logp_16)
    quantize_model(model, TOKENS, QuantSettings(method="rtn", bits=3, group_size=-1))
    logp_q = jax.nn.log_softmax(logits_of(model, inputs))
    nll = lambda logp: -float(jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)))  # noqa: E731
    kl = float(jnp.mean(jnp.sum(jnp.exp(logp_16) * (logp_16 - logp_q), axis=-1)))
    return nll(logp_q) - nll(logp_16), kl


def test_rotation_flattens_outliers_and_helps_rtn():
    plain, rotated = outlier_model(), outlier_model()
    rotate_model(rotated, "hadamard", seed=0)
    assert abs(loss_of(rotated) - loss_of(plain)) < 1e-4  # same function
    before, after = reader_ratios(plain), reader_ratios(rotated)
    assert min(before) > 3.5  # the outlier dominates every reader's input (sqrt(32) = 5.7 at most)
    assert max(after) < 0.7 * min(before)
    (qid_plain, kl_plain), (qid_rotated, kl_rotated) = rtn3_qid_and_kl(plain), rtn3_qid_and_kl(rotated)
    assert qid_plain > 0.05 and qid_rotated < 0.5 * qid_plain
    assert kl_rotated < 0.5 * kl_plain
