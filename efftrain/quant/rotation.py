"""Rotations of the residual stream folded into the weights: QuaRot (Ashkboos et al. 2024, arXiv 2404.00456
§4) with a randomized Hadamard matrix, or a random orthogonal one (the starting point SpinQuant, Liu et al.
2024, arXiv 2405.16406, then learns). Exact in 16-bit: the rotated model computes the same function (up
to float rounding; tested), but its Linear inputs and weights lose their outlier channels, which is what
the following quantizers (weights: efftrain.quant.apply; activations: efftrain.quant.activations) see.

Why it is exact. Every block reads the residual stream x [.., D] through an RMSNorm and writes back by
adding a Linear's output. For an orthogonal Q [D, D] (QᵀQ = I) and a *unit-scale* RMSNorm,

    rms(x Q) = rms(x)   so   RMSNorm₁(x Q) = RMSNorm₁(x) Q,

so if the whole residual stream is carried rotated, x̃ = x Q, each reader sees its old input times Q and
each writer must add its old output times Q:

    1. fold every norm that feeds the residual readers into the readers' rows, W ← diag(γ) W, γ ← 1
       (RMSNorm(x)·γ @ W = RMSNorm₁(x) @ diag(γ) W, exact):
         attn_norm  -> q, k, v            (MLA: q or q_down, and kv_down)
         ffn_norm   -> MLP gate, up        (MoE: the router kernel, every routed expert's w_gate/w_up
                                            [E, D, H] and the shared experts' gate/up)
         final_norm -> the output head
       (the norms inside MLA, q_norm and kv_norm, act on latents, not on the residual stream: untouched);
    2. embedding rows E ← E Q (the stream starts rotated);
       readers W ← Qᵀ W (so RMSNorm₁(x Q) Qᵀ W = RMSNorm₁(x) W), the head too;
       writers W ← W Q: attention o, MLP down, routed experts' w_down [E, H, D], shared experts' down.
    The router's logits, hence the routing, are unchanged.

Q (`rotation_matrix`), built in float64 with numpy from `seed`, applied in float32 (matmul precision
HIGHEST) and cast back to the parameter dtype:
    hadamard    Q = diag(±1) · H_D / sqrt(D), H_D the Sylvester Hadamard matrix, when D is a power of two;
                otherwise D = 2^k·m with m odd and Q = diag(±1) · (H_{2^k}/sqrt(2^k) ⊗ R_m), R_m a random
                orthogonal m×m matrix (e.g. 384 = 128·3); still exactly orthogonal, dense and a Hadamard
                transform on each stride. (QuaRot instead keeps a table of Hadamard matrices of orders 12,
                20, 28, ...; the kron with a random orthogonal factor needs no table.)
    orthogonal  Q = the QR factor of a standard Gaussian matrix with signs fixed (Q·diag(sign(diag R))), a
                Haar-random orthogonal matrix (Mezzadri 2007).

Values (`rotate_values=True`, QuaRot's per-head rotation of V and W_o's rows): per attention head an
orthogonal R_h [d_v, d_v] of the same kind on V's output columns and the matching rows of o,
    v_h ← v_h R_h,  o_rows(h) ← R_hᵀ o_rows(h),
exact since a head's output is a convex combination of its values (Σ_j p_j v_j R_h) R_hᵀ = Σ_j p_j v_j.
MHA/GQA: one R per kv head, applied to the o rows of every query head that reads it (query head i reads
kv head i // (n_heads / n_kv_heads)). MLA: the v columns of kv_up per head (W_uv,i) and o's rows. The
cached latent c_kv itself is not rotated (it could be, exactly, by folding kv_norm's scale into kv_up's
rows: not done here).

Tied embeddings: the tied head reads Eᵀ, but after the fold it needs Qᵀ diag(γ_final) Eᵀ while the
embedding needs E Q: one matrix cannot be both unless γ_final is constant. So `rotate_model` unties the
head: it adds `model.lm_head`, a Linear holding the rotated copy (the Transformer uses lm_head whenever it
is set; the model's graphdef changes accordingly) and records `tie_embeddings=False` in `model.cfg`; the copy is an extra V×D parameter matrix
(counted by efftrain.quant.apply.count_bytes at 16 bits, as a deployment of the rotated model would store
it). `RotationReport.untied_head` says so.

MTP modules are left unrotated. They cannot follow exactly: they share the main model's embedding (now
rotated) and head (now carrying final_norm's γ), while their own out_norm has another γ, so their outputs
are no longer meaningful after `rotate_model` (they are excluded from PTQ evaluation; `mtp_acceptance` of a
rotated model means nothing).

`outlier_ratio(x)` measures what the rotation is for: the mean over tokens of max_j |x_j| / rms(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from efftrain.model.layers import Linear, fp8_for
from efftrain.model.mla import MLAttention
from efftrain.quant.awq_model import _node, _var, scale_groups

ROTATIONS = ("hadamard", "orthogonal")
_HIGHEST = jax.lax.Precision.HIGHEST
RESIDUAL_NORMS = ("attn_norm", "ffn_norm")  # the block norms whose output the residual readers take


@dataclass(frozen=True)
class RotationReport:
    kind: str
    seed: int
    d_model: int
    construction: str  # how Q was built, e.g. "diag(±1)·(H_128 ⊗ R_3)"
    rotate_values: bool
    readers: int  # weight matrices (a stack of routed experts counts once) whose rows were rotated, head included
    writers: int  # weight matrices whose output columns were rotated
    folded_norms: int  # RMSNorm scales folded into the following weights and set to 1
    value_heads: int  # per-head value rotations (0 without rotate_values)
    untied_head: bool  # the tied head was replaced by an untied rotated copy
    mtp_rotated: bool = False  # MTP modules are never rotated (see the module docstring)


# ----------------------------------------------------------------------------------------------
# Orthogonal matrices (float64, numpy)
# ----------------------------------------------------------------------------------------------
def check_kind(kind: str) -> str:
    if kind not in ROTATIONS:
        raise ValueError(f"unknown rotation '{kind}' (choose from {', '.join(ROTATIONS)})")
    return kind


def sylvester_hadamard(n: int) -> np.ndarray:
    """The n×n Sylvester Hadamard matrix (entries ±1, H Hᵀ = n I), n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two order, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal n×n matrix: QR of a Gaussian, columns' signs fixed by diag(R)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.where(np.diagonal(r) < 0, -1.0, 1.0)[None, :]


