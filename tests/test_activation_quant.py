"""Weight-activation PTQ (efftrain.quant.activations, efftrain.quant.smoothquant) on tiny untrained models
(CPU): int / FP8 activation fake-quantization against float64-numpy and ml_dtypes references, installing
it as a static module attribute (None: bitwise unchanged; MoE routed experts included), FP8 128 x 128 block
weights, and SmoothQuant's exact fold and its effect on a model with an outlier channel."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.model.layers import apply_shared_input, cross_entropy, linears_of
from efftrain.model.moe import MoE
from efftrain.model.transformer import build_model
from efftrain.quant.activations import (ActQuant, fp8_block_effective_bits, quantize_fp8_block_weights,
                                        quantize_model_fp8_blocks, set_activation_quant)
from efftrain.quant.apply import _block_pass
from efftrain.quant.smoothquant import check_alpha, smooth_groups, smooth_model

from conftest import tiny_raw

MLA = {"attention": "mla", "mla": {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                   "qk_rope_head_dim": 4, "v_head_dim": 8}}
MOE = {"moe": {"enabled": True, "num_routed_experts": 4, "top_k": 2, "expert_hidden": 32, "first_dense_layers": 1,
               "num_shared_experts": 1}}
KINDS = {"dense": {}, "mla": MLA, "moe": MOE}
B, T, V = 4, 16, 384


def model_config(kind: str = "dense", **model):
    raw = tiny_raw("x", model={"vocab_size": V, "d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64,
                               "compute_dtype": "float32", **KINDS[kind], **model})
    return from_dict(raw).model


def tiny_model(kind: str = "dense", seed: int = 0, **model):
    return build_model(model_config(kind, **model), seed=seed)


def tokens(seed: int = 0, batch: int = B):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (batch, T)))


@nnx.jit
def _logits(model, toks):
    return model(toks).logits


@nnx.jit
def _loss(model, toks, targets):
    return cross_entropy(model(toks).logits, targets)


def logits_of(model, toks):
    return np.asarray(_logits(model, toks))


def loss_of(model, toks, targets):
    return float(_loss(model, toks, targets))


def copy(module):
    return nnx.merge(*nnx.split(jax.tree.map(jnp.array, module)))


# ----------------------------------------------------------------------------------------------
# ActQuant against independent references
# ----------------------------------------------------------------------------------------------
def int_reference(x: np.ndarray, qmax: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric absmax per group of `cols` channels of each row, in float64 (np.round: half to even):
    (fake-quantized x, per-element scale, x / scale)."""
    x = np.asarray(x, np.float64)
    out, scale, ratio = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    for c0 in range(0, x.shape[-1], cols):
        g = x[..., c0:c0 + cols]
        amax = np.max(np.abs(g), axis=-1, keepdims=True)
        s = np.where(amax > 0, amax / qmax, 1.0)
        out[..., c0:c0 + cols] = np.clip(np.round(g / s), -qmax, qmax) * s
        scale[..., c0:c0 + cols], ratio[..., c0:c0 + cols] = s, g / s
    return out, scale, ratio


