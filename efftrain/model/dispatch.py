"""MoE dispatch: where each (token, expert) assignment goes, how rows move, and the tile GEMM.

The layouts (capacity buffer [E, C], dropless tiles [n_tiles, tile], ragged groups) and their costs are
described in efftrain/model/moe.py's docstring (DeepSeekMoE, DeepSeek-V3 §2.1.2); this module holds the
pure functions both MoE paths build on: the single-program one (efftrain.model.moe) and the expert-
parallel exchange (efftrain.model.expert_parallel). Everything here is integer index arithmetic or a
gather/einsum with a custom VJP whose backward is a gather or a matmul too (no scatter-add: bf16 atomics
on a GPU are slow and not deterministic).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

MAX_TILE_ROWS = 512


# ----------------------------------------------------------------------------------------------
# Dispatch index maps (integer arithmetic only; see the module docstring for the layouts)
# ----------------------------------------------------------------------------------------------
class Dispatch(NamedTuple):
    slot_assign: jax.Array  # [S] assignment index a feeding buffer slot s, or A (empty slot)
    assign_slot: jax.Array  # [A] buffer slot of assignment a, or S (dropped)
    counts: jax.Array  # [E] assignments per expert (before drops)
    group_expert: jax.Array | None  # [n_tiles] expert of each tile (tiles layout only)


def sort_assignments(flat_expert: jax.Array, n_experts: int):
    """flat_expert [A] -> (order [A]: sorted position -> assignment, counts [E], starts [E], rank [A])."""
    A = flat_expert.shape[0]
    order = jnp.argsort(flat_expert, stable=True).astype(jnp.int32)
    sorted_expert = flat_expert[order]
    bounds = jnp.searchsorted(sorted_expert, jnp.arange(n_experts + 1, dtype=jnp.int32), side="left")
    counts = (bounds[1:] - bounds[:-1]).astype(jnp.int32)
    starts = bounds[:-1].astype(jnp.int32)
    rank_sorted = jnp.arange(A, dtype=jnp.int32) - starts[sorted_expert]
    rank = jnp.zeros((A,), jnp.int32).at[order].set(rank_sorted, unique_indices=True)
    return order, counts, starts, rank


def capacity_of(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor · N·K / E), capped at N (an expert gets each token at most once)."""
    return max(1, min(math.ceil(capacity_factor * n_tokens * top_k / n_experts), n_tokens))


def capacity_dispatch(flat_expert: jax.Array, n_experts: int, capacity: int) -> Dispatch:
    """Buffer [E, C]: slot (e, c) holds expert e's c-th assignment in token order; rank >= C is dropped."""
    A = flat_expert.shape[0]
    order, counts, starts, rank = sort_assignments(flat_expert, n_experts)
    c = jnp.arange(capacity, dtype=jnp.int32)
    filled = c[None, :] < counts[:, None]  # [E, C]
    src = jnp.where(filled, starts[:, None] + c[None, :], 0)
    slot_assign = jnp.where(filled, order[src], A).reshape(-1)
    S = n_experts * capacity
    assign_slot = jnp.where(rank < capacity, flat_expert * capacity + rank, S)
    return Dispatch(slot_assign, assign_slot.astype(jnp.int32), counts, None)


