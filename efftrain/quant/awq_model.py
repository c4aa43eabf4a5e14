"""AWQ of a transformer block as in the paper and its reference code (Lin et al. 2023, arXiv 2306.00978 §3;
mit-han-lab/llm-awq ``auto_scale.py`` / ``auto_clip.py`` / ``pre_quant.py``; AutoAWQ ``quantizer.py`` and its
DeepSeek-V2/V3 layer maps). Our own code; the layer-level kernels are in efftrain.quant.awq.

Per block, with calibration activations of the 16-bit model (the reference runs the FP model forward:
block l is calibrated on the outputs of the unquantized blocks 0..l-1, `pre_quant.run_awq`):

1. **Scale groups.** The Linears that read one input share one per-input-channel scale s, and s goes
   into the op that produces that input, so the quantized model carries no explicit 1/s (no extra bits):

   ==========================  ==========================================  ===========================
   prev op (gets 1/s)          Linears (rows × s)                          loss measured on
   ==========================  ==========================================  ===========================
   attn_norm                   attn q, k, v  (MLA: q or q_down, kv_down)   the attention output
   v (its output columns)      o    (only if n_kv_heads == n_heads)        o's output
   MLA q_norm                  q_up                                        q_up's output
   MLA kv_norm                 kv_up                                       kv_up's output
   MLA kv_up (its v columns)   o                                           o's output
   ffn_norm                    MLP gate, up                                the MLP output
   MLP up (output columns)     down                                        down's output
   ffn_norm (+ router rows×s)  every routed expert's gate/up, shared       the MoE layer's output
                               experts' gate/up
   expert e's up (columns)     expert e's down                             e's down output (its tokens)
   shared experts' up          shared experts' down                        its output
   final_norm (+ MTP out_norm) the output head (with ``quantize_head``)    the head's output
   ==========================  ==========================================  ===========================

   That is llm-awq's LLaMA map (input_layernorm -> q/k/v on the attention output, v -> o when the
   shapes match, post_attention_layernorm -> gate/up on the MLP output, up -> down) and AutoAWQ's
   DeepSeek-V3 map (input_layernorm -> q_a/kv_a, q_a_layernorm -> q_b, kv_a_layernorm -> kv_b, one scale
   over all experts' and the shared experts' gate/up on the MoE output, up -> down per expert), plus the
   MLA kv_up -> o pair (o's input channel (head i, j) is v channel (i, j) of kv_up's output, averaged
   by the attention weights: a linear map, so the fold is exact).

   MoE: the router reads the same normalised input as the experts. Folding s into ffn_norm would feed
   it x/s, so its kernel rows are multiplied by s too (``router(x/s)`` with ``diag(s) W_r`` computes the
   same logits; the router stays 16-bit, so this costs nothing). AutoAWQ leaves the router on x/s.

2. **Search.** For each group, s(α) = awq_scale(mean |x|, α) (or the duo form) on α in
   linspace(0, 1, awq_grid), the Linears of the group replaced by ``Q(diag(s) w) / s`` (RTN, no clip),
   everything else 16-bit, and α* = argmin of the mean squared difference of the block output (module
   output for groups with one Linear: through the Gram matrix, exactly that Linear's output error),
   all on the 16-bit block with 16-bit inputs. All groups of a block are searched before any is applied,
   as in the reference.

3. **Fold**: prev op /= s, rows of the group's weights *= s (and the router's). Exact in real
   arithmetic: the folded 16-bit block computes the same function up to float rounding (tested).

4. **Clip** (``awq_clip``, default on, the reference's ``auto_clip_block``): per Linear on its scaled
   weight with its inputs x/s, except the query/key projections (q, k, q_down, q_up), which the
   reference skips ("due to qk bmm, it is hard to clip precisely"); see efftrain.quant.awq.

5. **Quantize**: RTN of the scaled (clipped) weights; the model's kernels hold the dequantized values
   and the packed codes are those of the stored kernel, so ``eff_bits`` is that of RTN.

Routed experts: per-expert statistics (``ExpertStats``, efftrain.quant.apply) come from the tokens the
router sends to each expert (or all tokens with ``expert_calibration='all'``); an expert with fewer
than the settings' minimum for a matrix keeps s = 1 and no clip for it (an RTN fallback, counted).

Speed: every search, clip and quantization is one jitted program per layer shape (the block search is
keyed by the block module's structure, the int bit width is data), reused across layers, bit widths
and checkpoints; nothing goes to the host.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from efftrain.model.layers import linears_of
from efftrain.model.mla import MLAttention
from efftrain.quant.awq import alpha_grid, awq_scale, best_scales, clip_quantize, clip_ratios, gram, weight_mean
from efftrain.quant.formats import Packed, kernel_format, make_format, resolve_group_size, rtn_kernel
from efftrain.xla import ptq_jit

# Linears whose output error does not reflect the attention scores: not clipped (reference auto_clip.py)
NO_CLIP = ("attn/q", "attn/k", "attn/q_down", "attn/q_up")


class ScaleGroup(NamedTuple):
    name: str
    weights: tuple[str, ...]  # block-relative paths ("attn/q") of Linears, or of stacked expert Params
    source: str  # the captured input these weights read (a Linear's or the router's path)
    prev: str  # path of the norm whose scale gets 1/s, or of the Linear whose columns get it
    inspect: str | None = None  # submodule whose output the search compares (None: the one Linear's)
    prev_cols: Any = None  # for a Linear prev: indices of its output columns that the scale maps to
    also: tuple[str, ...] = ()  # 16-bit kernels that read the same input: rows *= s (the router)


def scale_groups(block) -> list[ScaleGroup]:
    """The scale groups of one `Block` (the table in the module docstring)."""
    attn, groups = block.attn, []
    if isinstance(attn, MLAttention):
        first = "attn/q" if attn.q is not None else "attn/q_down"
        groups.append(ScaleGroup("attn_in", (first, "attn/kv_down"), first, "attn_norm", inspect="attn"))
        if attn.q is None:
            groups.append(ScaleGroup("q_up", ("attn/q_up",), "attn/q_up", "attn/q_norm"))
        groups.append(ScaleGroup("kv_up", ("attn/kv_up",), "attn/kv_up", "attn/kv_norm"))
        per_head = attn.nope_dim + attn.v_dim
        v_cols = np.concatenate([h * per_head + attn.nope_dim + np.arange(attn.v_dim) for h in range(attn.n_heads)])
        groups.append(ScaleGroup("o", ("attn/o",), "attn/o", "attn/kv_up", prev_cols=v_cols))
    else:
        groups.append(ScaleGroup("attn_in", ("attn/q", "attn/k", "attn/v"), "attn/q", "attn_norm", inspect="attn"))
        if attn.n_kv == attn.n_heads:  # llm-awq: only when v's output maps one to one onto o's input
            groups.append(ScaleGroup("o", ("attn/o",), "attn/o", "attn/v"))
    if block.is_moe:
        moe = block.ffn
        weights = ("ffn/w_gate", "ffn/w_up") + (("ffn/shared/gate", "ffn/shared/up") if moe.shared else ())
        groups.append(ScaleGroup("ffn_in", weights, "ffn/router", "ffn_norm", inspect="ffn",
                                 also=("ffn/router/kernel",)))
        if moe.shared is not None:
            groups.append(ScaleGroup("shared_down", ("ffn/shared/down",), "ffn/shared/down", "ffn/shared/up"))
    else:
        groups.append(ScaleGroup("ffn_in", ("ffn/gate", "ffn/up"), "ffn/gate", "ffn_norm", inspect="ffn"))
        groups.append(ScaleGroup("down", ("ffn/down",), "ffn/down", "ffn/up"))
    return groups


def _node(root, path: str):
    for part in path.split("/"):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _var(root, path: str):
    """The Param at `path`: a Linear's kernel, a norm's scale, or a Param itself (stacked experts)."""
    node = _node(root, path)
    if isinstance(node, nnx.Variable):
        return node
    return node.kernel if hasattr(node, "kernel") else node.scale


def _attn_out(module, x, positions):
    return module(x, positions)


def _ffn_out(module, x):
    y = module(x)
    return y[0] if isinstance(y, tuple) else y  # MoE returns (y, stats)


@ptq_jit(static_argnames=("graphdef", "call", "paths", "f", "g"))
def _search_block(graphdef, state, args, sx, w_mean, alphas, maxq, *, call, paths, f, g):
    """Mean squared difference of the module output, 16-bit vs the group's weights as Q(diag(s) w)/s,
    for each α (one program per module structure; lax.map keeps one α's activations alive at a time)."""
    ref = call(nnx.merge(graphdef, state), *args).astype(jnp.float32)

    def one(alpha):
        s = awq_scale(sx, alpha, w_mean)[:, None]
        module = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))  # Variables of this trace level
        for path in paths:
            var = _var(module, path)
            w = var[...]
            var[...] = (rtn_kernel(w.astype(jnp.float32) * s, maxq, f=f, g=g) / s).astype(w.dtype)
        return jnp.mean(jnp.square(call(module, *args).astype(jnp.float32) - ref))

    return lax.map(one, alphas)


