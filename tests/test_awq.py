"""AWQ as published (efftrain.quant.awq_model) and the calibration machinery around it, on tiny untrained
models of every block kind (CPU): the capture path equals the model's forward, the fold is exact, the
folded quantized model is the scaled-then-quantized one, the search scores the block output on 16-bit
inputs, and routed experts are calibrated on enough tokens or say that they were not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.model.layers import Linear
from efftrain.model.moe import Router
from efftrain.model.transformer import build_model
from efftrain.quant import apply as quant_apply
from efftrain.quant import awq_model
from efftrain.quant.apply import (QuantReport, QuantSettings, _block_pass, capture_linear_inputs, dequantize_arrays,
                                  expert_stats, observed_modules, packed_arrays, quantize_model)
from efftrain.quant.awq import awq_scale, weight_mean
from efftrain.quant.awq_model import fold, fold_block, quantize_folded_block, scale_groups, search_block_scales
from efftrain.quant.formats import kernel_format, make_format

from conftest import tiny_raw

MLA = {"attention": "mla", "mla": {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                                   "qk_rope_head_dim": 4, "v_head_dim": 8}}
MOE = {"moe": {"enabled": True, "num_routed_experts": 4, "top_k": 2, "expert_hidden": 32, "first_dense_layers": 1}}
KINDS = {
    "dense": {},
    "gqa": {"n_heads": 4, "n_kv_heads": 2},
    "mla": MLA,
    "mla-no-q-lora": {**MLA, "mla": {**MLA["mla"], "q_lora_rank": 0}},
    "moe": MOE,
}
B, T = 8, 16


def tiny_model(kind: str, seed: int = 0):
    raw = tiny_raw("x", model={"vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64,
                               "compute_dtype": "float32", **KINDS[kind]})
    return build_model(from_dict(raw).model, seed=seed)


def tokens(seed: int = 0, batch: int = B):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 384, (batch, T)))


POSITIONS = jnp.broadcast_to(jnp.arange(T), (B, T))


def copy(module):
    return nnx.merge(*nnx.split(jax.tree.map(jnp.array, module)))


@pytest.fixture(scope="module", params=list(KINDS))
def block_case(request):
    """(kind, model, the last block, its 16-bit input h) — the last block is the MoE one for 'moe'."""
    model = tiny_model(request.param)
    h = model.embed(tokens())
    for block in model.blocks[:-1]:
        h = block(h, POSITIONS)[0]
    return request.param, model, model.blocks[-1], h


def test_capture_path_is_the_models_forward(block_case, monkeypatch):
    """What `_block_pass` captures is what the real (eager) forward feeds every Linear and router,
    recorded here by wrapping their __call__ (not through the observer), and its output is Block.__call__'s;
    with no capture active the hook changes nothing (bitwise)."""
    kind, _, block, h = block_case
    plain = block(h, POSITIONS)[0]
    seen = {}
    for cls in (Linear, Router):
        original = cls.__call__

        def spy(self, x, _original=original):
            seen.setdefault(id(self), []).append(x)
            return _original(self, x)

        monkeypatch.setattr(cls, "__call__", spy)
    eager = block(h, POSITIONS)[0]
    monkeypatch.undo()
    np.testing.assert_array_equal(eager, plain)
    with capture_linear_inputs():
        np.testing.assert_array_equal(block(h, POSITIONS)[0], plain)  # the hook itself changes no number
    captured, out = _block_pass(block, h, POSITIONS)
    np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-6)
    names = {name for name, _ in observed_modules(block)}
    assert set(captured) == names and ("ffn/router" in names) == (kind == "moe")
    for name, module in observed_modules(block):
        (x,) = seen[id(module)]
        np.testing.assert_allclose(captured[name], x.reshape(-1, x.shape[-1]), rtol=1e-5, atol=1e-6, err_msg=name)


def test_scale_groups_cover_the_shared_inputs(block_case):
    kind, _, block, _ = block_case
    groups = {g.name: g for g in scale_groups(block)}
    attn_in = groups["attn_in"].weights
    assert attn_in == {"mla": ("attn/q_down", "attn/kv_down"), "mla-no-q-lora": ("attn/q", "attn/kv_down")}.get(
        kind, ("attn/q", "attn/k", "attn/v"))
    assert ("o" in groups) == (kind != "gqa")  # v -> o only where v's outputs are o's inputs one to one
    if kind == "moe":
        assert groups["ffn_in"].weights == ("ffn/w_gate", "ffn/w_up", "ffn/shared/gate", "ffn/shared/up")
        assert groups["ffn_in"].also == ("ffn/router/kernel",) and groups["shared_down"].prev == "ffn/shared/up"
    else:
        assert groups["ffn_in"].weights == ("ffn/gate", "ffn/up") and groups["down"].prev == "ffn/up"


def _random_scales(bs, seed=0):
    """The searched scales replaced by log-uniform ones in [1/8, 8]: a fold that is exact for these is exact."""
    rng = np.random.default_rng(seed)

    def rand(s):
        return jnp.asarray(np.exp(rng.uniform(-2, 2, s.shape)), jnp.float32)

    return bs._replace(scales={k: rand(v) for k, v in bs.scales.items()},
                       expert_down=None if bs.expert_down is None else rand(bs.expert_down))


AWQ3 = QuantSettings(method="awq", bits=3, group_size=-1)


def _searched(block, h, seed):
    """(captured inputs, 16-bit output, ExpertStats or None, BlockScales with random scales) of a block."""
    captured, out = _block_pass(block, h, POSITIONS)
    experts = expert_stats(block.ffn, captured["ffn/router"], AWQ3, QuantReport()) if block.is_moe else None
    return captured, out, experts, _random_scales(search_block_scales(block, captured, POSITIONS, AWQ3, experts), seed)


def test_fold_is_exact(block_case):
    """Folding s into the norm / previous Linear (and the router's rows) and s into the weights' rows leaves
    the 16-bit block's function unchanged, routing included."""
    kind, _, block, h = block_case
    _, ref, _, bs = _searched(block, h, seed=0)
    folded = copy(block)
    fold_block(folded, bs)
    assert not np.allclose(folded.attn.kv_down.kernel[...] if "mla" in kind else folded.attn.q.kernel[...],
                           block.attn.kv_down.kernel[...] if "mla" in kind else block.attn.q.kernel[...])
    np.testing.assert_allclose(folded(h, POSITIONS)[0], ref, rtol=1e-5, atol=1e-6)
    if block.is_moe:
        x2d = folded.ffn_norm(h).reshape(-1, h.shape[-1])
        np.testing.assert_array_equal(folded.ffn.route(x2d).expert_idx,
                                      block.ffn.route(block.ffn_norm(h).reshape(-1, h.shape[-1])).expert_idx)


def test_folded_quantized_block_is_the_scaled_then_quantized_block(block_case):
    """The quantized folded block (norm / s, kernels Q(diag(s) w)) computes what AWQ searched for: the
    16-bit norms with the effective weights Q(diag(s) w) / s. Unfolding (fold with 1/s) gives that model
    and restores the 16-bit norms."""
    _, _, block, h = block_case
    captured, _, experts, bs = _searched(block, h, seed=1)
    q = copy(block)
    fold_block(q, bs)
    report = QuantReport(method="awq")
    quantize_folded_block(q, captured, bs, AWQ3, report, "b", experts)
    out_q = q(h, POSITIONS)[0]
    unfolded = copy(q)
    for grp in bs.groups:
        fold(unfolded, grp, 1 / bs.scales[grp.name])
    if bs.expert_down is not None:
        moe = unfolded.ffn
        moe.w_up[...] = moe.w_up[...] * bs.expert_down[:, None, :]
        moe.w_down[...] = moe.w_down[...] / bs.expert_down[:, :, None]
    np.testing.assert_allclose(unfolded.attn_norm.scale[...], block.attn_norm.scale[...], rtol=1e-6)
    np.testing.assert_allclose(unfolded.ffn_norm.scale[...], block.ffn_norm.scale[...], rtol=1e-6)
    np.testing.assert_allclose(unfolded(h, POSITIONS)[0], out_q, rtol=1e-5, atol=1e-6)
    assert report.packed and all(inv_s is None for _, inv_s in report.packed.values())  # no explicit 1/s


def test_search_scores_the_block_output_on_16bit_inputs():
    """The attention group's error at each α is the mean squared attention-output error with q/k/v as
    Q(diag(s) w)/s, computed here by hand; and model-level AWQ calibrates block 1 on the 16-bit model's
    block-0 output (the reference runs the FP model), not on the quantized one."""
    model = tiny_model("dense")
    s = QuantSettings(method="awq", bits=3, group_size=-1)
    h = model.embed(tokens())
    captured, _ = _block_pass(model.blocks[0], h, POSITIONS)
    attn = model.blocks[0].attn
    x = captured["attn/q"]
    sx = jnp.mean(jnp.abs(x), axis=0)
    f = make_format(3)
    fs, maxq = kernel_format(f)
    alphas = jnp.asarray([0.0, 0.5, 1.0])
    graphdef, state = nnx.split(attn)
    errors = awq_model._search_block(graphdef, state, (x.reshape(B, T, -1), POSITIONS), sx, None, alphas, maxq,
                                     call=awq_model._attn_out, paths=("q", "k", "v"), f=fs, g=32)
    from efftrain.quant import quantize_rtn

    ref = attn(x.reshape(B, T, -1), POSITIONS)
    for alpha, err in zip(alphas, np.asarray(errors)):
        sc = np.asarray(awq_scale(sx, alpha))[:, None]
        other = copy(attn)
        for name in ("q", "k", "v"):
            w = np.asarray(getattr(other, name).kernel[...])
            getattr(other, name).kernel[...] = jnp.asarray(quantize_rtn(w * sc, bits=3, group_size=-1) / sc)
        expected = float(jnp.mean((other(x.reshape(B, T, -1), POSITIONS) - ref) ** 2))
        assert err == pytest.approx(expected, rel=1e-4)

    seen = []
    original = awq_model.quantize_block_awq

    def spy(block, inputs, *args, **kwargs):
        seen.append(inputs["attn/q"])
        return original(block, inputs, *args, **kwargs)

    fresh = tiny_model("dense")
    h16 = fresh.blocks[0](fresh.embed(tokens()), POSITIONS)[0]
    expected_in = _block_pass(fresh.blocks[1], h16, POSITIONS)[0]["attn/q"]
    quant_apply.quantize_block_awq = spy  # the name quantize_model calls
    try:
        quantize_model(tiny_model("dense"), np.asarray(tokens()), s)
    finally:
        quant_apply.quantize_block_awq = original
    np.testing.assert_allclose(seen[1], expected_in, rtol=1e-5, atol=1e-6)


def test_duo_scaling_and_weight_mean():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    w2 = rng.standard_normal((3, 64, 8)).astype(np.float32)  # a stack counts as 3 x 8 more columns
    g = 16
    ref = []
    for a in (w, *w2):
        aa = np.abs(a).reshape(64 // g, g, -1)
        ref.append((aa / (aa.max(axis=1, keepdims=True) + 1e-6)).reshape(64, -1))
    np.testing.assert_allclose(weight_mean([w, w2], g), np.concatenate(ref, axis=1).mean(axis=1), rtol=1e-5)
    xm = jnp.asarray(rng.uniform(0.1, 3, 64), jnp.float32)
    wm = jnp.asarray(rng.uniform(0.1, 1, 64), jnp.float32)
    s = np.asarray(awq_scale(xm, 0.3, wm))
    raw = np.maximum(np.asarray(xm) ** 0.3 / (np.asarray(wm) ** 0.7 + 1e-4), 1e-4)
    np.testing.assert_allclose(s, raw / np.sqrt(raw.max() * raw.min()), rtol=1e-5)
    np.testing.assert_allclose(awq_scale(xm, 0.0), 1.0)


def test_expert_token_floor_defaults_to_twice_the_input_width():
    """Gate/up (input 32) need 64 tokens, down (input 48) 96: an expert below either floor is a fallback."""
    raw = tiny_raw("x", model={"vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64,
                               "compute_dtype": "float32", "moe": {**MOE["moe"], "expert_hidden": 48}})
    moe = build_model(from_dict(raw).model).blocks[1].ffn
    s = QuantSettings(method="gptq", bits=3)
    assert (s.min_tokens(32), s.min_tokens(48), QuantSettings(method="gptq", bits=3, min_expert_tokens=5).min_tokens(48)) \
        == (64, 96, 5)
    x = jax.random.normal(jax.random.key(1), (160, 32))
    report = QuantReport()
    st = expert_stats(moe, x, s, report)
    counts = np.asarray(st.counts)
    np.testing.assert_array_equal(st.ok_in, counts >= 64)
    np.testing.assert_array_equal(st.ok_hidden, counts >= 96)
    assert report.finish().expert_fallbacks == int(np.sum(counts < 96)) > 0


@pytest.mark.parametrize("method", ["awq", "gptq", "awq-linear"])
def test_moe_fallback_is_labelled(method):
    """Experts with enough tokens are calibrated and the label is the method's; an unreachable floor puts
    every expert on RTN and the report's label says so."""
    calib = np.asarray(tokens())  # 128 tokens, top-2 of 4 experts: ~64 each
    report = quantize_model(tiny_model("moe"), calib, QuantSettings(method=method, bits=3, group_size=-1,
                                                                    min_expert_tokens=8))
    (counts,) = report.expert_tokens
    assert counts.sum() == B * T * 2 and report.expert_fallbacks == 0 and report.method_label == method
    starved = quantize_model(tiny_model("moe"), calib, QuantSettings(method=method, bits=3, group_size=-1,
                                                                     min_expert_tokens=10**6))
    assert starved.expert_fallbacks == 4 and starved.method_label == f"{method}+rtn-fallback"


def test_expert_statistics_routed_all_and_gate_weighted():
    """The Gram of each expert equals Σ over its tokens of (g x)(g x)ᵀ, computed independently; with
    expert_calibration='all' every expert counts every token."""
    model = tiny_model("moe")
    moe = model.blocks[1].ffn
    x = jax.random.normal(jax.random.key(0), (200, 32))
    r = moe.route(x)
    idx, gates, scores = map(np.asarray, (r.expert_idx, r.gates, r.scores))
    xn = np.asarray(x, np.float64)
    for mode, weighted in (("routed", False), ("routed", True), ("all", False), ("all", True)):
        s = QuantSettings(method="gptq", bits=3, expert_calibration=mode, expert_gate_weighted=weighted)
        st = expert_stats(moe, x, s, QuantReport())
        for e in range(4):
            routed = np.any(idx == e, axis=1)
            gate = np.where(idx == e, gates, 0).sum(axis=1)
            used = np.ones(200, bool) if mode == "all" else routed
            row = (scores[:, e] if mode == "all" else gate) if weighted else used.astype(float)
            xe = xn * row[:, None]
            np.testing.assert_allclose(st.gram_in[e], xe.T @ xe, rtol=1e-4, atol=1e-5)
            assert int(st.counts[e]) == used.sum()
            np.testing.assert_allclose(st.mean_in[e], np.abs(xn[used]).mean(axis=0), rtol=1e-5)


def test_moe_awq_packed_round_trip_and_no_extra_bits():
    """Stacked expert entries are written per expert and reload to the model's weights; awq charges the
    same bits as rtn (its scales are folded, also into the router)."""
    model = tiny_model("moe")
    router_before = np.asarray(model.blocks[1].ffn.router.kernel[...]).copy()
    report = quantize_model(model, np.asarray(tokens()), QuantSettings(method="awq", bits=4, group_size=-1))
    rtn = quantize_model(tiny_model("moe"), np.asarray(tokens()), QuantSettings(method="rtn", bits=4, group_size=-1))
    assert report.eff_bits == rtn.eff_bits and report.n_params == rtn.n_params
    assert not np.allclose(model.blocks[1].ffn.router.kernel[...], router_before)  # compensated for the fold
    weights = dequantize_arrays(packed_arrays(report), bits=4, fmt="int")
    assert {k for k in weights if "#" in k} == {f"blocks/1/ffn/{n}#{e}" for n in ("w_gate", "w_up", "w_down")
                                               for e in range(4)}
    for e in range(4):
        np.testing.assert_array_equal(weights[f"blocks/1/ffn/w_down#{e}"], model.blocks[1].ffn.w_down[...][e])
    np.testing.assert_array_equal(weights["blocks/0/attn/q/kernel"], model.blocks[0].attn.q.kernel[...])


def test_head_scale_is_folded_into_final_norm_and_every_mtp_out_norm():
    """With quantize_head, the head's s goes into final_norm and into each MTP module's out_norm (they
    feed the same head), so the MTP path keeps its function too; no explicit 1/s is stored."""
    raw = tiny_raw("x", model={"vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64,
                               "compute_dtype": "float32", "tie_embeddings": False, "mtp": {"depth": 1}})
    cfg = from_dict(raw)
    model, fresh = build_model(cfg.model, seed=0), build_model(cfg.model, seed=0)
    report = quantize_model(model, np.asarray(tokens()), QuantSettings(method="awq", bits=4, group_size=-1,
                                                                       quantize_head=True))
    assert "lm_head/kernel" in report.packed and report.packed["lm_head/kernel"][1] is None
    s_final = fresh.final_norm.scale[...] / model.final_norm.scale[...]
    s_mtp = fresh.mtp.layers[0].out_norm.scale[...] / model.mtp.layers[0].out_norm.scale[...]
    assert not np.allclose(s_final, 1) and np.allclose(s_final, s_mtp, rtol=1e-6)


def test_one_program_per_layer_shape_reused_across_layers_bits_and_checkpoints():
    """3 identical blocks compile the block search twice (attention, MLP), not per layer; a second row at
    another bit width on other weights (another checkpoint) compiles nothing new, for AWQ and GPTQ."""
    from efftrain.quant import awq, gptq

    raw = tiny_raw("x", model={"vocab_size": 384, "d_model": 48, "n_layers": 3, "n_heads": 2, "mlp_hidden": 96,
                               "compute_dtype": "float32"})
    cfg = from_dict(raw).model
    programs = (awq_model._search_block, awq.best_scales, awq.clip_quantize, gptq._gptq_core, gptq._xtx2)

    def sizes():
        return [p._cache_size() for p in programs]

    before = sizes()
    for method in ("awq", "gptq"):
        quantize_model(build_model(cfg, seed=0), np.asarray(tokens()), QuantSettings(method=method, bits=3))
    first = sizes()
    assert first[0] - before[0] == 2
    for method in ("awq", "gptq"):
        quantize_model(build_model(cfg, seed=1), np.asarray(tokens()), QuantSettings(method=method, bits=4))
    assert sizes() == first
