"""Weight grids for weight-only post-training quantization (PTQ), with bit accounting and packing.

Layout. A weight is ``w[..., in, out]`` used as ``y = x @ w``. A *group* is ``g`` consecutive INPUT
rows of one output column (``group_size=-1``: the whole input dim, ``g = in``). Every group has its
own scale ``s`` (and, for asymmetric int, a zero point ``z``); leading dims (stacked MoE experts) are
independent matrices.

Formats (docs/METHODS.md §2; data types as in Dettmers & Zettlemoyer 2022, arXiv 2212.09720 §2):

* ``int``, asymmetric (default) - min-max with zero point, as in the GPTQ reference quantizer
  (Frantar et al. 2022, arXiv 2210.17323 §4 / its released code), with ``maxq = 2^b - 1``::

      lo = min(min_g w, 0),  hi = max(max_g w, 0)        (the range always holds 0; lo=hi=0 -> [-1, 1])
      s  = (hi - lo) / maxq,  z = round(-lo / s)         (z is an integer in [0, maxq])
      q  = clip(round(w / s) + z, 0, maxq),   w_hat = s * (q - z)

* ``int``, symmetric - absmax: ``s = 2 * max_g|w| / maxq``, fixed ``z = 2^(b-1)`` (not stored), same
  ``q`` / ``w_hat`` as above: 2^b levels ``s * {-2^(b-1), ..., 2^(b-1) - 1}``. (The GPTQ code uses
  ``s = max_g w / maxq`` for an all-non-negative group, which clips half of it; we always use absmax.)

* code books ``c_0 < ... < c_{K-1}`` with absmax group scales (no zero point)::

      s = max_g|w| / max_k|c_k|,   w_hat = s * c_k  with  k = argmin_k |w / s - c_k|

  - ``nf4``: the 16 NormalFloat-4 values of QLoRA (Dettmers et al. 2023, arXiv 2305.14314 §3,
    "4-bit NormalFloat Quantization"; the published table of bitsandbytes), bits must be 4;
  - ``fp4``: E2M1, ``±{0, .5, 1, 1.5, 2, 3, 4, 6}`` (15 distinct values), bits must be 4;
  - ``fp8``: E4M3 "fn" (Micikevicius et al. 2022, arXiv 2209.05433 §3: bias 7, no infinities,
    only S.1111.111 is NaN, max 448): all 253 finite values, bits must be 8.

  Ties (``w/s`` exactly half-way between two code values) go to the value of smaller magnitude.
  ``int`` rounds half to even (``round``), like torch.round in the reference code.

Scale storage. Scales (and zero points) are stored as float16, so the quantizers round every scale up
to the float16 grid (never clipping a group's extreme value because of the scale rounding; clamped to
[2^-24, 65504], subnormals included); integer zero points are exact in float16. This makes
``pack``/``unpack`` exact and the bit accounting honest::

      eff_bits = b + 16/g                      (code books, symmetric int)
      eff_bits = b + 16/g + 16/g               (asymmetric int: zero point)

(with the per-weight int code products ``s * (q - z)`` exact in float32, so the dequantized weight is
the same whichever float precision computed it). Codes are stored one per uint8 (int: ``q``; code
books: the index ``k``); ``bitpack``/``bitunpack`` give the dense ``b``-bit stream for a file.

All traceable helpers (``group_params``, ``encode``, ``decode``) are jax.numpy code, used inside the
jitted RTN / GPTQ / AWQ kernels, so every method quantizes with the identical arithmetic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from efftrain.xla import ptq_jit

__all__ = [
    "FORMATS",
    "NF4_VALUES",
    "FP4_E2M1_VALUES",
    "FP8_E4M3_VALUES",
    "FP8_E4M3_MAX",
    "QuantFormat",
    "make_format",
    "levels",
    "resolve_group_size",
    "effective_bits",
    "group_params",
    "encode",
    "decode",
    "fake_quantize_groups",
    "Packed",
    "pack",
    "unpack",
    "bitpack",
    "bitunpack",
]

FORMATS = ("int", "nf4", "fp4", "fp8")

#: QLoRA NormalFloat-4 (Dettmers et al. 2023, Appendix E / bitsandbytes), ascending.
NF4_VALUES = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)

_FP4_POS = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
#: E2M1 distinct values (±0 merged), ascending.
FP4_E2M1_VALUES = np.concatenate([-_FP4_POS[:0:-1], _FP4_POS])


def _e4m3fn_values() -> np.ndarray:
    """All finite E4M3fn values, ascending: subnormals m/8·2^-6, normals (1+m/8)·2^(e-7), no S.1111.111."""
    pos = [m / 8 * 2.0**-6 for m in range(8)]
    pos += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if not (e == 15 and m == 7)]
    pos = np.array(pos, dtype=np.float32)
    return np.concatenate([-pos[:0:-1], pos])


#: E4M3fn finite values (253 distinct, ±0 merged), ascending.
FP8_E4M3_VALUES = _e4m3fn_values()
FP8_E4M3_MAX = 448.0

_CODEBOOKS = {"nf4": NF4_VALUES, "fp4": FP4_E2M1_VALUES, "fp8": FP8_E4M3_VALUES}
_FORMAT_BITS = {"nf4": 4, "fp4": 4, "fp8": 8}

_F16_MAX = float(np.finfo(np.float16).max)  # 65504
_F16_TINY = float(2.0**-24)  # smallest positive float16 (subnormal)
_SCALE_BITS = 16  # scales and zero points are stored as float16


@dataclass(frozen=True)
class QuantFormat:
    """A validated grid: ``bits`` in 2..8, ``fmt`` in FORMATS; ``symmetric`` only matters for int
    (code-book formats are always absmax-scaled and normalised to ``symmetric=True``)."""

    bits: int
    fmt: str = "int"
    symmetric: bool = False

    @property
    def is_int(self) -> bool:
        return self.fmt == "int"

    @property
    def maxq(self) -> int:
        """Largest code: 2^b - 1 for int, K - 1 for a code book of K values."""
        return (1 << self.bits) - 1 if self.is_int else len(self.codebook) - 1

    @property
    def has_zero_point(self) -> bool:
        return self.is_int and not self.symmetric

    @property
    def codebook(self) -> np.ndarray | None:
        return _CODEBOOKS.get(self.fmt)

    @property
    def max_code(self) -> float:
        return float(np.max(np.abs(self.codebook)))


def make_format(bits: int, fmt: str = "int", symmetric: bool = False) -> QuantFormat:
    """Validate (bits, fmt) and return the QuantFormat; ValueError on a bad combination."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {FORMATS}")
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be an integer between 2 and 8, got {bits!r}")
    bits = int(bits)
    need = _FORMAT_BITS.get(fmt)
    if need is not None and bits != need:
        raise ValueError(f"format {fmt!r} needs bits={need}, got bits={bits}")
    return QuantFormat(bits=bits, fmt=fmt, symmetric=True if need is not None else bool(symmetric))