@pytest.mark.parametrize("kind,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("granularity,tile", [("token", 128), ("tile", 16), ("tile", 24)])
def test_int_fake_quant_equals_float64_reference(kind, qmax, granularity, tile):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 40)).astype(np.float32) * np.exp(rng.uniform(-3, 3, (3, 5, 1))).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token: scale 1, stays zero
    x[1, 2, 7] = 60.0  # an outlier channel
    aq = ActQuant(kind, granularity, tile)
    got = np.asarray(aq(jnp.asarray(x)))
    cols = tile if granularity == "tile" else x.shape[-1]
    ref, scale, ratio = int_reference(x, qmax, cols)
    assert got.dtype == np.float32 and got.shape == x.shape
    # float32 scales and quotients: only a quotient within float32 rounding of a half-way point may round
    # the other way (to the neighbouring code); everything else equals the float64 result to 1 ulp
    near_tie = np.abs(np.abs(ratio) % 1 - 0.5) < 1e-5
    assert near_tie.mean() < 1e-3
    np.testing.assert_allclose(got[~near_tie], ref[~near_tie], rtol=2e-7, atol=0)
    np.testing.assert_array_less(np.abs(got - ref)[near_tie], 1.01 * scale[near_tie])
    np.testing.assert_array_equal(got[0, 0], 0.0)
    # bf16 in, bf16 out
    assert aq(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_int_rounds_half_to_even_and_clips_symmetrically():
    """A row whose absmax is q_max has scale exactly 1: the codes are RNE of x, ties to even."""
    row = np.array([[127.0, 2.5, 3.5, -0.5, -1.5, 0.49, -127.0, 126.5]], np.float32)
    np.testing.assert_array_equal(np.asarray(ActQuant("int8")(jnp.asarray(row))),
                                  [[127, 2, 4, 0, -2, 0, -127, 126]])
    row4 = np.array([[7.0, 2.5, -3.5, 6.5, -7.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(ActQuant("int4")(jnp.asarray(row4))), [[7, 2, -4, 6, -7]])


def e4m3_reference(x: np.ndarray, cols: int) -> np.ndarray:
    """E4M3 with one float32 scale amax/448 per 1 x cols tile, rounded by ml_dtypes' float8_e4m3fn."""
    x = np.asarray(x, np.float32)
    out = np.empty_like(x)
    for c0 in range(0, x.shape[-1], cols):
        g = x[..., c0:c0 + cols]
        amax = np.max(np.abs(g), axis=-1, keepdims=True)
        s = amax * np.float32(1 / 448)
        s = np.where(s > 0, s, np.float32(1)).astype(np.float32)
        q = (g * (np.float32(1) / s)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        out[..., c0:c0 + cols] = q * s
    return out


@pytest.mark.parametrize("granularity,tile,cols", [("tile", 128, 128), ("tile", 64, 64), ("token", 128, 300)])
def test_fp8_tile_fake_quant_equals_ml_dtypes(granularity, tile, cols):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, 300)) * np.exp(rng.uniform(-6, 6, (6, 300)))).astype(np.float32)
    x[2, :128] = 0.0  # an all-zero tile
    got = np.asarray(ActQuant("fp8", granularity, tile)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, e4m3_reference(x, cols))
    assert ActQuant("fp8")(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_labels_equality_and_validation():
    assert [ActQuant(k).label for k in ("int8", "int4", "fp8")] == ["a8", "a4", "afp8"]
    assert ActQuant("int8", "tile", 64).label == "a8-t64"
    assert ActQuant("fp8", "token").label == "afp8-token" and ActQuant("fp8", tile=64).label == "afp8-t64"
    assert ActQuant("fp8") == ActQuant("fp8", "tile", 128) and hash(ActQuant("fp8")) == hash(ActQuant("fp8", "tile"))
    assert ActQuant("int8").granularity == "token" and ActQuant("fp8").granularity == "tile"
    with pytest.raises(ValueError, match="kind 'int3'.*int8, int4, fp8"):
        ActQuant("int3")
    with pytest.raises(ValueError, match="granularity.*token, tile"):
        ActQuant("int8", "channel")
    for bad in (0, -128, 1.5, True):
        with pytest.raises(ValueError, match="tile must be a positive int"):
            ActQuant("fp8", tile=bad)
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            check_alpha(bad)
    assert check_alpha(0) == 0.0 and check_alpha(1) == 1.0
    with pytest.raises(ValueError, match="two positive ints"):
        quantize_fp8_block_weights(jnp.ones((4, 4)), (0, 128))
    with pytest.raises(ValueError, match="matrix"):
        quantize_fp8_block_weights(jnp.ones((4,)))
    with pytest.raises(TypeError, match="ActQuant or None"):
        set_activation_quant(tiny_model(), "int8")
    with pytest.raises(ValueError, match="calib_tokens"):
        smooth_model(tiny_model(), np.zeros((8,), np.int32))
    with pytest.raises(ValueError, match="alpha"):
        smooth_model(tiny_model(), tokens(), alpha=2.0)


# ----------------------------------------------------------------------------------------------
# Installing it on a model
# ----------------------------------------------------------------------------------------------
def test_none_is_bitwise_and_only_block_linears_are_touched():
    """Dense block: 7 Linears; MoE block: 4 attention + 3 shared-expert Linears + the MoE layer. The
    head and the routers keep no quantizer; setting None again restores the 16-bit forward bitwise, and
    the PTQ observer still sees the unquantized inputs."""
    toks = tokens()
    assert set_activation_quant(tiny_model("moe"), ActQuant("int8")) == 7 + 8  # block 0 dense, block 1 MoE
    model = tiny_model("dense", tie_embeddings=False)
    positions = jnp.broadcast_to(jnp.arange(T), toks.shape)
    ref = logits_of(model, toks)
    assert set_activation_quant(model, None) == 14
    np.testing.assert_array_equal(logits_of(model, toks), ref)
    h = model.embed(toks)
    captured_16, _ = _block_pass(model.blocks[0], h, positions)
    graphdef = nnx.graphdef(model)
    assert set_activation_quant(model, ActQuant("int4")) == 14
    assert nnx.graphdef(model) != graphdef  # static: a jitted eval retraces
    assert model.lm_head.act_quant is None
    assert not np.array_equal(logits_of(model, toks), ref)
    captured_q, _ = _block_pass(model.blocks[0], h, positions)
    for name in ("attn/q", "attn/k", "attn/v"):  # attn_norm(h): no quantized layer upstream
        np.testing.assert_array_equal(captured_q[name], captured_16[name])
    for name, x in captured_q.items():  # every input as fed, before its quantizer
        assert not np.array_equal(ActQuant("int4")(x), x), name
    set_activation_quant(model, None)
    assert nnx.graphdef(model) == graphdef
    np.testing.assert_array_equal(logits_of(model, toks), ref)


def test_shared_input_quantizes_once_with_the_per_layer_numbers():
    model = tiny_model()
    set_activation_quant(model, ActQuant("int8"))
    attn = model.blocks[0].attn
    x = jax.random.normal(jax.random.key(0), (2, T, 32))
    shared = apply_shared_input((attn.q, attn.k, attn.v), x)
    for y, lin in zip(shared, (attn.q, attn.k, attn.v)):
        np.testing.assert_array_equal(y, lin(x))
        np.testing.assert_array_equal(y, jnp.dot(ActQuant("int8")(x), lin.kernel[...]))
    attn.v.act_quant = ActQuant("int4")  # mixed quantizers: each layer its own
    np.testing.assert_array_equal(apply_shared_input((attn.q, attn.v), x)[1],
                                  jnp.dot(ActQuant("int4")(x), attn.v.kernel[...]))


def test_loss_rises_a_little_at_int8_and_more_at_int4():
    """A random model with sharp predictions (init std 0.3), scored on its own argmax: every error in
    the logits costs loss. W16A8 costs little, W16A4 much more, E4M3 (3 mantissa bits; here one tile per
    token, d_model 32 < 128) less than int4."""
    model = tiny_model(init_std=0.3)
    toks = tokens(3, batch=8)
    targets = jnp.asarray(np.argmax(logits_of(model, toks), axis=-1))
    base = loss_of(model, toks, targets)
    deltas = {}
    for kind in ("int8", "fp8", "int4"):
        set_activation_quant(model, ActQuant(kind))
        deltas[kind] = loss_of(model, toks, targets) - base
    set_activation_quant(model, None)
    assert loss_of(model, toks, targets) == base
    assert 0 < deltas["int8"] < 0.05 * base + 0.02, (base, deltas)
    assert deltas["int4"] > 5 * deltas["int8"], deltas
    assert 0 < deltas["fp8"] < deltas["int4"], deltas


def _silu(a):
    return a / (1 + np.exp(-a))


@pytest.mark.parametrize("dispatch,impl", [("dropless", "tiles"), ("dropless", "ragged"), ("capacity", None)])
def test_moe_routed_and_shared_expert_inputs_are_quantized(dispatch, impl):
    """W8A8 of an MoE layer: its output equals a dense per-expert float64 reference in which every GEMM
    input (routed gate/up, routed down, shared gate/up, shared down) is fake-quantized; routing on the
    unquantized input."""
    cfg = model_config("moe")
    cfg = cfg.model_copy(update={"moe": cfg.moe.model_copy(update={"dispatch": dispatch, "capacity_factor": 8.0})})
    moe = MoE(cfg, rngs=nnx.Rngs(params=0), dropless_impl=impl)
    x = jax.random.normal(jax.random.key(1), (2, T, 32))
    run = nnx.jit(lambda m, x: m(x)[0])  # (eagerly, each of the layer's primitives compiles on its own)
    plain = np.asarray(run(moe, x))
    aq = ActQuant("int4")  # coarse, so a missed quantizer shows
    moe.act_quant = aq
    for lin in (moe.shared.gate, moe.shared.up, moe.shared.down):
        lin.act_quant = aq
    got = np.asarray(run(moe, x))
    assert not np.allclose(got, plain, atol=1e-4)

    q = lambda a: np.asarray(aq(jnp.asarray(a, jnp.float32)), np.float64)  # noqa: E731
    x2d = np.asarray(x).reshape(-1, 32)
    r = moe.route(jnp.asarray(x2d))
    idx, gates = np.asarray(r.expert_idx), np.asarray(r.gates, np.float64)
    wg, wu, wd = (np.asarray(getattr(moe, n)[...], np.float64) for n in ("w_gate", "w_up", "w_down"))
    xq = q(x2d)
    per_expert = [q(_silu(xq @ wg[e]) * (xq @ wu[e])) @ wd[e] for e in range(moe.n_experts)]
    ref = sum(gates[:, k:k + 1] * np.stack([per_expert[e][n] for n, e in enumerate(idx[:, k])]) for k in range(2))
    sg, su, sd = (np.asarray(l.kernel[...], np.float64) for l in (moe.shared.gate, moe.shared.up, moe.shared.down))
    ref = ref + q(_silu(xq @ sg) * (xq @ su)) @ sd
    np.testing.assert_allclose(got.reshape(-1, 32), ref, rtol=2e-4, atol=2e-6)
    moe.act_quant = None
    for lin in (moe.shared.gate, moe.shared.up, moe.shared.down):
        lin.act_quant = None
    np.testing.assert_array_equal(run(moe, x), plain)


# ----------------------------------------------------------------------------------------------
# FP8 block weights
# ----------------------------------------------------------------------------------------------
def e4m3_block_reference(w: np.ndarray, r: int, c: int) -> np.ndarray:
    out = np.empty_like(w)
    for i in range(0, w.shape[0], r):
        for j in range(0, w.shape[1], c):
            blk = w[i:i + r, j:j + c]
            s = np.float32(np.abs(blk).max()) * np.float32(1 / 448)
            q = (blk * (np.float32(1) / s)).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
            out[i:i + r, j:j + c] = q * s
    return out


def test_fp8_block_weights_equal_ml_dtypes_and_bits():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((256, 200)) * np.exp(rng.uniform(-2, 2, (256, 1)))).astype(np.float32)
    np.testing.assert_array_equal(quantize_fp8_block_weights(jnp.asarray(w)), e4m3_block_reference(w, 128, 128))
    magnitudes = np.array([1.0, 100.0, 0.01], np.float32)[:, None, None]
    experts = rng.standard_normal((3, 160, 64)).astype(np.float32) * magnitudes
    got = np.asarray(quantize_fp8_block_weights(jnp.asarray(experts)))
    for e in range(3):  # each expert's blocks are its own (160 rows: one 128-row block and one of 32)
        np.testing.assert_array_equal(got[e], e4m3_block_reference(experts[e], 128, 128))
    assert fp8_block_effective_bits((256, 384)) == 8 + 32 / (128 * 128)
    assert fp8_block_effective_bits((7, 256, 384)) == 8 + 32 / (128 * 128)
    assert fp8_block_effective_bits((32, 64)) == 8 + 32 / (32 * 64)  # a small matrix is one block
    assert fp8_block_effective_bits((160, 64)) == 8 + 32 * 2 / (160 * 64)

    model = tiny_model("moe")
    ref = copy(model)
    report = quantize_model_fp8_blocks(model)
    weights = [l.kernel[...] for b in ref.blocks for _, l in linears_of(b)]
    weights += [getattr(ref.blocks[1].ffn, n)[...] for n in ("w_gate", "w_up", "w_down")]
    assert report.n_params == sum(w.size for w in weights) and report.expert_matrices == 12
    assert report.weight_bits == sum(w.size * fp8_block_effective_bits(w.shape) for w in weights)
    for get in (lambda m: m.blocks[1].ffn.w_down, lambda m: m.blocks[0].attn.q.kernel):
        np.testing.assert_array_equal(get(model)[...], quantize_fp8_block_weights(get(ref)[...]))
    np.testing.assert_array_equal(model.embed.embedding[...], ref.embed.embedding[...])
    np.testing.assert_array_equal(model.blocks[1].ffn.router.kernel[...], ref.blocks[1].ffn.router.kernel[...])


# ----------------------------------------------------------------------------------------------
# SmoothQuant
# ----------------------------------------------------------------------------------------------
def np_loss(logits, targets) -> float:
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return float(np.mean(logz - np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]))


