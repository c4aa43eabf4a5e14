"""Quantize a whole model: which weights, which calibration inputs, in which order.

Covered (weight-only, y = x @ w, w [in, out]): every `Linear` inside the transformer blocks — attention
q/k/v/o or MLA's q_down/q_up (or q), kv_down, kv_up and o; the dense MLP's gate/up/down; an MoE
layer's shared experts — and each routed expert's gate/up/down slice of the stacked [E, in, out]
weights. Kept in 16-bit by default: token embedding, output head, MoE router, norms, and the MTP
modules (they are excluded from evaluation anyway). `quantize_head` also quantizes an untied output
head, calibrated on the final-norm hidden states after all (quantized) blocks.

Calibration (GPTQ/AWQ) is sequential, as in GPTQ (Frantar et al. 2022, §4 "Step 3"): the calibration
hidden states enter block l after blocks 0..l-1 have been quantized, so each block is calibrated on
the inputs it will see at inference. Inside a block, every Linear's inputs are captured in one
forward pass through the block's original weights. Each routed expert is calibrated on exactly the
tokens the router sends to it (its top-k assignments); its `down` projection on those tokens' SwiGLU
activations. An expert that receives fewer than `min_expert_tokens` calibration tokens falls back to
RTN, and the number of such experts is reported.

Implementation (speed on accelerators): a block's calibration pass is one jitted program, reused for
the quantized block's output; calibration rows are zero-padded to a power of two so per-expert
statistics compile once per bucket; GPTQ quantizes all routed experts of a layer in one stacked
program, with each expert's Hessian from the layer's tokens masked to those routed to it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from flax import nnx
from scipy.special import expit

from efftrain.model import layers
from efftrain.model.layers import Linear
from efftrain.quant.awq import quantize_awq
from efftrain.quant.formats import Packed, effective_bits, resolve_group_size
from efftrain.quant.gptq import quantize_gptq, quantize_gptq_from_hessian
from efftrain.quant.rtn import quantize_rtn

METHODS = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class QuantSettings:
    method: str
    bits: int
    group_size: int = 128
    fmt: str = "int"
    symmetric: bool = False
    damp: float = 0.01
    act_order: bool = False
    awq_grid: int = 20
    min_expert_tokens: int = 16
    quantize_head: bool = False  # also the (untied) output head, calibrated on the final-norm states

    def __post_init__(self):
        if self.min_expert_tokens < 1:  # an expert with no tokens has no statistics to calibrate on
            raise ValueError(f"min_expert_tokens must be at least 1, got {self.min_expert_tokens}")

    def group_for(self, in_dim: int) -> int:
        """Group size used for a weight with `in_dim` input rows: whole-channel when the group is at
        least as large as the layer (tiny models), otherwise it must divide in_dim."""
        if self.group_size == -1 or self.group_size >= in_dim:
            return -1
        resolve_group_size(self.group_size, in_dim)  # raises with a clear message if it doesn't divide
        return self.group_size


@dataclass
class QuantReport:
    n_weights: int = 0  # matrices quantized (each expert's gate/up/down counts once)
    n_params: int = 0  # weight elements quantized
    weight_bits: float = 0.0  # Σ elements × effective bits
    expert_fallbacks: int = 0  # routed experts quantized with RTN for lack of calibration tokens
    expert_matrices: int = 0
    packed: dict[str, Any] = field(default_factory=dict)  # "path" or "path#expert" -> Packed (+ AWQ scales)

    @property
    def eff_bits(self) -> float:
        return self.weight_bits / max(self.n_params, 1)

    def add(self, w_shape: tuple[int, ...], s: QuantSettings, extra_bits_per_row: float = 0.0) -> None:
        n_in, n_out = w_shape[-2:]
        count = int(np.prod(w_shape))
        bits = effective_bits(s.bits, s.group_for(n_in), n_in, fmt=s.fmt, symmetric=s.symmetric)
        self.n_weights += int(np.prod(w_shape[:-2], dtype=np.int64)) if len(w_shape) > 2 else 1
        self.n_params += count
        self.weight_bits += count * bits + extra_bits_per_row * n_in * (count // (n_in * n_out))


# ----------------------------------------------------------------------------------------------
# Capturing the inputs of every Linear during a forward pass
# ----------------------------------------------------------------------------------------------
@contextmanager
def capture_linear_inputs() -> Iterator[dict[int, list[jax.Array]]]:
    """Inside the context, each Linear called records its input: {id(linear): [x, ...]} (also the
    Linears that share one input through `apply_shared_input`, as q/k/v do with simulated FP8)."""
    sink: dict[int, list[jax.Array]] = {}

    def record(linear, x):
        sink.setdefault(id(linear), []).append(x.reshape(-1, x.shape[-1]).astype(jnp.float32))

    token = layers.input_observer.set(record)
    try:
        yield sink
    finally:
        layers.input_observer.reset(token)


@nnx.jit
def _block_pass(block, h, positions):
    """One block on h, jitted: ({Linear path: its inputs [n, in]}, the MoE layer's input [n, d] or None,
    the block's output). PTQ calls it twice per block, on the original weights for the calibration
    inputs and on the quantized ones for the next block's input, so both share one compiled program
    (calls inside are traced, hence paths, not ids). Op by op an FP8 block took ~18 s per GPTQ row."""
    paths = {id(lin): name for name, lin in linears_of(block)}
    with capture_linear_inputs() as captured:
        x = h + block.attn(block.attn_norm(h), positions)  # as Block.__call__
        ffn_in = block.ffn_norm(x)
        y = block.ffn(ffn_in)[0] if block.is_moe else block.ffn(ffn_in)
    moe_inputs = ffn_in.reshape(-1, ffn_in.shape[-1]) if block.is_moe else None
    return {paths[k]: jnp.concatenate(xs) for k, xs in captured.items()}, moe_inputs, x + y


def linears_of(module: nnx.Module) -> list[tuple[str, Linear]]:
    return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(module) if isinstance(m, Linear)]


# ----------------------------------------------------------------------------------------------
# One matrix
# ----------------------------------------------------------------------------------------------
def quantize_matrix(w: jax.Array, x: jax.Array | None, s: QuantSettings) -> tuple[jax.Array, Packed, Any]:
    """(dequantized w, packed codes, AWQ input scales or None) for one [in, out] matrix."""
    g = s.group_for(w.shape[0])
    w32 = np.asarray(w, np.float32)
    common = dict(bits=s.bits, group_size=g, symmetric=s.symmetric, fmt=s.fmt)
    if s.method == "rtn" or x is None:
        from efftrain.quant.formats import pack

        packed = pack(w32, **common)
        return jnp.asarray(quantize_rtn(w32, **common)), packed, None
    x32 = np.asarray(x, np.float32)
    if s.method == "gptq":
        w_hat, packed = quantize_gptq(w32, x32, damp=s.damp, act_order=s.act_order, return_packed=True, **common)
        return jnp.asarray(w_hat), packed, None
    if s.method == "awq":
        w_hat, info = quantize_awq(w32, x32, grid=s.awq_grid, return_packed=True, **common)
        # stored: codes of Q(diag(s) w) and 1/s; w_eff = Q(diag(s) w) · (1/s) exactly as AWQ computes it
        return jnp.asarray(w_hat), info["packed"], np.asarray(info["inv_s"], np.float32)
    raise ValueError(f"unknown PTQ method '{s.method}' (choose from {', '.join(METHODS)})")


# ----------------------------------------------------------------------------------------------
# The model, block by block
# ----------------------------------------------------------------------------------------------
def quantize_model(model, calib_tokens: np.ndarray, s: QuantSettings) -> QuantReport:
    """Quantize `model` in place (its Param values are replaced by dequantized weights).

    calib_tokens [n, T] int: calibration sequences (from the train split).
    """
    if s.method not in METHODS:
        raise ValueError(f"unknown PTQ method '{s.method}' (choose from {', '.join(METHODS)})")
    report = QuantReport()
    needs_inputs = s.method != "rtn"
    tokens = jnp.asarray(calib_tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h = model.embed(tokens) if needs_inputs else None
    for li, block in enumerate(model.blocks):
        prefix = f"blocks/{li}"
        captured, moe_inputs, _ = _block_pass(block, h, positions) if needs_inputs else ({}, None, None)
        # dense Linears (attention, MLP, shared experts): skip the router (kept in 16-bit)
        for name, lin in linears_of(block):
            x = captured.get(name)
            w_hat, packed, awq_s = quantize_matrix(lin.kernel[...], x, s)
            lin.kernel[...] = w_hat.astype(lin.kernel[...].dtype)
            report.add(tuple(lin.kernel[...].shape), s, 16.0 if awq_s is not None else 0.0)
            report.packed[f"{prefix}/{name}/kernel"] = (packed, awq_s)
        if block.is_moe:
            quantize_experts(block.ffn, moe_inputs, s, report, f"{prefix}/ffn")
        if needs_inputs:
            h = _block_pass(block, h, positions)[2]  # next block sees this block's quantized output
    if s.quantize_head:
        if model.lm_head is None:
            raise ValueError("quantize_head needs an untied output head (model.tie_embeddings is true)")
        x = model.final_norm(h).reshape(-1, h.shape[-1]).astype(jnp.float32) if needs_inputs else None
        w_hat, packed, awq_s = quantize_matrix(model.lm_head.kernel[...], x, s)
        model.lm_head.kernel[...] = w_hat.astype(model.lm_head.kernel[...].dtype)
        report.add(tuple(model.lm_head.kernel[...].shape), s, 16.0 if awq_s is not None else 0.0)
        report.packed["lm_head/kernel"] = (packed, awq_s)
    return report


EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
STACKED_GPTQ_BYTES = 1 << 30  # experts per stacked GPTQ program: about this much working memory


# jitted: run op by op, an MoE router compiles its small programs on first use (seconds on a GPU)
@nnx.jit
def _expert_choice(moe, x2d):
    return moe.route(x2d).expert_idx


def quantize_experts(moe, x2d: jax.Array | None, s: QuantSettings, report: QuantReport, prefix: str) -> None:
    """Per routed expert e: gate/up on the tokens routed to e, down on their SwiGLU activations."""
    w = {name: np.asarray(getattr(moe, name)[...], np.float32) for name in EXPERT_WEIGHTS}
    E = w["w_gate"].shape[0]
    calibrated = np.zeros(E, bool)
    x = routed = gptq = None
    if x2d is not None:
        x = np.asarray(x2d, np.float32)
        idx = np.asarray(_expert_choice(moe, x2d))  # [N, K]
        routed = np.stack([np.any(idx == e, axis=-1) for e in range(E)])  # [E, N]
        calibrated = routed.sum(axis=1) >= s.min_expert_tokens
        report.expert_fallbacks += int(E - calibrated.sum())
    if s.method == "gptq" and calibrated.any():
        gptq = _gptq_experts(w, x2d, routed, calibrated, s)
    out = {name: value.copy() for name, value in w.items()}
    for e in range(E):
        inputs = dict.fromkeys(EXPERT_WEIGHTS)
        if calibrated[e] and s.method == "awq":
            x_e = x[routed[e]]
            inputs = {"w_gate": x_e, "w_up": x_e, "w_down": _swiglu(x_e, w["w_gate"][e], w["w_up"][e])}
        for name in EXPERT_WEIGHTS:
            if calibrated[e] and s.method == "gptq":
                w_hat, packed, awq_s = gptq[name][0][e], gptq[name][1][e], None
            else:
                w_hat, packed, awq_s = quantize_matrix(w[name][e], inputs[name], s)
            out[name][e] = np.asarray(w_hat)
            report.add(out[name][e].shape, s, 16.0 if awq_s is not None else 0.0)
            report.packed[f"{prefix}/{name}#{e}"] = (packed, awq_s)
        report.expert_matrices += 3
    for name, value in out.items():
        var = getattr(moe, name)
        var[...] = jnp.asarray(value, var[...].dtype)


def _swiglu(x, w_gate, w_up):
    gate = x @ w_gate  # numpy: a jax op here would compile once per expert's token count
    return (gate * expit(gate) * (x @ w_up)).astype(np.float32)


@jax.jit
def _expert_hessians(x, routed, w_gate, w_up):
    """``2 X_e^T X_e`` over each expert's tokens and over their SwiGLU activations (the down projection's
    inputs): x [N, d], routed [E, N] in {0, 1}, w_gate/w_up [E, d, h] -> ([E, d, d], [E, h, h]).
    Zeroing the rows of the other tokens gives the Hessian of the routed rows with one static shape
    for every expert; one expert at a time (lax.map) keeps memory at N x max(d, h)."""

    def gram(a):
        return 2 * jnp.matmul(a.T, a, precision=lax.Precision.HIGHEST)

    def one(args):
        m, wg, wu = args
        hp = lax.Precision.HIGHEST
        hidden = jax.nn.silu(jnp.matmul(x, wg, precision=hp)) * jnp.matmul(x, wu, precision=hp)
        return gram(x * m[:, None]), gram(hidden * m[:, None])

    return lax.map(one, (routed, w_gate, w_up))


def _gptq_experts(w, x2d, routed, calibrated, s: QuantSettings) -> dict[str, tuple[np.ndarray, list[Packed]]]:
    """GPTQ of all routed experts of a layer at once (one stacked program per weight name); the
    experts left for RTN get an identity Hessian here and their result is not used."""
    H_in, H_hidden = _expert_hessians(jnp.asarray(x2d, jnp.float32), jnp.asarray(routed, jnp.float32),
                                      jnp.asarray(w["w_gate"]), jnp.asarray(w["w_up"]))
    keep = jnp.asarray(calibrated)[:, None, None]
    results = {}
    for name, H in (("w_gate", H_in), ("w_up", H_in), ("w_down", H_hidden)):
        H = jnp.where(keep, H, jnp.eye(H.shape[-1], dtype=H.dtype))
        E, n_in, n_out = w[name].shape
        # the stacked program holds a few [in, in] float32 arrays per expert: bound it for large layers
        chunk = max(1, STACKED_GPTQ_BYTES // (4 * 4 * n_in * (n_in + n_out)))
        w_hat, packed = [], []
        for e0 in range(0, E, chunk):
            q, p = quantize_gptq_from_hessian(
                w[name][e0:e0 + chunk], H[e0:e0 + chunk], bits=s.bits, group_size=s.group_for(n_in),
                damp=s.damp, act_order=s.act_order, symmetric=s.symmetric, fmt=s.fmt, return_packed=True)
            w_hat.extend(q)
            zeros = p.zeros if p.zeros is not None else [None] * len(q)
            packed.extend(Packed(c, sc, z) for c, sc, z in zip(p.codes, p.scales, zeros))
        results[name] = (w_hat, packed)
    return results


def count_bytes(model, report: QuantReport) -> int:
    """Model bytes: quantized weights at their effective bits + every other parameter at 16 bits
    (MTP modules excluded, as they are not part of the deployed model)."""
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    mtp = 0 if model.mtp is None else sum(x.size for x in jax.tree.leaves(nnx.state(model.mtp, nnx.Param)))
    return int(round(report.weight_bits / 8 + (total - mtp - report.n_params) * 2))


# ----------------------------------------------------------------------------------------------
# Packed storage (`efftrain ptq --save`) and its exact reload
# ----------------------------------------------------------------------------------------------
def packed_arrays(report: QuantReport) -> dict[str, np.ndarray]:
    arrays = {}
    for key, (packed, awq_s) in report.packed.items():
        arrays[f"{key}|codes"] = np.asarray(packed.codes, np.uint8)
        arrays[f"{key}|scales"] = np.asarray(packed.scales, np.float16)
        if packed.zeros is not None:
            arrays[f"{key}|zeros"] = np.asarray(packed.zeros, np.float16)
        if awq_s is not None:
            arrays[f"{key}|awq_inv_scale"] = np.asarray(awq_s, np.float32)
    return arrays


def dequantize_arrays(arrays: dict[str, np.ndarray], *, bits: int, fmt: str) -> dict[str, np.ndarray]:
    """{weight key: dequantized [in, out]} from `packed_arrays` output."""
    from efftrain.quant.formats import unpack

    out = {}
    for key in sorted({k.split("|")[0] for k in arrays}):
        w = unpack(arrays[f"{key}|codes"], arrays[f"{key}|scales"], arrays.get(f"{key}|zeros"), bits=bits, fmt=fmt)
        if f"{key}|awq_inv_scale" in arrays:  # AWQ: w_eff = Q(diag(s) w) · (1/s)
            w = np.asarray(jnp.asarray(w, jnp.float32) * jnp.asarray(arrays[f"{key}|awq_inv_scale"])[:, None])
        out[key] = w
    return out


def load_dequantized(model, weights: dict[str, np.ndarray]) -> None:
    """Write dequantized weights (keys as in QuantReport.packed) into the model's Params."""
    experts: dict[str, dict[int, np.ndarray]] = {}
    for key, w in weights.items():
        if "#" in key:
            path, e = key.split("#")
            experts.setdefault(path, {})[int(e)] = w
            continue
        node = model
        for part in key.split("/")[:-1]:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        var = getattr(node, key.split("/")[-1])
        var[...] = jnp.asarray(w, var[...].dtype)
    for path, per_expert in experts.items():
        node = model
        for part in path.split("/")[:-1]:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        var = getattr(node, path.split("/")[-1])
        stacked = np.asarray(var[...]).copy()
        for e, w in per_expert.items():
            stacked[e] = w
        var[...] = jnp.asarray(stacked, var[...].dtype)