@functools.lru_cache(maxsize=None)
def _levels_cached(f: QuantFormat) -> np.ndarray:
    if f.is_int:
        q = np.arange(1 << f.bits, dtype=np.float32)
        return q - (1 << (f.bits - 1)) if f.symmetric else q
    return f.codebook.copy()


def levels(bits: int, fmt: str = "int", symmetric: bool = False) -> np.ndarray:
    """The normalised grid (value = scale · level). int: the 2^b codes ``q`` (asymmetric: value
    ``s·(q - z)`` with a per-group ``z``) or ``q - 2^(b-1)`` (symmetric); code books: their values."""
    return _levels_cached(make_format(bits, fmt, symmetric)).copy()


def resolve_group_size(group_size: int, in_dim: int) -> int:
    """The group length g: ``in_dim`` for -1, else ``group_size`` (must divide ``in_dim``)."""
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise ValueError(f"group_size must be an int (-1 or a positive divisor of the input dim), got {group_size!r}")
    group_size = int(group_size)
    if group_size == -1:
        return int(in_dim)
    if group_size <= 0:
        raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    if in_dim % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input dimension {in_dim}")
    return group_size


def effective_bits(bits: int, group_size: int = 128, in_dim: int | None = None, *,
                   fmt: str = "int", symmetric: bool = False) -> float:
    """Bits per weight including float16 scales (and float16 zero points for asymmetric int):
    ``b + 16/g (+ 16/g)``, g = group_size, or ``in_dim`` when group_size is -1."""
    f = make_format(bits, fmt, symmetric)
    if group_size == -1:
        if in_dim is None:
            raise ValueError("group_size=-1 needs in_dim to count the per-channel scale bits")
        g = int(in_dim)
    else:
        g = resolve_group_size(group_size, in_dim) if in_dim is not None else int(group_size)
        if g <= 0:
            raise ValueError(f"group_size must be -1 or positive, got {group_size}")
    return f.bits + _SCALE_BITS / g * (2 if f.has_zero_point else 1)