def default_tile_rows(n_assign: int, n_experts: int) -> int:
    """Power of two in [8, MAX_TILE_ROWS] with E·tile <= N·K/8 where possible (padding <= ~12.5 %)."""
    target = max(1, n_assign // (8 * n_experts))
    t = 1 << (target.bit_length() - 1)
    return int(min(max(t, 8), MAX_TILE_ROWS))


def num_tiles(n_assign: int, n_experts: int, tile: int) -> int:
    """Static bound on Σ_e ceil(count_e / tile) for any routing with Σ count_e = N·K."""
    return (n_assign + n_experts * (tile - 1)) // tile


def tile_dispatch(flat_expert: jax.Array, n_experts: int, tile: int) -> Dispatch:
    """Buffer [n_tiles, tile]: expert groups padded to multiples of `tile`, laid end to end."""
    A = flat_expert.shape[0]
    n_tiles = num_tiles(A, n_experts, tile)
    order, counts, starts, rank = sort_assignments(flat_expert, n_experts)
    padded = (counts + tile - 1) // tile * tile
    pad_end = jnp.cumsum(padded).astype(jnp.int32)
    pad_start = pad_end - padded
    tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * tile
    group_expert = jnp.minimum(jnp.searchsorted(pad_end, tile_start, side="right"), n_experts - 1)
    group_expert = group_expert.astype(jnp.int32)
    row = jnp.arange(n_tiles * tile, dtype=jnp.int32)
    row_expert = group_expert[row // tile]
    local = row - pad_start[row_expert]
    filled = (local >= 0) & (local < counts[row_expert])
    src = jnp.where(filled, starts[row_expert] + local, 0)
    slot_assign = jnp.where(filled, order[src], A)
    assign_slot = pad_start[flat_expert] + rank
    return Dispatch(slot_assign, assign_slot.astype(jnp.int32), counts, group_expert)


def ragged_dispatch(flat_expert: jax.Array, n_experts: int) -> Dispatch:
    """Buffer [A]: assignments sorted by expert, groups of `counts` rows (for ragged_dot)."""
    order, counts, starts, rank = sort_assignments(flat_expert, n_experts)
    return Dispatch(order, (starts[flat_expert] + rank).astype(jnp.int32), counts, None)


# ----------------------------------------------------------------------------------------------
# Row movement with gather-only backward passes
# ----------------------------------------------------------------------------------------------
def _take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a[idx] along axis 0; out-of-range indices (the sentinels) give zero rows."""
    return jnp.take(a, idx, axis=0, mode="fill", fill_value=0)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def dispatch_rows(x: jax.Array, slot_assign: jax.Array, assign_slot: jax.Array, top_k: int) -> jax.Array:
    """x [N, D] -> buffer [S, D]: slot s holds token slot_assign[s] // K (zero row if empty)."""
    return _take_rows(x, slot_assign // top_k)


def _dispatch_fwd(x, slot_assign, assign_slot, top_k):
    return dispatch_rows(x, slot_assign, assign_slot, top_k), (slot_assign, assign_slot, x.shape[0])


def _dispatch_bwd(top_k, res, g_buf):
    slot_assign, assign_slot, n = res
    # each token's gradient is the sum over its K slots (a dropped slot reads the zero fill row)
    g = _take_rows(g_buf, assign_slot).reshape(n, top_k, g_buf.shape[-1])
    g_x = jnp.sum(g.astype(jnp.float32), axis=1).astype(g_buf.dtype)
    return g_x, None, None


dispatch_rows.defvjp(_dispatch_fwd, _dispatch_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def combine_rows(out: jax.Array, gates: jax.Array, slot_assign: jax.Array, assign_slot: jax.Array,
                 top_k: int) -> jax.Array:
    """y[n] = Σ_k gates[n, k] · out[assign_slot[n·K + k]]  (fp32; dropped assignments contribute 0)."""
    n = gates.shape[0]
    rows = _take_rows(out, assign_slot).reshape(n, top_k, out.shape[-1])
    return jnp.einsum("nkd,nk->nd", rows.astype(jnp.float32), gates.astype(jnp.float32))


def _combine_fwd(out, gates, slot_assign, assign_slot, top_k):
    return combine_rows(out, gates, slot_assign, assign_slot, top_k), (out, gates, slot_assign, assign_slot)


def _combine_bwd(top_k, res, g_y):
    out, gates, slot_assign, assign_slot = res
    n = gates.shape[0]
    rows = _take_rows(out, assign_slot).reshape(n, top_k, out.shape[-1])
    g_gates = jnp.einsum("nkd,nd->nk", rows.astype(jnp.float32), g_y.astype(jnp.float32)).astype(gates.dtype)
    slot_gate = _take_rows(gates.reshape(-1).astype(jnp.float32), slot_assign)  # 0 for empty slots
    g_out = (_take_rows(g_y.astype(jnp.float32), slot_assign // top_k) * slot_gate[:, None]).astype(out.dtype)
    return g_out, g_gates, None, None


combine_rows.defvjp(_combine_fwd, _combine_bwd)


# ----------------------------------------------------------------------------------------------
# Tile GEMM: every tile of rows multiplies its own expert's weight matrix
# ----------------------------------------------------------------------------------------------
# How per-tile weight gradients are summed per expert: onehot (a [E, G] @ [G, K·N] matmul) | scatter
# (segment_sum); "xla" skips tile_matmul (plain gather, autodiff's scatter-add). Benchmark knob.
TILE_WEIGHT_GRAD_SUM = "onehot"


def _sum_tiles_per_expert(dw_tiles: jax.Array, group_expert: jax.Array, n_experts: int) -> jax.Array:
    """[G, K, N] fp32 per-tile gradients -> [E, K, N]: Σ over the tiles of each expert."""
    if TILE_WEIGHT_GRAD_SUM == "scatter":
        return jax.ops.segment_sum(dw_tiles, group_expert, num_segments=n_experts, indices_are_sorted=True)
    onehot = jax.nn.one_hot(group_expert, n_experts, dtype=jnp.float32)  # [G, E]
    return jnp.einsum("ge,gkn->ekn", onehot, dw_tiles, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def tile_matmul(a: jax.Array, w: jax.Array, group_expert: jax.Array) -> jax.Array:
    """a [G, R, K] @ w[group_expert] -> [G, R, N] for w [E, K, N] (tiles sorted by expert).

    The backward pass re-gathers the weights (no [G, K, N] residual), accumulates each tile's weight
    gradient in fp32 and sums the tiles of an expert without a scatter-add.
    """
    return jnp.einsum("grk,gkn->grn", a, jnp.take(w, group_expert, axis=0, indices_are_sorted=True))


def _tile_matmul_fwd(a, w, group_expert):
    return tile_matmul(a, w, group_expert), (a, w, group_expert)


def _tile_matmul_bwd(res, g):
    a, w, group_expert = res
    wg = jnp.take(w, group_expert, axis=0, indices_are_sorted=True)
    g = g.astype(a.dtype)
    da = jnp.einsum("grn,gkn->grk", g, wg)
    dw_tiles = jnp.einsum("grk,grn->gkn", a, g, preferred_element_type=jnp.float32)
    dw = _sum_tiles_per_expert(dw_tiles, group_expert, w.shape[0]).astype(w.dtype)
    return da, dw, None


tile_matmul.defvjp(_tile_matmul_fwd, _tile_matmul_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def take_tiles(w: jax.Array, group_expert: jax.Array, n_experts: int) -> jax.Array:
    """w[group_expert] [G, K, N] for w [E, K, N]: each tile's expert weights, for a GEMM with its own
    VJP (simulated FP8). The backward sums the tiles of each expert in fp32 without a scatter-add
    (autodiff's transpose of the gather is one: bf16 atomics on a GPU, slow and not deterministic)."""
    return jnp.take(w, group_expert, axis=0, indices_are_sorted=True)


def _take_tiles_fwd(w, group_expert, n_experts):
    return take_tiles(w, group_expert, n_experts), group_expert


def _take_tiles_bwd(n_experts, group_expert, g):
    return _sum_tiles_per_expert(g.astype(jnp.float32), group_expert, n_experts).astype(g.dtype), None


take_tiles.defvjp(_take_tiles_fwd, _take_tiles_bwd)


def gather_tile_weights(w: jax.Array, group_expert: jax.Array) -> jax.Array:
    """Each tile's expert weights for a GEMM with its own VJP: `take_tiles`, or with the "xla" knob
    above the plain gather (autodiff's scatter-add)."""
    if TILE_WEIGHT_GRAD_SUM == "xla":
        return jnp.take(w, group_expert, axis=0, indices_are_sorted=True)
    return take_tiles(w, group_expert, w.shape[0])
