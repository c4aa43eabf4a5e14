"""Weight grids, bit accounting and packing of efftrain.quant.formats (tiny shapes, CPU)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from efftrain.quant import (
    FP4_E2M1_VALUES,
    FP8_E4M3_VALUES,
    NF4_VALUES,
    bitpack,
    bitunpack,
    effective_bits,
    fake_quantize_groups,
    levels,
    make_format,
    pack,
    quantize_rtn,
    unpack,
)
from efftrain.quant.formats import decode, encode, group_params

# QLoRA (Dettmers et al. 2023) Appendix E, NF4 data type, as published.
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]

FORMAT_CASES = [(2, "int", False), (3, "int", False), (4, "int", True), (8, "int", False), (5, "int", True),
                (4, "nf4", False), (4, "fp4", False), (8, "fp8", False)]


def _w(shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)


# ---------------------------------------------------------------------------------------- grids

def test_nf4_values_are_the_published_table():
    assert NF4_VALUES.dtype == np.float32 and len(NF4_VALUES) == 16
    np.testing.assert_array_equal(NF4_VALUES, np.array(QLORA_NF4, dtype=np.float32))
    np.testing.assert_array_equal(levels(4, "nf4"), NF4_VALUES)


def test_fp4_values():
    pos = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert sorted(set(FP4_E2M1_VALUES.tolist())) == sorted(set(pos) | {-v for v in pos})
    assert len(FP4_E2M1_VALUES) == 15  # ±0 merged
    every_e2m1 = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(FP4_E2M1_VALUES, np.unique(every_e2m1))


def test_fp8_grid_is_e4m3fn():
    every = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(FP8_E4M3_VALUES, np.unique(every[np.isfinite(every)]))
    assert FP8_E4M3_VALUES.max() == 448.0 and len(FP8_E4M3_VALUES) == 253


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("symmetric", [False, True])
def test_int_levels_count(bits, symmetric):
    lv = levels(bits, "int", symmetric)
    assert len(lv) == len(np.unique(lv)) == 2**bits
    if symmetric:
        assert lv.min() == -(2 ** (bits - 1)) and lv.max() == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_rtn_uses_all_levels_and_at_most_2_pow_bits(bits):
    w = _w((512, 1), seed=bits)  # one group of 512 values
    q = quantize_rtn(w, bits=bits, group_size=-1)
    assert len(np.unique(q)) <= 2**bits
    if bits <= 4:
        assert len(np.unique(q)) == 2**bits


def test_int_asymmetric_formula_by_hand():
    w = np.array([[-1.0], [-0.2], [0.05], [0.3], [2.0]], dtype=np.float32)  # one group, 2 bits
    q = quantize_rtn(w, bits=2, group_size=-1)
    s = np.float32(np.float16(3.0 / 3))  # (hi - lo) / maxq = 1, exact in float16
    z = np.round(1.0 / s)  # 1
    expect = s * (np.clip(np.round(w / s) + z, 0, 3) - z)
    np.testing.assert_array_equal(q, expect)
    codes, scales, zeros = pack(w, bits=2, group_size=-1)
    assert codes.ravel().tolist() == [0, 1, 1, 1, 3] and scales.item() == 1.0 and zeros.item() == 1.0


@pytest.mark.parametrize("fmt,book", [("nf4", NF4_VALUES), ("fp4", FP4_E2M1_VALUES), ("fp8", FP8_E4M3_VALUES)])
def test_codebook_rounds_to_nearest_grid_point(fmt, book):
    bits = 8 if fmt == "fp8" else 4
    wg = _w((6, 32, 5), seed=1)  # [groups, g, out]
    q = fake_quantize_groups(wg, bits=bits, fmt=fmt)
    scale = np.asarray(group_params(jnp.asarray(wg), make_format(bits, fmt), axis=-2)[0])
    assert np.all(np.asarray(scale, np.float16).astype(np.float32) == scale)  # stored as float16
    v = wg / scale
    nearest = book[np.argmin(np.abs(v[..., None] - book), axis=-1)]
    np.testing.assert_array_equal(q, (scale * nearest).astype(np.float32))
    # the group absmax is (up to the float16 rounding of the scale) the largest code
    assert np.all(np.max(np.abs(v), axis=-2) <= book.max())


@pytest.mark.parametrize("fmt,dtype,top", [("fp8", ml_dtypes.float8_e4m3fn, 448.0),
                                           ("fp4", ml_dtypes.float4_e2m1fn, 6.0)])
def test_float_formats_round_like_the_hardware_type(fmt, dtype, top):
    v = np.random.default_rng(2).uniform(-top, top, size=(4000, 1)).astype(np.float32)
    v[0, 0] = top  # absmax = top -> scale exactly 1
    q = fake_quantize_groups(v, bits=8 if fmt == "fp8" else 4, fmt=fmt, axis=0)
    np.testing.assert_array_equal(q, v.astype(dtype).astype(np.float32))


@pytest.mark.parametrize("bits,fmt,symmetric", FORMAT_CASES)
def test_error_within_grid_step(bits, fmt, symmetric):
    f = make_format(bits, fmt, symmetric)
    wg = jnp.asarray(_w((8, 64, 6), seed=3))
    s, z = group_params(wg, f)
    q = decode(encode(wg, s, z, f), s, z, f)
    err = np.abs(np.asarray(q - wg))
    if f.is_int:  # one step: the zero point is rounded too (as in the GPTQ code); symmetric: half a step
        bound = np.asarray(s) * (0.5 if symmetric else 1.0)
    else:  # half the largest gap of the code book, in units of the scale
        bound = np.asarray(s) * np.max(np.diff(f.codebook)) / 2
    assert np.all(err <= bound * (1 + 1e-6))


def test_zero_group_and_tiny_scales_are_safe():
    w = np.zeros((64, 3), np.float32)
    w[:, 1] = 1e-7  # below float16's normal range
    for bits, fmt, sym in FORMAT_CASES:
        q = quantize_rtn(w, bits=bits, fmt=fmt, symmetric=sym, group_size=32)
        assert np.all(np.isfinite(q)) and np.all(q[:, 0] == 0)


# ---------------------------------------------------------------------------------------- bits

def test_effective_bits_formula():
    assert effective_bits(4, 128) == 4 + 16 / 128 + 16 / 128
    assert effective_bits(4, 128, symmetric=True) == 4 + 16 / 128
    assert effective_bits(4, 64, fmt="nf4") == 4 + 16 / 64
    assert effective_bits(4, 32, fmt="fp4") == 4.5
    assert effective_bits(8, 128, fmt="fp8") == 8.125
    assert effective_bits(3, -1, in_dim=256) == 3 + 32 / 256
    assert effective_bits(2, 64, in_dim=256) == 2.5
    with pytest.raises(ValueError, match="in_dim"):
        effective_bits(4, -1)
    with pytest.raises(ValueError, match="does not divide"):
        effective_bits(4, 96, in_dim=256)


# ---------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bits", [1, 9, 0, 4.5, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        make_format(bits)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(_w((64, 4)), bits=bits, group_size=32)


@pytest.mark.parametrize("bits,fmt", [(3, "nf4"), (8, "nf4"), (2, "fp4"), (4, "fp8"), (7, "fp8")])
def test_format_bits_mismatch(bits, fmt):
    with pytest.raises(ValueError, match=f"{fmt}.*bits"):
        make_format(bits, fmt)
    with pytest.raises(ValueError, match="needs bits"):
        pack(_w((64, 4)), bits=bits, fmt=fmt, group_size=32)


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown quantization format"):
        make_format(4, "int4")


@pytest.mark.parametrize("group_size", [48, 0, -2, 100, 1.5])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        quantize_rtn(_w((64, 4)), bits=4, group_size=group_size)
    with pytest.raises(ValueError, match="group_size"):
        pack(_w((64, 4)), bits=4, group_size=group_size)


def test_code_book_symmetric_flag_is_ignored():
    w = _w((64, 4))
    np.testing.assert_array_equal(quantize_rtn(w, bits=4, fmt="nf4", group_size=32),
                                  quantize_rtn(w, bits=4, fmt="nf4", group_size=32, symmetric=True))


# ---------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits,fmt,symmetric", FORMAT_CASES)
@pytest.mark.parametrize("group_size", [32, -1])
def test_pack_unpack_round_trip_is_exact(bits, fmt, symmetric, group_size):
    w = _w((3, 128, 24), seed=bits)  # leading dim: stacked experts
    codes, scales, zeros = pack(w, bits=bits, group_size=group_size, fmt=fmt, symmetric=symmetric)
    ng = 128 // (128 if group_size == -1 else group_size)
    assert codes.dtype == np.uint8 and codes.shape == w.shape
    assert scales.dtype == np.float16 and scales.shape == (3, ng, 24)
    if fmt == "int" and not symmetric:
        assert zeros.dtype == np.float16 and zeros.shape == scales.shape
        assert np.all(zeros == np.round(zeros)) and zeros.min() >= 0 and zeros.max() <= 2**bits - 1
    else:
        assert zeros is None
    assert int(codes.max()) <= make_format(bits, fmt, symmetric).maxq
    w_hat = unpack(codes, scales, zeros, bits=bits, fmt=fmt)
    rtn = quantize_rtn(w, bits=bits, group_size=group_size, fmt=fmt, symmetric=symmetric)
    np.testing.assert_array_equal(w_hat, rtn)  # bit for bit
    # experts are independent matrices
    one = quantize_rtn(w[1], bits=bits, group_size=group_size, fmt=fmt, symmetric=symmetric)
    np.testing.assert_array_equal(rtn[1], one)


@pytest.mark.parametrize("bits", range(2, 9))
def test_bitpack_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(40, 7)).astype(np.uint8)
    packed = bitpack(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
    np.testing.assert_array_equal(bitunpack(packed, bits, codes.shape), codes)


def test_unpack_rejects_mismatched_inputs():
    codes, scales, zeros = pack(_w((64, 4)), bits=4, group_size=32)
    with pytest.raises(ValueError, match="zeros"):
        unpack(codes, scales, zeros[:1], bits=4)
    with pytest.raises(ValueError, match="does not divide"):
        unpack(codes, np.ones((3, 4), np.float16), None, bits=4)
    with pytest.raises(ValueError, match="out of range"):
        unpack(codes, scales, None, bits=2)


# ---------------------------------------------------------------------------------------- arrays

def test_rtn_keeps_shape_dtype_and_array_kind():
    w = _w((128, 16))
    out = quantize_rtn(w, bits=4)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == w.shape
    wj = jnp.asarray(w, jnp.bfloat16)
    outj = quantize_rtn(wj, bits=4)
    assert isinstance(outj, jax.Array) and outj.dtype == jnp.bfloat16 and outj.shape == w.shape
    expect = quantize_rtn(np.asarray(wj, np.float32), bits=4).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(outj), expect)
    w64 = w.astype(np.float64)
    assert quantize_rtn(w64, bits=4).dtype == np.float64
    np.testing.assert_array_equal(quantize_rtn(w64, bits=4), out.astype(np.float64))


def test_rtn_deterministic_and_vectorised_on_a_big_weight():
    w = _w((768, 3072), seed=5)
    a = quantize_rtn(w, bits=4, group_size=128)
    b = quantize_rtn(w, bits=4, group_size=128)
    np.testing.assert_array_equal(a, b)
    rel = np.sum((a - w) ** 2) / np.sum(w**2)
    assert 0.005 < rel < 0.02  # step ≈ 5.2σ/15 for 128 Gaussian values: step²/12 ≈ 0.01 σ²