# ------------------------------------------------------------------------------------------------
# traceable core (jax.numpy): every quantizer in efftrain.quant goes through these three functions


def _scale_to_f16_up(scale):
    """Round positive scales up to the float16 grid, clamped to [2^-24, 65504]; in scale's dtype.

    Exact arithmetic instead of a float16 round trip: XLA on GPU may drop a convert pair
    f32 -> f16 -> f32 inside a fused program (xla_allow_excess_precision), which would leave the scale
    unrounded there and rounded in eager code. s in [2^(e-1), 2^e) has float16 spacing
    2^max(e-11, -24) (11 significant bits; subnormal spacing 2^-24), so ceil(s / spacing) * spacing.
    """
    s = jnp.clip(scale, _F16_TINY, _F16_MAX)
    _, e = jnp.frexp(s)
    spacing_exp = jnp.maximum(e - 11, -24)
    return jnp.minimum(jnp.ldexp(jnp.ceil(jnp.ldexp(s, -spacing_exp)), spacing_exp), _F16_MAX).astype(s.dtype)


def group_params(wg, f: QuantFormat, axis: int = -2, maxq=None):
    """Scale and zero point of each group, reducing ``wg`` over ``axis`` (kept as size 1).

    Returns ``(scale, zero)`` in wg's dtype; ``zero`` is 0 for code books, 2^(b-1) for symmetric int.
    ``maxq`` (int formats) may be a traced scalar overriding ``f.maxq``: the jitted kernels take the
    bit width as data, so that one compiled program serves every int bit width.
    """
    wg = jnp.asarray(wg)
    dt = wg.dtype
    if f.is_int:
        maxq = f.maxq if maxq is None else maxq
        if f.symmetric:
            amax = jnp.max(jnp.abs(wg), axis=axis, keepdims=True)
            amax = jnp.where(amax == 0, jnp.ones_like(amax), amax)
            scale = _scale_to_f16_up(2 * amax / maxq)
            zero = jnp.zeros_like(scale) + (maxq + 1) // 2
        else:
            lo = jnp.minimum(jnp.min(wg, axis=axis, keepdims=True), 0)
            hi = jnp.maximum(jnp.max(wg, axis=axis, keepdims=True), 0)
            empty = (lo == 0) & (hi == 0)
            lo = jnp.where(empty, -jnp.ones_like(lo), lo)
            hi = jnp.where(empty, jnp.ones_like(hi), hi)
            scale = _scale_to_f16_up((hi - lo) / maxq)
            zero = jnp.round(-lo / scale)
    else:
        amax = jnp.max(jnp.abs(wg), axis=axis, keepdims=True)
        scale = jnp.where(amax == 0, jnp.ones_like(amax), _scale_to_f16_up(amax / f.max_code))
        zero = jnp.zeros_like(scale)
    return scale.astype(dt), zero.astype(dt)


def encode(w, scale, zero, f: QuantFormat, maxq=None):
    """Codes (int32) of ``w`` on the grid given by broadcastable ``scale``/``zero`` (``maxq``: as in
    ``group_params``)."""
    if f.is_int:
        maxq = f.maxq if maxq is None else maxq
        return jnp.clip(jnp.round(w / scale) + zero, 0, maxq).astype(jnp.int32)
    book = jnp.asarray(f.codebook, dtype=w.dtype)
    mid = (book[1:] + book[:-1]) / 2
    v = w / scale
    lo = jnp.searchsorted(mid, v, side="left")  # a tie goes to the lower value ...
    hi = jnp.searchsorted(mid, v, side="right")  # ... or the upper one: pick the smaller magnitude
    return jnp.where(v >= 0, lo, hi).astype(jnp.int32)


def decode(codes, scale, zero, f: QuantFormat):
    """Dequantized values ``s·(q - z)`` (int) or ``s·c_k`` (code book), in scale's dtype."""
    dt = jnp.asarray(scale).dtype
    if f.is_int:
        return scale * (codes.astype(dt) - zero)
    return scale * jnp.take(jnp.asarray(f.codebook, dtype=dt), codes)


