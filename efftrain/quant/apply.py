"""Quantize a whole model: which weights, which calibration inputs, in which order.

Covered (weight-only, y = x @ w, w [in, out]): every `Linear` inside the transformer blocks — attention
q/k/v/o or MLA's q_down/q_up (or q), kv_down, kv_up and o; the dense MLP's gate/up/down; an MoE
layer's shared experts — and each routed expert's gate/up/down slice of the stacked [E, in, out]
weights. Kept in 16-bit by default: token embedding, output head, MoE router, norms, and the MTP
modules (they are excluded from evaluation anyway). `quantize_head` also quantizes an untied output
head, calibrated on the final-norm hidden states after all blocks.

Methods (`METHODS`):
  rtn         round to nearest (efftrain.quant.rtn), no calibration.
  gptq        GPTQ (Frantar et al. 2022, arXiv 2210.17323). Sequential, as in its §4 "Step 3": the
              calibration hidden states enter block l after blocks 0..l-1 have been quantized, so each
              block is calibrated on the inputs it will see at inference.
  awq         AWQ as published (Lin et al. 2023, arXiv 2306.00978; llm-awq / AutoAWQ):
              efftrain.quant.awq_model. Scales shared by the Linears that read one input, searched on
              the block output with 16-bit inputs (block l calibrated on the 16-bit model's activations,
              as the reference runs the FP model forward), folded into the preceding norm or Linear (no
              extra bits), clipping search on (`awq_clip`), optional duo scaling (`awq_duo_scaling`).
  awq-linear  the earlier per-Linear variant, kept as an ablation: one scale per Linear searched on that
              Linear's own output (efftrain.quant.awq.quantize_awq), sequential inputs like GPTQ, the
              1/s kept explicit (charged 16 bits per input row and stored as `awq_inv_scale`).
  billm       BiLLM (Huang et al. 2024, arXiv 2402.04291; efftrain.quant.billm), 1-bit (`bits` must be 1;
              `group_size` is its block β, `damp` its dampening): Hessians from the captured inputs and
              sequential calibration exactly as gptq, routed experts on the same per-expert Hessians in
              one stacked program; an expert without enough tokens gets the identity Hessian (BiLLM
              with magnitude salience and no error compensation; method_label
              'billm+identity-hessian-fallback'). The ptq.csv eff_bits charges BiLLM's full storage
              (codes, group bitmap, salient-row bitmap, float16 scales: ~3 bits at β = 128), the
              paper's count (~1.1) is `QuantReport.published_eff_bits`. Not packed: `--save` stores the
              dequantized weights as floats.

Calibration inputs are captured through the model's own forward: `_block_pass` runs `Block.__call__`
under `capture_linear_inputs`, which records what every Linear and every MoE router is fed
(efftrain.model.layers.input_observer), so a change to the model cannot calibrate on other activations.

Routed experts (`ExpertStats`): by default (`expert_calibration='routed'`) each expert is calibrated on
exactly the tokens the router sends to it (top-k), its `down` projection on those tokens' SwiGLU
activations; `expert_calibration='all'` uses every calibration token for every expert (llm-compressor's
"calibrate all experts"; the forward that feeds the next block is unchanged). `expert_gate_weighted`
weights each token's row by its gate (routed; by its router score s_{t,e} with 'all'), so that H_e =
2 Σ_t g_{t,e}² x_t x_tᵀ, the Hessian of the expert's share g·Δy of the MoE output. A matrix whose expert
has fewer than `min_expert_tokens` tokens (default 2 × the matrix's input width, the least for a
well-conditioned Hessian) falls back to RTN; `QuantReport.expert_fallbacks` counts the experts with any
such matrix and `method_label` (a ptq.csv column) reads e.g. 'gptq+rtn-fallback'.

Implementation (speed on accelerators): one jitted program per block shape for the capture pass (also
reused for a quantized block's output), per matrix shape for RTN / GPTQ / the AWQ searches, reused
across layers, bit widths (the int width is data) and checkpoints; GPTQ quantizes all routed experts of
a layer in one stacked program, with each expert's Hessian from the layer's tokens masked to those
routed to it. Nothing is copied to the host between layers: packed codes stay on the device and the
GPTQ Cholesky checks and the expert counts are read once, at the end (`QuantReport.finish`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from flax import nnx

from efftrain.model import layers
from efftrain.model.layers import Linear, linears_of
from efftrain.model.moe import Router
from efftrain.quant.awq import quantize_awq
from efftrain.quant.awq_model import quantize_block_awq, quantize_head_awq
from efftrain.quant.billm import SEARCH_BATCH, billm_on_device
from efftrain.quant.formats import (Packed, effective_bits, kernel_format, make_format, pack_kernel,
                                    resolve_group_size, rtn_kernel, unpack)
from efftrain.quant.gptq import gptq_on_device, hessian_from_inputs, not_positive_definite
from efftrain.quant.placement import gather_device, gathered
from efftrain.xla import ptq_jit

METHODS = ("rtn", "gptq", "awq", "awq-linear", "billm")
EXPERT_CALIBRATION = ("routed", "all")


def _unknown_method(method: str) -> ValueError:
    return ValueError(f"unknown PTQ method '{method}' (choose from {', '.join(METHODS)})")


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
    awq_clip: bool = True  # AWQ's clipping search (the reference's auto_clip), awq and awq-linear
    awq_duo_scaling: bool = False  # AutoAWQ's s = x_mean^α / w_mean^(1-α)
    min_expert_tokens: int | None = None  # None: 2 × the expert matrix's input width
    expert_calibration: str = "routed"  # routed | all
    expert_gate_weighted: bool = False
    quantize_head: bool = False  # also the (untied) output head, calibrated on the final-norm states

    def __post_init__(self):
        if self.method not in METHODS:
            raise _unknown_method(self.method)
        if self.min_expert_tokens is not None and self.min_expert_tokens < 1:
            raise ValueError(f"min_expert_tokens must be at least 1, got {self.min_expert_tokens}")
        if self.method == "billm" and self.bits != 1:
            raise ValueError(f"billm is a 1-bit method (binary weights): bits must be 1, got {self.bits}")
        if self.expert_calibration not in EXPERT_CALIBRATION:
            raise ValueError(f"expert_calibration must be one of {', '.join(EXPERT_CALIBRATION)}, "
                             f"got {self.expert_calibration!r}")

    def group_for(self, in_dim: int) -> int:
        """Group size used for a weight with `in_dim` input rows: whole-channel when the group is at
        least as large as the layer (tiny models), otherwise it must divide in_dim."""
        if self.group_size == -1 or self.group_size >= in_dim:
            return -1
        resolve_group_size(self.group_size, in_dim)  # raises with a clear message if it doesn't divide
        return self.group_size

    def min_tokens(self, in_dim: int) -> int:
        """Calibration tokens an expert matrix with `in_dim` input rows needs before it is calibrated."""
        return 2 * int(in_dim) if self.min_expert_tokens is None else self.min_expert_tokens


@dataclass
class QuantReport:
    method: str = ""
    n_weights: int = 0  # matrices quantized (each expert's gate/up/down counts once)
    n_params: int = 0  # weight elements quantized
    weight_bits: float = 0.0  # Σ elements × effective bits
    published_bits: float = 0.0  # billm: Σ elements × the paper's bits per weight (no group bitmap, no scales)
    expert_fallbacks: int = 0  # routed experts with a matrix quantized by RTN for lack of calibration tokens
    expert_matrices: int = 0
    expert_tokens: list = field(default_factory=list)  # per MoE layer: [E] calibration tokens of each expert
    packed: dict[str, Any] = field(default_factory=dict)  # "path", "path#e" or stacked "path#*" -> (Packed, 1/s)
    _pending: list = field(default_factory=list)  # device values read at finish(): (kind, array)

    @property
    def eff_bits(self) -> float:
        return self.weight_bits / max(self.n_params, 1)

    @property
    def published_eff_bits(self) -> float:
        """billm: bits per quantized weight as the BiLLM paper counts them (efftrain.quant.billm)."""
        return self.published_bits / max(self.n_params, 1)

    @property
    def method_label(self) -> str:
        """The method, marked when some routed experts fell back to RTN (e.g. 'gptq+rtn-fallback'; billm
        falls back to an identity Hessian: 'billm+identity-hessian-fallback')."""
        if not self.expert_fallbacks:
            return self.method
        return f"{self.method}+{'identity-hessian' if self.method == 'billm' else 'rtn'}-fallback"

    def add(self, w_shape: tuple[int, ...], s: QuantSettings, extra_bits_per_row: float = 0.0) -> None:
        n_in, n_out = w_shape[-2:]
        count = int(np.prod(w_shape))
        bits = effective_bits(s.bits, s.group_for(n_in), n_in, fmt=s.fmt, symmetric=s.symmetric)
        self.n_weights += int(np.prod(w_shape[:-2], dtype=np.int64)) if len(w_shape) > 2 else 1
        self.n_params += count
        self.weight_bits += count * bits + extra_bits_per_row * n_in * (count // (n_in * n_out))

    def defer(self, kind: str, value) -> None:
        self._pending.append((kind, value))

    def finish(self) -> "QuantReport":
        """Read the deferred device values (one transfer): GPTQ's Cholesky checks (ValueError if one
        failed), the experts that fell back to RTN and each expert's calibration token count."""
        values = jax.device_get([v for _, v in self._pending])
        for (kind, _), v in zip(self._pending, values):
            v = np.asarray(v)
            if kind == "gptq_ok" and not v.all():
                raise ValueError(not_positive_definite(v.reshape(-1), v.ndim > 0))
            if kind == "billm_ok" and not v.all():
                raise ValueError("BiLLM: a dampened Hessian is not positive definite (Cholesky failed); raise "
                                 "damp or use more calibration data")
            if kind == "billm_bits":  # [storage, published] bits summed over the matrix's elements
                self.weight_bits += float(v[0])
                self.published_bits += float(v[1])
            if kind == "fallback":
                self.expert_fallbacks += int(v.sum())
            if kind == "expert_tokens":
                self.expert_tokens.append(v.astype(np.int64))
        self._pending.clear()
        return self


