"""Where model activations may be placed on a device mesh: a hint the training step sets while it is
traced (efftrain.train.sharding lays out the parameters; this module holds only what model code needs).

Outside a train step traced on a mesh with an `expert` axis > 1, every function here returns its input
unchanged (`expert_parallel_mesh`: None), so a single-device run and PTQ/eval see the plain program.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_tracing_mesh: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("efftrain_tracing_mesh", default=None)


@contextlib.contextmanager
def tracing_mesh(mesh: Mesh | None) -> Iterator[None]:
    """While tracing the train step: the mesh that model code may constrain activations on."""
    token = _tracing_mesh.set(mesh)
    try:
        yield
    finally:
        _tracing_mesh.reset(token)


def constrain_expert_buffer(x: jax.Array) -> jax.Array:
    """An MoE buffer [E, C, ...] split over `expert` on E (and over data x fsdp on C where divisible),
    when the train step is traced on a mesh with an expert axis > 1; else x unchanged."""
    mesh: Any = _tracing_mesh.get()
    if mesh is None or mesh.shape.get("expert", 1) <= 1 or x.shape[0] % mesh.shape["expert"]:
        return x
    rows = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    rows_ok = rows and x.shape[1] % math.prod(mesh.shape[a] for a in rows) == 0
    spec = P("expert", rows if rows_ok else None, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def expert_parallel_mesh() -> Mesh | None:
    """The mesh the train step is being traced on when it has an `expert` axis > 1 (where
    `moe.expert_exchange: all_to_all` exchanges tokens, efftrain.model.expert_parallel); else None (PTQ,
    eval, a single device, a mesh without experts: the plain program)."""
    mesh: Any = _tracing_mesh.get()
    if mesh is None or mesh.shape.get("expert", 1) <= 1:
        return None
    return mesh