def row_absmax(w) -> np.ndarray:
    """max |w| per input row of w [..., in, out] (over the outputs and any stacked experts)."""
    w = np.abs(np.asarray(w, np.float64))
    return w.max(axis=tuple(a for a in range(w.ndim) if a != w.ndim - 2))


@pytest.mark.parametrize("kind", ["dense", "mla", "moe"])
def test_smoothquant_fold_is_exact_and_uses_eq4(kind):
    """The smoothed 16-bit model's loss equals the original's (float32; routing unchanged), and the scales
    are eq. 4 on the captured block inputs with max|W_j| over every weight that reads them."""
    model = tiny_model(kind)
    ref = copy(model)
    calib, toks = tokens(5), tokens(6)
    report = smooth_model(model, calib, alpha=0.5)
    groups = ["attn_in", "q_up", "kv_up", "ffn_in"] if kind == "mla" else ["attn_in", "ffn_in"]
    assert [g.name for g in smooth_groups(ref.blocks[1])] == groups
    assert report.n_groups == 2 * len(groups)
    smoothed, original = logits_of(model, toks), logits_of(ref, toks)
    np.testing.assert_allclose(smoothed, original, rtol=1e-4, atol=1e-6)
    targets = np.roll(np.asarray(toks), -1, axis=1)
    np.testing.assert_allclose(np_loss(smoothed, targets), np_loss(original, targets), rtol=1e-6)
    assert not np.allclose(model.blocks[1].ffn_norm.scale[...], 1.0)

    # eq. 4 for the last block's FFN input, from an independent capture of the 16-bit model
    pos = jnp.broadcast_to(jnp.arange(T), calib.shape)
    _, h = _block_pass(ref.blocks[0], ref.embed(calib), pos)
    captured, _ = _block_pass(ref.blocks[1], h, pos)
    ffn = ref.blocks[1].ffn
    if kind == "moe":
        x = captured["ffn/router"]
        w_rows = [row_absmax(ffn.w_gate[...]), row_absmax(ffn.w_up[...]),  # every routed expert's rows
                  row_absmax(ffn.shared.gate.kernel[...]), row_absmax(ffn.shared.up.kernel[...])]
        routing = lambda m: m.blocks[1].ffn.route(m.blocks[1].ffn_norm(h).reshape(-1, 32)).expert_idx  # noqa: E731
        np.testing.assert_array_equal(routing(model), routing(ref))
    else:
        x = captured["ffn/gate"]
        w_rows = [row_absmax(ffn.gate.kernel[...]), row_absmax(ffn.up.kernel[...])]
    x_max = np.abs(np.asarray(x, np.float64)).max(axis=0)
    s = np.maximum(np.sqrt(x_max) / np.sqrt(np.maximum(np.max(w_rows, axis=0), 1e-5)), 1e-5)
    np.testing.assert_allclose(report.scales["blocks/1/ffn_in"], s, rtol=1e-5)
    np.testing.assert_allclose(model.blocks[1].ffn_norm.scale[...], ref.blocks[1].ffn_norm.scale[...] / s, rtol=1e-5)