# ----------------------------------------------------------------------------------------------
# Capturing the inputs of every Linear (and MoE router) through the model's own forward
# ----------------------------------------------------------------------------------------------
@contextmanager
def capture_linear_inputs() -> Iterator[dict[int, list[jax.Array]]]:
    """Inside the context, each Linear (and MoE router) called records its input, as fed, flattened to
    [n, in]: {id(module): [x, ...]} (also the Linears that share one input through
    `apply_shared_input`, as q/k/v do with simulated FP8)."""
    sink: dict[int, list[jax.Array]] = {}

    def record(module, x):
        sink.setdefault(id(module), []).append(x.reshape(-1, x.shape[-1]))

    token = layers.input_observer.set(record)
    try:
        yield sink
    finally:
        layers.input_observer.reset(token)


def observed_modules(module: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """(path, module) of everything `capture_linear_inputs` records: Linears and MoE routers."""
    return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(module) if isinstance(m, (Linear, Router))]


@nnx.jit
def _block_pass(block, h, positions):
    """`Block.__call__` on h with the inputs of its Linears and router captured, jitted:
    ({path: input [n, in]}, the block's output). One compiled program per block structure (paths, not
    ids: calls inside are traced)."""
    paths = {id(m): name for name, m in observed_modules(block)}
    with capture_linear_inputs() as captured:
        out, _ = block(h, positions)
    return {paths[k]: jnp.concatenate(xs) for k, xs in captured.items()}, out


