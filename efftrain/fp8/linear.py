"""The FP8 linear layer: y = x @ w with simulated FP8 forward, input-gradient and weight-gradient GEMMs.

The top layer of efftrain.fp8 (formats -> scaling -> kernels -> matmul -> linear): a custom VJP over
`fp8_matmul` and the quantizers of efftrain/fp8/matmul.py, configured by an FP8Config.

Linear layer (DeepSeek-V3, arXiv 2412.19437, §3.3 and Fig. 6), y = x @ w, w [K, N], with a custom VJP:
      Fprop  y  = x  @ w      x: fmt, act_block tiles along K;       w: fmt, weight_block
      Dgrad  dx = dy @ wᵀ     dy: grad_fmt, act_block tiles along N; wᵀ: fmt, weight_block transposed
                              (square 128×128 blocks of w are the same blocks of wᵀ)
      Wgrad  dw = xᵀ @ dy     both tiled 128×1 along the token dim (the contraction): xᵀ with act_block
                              (1 channel × 128 tokens), dy with its transpose (128 tokens × 1 column).
                              As in V3, x for Wgrad is the forward's FP8 x (dequantized, re-tiled and
                              quantized again), mirroring V3's cached FP8 activations.
  Each GEMM is simulated only if its flag (forward / input_grad / weight_grad) is set, otherwise it is
  the plain matmul autodiff would have done. Straight-through: gradients flow as if quantization were
  the identity, exactly like real FP8 training.

Speed. With accum_bits=None the cost is one quantize pass per operand plus one matmul in the compute
dtype (bf16 in training; exact for the dequantized values when pow2_scales, else one extra bf16
rounding of the dequantized operand, ~2^-9 relative, far below FP8's 2^-4); the backward GEMMs contract
the stored layouts with dot_general (no transposed copies) and every GEMM writes the compute dtype
(one rounding of its float32 accumulator, never a float32 [M, N] round trip). Linears that read the
same x (q/k/v, gate/up: fp8_linear_shared) quantize it once, and the forward pass also makes x's
Wgrad tiling and keeps it, with the quantized weights, for the backward. On GPU the quantize pass is a
Pallas kernel (`fake_quantize_many`, `fp8.quantize_impl`) that reads a [128, 128] tile once and writes
every tiling asked for (dy: 1×128 and 128×1), using Triton's e4m3 convert (`fp8.native_casts`;
bit-identical to cast_to_format on an H100).
With the accumulator model, the linear layer's default recipe (1×128 / 128×128 blocks, promotion
every 128, 128-aligned shapes) takes a fast path (`fp8.v3_fast_path`): each operand is quantized once,
straight into the kernels' layouts (`quantize_many`: FP8 values in bf16 plus the block scales; x's
Wgrad tiling made in the forward and kept), and Wgrad reads x in its stored [tokens, K] layout;
bit-identical to fp8_matmul per GEMM. Speeds of the accumulator kernels: efftrain/fp8/matmul.py and
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from jax import lax

from efftrain.fp8.formats import float_format, operand_dtype
from efftrain.fp8.matmul import (KernelChoice, accumulate_windows, fake_quantize_many, fp8_matmul, precision,
                                  quantize_many)
from efftrain.fp8.scaling import KERNEL_TILE, Block, Chain, fake_quantize

if TYPE_CHECKING:  # the config module needs pydantic; this package must not (GPU image has none)
    from efftrain.config import FP8Config


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """The hashable subset of FP8Config that fp8_linear uses (a static argument of the custom VJP)."""

    fmt: str
    grad_fmt: str
    act_block: Block
    weight_block: Block
    pow2_scales: bool
    accum_bits: int | None
    accum_rounding: str
    k_step: int
    promote_every: int | None
    forward: bool
    input_grad: bool
    weight_grad: bool
    v3_fast_path: bool
    kernels: KernelChoice

    @classmethod
    def of(cls, cfg: Any) -> LinearSpec:
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name != "kernels"}
        return cls(**fields, kernels=KernelChoice.of(cfg))

    def windows(self) -> dict:
        """The accumulator model's arguments of `accumulate_windows` (the fast path's windows = 128)."""
        return dict(k_step=self.k_step, steps_per_window=KERNEL_TILE // self.k_step,
                    accum_bits=self.accum_bits, rounding=self.accum_rounding, kernels=self.kernels)

    def gemm(self, a, b, a_fmt, b_fmt, a_block, b_block, compute_dtype):
        return fp8_matmul(a, b, fmt=a_fmt, b_fmt=b_fmt, a_block=tuple(a_block), b_block=tuple(b_block),
                          accum_bits=self.accum_bits, promote_every=self.promote_every,
                          k_step=self.k_step, rounding=self.accum_rounding, pow2_scales=self.pow2_scales,
                          compute_dtype=compute_dtype, out_dtype=compute_dtype, kernels=self.kernels)


def fp8_linear(x: jax.Array, w: jax.Array, cfg: FP8Config) -> jax.Array:
    """y = x @ w (x [..., K], w [K, N]) with the FP8 GEMMs that `cfg` enables; y has x's dtype.

    `cfg` is an FP8Config (or any object with its fields). Gradients: dx in x.dtype, dw in w.dtype.
    """
    return fp8_linear_shared(x, (w,), cfg)[0]


def fp8_linear_shared(x: jax.Array, ws: tuple[jax.Array, ...] | list[jax.Array], cfg: FP8Config
                      ) -> tuple[jax.Array, ...]:
    """(x @ w for w in ws) for linears that read the same x (q/k/v, gate/up): the same numbers as
    separate fp8_linear calls, but x is quantized once for all of them, and with scaling only
    (accum_bits=None) the Wgrad tiling of x is made in that same forward pass (kept instead of x)."""
    spec = LinearSpec.of(cfg)
    ws = tuple(ws)
    if not (spec.forward or spec.input_grad or spec.weight_grad):
        return tuple(jnp.dot(x, w) for w in ws)
    return _fp8_linear(x, ws, spec)


def _plain(x, w):
    return jnp.dot(x, w)


def _dot(u, v, dims, cd):
    """Contract the stored layouts (no transposed copies) with float32 accumulation; the result in the
    compute dtype cd: the GEMM rounds its float32 accumulator once on output, the same single rounding
    as a float32 result cast to bf16, without writing and re-reading a float32 [M, N] (on the H100 that
    round trip cost most of the scaling-only overhead)."""
    return lax.dot_general(u, v, (dims, ((), ())), precision=precision(cd), preferred_element_type=cd)


def _wgrad_x_chain(spec: LinearSpec) -> Chain:
    """x for Wgrad: tiled 128 tokens × 1 channel; as in V3, starting from the forward's FP8 x."""
    ab = tuple(spec.act_block)
    return ((spec.fmt, ab),) * spec.forward + ((spec.fmt, ab[::-1]),)


