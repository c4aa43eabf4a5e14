"""Device meshes and the layout of the train state over them: logical axes -> rules -> mesh axes.

The mesh has three named axes (docs/SCALING.md), `data` x `fsdp` x `expert`, from `train.mesh`
(default: every device on `data`, or `train.data_parallel` of them, exactly as before meshes existed).

  * the batch [accum, micro, T+1] is split over all three axes along `micro` (every device sees its own
    sequences; an `expert` device is also a data-parallel one for the dense parts, as in MaxText);
  * every parameter carries logical axis names (`logical_axes`: from its path in the model, e.g.
    `embed.embedding` [vocab, embed], an attention `q.kernel` [embed, heads], an MoE `w_up`
    [experts, embed, expert_mlp]); `RULES` says which mesh axes each logical axis may be split over;
    `partition_spec` gives `expert` to the `experts` dimension and `fsdp` to the largest remaining
    dimension the rules allow and the axis size divides (none: replicated over `fsdp`); `data` never
    shards a parameter;
  * optimizer moments have the same paths below `opt` and get the same specs (sharded like their
    params); scalars (the step count) and the MoE router biases are replicated.

GSPMD does the rest: the jitted step takes the state with these shardings, constrains the new state
(and the gradients) to them, and XLA inserts the all-gathers of FSDP parameters and the
reduce-scatters of their gradients. The program is the single-device program, so losses, gradients
and MoE statistics (loads, drops, biases) are global and equal the one-device run up to the order of
floating-point reductions.

Expert parallelism: with `expert` > 1 the capacity path of efftrain.model.moe constrains its
[E, C, D] buffers to be split over `expert` on E (and over data x fsdp on C where divisible), so
XLA moves tokens to the devices holding their expert; the dropless paths gather the expert weights
they need per tile instead (correct, FSDP-like over experts; no ragged all-to-all).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efftrain.config import MESH_AXES, Config, ConfigError, MeshConfig

BATCH_AXES = MESH_AXES  # the micro-batch dimension is split over every mesh axis

# logical axis -> mesh axes it may be split over (in order of preference). A logical axis not listed,
# or a dimension without a name (None), is never split.
RULES: dict[str, tuple[str, ...]] = {
    "vocab": ("fsdp",),
    "embed": ("fsdp",),
    "heads": ("fsdp",),  # n_heads x head_dim (or n_kv_heads x head_dim), flattened in one kernel axis
    "mlp": ("fsdp",),
    "expert_mlp": ("fsdp",),
    "experts": ("expert", "fsdp"),
    "q_lora": ("fsdp",),
    "kv_lora": ("fsdp",),  # MLA kv_down's output: kv_lora_rank + qk_rope_head_dim
    "proj_in": ("fsdp",),  # MTP projection input: [h; emb], 2 x d_model
    "routes": (),  # router kernel's expert axis: every token scores every expert
    "norm": (),  # RMSNorm scales: tiny, replicated
}

# the order in which mesh axes pick their dimension: expert first (it has one natural dimension)
_ASSIGN_ORDER = ("expert", "fsdp")

# kernel [in, out] of a Linear, by the name of the module holding it
_KERNELS: dict[str, tuple[str, str]] = {
    "q": ("embed", "heads"), "k": ("embed", "heads"), "v": ("embed", "heads"), "o": ("heads", "embed"),
    "q_down": ("embed", "q_lora"), "q_up": ("q_lora", "heads"),
    "kv_down": ("embed", "kv_lora"), "kv_up": ("kv_lora", "heads"),
    "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"), "router": ("embed", "routes"), "proj": ("proj_in", "embed"),
}
_VARIABLES: dict[str, tuple[str, ...]] = {
    "embedding": ("vocab", "embed"),
    "w_gate": ("experts", "embed", "expert_mlp"),
    "w_up": ("experts", "embed", "expert_mlp"),
    "w_down": ("experts", "expert_mlp", "embed"),
    "scale": ("norm",),
    "bias": ("routes",),  # MoE RouterBias [E]
}


def path_names(path) -> tuple[str, ...]:
    """The attribute/dict names of a pytree key path (sequence indices and nnx's `.value` dropped)."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            names.append(k.name)
    return tuple(names)


def logical_axes(path, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the state leaf at `path` (a key path or a tuple of names) with `ndim`
    dimensions; unnamed (None) where the module type is unknown or the rank does not match (e.g. a
    scalar optimizer count). Optimizer moments match by the trailing names of their paths."""
    names = path if path and all(isinstance(n, str) for n in path) else path_names(path)
    if not names:
        return (None,) * ndim
    last = names[-1]
    axes = _KERNELS.get(names[-2]) if last == "kernel" and len(names) >= 2 else _VARIABLES.get(last)
    if axes is None or len(axes) != ndim:
        return (None,) * ndim
    return axes


def partition_spec(logical: tuple[str | None, ...], shape: tuple[int, ...], mesh_shape: dict[str, int],
                   rules: dict[str, tuple[str, ...]] | None = None) -> P:
    """The PartitionSpec of an array of `shape` with logical axes `logical` on a mesh of `mesh_shape`
    ({axis: size}). Each mesh axis of size > 1 (expert first, then fsdp) takes the largest dimension that
    its rules allow, that no other axis took and that its size divides; the rest is replicated."""
    rules = RULES if rules is None else rules
    spec: list[str | None] = [None] * len(shape)
    for axis in _ASSIGN_ORDER:
        size = mesh_shape.get(axis, 1)
        if size <= 1:
            continue
        ok = [i for i, name in enumerate(logical)
              if name is not None and axis in rules.get(name, ()) and spec[i] is None and shape[i] % size == 0]
        if ok:
            spec[max(ok, key=lambda i: (shape[i], -i))] = axis
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def state_specs(state, mesh: Mesh, rules: dict[str, tuple[str, ...]] | None = None):
    """PartitionSpec of every leaf of a state pytree (arrays or ShapeDtypeStructs)."""
    mesh_shape = dict(mesh.shape)

    def spec(path, leaf):
        shape = tuple(np.shape(leaf))
        return partition_spec(logical_axes(path, len(shape)), shape, mesh_shape, rules)

    return jax.tree_util.tree_map_with_path(spec, state)


def state_shardings(state, mesh: Mesh, rules: dict[str, tuple[str, ...]] | None = None):
    """NamedSharding of every leaf of a state pytree on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The batch [accum, micro, T+1]: `micro` split over every mesh axis."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def state_bytes(state, shardings) -> tuple[int, int]:
    """(bytes of the whole state, bytes of it that one device holds) under `shardings`."""
    total = per_device = 0
    flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for leaf, sh in zip(jax.tree.leaves(state), flat, strict=True):
        nbytes = math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize
        split = math.prod(sh.mesh.shape[a] for a in sh.spec if a is not None)
        total += nbytes
        per_device += nbytes // split
    return total, per_device


# ---- meshes -----------------------------------------------------------------------------------
def mesh_shape_of(cfg: Config, n_devices: int) -> dict[str, int]:
    """{data, fsdp, expert} sizes for `n_devices` devices (ConfigError naming the fields if impossible).
    Without train.mesh: train.data_parallel devices (-1: all) on data, which may be fewer than all."""
    t = cfg.train
    micro = t.batch_size // t.grad_accum
    if t.mesh is None:
        n = n_devices if t.data_parallel == -1 else t.data_parallel
        if n > n_devices:
            raise ConfigError(f"train.data_parallel ({n}) exceeds the {n_devices} available devices")
        if micro % n:
            raise ConfigError(f"micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by "
                              f"the {n} data-parallel devices")
        return {"data": n, "fsdp": 1, "expert": 1}
    sizes = dict(t.mesh.sizes)
    fixed = sizes["fsdp"] * sizes["expert"]
    if sizes["data"] == -1:
        if n_devices % fixed:
            raise ConfigError(f"train.mesh: fsdp {sizes['fsdp']} x expert {sizes['expert']} = {fixed} does not "
                              f"divide the {n_devices} devices (data: -1 takes the rest)")
        sizes["data"] = n_devices // fixed
    product = math.prod(sizes.values())
    if product != n_devices:
        raise ConfigError(f"train.mesh: data {sizes['data']} x fsdp {sizes['fsdp']} x expert {sizes['expert']} = "
                          f"{product} devices, but {n_devices} are available (the product must equal the device "
                          "count; use data: -1 for the rest, or CUDA_VISIBLE_DEVICES to use fewer)")
    if micro % product:
        raise ConfigError(f"micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by the "
                          f"mesh's {product} batch shards (data {sizes['data']} x fsdp {sizes['fsdp']} x expert "
                          f"{sizes['expert']})")
    return sizes


def make_mesh(cfg: Config, devices: list | None = None) -> Mesh:
    """The (data, fsdp, expert) mesh of `cfg` over `devices` (default: all of jax.devices())."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape_of(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    used = devices[:math.prod(shape)]
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, used, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - topologies mesh_utils does not know: plain order
        grid = np.array(used).reshape(shape)
    return Mesh(grid, MESH_AXES)


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{a} {s}" for a, s in mesh.shape.items())


# ---- where PTQ and evaluation lay a checkpoint (efftrain.quant.placement) ------------------------
def _shards_parameters(mesh: MeshConfig) -> bool:
    return mesh.fsdp * mesh.expert > 1


def checkpoint_mesh(cfg: Config, requested: MeshConfig | None = None, devices: list | None = None) -> Mesh | None:
    """The mesh a checkpoint of `cfg` is laid over for PTQ and evaluation, or None: whole on one device,
    as before meshes existed.

    `requested` (PTQSpec.mesh, `efftrain ptq --mesh`): that mesh (data -1: as many as the devices that
    fsdp x expert leave); a ConfigError when this process's devices cannot hold it; None when it splits no
    parameter (fsdp and expert 1: `--mesh fsdp=1` asks for one device). Without it: the run's own
    train.mesh where it splits parameters, with its data axis resized to the devices here (data splits
    only the eval batches); None where it does not, or where fsdp x expert exceeds this process's devices
    (then nothing can be laid out as trained, and the checkpoint goes onto one device)."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = cfg.train.mesh if requested is None else requested
    if mesh is None or not _shards_parameters(mesh):
        return None
    split = mesh.fsdp * mesh.expert
    data = len(devices) // split if requested is None or mesh.data == -1 else mesh.data
    if requested is not None:
        if mesh.data == 0 or mesh.data < -1:
            raise ConfigError(f"mesh: data ({mesh.data}) must be -1 (the remaining devices) or >= 1")
        if data < 1 or data * split > len(devices):
            what = " x ".join(f"{axis} {size}" for axis, size in mesh.sizes.items() if size not in (1, -1))
            raise ConfigError(f"mesh {what} needs {max(data, 1) * split} devices, but this process has {len(devices)}")
    elif data < 1:
        return None
    # device order as jax lists them; the collectives here (a block's gather, the eval's all-gathers of
    # fsdp shards) are few, so no topology-aware arrangement
    grid = np.array(devices[:data * split]).reshape(data, mesh.fsdp, mesh.expert)
    return Mesh(grid, MESH_AXES)


def on_mesh(abstract, mesh: Mesh | None):
    """`abstract` (ShapeDtypeStructs, e.g. `abstract_train_state`'s) with the shardings training gives the
    state on `mesh` (efftrain.train.sharding.state_shardings), so that a restore lands sharded; unchanged
    for None (a restore then puts it on the default device)."""
    if mesh is None:
        return abstract
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        abstract, state_shardings(abstract, mesh))
