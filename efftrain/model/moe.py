"""DeepSeekMoE: fine-grained routed experts + shared experts, aux-loss-free balancing.

References: DeepSeek-V3 (arXiv 2412.19437) §2.1.2 eqs. 12–20; DeepSeekMoE (arXiv 2401.06066);
Switch Transformer (Fedus et al. 2021, arXiv 2101.03961) eq. 4.

For a token's FFN input u_t (the Block adds the residual itself, so this layer returns only the sum):

    y_t     = Σ_{i=1..N_s} FFN_i^(s)(u_t) + Σ_{i=1..N_r} g_{i,t} FFN_i^(r)(u_t)           (eq. 12, minus u_t)
    s_{i,t} = sigmoid(u_t·e_i)   or   softmax_i(u_t·e_i)                                  (eq. 15; V2: softmax)
    selected_t = TopK_i(s_{i,t} + b_i, K)              b: aux-free bias, selection ONLY   (eq. 16)
    g'_{i,t} = s_{i,t} if i ∈ selected_t else 0                                            (eq. 13)
    g_{i,t}  = routed_scaling · g'_{i,t} / Σ_j g'_{j,t}   (normalize_gates; else no division) (eq. 14)

FFN_i are SwiGLU experts down(silu(u W_gate) ⊙ (u W_up)). The N_s shared experts are one SwiGLU of
width N_s·expert_hidden (exactly N_s separate experts with concatenated weights); the N_r routed experts
are stacked: w_gate/w_up [E, D, H], w_down [E, H, D] (one slice per expert, the layout PTQ quantizes).
The router kernel [D, E] (centroids e_i) and all routing maths stay in fp32 (V3 §3.3 keeps gating in
high precision; fp8.router opts it into simulated FP8).

Auxiliary-loss-free balancing (V3 §2.1.2): after each step, from the step's loads,
    b_i ← b_i − γ · sign(load_i − mean load)      (+γ if underloaded, −γ if overloaded)
then b ← b − mean(b) (a common refinement that keeps the biases zero-mean). `update_router_bias`.

Complementary sequence-wise balance loss (V3 eqs. 17–20), per sequence of T tokens, averaged over sequences:
    L_seq = Σ_i f_i P_i,  f_i = E/(K·T) Σ_t 1[i ∈ selected_t],  P_i = (1/T) Σ_t s'_{i,t},
    s'_{i,t} = s_{i,t} / Σ_j s_{j,t}
Switch-Transformer loss over the whole call (eq. 4, with top-K slot fractions):
    L_switch = E · Σ_i f_i P_i,  f_i = load_i (fraction of the N·K routing slots),  P_i = mean_t softmax(u_t·e)_i
aux_loss = seq_aux_loss_weight · L_seq + switch_aux_loss_weight · L_switch  (both are 1 when balanced).

Dispatch (its index maps, row movement and tile GEMM: efftrain/model/dispatch.py). No ragged_dot on the
default paths: on the lent H100 it ran at 34 TFLOP/s vs 627 TFLOP/s for a batched einsum
(docs/METHODS.md §4; XLA lowers it to zero-padded dense matmuls). The N·K
(token, expert) assignments, in token-major order a = n·K + k (n = b·T + t), are stably sorted by
expert; rank(a) = its position within its expert's group. `cfg.moe.dispatch` picks the path:
  * capacity: C = min(ceil(capacity_factor · N·K / E), N) slots per expert, buffer [E, C, D], one
    batched einsum per GEMM. Priority rule: within an expert, assignments are served in token order
    (batch row, then position, then top-k slot); an assignment with rank >= C is dropped (its gate
    contributes zero; the token keeps its other experts and the shared experts).
    Memory: E·C·(D + 2H) activations ≈ capacity_factor · N·K·(D + 2H).
  * dropless (impl "tiles", the default): each expert's group is padded to a multiple of `tile` rows and
    the groups are laid end to end in a static buffer of n_tiles = floor((N·K + E·(tile−1)) / tile)
    tiles [n_tiles, tile, D], a bound no routing can exceed. Every tile belongs to one expert;
    `tile_matmul` gathers the tile's expert weights and runs one batched einsum over tiles; its VJP
    re-gathers the weights (no [n_tiles, D, H] residual), accumulates per-tile weight gradients in fp32
    and sums each expert's tiles with a one-hot matmul (no scatter-add). Exact, never drops.
    Cost: ≤ E·(tile−1) padded rows (tile = power of two ≤ 512 with E·tile ≤ N·K/8) and the weight
    gathers/partials: n_tiles·D·H per matrix (bf16 forward, fp32 gradient partials).
    With simulated FP8 the tiles' weights are gathered for fp8_linear's own VJP (`take_tiles`), whose
    backward sums the tiles of each expert the same way (fp32, one-hot matmul, no scatter-add).
  * dropless (impl "ragged", `dropless_impl="ragged"`): `jax.lax.ragged_dot` on the sorted [N·K, D] rows;
    exact, no padding, the simplest reference, but slow on the measured GPU stack.
  Rows move between token order and the buffers by gathers whose custom VJPs are gathers too
  (`dispatch_rows`, `combine_rows`: no scatter-add in the backward pass).
  Measured (H100, JAX 0.11.2, bf16, fwd+bwd of one layer, 65,536 tokens, D 1024, 1 shared expert;
  benchmarks/bench_moe.py): E 16, K 2, H 512: dense MLP of equal active params 3.8 ms, capacity (1.25)
  6.8 ms, tiles 8.4 ms; E 64, K 6, H 256: dense 4.3 ms, capacity 10.6 ms, tiles 13.9 ms; ragged_dot
  was 5.3× the capacity path (16,384 tokens, E 16).

Stats (fp32): load [E] (fraction of the N·K slots per expert, before drops; sums to 1), max_vio
(max load / mean load), dropped_frac (fraction of the N·K assignments dropped), router_entropy (mean
token entropy of s'), aux_loss, bias_norm (‖b‖₂). Not in V3: node/group-limited routing (n_group,
topk_group) — one device here, so it is omitted.

Expert parallelism (train.mesh.expert > 1, docs/SCALING.md): the stacked kernels are split by expert.
`moe.expert_exchange: gspmd` (default): one global dispatch; the capacity path constrains its [E, C, D]
buffers to the experts' devices (`efftrain.model.placement.constrain_expert_buffer`, a no-op outside
such a train step); the dropless paths gather the expert weights they need. Routing and stats stay
global (one GSPMD program). `all_to_all`: `routed` hands over to efftrain.model.expert_parallel (only
while the step is traced on such a mesh): each device dispatches its own tokens to the experts' devices
with an all-to-all and gets the outputs back with another; capacity is per (source device, expert);
dropless is exact; the stats are psum-ed, so they stay global.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efftrain.config import FP8Config, ModelConfig
from efftrain.model import dispatch as dispatch_lib
from efftrain.model.dispatch import (Dispatch, capacity_dispatch, capacity_of, combine_rows,  # noqa: F401 - re-exported
                                     default_tile_rows, dispatch_rows, gather_tile_weights, num_tiles,
                                     ragged_dispatch, sort_assignments, take_tiles, tile_dispatch, tile_matmul)
from efftrain.model.layers import MLP, dtype_of, fp8_for, observe_input, pick
from efftrain.model.placement import constrain_expert_buffer

DROPLESS_IMPLS = ("tiles", "ragged")
DEFAULT_DROPLESS_IMPL = "tiles"


class RouterBias(nnx.Variable):
    """Aux-loss-free balancing bias b [E]: non-trainable (not an nnx.Param), used for top-K selection only."""


class Routing(NamedTuple):
    logits: jax.Array  # [N, E] fp32, u·e_i
    scores: jax.Array  # [N, E] fp32 affinities s (sigmoid or softmax)
    expert_idx: jax.Array  # [N, K] int32, selected by s + b (descending)
    gates: jax.Array  # [N, K] fp32, g of the selected experts (from s, never from b)


class Router(nnx.Module):
    """logits = u @ kernel, kernel [D, E] kept in fp32; optional RouterBias [E]."""

    def __init__(self, d_model: int, n_experts: int, *, cfg: ModelConfig, rngs: nnx.Rngs,
                 fp8: FP8Config | None = None):
        init = nnx.initializers.normal(cfg.init_std)
        self.kernel = nnx.Param(init(rngs.params(), (d_model, n_experts), jnp.float32))
        self.bias = RouterBias(jnp.zeros((n_experts,), jnp.float32)) if cfg.moe.aux_free_bias else None
        self.fp8 = fp8_for(fp8, "router")

    def __call__(self, x: jax.Array) -> jax.Array:
        observe_input(self, x)  # PTQ calibration capture (the MoE layer's input); a no-op otherwise
        x = x.astype(jnp.float32)
        w = self.kernel[...].astype(jnp.float32)
        if self.fp8 is not None:
            from efftrain.fp8 import fp8_linear

            return fp8_linear(x, w, self.fp8).astype(jnp.float32)
        return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)


# ----------------------------------------------------------------------------------------------
# Routing maths (pure functions)
# ----------------------------------------------------------------------------------------------
def affinities(logits: jax.Array, score_func: str) -> jax.Array:
    if score_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    if score_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    raise ValueError(f"unknown score_func '{score_func}' (sigmoid|softmax)")


def select_experts(scores: jax.Array, bias: jax.Array | None, top_k: int, *, normalize: bool,
                   scaling: float) -> tuple[jax.Array, jax.Array]:
    """scores [N, E] -> (expert_idx [N, K], gates [N, K]); the bias moves the selection, not the gates."""
    selection = scores if bias is None else scores + jax.lax.stop_gradient(bias).astype(scores.dtype)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(selection), top_k)
    gates = pick(scores, idx)  # no scatter-add in the gradient
    if normalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return idx.astype(jnp.int32), gates * scaling


def bias_update(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """b ← b − γ·sign(load − mean load), then zero-mean (aux-loss-free balancing, V3 §2.1.2)."""
    load = load.astype(jnp.float32)
    b = bias.astype(jnp.float32) - rate * jnp.sign(load - jnp.mean(load))
    return (b - jnp.mean(b)).astype(bias.dtype)


def sequence_aux_loss(scores: jax.Array, expert_idx: jax.Array, n_experts: int) -> jax.Array:
    """V3 eqs. 17–20. scores [B, T, E] (s), expert_idx [B, T, K] -> mean over sequences of Σ_i f_i P_i."""
    B, T, K = expert_idx.shape
    counts = per_sequence_counts(expert_idx, n_experts)  # [B, E]
    f = counts * (n_experts / (K * T))
    p = jnp.mean(scores / jnp.sum(scores, axis=-1, keepdims=True), axis=1)  # [B, E]
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))


def switch_aux_loss(logits: jax.Array, load: jax.Array) -> jax.Array:
    """Switch Transformer eq. 4: E · Σ_i f_i P_i with f = load [E], P = mean softmax(logits [N, E])."""
    p = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=0)
    return load.shape[0] * jnp.sum(jax.lax.stop_gradient(load) * p)


def per_sequence_counts(expert_idx: jax.Array, n_experts: int) -> jax.Array:
    """expert_idx [B, T, K] -> how many of each sequence's T·K slots chose each expert, [B, E] fp32."""
    onehot = expert_idx[..., None] == jnp.arange(n_experts, dtype=expert_idx.dtype)  # [B, T, K, E]
    return jnp.sum(onehot, axis=(1, 2), dtype=jnp.float32)  # exact counts, no scatter