@nnx.jit
def _block_out(block, h, positions):
    """`Block.__call__`'s output alone (the next block's input after quantizing this one)."""
    return block(h, positions)[0]


# ----------------------------------------------------------------------------------------------
# One matrix
# ----------------------------------------------------------------------------------------------
def _format(s: QuantSettings):
    f = make_format(s.bits, s.fmt, s.symmetric)
    return f, *kernel_format(f)


def _rtn_packed(w: jax.Array, s: QuantSettings) -> tuple[jax.Array, Packed]:
    """RTN of w [..., in, out] on the device: (dequantized float32, Packed of device arrays)."""
    f, fs, maxq = _format(s)
    g = resolve_group_size(s.group_for(w.shape[-2]), w.shape[-2])
    w32 = w.astype(jnp.float32)
    codes, scales, zeros = pack_kernel(w32, maxq, f=fs, g=g)
    return rtn_kernel(w32, maxq, f=fs, g=g), Packed(codes, scales, zeros if f.has_zero_point else None)


def _gptq_packed(w: jax.Array, H: jax.Array, s: QuantSettings, report: QuantReport) -> tuple[jax.Array, Packed]:
    f = make_format(s.bits, s.fmt, s.symmetric)
    Q, C, S, Z, ok = gptq_on_device(w, H, bits=s.bits, group_size=s.group_for(w.shape[-2]), damp=s.damp,
                                    act_order=s.act_order, symmetric=s.symmetric, fmt=s.fmt)
    report.defer("gptq_ok", ok)
    return Q, Packed(C, S, Z if f.has_zero_point else None)


