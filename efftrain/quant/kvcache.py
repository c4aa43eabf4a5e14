"""KV-cache quantization: int8 / int4 / FP8 of what attention caches for decoding, MHA against MLA.

What is cached per token and layer (the only tensors quantized here; queries, scores, softmax weights and
attention outputs stay in the compute dtype, and attention runs on the dequantized cache, as a kernel that
dequantizes cache tiles into 16-bit before its matmuls):
    MHA / GQA (attention.py)  k_t,j = RoPE(W_k h_t)_j and v_t,j = (W_v h_t)_j for every kv head j:
                              2·n_kv vectors of head_dim
    MLA (mla.py, DeepSeek-V2 arXiv 2405.04434 §2.1.2)  c_kv_t = RMSNorm(W_dkv h_t) [d_c] and the shared,
                              rotated k_rope_t = RoPE(W_kr h_t) [d_r]: two vectors, each with its own scale
                              (k_rope's range has nothing to do with the normalised latent's)
Granularity: `token` = one scale per cached vector (per (token, kv head) for MHA's K and V; per token over
the whole c_kv, and separately over k_rope, for MLA); `group` = one scale per `group` consecutive channels
of a vector (must divide head_dim, or d_c and d_r).

Grids, for a vector or group x of g channels (scales computed in float32, then rounded UP to the float16
grid, the stored format, by efftrain.quant.formats, so the rounding never clips; a zero vector stays 0).
The dequantized values come back in x's dtype (a bfloat16 model rounds them to bfloat16, as a kernel that
dequantizes into bfloat16 would):
    int, symmetric (default)  the project's symmetric int grid (quant/formats.py), all 2^b codes:
                  s = 2·max|x| / (2^b − 1),  q = clip(RNE(x/s) + 2^(b−1), 0, 2^b − 1),
                  x̂ = s·(q − 2^(b−1));
                  |x̂ − x| <= s/2 = max|x| / (2^b − 1) everywhere (+max|x| is clipped to (2^(b−1) − 1)·s,
                  also s/2 away)
    int, symmetric=False      min-max with an integer zero point z (the GPTQ reference grid, formats.py):
                  s = (max(x,0) − min(x,0)) / (2^b − 1), z = RNE(−min/s), x̂ = s·(clip(RNE(x/s) + z) − z),
                  also within s/2; one more float16 per scale
                  (KIVI, Liu et al. 2024, arXiv 2402.02750, quantizes K and V asymmetrically)
    fp8           E4M3 (fn, max 448) with the vector's / group's scale: s = max|x| / 448,
                  x̂ = s · cast_e4m3(x / s)  (efftrain.fp8.formats.cast_to_format: RNE, bit-exact with
                  ml_dtypes.float8_e4m3fn), as DeepSeek-V3's 1×128 activation tiles (arXiv 2412.19437 §3.3.2)
Out of scope: KIVI's per-channel keys (a key's scale then depends on other tokens, so a cache entry is not
final when written: KIVI keeps a full-precision window of recent tokens and quantizes keys in chunks
along the sequence) and KVQuant's pre-RoPE keys (Hooper et al. 2024, arXiv 2401.18079).

Evaluation "as decoding would see it". Decoding writes token t's entry into the cache once, then the
queries of t and of every later token read it (MLAttention.decode appends before it attends, so a token
also reads its own quantized entry). With per-token or per-group scales, the entry Q(e_t) is a function of
e_t alone, so the cache after any sequence of prefill and decode steps holds exactly Q(e_0), ..., Q(e_t),
whatever the order of writes. Causal attention in the parallel forward lets query t read entries 0..t; if
those entries are fake-quantized token by token, it reads the same Q(e_0..e_t) as decoding step t reads
from its cache. So fake-quantizing k (after RoPE) and v (MHA), or c_kv and k_rope in `latents()` (MLA,
used by both `__call__` and the absorbed `decode`), in the parallel forward equals decoding every token
against a quantized cache, up to float rounding (tests/test_kv_quant.py: an MHA decode loop over a stored
quantized cache, MLA's absorbed decode against its naive forward). This is the pure-decode view: every
query sees a quantized cache, including its own entry; servers that attend a prompt's prefill on fresh
16-bit keys lose a little less.

KV bytes per token (`kv_bytes_per_token`): codes (bits/8 per element) + scales, charged as float16 (2 bytes;
+2 for an asymmetric zero point, as the weight quantizers charge theirs) per vector or group, summed over
all layers; a 16-bit cache (kvq None) is 2 bytes per element.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from efftrain.config import ModelConfig
from efftrain.fp8.formats import cast_to_format, float_format
from efftrain.model.block import attention_class, kv_cache_bytes_per_token
from efftrain.quant.formats import _scale_to_f16_up, decode, encode, group_params, make_format

KINDS = ("int8", "int4", "fp8")
GRANULARITIES = ("token", "group")
SCALE_BYTES = 2  # scales (and asymmetric zero points) are stored as float16
CACHE_BYTES_16 = 2  # bytes per element of an unquantized (16-bit) cache
_E4M3 = float_format("e4m3")


class KVCodes(NamedTuple):
    """One quantized cache tensor seen as groups: codes [..., n_groups, g] (int: integer codes as int32;
    fp8: the E4M3 values as float32), scale [..., n_groups, 1] float32 (on the float16 grid), zero
    [..., n_groups, 1] float32 (int; 2^(b-1) when symmetric) or None (fp8)."""

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None


@dataclass(frozen=True)
class KVQuant:
    """Fake quantization of cached K/V (or MLA c_kv / k_rope) vectors, applied over the last axis.

    kind 'int8' | 'int4' | 'fp8' (E4M3); granularity 'token' (one scale per cached vector) or 'group'
    (`group` consecutive channels per scale); symmetric False = int min-max with a zero point.
    Frozen and hashable: a static attribute of the attention modules (part of the nnx graphdef).
    """

    kind: Literal["int8", "int4", "fp8"]
    granularity: Literal["token", "group"] = "token"
    group: int = 64
    symmetric: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown KV-cache quantization kind {self.kind!r}; expected one of {KINDS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown KV-cache scale granularity {self.granularity!r}; "
                             f"expected one of {GRANULARITIES}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"KV-cache group size must be a positive int, got {self.group!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.kind == "fp8" and not self.symmetric:
            raise ValueError("kv fp8 is absmax-scaled E4M3: symmetric=False applies to int kinds only")

    @property
    def bits(self) -> int:
        return 4 if self.kind == "int4" else 8

    @property
    def label(self) -> str:
        """Row name part: 'kv-int8', 'kv-int4-g64', 'kv-fp8', 'kv-int4-g32-asym'."""
        parts = ["kv", self.kind]
        if self.granularity == "group":
            parts.append(f"g{self.group}")
        if not self.symmetric:
            parts.append("asym")
        return "-".join(parts)

    def group_size(self, dim: int, what: str = "cached vector") -> int:
        """Channels per scale for a vector of `dim`; ValueError if the group does not divide it."""
        if self.granularity == "token":
            return dim
        if dim % self.group:
            raise ValueError(f"{self.label}: group size {self.group} does not divide the {what} "
                             f"dimension {dim}")
        return self.group

    def bytes_per_vector(self, dim: int, what: str = "cached vector") -> float:
        """Stored bytes of one cached vector of `dim` elements: codes + float16 scales (+ zero points)."""
        n_scales = dim // self.group_size(dim, what)
        per_scale = SCALE_BYTES * (1 if self.symmetric else 2)
        return dim * self.bits / 8 + n_scales * per_scale

    def encode(self, x: jax.Array) -> KVCodes:
        """x [..., C] -> KVCodes of x in float32, grouped [..., C/g, g]."""
        dim = x.shape[-1]
        g = self.group_size(dim)
        xg = x.astype(jnp.float32).reshape(*x.shape[:-1], dim // g, g)
        if self.kind == "fp8":
            amax = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
            scale = jnp.where(amax > 0, _scale_to_f16_up(amax / jnp.float32(_E4M3.max)), jnp.float32(1.0))
            return KVCodes(cast_to_format(xg / scale, _E4M3), scale, None)
        fmt = make_format(self.bits, "int", self.symmetric)
        scale, zero = group_params(xg, fmt, axis=-1)
        return KVCodes(encode(xg, scale, zero, fmt), scale, zero)

    def decode(self, q: KVCodes, shape: tuple[int, ...], dtype) -> jax.Array:
        """Dequantize KVCodes back to `shape` and `dtype` (products in float32)."""
        if self.kind == "fp8":
            values = q.codes * q.scale
        else:
            values = decode(q.codes, q.scale, q.zero, make_format(self.bits, "int", self.symmetric))
        return values.reshape(shape).astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x rounded to the quantized cache's values over its last axis; same shape and dtype."""
        return self.decode(self.encode(x), x.shape, x.dtype)