# ----------------------------------------------------------------------------------------------
# The layer
# ----------------------------------------------------------------------------------------------
class MoE(nnx.Module):
    """DeepSeekMoE FFN: x [B, T, D] -> (Σ shared(x) + Σ_topK g_i expert_i(x) [B, T, D], stats).

    `dropless_impl` ("tiles" | "ragged") and `tile_rows` override cfg.moe.dropless_impl / tile_rows
    when the config has them (it does not yet), else the defaults above. Parameters: router.kernel
    [D, E] fp32, router.bias RouterBias [E] (aux_free_bias only), w_gate/w_up [E, D, H], w_down
    [E, H, D], shared (MLP of width N_s·H, or None).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, fp8: FP8Config | None = None,
                 dropless_impl: str | None = None, tile_rows: int | None = None):
        m = cfg.moe
        D, E, H = cfg.d_model, m.num_routed_experts, m.expert_hidden
        if E < 1 or not 1 <= m.top_k <= E:
            raise ValueError(f"MoE needs 1 <= moe.top_k ({m.top_k}) <= moe.num_routed_experts ({E})")
        self.n_experts, self.top_k, self.d_model, self.hidden = E, m.top_k, D, H
        self.score_func, self.normalize_gates, self.routed_scaling = m.score_func, m.normalize_gates, m.routed_scaling
        self.dispatch, self.capacity_factor = m.dispatch, m.capacity_factor
        self.expert_exchange = getattr(m, "expert_exchange", "gspmd")
        self.seq_aux_weight, self.switch_aux_weight = m.seq_aux_loss_weight, m.switch_aux_loss_weight
        impl = dropless_impl or getattr(m, "dropless_impl", DEFAULT_DROPLESS_IMPL)
        if impl not in DROPLESS_IMPLS:
            raise ValueError(f"dropless_impl '{impl}' is not one of {DROPLESS_IMPLS}")
        self.dropless_impl = impl
        self.tile_rows = tile_rows or getattr(m, "tile_rows", None)
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        self.fp8 = fp8_for(fp8, "linear")
        if self.fp8 is not None and m.dispatch == "dropless" and impl == "ragged":
            raise ValueError("simulated FP8 expert GEMMs need dispatch=capacity or dropless_impl=tiles")

        self.router = Router(D, E, cfg=cfg, rngs=rngs, fp8=fp8)
        pdt = dtype_of(cfg.param_dtype)
        init = nnx.initializers.normal(cfg.init_std)
        init_down = nnx.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        self.w_gate = nnx.Param(init(rngs.params(), (E, D, H), pdt))
        self.w_up = nnx.Param(init(rngs.params(), (E, D, H), pdt))
        self.w_down = nnx.Param(init_down(rngs.params(), (E, H, D), pdt))
        self.shared = MLP(D, m.num_shared_experts * H, cfg=cfg, rngs=rngs, fp8=fp8) if m.num_shared_experts else None
        # PTQ activation fake-quantizer of the routed experts' GEMM inputs (gate/up and down), static, as
        # Linear.act_quant (efftrain.quant.activations); the router and the shared experts (Linears) have their own
        self.act_quant = None

    # -- routing ---------------------------------------------------------------------------------
    def route(self, x2d: jax.Array) -> Routing:
        """x2d [N, D] -> Routing (all fp32)."""
        logits = self.router(x2d)
        scores = affinities(logits, self.score_func)
        bias = None if self.router.bias is None else self.router.bias[...]
        idx, gates = select_experts(scores, bias, self.top_k, normalize=self.normalize_gates,
                                    scaling=self.routed_scaling)
        return Routing(logits, scores, idx, gates)

    # -- experts ---------------------------------------------------------------------------------
    def _bmm(self, a: jax.Array, *ws: jax.Array) -> tuple[jax.Array, ...]:
        """[G, R, K] @ [G, K, N] for each w -> [G, R, N] in compute dtype (simulated FP8 per group if
        enabled, with a quantized once for all ws)."""
        if self.fp8 is not None:
            from efftrain.fp8 import fp8_linear_shared

            cfg = self.fp8
            outs = jax.vmap(lambda ai, *wi: fp8_linear_shared(ai, wi, cfg))(a, *ws)
            return tuple(y.astype(self.compute_dtype) for y in outs)
        return tuple(jnp.einsum("grk,gkn->grn", a, w) for w in ws)

    def _quantize_input(self, a: jax.Array) -> jax.Array:
        """An expert GEMM's input through `act_quant` (per row: rows are tokens; zero rows stay zero)."""
        return a if self.act_quant is None else self.act_quant(a)

    def _swiglu_grouped(self, buf: jax.Array, wg, wu, wd) -> jax.Array:
        gate, up = self._bmm(buf, wg, wu)
        return self._bmm(self._quantize_input(jax.nn.silu(gate) * up), wd)[0]

    def _expert_weights(self):
        c = self.compute_dtype
        return self.w_gate[...].astype(c), self.w_up[...].astype(c), self.w_down[...].astype(c)

    def dropless_experts(self, x: jax.Array, flat: jax.Array, n_experts: int, top_k: int, wg, wu, wd):
        """The dropless kernel (tiles or ragged_dot): x [N, D] in compute dtype, flat [N·top_k] expert ids
        in [0, n_experts) with the weights [n_experts, ...] -> (out [S, D] per buffer row, Dispatch)."""
        D = x.shape[-1]
        A = flat.shape[0]
        if self.dropless_impl == "tiles":
            t = self.tile_rows or default_tile_rows(A, n_experts)
            d = tile_dispatch(flat, n_experts, t)
            n_tiles = d.group_expert.shape[0]
            buf = dispatch_rows(x, d.slot_assign, d.assign_slot, top_k).reshape(n_tiles, t, D)
            if self.fp8 is not None or dispatch_lib.TILE_WEIGHT_GRAD_SUM == "xla":  # fp8_linear has its own VJP
                take = partial(gather_tile_weights, group_expert=d.group_expert)
                out = self._swiglu_grouped(buf, take(wg), take(wu), take(wd))
            else:
                mm = partial(tile_matmul, group_expert=d.group_expert)
                out = mm(self._quantize_input(jax.nn.silu(mm(buf, wg)) * mm(buf, wu)), wd)
            return out.reshape(n_tiles * t, D), d
        d = ragged_dispatch(flat, n_experts)
        buf = dispatch_rows(x, d.slot_assign, d.assign_slot, top_k)  # [A, D] sorted by expert
        h = jax.nn.silu(jax.lax.ragged_dot(buf, wg, d.counts)) * jax.lax.ragged_dot(buf, wu, d.counts)
        h = self._quantize_input(h)
        return jax.lax.ragged_dot(h.astype(self.compute_dtype), wd, d.counts).astype(self.compute_dtype), d

    def routed(self, x2d: jax.Array, expert_idx: jax.Array, gates: jax.Array):
        """Σ_k gates · expert(x) for x2d [N, D] -> (y [N, D] fp32, dropped fraction, dispatch)."""
        if self.expert_exchange == "all_to_all":  # only while traced on an expert mesh, else None
            from efftrain.model import expert_parallel

            exchanged = expert_parallel.routed(self, x2d, expert_idx, gates)
            if exchanged is not None:
                return exchanged
        N, D = x2d.shape
        E, K = self.n_experts, self.top_k
        A = N * K
        flat = expert_idx.reshape(A)
        x = self._quantize_input(x2d).astype(self.compute_dtype)  # per token: the same before or after dispatch
        wg, wu, wd = self._expert_weights()
        if self.dispatch == "capacity":
            C = capacity_of(N, K, E, self.capacity_factor)
            d = capacity_dispatch(flat, E, C)
            buf = dispatch_rows(x, d.slot_assign, d.assign_slot, K).reshape(E, C, D)
            # expert parallelism (train.mesh.expert > 1): the buffer lives on its experts' devices
            buf = constrain_expert_buffer(buf)
            out = constrain_expert_buffer(self._swiglu_grouped(buf, wg, wu, wd)).reshape(E * C, D)
            dropped = jnp.mean((d.assign_slot >= E * C).astype(jnp.float32))
        else:
            out, d = self.dropless_experts(x, flat, E, K, wg, wu, wd)
            dropped = jnp.zeros((), jnp.float32)
        y = combine_rows(out, gates, d.slot_assign, d.assign_slot, K)
        return y, dropped, d

    # -- forward ---------------------------------------------------------------------------------
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict]:
        B, T, D = x.shape
        E, K = self.n_experts, self.top_k
        x2d = x.reshape(B * T, D)
        r = self.route(x2d)
        y, dropped, d = self.routed(x2d, r.expert_idx, r.gates)
        if self.shared is not None:
            y = y + self.shared(x2d).astype(jnp.float32)

        load = d.counts.astype(jnp.float32) / (B * T * K)
        sg = jax.lax.stop_gradient
        s_norm = sg(r.scores) / jnp.sum(sg(r.scores), axis=-1, keepdims=True)
        entropy = -jnp.mean(jnp.sum(jax.scipy.special.xlogy(s_norm, s_norm), axis=-1))
        aux = jnp.zeros((), jnp.float32)
        if self.seq_aux_weight > 0:
            aux = aux + self.seq_aux_weight * sequence_aux_loss(
                r.scores.reshape(B, T, E), r.expert_idx.reshape(B, T, K), E)
        if self.switch_aux_weight > 0:
            aux = aux + self.switch_aux_weight * switch_aux_loss(r.logits, load)
        bias = self.router.bias
        stats = {
            "load": load,
            "max_vio": jnp.max(load) * E,  # max load / mean load (mean load = 1/E)
            "dropped_frac": dropped,
            "router_entropy": entropy,
            "aux_loss": aux.astype(jnp.float32),
            "bias_norm": jnp.zeros((), jnp.float32) if bias is None else jnp.linalg.norm(bias[...]),
        }
        return y.reshape(B, T, D).astype(self.compute_dtype), stats