def v3_recipe(spec: LinearSpec) -> bool:
    """Whether spec takes the fast path of `_forward_v3` / `_backward_v3` on 128-aligned shapes: the
    default recipe with the accumulator model (all three GEMMs simulated, 1×128 / 128×128 blocks,
    promotion every 128, formats exact in bf16) and fp8.v3_fast_path set."""
    t = KERNEL_TILE
    return (spec.v3_fast_path and spec.accum_bits is not None and spec.forward and spec.input_grad
            and spec.weight_grad and tuple(spec.act_block) == (1, t) and tuple(spec.weight_block) == (t, t)
            and spec.promote_every == t and t % spec.k_step == 0
            and operand_dtype(float_format(spec.fmt), float_format(spec.grad_fmt)) == jnp.bfloat16)


def _v3_fast_path(spec: LinearSpec, rows: int, k: int, ns) -> bool:
    """The V3 recipe on 128-aligned shapes: every operand is quantized once, straight into the
    accumulator kernels' layouts, and Wgrad reads the FP8 x kept from the forward."""
    t = KERNEL_TILE
    return v3_recipe(spec) and rows % t == 0 and k % t == 0 and all(n % t == 0 for n in ns)


def _forward_v3(x2, ws, spec, keep_residuals, cd):
    """Fprop y = x @ w: x quantized 1×128 (and, for Wgrad, that FP8 x re-tiled 128 tokens × 1 in the
    same pass), w 128×128; the residuals are those (q, scale) pairs instead of x and w."""
    chains = (((spec.fmt, tuple(spec.act_block)),),) + (_wgrad_x_chain(spec),) * keep_residuals
    (qx, sx), *x_wgrad = quantize_many(x2, chains, spec.pow2_scales, kernels=spec.kernels)
    w_q = tuple(quantize_many(w, (((spec.fmt, tuple(spec.weight_block)),),), spec.pow2_scales,
                              kernels=spec.kernels)[0] for w in ws)
    # scales per promotion window: sa [K/128, tokens], sb [K/128, N] (one weight block per 128 columns)
    ys = tuple(accumulate_windows(qx, qw, sx.T, jnp.repeat(sw, KERNEL_TILE, axis=1), out_dtype=cd,
                                   **spec.windows()) for qw, sw in w_q)
    return ys, (tuple(x_wgrad[0]) if keep_residuals else x2, w_q)