def _group(s, n_in: int) -> int:
    return resolve_group_size(s.group_for(n_in), n_in)


def _outer(s):
    return s[..., :, None] * s[..., None, :]


class _Ctx(NamedTuple):
    fs: Any
    maxq: Any
    alphas: jax.Array
    ratios: jax.Array
    has_zero: bool


def _context(s) -> _Ctx:
    f = make_format(s.bits, s.fmt, s.symmetric)
    fs, maxq = kernel_format(f)
    return _Ctx(fs, maxq, jnp.asarray(alpha_grid(s.awq_grid), jnp.float32),
                jnp.asarray(clip_ratios(), jnp.float32), f.has_zero_point)


def _search_group(block, grp: ScaleGroup, x, G, positions, s, ctx: _Ctx):
    sx = jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=0)
    ws = [_var(block, p)[...] for p in grp.weights]
    g = _group(s, x.shape[-1])
    w_mean = weight_mean(ws, g) if s.awq_duo_scaling else None
    if grp.inspect is None:
        (w,) = ws
        return best_scales(w.astype(jnp.float32), G, sx, w_mean, ctx.alphas, ctx.maxq, f=ctx.fs, g=g)
    module = getattr(block, grp.inspect)
    graphdef, state = nnx.split(module)
    xb = x.reshape(*positions.shape, x.shape[-1])  # as captured: the dtype the forward fed the module
    args, call = ((xb, positions), _attn_out) if grp.inspect == "attn" else ((xb,), _ffn_out)
    rel = tuple(p.split("/", 1)[1] for p in grp.weights)
    errors = _search_block(graphdef, state, args, sx, w_mean, ctx.alphas, ctx.maxq, call=call, paths=rel,
                           f=ctx.fs, g=g)
    return awq_scale(sx, ctx.alphas[jnp.argmin(errors)], w_mean)


