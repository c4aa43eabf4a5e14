"""Expert-parallel token exchange: each device dispatches its own tokens to the devices holding their
experts with an all-to-all, runs its local experts, and gets the outputs back with a second all-to-all.

References: GShard (Lepikhin et al. 2020, arXiv 2006.16668) §2.2 / Algorithm 1: tokens are split into
groups (here: the tokens of one device), each group has its own per-expert capacity, and dispatch and
combine are `AllToAll`s over the expert-sharded dimension; DeepSeek-V3 (arXiv 2412.19437) §3.2
(all-to-all expert parallelism: dispatch to the experts' devices, combine back). Selected by
`model.moe.expert_exchange: all_to_all` and used only while the train step is traced on a mesh with
`expert` > 1 (efftrain.model.placement.expert_parallel_mesh); everywhere else `MoE.routed` runs its
plain single-program path.

Layout. The mesh is data x fsdp x expert, P = data·fsdp·expert devices, ep = expert, E_l = E / ep local
experts. Routing (router GEMM, top-K, gates) runs in the GSPMD program on the token-sharded activations,
so each device routes its own tokens; inside `jax.shard_map` device s (linear index over data, fsdp,
expert) holds the contiguous token rows [s·N_l, (s+1)·N_l), N_l = N / P, with A_l = N_l·K assignments
a = n·K + k in token order, and expert device j (its index on `expert`) holds experts
[j·E_l, (j+1)·E_l) (the kernels' P("expert") shards; gathered over fsdp, replicated over data). The
all-to-alls run over `expert` only: the ep devices that share (data, fsdp) indices exchange tokens.

capacity (`dispatch: capacity`): C_l = min(ceil(capacity_factor · N_l·K / E), N_l) slots per
(source device, expert). On each source device, expert e serves its assignments in local token order
(batch row, position, top-k slot); rank >= C_l is dropped (as `moe.capacity_dispatch`, applied to the
device's own tokens).
    send   [E, C_l, D] = [ep, E_l, C_l, D]           (moe.capacity_dispatch + dispatch_rows)
    recv   = all_to_all(send, 'expert', split 0, concat 0): [ep (source), E_l, C_l, D]
    out    = SwiGLU_e(recv^T) on [E_l, ep·C_l, D]    (one batched einsum per GEMM)
    back   = all_to_all(out^T): [ep (expert device), E_l, C_l, D] = [E, C_l, D]
    y_n    = Σ_k g_{n,k} · back[slot(n·K + k)]       (moe.combine_rows; a dropped slot contributes 0)
This differs from the global rule of the plain capacity path (C = min(ceil(cf·N·K/E), N) per expert
over all N tokens, served in global token order): there an expert's slots go to the first C of its
assignments anywhere in the batch; here every device has its own C_l slots per expert, so a device
whose tokens overflow an expert drops them even when another device left that expert's slots unused,
and P·C_l may exceed C (rounding up per device). With P = 1 the two rules are the same. The test
reference is the plain capacity path applied to each device's N_l tokens on their own.

dropless (`dispatch: dropless`): a static bound no routing can exceed: a device sends at most all of its
A_l assignments to one expert device, so each (source, destination) pair has A_l rows.
    sort the A_l assignments by expert (stable); destination j's assignments are one contiguous run
    send   [ep, A_l, D] rows (+ [ep, A_l] int32 local expert ids); row (j, r) = j's r-th assignment
    recv   = all_to_all(send): [ep·A_l, D] rows of the E_l local experts (empty rows are zero)
    out    = the local experts on the received rows with the layer's dropless kernel (tiles: n_tiles =
             floor((ep·A_l + E_l·(tile−1)) / tile) static tiles; or ragged_dot)
    back   = all_to_all(out): [ep, A_l, D];   y_n = Σ_k g_{n,k} · back[slot(n·K + k)]
Exact (equal to the single-device dropless path up to float rounding), never drops; compute and buffers
are ep·A_l rows per device (ep times the average load: the price of the static bound).

Bytes per MoE layer and device (b = bytes of the compute dtype), forward; the backward pass moves the
same again (the transpose of an all-to-all is an all-to-all): capacity 2·E·C_l·D·b; dropless
2·ep·A_l·D·b + 4·ep·A_l (ids); of which the fraction (ep−1)/ep leaves the device.

Stats stay global: the per-device expert counts and dropped counts are psum-ed over all mesh axes, so
`load` (fraction of the N·K slots per expert, before drops), max_vio and dropped_frac are those of the
whole step; the aux losses and the router entropy are computed by the GSPMD program from the global
routing as before. The gradients flow through shard_map and both all-to-alls (jax.grad); the expert
weights are cast to `varying` over data x fsdp inside (`pcast`), so their gradients are summed over
those axes by the transpose. With simulated FP8 GEMMs the shard_map runs unchecked (check_vma=False:
efftrain.fp8's scans carry untyped accumulators); the forward then equals one device bit for bit, the
expert weight gradients to FP8 rounding (rows fall into other quantization blocks, docs/SCALING.md).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from efftrain.config import MESH_AXES
from efftrain.model.dispatch import (Dispatch, capacity_dispatch, capacity_of, combine_rows, dispatch_rows,
                                     sort_assignments)
from efftrain.model.placement import expert_parallel_mesh

MoELayer = Any  # an efftrain.model.moe.MoE, whose methods run the local experts (moe.py imports this module)

EXPERT_AXIS = "expert"
TOKEN_AXES = MESH_AXES  # token rows are split over every mesh axis, as the batch is
WEIGHT_REPLICA_AXES = tuple(a for a in TOKEN_AXES if a != EXPERT_AXIS)  # the expert kernels are whole over these


def local_capacity(n_local: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """C_l = min(ceil(capacity_factor · N_l·K / E), N_l): slots per (source device, expert)."""
    return capacity_of(n_local, top_k, n_experts, capacity_factor)


def applicable(mesh: Mesh | None, n_tokens: int, n_experts: int) -> bool:
    """Whether the exchange can run: a mesh with expert > 1 that divides E and whose devices divide N."""
    if mesh is None or mesh.shape.get(EXPERT_AXIS, 1) <= 1:
        return False
    return n_experts % mesh.shape[EXPERT_AXIS] == 0 and n_tokens % math.prod(mesh.shape.values()) == 0


def routed(layer: MoELayer, x2d: jax.Array, expert_idx: jax.Array, gates: jax.Array, mesh: Mesh | None = None):
    """`MoE.routed` through the all-to-all exchange: (y [N, D] fp32, dropped fraction, Dispatch with the
    global counts), or None where it does not apply (no expert mesh being traced: the plain path runs)."""
    mesh = expert_parallel_mesh() if mesh is None else mesh
    N, D = x2d.shape
    E, K = layer.n_experts, layer.top_k
    if not applicable(mesh, N, E):
        return None
    x = layer._quantize_input(x2d).astype(layer.compute_dtype)
    wg, wu, wd = layer._expert_weights()
    # simulated FP8 GEMMs (efftrain.fp8) scan over K with untyped carries, which shard_map's varying-axes
    # check rejects: they run unchecked (the transpose then psums the weights' gradients conservatively)
    check = layer.fp8 is None
    body = partial(_capacity_body if layer.dispatch == "capacity" else _dropless_body, layer, mesh, check)
    tok = P(TOKEN_AXES, None)
    ex = P(EXPERT_AXIS, None, None)
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, ex, ex, ex), out_specs=(tok, P(), P()),
                       check_vma=check)
    y, counts, n_dropped = fn(x, expert_idx.astype(jnp.int32), gates, wg, wu, wd)
    dropped = n_dropped.astype(jnp.float32) / (N * K)
    return y, dropped, Dispatch(None, None, counts, None)


# ----------------------------------------------------------------------------------------------
# Per-device bodies (inside shard_map: every array is this device's block)
# ----------------------------------------------------------------------------------------------
def _varying(check: bool, x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """x typed as varying over `axes` (under check_vma; unchecked bodies carry no such types)."""
    return jax.lax.pcast(x, axes, to="varying") if check and axes else x


def _local_weights(check: bool, *ws):
    """The local expert kernels, varying over data x fsdp too (their transpose sums the gradients)."""
    return tuple(_varying(check, w, WEIGHT_REPLICA_AXES) for w in ws)


def _exchange(a: jax.Array) -> jax.Array:
    """[ep, ...] -> [ep, ...]: block j goes to expert device j; block i of the result came from device i."""
    return jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)


def _global_stats(counts: jax.Array, n_dropped: jax.Array):
    return jax.lax.psum(counts, TOKEN_AXES), jax.lax.psum(n_dropped, TOKEN_AXES)


def _capacity_body(layer: MoELayer, mesh: Mesh, check: bool, x, expert_idx, gates, wg, wu, wd):
    n_local, D = x.shape
    E, K = layer.n_experts, layer.top_k
    ep = mesh.shape[EXPERT_AXIS]
    E_l = E // ep
    C = local_capacity(n_local, K, E, layer.capacity_factor)
    wg, wu, wd = _local_weights(check, wg, wu, wd)
    d = capacity_dispatch(expert_idx.reshape(-1), E, C)
    send = dispatch_rows(x, d.slot_assign, d.assign_slot, K).reshape(ep, E_l, C, D)
    recv = _exchange(send)  # [ep source devices, E_l, C, D]
    buf = recv.transpose(1, 0, 2, 3).reshape(E_l, ep * C, D)
    out = layer._swiglu_grouped(buf, wg, wu, wd).astype(layer.compute_dtype)
    back = _exchange(out.reshape(E_l, ep, C, D).transpose(1, 0, 2, 3))  # [ep expert devices, E_l, C, D]
    y = combine_rows(back.reshape(E * C, D), gates, d.slot_assign, d.assign_slot, K)
    n_dropped = jnp.sum((d.assign_slot >= E * C).astype(jnp.int32))
    return (y, *_global_stats(d.counts, n_dropped))


def _dropless_body(layer: MoELayer, mesh: Mesh, check: bool, x, expert_idx, gates, wg, wu, wd):
    n_local, D = x.shape
    E, K = layer.n_experts, layer.top_k
    ep = mesh.shape[EXPERT_AXIS]
    E_l = E // ep
    A = n_local * K
    wg, wu, wd = _local_weights(check, wg, wu, wd)
    flat = expert_idx.reshape(A)
    order, counts, starts, rank = sort_assignments(flat, E)
    dest_start = starts[::E_l]  # [ep]: where destination j's run begins in the sorted order
    dest_count = jnp.sum(counts.reshape(ep, E_l), axis=1)
    r = jnp.arange(A, dtype=jnp.int32)
    filled = r[None, :] < dest_count[:, None]  # [ep, A]
    src = order[jnp.where(filled, dest_start[:, None] + r[None, :], 0)]
    slot_assign = jnp.where(filled, src, A).reshape(-1)  # [ep·A]: assignment in each send slot, or A
    dest = flat // E_l
    assign_slot = (dest * A + starts[flat] + rank - dest_start[dest]).astype(jnp.int32)  # [A]
    # local expert id of each row at its destination; empty rows (zero) go to local expert 0
    local_id = jnp.where(filled, flat[src] - jnp.arange(ep, dtype=jnp.int32)[:, None] * E_l, 0)
    send = dispatch_rows(x, slot_assign, assign_slot, K).reshape(ep, A, D)
    rows = _exchange(send).reshape(ep * A, D)
    ids = _exchange(local_id.astype(jnp.int32)).reshape(ep * A)
    out = local_experts_dropless(layer, rows, ids, wg, wu, wd, check=check)  # [ep·A, D]
    back = _exchange(out.reshape(ep, A, D)).reshape(ep * A, D)
    y = combine_rows(back, gates, slot_assign, assign_slot, K)
    return (y, *_global_stats(counts, jnp.zeros((), jnp.int32)))


def local_experts_dropless(layer: MoELayer, rows: jax.Array, ids: jax.Array, wg, wu, wd, *,
                           check: bool = False) -> jax.Array:
    """rows [R, D] each for its local expert ids [R] (in [0, E_l)) -> expert_{ids[r]}(rows[r]) [R, D] in
    compute dtype, with the layer's dropless kernel (tiles or ragged_dot) over E_l = wg.shape[0] experts."""
    out, d = layer.dropless_experts(rows, ids, wg.shape[0], 1, wg, wu, wd)
    # back to row order (gather-only backward); the gate is 1: the source device applies g
    ones = _varying(check, jnp.ones((rows.shape[0], 1), jnp.float32), TOKEN_AXES)  # typed like the rows
    return combine_rows(out, ones, d.slot_assign, d.assign_slot, 1).astype(layer.compute_dtype)
