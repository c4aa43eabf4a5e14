"""Building blocks shared by every architecture: Linear, RMSNorm, RoPE, SwiGLU MLP, Embedding.

Conventions used across efftrain:
  * linear weights are stored as `kernel` with shape [in, out] and applied as y = x @ kernel;
  * parameters live in `param_dtype` (fp32 masters by default), matmuls run in `compute_dtype`
    (bf16 on accelerators), normalisation statistics are always computed in fp32;
  * when `fp8.enabled`, every Linear's GEMMs go through `efftrain.fp8.fp8_linear` (a custom_vjp that
    simulates the forward, input-gradient and weight-gradient FP8 GEMMs); layers that DeepSeek-V3 keeps
    in high precision (embedding, output head, router) pass `fp8_role` so the config can opt them in.
"""

from __future__ import annotations

import contextvars
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from efftrain.config import FP8Config, ModelConfig
from efftrain.fp8 import fp8_linear, fp8_linear_shared
from efftrain.xla import on_gpu


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def fp8_for(fp8: FP8Config | None, role: str = "linear") -> FP8Config | None:
    """The FP8 settings a layer of this role should use, or None for high precision."""
    if fp8 is None or not fp8.enabled:
        return None
    if role == "linear" or getattr(fp8, role, False):
        return fp8
    return None


# Set by efftrain.quant.apply.capture_linear_inputs while it records PTQ calibration inputs: called as
# observer(layer, x) with the input of every Linear, also of those that share one input below, and of
# every MoE router (efftrain.model.moe.Router: the MoE layer's input). A context variable, so a capture
# in one thread never sees another thread's calls (jax traces in the calling thread). Unset (the
# default), the hook is one `ContextVar.get` per call at trace time and changes no numbers.
input_observer: contextvars.ContextVar = contextvars.ContextVar("linear_input_observer", default=None)


def observe_input(layer: nnx.Module, x: jax.Array) -> None:
    """Report `x`, the input `layer` is about to compute on, to the PTQ observer if one is set."""
    if (observe := input_observer.get()) is not None:
        observe(layer, x)


class Linear(nnx.Module):
    """y = x @ kernel, kernel [in, out]; optional simulated-FP8 GEMMs."""

    def __init__(self, d_in: int, d_out: int, *, cfg: ModelConfig, rngs: nnx.Rngs,
                 fp8: FP8Config | None = None, fp8_role: str = "linear", std: float | None = None):
        init = nnx.initializers.normal(cfg.init_std if std is None else std)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype_of(cfg.param_dtype)))
        self.compute_dtype = dtype_of(cfg.compute_dtype)
        self.fp8 = fp8_for(fp8, fp8_role)
        # PTQ activation fake-quantizer (efftrain.quant.activations.ActQuant), static (in the graphdef);
        # None: the input is used as it comes
        self.act_quant = None

    def __call__(self, x: jax.Array) -> jax.Array:
        observe_input(self, x)  # the observer sees the unquantized input
        if self.act_quant is not None:
            x = self.act_quant(x)
        return self.project(x)

    def project(self, x: jax.Array) -> jax.Array:
        """The GEMM on an input already observed (and activation-quantized)."""
        x = x.astype(self.compute_dtype)
        w = self.kernel[...]
        if self.fp8 is not None:
            return fp8_linear(x, w.astype(self.compute_dtype), self.fp8).astype(self.compute_dtype)
        return jnp.dot(x, w.astype(self.compute_dtype))