def fold(root, grp: ScaleGroup, s: jax.Array, extra_norms=()) -> None:
    """Apply a searched scale exactly: prev op /= s (a norm's scale, or the listed output columns of the
    previous Linear), rows of the group's weights (and of `also`) *= s."""
    prev = _var(root, grp.prev)
    p = prev[...]
    if isinstance(_node(root, grp.prev), nnx.Module) and hasattr(_node(root, grp.prev), "kernel"):
        cols = slice(None) if grp.prev_cols is None else jnp.asarray(grp.prev_cols)
        prev[...] = p.at[:, cols].divide(s.astype(p.dtype))
    else:
        prev[...] = (p / s).astype(p.dtype)
    for norm in extra_norms:
        norm.scale[...] = (norm.scale[...] / s).astype(norm.scale[...].dtype)
    for path in grp.weights + grp.also:
        var = _var(root, path)
        var[...] = (var[...] * s[:, None]).astype(var[...].dtype)


def _store(var, report, key, out, s, ctx: _Ctx) -> None:
    w_hat, codes, scales, zeros, _ = out
    var[...] = w_hat.astype(var[...].dtype)
    report.add(tuple(var[...].shape), s)
    report.packed[key] = (Packed(codes, scales, zeros if ctx.has_zero else None), None)


class BlockScales(NamedTuple):
    groups: list[ScaleGroup]
    scales: dict[str, jax.Array]  # group name -> s [in]
    expert_down: jax.Array | None  # [E, H]: each routed expert's up -> down scale
    grams: dict[str, jax.Array]  # group source -> X^T X of the 16-bit input


def search_block_scales(block, inputs: dict[str, jax.Array], positions: jax.Array, s, experts=None) -> BlockScales:
    """Steps 1-2: every scale group's s, searched on the 16-bit block (`inputs`: its captured Linear /
    router inputs [N, in]; `experts`: ExpertStats of an MoE block)."""
    ctx = _context(s)
    groups = scale_groups(block)
    grams = {grp.source: gram(inputs[grp.source]) for grp in groups}
    scales = {grp.name: _search_group(block, grp, inputs[grp.source], grams[grp.source], positions, s, ctx)
              for grp in groups}
    expert_down = _expert_down_scales(block.ffn, experts, s, ctx) if experts is not None else None
    return BlockScales(groups, scales, expert_down, grams)


