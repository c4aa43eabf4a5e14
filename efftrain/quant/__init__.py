"""Post-training quantization (docs/METHODS.md §2; docs/PTQ.md).

A PTQ row applies a scheme (scheme.py) to a 16-bit checkpoint, stage by stage:
  rotation.py      1. residual-stream rotation folded into the weights (QuaRot), exact
  smoothquant.py   2. SmoothQuant's per-channel migration into the norms, exact
  apply.py         3. the weight quantizer over the model: rtn.py, gptq.py (arXiv 2210.17323), awq.py /
                      awq_model.py (arXiv 2306.00978), billm.py (arXiv 2402.04291); FP8 blocks in
                      activations.py; grids and packing in formats.py
  activations.py,  4. runtime quantizers the forward reads: every block GEMM's input, the KV cache
  kvcache.py
  sweep.py         the sweep over a run's checkpoint series (ptq.csv), recovery.py its fine-tuning rows

Convention: ``y = x @ w`` with ``w[in, out]``; a group is ``group_size`` consecutive input rows of one
output column (-1 = the whole input dim). Every weight quantizer returns the dequantized weight in the
input's shape, dtype and array kind (numpy or jax), ready to substitute for ``w``.
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