def quantize_matrix(w: jax.Array, x: jax.Array | None, s: QuantSettings,
                    report: QuantReport | None = None) -> tuple[jax.Array, Packed, Any]:
    """(dequantized w, packed codes, awq-linear's 1/s or None) for one [in, out] matrix."""
    if s.method == "rtn" or x is None:
        return (*_rtn_packed(jnp.asarray(w), s), None)
    if s.method == "gptq":
        return (*_gptq_packed(jnp.asarray(w), hessian_from_inputs(x), s, report or QuantReport()), None)
    if s.method == "awq-linear":
        w_hat, info = quantize_awq(np.asarray(w, np.float32), np.asarray(x, np.float32), bits=s.bits,
                                   group_size=s.group_for(w.shape[0]), symmetric=s.symmetric, fmt=s.fmt,
                                   grid=s.awq_grid, duo_scaling=s.awq_duo_scaling, clip=s.awq_clip,
                                   return_packed=True)
        # stored: codes of Q(diag(s) w) and 1/s; w_eff = Q(diag(s) w) · (1/s) exactly as AWQ computes it
        return jnp.asarray(w_hat), info["packed"], np.asarray(info["inv_s"], np.float32)
    if s.method == "billm":
        raise ValueError("quantize_matrix does rtn, gptq and awq-linear; billm writes its result itself "
                         "(efftrain.quant.apply.put_billm, or efftrain.quant.billm.quantize_billm)")
    raise ValueError(f"quantize_matrix does rtn, gptq and awq-linear; '{s.method}' quantizes whole blocks "
                     "(efftrain.quant.awq_model)" if s.method == "awq" else str(_unknown_method(s.method)))


def _put(var, report: QuantReport, key: str, s: QuantSettings, w_hat, packed, inv_s=None) -> None:
    var[...] = jnp.asarray(w_hat).astype(var[...].dtype)
    report.add(tuple(var[...].shape), s, 16.0 if inv_s is not None else 0.0)
    report.packed[key] = (packed, inv_s)


