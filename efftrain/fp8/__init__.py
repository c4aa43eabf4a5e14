"""Simulated FP8 GEMMs: formats, fine-grained scaling, limited-precision accumulation, custom-VJP linear.

Follows DeepSeek-V3 (arXiv 2412.19437) §3.3 "FP8 Training" and App. B.1 "FP8 vs. BF16 training";
validation in docs/FP8.md. Everything is computed in float32 with ordinary jnp arithmetic, so it runs
(and is jit-able) on any backend; GPU kernels compute the same numbers faster. Layers, each importing
only those before it:

    formats.py   eXmY formats, cast_to_format, round_mantissa
    scaling.py   tile / block scales: quantize, dequantize, fake_quantize
    kernels.py   the Triton kernels (one-pass quantizer, fused accumulator);  mosaic.py: the Hopper one
    matmul.py    fp8_matmul, the accumulator model, KernelChoice: which implementation runs
    linear.py    fp8_linear / fp8_linear_shared, the custom VJP the model's Linear layers use

Which kernels run is part of the config (FP8Config: fp8.quantize_impl, fp8.accumulate_impl,
fp8.native_casts, fp8.pallas_*, fp8.v3_fast_path); `implementation_record(cfg)` says what they resolve
to on this backend. This package must not import efftrain.config (the GPU image has no pydantic).
"""

from __future__ import annotations

from typing import Any

import jax

from efftrain.fp8.formats import FloatFormat, cast_to_format, float_format, round_mantissa
from efftrain.fp8.linear import LinearSpec, fp8_linear, fp8_linear_shared, v3_recipe
from efftrain.fp8.matmul import KernelChoice, fake_quantize_many, fp8_matmul, kernels_in_effect, quantize_many
from efftrain.fp8.scaling import dequantize, fake_quantize, quantize

__all__ = [
    "FloatFormat",
    "float_format",
    "cast_to_format",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_many",
    "quantize_many",
    "round_mantissa",
    "fp8_matmul",
    "fp8_linear",
    "fp8_linear_shared",
    "KernelChoice",
    "implementation_record",
]


def implementation_record(cfg: Any) -> dict:
    """The kernel choices FP8Config `cfg` makes on this backend, for run.json: {"enabled": False}, or
    backend, device, quantize, native_casts, accumulate (+ pallas_block) as in
    `efftrain.fp8.matmul.kernels_in_effect`, and v3_fast_path (the linear layers' one-pass path on
    128-aligned shapes)."""
    if not cfg.enabled:
        return {"enabled": False}
    return {"enabled": True, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            **kernels_in_effect(cfg), "v3_fast_path": v3_recipe(LinearSpec.of(cfg))}
