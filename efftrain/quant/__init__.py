"""Weight-only post-training quantization (docs/METHODS.md §2; docs/PTQ.md): RTN, GPTQ (arXiv 2210.17323), AWQ
(arXiv 2306.00978: one Linear in awq.py, a whole block as published in awq_model.py) on int / nf4 / fp4 /
fp8 grids with per-group float16 scales.

Convention: ``y = x @ w`` with ``w[in, out]``; a group is ``group_size`` consecutive input rows of one
output column (-1 = the whole input dim). Every quantizer returns the dequantized weight in the input's
shape, dtype and array kind (numpy or jax), ready to substitute for ``w``.
"""

from .awq import quantize_awq
from .formats import (
    FORMATS,
    FP4_E2M1_VALUES,
    FP8_E4M3_MAX,
    FP8_E4M3_VALUES,
    NF4_VALUES,
    Packed,
    QuantFormat,
    bitpack,
    bitunpack,
    effective_bits,
    fake_quantize_groups,
    levels,
    make_format,
    pack,
    resolve_group_size,
    unpack,
)
from .gptq import hessian_from_inputs, quantize_gptq, quantize_gptq_from_hessian
from .rtn import quantize_rtn

__all__ = [
    "quantize_rtn",
    "quantize_gptq",
    "quantize_gptq_from_hessian",
    "hessian_from_inputs",
    "quantize_awq",
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
    "fake_quantize_groups",
    "Packed",
    "pack",
    "unpack",
    "bitpack",
    "bitunpack",
]