def fake_quant(wg, f: QuantFormat, axis: int = -2, maxq=None):
    scale, zero = group_params(wg, f, axis, maxq)
    return decode(encode(wg, scale, zero, f, maxq), scale, zero, f)


def kernel_format(f: QuantFormat):
    """(static part, traced maxq) of a format for the jitted kernels: int bit widths share a program."""
    if f.is_int:
        return QuantFormat(bits=8, fmt="int", symmetric=f.symmetric), jnp.asarray(f.maxq, jnp.int32)
    return f, None


def grouped(w, g: int):
    """[..., in, out] -> [..., in/g, g, out]."""
    *lead, n_in, n_out = w.shape
    return w.reshape(*lead, n_in // g, g, n_out)


@ptq_jit(static_argnames=("f", "g"))
def rtn_kernel(w, maxq, f: QuantFormat, g: int):
    return fake_quant(grouped(w, g), f, axis=-2, maxq=maxq).reshape(w.shape)


def rtn_jit(w, f: QuantFormat, g: int):
    """RTN of [..., in, out] (the one program used by quantize_rtn, AWQ and pack)."""
    fs, maxq = kernel_format(f)
    return rtn_kernel(w, maxq, f=fs, g=g)


@ptq_jit(static_argnames=("f", "g"))
def pack_kernel(w, maxq, f: QuantFormat, g: int):
    wg = grouped(w, g)
    scale, zero = group_params(wg, f, axis=-2, maxq=maxq)
    codes = encode(wg, scale, zero, f, maxq).reshape(w.shape)
    return codes.astype(jnp.uint8), scale[..., 0, :].astype(jnp.float16), zero[..., 0, :].astype(jnp.float16)


def _pack_jit(w, f: QuantFormat, g: int):
    fs, maxq = kernel_format(f)
    return pack_kernel(w, maxq, f=fs, g=g)


@ptq_jit(static_argnames=("f",))
def _unpack_jit(codes, scales, zeros, f: QuantFormat):
    *lead, n_in, n_out = codes.shape
    ng = scales.shape[-2]
    cg = codes.reshape(*lead, ng, n_in // ng, n_out).astype(jnp.int32)
    s = scales.astype(jnp.float32)[..., :, None, :]
    z = zeros.astype(jnp.float32)[..., :, None, :]
    return decode(cg, s, z, f).reshape(codes.shape)


# ------------------------------------------------------------------------------------------------
# array plumbing shared by rtn / gptq / awq


def _is_jax(x) -> bool:
    return isinstance(x, jax.Array)


def _x64() -> bool:
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def _compute_dtype(w):
    """float64 only where the input is float64 and jax runs with x64; float32 otherwise."""
    return jnp.float64 if (np.dtype(w.dtype) == np.float64 and _x64()) else jnp.float32


def to_compute(a, dtype=None):
    dtype = dtype or _compute_dtype(a)
    if _is_jax(a):
        return a.astype(dtype)
    return jnp.asarray(np.asarray(a, dtype=np.dtype(dtype)))


def pad_tokens(x2d):
    """``x2d [n, in]`` with zero rows appended up to the next power of two (at least 256).

    Calibration statistics (X^T X, sum |x|) do not change with zero rows, and a jitted kernel then
    compiles once per power of two instead of once per token count: routed experts each see a
    different number of tokens, and on a GPU every new shape is a compile (with autotuning) of a second
    or more. Pad numpy inputs (before they go to the device) to avoid even the eager pad's compile.
    """
    n = x2d.shape[0]
    padded = max(256, 1 << max(n - 1, 0).bit_length())
    if padded == n:
        return x2d
    pad = np.pad if isinstance(x2d, np.ndarray) else jnp.pad  # numpy: no eager op to compile per shape
    return pad(x2d, ((0, padded - n), (0, 0)))


def cast_like(out, ref):
    """``out`` as the same kind of array (numpy or jax) and dtype as ``ref``."""
    if _is_jax(ref):
        return out.astype(ref.dtype)
    return np.asarray(out).astype(np.asarray(ref).dtype, copy=False)


def check_weight(w) -> None:
    if getattr(w, "ndim", 0) < 2:
        raise ValueError(f"weight must be [..., in, out] with at least 2 dims, got shape {getattr(w, 'shape', None)}")
    if not np.issubdtype(np.dtype(w.dtype), np.floating) and np.dtype(w.dtype).name != "bfloat16":
        raise ValueError(f"weight must be a float array, got dtype {w.dtype}")


# ------------------------------------------------------------------------------------------------
# public array-level helpers


def fake_quantize_groups(wg, *, bits: int, fmt: str = "int", symmetric: bool = False, axis: int = -2):
    """Quantize every group of ``wg`` (the group runs along ``axis``; e.g. ``[n_groups, g, out]``) to
    its nearest grid point and return the dequantized values (same shape, dtype and array kind)."""
    f = make_format(bits, fmt, symmetric)
    out = fake_quant(to_compute(wg), f, axis)
    return cast_like(out, wg)


class Packed(NamedTuple):
    """A stored quantized weight: ``codes`` uint8 ``[..., in, out]`` (one code a byte), ``scales``
    float16 ``[..., in/g, out]``, ``zeros`` float16 ``[..., in/g, out]`` (asymmetric int) or None."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None


def pack(w, *, bits: int, group_size: int = 128, fmt: str = "int", symmetric: bool = False) -> Packed:
    """RTN-quantize ``w[..., in, out]`` and return its codes, float16 scales and zeros (numpy arrays).

    ``unpack(*pack(w, ...), bits=..., fmt=...)`` equals ``quantize_rtn(w, ...)`` bit for bit (float32).
    """
    check_weight(w)
    f = make_format(bits, fmt, symmetric)
    g = resolve_group_size(group_size, w.shape[-2])
    codes, scales, zeros = _pack_jit(to_compute(w, jnp.float32), f, g)
    return Packed(np.asarray(codes), np.asarray(scales), np.asarray(zeros) if f.has_zero_point else None)


def unpack(codes, scales, zeros=None, *, bits: int, fmt: str = "int", dtype=np.float32) -> np.ndarray:
    """Dequantize stored ``codes``/``scales``/``zeros`` (as from ``pack`` or a method's
    ``return_packed``) back to ``w_hat[..., in, out]``; ``zeros=None`` means symmetric int (or a
    code book). The arithmetic is that of the quantizers, so the result is exact."""
    f = make_format(bits, fmt, symmetric=zeros is None)
    codes = np.asarray(codes)
    scales = np.asarray(scales)
    if codes.ndim < 2 or scales.shape[:-2] != codes.shape[:-2] or scales.shape[-1] != codes.shape[-1]:
        raise ValueError(f"codes {codes.shape} and scales {scales.shape} do not match "
                         "([..., in, out] / [..., in/g, out])")
    if codes.shape[-2] % scales.shape[-2]:
        raise ValueError(f"scales have {scales.shape[-2]} groups, which does not divide the input dim "
                         f"{codes.shape[-2]}")
    if codes.size and int(codes.max()) > f.maxq:
        raise ValueError(f"code {int(codes.max())} is out of range for {f.fmt} with {f.bits} bits (max {f.maxq})")
    if zeros is None:
        z = np.full(scales.shape, (f.maxq + 1) // 2 if f.is_int else 0, dtype=np.float16)
    else:
        if not f.is_int:
            raise ValueError(f"format {fmt!r} has no zero points; pass zeros=None")
        z = np.asarray(zeros)
        if z.shape != scales.shape:
            raise ValueError(f"zeros {z.shape} must have the shape of scales {scales.shape}")
    out = _unpack_jit(jnp.asarray(codes), jnp.asarray(scales, jnp.float16), jnp.asarray(z, jnp.float16),
                      kernel_format(f)[0])
    return np.asarray(out).astype(dtype, copy=False)


def bitpack(codes, bits: int) -> np.ndarray:
    """Dense storage: the low ``bits`` bits of every uint8 code, concatenated big-endian into bytes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    c = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if c.size and int(c.max()) >= 1 << bits:
        raise ValueError(f"a code does not fit in {bits} bits")
    stream = np.unpackbits(c[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(stream.reshape(-1))


def bitunpack(packed, bits: int, shape) -> np.ndarray:
    """Inverse of ``bitpack``: uint8 codes of ``shape``."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be between 1 and 8, got {bits}")
    n = int(np.prod(shape))
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8))[: n * bits].reshape(n, bits)
    full = np.zeros((n, 8), dtype=np.uint8)
    full[:, 8 - bits:] = stream
    return np.packbits(full, axis=1).reshape(shape)