def rotation_matrix(d: int, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(Q [d, d] float64 orthogonal, a description of its construction); see the module docstring."""
    check_kind(kind)
    if kind == "orthogonal":
        return random_orthogonal(d, rng), f"orthogonal({d})"
    power = d & -d  # largest power of two dividing d
    odd = d // power
    signs = rng.choice([-1.0, 1.0], size=d)
    h = sylvester_hadamard(power) / np.sqrt(power)
    if odd == 1:
        return signs[:, None] * h, f"diag(±1)·H_{d}/sqrt({d})"
    return signs[:, None] * np.kron(h, random_orthogonal(odd, rng)), f"diag(±1)·(H_{power} ⊗ R_{odd})"


# ----------------------------------------------------------------------------------------------
# Applying it
# ----------------------------------------------------------------------------------------------
def _set(var, value: jax.Array) -> None:
    var[...] = value.astype(var[...].dtype)


def _left(m: jax.Array, var) -> None:
    """var ← m @ var over the input rows (axis -2; stacked experts [E, in, out] broadcast)."""
    _set(var, jnp.matmul(m, var[...].astype(jnp.float32), precision=_HIGHEST))


def _right(var, m: jax.Array) -> None:
    """var ← var @ m over the output columns (the last axis)."""
    _set(var, jnp.matmul(var[...].astype(jnp.float32), m, precision=_HIGHEST))


def _residual_readers(block) -> list[tuple[str, tuple[str, ...]]]:
    """(norm path, paths of the Params that read its output) for the two residual norms of a block:
    the norm-preceded scale groups of AWQ (efftrain.quant.awq_model.scale_groups), router included."""
    return [(grp.prev, grp.weights + grp.also) for grp in scale_groups(block) if grp.prev in RESIDUAL_NORMS]


def _writers(block) -> list[str]:
    paths = ["attn/o"]
    if block.is_moe:
        paths.append("ffn/w_down")
        if block.ffn.shared is not None:
            paths.append("ffn/shared/down")
    else:
        paths.append("ffn/down")
    return paths


def _reader_transform(q_t: np.ndarray, scale) -> jax.Array:
    """Qᵀ diag(γ) in float64, as float32: folds the norm and rotates in one float32 matmul."""
    return jnp.asarray(q_t * np.asarray(scale, np.float64)[None, :], jnp.float32)


def _fold_and_rotate_readers(root, norm_path: str, readers: tuple[str, ...], q_t: np.ndarray) -> int:
    norm = _node(root, norm_path)
    m = _reader_transform(q_t, jax.device_get(norm.scale[...]))
    for path in readers:
        _left(m, _var(root, path))
    _set(norm.scale, jnp.ones_like(norm.scale[...], jnp.float32))
    return len(readers)


def _untie_head(model) -> None:
    """Replace the tied head by an untied Linear holding Eᵀ (the rotation is applied afterwards)."""
    cfg = model.cfg
    fp8 = fp8_for(getattr(model.blocks[0].attn.o, "fp8", None), "output_head")
    head = Linear(cfg.d_model, cfg.vocab_size, cfg=cfg, rngs=nnx.Rngs(params=0), fp8=fp8, fp8_role="output_head")
    _set(head.kernel, model.embed.embedding[...].T)
    model.lm_head = nnx.data(head)  # was None, a static attribute: now a submodule
    model.cfg = cfg.model_copy(update={"tie_embeddings": False})


def _value_rotations(attn, kind: str, rng: np.random.Generator) -> int:
    """Per-head rotation of the values and the matching rows of o (module docstring); returns the heads."""
    if isinstance(attn, MLAttention):
        n, d_v, per_head, offset = attn.n_heads, attn.v_dim, attn.nope_dim + attn.v_dim, attn.nope_dim
        v_var, kv_of = attn.kv_up.kernel, np.arange(attn.n_heads)
    else:
        n, d_v, per_head, offset = attn.n_kv, attn.head_dim, attn.head_dim, 0
        v_var, kv_of = attn.v.kernel, np.arange(attn.n_heads) // (attn.n_heads // attn.n_kv)
    rs = [rotation_matrix(d_v, kind, rng)[0] for _ in range(n)]
    cols = np.eye(v_var[...].shape[-1])  # block-diagonal column rotation of the v output columns
    for h, r in enumerate(rs):
        s = h * per_head + offset
        cols[s:s + d_v, s:s + d_v] = r
    _right(v_var, jnp.asarray(cols, jnp.float32))
    rows = np.zeros((attn.o.kernel[...].shape[0],) * 2)  # o rows of query head i get R_{kv(i)}ᵀ
    for i, h in enumerate(kv_of):
        rows[i * d_v:(i + 1) * d_v, i * d_v:(i + 1) * d_v] = rs[h].T
    _left(jnp.asarray(rows, jnp.float32), attn.o.kernel)
    return n


def rotate_model(model, kind: str, seed: int, rotate_values: bool = False) -> RotationReport:
    """Rotate `model` (a 16-bit efftrain Transformer) in place by a random orthogonal Q of `kind`
    ('hadamard' | 'orthogonal') drawn from `seed`; the function is unchanged (module docstring)."""
    check_kind(kind)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"rotation seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(int(seed))
    d = model.cfg.d_model
    q, construction = rotation_matrix(d, kind, rng)
    q_t, q32 = q.T, jnp.asarray(q, jnp.float32)
    readers = writers = norms = heads = 0
    for block in model.blocks:
        for norm_path, paths in _residual_readers(block):
            readers += _fold_and_rotate_readers(block, norm_path, paths, q_t)
            norms += 1
        for path in _writers(block):
            _right(_var(block, path), q32)
            writers += 1
        if rotate_values:
            heads += _value_rotations(block.attn, kind, rng)
    untied = model.lm_head is None
    if untied:
        _untie_head(model)
    readers += _fold_and_rotate_readers(model, "final_norm", ("lm_head/kernel",), q_t)
    norms += 1
    _right(model.embed.embedding, q32)
    return RotationReport(kind=kind, seed=int(seed), d_model=d, construction=construction,
                          rotate_values=bool(rotate_values), readers=readers, writers=writers,
                          folded_norms=norms, value_heads=heads, untied_head=untied)


def outlier_ratio(x: jax.Array) -> float:
    """Mean over tokens of max_j |x_j| / rms(x) for x [..., channels] (sqrt(channels) for a one-hot
    outlier, about sqrt(2 ln channels) for Gaussian x)."""
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    rms = jnp.sqrt(jnp.mean(x * x, axis=-1))
    return float(jnp.mean(jnp.max(jnp.abs(x), axis=-1) / jnp.maximum(rms, 1e-30)))