# ---------------------------------------------------------------------------------------------------
# the model side


def cache_vectors(cfg: ModelConfig) -> tuple[tuple[str, int, int], ...]:
    """(name, count, dim) of the vectors one token caches in one layer, each quantized on its own."""
    if cfg.attention == "mla":
        vectors = (("c_kv", 1, cfg.mla.kv_lora_rank), ("k_rope", 1, cfg.mla.qk_rope_head_dim))
    else:
        vectors = (("k/v head", 2 * cfg.resolved_kv_heads, cfg.resolved_head_dim),)
    assert sum(n * d for _, n, d in vectors) == attention_class(cfg).cache_elements_per_token(cfg)
    return vectors


def check_kv_quant(cfg: ModelConfig, kvq: KVQuant | None) -> None:
    """ValueError unless kvq's groups divide every cached vector of cfg's attention."""
    if kvq is None:
        return
    if not isinstance(kvq, KVQuant):
        raise TypeError(f"expected a KVQuant or None, got {type(kvq).__name__}")
    for name, _, dim in cache_vectors(cfg):
        kvq.group_size(dim, f"{cfg.attention} {name}")


def set_kv_quant(model: nnx.Module, kvq: KVQuant | None) -> int:
    """Install kvq (None: a 16-bit cache) as `kv_quant` of every attention module in model.blocks;
    returns how many were set. Static attributes: re-split the model (nnx.split) afterwards."""
    count = 0
    for block in model.blocks:
        check_kv_quant(block.attn.cfg, kvq)
        block.attn.kv_quant = kvq
        count += 1
    return count


def kv_bytes_per_token_per_layer(cfg: ModelConfig, kvq: KVQuant | None) -> float:
    """Cache bytes one token costs in one layer: codes + float16 scales, or 2 bytes/element for None."""
    if kvq is None:
        return float(kv_cache_bytes_per_token(cfg, CACHE_BYTES_16))
    check_kv_quant(cfg, kvq)
    return float(sum(n * kvq.bytes_per_vector(d, f"{cfg.attention} {name}") for name, n, d in cache_vectors(cfg)))


def kv_bytes_per_token(cfg: ModelConfig, kvq: KVQuant | None) -> float:
    """Cache bytes per token summed over all n_layers layers (the MTP modules' caches not counted)."""
    return cfg.n_layers * kv_bytes_per_token_per_layer(cfg, kvq)
