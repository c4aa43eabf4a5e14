"""Simulated FP8 GEMMs (efftrain/fp8/): formats, scaling, accumulation, custom-VJP linear, kernel choice."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from efftrain.config import FP8Config
from efftrain.fp8 import (FloatFormat, KernelChoice, cast_to_format, dequantize, fake_quantize, fake_quantize_many,
                          float_format, fp8_linear, fp8_matmul, implementation_record, quantize, round_mantissa)

ML_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}


@functools.lru_cache(maxsize=None)
def _jit_cast(fmt):
    return jax.jit(functools.partial(cast_to_format, fmt=fmt))


def _cast_generic(x, fmt):
    return np.asarray(_jit_cast(fmt)(np.asarray(x, np.float32)))


def _matmul(a, b, **kw):
    return np.asarray(jax.jit(functools.partial(fp8_matmul, **kw))(a, b))


# jitted once per static configuration: eager jnp would compile every primitive for every new shape
_quantize = jax.jit(quantize, static_argnums=(1, 2, 3))
_dequantize = jax.jit(dequantize, static_argnums=(2,))
_fake_quantize_jit = jax.jit(fake_quantize, static_argnums=(1, 2, 3))


def _fake_quantize(x, fmt="e4m3", block=(1, 128), pow2_scales=False):
    return np.asarray(_fake_quantize_jit(np.asarray(x, np.float32), fmt, block, pow2_scales))


def _same_bits(x, y):
    return np.array_equal(np.asarray(x, np.float32).view(np.uint32), np.asarray(y, np.float32).view(np.uint32))


def _finite_values(dtype):
    """Every finite value of a ≤ 8-bit ml_dtypes format, ascending, as float32 (±0 collapsed to +0)."""
    vals = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32)
    return np.unique(vals[np.isfinite(vals)] + np.float32(0))


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------
def test_format_constants():
    e4, e5, e56 = float_format("e4m3"), float_format("e5m2"), float_format("e5m6")
    assert (e4.max, e4.min_normal, e4.min_subnormal) == (448.0, 2.0**-6, 2.0**-9)
    assert (e5.max, e5.min_normal, e5.min_subnormal) == (57344.0, 2.0**-14, 2.0**-16)
    assert e56.max == (2 - 2.0**-6) * 2.0**15
    assert float_format("E4M3FN") == e4
    with pytest.raises(ValueError):
        float_format("int8")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_cast_bit_exact_with_ml_dtypes_on_random_values(fmt):
    f, rng = float_format(fmt), np.random.default_rng(0)
    magnitudes = np.exp2(rng.uniform(np.log2(f.min_subnormal) - 3, np.log2(f.max) + 1, 60_000))
    parts = [
        rng.choice([-1.0, 1.0], 60_000) * magnitudes,  # every binade incl. subnormals and overflow
        rng.uniform(-f.min_normal, f.min_normal, 20_000),  # the subnormal range, densely
        rng.uniform(0.9 * f.max, 1.1 * f.max, 5_000) * rng.choice([-1.0, 1.0], 5_000),  # near max
        [0.0, -0.0, f.max, -f.max, f.min_subnormal / 2, 3 * f.min_subnormal / 2, f.min_subnormal / 4],
    ]
    x = np.concatenate([np.asarray(p, np.float32) for p in parts])
    expected = np.clip(x, -f.max, f.max).astype(ML_DTYPES[fmt]).astype(np.float32)
    got = _cast_generic(x, fmt)
    assert _same_bits(got, expected), f"{np.sum(got != expected)} mismatches"


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_cast_representable_values_and_ties(fmt):
    vals = _finite_values(ML_DTYPES[fmt])
    assert len(vals) == {"e4m3": 253, "e5m2": 247}[fmt]  # 256 patterns − NaN/inf − duplicate zero
    assert _same_bits(_cast_generic(vals, fmt), vals) and _same_bits(_cast_generic(-vals, fmt), -vals)
    # exact midpoints between neighbours (ties → even mantissa) and their float32 neighbours
    mid = ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)
    probes = np.concatenate([mid, np.nextafter(mid, 0), np.nextafter(mid, np.inf)])
    probes = np.concatenate([probes, -probes])
    expected = probes.astype(ML_DTYPES[fmt]).astype(np.float32)
    assert _same_bits(_cast_generic(probes, fmt), expected)
    got_mid = _cast_generic(mid, fmt)
    mantissa_lsb = got_mid.astype(ML_DTYPES[fmt]).view(np.uint8) & 1
    assert np.all(mantissa_lsb[got_mid != vals[-1]] == 0), "ties must round to the even neighbour"


@pytest.mark.parametrize("name,fmt", [("float8_e4m3", FloatFormat("e4m3ieee", 4, 3, False)),
                                      ("float8_e3m4", "e3m4"), ("float6_e3m2fn", "e3m2fn"),
                                      ("float6_e2m3fn", "e2m3fn"), ("float4_e2m1fn", "e2m1fn")])
def test_generic_exmy_matches_other_ml_dtypes_formats(name, fmt):
    dtype = getattr(ml_dtypes, name, None)
    if dtype is None:
        pytest.skip(f"ml_dtypes has no {name}")
    f = float_format(fmt)
    assert f.max == float(ml_dtypes.finfo(dtype).max)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(20_000) * np.exp2(rng.uniform(-12, 6, 20_000))).astype(np.float32)
    vals = _finite_values(dtype)
    x = np.concatenate([x, vals, ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)])
    expected = np.clip(x, -f.max, f.max).astype(dtype).astype(np.float32)
    assert _same_bits(np.asarray(cast_to_format(x, f)), expected)


def test_saturation_and_specials():
    x = np.array([449.0, 464.0, 470.0, 1e6, np.inf, -500.0, -np.inf, np.nan], np.float32)
    got = _cast_generic(x, "e4m3")
    np.testing.assert_array_equal(got[:7], [448, 448, 448, 448, 448, -448, -448])
    assert np.isnan(got[7])
    got = _cast_generic([6e4, 1e9, -np.inf], "e5m2")
    np.testing.assert_array_equal(got, [57344, 57344, -57344])


def test_e5m6_precision_and_value_count():
    f = float_format("e5m6")
    # a dense geometric sweep over the whole range hits every positive finite value exactly once-or-more
    sweep = np.exp2(np.linspace(np.log2(f.min_subnormal) - 1, np.log2(f.max) + 0.5, 80_000)).astype(np.float32)
    values = np.unique(_cast_generic(sweep, "e5m6"))
    assert values[-1] == f.max == 65024.0
    assert len(values[values > 0]) == 31 * 64 - 1  # exponent fields 0..30 × 64 mantissas, minus zero
    assert len(values[(values >= 1) & (values < 2)]) == 64
    assert _same_bits(_cast_generic(values, "e5m6"), values)
    rng = np.random.default_rng(2)
    x = np.exp2(rng.uniform(-14, 15.9, 50_000)).astype(np.float32)
    rel = np.abs(_cast_generic(x, "e5m6") - x) / x
    assert rel.max() <= 2.0**-7 and rel.max() > 2.0**-8  # half an ulp of a 6-bit mantissa, and tight


def test_round_mantissa():
    x = np.array([1 + 2.0**-10 + 2.0**-12, -(1 + 2.0**-10 + 2.0**-12), 1 + 3 * 2.0**-11, np.inf], np.float32)
    np.testing.assert_array_equal(round_mantissa(x, 10, "truncate"), [1 + 2.0**-10, -(1 + 2.0**-10),
                                                                      1 + 2.0**-10, np.inf])
    # 1 + 3·2^-11 is a tie at 10 bits: RNE → 1 + 2·2^-10 (even)
    np.testing.assert_array_equal(round_mantissa(x, 10, "nearest")[2:], [1 + 2.0**-9, np.inf])
    np.testing.assert_array_equal(round_mantissa(x, 23), x)


# ----------------------------------------------------------------------------------------------
# Scaling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("block", [(1, 128), (128, 128), (1, -1), (-1, -1)])
def test_quantize_dequantize_error_bound(fmt, block):
    f, rng = float_format(fmt), np.random.default_rng(3)
    x = (rng.standard_normal((256, 384)) * np.exp2(rng.integers(-8, 8, (256, 1)))).astype(np.float32)
    q, scale = _quantize(x, fmt, block, False)
    r, c = (256 if block[0] == -1 else block[0]), (384 if block[1] == -1 else block[1])
    assert scale.shape == (256 // r, 384 // c)
    s = np.asarray(_dequantize(np.ones_like(x), scale, block))
    assert _same_bits(_cast_generic(np.asarray(q), fmt), q)  # q is on the format's grid
    assert np.abs(np.asarray(q)).max() == f.max  # every block's amax maps to max (exactly or saturating)
    err = np.abs(np.asarray(_dequantize(q, scale, block)) - x)
    bound = 2.0 ** -(f.man_bits + 1) * np.abs(x) + f.min_subnormal / 2 * s  # half-ulp relative + subnormal step
    assert np.all(err <= bound * (1 + 1e-6))


def test_quantize_zero_block_and_pow2_scales():
    x = np.zeros((4, 256), np.float32)
    x[0, :128] = np.linspace(-3, 5, 128)
    q, scale = _quantize(x, "e4m3", (1, 128), False)
    assert np.all(np.isfinite(np.asarray(q))) and np.all(np.isfinite(np.asarray(scale)))
    assert np.all(_fake_quantize(x, "e4m3", (1, 128))[1:] == 0)
    q, scale = _quantize(x * 3.3, "e4m3", (1, 128), True)
    mant, _ = np.frexp(np.asarray(scale))
    assert np.all(mant == 0.5)  # powers of two
    assert np.abs(np.asarray(q)).max() <= 448 and scale[0, 0] == 2.0 ** np.ceil(np.log2(5 * 3.3 / 448))


def test_quantize_non_divisible_shapes_and_leading_dims():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 200)).astype(np.float32) * 7
    q, scale = _quantize(x, "e4m3", (2, 128), False)  # rows 10 → 5 row blocks, cols 200 → blocks 128 + 72
    assert q.shape == x.shape and scale.shape == (5, 2)
    x2 = x.reshape(10, 200)
    expected = np.empty_like(x2)
    for i in range(5):
        for j, cols in enumerate([slice(0, 128), slice(128, 200)]):
            blk = x2[2 * i: 2 * i + 2, cols]
            s = np.float32(scale[i, j])
            np.testing.assert_allclose(s, np.abs(blk).max() / 448, rtol=2e-7)
            expected[2 * i: 2 * i + 2, cols] = (blk * (np.float32(1) / s)).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(q).reshape(10, 200), expected)


def test_tile_scaling_beats_tensor_scaling_with_outlier_channels():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    outliers = [5, 77]  # two huge channels, both in the first 1×128 tile
    x[:, outliers] *= 3e4
    w = (rng.standard_normal((1024, 32)) / 32).astype(np.float32)
    w[outliers] = 0  # y only sees the ordinary channels; the outliers still set the scales
    y_ref = x.astype(np.float64) @ w

    def errors(block):
        keep = np.setdiff1d(np.arange(1024), outliers)
        dx = _fake_quantize(x, "e4m3", block)
        x_err = np.linalg.norm((dx - x)[:, keep]) / np.linalg.norm(x[:, keep])
        y = _matmul(x, w, a_block=block, accum_bits=None)
        return x_err, np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)

    tile, tensor = errors((1, 128)), errors((-1, -1))
    assert tile[0] < 0.5 * tensor[0] and tile[1] < 0.5 * tensor[1], (tile, tensor)
    assert tile[1] < 0.05  # 7 of 8 tiles untouched by the outliers: close to plain E4M3 rounding


# ----------------------------------------------------------------------------------------------
# GEMM
# ----------------------------------------------------------------------------------------------
def _dequantized_f64(a, b, a_block, b_block, fmt="e4m3", b_fmt=None):
    da = _fake_quantize(a, fmt, a_block).astype(np.float64).reshape(-1, a.shape[-1])
    db = _fake_quantize(b, b_fmt or fmt, b_block).astype(np.float64)
    return da, db


@pytest.mark.parametrize("a_block,b_block", [((1, 128), (128, 128)), ((-1, -1), (1, -1)), ((4, 64), (32, 16))])
def test_exact_accumulation_matches_float64_of_dequantized(a_block, b_block):
    rng = np.random.default_rng(6)
    a = rng.standard_normal((2, 20, 200)).astype(np.float32)  # leading dims, K not divisible by 128
    b = rng.standard_normal((200, 24)).astype(np.float32)
    da, db = _dequantized_f64(a, b, a_block, b_block)
    got = _matmul(a, b, a_block=a_block, b_block=b_block, accum_bits=None)
    assert got.shape == (2, 20, 24) and got.dtype == np.float32
    err = np.abs(got.reshape(40, 24) - da @ db) / (np.abs(da) @ np.abs(db))
    assert err.max() < 1e-6


@pytest.mark.parametrize("promote_every,a_block", [(128, (1, 128)), (None, (1, 128)), (128, (1, 64))])
def test_simulated_accumulation_applies_each_blocks_scale(promote_every, a_block):
    # K-blocks of wildly different magnitude: a wrong scale on any block shows up as a gross error.
    rng = np.random.default_rng(7)
    a = rng.standard_normal((16, 384)).astype(np.float32) * np.repeat(np.float32([1e-3, 1.0, 1e3]), 128)
    b = rng.standard_normal((384, 16)).astype(np.float32) * np.repeat(np.float32([1e2, 1.0, 1e-2]), 128)[:, None]
    da, db = _dequantized_f64(a, b, a_block, (128, 128))
    got = _matmul(a, b, a_block=a_block, accum_bits=23, promote_every=promote_every)  # ~fp32 accumulator
    err = np.abs(got - da @ db) / (np.abs(da) @ np.abs(db))
    assert err.max() < 1e-5


def test_kstep_must_not_straddle_scaling_blocks():
    a, b = np.ones((4, 256), np.float32), np.ones((256, 4), np.float32)
    with pytest.raises(ValueError, match="straddle"):
        fp8_matmul(a, b, a_block=(1, 48), k_step=32)
    with pytest.raises(ValueError, match="multiple of k_step"):
        fp8_matmul(a, b, promote_every=100)


def test_limited_accumulation_swamping_and_promotion():
    """Metric: mean over outputs of |C − C64| / C64, C64 = float64 matmul of the same dequantized operands."""
    rng = np.random.default_rng(8)

    def rel_err(k, **kw):
        a = rng.uniform(0, 1, (32, k)).astype(np.float32)
        b = rng.uniform(0, 1, (k, 32)).astype(np.float32)
        ref = np.matmul(*_dequantized_f64(a, b, (1, 128), (128, 128)))
        return (_matmul(a, b, accum_bits=14, **kw) - ref) / ref

    short = rel_err(512, promote_every=None)
    long = rel_err(4096, promote_every=None)
    promoted = rel_err(4096, promote_every=128)
    nearest = rel_err(4096, promote_every=None, rounding="nearest")
    assert 1e-3 <= np.abs(long).mean() <= 2e-2
    assert np.abs(long).mean() > 4 * np.abs(short).mean()  # swamping grows with K
    assert np.abs(promoted).mean() * 10 <= np.abs(long).mean()  # promotion every 128 fixes it
    assert np.all(long < 0)  # truncation only ever loses magnitude
    assert np.abs(nearest.mean()) < 0.1 * np.abs(long.mean())  # round-to-nearest is ~unbiased


# ----------------------------------------------------------------------------------------------
# fp8_linear
# ----------------------------------------------------------------------------------------------
def _cfg(**kw):
    return FP8Config(enabled=True, **kw)


def _value_and_grads(cfg, x, w, r):
    def loss(x, w):
        y = fp8_linear(x, w, cfg) if cfg is not None else jnp.dot(x, w)
        return jnp.sum(y.astype(jnp.float32) * r), y

    (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
    return y, dx, dw


def _data(dtype=jnp.float32, shape=(2, 8, 256), n=64, seed=9):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(shape), dtype)
    w = jnp.asarray(rng.standard_normal((shape[-1], n)) / 16, dtype)
    r = jnp.asarray(rng.standard_normal((*shape[:-1], n)), jnp.float32)
    return x, w, r


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_all_flags_off_is_plain_matmul(dtype):
    x, w, r = _data(dtype)
    cfg = _cfg(forward=False, input_grad=False, weight_grad=False)
    for got, want in zip(_value_and_grads(cfg, x, w, r), _value_and_grads(None, x, w, r)):
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("accum_bits,grad_fmt,max_err", [(14, "e4m3", 0.05), (None, "e5m2", 0.1)])
def test_linear_fp8_forward_and_grads(accum_bits, grad_fmt, max_err):
    x, w, r = _data()
    cfg = _cfg(accum_bits=accum_bits, grad_fmt=grad_fmt)
    y, dx, dw = _value_and_grads(cfg, x, w, r)
    y_ref, dx_ref, dw_ref = _value_and_grads(None, x, w, r)
    kw = dict(accum_bits=accum_bits, promote_every=128, k_step=32, rounding="truncate")
    np.testing.assert_allclose(y, _matmul(x, w, **kw), rtol=1e-6, atol=1e-6)  # forward = fp8_matmul
    # the backward GEMMs, spelled out: Dgrad dy(grad_fmt, 1×128 along N) @ wᵀ; Wgrad FP8 xᵀ(1×128 along
    # tokens) @ dy(grad_fmt, 128 tokens × 1)
    dy = np.broadcast_to(r, y.shape).reshape(-1, 64)
    dx_want = _matmul(dy, np.asarray(w).T, fmt=grad_fmt, b_fmt="e4m3", **kw)
    x_fp8 = _fake_quantize(np.asarray(x).reshape(-1, 256), "e4m3", (1, 128))
    dw_want = _matmul(x_fp8.T, dy, fmt="e4m3", b_fmt=grad_fmt, a_block=(1, 128), b_block=(128, 1), **kw)
    np.testing.assert_allclose(np.asarray(dx).reshape(-1, 256), dx_want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw, dw_want, rtol=1e-6, atol=1e-6)
    for got, ref in [(y, y_ref), (dx, dx_ref), (dw, dw_ref)]:
        rel = np.linalg.norm(np.asarray(got) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref))
        assert 1e-3 < rel < max_err  # FP8 noise: present, and small


@pytest.mark.parametrize("flags", [{}, {"accum_bits": None}, {"accum_bits": None, "forward": False},
                                   {"accum_bits": None, "input_grad": False}, {"weight_grad": False}])
def test_linear_shared_input_equals_separate_linears(flags):
    # q/k/v-style linears of one x: quantizing x once (and, with scaling only, making the Wgrad tiling
    # in the forward pass) must give the numbers of separate fp8_linear calls, values and gradients
    from efftrain.fp8 import fp8_linear_shared

    cfg = _cfg(**flags)
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.standard_normal((2, 64, 256)), jnp.bfloat16)
    ws = tuple(jnp.asarray(rng.standard_normal((256, n)) / 16, jnp.bfloat16) for n in (128, 64, 64))
    rs = tuple(jnp.asarray(rng.standard_normal((2, 64, n)), jnp.float32) for n in (128, 64, 64))

    def loss(fn, x, ws):
        return sum(jnp.sum(y.astype(jnp.float32) * r) for y, r in zip(fn(x, ws), rs))

    shared = jax.jit(jax.grad(functools.partial(loss, lambda x, ws: fp8_linear_shared(x, ws, cfg)), (0, 1)))
    separate = jax.jit(jax.grad(functools.partial(loss, lambda x, ws: [fp8_linear(x, w, cfg) for w in ws]), (0, 1)))
    (dx_a, dws_a), (dx_b, dws_b) = shared(x, ws), separate(x, ws)
    for got, want in zip(dws_a, dws_b):
        assert _same_bits(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # dx: the shared version sums the three Dgrad GEMMs in float32 before its one bf16 rounding
    # (the separate calls round each of the three to bf16 and add the roundings up)
    dx_a, dx_b = np.asarray(dx_a, np.float32), np.asarray(dx_b, np.float32)
    assert np.linalg.norm(dx_a - dx_b) < 4e-3 * np.linalg.norm(dx_b)
    ys_a = jax.jit(lambda x, ws: fp8_linear_shared(x, ws, cfg))(x, ws)
    ys_b = jax.jit(lambda x, ws: [fp8_linear(x, w, cfg) for w in ws])(x, ws)  # (eagerly: 5 s of compiles)
    for y_a, y_b in zip(ys_a, ys_b, strict=True):
        assert _same_bits(np.asarray(y_a, np.float32), np.asarray(y_b, np.float32))


@pytest.mark.parametrize("flag", ["forward", "input_grad", "weight_grad"])
def test_linear_each_flag_controls_only_its_gemm(flag):
    x, w, r = _data(shape=(16, 128), n=32)
    flags = {"forward": False, "input_grad": False, "weight_grad": False, flag: True}
    got = _value_and_grads(_cfg(**flags), x, w, r)
    ref = _value_and_grads(None, x, w, r)
    for name, g, e in zip(["forward", "input_grad", "weight_grad"], got, ref):
        same = np.array_equal(np.asarray(g), np.asarray(e))
        assert same == (name != flag), name


def test_linear_dtypes_follow_inputs():
    x, w, r = _data(jnp.bfloat16, shape=(4, 3, 128), n=32)
    y, dx, dw = _value_and_grads(_cfg(), x, w, r)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3 and y.shape == (4, 3, 32)
    y, dx, dw = _value_and_grads(_cfg(accum_bits=None), x, w.astype(jnp.float32), r)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    assert np.all(np.isfinite(np.asarray(dw)))


@pytest.mark.parametrize("promote_every,a_block,unroll,window_unroll", [
    (128, (1, 128), 1, 0), (None, (1, 128), 1, 0), (128, (1, 128), 4, 0), (None, (1, 32), 3, 0),
    (128, (1, 128), 2, 8), (128, (1, 32), 1, 8), (None, (1, 32), 3, 8)])
def test_pallas_kernel_matches_xla_scan(promote_every, a_block, unroll, window_unroll):
    # the fused GPU kernel, run by Pallas' interpreter here: same maths as the lax.scan path, bit for bit
    # (also with several K-steps' products issued before they are accumulated in turn, and with each
    # promotion window unrolled into the body of the loop over windows)
    kernels = KernelChoice.of(_cfg(pallas_unroll=unroll, pallas_window_unroll=window_unroll))
    assert (kernels.pallas_block.unroll, kernels.pallas_block.window_unroll) == (unroll, window_unroll)
    rng = np.random.default_rng(10)
    a = rng.uniform(0, 1, (40, 300)).astype(np.float32)
    b = rng.standard_normal((300, 24)).astype(np.float32)
    kw = dict(a_block=a_block, promote_every=promote_every, accum_bits=12)
    assert _same_bits(_matmul(a, b, impl="pallas", kernels=kernels, **kw), _matmul(a, b, impl="xla", **kw))


@pytest.mark.parametrize("pow2_scales", [False, True])
def test_pallas_fake_quantize_matches_xla(pow2_scales):
    # the one-pass GPU quantizer, run by Pallas' interpreter here: bit for bit the XLA result
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((256, 384)) * np.exp2(rng.integers(-6, 6, (256, 1)))).astype(np.float32)
    x[:128, :128] = 0  # a zero block
    chains = (((("e4m3", (1, 128)),), (("e5m2", (128, 1)),), (("e4m3", (1, 128)), ("e4m3", (128, 1))),
               (("e4m3", (128, 128)),)))
    run = {impl: jax.jit(functools.partial(fake_quantize_many, chains=chains, pow2_scales=pow2_scales,
                                           impl=impl))(x) for impl in ("pallas", "xla")}
    for got, want in zip(run["pallas"], run["xla"]):
        assert _same_bits(got, want)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_quantize_many_gives_quantize_values_and_scales(impl):
    # the accumulator kernels' quantizer: the last stage of each chain as (q, scale) of `quantize`,
    # bit for bit (the GPU kernel run by Pallas' interpreter here), q exact in bf16
    from efftrain.fp8 import quantize, quantize_many

    rng = np.random.default_rng(12)
    x = (rng.standard_normal((256, 384)) * np.exp2(rng.integers(-6, 6, (1, 384)))).astype(np.float32)
    chains = ((("e4m3", (1, 128)),), (("e5m2", (128, 1)),), (("e4m3", (1, 128)), ("e4m3", (128, 1))),
              (("e4m3", (128, 128)),))
    got = jax.jit(functools.partial(quantize_many, chains=chains, impl=impl))(x)
    for chain, (q, scale) in zip(chains, got):
        y = x if len(chain) == 1 else _fake_quantize(x, *chain[0])
        q_want, scale_want = quantize(y, *chain[-1])
        assert q.dtype == jnp.bfloat16 and _same_bits(np.asarray(q, np.float32), q_want)
        assert _same_bits(scale, scale_want)


@pytest.mark.parametrize("pow2_scales", [False, True])
def test_linear_v3_fast_path_equals_generic_path(pow2_scales, monkeypatch):
    # 128-aligned shapes with the default recipe take the fast path (one quantization pass per operand
    # in the kernels' layouts, x's Wgrad tiling kept from the forward, Wgrad on x's stored layout): the
    # same numbers, bit for bit, as the generic path (fp8_matmul per GEMM, x re-quantized in backward)
    from efftrain.fp8 import linear

    rng = np.random.default_rng(15)
    x = jnp.asarray(rng.standard_normal((2, 128, 256)), jnp.bfloat16)
    ws = tuple(jnp.asarray(rng.standard_normal((256, n)) / 16, jnp.bfloat16) for n in (128, 384))
    rs = tuple(jnp.asarray(rng.standard_normal((2, 128, n)), jnp.float32) for n in (128, 384))

    def values_and_grads(cfg, x, ws):
        def loss(x, ws):
            ys = linear.fp8_linear_shared(x, ws, cfg)
            return sum(jnp.sum(y.astype(jnp.float32) * r) for y, r in zip(ys, rs)), ys
        return jax.value_and_grad(loss, (0, 1), has_aux=True)(x, ws)

    calls = []
    backward = linear._backward_v3
    monkeypatch.setattr(linear, "_backward_v3", lambda *a: calls.append(1) or backward(*a))
    fast = jax.tree.leaves(jax.jit(functools.partial(values_and_grads, _cfg(pow2_scales=pow2_scales)))(x, ws))
    assert calls, "the fast path was not taken"
    calls.clear()
    generic_cfg = _cfg(pow2_scales=pow2_scales, v3_fast_path=False)  # the config field turns it off
    generic = jax.tree.leaves(jax.jit(functools.partial(values_and_grads, generic_cfg))(x, ws))
    assert not calls, "fp8.v3_fast_path=false still took the fast path"
    assert len(fast) == len(generic) == 6
    for got, want in zip(fast, generic):
        assert got.dtype == want.dtype and _same_bits(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_mosaic_kernel_lowers_for_cuda_one_kernel_per_shape():
    # the Hopper ping-pong kernel runs only on a GPU (Pallas cannot interpret its TMA pipeline; on the
    # H100 `benchmarks/bench_fp8.py --only check` compares it with the XLA reference). Here: it lowers
    # for CUDA in both A layouts, and call sites of one kernel shape share one lowered kernel (a
    # dense-125m step has 252 call sites and 9 kernels; compiling each site cost ~1 s on the H100)
    from efftrain.fp8 import mosaic

    kw = dict(k_step=32, steps_per_window=4, accum_bits=14, rounding="truncate", out_dtype=jnp.bfloat16)

    def layers(qa, qa_t, qb, sa, sb):
        return [mosaic.accumulate(qa, qb, sa, sb, **kw), mosaic.accumulate(qa * 2, qb, sa, sb, **kw),
                mosaic.accumulate(qa_t, qb, sa, sb, a_transposed=True, **kw)]

    m, k, n = 128, 256, 192
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((m, k), (k, m), (k, n))]
    args += [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((k // 128, m), (k // 128, n))]
    text = jax.jit(layers).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("@mosaic_gpu_v2(") == 2
    if jax.default_backend() != "gpu":  # asked for explicitly off a GPU: a clear error, not a compile failure
        with pytest.raises(ValueError, match="only on a Hopper GPU"):
            _matmul(np.ones((128, 256), np.float32), np.ones((256, 128), np.float32), impl="mosaic")


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_native_float8_converts_match_cast_to_format(fmt):
    # the GPU quantizer kernel uses hardware float8 converts (here: XLA's CPU ones, via the interpreter)
    from efftrain.fp8.formats import native_cast

    f, rng = float_format(fmt), np.random.default_rng(12)
    vals = _finite_values(ML_DTYPES[fmt])
    mid = ((vals[:-1].astype(np.float64) + vals[1:]) / 2).astype(np.float32)
    x = np.concatenate([rng.standard_normal(50_000) * np.exp2(rng.uniform(-20, 18, 50_000)), vals, mid,
                        np.nextafter(mid, 0), np.nextafter(mid, np.inf), [np.inf, -np.inf, f.max * 1.1]])
    x = np.concatenate([x, -x]).astype(np.float32)
    native = np.asarray(jax.jit(lambda v: native_cast(v, f))(x))
    assert _same_bits(native, _cast_generic(x, fmt))


# ----------------------------------------------------------------------------------------------
# Kernel choice: FP8Config fields, resolved per backend
# ----------------------------------------------------------------------------------------------
def test_kernel_choice_defaults_are_the_configs():
    # direct calls (fp8_matmul, fake_quantize_many without `kernels`) use what a default config chooses
    assert KernelChoice.of(FP8Config()) == KernelChoice()
    with pytest.raises(ValueError, match="accumulate_impl"):
        KernelChoice(accumulate_impl="mosaic")
    for bad in (dict(pallas_block_m=48), dict(pallas_num_warps=3), dict(accumulate_impl="mosaic"),
                dict(quantize_impl="pallas"), dict(pallas_unroll=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FP8Config(**bad)


def test_implementation_record_on_this_backend():
    import json

    assert implementation_record(FP8Config()) == {"enabled": False}
    record = implementation_record(_cfg())
    assert json.loads(json.dumps(record)) == record and record["backend"] == jax.default_backend()
    assert record["v3_fast_path"] and not implementation_record(_cfg(v3_fast_path=False))["v3_fast_path"]
    assert implementation_record(_cfg(accum_bits=None))["accumulate"] is None
    if jax.default_backend() != "gpu":  # no kernel off a GPU, whatever the config asks for
        for cfg in (_cfg(), _cfg(accumulate_impl="pallas")):
            assert {k: implementation_record(cfg)[k] for k in ("quantize", "native_casts", "accumulate")} == {
                "quantize": "xla", "native_casts": False, "accumulate": "xla"}


def test_kernel_fields_resolve_on_a_gpu(monkeypatch):
    # what the config fields choose on a GPU (the backend faked: only the resolution runs, no kernel)
    from efftrain.fp8 import matmul

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    hopper = str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")
    assert matmul.auto_accumulation_impl(True, True, KernelChoice()) == ("mosaic" if hopper else "pallas")
    assert matmul.auto_accumulation_impl(True, True, KernelChoice(accumulate_impl="pallas")) == "pallas"
    assert matmul.auto_accumulation_impl(True, True, KernelChoice(accumulate_impl="xla")) == "xla"
    assert matmul.auto_accumulation_impl(False, True, KernelChoice()) == "xla"  # not exact in bf16
    record = implementation_record(_cfg(accumulate_impl="pallas", pallas_block_m=128))
    assert (record["quantize"], record["native_casts"], record["accumulate"]) == ("pallas", True, "pallas")
    assert record["pallas_block"] == {"block_m": 128, "block_n": 128, "num_warps": 4, "num_stages": 2,
                                      "unroll": 1, "window_unroll": 8}
    record = implementation_record(_cfg(quantize_impl="xla", native_casts=True, fmt="e5m2", grad_fmt="e5m2"))
    assert (record["quantize"], record["native_casts"]) == ("xla", False)
    assert implementation_record(_cfg(fmt="e5m8", grad_fmt="e5m8"))["accumulate"] == "xla"  # not exact in bf16
    x = jnp.zeros((128, 256), jnp.float32)
    chains = ((("e4m3", (1, 128)),),)
    assert matmul._pallas_quantizer_fits(x, chains, "auto", KernelChoice())
    assert not matmul._pallas_quantizer_fits(x, chains, "auto", KernelChoice(quantize_impl="xla"))
    assert not matmul._pallas_quantizer_fits(x[:, :200], chains, "auto", KernelChoice())


def test_model_linear_uses_fp8_linear():
    from flax import nnx

    from efftrain.config import ModelConfig
    from efftrain.model.layers import Linear

    mcfg = ModelConfig(compute_dtype="float32")
    layer = Linear(256, 32, cfg=mcfg, rngs=nnx.Rngs(0), fp8=FP8Config(enabled=True))
    x = jnp.asarray(np.random.default_rng(13).standard_normal((2, 4, 256)), jnp.float32)
    w = layer.kernel[...]
    # jitted, as the model runs it (eagerly, every primitive of the simulation compiles on its own: ~10 s)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), _matmul(x, w), rtol=1e-6, atol=1e-7)
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
    assert np.all(np.isfinite(np.asarray(grads.kernel[...])))