def test_smoothquant_lowers_the_int8_activation_error_of_an_outlier_channel():
    """Two residual channels scaled up 40x by every norm (kernel rows scaled down to compensate, so the
    16-bit model is unchanged): per-token int8 activations then lose most of the other channels. After
    SmoothQuant (α = 0.5) the same W16A8 model's logits are much closer to the 16-bit ones."""
    model = tiny_model(init_std=0.1)
    outliers, factor = np.array([3, 17]), 40.0
    for block in model.blocks:
        for norm, lins in ((block.attn_norm, (block.attn.q, block.attn.k, block.attn.v)),
                           (block.ffn_norm, (block.ffn.gate, block.ffn.up))):
            norm.scale[...] = norm.scale[...].at[outliers].multiply(factor)
            for lin in lins:
                lin.kernel[...] = lin.kernel[...].at[outliers].divide(factor)
    toks = tokens(7, batch=8)
    ref = logits_of(model, toks)

    def a8_error(m):
        set_activation_quant(m, ActQuant("int8"))
        err = float(np.mean((logits_of(m, toks) - ref) ** 2))
        set_activation_quant(m, None)
        return err

    before = a8_error(model)
    report = smooth_model(model, tokens(8, batch=8), alpha=0.5)
    np.testing.assert_allclose(logits_of(model, toks), ref, rtol=1e-4, atol=1e-5)
    after = a8_error(model)
    assert after < 0.25 * before, (before, after)
    ratio_before, ratio_after = report.outlier_ratio()["blocks/0/attn_in"]
    assert ratio_before > 10 and ratio_after < ratio_before / 3
