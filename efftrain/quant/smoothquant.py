"""SmoothQuant (Xiao et al. 2022, arXiv 2211.10438): migrate activation outliers into the weights, exactly.

For a Linear Y = X W (X [N, in], W [in, out]) per-token activation quantization suffers from a few input
channels whose magnitude is far above the rest. SmoothQuant rescales input channel j by s_j:

    Y = (X diag(s)^-1) (diag(s) W),       s_j = max|X_j|^α / max|W_j|^(1-α)        (eq. 4)

max|X_j| over the calibration tokens, max|W_j| over row j of every weight that reads X (and over all
their output columns), α the migration strength (0.5 in the paper; larger moves more of the range into
the weights). X diag(s)^-1 is not computed: 1/s is folded into the RMSNorm that produces X (its scale
γ ← γ / s, exact since RMSNorm(x)·γ/s is the same per-channel product), and diag(s) into the rows of
the weights, so the smoothed 16-bit model computes the same function (up to float rounding; tested) and
the following quantizers (weights: efftrain.quant.apply; activations: efftrain.quant.activations) see
smoother inputs. As the reference (`smooth.py` smooth_ln_fcs: s clamped to >= 1e-5, max|W_j| too),
only norm-preceded groups are smoothed, with one s per group shared by its Linears:

    attn_norm  -> q, k, v             (MLA: q or q_down, and kv_down)
    q_norm     -> q_up                (MLA with q_lora_rank > 0)
    kv_norm    -> kv_up               (MLA)
    ffn_norm   -> MLP gate, up        (MoE: every routed expert's w_gate/w_up [E, D, H] and the shared
                                       experts' gate/up; the router's kernel rows are multiplied by s
                                       too, so its logits, and the routing, are unchanged; it is not in
                                       the max|W_j| since it stays 16-bit)

These are AWQ's norm-preceded scale groups (efftrain.quant.awq_model.scale_groups; its `fold` applies
them); the Linear -> Linear pairs (v -> o, up -> down) are not smoothed, as in the reference. The
statistics come from the 16-bit model: block l's inputs are captured (efftrain.quant.apply._block_pass,
the model's own forward under capture_linear_inputs) on the outputs of the 16-bit blocks 0..l-1, as the
reference collects all act scales with hooks on the FP model before smoothing (the fold being exact, the
smoothed blocks would give the same inputs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from efftrain.model.layers import RMSNorm
from efftrain.quant.apply import _block_pass
from efftrain.quant.awq_model import ScaleGroup, _node, _var, fold, scale_groups
from efftrain.xla import ptq_jit

MIN_SCALE = 1e-5  # the reference's clamp of s and of max|W_j|


def check_alpha(alpha) -> float:
    """α as a float in [0, 1] (ValueError otherwise)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise ValueError(f"SmoothQuant alpha must be a number in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    if not (0.0 <= alpha <= 1.0) or math.isnan(alpha):
        raise ValueError(f"SmoothQuant alpha must lie in [0, 1] (migration strength; the paper uses 0.5), got {alpha}")
    return alpha


def smooth_groups(block) -> list[ScaleGroup]:
    """The scale groups of `block` whose input is produced by an RMSNorm (the ones SmoothQuant folds)."""
    return [grp for grp in scale_groups(block) if isinstance(_node(block, grp.prev), RMSNorm)]


def weight_absmax(ws: list[jax.Array]) -> jax.Array:
    """max|W_j| per input row j over every weight [..., in, out] of the group (stacked experts included)."""
    per = [jnp.max(jnp.abs(w.astype(jnp.float32)), axis=tuple(a for a in range(w.ndim) if a != w.ndim - 2))
           for w in ws]
    return jnp.max(jnp.stack(per), axis=0)


@ptq_jit
def smooth_scales(act_absmax: jax.Array, w_absmax: jax.Array, alpha) -> jax.Array:
    """s = max|X|^α / max(max|W|, 1e-5)^(1-α), clamped to >= 1e-5 (eq. 4; the reference's clamps)."""
    w = jnp.maximum(w_absmax, MIN_SCALE)
    return jnp.maximum(act_absmax ** alpha / w ** (1.0 - alpha), MIN_SCALE).astype(jnp.float32)


@ptq_jit
def _act_absmax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=0)


@dataclass
class SmoothReport:
    alpha: float
    scales: dict[str, jax.Array] = field(default_factory=dict)  # "blocks/l/group" -> s [in]
    act_absmax: dict[str, jax.Array] = field(default_factory=dict)  # "blocks/l/group" -> max|X_j| before

    @property
    def n_groups(self) -> int:
        return len(self.scales)

    def outlier_ratio(self) -> dict[str, tuple[float, float]]:
        """Per group, max_j max|X_j| / median_j max|X_j| before and after smoothing (how far the worst
        channel sticks out; per-token quantization pays for it)."""
        out = {}
        for key, s in jax.device_get(self.scales).items():
            before = np.asarray(jax.device_get(self.act_absmax[key]), np.float64)
            after = before / np.asarray(s, np.float64)
            out[key] = tuple(float(a.max() / max(np.median(a), 1e-30)) for a in (before, after))
        return out


def smooth_model(model, calib_tokens, alpha: float = 0.5) -> SmoothReport:
    """Smooth every norm-preceded scale group of `model.blocks` in place (module docstring), from the
    activations of calib_tokens [n, T] int through the 16-bit model. The model stays 16-bit and computes
    the same function; returns the scales per group."""
    alpha = check_alpha(alpha)
    tokens = jnp.asarray(calib_tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise ValueError(f"calib_tokens must be [n_sequences, seq_len] with n, T >= 1, got shape {tokens.shape}")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    report = SmoothReport(alpha=alpha)
    h = model.embed(tokens)
    for li, block in enumerate(model.blocks):
        inputs, h_next = _block_pass(block, h, positions)  # the 16-bit block's inputs and output
        for grp in smooth_groups(block):
            x_max = _act_absmax(inputs[grp.source])
            s = smooth_scales(x_max, weight_absmax([_var(block, p)[...] for p in grp.weights]), alpha)
            fold(block, grp, s)
            report.scales[f"blocks/{li}/{grp.name}"] = s
            report.act_absmax[f"blocks/{li}/{grp.name}"] = x_max
        h = h_next
    return report
