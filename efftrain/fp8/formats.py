"""FP8 number formats (eXmY), rounding to them, and the accumulator's mantissa rounding.

The lowest layer of efftrain.fp8 (formats -> scaling -> kernels -> matmul -> linear): plain float32 jnp
and int32 bit arithmetic, jit-able on any backend and usable inside Pallas kernels. The FP8 values are
float32 numbers that happen to be representable in the format (DeepSeek-V3, arXiv 2412.19437, §3.3
"FP8 Training"; validation in docs/FP8.md).

Formats (eXmY, X exponent bits, Y mantissa bits, bias b = 2^(X-1) - 1)
    normal     v = (-1)^s · 2^(E-b) · (1 + M/2^Y),    1 <= E <= E_top
    subnormal  v = (-1)^s · 2^(1-b) · (M/2^Y),        E = 0
  IEEE-like ("e5m2", any "eXmY"): the all-ones exponent is inf/NaN, so e_max = 2^X - 2 - b and
  max = (2 - 2^-Y) · 2^e_max (e5m2: 57344). "fn" variants ("e4m3" = "e4m3fn", any "eXmYfn"): no inf, only
  the all-ones pattern is NaN, so e_max = 2^X - 1 - b and max = (2 - 2^(1-Y)) · 2^e_max (e4m3: 448);
  fn formats under 8 bits follow OCP MX FP6/FP4 (e2m3fn, e3m2fn, e2m1fn): no NaN, max = (2 - 2^-Y) · 2^e_max.
  Rounding, `cast_to_format`:   e = clip(floor(log2|x|), e_min, e_max), e_min = 1 - b,
      q(x) = sign(x) · min( RNE(|x| · 2^(Y-e)) · 2^(e-Y), max )
  i.e. round-to-nearest-even on the grid of x's binade (the e_min binade grid gives the subnormals) and
  saturation to the largest finite value (±inf saturates too; NaN stays NaN). Bit-exact with ml_dtypes'
  float8_e4m3fn / float8_e5m2 on |x| <= max. Caveat: XLA flushes float32 subnormals to zero, so formats
  whose subnormals lie below 2^-126 (X = 8) lose those; every X <= 7 format is exact.

Accumulator rounding, `round_mantissa` (V3 §3.3.2 "increasing accumulation precision"): keep b mantissa
bits of a float32 (truncate or RNE), the Hopper MMA accumulator of the model in efftrain/fp8/matmul.py.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """An IEEE-like binary float format eXmY (finite_only: the 'fn' variant with no infinities)."""

    name: str
    exp_bits: int
    man_bits: int
    finite_only: bool

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        top = 2**self.exp_bits - 1 if self.finite_only else 2**self.exp_bits - 2
        return top - self.bias

    @property
    def has_nan_pattern(self) -> bool:
        """An fn format spends its all-ones pattern on NaN if it is 8 bits or wider (OCP FP8); the OCP MX
        FP6/FP4 'fn' formats (e2m3fn, e3m2fn, e2m1fn) have no NaN at all."""
        return self.finite_only and 1 + self.exp_bits + self.man_bits >= 8

    @property
    def max(self) -> float:
        frac = 2.0 - 2.0 ** (1 - self.man_bits) if self.has_nan_pattern else 2.0 - 2.0**-self.man_bits
        return frac * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)


_FORMAT_RE = re.compile(r"e(\d+)m(\d+)(fn)?")
_ALIASES = {"e4m3": "e4m3fn", "fp8_e4m3": "e4m3fn", "fp8_e5m2": "e5m2"}


@functools.lru_cache(maxsize=None)
def float_format(fmt: str | FloatFormat) -> FloatFormat:
    """Parse 'e4m3' (= e4m3fn, max 448), 'e5m2' (max 57344), any 'eXmY' (IEEE-like) or 'eXmYfn'."""
    if isinstance(fmt, FloatFormat):
        return fmt
    name = _ALIASES.get(fmt.strip().lower(), fmt.strip().lower())
    match = _FORMAT_RE.fullmatch(name)
    if match is None:
        raise ValueError(f"unknown float format {fmt!r}: expected e4m3, e5m2, eXmY or eXmYfn")
    exp_bits, man_bits, fn = int(match[1]), int(match[2]), bool(match[3])
    result = FloatFormat(name, exp_bits, man_bits, fn)
    if not 2 <= exp_bits <= 8 or not 0 <= man_bits <= 23 or (result.has_nan_pattern and man_bits < 1):
        raise ValueError(f"float format {fmt!r}: need 2 <= X <= 8 exponent and 0 <= Y <= 23 mantissa bits "
                         "(Y >= 1 for an fn variant of 8+ bits)")
    return result


def _exp2i(k: jax.Array) -> jax.Array:
    """2.0**k as float32 for an int32 array k in [-126, 127] (exact, by building the bits)."""
    return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def _mul_exp2(v: jax.Array, k: jax.Array, k_lo: int, k_hi: int) -> jax.Array:
    """v · 2^k exactly; k (int32) is known to lie in [k_lo, k_hi]."""
    if -126 <= k_lo and k_hi <= 127:
        return v * _exp2i(k)
    half = k >> 1  # two factors keep each power of two a normal float32
    return v * _exp2i(half) * _exp2i(k - half)


def cast_to_format(x: jax.Array, fmt: str | FloatFormat = "e4m3") -> jax.Array:
    """Round x to the nearest value of `fmt` (RNE, subnormals, saturating); float32 result.

    Integer arithmetic on the float32 bits (no round op, so it also runs inside Pallas kernels): the
    24-bit significand m of |x| = m · 2^(e-23) is rounded half-to-even to a multiple of the format's
    quantum 2^(max(e, e_min) - Y), i.e. d = 23 - Y + max(0, e_min - e) low bits are dropped.
    """
    f = float_format(fmt)
    x = jnp.asarray(x).astype(jnp.float32)
    bits = lax.bitcast_convert_type(x, jnp.int32)
    mag = bits & jnp.int32(0x7FFFFFFF)
    biased = mag >> 23
    exponent = jnp.minimum(biased - 127, f.emax + 1)  # beyond e_max + 1 everything saturates alike
    significand = jnp.where(biased == 0, 0, (mag & jnp.int32(0x7FFFFF)) | jnp.int32(0x800000))  # FTZ input
    quantum_exp = jnp.maximum(exponent, f.emin)
    drop = jnp.clip(23 - f.man_bits + quantum_exp - exponent, 0, 30)  # >= 25 already rounds to 0
    half_minus_one = (jnp.int32(1) << drop >> 1) - 1
    rounded = (significand + half_minus_one + ((significand >> drop) & 1)) >> drop  # RNE
    rounded = jnp.where(drop == 0, significand, rounded)
    y = _mul_exp2(rounded.astype(jnp.float32), quantum_exp - f.man_bits, f.emin - f.man_bits,
                  f.emax + 1 - f.man_bits)
    y = jnp.where(mag > jnp.int32(0x7F800000), jnp.float32(jnp.nan), jnp.minimum(y, jnp.float32(f.max)))
    sign = bits & jnp.int32(-(2**31))  # copysign, as bit arithmetic
    return lax.bitcast_convert_type(lax.bitcast_convert_type(y, jnp.int32) | sign, jnp.float32)


# Hardware float8 converts, for the two formats that have them, inside the Pallas quantizer only.
# cast_to_format is the definition; Triton's e4m3 convert matched it on every value tried on an H100,
# while an XLA-compiled f32 → float8 → f32 round trip on that GPU (jax 0.11.2) came back unrounded for
# most values (likely XLA's allow-excess-precision simplification), so XLA paths never use astype.
NATIVE_DTYPES = {"e4m3fn": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def native_cast(x: jax.Array, f: FloatFormat) -> jax.Array:
    """x rounded to f by the hardware float8 convert where f has one (e4m3fn, e5m2), else cast_to_format."""
    dtype = NATIVE_DTYPES.get(f.name)
    if dtype is None:
        return cast_to_format(x, f)
    return jnp.clip(x, -f.max, f.max).astype(dtype).astype(jnp.float32)


def round_mantissa(x: jax.Array, bits: int, rounding: str = "truncate", keep_specials: bool = True) -> jax.Array:
    """Keep `bits` explicit mantissa bits of float32 x: 'truncate' (toward zero) or 'nearest' (RNE).

    Plain int32 bit arithmetic (also inside the Pallas kernel); inf and NaN pass through unless
    keep_specials=False (the kernel's cheaper variant, where a NaN may turn into inf).
    """
    drop = 23 - bits
    if drop <= 0:
        return x
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
    u = lax.bitcast_convert_type(x, jnp.int32)  # sign-magnitude: integer ops act on the magnitude
    v = u
    if rounding == "nearest":
        v = v + (jnp.int32((1 << (drop - 1)) - 1) + ((v >> drop) & 1))
    v = v & jnp.int32(-(1 << drop))
    if not keep_specials:
        return lax.bitcast_convert_type(v, jnp.float32)
    special = (u & jnp.int32(0x7F800000)) == jnp.int32(0x7F800000)
    return lax.bitcast_convert_type(jnp.where(special, u, v), jnp.float32)


def operand_dtype(*fmts: FloatFormat):
    """bf16 holds every value of formats with <= 7 mantissa bits exactly (same exponent range as fp32)."""
    return jnp.bfloat16 if all(f.man_bits <= 7 for f in fmts) else jnp.float32