def fold_block(block, bs: BlockScales) -> None:
    """Step 3: apply every searched scale exactly (the block's 16-bit function is unchanged)."""
    for grp in bs.groups:
        fold(block, grp, bs.scales[grp.name])
    if bs.expert_down is not None:
        moe, s_e = block.ffn, bs.expert_down
        moe.w_up[...] = (moe.w_up[...] / s_e[:, None, :]).astype(moe.w_up[...].dtype)
        moe.w_down[...] = (moe.w_down[...] * s_e[:, :, None]).astype(moe.w_down[...].dtype)


def quantize_folded_block(block, inputs: dict[str, jax.Array], bs: BlockScales, s, report, prefix: str,
                          experts=None) -> None:
    """Steps 4-5: clip and quantize the folded block's weights, on the Gram matrices of x / s."""
    ctx = _context(s)
    row_scale = {w: (grp.name, grp.source) for grp in bs.groups for w in grp.weights}
    for name, lin in linears_of(block):
        if name in row_scale:
            gname, source = row_scale[name]
            G = bs.grams[source] / _outer(bs.scales[gname])
        else:
            G = gram(inputs[name])
        out = clip_quantize(lin.kernel[...], G, jnp.ones((), bool), ctx.ratios, ctx.maxq, f=ctx.fs,
                            g=_group(s, lin.kernel.shape[0]), clip=s.awq_clip and name not in NO_CLIP)
        _store(lin.kernel, report, f"{prefix}/{name}/kernel", out, s, ctx)
    if experts is not None:
        moe, s_in = block.ffn, bs.scales["ffn_in"]
        for name, G, allow in (("w_gate", experts.gram_in / _outer(s_in), experts.ok_in),
                               ("w_up", experts.gram_in / _outer(s_in), experts.ok_in),
                               ("w_down", experts.gram_hidden / _outer(bs.expert_down), experts.ok_hidden)):
            var = getattr(moe, name)
            out = clip_quantize(var[...], G, allow, ctx.ratios, ctx.maxq, f=ctx.fs,
                                g=_group(s, var.shape[-2]), clip=s.awq_clip)
            _store(var, report, f"{prefix}/ffn/{name}#*", out, s, ctx)
        report.expert_matrices += 3 * moe.n_experts


def quantize_block_awq(block, inputs: dict[str, jax.Array], positions: jax.Array, s, report, prefix: str,
                       experts=None) -> None:
    """AWQ of one Block in place (steps 1-5 of the module docstring)."""
    bs = search_block_scales(block, inputs, positions, s, experts)
    fold_block(block, bs)
    quantize_folded_block(block, inputs, bs, s, report, prefix, experts)


def _expert_down_scales(moe, experts, s, ctx: _Ctx) -> jax.Array:
    """s_e [E, H] for each routed expert's up -> down pair (1 where the expert lacks calibration tokens)."""
    w_down = moe.w_down[...].astype(jnp.float32)
    g = _group(s, w_down.shape[-2])
    w_mean = jax.vmap(lambda w: weight_mean([w], g))(w_down) if s.awq_duo_scaling else None
    s_e = best_scales(w_down, experts.gram_hidden, experts.mean_hidden, w_mean, ctx.alphas, ctx.maxq,
                      f=ctx.fs, g=g)
    return jnp.where(experts.ok_hidden[:, None], s_e, 1.0)


def quantize_head_awq(model, x: jax.Array, s, report) -> None:
    """AWQ of the output head on x = final_norm(h) (16-bit h): s folded into final_norm and into every MTP
    module's out_norm (they feed the same head), the head clipped and quantized."""
    ctx = _context(s)
    head = model.lm_head
    G = gram(x)
    grp = ScaleGroup("head", ("lm_head",), "head", "final_norm")
    scale = _search_group(model, grp, x, G, None, s, ctx)
    mtp_norms = [layer.out_norm for layer in model.mtp.layers] if model.mtp is not None else []
    fold(model, grp, scale, extra_norms=mtp_norms)
    out = clip_quantize(head.kernel[...], G / _outer(scale), jnp.ones((), bool), ctx.ratios, ctx.maxq, f=ctx.fs,
                        g=_group(s, head.kernel.shape[0]), clip=s.awq_clip)
    _store(head.kernel, report, "lm_head/kernel", out, s, ctx)