def _backward_v3(spec, x_wgrad, w_q, dys, x_shape, cd):
    """Dgrad dx = dy @ wᵀ and Wgrad dw = xᵀ @ dy from one quantization pass over each dy (1×128 and
    128 tokens × 1 tiles); the Wgrad kernel reads x in its stored [tokens, K] layout."""
    qxt, sxt = x_wgrad
    tokens = tuple(spec.act_block)[::-1]
    dx, dws = 0, []
    for dy, (qw, sw) in zip(dys, w_q):
        dy2 = dy.reshape(-1, qw.shape[1])
        chains = (((spec.grad_fmt, tuple(spec.act_block)),), ((spec.grad_fmt, tokens),))
        (qd, sd), (qdt, sdt) = quantize_many(dy2, chains, spec.pow2_scales, kernels=spec.kernels)
        dx = dx + accumulate_windows(qd, qw.T, sd.T, jnp.repeat(sw.T, KERNEL_TILE, axis=1), out_dtype=cd,
                                      **spec.windows()).reshape(x_shape)
        dws.append(accumulate_windows(qxt, qdt, sxt, sdt, a_transposed=True, out_dtype=cd, **spec.windows()))
    return dx, dws


def _forward(x, ws, spec, keep_residuals):
    """The forward GEMMs and (keep_residuals) what the backward needs: for Wgrad the token-tiled FP8 x
    (scaling only, or the V3 fast path) or x, for Dgrad the quantized weights (likewise) or the weights."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    cd = jnp.promote_types(x.dtype, ws[0].dtype)
    ab, wb = tuple(spec.act_block), tuple(spec.weight_block)
    x_res, w_res = x2, ws
    if _v3_fast_path(spec, *x2.shape, [w.shape[1] for w in ws]):
        ys, (x_res, w_res) = _forward_v3(x2, ws, spec, keep_residuals, cd)
    elif spec.accum_bits is None:
        chains = (((spec.fmt, ab),),) * spec.forward + (_wgrad_x_chain(spec),) * (keep_residuals and spec.weight_grad)
        xq = list(fake_quantize_many(x2, chains, spec.pow2_scales, cd, kernels=spec.kernels)) if chains else []
        x_fwd = xq.pop(0) if spec.forward else None
        x_res = xq.pop(0) if keep_residuals and spec.weight_grad else x2
        if spec.forward or (keep_residuals and spec.input_grad):
            wq = tuple(fake_quantize_many(w, (((spec.fmt, wb),),), spec.pow2_scales, cd, kernels=spec.kernels)[0]
                       for w in ws)
            w_res = wq if spec.input_grad else ws
        if spec.forward:
            ys = tuple(_dot(x_fwd, w_q, ((1,), (0,)), cd) for w_q in wq)
    elif spec.forward:
        ys = tuple(spec.gemm(x2, w, spec.fmt, spec.fmt, ab, wb, cd) for w in ws)
    if spec.forward:
        ys = tuple(y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype) for y in ys)
    else:
        ys = tuple(_plain(x, w) for w in ws)
    return ys, (x_res, w_res)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fp8_linear(x, ws, spec: LinearSpec):
    return _forward(x, ws, spec, keep_residuals=False)[0]


def _fp8_linear_fwd(x, ws, spec):
    ys, residuals = _forward(x, ws, spec, keep_residuals=True)
    dtype_tags = (jnp.zeros((0,), x.dtype), tuple(jnp.zeros((0,), w.dtype) for w in ws))
    return ys, (residuals, dtype_tags)


def _fp8_linear_bwd(spec, residuals, dys):
    (x_res, w_res), (x_tag, w_tags) = residuals
    cd = jnp.promote_types(x_tag.dtype, w_tags[0].dtype)
    if isinstance(x_res, tuple):  # the forward took the V3 fast path: x_res = (q, scale) of x for Wgrad
        x_shape = (*dys[0].shape[:-1], x_res[0].shape[1])
        dx, dws = _backward_v3(spec, x_res, w_res, dys, x_shape, cd)
        return dx.astype(x_tag.dtype), tuple(dw.astype(w_tag.dtype) for dw, w_tag in zip(dws, w_tags))
    x_shape = (*dys[0].shape[:-1], x_res.shape[1])
    ab, wb = tuple(spec.act_block), tuple(spec.weight_block)
    tokens = ab[::-1]  # Wgrad tiles: 128 tokens × 1 channel
    dx, dws = 0, []
    if spec.accum_bits is not None and spec.weight_grad:  # V3: Wgrad reads the forward's FP8 x
        x_fp8 = fake_quantize(x_res, spec.fmt, ab, spec.pow2_scales) if spec.forward else x_res
    for dy, w, w_tag in zip(dys, w_res, w_tags):
        dy2 = dy.reshape(-1, w.shape[1])
        dw = None
        if not (spec.input_grad and spec.weight_grad):  # what autodiff of x @ w gives, for the plain GEMM
            # (dx does not read x's values, dw not w's, so the quantized residuals stand in for them)
            dx_plain, dw = jax.vjp(_plain, x_res.reshape(x_shape).astype(x_tag.dtype), w.astype(w_tag.dtype))[1](dy)
            if not spec.input_grad:
                dx = dx + dx_plain
        if spec.accum_bits is None:  # scaling only: one pass over dy makes every tiling it needs
            chains = (((spec.grad_fmt, ab),),) * spec.input_grad + (((spec.grad_fmt, tokens),),) * spec.weight_grad
            dy_q = list(fake_quantize_many(dy2, chains, spec.pow2_scales, cd, kernels=spec.kernels))
            if spec.input_grad:  # w is quantized already (wᵀ with the transposed blocks: the same values)
                dx = dx + _dot(dy_q.pop(0), w, ((1,), (1,)), cd).reshape(x_shape)
            if spec.weight_grad:  # x_res is the token-tiled FP8 x
                dw = _dot(x_res, dy_q.pop(0), ((0,), (0,)), cd)
        else:
            if spec.input_grad:  # Dgrad: dy [M, N] tiles along N  ×  wᵀ [N, K] with the transposed blocks
                dx = dx + spec.gemm(dy2, w.T, spec.grad_fmt, spec.fmt, ab, wb[::-1], cd).reshape(x_shape)
            if spec.weight_grad:  # Wgrad: xᵀ [K, M] (1 × 128 tokens)  ×  dy [M, N] (128 tokens × 1)
                dw = spec.gemm(x_fp8.T, dy2, spec.fmt, spec.grad_fmt, ab, tokens, cd)
        dws.append(dw.astype(w_tag.dtype))
    return dx.astype(x_tag.dtype), tuple(dws)


_fp8_linear.defvjp(_fp8_linear_fwd, _fp8_linear_bwd)