# ----------------------------------------------------------------------------------------------
# Aux-loss-free bias update
# ----------------------------------------------------------------------------------------------
def moe_modules(model: nnx.Module) -> list[tuple[tuple, MoE]]:
    """(path, MoE) in nnx.iter_modules order: attribute names sorted, list indices in numeric order.

    For `Transformer` this is blocks[0..L-1] then mtp.layers[0..D-1], the order in which the train step
    concatenates the MoE stats of the main model and of the MTP blocks.
    """
    return [(p, m) for p, m in nnx.iter_modules(model) if isinstance(m, MoE)]


def update_router_bias(model: nnx.Module, loads: jax.Array, rate: float) -> None:
    """In place: each MoE's b ← b − γ·sign(load − mean load), zero-mean, with loads [n_moe_layers, E].

    Works on a model from `nnx.merge` inside jax.jit (it only assigns Variable values); a MoE built
    without aux_free_bias is skipped but still consumes its row of `loads`.
    """
    found = moe_modules(model)
    if loads.ndim != 2 or loads.shape[0] != len(found):
        raise ValueError(f"update_router_bias: loads has shape {loads.shape} but the model holds "
                         f"{len(found)} MoE layers ({[p for p, _ in found]}); pass [n_moe_layers, E] "
                         "in nnx.iter_modules order, or a submodule holding exactly those layers")
    for i, (_, m) in enumerate(found):
        if m.router.bias is not None:
            m.router.bias[...] = bias_update(m.router.bias[...], loads[i], rate)
