"""Round-to-nearest (RTN) weight quantization: the baseline of GPTQ and AWQ (docs/METHODS.md §2).

For ``w[..., in, out]`` (``y = x @ w``) and every group G of ``g`` consecutive input rows of one output
column (``g = in`` for ``group_size=-1``)::

    (s_G, z_G) = params(w_G)                     (efftrain.quant.formats: int min-max or absmax, nf4, fp4, fp8)
    w_hat_G    = decode(encode(w_G; s_G, z_G))   i.e. the nearest grid point of every weight

independently for every weight; no calibration data. This is the "RTN" row of the GPTQ paper's tables
(Frantar et al. 2022, arXiv 2210.17323 §5, "round-to-nearest") and AWQ's baseline (Lin et al. 2023,
arXiv 2306.00978 §3.1). One jitted, vectorised XLA program (numpy in -> numpy out, jax in -> jax out);
deterministic.
"""

from __future__ import annotations

from .formats import check_weight, cast_like, rtn_jit, to_compute, make_format, resolve_group_size

__all__ = ["quantize_rtn"]


def quantize_rtn(w, *, bits: int, group_size: int = 128, symmetric: bool = False, fmt: str = "int"):
    """Dequantized RTN weight: same shape, dtype and array kind (numpy / jax) as ``w[..., in, out]``.

    Leading dims (stacked experts) are quantized independently. float32 arithmetic (float64 only for
    float64 input with jax x64 enabled); ``unpack(*pack(w, ...))`` reproduces the result exactly.
    """
    check_weight(w)
    f = make_format(bits, fmt, symmetric)
    g = resolve_group_size(group_size, w.shape[-2])
    return cast_like(rtn_jit(to_compute(w), f, g), w)
