"""A PTQ row's scheme: what is done to a 16-bit checkpoint before it is scored.

The quant package in one table (docs/PTQ.md, "Schemes"):

  stage                      module            what it changes                            exact in 16-bit?
  1. rotation (optional)     rotation.py       residual stream × orthogonal Q, folded     yes (tested)
                                               into the weights (QuaRot); optionally V/O
  2. smoothing (optional)    smoothquant.py    per-channel x/s into the norm, s into the  yes (tested)
                                               weight rows (SmoothQuant)
  3. weight quantizer        apply.py          RTN / GPTQ / AWQ / awq-linear / BiLLM      no: this is the
                             (rtn, gptq, awq,  ('none' keeps 16-bit weights; 'fp8-block'  quantization
                             awq_model, billm) = E4M3 in 128×128 blocks, activations.py)
  4. runtime quantizers      activations.py,   static module attributes read by the       no
                             kvcache.py        forward: every block GEMM's input
                                               (Linear.act_quant, MoE.act_quant) and the
                                               KV cache (Attention / MLAttention.kv_quant)
  5. evaluation              efftrain.eval     the transformed model against the          -
                                               untouched 16-bit checkpoint, window by window

A weight-only row (stage 3 alone) is what efftrain measured before schemes existed; its `format` column
and key are unchanged. Any other stage adds a suffix to `format` ('int+a8', 'none+kv-int4',
'int+rot-hadamard', 'int+sq0.5+a8'), so (step, method, bits, group_size, format) still keys a row, and
fills the columns of SCHEME_COLUMNS. Named schemes follow the literature: w8a8 = int8 weights + int8
per-token activations (SmoothQuant's setting), w4a8, fp8 = E4M3 weights in 128×128 blocks + E4M3
activations in 1×128 tiles (DeepSeek-V3's inference recipe), w16a16+kv-int4 = a quantized KV cache alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from efftrain.quant.activations import ActQuant, quantize_model_fp8_blocks, set_activation_quant
from efftrain.quant.apply import QuantReport, QuantSettings, quantize_model
from efftrain.quant.kvcache import KVQuant, kv_bytes_per_token, set_kv_quant
from efftrain.quant.rotation import rotate_model
from efftrain.quant.smoothquant import smooth_model

NO_WEIGHTS = "none"  # weights stay 16-bit: a scheme of runtime quantizers only (e.g. the KV cache alone)
FP8_BLOCK = "fp8-block"  # E4M3 weights with one scale per 128×128 block (efftrain.quant.activations)
FP8_BLOCK_SIZE = 128
SCHEME_COLUMNS = ["scheme", "act_quant", "kv_quant", "kv_bytes_per_token", "rotation", "smooth_alpha"]


@dataclass(frozen=True)
class Scheme:
    """One row's transformation of a checkpoint. `method` is the weight quantizer: one of
    efftrain.quant.apply.METHODS (with its `weights` settings), NO_WEIGHTS or FP8_BLOCK (no settings)."""

    method: str
    weights: QuantSettings | None = None
    acts: ActQuant | None = None
    kv: KVQuant | None = None
    rotation: str | None = None  # 'hadamard' | 'orthogonal' (efftrain.quant.rotation)
    rotate_values: bool = False
    rotation_seed: int = 0
    smooth_alpha: float | None = None

    def __post_init__(self):
        if (self.weights is None) != (self.method in (NO_WEIGHTS, FP8_BLOCK)):
            raise ValueError(f"scheme method {self.method!r}: settings are given exactly for the quantizers of "
                             "efftrain.quant.apply.METHODS")
        if self.weights is not None and self.weights.method != self.method:
            raise ValueError(f"scheme method {self.method!r} with settings of {self.weights.method!r}")

    # the row's weight columns
    @property
    def bits(self) -> int:
        return self.weights.bits if self.weights else (16 if self.method == NO_WEIGHTS else 8)

    @property
    def group_size(self) -> int:
        return self.weights.group_size if self.weights else (-1 if self.method == NO_WEIGHTS else FP8_BLOCK_SIZE)

    @property
    def weight_format(self) -> str:
        """The weight part of the `format` column: 'int', 'nf4', ..., '<fmt>+head' when the output head is
        quantized too, 'none' (16-bit weights), 'e4m3-block'."""
        if self.weights is None:
            return "none" if self.method == NO_WEIGHTS else "e4m3-block"
        return f"{self.weights.fmt}+head" if self.weights.quantize_head else self.weights.fmt

    @property
    def row_format(self) -> str:
        return self.weight_format + self.suffix()

    @property
    def weight_only(self) -> bool:
        """Stage 3 alone, with a real weight quantizer: the rows efftrain has always produced."""
        return (self.acts is None and self.kv is None and self.rotation is None and self.smooth_alpha is None
                and self.weights is not None)

    @property
    def rotation_label(self) -> str | None:
        if self.rotation is None:
            return None
        return f"{self.rotation}+values" if self.rotate_values else self.rotation

    def suffix(self) -> str:
        """What the `format` column appends to the weight format: '' for a weight-only row."""
        parts = []
        if self.rotation is not None:
            parts.append(f"rot-{self.rotation}" + ("-v" if self.rotate_values else ""))
        if self.smooth_alpha is not None:
            parts.append(f"sq{self.smooth_alpha:g}")
        if self.acts is not None:
            parts.append(self.acts.label)
        if self.kv is not None:
            parts.append(self.kv.label)
        return "".join(f"+{p}" for p in parts)

    def name(self) -> str:
        """The `scheme` column: 'w4a16', 'w8a8', 'w4a8', 'fp8', 'w16a16+kv-int4', 'w3a16+rot-hadamard', ..."""
        w_part = {NO_WEIGHTS: "w16", FP8_BLOCK: "wfp8"}.get(self.method, f"w{self.bits}")
        a_part = "a16" if self.acts is None else {"int8": "a8", "int4": "a4", "fp8": "afp8"}[self.acts.kind]
        base = "fp8" if (w_part, a_part) == ("wfp8", "afp8") else w_part + a_part
        extra = [p for p in self.suffix().split("+")[1:] if p != (self.acts.label if self.acts else None)]
        return "+".join([base, *extra])

    def columns(self, cfg) -> dict[str, Any]:
        """The row's SCHEME_COLUMNS (cfg: the run's ModelConfig, for the KV bytes per token)."""
        return {"scheme": self.name(), "act_quant": self.acts.label if self.acts else None,
                "kv_quant": self.kv.label if self.kv else None, "kv_bytes_per_token": kv_bytes_per_token(cfg, self.kv),
                "rotation": self.rotation_label, "smooth_alpha": self.smooth_alpha}


def apply_scheme(model, calib_tokens, scheme: Scheme) -> QuantReport:
    """Stages 1–4 of the module docstring on `model` (a 16-bit copy), in place; the weight quantizer's
    report (an empty one when the weights stay 16-bit)."""
    if scheme.rotation is not None:
        rotate_model(model, scheme.rotation, scheme.rotation_seed, rotate_values=scheme.rotate_values)
    if scheme.smooth_alpha is not None:
        smooth_model(model, calib_tokens, scheme.smooth_alpha)
    method = scheme.method
    if method == NO_WEIGHTS:
        report = QuantReport(method=NO_WEIGHTS)
    elif method == FP8_BLOCK:
        report = quantize_model_fp8_blocks(model, (FP8_BLOCK_SIZE, FP8_BLOCK_SIZE))
    else:
        report = quantize_model(model, calib_tokens, scheme.weights)
    if scheme.acts is not None:
        set_activation_quant(model, scheme.acts)
    if scheme.kv is not None:
        set_kv_quant(model, scheme.kv)
    return report