def put_billm(var, H: jax.Array | None, s: QuantSettings, report: QuantReport) -> None:
    """BiLLM of the Param `var` ([in, out], or a stack [E, in, out] with H [E, in, in]) on the Hessian H
    (None: the identity) written into it; its bits are read at `report.finish` (no host sync here).
    A stack runs in stacked programs bounded like GPTQ's (STACKED_GPTQ_BYTES)."""
    w = var[...]
    n_in, n_out = w.shape[-2:]
    if H is None:
        H = jnp.broadcast_to(jnp.eye(n_in, dtype=jnp.float32), (*w.shape[:-2], n_in, n_in))
    beta = s.group_for(n_in)

    def run(w_, H_):
        return billm_on_device(w_, H_, block=beta, damp=s.damp)

    if w.ndim == 2:
        q, paper, storage, ok = run(w, H)
    else:  # a few [in, in] arrays and the searches' [batch, β, out] temporaries per expert
        b = n_in if beta == -1 else beta
        chunk = max(1, STACKED_GPTQ_BYTES // (4 * (4 * n_in * (n_in + n_out) + 8 * SEARCH_BATCH * b * n_out)))
        parts = [run(w[e0:e0 + chunk], H[e0:e0 + chunk]) for e0 in range(0, w.shape[0], chunk)]
        q, paper, storage, ok = (jnp.concatenate([p[i] for p in parts]) for i in range(4))
    var[...] = q.astype(w.dtype)
    per_matrix = n_in * n_out
    report.n_weights += int(np.prod(w.shape[:-2], dtype=np.int64)) if w.ndim > 2 else 1
    report.n_params += int(w.size)
    report.defer("billm_ok", ok)
    report.defer("billm_bits", jnp.stack([jnp.sum(storage), jnp.sum(paper)]) * per_matrix)


# ----------------------------------------------------------------------------------------------
# The model, block by block
# ----------------------------------------------------------------------------------------------
def quantize_model(model, calib_tokens: np.ndarray, s: QuantSettings) -> QuantReport:
    """Quantize `model` in place (its Param values are replaced by dequantized weights; with awq also
    the norms and routers the scales are folded into).

    calib_tokens [n, T] int: calibration sequences (from the train split).

    A model whose parameters are split over several devices (a sharded checkpoint: efftrain.quant.placement)
    is quantized one block at a time on one device: the block is gathered there with the calibration states,
    quantized by the same programs as a one-device model, and put back on its shardings; likewise the
    output head with the norms in front of it. The embedding lookup runs on the sharded table. The packed
    codes of each gathered block go to host memory, where they would otherwise pile up on that one device.
    A model on one device runs exactly as before.
    """
    if s.method not in METHODS:
        raise _unknown_method(s.method)
    report = QuantReport(method=s.method)
    needs_inputs = s.method != "rtn"
    device = gather_device(model)
    tokens = jnp.asarray(calib_tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h = model.embed(tokens) if needs_inputs else None
    if needs_inputs and device is not None:  # the calibration states live where the blocks are quantized
        h = jax.device_put(h, device)
    for li, block in enumerate(model.blocks):
        with gathered(block, device=device), _codes_to_host(report, device):
            h = _quantize_block(block, f"blocks/{li}", h, positions, s, report)
    if s.quantize_head:
        if model.lm_head is None:
            raise ValueError("quantize_head needs an untied output head (model.tie_embeddings is true)")
        norms = [model.final_norm] + ([layer.out_norm for layer in model.mtp.layers] if model.mtp is not None else [])
        # the norms too: AWQ folds its scales into them
        with gathered(model.lm_head, *norms, device=device), _codes_to_host(report, device):
            x = model.final_norm(h).reshape(-1, h.shape[-1]) if needs_inputs else None
            if s.method == "awq":
                quantize_head_awq(model, x, s, report)
            elif s.method == "billm":
                put_billm(model.lm_head.kernel, hessian_from_inputs(x), s, report)
            else:
                _put(model.lm_head.kernel, report, "lm_head/kernel", s,
                     *quantize_matrix(model.lm_head.kernel[...], x, s, report))
    return report.finish()


def _quantize_block(block, prefix: str, h, positions, s: QuantSettings, report: QuantReport):
    """Quantize one block in place; the next block's calibration input (None for rtn, which has none)."""
    needs_inputs = s.method != "rtn"
    inputs, out_16 = _block_pass(block, h, positions) if needs_inputs else ({}, None)
    experts = expert_stats(block.ffn, inputs["ffn/router"], s, report) if block.is_moe and needs_inputs else None
    if s.method == "awq":
        quantize_block_awq(block, inputs, positions, s, report, prefix, experts)
        return out_16  # AWQ: the next block is calibrated on the 16-bit model's activations
    for name, lin in linears_of(block):  # the router is not a Linear: kept in 16-bit
        if s.method == "billm":
            put_billm(lin.kernel, hessian_from_inputs(inputs[name]), s, report)
            continue
        _put(lin.kernel, report, f"{prefix}/{name}/kernel", s,
             *quantize_matrix(lin.kernel[...], inputs.get(name), s, report))
    if block.is_moe:
        quantize_experts(block.ffn, experts, s, report, f"{prefix}/ffn")
    # GPTQ: the next block sees this block's quantized output
    return _block_out(block, h, positions) if needs_inputs else None


@contextmanager
def _codes_to_host(report: QuantReport, device: jax.Device | None) -> Iterator[None]:
    """On leaving: the packed codes that `report` gained inside copied to host memory when the model is
    quantized gathered onto `device` (None: left where they are, as on one device)."""
    before = set(report.packed)
    yield
    if device is not None:
        report.packed.update(jax.device_get({k: v for k, v in report.packed.items() if k not in before}))


# ----------------------------------------------------------------------------------------------
# Routed experts
# ----------------------------------------------------------------------------------------------
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
STACKED_GPTQ_BYTES = 1 << 30  # experts per stacked GPTQ program: about this much working memory


class ExpertStats(NamedTuple):
    """Calibration statistics of the routed experts of one MoE layer (all on the device)."""

    x: jax.Array  # [N, D] the layer's input (as captured)
    used: jax.Array  # [E, N] 1 where the token is one of the expert's calibration tokens
    rows: jax.Array  # [E, N] weight of each token's row per expert (0: not used)
    counts: jax.Array  # [E] calibration tokens per expert
    gram_in: jax.Array  # [E, D, D] Σ_t rows² x_t x_tᵀ
    gram_hidden: jax.Array  # [E, H, H] the same over the SwiGLU activations (down's inputs)
    mean_in: jax.Array  # [E, D] mean |x| over the expert's tokens (AWQ)
    mean_hidden: jax.Array  # [E, H]
    ok_in: jax.Array  # [E] bool: enough tokens for gate/up
    ok_hidden: jax.Array  # [E] bool: enough tokens for down


# jitted: run op by op, an MoE router compiles its small programs on first use (seconds on a GPU)
@nnx.jit
def _routing(moe, x2d):
    return moe.route(x2d)


@ptq_jit
def _expert_rows(expert_idx, gates, scores, all_tokens: bool, gate_weighted: bool):
    """(used [E, N] in {0, 1}, row weights [E, N]) from the routing (traced flags: one program)."""
    E = scores.shape[-1]
    onehot = expert_idx[:, :, None] == jnp.arange(E)  # [N, K, E]
    routed = jnp.any(onehot, axis=1).T.astype(jnp.float32)
    gate = jnp.sum(jnp.where(onehot, gates[:, :, None], 0.0), axis=1).T
    used = jnp.where(all_tokens, jnp.ones_like(routed), routed)
    weights = jnp.where(all_tokens, scores.T, gate)
    return used, jnp.where(gate_weighted, weights, used)


@ptq_jit
def _expert_grams(x, used, rows, w_gate, w_up):
    """Per expert (lax.map: memory N x max(D, H)): the Grams of the weighted rows of x and of the SwiGLU
    activations, and the mean |.| over the used rows."""
    hp = lax.Precision.HIGHEST
    x = x.astype(jnp.float32)

    def gram(a):
        return jnp.matmul(a.T, a, precision=hp)

    def one(args):
        m, r, wg, wu = args
        hidden = jax.nn.silu(jnp.matmul(x, wg, precision=hp)) * jnp.matmul(x, wu, precision=hp)
        n = jnp.maximum(jnp.sum(m), 1.0)
        return (gram(x * r[:, None]), gram(hidden * r[:, None]),
                jnp.sum(jnp.abs(x) * m[:, None], axis=0) / n, jnp.sum(jnp.abs(hidden) * m[:, None], axis=0) / n)

    return lax.map(one, (used, rows, w_gate.astype(jnp.float32), w_up.astype(jnp.float32)))


def expert_stats(moe, x2d: jax.Array, s: QuantSettings, report: QuantReport) -> ExpertStats:
    """Which calibration tokens each routed expert is calibrated on, and their statistics."""
    r = _routing(moe, x2d)
    used, rows = _expert_rows(r.expert_idx, r.gates, r.scores, s.expert_calibration == "all", s.expert_gate_weighted)
    G_in, G_hidden, m_in, m_hidden = _expert_grams(x2d, used, rows, moe.w_gate[...], moe.w_up[...])
    counts = jnp.sum(used, axis=1)
    ok_in, ok_hidden = counts >= s.min_tokens(moe.d_model), counts >= s.min_tokens(moe.hidden)
    report.defer("expert_tokens", counts)
    report.defer("fallback", ~(ok_in & ok_hidden))
    return ExpertStats(x2d, used, rows, counts, G_in, G_hidden, m_in, m_hidden, ok_in, ok_hidden)


def quantize_experts(moe, stats: ExpertStats | None, s: QuantSettings, report: QuantReport, prefix: str) -> None:
    """Per routed expert e: gate/up on its tokens, down on their SwiGLU activations (RTN where the expert
    lacks tokens, or for s.method == 'rtn')."""
    if s.method == "awq-linear" and stats is not None:
        _awq_linear_experts(moe, stats, s, report, prefix)
    elif s.method == "billm":  # the GPTQ Hessians 2·Gram; the identity where an expert lacks tokens
        for name, (ok, G) in {"w_gate": (stats.ok_in, stats.gram_in), "w_up": (stats.ok_in, stats.gram_in),
                              "w_down": (stats.ok_hidden, stats.gram_hidden)}.items():
            H = jnp.where(ok[:, None, None], 2 * G, jnp.eye(G.shape[-1], dtype=G.dtype))
            put_billm(getattr(moe, name), H, s, report)
    else:
        calibration = {"w_gate": (stats.ok_in, stats.gram_in), "w_up": (stats.ok_in, stats.gram_in),
                       "w_down": (stats.ok_hidden, stats.gram_hidden)} if s.method == "gptq" and stats else {}
        for name in EXPERT_WEIGHTS:
            var = getattr(moe, name)
            w_hat, packed = _rtn_packed(var[...], s)
            if name in calibration:  # GPTQ where calibrated, the RTN result elsewhere
                ok, G = calibration[name]
                q, p = _gptq_experts(var[...], 2 * G, ok, s, report)
                keep = ok[:, None, None]
                w_hat = jnp.where(keep, q, w_hat)
                packed = Packed(*(None if a is None else jnp.where(keep, a, b) for a, b in zip(p, packed)))
            _put(var, report, f"{prefix}/{name}#*", s, w_hat, packed)
    report.expert_matrices += 3 * moe.n_experts


def _gptq_experts(w: jax.Array, H: jax.Array, calibrated: jax.Array, s: QuantSettings,
                  report: QuantReport) -> tuple[jax.Array, Packed]:
    """GPTQ of all routed experts' matrices w [E, in, out] at once (stacked programs bounded by
    STACKED_GPTQ_BYTES); experts left for RTN get an identity Hessian here and their result is unused."""
    H = jnp.where(calibrated[:, None, None], H, jnp.eye(H.shape[-1], dtype=H.dtype))
    E, n_in, n_out = w.shape
    # the stacked program holds a few [in, in] float32 arrays per expert: bound it for large layers
    chunk = max(1, STACKED_GPTQ_BYTES // (4 * 4 * n_in * (n_in + n_out)))
    parts = [_gptq_packed(w[e0:e0 + chunk], H[e0:e0 + chunk], s, report) for e0 in range(0, E, chunk)]
    w_hat = jnp.concatenate([q for q, _ in parts])
    fields = zip(*(p for _, p in parts))
    return w_hat, Packed(*(None if a[0] is None else jnp.concatenate(a) for a in fields))


def _awq_linear_experts(moe, stats: ExpertStats, s: QuantSettings, report: QuantReport, prefix: str) -> None:
    """awq-linear per expert on the host (an ablation, not tuned for speed): gate/up on the expert's
    tokens, down on their SwiGLU activations; RTN where the expert lacks tokens."""
    w = {name: np.asarray(getattr(moe, name)[...], np.float32) for name in EXPERT_WEIGHTS}
    x, used = np.asarray(stats.x, np.float32), np.asarray(stats.used) > 0
    ok = {"w_gate": np.asarray(stats.ok_in), "w_up": np.asarray(stats.ok_in), "w_down": np.asarray(stats.ok_hidden)}
    out = {name: value.copy() for name, value in w.items()}
    for e in range(moe.n_experts):
        x_e = x[used[e]]
        gate = x_e @ w["w_gate"][e]
        inputs = {"w_gate": x_e, "w_up": x_e, "w_down": gate / (1 + np.exp(-gate)) * (x_e @ w["w_up"][e])}
        for name in EXPERT_WEIGHTS:
            w_hat, packed, inv_s = quantize_matrix(w[name][e], inputs[name] if ok[name][e] else None, s)
            out[name][e] = np.asarray(w_hat)
            report.add(out[name][e].shape, s, 16.0 if inv_s is not None else 0.0)
            report.packed[f"{prefix}/{name}#{e}"] = (packed, inv_s)
    for name, value in out.items():
        var = getattr(moe, name)
        var[...] = jnp.asarray(value, var[...].dtype)


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
    """{"key|codes", "key|scales", ["key|zeros"], ["key|awq_inv_scale"]: numpy} with one key per matrix
    (a stacked "path#*" entry is written as "path#0", "path#1", ...)."""
    arrays = {}

    def put(key, packed, inv_s):
        arrays[f"{key}|codes"] = np.asarray(packed.codes, np.uint8)
        arrays[f"{key}|scales"] = np.asarray(packed.scales, np.float16)
        if packed.zeros is not None:
            arrays[f"{key}|zeros"] = np.asarray(packed.zeros, np.float16)
        if inv_s is not None:
            arrays[f"{key}|awq_inv_scale"] = np.asarray(inv_s, np.float32)

    for key, (packed, inv_s) in report.packed.items():
        if key.endswith("#*"):
            host = Packed(*(None if a is None else np.asarray(a) for a in packed))
            for e in range(host.codes.shape[0]):
                put(f"{key[:-1]}{e}", Packed(*(None if a is None else a[e] for a in host)), None)
        else:
            put(key, packed, inv_s)
    return arrays


def dequantize_arrays(arrays: dict[str, np.ndarray], *, bits: int, fmt: str) -> dict[str, np.ndarray]:
    """{weight key: dequantized [in, out]} from `packed_arrays` output."""
    out = {}
    for key in sorted({k.split("|")[0] for k in arrays}):
        w = unpack(arrays[f"{key}|codes"], arrays[f"{key}|scales"], arrays.get(f"{key}|zeros"), bits=bits, fmt=fmt)
        if f"{key}|awq_inv_scale" in arrays:  # awq-linear: w_eff = Q(diag(s) w) · (1/s)
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
