"""Where PTQ and evaluation put a checkpoint: sharded over a mesh as training laid it out, with one module
at a time gathered onto one device while it is quantized (docs/SCALING.md, "PTQ and evaluation of
sharded checkpoints").

A checkpoint trained with parameters split over `fsdp` / `expert` may not fit on one device, so it is
restored onto the shardings training gives the state on `checkpoint_mesh` (`on_mesh`; both in
efftrain.train.sharding, beside the layout they reuse), never whole onto one device. Everything that runs the whole model (the embedding lookup of the calibration tokens, the
16-bit reference and every row's evaluation) is jitted on the sharded parameters and GSPMD places it;
the weight quantizers, whose programs are per matrix and solve dense [in, in] systems, run on one
device: `quantize_model` gathers each transformer block there (`gathered`), quantizes it on calibration
states held on that device, and puts its parameters back on their shardings before the next block.
Peak memory on that device: one block's parameters and calibration states, besides its shard of the rest.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import jax
from flax import nnx
from jax.sharding import SingleDeviceSharding



def gather_device(model: nnx.Module) -> jax.Device | None:
    """The device `quantize_model` gathers each block onto: None when every parameter of `model` is on
    one device (nothing to gather: the single-device programs), else the first device of this process
    that holds a piece of its parameters."""
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and len(sharding.device_set) > 1:
            return min(sharding.addressable_devices, key=lambda d: d.id)
    return None


@contextmanager
def gathered(*modules: nnx.Module, device: jax.Device | None) -> Iterator[None]:
    """Inside: every variable of `modules` (parameters and the rest, e.g. MoE router biases) on `device`
    alone, whole; on leaving, their values (quantized inside, by then) put back on the shardings they
    had. `device` None: nothing moves."""
    if device is None:
        yield
        return
    shardings = [jax.tree.map(lambda x: x.sharding, nnx.state(m)) for m in modules]
    one = SingleDeviceSharding(device)
    for m in modules:
        nnx.update(m, jax.device_put(nnx.state(m), one))
    try:
        yield
    finally:
        for m, where in zip(modules, shardings):
            nnx.update(m, jax.device_put(nnx.state(m), where))