def apply_shared_input(layers: tuple[Linear, ...], x: jax.Array) -> tuple[jax.Array, ...]:
    """(layer(x) for layer in layers), e.g. q/k/v or gate/up. With simulated FP8 or an activation
    quantizer the same numbers, but x is quantized once for all of them (efftrain.fp8.fp8_linear_shared;
    Linear.act_quant, applied before the FP8 GEMM as in Linear.__call__)."""
    fp8, dtype = layers[0].fp8, layers[0].compute_dtype
    act_quant = getattr(layers[0], "act_quant", None)  # recovery's LoRALinear stand-ins have none
    if ((fp8 is None and act_quant is None) or len(layers) == 1
            or any(l.fp8 != fp8 or l.compute_dtype != dtype or getattr(l, "act_quant", None) != act_quant
                   for l in layers)):
        return tuple(layer(x) for layer in layers)
    for layer in layers:
        observe_input(layer, x)
    if act_quant is not None:
        x = act_quant(x)
    if fp8 is None:
        return tuple(layer.project(x) for layer in layers)
    ws = tuple(layer.kernel[...].astype(dtype) for layer in layers)
    return tuple(y.astype(dtype) for y in fp8_linear_shared(x.astype(dtype), ws, fp8))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, statistics in fp32; output in the input's dtype."""

    def __init__(self, dim: int, *, cfg: ModelConfig, eps: float | None = None):
        self.scale = nnx.Param(jnp.ones((dim,), dtype_of(cfg.param_dtype)))
        self.eps = cfg.norm_eps if eps is None else eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on the last axis of x [..., T, heads, dim] for positions [..., T].

    Rotates pairs (x[2i], x[2i+1])... in the "half" layout: first half and second half of the dim
    form the pairs (GPT-NeoX / Llama convention).
    """
    dim = x.shape[-1]
    freqs = rope_frequencies(dim, theta)  # [dim/2]
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [..., T, dim/2]
    sin = jnp.sin(angles)[..., None, :]  # [..., T, 1, dim/2]
    cos = jnp.cos(angles)[..., None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : dim // 2], x32[..., dim // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up))."""

    def __init__(self, d_model: int, hidden: int, *, cfg: ModelConfig, rngs: nnx.Rngs,
                 fp8: FP8Config | None = None):
        self.gate = Linear(d_model, hidden, cfg=cfg, rngs=rngs, fp8=fp8)
        self.up = Linear(d_model, hidden, cfg=cfg, rngs=rngs, fp8=fp8)
        self.down = Linear(hidden, d_model, cfg=cfg, rngs=rngs, fp8=fp8,
                           std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = apply_shared_input((self.gate, self.up), x)
        return self.down(jax.nn.silu(gate) * up)


# Set by the training step (efftrain.train.step) for `train.deterministic`: layers whose plain autodiff
# gradient is a scatter-add with repeated indices - which GPUs accumulate with atomics, in a different
# order every run - use a formulation with a fixed summation order instead (the embedding below; MoE
# routing in efftrain.model.moe). Read at trace time; changes nothing on CPUs, which scatter in order.
deterministic_gradients: contextvars.ContextVar[bool] = contextvars.ContextVar("deterministic_gradients",
                                                                                default=False)
EMBED_GRAD_CHUNK = 8192  # tokens per one-hot matmul of the deterministic embedding gradient
EMBED_GRAD_METHODS = ("sorted", "onehot")
EMBED_GRAD_METHOD = "sorted"  # read at trace time; benchmarks/bench_embed_grad.py measures both (H200: 0.29 vs 1.71 ms)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def deterministic_embed(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """table[tokens] cast to `dtype`, with a gradient of fixed summation order (autodiff of the gather
    is a scatter-add, which GPUs run with atomics in a different order every time). The cotangent g
    arrives in `dtype` (bf16 on GPUs); every method sums it in float32, so only the order of the fp32
    additions differs from the scatter's. EMBED_GRAD_METHOD picks how:

      sorted  tokens sorted (stably) by id, their cotangents summed per id by a segmented scan
              (a fixed tree over positions), each id's sum written to its row once: O(N·D log N)
              memory traffic, no V-sized matmul;
      onehot  Σ_t onehot(token_t)ᵀ g_t, a one-hot matmul over chunks of EMBED_GRAD_CHUNK tokens:
              2·N·V·D flops (about as many as the output head's weight gradient)."""
    return jnp.take(table, tokens, axis=0).astype(dtype)


def _embed_fwd(table, tokens, dtype):
    return deterministic_embed(table, tokens, dtype), (table, tokens)


def _embed_bwd(dtype, res, g):
    table, tokens = res
    ids, g = tokens.reshape(-1), g.reshape(-1, table.shape[1])
    if EMBED_GRAD_METHOD == "sorted":
        grad = sorted_segment_grad(ids, g, table.shape[0])
    else:
        grad = onehot_segment_grad(ids, g, table.shape[0])
    return grad.astype(table.dtype), None


deterministic_embed.defvjp(_embed_fwd, _embed_bwd)


def sorted_segment_grad(ids: jax.Array, g: jax.Array, vocab: int) -> jax.Array:
    """Σ_{t: ids_t = v} g_t for every v (float32 [vocab, D]), deterministically: a stable sort by id,
    an inclusive segmented scan (Blelloch's operator on (segment-start flag, partial sum) pairs, whose
    tree depends only on the positions), and one write per id of its segment's last partial sum."""
    order = jnp.argsort(ids, stable=True)
    ids_sorted = ids[order]
    values = g[order].astype(jnp.float32)
    boundary = ids_sorted[1:] != ids_sorted[:-1]
    starts = jnp.concatenate([jnp.ones((1,), bool), boundary])
    ends = jnp.concatenate([boundary, jnp.ones((1,), bool)])

    def combine(a, b):
        (start_a, sum_a), (start_b, sum_b) = a, b
        return start_a | start_b, jnp.where(start_b[..., None], sum_b, sum_a + sum_b)

    _, sums = jax.lax.associative_scan(combine, (starts, values))
    rows = jnp.where(ends, ids_sorted, vocab)  # out of range: dropped; every id is written at most once
    return jnp.zeros((vocab, g.shape[1]), jnp.float32).at[rows].set(sums, mode="drop", unique_indices=True)


def onehot_segment_grad(ids: jax.Array, g: jax.Array, vocab: int) -> jax.Array:
    """Σ_{t: ids_t = v} g_t for every v (float32 [vocab, D]) as chunked one-hot matmuls, summed in a
    fixed order."""
    V, D = vocab, g.shape[1]
    chunk = min(EMBED_GRAD_CHUNK, ids.shape[0])
    pad = -ids.shape[0] % chunk
    ids = jnp.pad(ids, (0, pad), constant_values=V).reshape(-1, chunk)  # id V: an all-zero one-hot row
    g = jnp.pad(g, ((0, pad), (0, 0))).reshape(-1, chunk, D)
    precision = jax.lax.Precision.HIGHEST if g.dtype == jnp.float32 else None

    def add(acc, xs):
        ids_c, g_c = xs
        onehot = (ids_c[:, None] == jnp.arange(V, dtype=ids_c.dtype)).astype(g_c.dtype)
        return acc + jnp.einsum("nv,nd->vd", onehot, g_c, precision=precision,
                                preferred_element_type=jnp.float32), None

    grad, _ = jax.lax.scan(add, jnp.zeros((V, D), jnp.float32), (ids, g))
    return grad


class Embedding(nnx.Module):
    """Token embedding table [vocab, d_model]; `attend` gives tied output logits."""

    def __init__(self, vocab: int, d_model: int, *, cfg: ModelConfig, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, d_model), dtype_of(cfg.param_dtype)))
        self.compute_dtype = dtype_of(cfg.compute_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if deterministic_gradients.get() and on_gpu():
            return deterministic_embed(self.embedding[...], tokens, self.compute_dtype)
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.compute_dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x.astype(self.compute_dtype), self.embedding[...].astype(self.compute_dtype).T)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy in fp32 (nats); logits [..., V], targets [...] int."""
    logits = logits.astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return jnp.mean(logz - pick(logits, targets))


def pick(values: jax.Array, idx: jax.Array) -> jax.Array:
    """values[..., idx] per position (values [..., V], idx [...] or [..., K] -> [...] or [..., K]) as a
    masked sum: the same numbers as take_along_axis (one term plus exact zeros), but its gradient is a
    select instead of a scatter-add, which GPUs run with atomics (see deterministic_gradients)."""
    squeeze = idx.ndim == values.ndim - 1
    idx = idx[..., None] if squeeze else idx
    hit = idx[..., None] == jnp.arange(values.shape[-1], dtype=idx.dtype)  # [..., K, V]
    out = jnp.sum(jnp.where(hit, values[..., None, :], 0), axis=-1)
    return out[..., 0] if squeeze else out


def linears_of(module: nnx.Module) -> list[tuple[str, Linear]]:
    """(path "a/b/c", Linear) of every Linear inside `module`, in nnx's traversal order."""
    return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(module) if isinstance(m, Linear)]
