"""Weight-activation PTQ: fake-quantized GEMM inputs (W8A8, W4A8, FP8) and FP8 block-scaled weights.

A runtime activation quantizer is a frozen, hashable `ActQuant` stored as the STATIC attribute
`act_quant` of every `Linear` inside the transformer blocks (and of each MoE layer, for its routed
experts' stacked GEMMs), so it is part of the nnx graphdef: a jitted eval retraces when it changes, and
`None` (the default) is the unchanged 16-bit forward, bitwise. `set_activation_quant(model, aq)` installs
it. The Linear's PTQ input observer sees the unquantized input (calibration is never on quantized
activations); the embedding, output head, MoE router and MTP modules keep 16-bit inputs.

Kinds (x [..., C]; scales in float32, the result in x's dtype):

  int8, int4   symmetric absmax, per token (SmoothQuant's W8A8 "per-token" activations, Xiao et al. 2022,
               arXiv 2211.10438 §3; its reference `quantize_activation_per_token_absmax`):
                   s_t = max_c |x_tc| / q_max,   q_max = 2^(b-1) - 1  (127 | 7; the symmetric range
                   -q_max..q_max, as the reference), s_t = 1 for an all-zero row,
                   x̂_tc = s_t · clip(RNE(x_tc / s_t), -q_max, q_max).
               granularity='tile': one scale per 1 × `tile` group of channels instead of per token.
  fp8          E4M3 ("fn", max 448) with 1 × `tile` tile scales along the last axis, DeepSeek-V3's
               activation recipe (arXiv 2412.19437 §3.3.2): efftrain.fp8.scaling.fake_quantize with
               block (1, tile): s = amax_tile / 448, x̂ = s · E4M3(x · (1/s)) (RNE, saturating).
               granularity='token': one scale per token (block (1, -1)).
  A last dimension that the tile does not divide is zero-padded internally (as efftrain.fp8.scaling does);
  a tile at least as wide as C is one scale per token.

Labels for row names: 'a8', 'a4', 'afp8' at the kind's default granularity (token for int, tile-128 for
fp8); otherwise the granularity is spelt out: 'a8-t64' (int tiles of 64), 'afp8-t64', 'afp8-token'.

FP8 weights ("fp8" scheme, DeepSeek-V3's weight recipe): `quantize_fp8_block_weights` rounds each
[in, out] matrix (each expert's slice of a stacked [E, in, out] separately) to E4M3 with one float32 scale
per 128 × 128 block (fake_quantize with block (128, 128)), so it stores 8 bits per weight plus 32 bits
per block: 8 + 32/(128·128) = 8.00195 bits for full blocks (`fp8_block_effective_bits` counts the actual
blocks; a matrix smaller than a block is one block). This differs from the weight-only `fmt='fp8'` of
efftrain.quant.formats in the block shape (there: g × 1, g input rows of one output column), the scale
(there: float16, rounded up to the float16 grid, 16/g bits per weight, 0.125 at g = 128) and the tie rule
(there: nearest code-book value, ties to the smaller magnitude; here: RNE on the bits, ties to even).
That format is what RTN / GPTQ / AWQ search and pack; this one is the V3 serving layout, applied as RTN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efftrain.fp8.scaling import fake_quantize
from efftrain.model.layers import linears_of
from efftrain.model.moe import MoE
from efftrain.xla import ptq_jit

ACT_KINDS = ("int8", "int4", "fp8")
GRANULARITIES = ("token", "tile")
INT_QMAX = {"int8": 127, "int4": 7}
DEFAULT_GRANULARITY = {"int8": "token", "int4": "token", "fp8": "tile"}
DEFAULT_TILE = 128
FP8_SCALE_BITS = 32  # one float32 scale per block
FP8_WEIGHT_BLOCK = (128, 128)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ActQuant:
    """Fake quantization of a GEMM input x [..., C] (see the module docstring): `aq(x)` has x's shape and
    dtype. `granularity` None means the kind's default ('token' for int8/int4, 'tile' for fp8)."""

    kind: Literal["int8", "int4", "fp8"]
    granularity: Literal["token", "tile"] | None = None
    tile: int = DEFAULT_TILE

    def __post_init__(self):
        if self.kind not in ACT_KINDS:
            raise ValueError(f"unknown activation quantization kind {self.kind!r} (choose from {', '.join(ACT_KINDS)})")
        granularity = DEFAULT_GRANULARITY[self.kind] if self.granularity is None else self.granularity
        if granularity not in GRANULARITIES:
            raise ValueError(f"activation granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
        if not _is_int(self.tile) or self.tile < 1:
            raise ValueError(f"activation tile must be a positive int (channels per scale), got {self.tile!r}")
        object.__setattr__(self, "granularity", granularity)
        object.__setattr__(self, "tile", int(self.tile))

    @property
    def label(self) -> str:
        base = {"int8": "a8", "int4": "a4", "fp8": "afp8"}[self.kind]
        if self.granularity == DEFAULT_GRANULARITY[self.kind] and (self.granularity == "token"
                                                                    or self.tile == DEFAULT_TILE):
            return base
        return f"{base}-token" if self.granularity == "token" else f"{base}-t{self.tile}"

    @property
    def bits(self) -> int:
        return 4 if self.kind == "int4" else 8

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "fp8":
            block = (1, self.tile) if self.granularity == "tile" else (1, -1)
            return fake_quantize(x, "e4m3", block).astype(x.dtype)
        cols = self.tile if self.granularity == "tile" else x.shape[-1]
        return int_fake_quantize(x, INT_QMAX[self.kind], cols)


def int_fake_quantize(x: jax.Array, qmax: int, cols: int) -> jax.Array:
    """Symmetric absmax int fake quantization of x [..., C] with one float32 scale per `cols` consecutive
    channels of each row (cols >= C: per row); the result in x's dtype."""
    C = x.shape[-1]
    cols = min(cols, C)
    pad = -C % cols
    x32 = x.astype(jnp.float32)
    xp = jnp.pad(x32, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x32
    groups = xp.reshape(*x.shape[:-1], (C + pad) // cols, cols)  # [..., n_groups, cols]
    amax = jnp.max(jnp.abs(groups), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / jnp.float32(qmax), jnp.float32(1.0))
    q = jnp.clip(jnp.round(groups / scale), -qmax, qmax)  # jnp.round: half to even
    out = (q * scale).reshape(*x.shape[:-1], C + pad)[..., :C]
    return out.astype(x.dtype)


def set_activation_quant(model, aq: ActQuant | None) -> int:
    """Install `aq` (None: remove) as the input quantizer of every Linear inside `model.blocks` and of every
    MoE layer there (its routed experts' gate/up and down inputs); shared experts are Linears. Returns the
    number of modules set. The embedding, output head, routers and MTP modules are left alone."""
    if aq is not None and not isinstance(aq, ActQuant):
        raise TypeError(f"set_activation_quant takes an ActQuant or None, got {type(aq).__name__}")
    touched = 0
    for block in model.blocks:
        for _, linear in linears_of(block):
            linear.act_quant = aq
            touched += 1
        for _, module in nnx.iter_modules(block):
            if isinstance(module, MoE):
                module.act_quant = aq
                touched += 1
    return touched


# ----------------------------------------------------------------------------------------------
# FP8 weights with 128 x 128 block scales
# ----------------------------------------------------------------------------------------------
def _check_block(block) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2 or not all(_is_int(b) for b in block)
            or any(b < 1 for b in block)):
        raise ValueError(f"FP8 weight block must be two positive ints (input rows, output columns), got {block!r}")
    return int(block[0]), int(block[1])


@ptq_jit(static_argnames=("block",))
def _fp8_blocks(w, *, block):
    one = lambda m: fake_quantize(m, "e4m3", block)  # noqa: E731  [in, out] -> float32
    for _ in range(w.ndim - 2):  # stacked experts: every [in, out] slice has its own blocks
        one = jax.vmap(one)
    return one(w).astype(w.dtype)


def quantize_fp8_block_weights(w: jax.Array, block: tuple[int, int] = FP8_WEIGHT_BLOCK) -> jax.Array:
    """w [..., in, out] rounded to E4M3 with one float32 scale per `block` (input rows × output columns) of
    each [in, out] matrix (s = amax/448, RNE, a block larger than the matrix is the whole matrix); same
    shape and dtype as w."""
    block = _check_block(block)
    w = jnp.asarray(w)
    if w.ndim < 2:
        raise ValueError(f"FP8 block weights need a matrix [..., in, out], got shape {w.shape}")
    return _fp8_blocks(w, block=block)


def fp8_block_effective_bits(shape: tuple[int, ...], block: tuple[int, int] = FP8_WEIGHT_BLOCK) -> float:
    """Stored bits per weight of `quantize_fp8_block_weights` on a weight of `shape`: 8 per element plus
    FP8_SCALE_BITS (float32) per block, 8 + 32/(128·128) for whole 128 × 128 blocks."""
    r, c = _check_block(block)
    n_in, n_out = shape[-2:]
    r, c = min(r, n_in), min(c, n_out)
    n_blocks = -(-n_in // r) * -(-n_out // c)
    return 8.0 + FP8_SCALE_BITS * n_blocks / (n_in * n_out)


def quantize_model_fp8_blocks(model, block: tuple[int, int] = FP8_WEIGHT_BLOCK):
    """Every weight PTQ quantizes (the Linears inside model.blocks and each routed expert's gate/up/down)
    replaced by its FP8 block-quantized value, in place. Returns a QuantReport (method 'fp8-block') with
    the counts and bits (no packed codes: `--save` is not supported for this format)."""
    from efftrain.quant.apply import EXPERT_WEIGHTS, QuantReport

    block = _check_block(block)
    report = QuantReport(method="fp8-block")

    def put(var):
        w = var[...]
        var[...] = quantize_fp8_block_weights(w, block)
        count = int(np.prod(w.shape))
        report.n_weights += int(np.prod(w.shape[:-2], dtype=np.int64)) if w.ndim > 2 else 1
        report.n_params += count
        report.weight_bits += count * fp8_block_effective_bits(w.shape, block)

    for blk in model.blocks:
        for _, linear in linears_of(blk):
            put(linear.kernel)
        if blk.is_moe:
            for name in EXPERT_WEIGHTS:
                put(getattr(blk.ffn, name))
            report.expert_matrices += 3 * blk.ffn.n_experts
    return report
