"""What an efftrain model is in transformers' terms, and back: configs, refusals, weight names, RoPE rows.

Numpy only (no JAX, torch or transformers), so every rule here is a plain function of a ModelConfig or a
config.json dict. docs/HF.md has the same tables in prose.

Architectures (transformers >= 5.24, whose modeling code these rules were read from):
  * MHA / GQA + SwiGLU MLP                      -> LlamaForCausalLM
  * MLA (+ SwiGLU MLP or DeepSeekMoE layers)     -> DeepseekV3ForCausalLM
  * MHA + DeepSeekMoE                           -> refused: DeepseekV3 has only MLA, Llama no MoE.

Weights: an efftrain Linear kernel is [in, out] (y = x @ kernel), an HF nn.Linear weight [out, in]
(y = x @ weight.T): every Linear is transposed. Routed experts, stacked [E, D, H] / [E, H, D] in efftrain,
are one [H, D] / [D, H] tensor per expert in HF's files (`mlp.experts.{e}.gate_proj.weight`: the layout
DeepSeek-V3 ships and transformers converts on load; the fused `gate_up_proj` layout of transformers 5 is
read too).

RoPE. efftrain's `apply_rope` rotates the pairs (x[i], x[i + d/2]) and writes them back in place: the
"half" layout, which is exactly HF's `rotate_half` (`q * cos + rotate_half(q) * sin`). Llama therefore
needs no permutation. DeepseekV3 with `rope_interleave: true` (its default, DeepSeek's own layout) instead
reads the rotary dims as interleaved pairs (x[2i], x[2i+1]) and outputs them de-interleaved
[x_even·cos − x_odd·sin, x_odd·cos + x_even·sin]. With HF rotary row 2i = efftrain row i and row 2i+1 =
efftrain row i + d/2 (`rope_pair_permutation`) HF's x_even/x_odd are efftrain's two halves, so the rotated
outputs are the same numbers in the same order, for q and k alike: the rows of the RoPE part of each
query head (q_proj / q_b_proj) and the shared RoPE key rows (the last qk_rope_head_dim rows of
kv_a_proj_with_mqa) are permuted on export and permuted back on import (`rope_interleave: false` takes
the rows as they are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from efftrain.config import ModelConfig
from efftrain.hf import HFError

LLAMA = "LlamaForCausalLM"
DEEPSEEK_V3 = "DeepseekV3ForCausalLM"
MODEL_TYPES = {LLAMA: "llama", DEEPSEEK_V3: "deepseek_v3"}
ARCH_OF_TYPE = {v: k for k, v in MODEL_TYPES.items()}
SUPPORTED = f"{LLAMA} (model_type llama) or {DEEPSEEK_V3} (model_type deepseek_v3)"
MIN_TRANSFORMERS = "5.24.0"  # the version whose Llama / DeepseekV3 code these rules follow (docs/HF.md)
# DeepseekV3Attention builds q_a_layernorm / kv_a_layernorm with DeepseekV3RMSNorm's default eps, not
# config.rms_norm_eps; efftrain's latent norms use model.norm_eps.
DEEPSEEK_LATENT_NORM_EPS = 1e-6
# DeepseekV3Config defaults of the routing fields, for a config.json that omits them
DEEPSEEK_DEFAULTS = {"n_group": 8, "topk_group": 4, "n_routed_experts": 256, "num_experts_per_tok": 8,
                     "first_k_dense_replace": 3, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
                     "norm_topk_prob": True, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                     "qk_nope_head_dim": 128, "v_head_dim": 128, "moe_intermediate_size": 2048,
                     "rope_interleave": True, "num_nextn_predict_layers": 1}


# ---- efftrain -> HF: which architecture, or why none ---------------------------------------------
def architecture_for(m: ModelConfig) -> str:
    """LLAMA or DEEPSEEK_V3 for this model; HFError naming the field HF cannot represent and the nearest
    supported option."""
    if m.moe.enabled and m.attention != "mla":
        raise HFError("model.attention=mha with model.moe.enabled=true has no transformers equivalent "
                      f"({DEEPSEEK_V3}, the one with DeepSeekMoE, has only MLA attention; {LLAMA} has no MoE); "
                      "nearest supported: model.attention=mla, or model.moe.enabled=false")
    if m.attention == "mha":
        if m.d_model % m.n_heads:
            raise HFError(f"model.d_model ({m.d_model}) is not divisible by model.n_heads ({m.n_heads}): LlamaConfig "
                          "requires hidden_size % num_attention_heads == 0; nearest supported: a d_model that "
                          "n_heads divides (head_dim may still differ from d_model / n_heads)")
        return LLAMA
    if not math.isclose(m.norm_eps, DEEPSEEK_LATENT_NORM_EPS, rel_tol=1e-9):
        raise HFError(f"model.norm_eps ({m.norm_eps:g}) with model.attention=mla: {DEEPSEEK_V3} normalizes the "
                      f"MLA latents (kv_a_layernorm, q_a_layernorm) with eps {DEEPSEEK_LATENT_NORM_EPS:g} whatever "
                      f"rms_norm_eps says; nearest supported: model.norm_eps={DEEPSEEK_LATENT_NORM_EPS:g}")
    if m.moe.enabled:
        if m.moe.score_func != "sigmoid":
            raise HFError(f"model.moe.score_func={m.moe.score_func}: {DEEPSEEK_V3}'s router (DeepseekV3TopkRouter) "
                          "scores experts with a sigmoid only; nearest supported: model.moe.score_func=sigmoid")
        if m.moe.num_routed_experts < 2:
            raise HFError(f"model.moe.num_routed_experts ({m.moe.num_routed_experts}): {DEEPSEEK_V3}'s router "
                          "ranks groups by their top-2 experts and needs at least 2; nearest supported: 2")
    return DEEPSEEK_V3


def export_notes(m: ModelConfig, fp8_enabled: bool) -> list[str]:
    """What the export leaves out or computes differently (recorded in config.json's efftrain metadata)."""
    notes = []
    if m.mtp.depth:
        notes.append(f"mtp: the {m.mtp.depth} multi-token-prediction module(s) (model.mtp.depth) are not exported: "
                     f"{DEEPSEEK_V3} and {LLAMA} in transformers have no MTP modules")
    if m.moe.enabled and m.moe.dispatch == "capacity":
        notes.append("model.moe.dispatch=capacity: HF's MoE never drops a token; where efftrain dropped tokens "
                     "over capacity the two differ")
    if fp8_enabled:
        notes.append("fp8.enabled: trained with simulated FP8 GEMMs; the exported weights are the fp32 masters "
                     "and HF computes in the dtype it loads them in")
    return notes


def is_moe_layer(m: ModelConfig, layer: int) -> bool:
    return m.moe.enabled and layer >= m.moe.first_dense_layers


def hf_config(m: ModelConfig, arch: str, *, dtype: str, token_ids: dict[str, int | None],
              max_position_embeddings: int, rope_interleave: bool = True) -> dict[str, Any]:
    """config.json for `arch` (architecture_for(m)); token_ids: bos_token_id, eos_token_id, pad_token_id."""
    rope = {"rope_type": "default", "rope_theta": float(m.rope_theta)}
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch],
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.mlp_hidden,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": m.norm_eps,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta / rope_scaling
        "rope_parameters": rope, "rope_theta": float(m.rope_theta), "rope_scaling": None,
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std, "use_cache": True, "pretraining_tp": 1,
        "dtype": dtype, "torch_dtype": dtype, **token_ids,
    }
    if arch == LLAMA:
        out.update(num_key_value_heads=m.resolved_kv_heads, head_dim=m.resolved_head_dim, mlp_bias=False)
        return out
    a, e = m.mla, m.moe
    out.update(
        num_key_value_heads=m.n_heads,  # MLA: every head has its own keys (HF repeats none)
        q_lora_rank=a.q_lora_rank or None, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim,
        qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, head_dim=a.qk_rope_head_dim,
        qk_head_dim=a.qk_nope_head_dim + a.qk_rope_head_dim, rope_interleave=rope_interleave,
        num_nextn_predict_layers=0, n_group=1, topk_group=1, output_router_logits=False,
    )
    if e.enabled:
        out.update(n_routed_experts=e.num_routed_experts, num_experts_per_tok=e.top_k,
                   n_shared_experts=e.num_shared_experts, moe_intermediate_size=e.expert_hidden,
                   first_k_dense_replace=e.first_dense_layers, routed_scaling_factor=float(e.routed_scaling),
                   norm_topk_prob=e.normalize_gates,
                   # DeepSeek's own config keys (its modeling code and other runtimes read them)
                   scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    else:  # no MoE layer: every layer is below first_k_dense_replace; the expert fields are unused
        out.update(n_routed_experts=1, num_experts_per_tok=1, n_shared_experts=0,
                   moe_intermediate_size=m.mlp_hidden, first_k_dense_replace=m.n_layers,
                   routed_scaling_factor=1.0, norm_topk_prob=True)
    return out


# ---- HF -> efftrain: the model config, or why not -------------------------------------------------
def _get(hf: dict, key: str, default: Any = None, *, required: bool = False) -> Any:
    if key not in hf or hf[key] is None:
        if required:
            raise HFError(f"config.json lacks {key}")
        return default
    return hf[key]


def architecture_of(hf: dict) -> str:
    """LLAMA or DEEPSEEK_V3 from config.json's architectures / model_type; HFError otherwise."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if isinstance(archs, list) and len(archs) == 1 and archs[0] in MODEL_TYPES:
        if model_type not in (None, MODEL_TYPES[archs[0]]):
            raise HFError(f"config.json: architectures {archs} but model_type '{model_type}'; supported: {SUPPORTED}")
        return archs[0]
    if archs:
        raise HFError(f"config.json: architectures {archs} is not supported; supported: {SUPPORTED}")
    if model_type in ARCH_OF_TYPE:
        return ARCH_OF_TYPE[model_type]
    raise HFError(f"config.json: model_type '{model_type}' is not supported; supported: {SUPPORTED}")


def _rope_theta(hf: dict) -> float:
    """rope_theta from rope_parameters (transformers 5) or the top level (4.x); HFError for scaled RoPE."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    if scaling:
        raise HFError(f"config.json: rope_scaling {json_short(scaling)}: efftrain implements plain RoPE only; "
                      "nearest supported: rope_scaling null (rope_type default)")
    if not isinstance(params, dict):
        raise HFError(f"config.json: rope_parameters {json_short(params)} is not a mapping")
    if params.get("rope_type", "default") != "default" or {"factor", "original_max_position_embeddings"} & set(params):
        raise HFError(f"config.json: rope_parameters {json_short(params)}: efftrain implements plain RoPE only; "
                      "nearest supported: rope_type default without scaling")
    prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise HFError(f"config.json: partial_rotary_factor {prf}: efftrain rotates every head dim; nearest "
                      "supported: 1.0")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def json_short(value: Any) -> str:
    import json

    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


def efftrain_model(hf: dict) -> tuple[str, dict[str, Any], list[str]]:
    """(architecture, efftrain `model` section as a dict, notes) for a config.json; HFError naming the
    config.json field efftrain cannot represent."""
    arch = architecture_of(hf)
    if hf.get("quantization_config"):
        method = (hf["quantization_config"] or {}).get("quant_method", "?")
        raise HFError(f"config.json: quantization_config (quant_method {method}): efftrain imports float weights "
                      "only; nearest supported: the unquantized (bf16/fp16/fp32) checkpoint")
    act = _get(hf, "hidden_act", "silu")
    if act != "silu":
        raise HFError(f"config.json: hidden_act '{act}': efftrain's MLPs are SwiGLU; nearest supported: silu")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFError(f"config.json: {key} true: efftrain's Linears have no bias; nearest supported: {key} false")
    for key in ("sliding_window", "use_sliding_window", "layer_types"):
        value = hf.get(key)
        if value and not (key == "layer_types" and all(t == "full_attention" for t in value)):
            raise HFError(f"config.json: {key} {json_short(value)}: efftrain's attention is full causal attention; "
                          f"nearest supported: {key} null")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        pass  # a compute split of the same matmuls in transformers 4.x: the weights mean the same
    d, heads = _get(hf, "hidden_size", required=True), _get(hf, "num_attention_heads", required=True)
    model: dict[str, Any] = {
        "vocab_size": _get(hf, "vocab_size", required=True), "d_model": d,
        "n_layers": _get(hf, "num_hidden_layers", required=True), "n_heads": heads,
        "mlp_hidden": _get(hf, "intermediate_size", required=True), "rope_theta": _rope_theta(hf),
        "norm_eps": float(_get(hf, "rms_norm_eps", 1e-6)), "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "param_dtype": "float32",
    }
    notes: list[str] = []
    if arch == LLAMA:
        kv = _get(hf, "num_key_value_heads", heads)
        head_dim = _get(hf, "head_dim", d // heads if d % heads == 0 else None, required=d % heads != 0)
        model["n_kv_heads"] = None if kv == heads else kv
        model["head_dim"] = None if (d % heads == 0 and head_dim == d // heads) else head_dim
        model["attention"] = "mha"
        return arch, model, notes

    g = lambda key: _get(hf, key, DEEPSEEK_DEFAULTS.get(key))  # noqa: E731
    kv = _get(hf, "num_key_value_heads", heads)
    if kv != heads:
        raise HFError(f"config.json: num_key_value_heads ({kv}) != num_attention_heads ({heads}) in an MLA model: "
                      "efftrain's MLA gives every head its own keys; nearest supported: num_key_value_heads = "
                      f"{heads}")
    if not math.isclose(model["norm_eps"], DEEPSEEK_LATENT_NORM_EPS, rel_tol=1e-9):
        raise HFError(f"config.json: rms_norm_eps ({model['norm_eps']:g}): {DEEPSEEK_V3} normalizes the MLA latents "
                      f"with eps {DEEPSEEK_LATENT_NORM_EPS:g} and efftrain uses one norm_eps for every norm; nearest "
                      f"supported: rms_norm_eps {DEEPSEEK_LATENT_NORM_EPS:g}")
    model["attention"] = "mla"
    model["mla"] = {"q_lora_rank": g("q_lora_rank") or 0, "kv_lora_rank": g("kv_lora_rank"),
                    "qk_nope_head_dim": g("qk_nope_head_dim"), "qk_rope_head_dim": g("qk_rope_head_dim"),
                    "v_head_dim": g("v_head_dim")}
    n_layers, first_dense, experts = model["n_layers"], g("first_k_dense_replace"), g("n_routed_experts")
    if experts and first_dense < n_layers:
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise HFError(f"config.json: scoring_func '{hf['scoring_func']}': {DEEPSEEK_V3} in transformers routes "
                          "with a sigmoid whatever this says, so the checkpoint would not mean what it was trained "
                          "as; nearest supported: scoring_func sigmoid")
        if hf.get("topk_method", "noaux_tc") != "noaux_tc":
            raise HFError(f"config.json: topk_method '{hf['topk_method']}': efftrain (like {DEEPSEEK_V3}) selects "
                          "experts by score + e_score_correction_bias; nearest supported: topk_method noaux_tc")
        if hf.get("moe_layer_freq", 1) != 1:
            raise HFError(f"config.json: moe_layer_freq ({hf['moe_layer_freq']}): efftrain's MoE layers are every "
                          "layer from first_k_dense_replace on; nearest supported: moe_layer_freq 1")
        n_group, topk_group = g("n_group") or 1, g("topk_group") or 1
        if topk_group != n_group:
            raise HFError(f"config.json: n_group ({n_group}) / topk_group ({topk_group}): group-limited routing "
                          "(only experts of the top topk_group groups) is not in efftrain; nearest supported: "
                          f"topk_group = n_group ({n_group}), or n_group = topk_group = 1")
        model["moe"] = {"enabled": True, "num_routed_experts": experts, "top_k": g("num_experts_per_tok"),
                        "num_shared_experts": g("n_shared_experts") or 0,
                        "expert_hidden": g("moe_intermediate_size"), "first_dense_layers": first_dense,
                        "score_func": "sigmoid", "normalize_gates": bool(g("norm_topk_prob")),
                        "routed_scaling": float(g("routed_scaling_factor")), "aux_free_bias": True,
                        "dispatch": "dropless"}
    mtp = g("num_nextn_predict_layers") or 0
    if mtp:
        notes.append(f"num_nextn_predict_layers {mtp}: MTP layers (model.layers.{n_layers}+) are not imported")
    return arch, model, notes


# ---- weights --------------------------------------------------------------------------------------
def rope_pair_permutation(dim: int) -> np.ndarray:
    """HF interleaved rotary row j <- efftrain row perm[j]: [0, d/2, 1, d/2 + 1, ...] (module docstring)."""
    half = dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


def head_rope_permutation(n_heads: int, nope: int, rope: int) -> np.ndarray:
    """Rows of a per-head [nope ; rope] query projection: the RoPE rows of each head permuted."""
    rows = np.arange(n_heads * (nope + rope)).reshape(n_heads, nope + rope)
    rows[:, nope:] = rows[:, nope:][:, rope_pair_permutation(rope)]
    return rows.reshape(-1)


def tail_rope_permutation(lead: int, rope: int) -> np.ndarray:
    """Rows of kv_a_proj_with_mqa: the latent rows as they are, the shared RoPE key rows permuted."""
    return np.concatenate([np.arange(lead), lead + rope_pair_permutation(rope)])


@dataclass(frozen=True)
class Entry:
    """One efftrain variable and the HF tensor(s) it is.

    kind: copy (same array), linear (kernel [in, out] <-> weight [out, in], rows of the weight permuted by
    `perm` if given), experts (stacked [E, a, b] <-> E tensors [b, a]), bias (router bias; zeros when the
    efftrain model has none), empty (zero-size shared-expert tensors HF expects when num_shared_experts = 0).
    """

    eff: str | None
    hf: tuple[str, ...]
    kind: str
    perm: np.ndarray | None = None
    shape: tuple[int, ...] | None = None  # bias / empty: the HF shape

    def hf_shapes(self, eff_shape: tuple[int, ...] | None) -> list[tuple[int, ...]]:
        if self.kind in ("bias", "empty"):
            return [self.shape] * len(self.hf)
        if self.kind == "copy":
            return [tuple(eff_shape)]
        if self.kind == "linear":
            return [tuple(eff_shape[::-1])]
        return [tuple(eff_shape[1:][::-1])] * eff_shape[0]  # experts

    def to_hf(self, arr: np.ndarray | None) -> list[np.ndarray]:
        if self.kind == "empty":
            return [np.zeros(self.shape, np.float32)]
        if self.kind == "bias":
            return [np.zeros(self.shape, np.float32) if arr is None else np.asarray(arr)]
        if self.kind == "copy":
            return [np.ascontiguousarray(arr)]
        if self.kind == "linear":
            w = np.asarray(arr).T
            return [np.ascontiguousarray(w if self.perm is None else w[self.perm])]
        return [np.ascontiguousarray(np.asarray(arr)[e].T) for e in range(arr.shape[0])]

    def from_hf(self, arrs: list[np.ndarray]) -> np.ndarray:
        if self.kind in ("copy", "bias"):
            return arrs[0]
        if self.kind == "linear":
            w = arrs[0] if self.perm is None else arrs[0][np.argsort(self.perm)]
            return np.ascontiguousarray(w.T)
        return np.ascontiguousarray(np.stack([a.T for a in arrs]))  # experts


def entries(m: ModelConfig, rope_interleave: bool = True) -> list[Entry]:
    """The weight-name table of the main model (MTP modules excluded) for architecture_for(m)."""
    out: list[Entry] = []

    def add(eff, hf, kind="copy", perm=None):
        out.append(Entry(eff, (hf,), kind, perm))

    add("embed/embedding", "model.embed_tokens.weight")
    mla = m.attention == "mla"
    for i in range(m.n_layers):
        b, p = f"blocks/{i}", f"model.layers.{i}"
        add(f"{b}/attn_norm/scale", f"{p}.input_layernorm.weight")
        if not mla:
            for x in "qkvo":
                add(f"{b}/attn/{x}/kernel", f"{p}.self_attn.{x}_proj.weight", "linear")
        else:
            a = m.mla
            q_perm = head_rope_permutation(m.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim) if rope_interleave else None
            kv_perm = tail_rope_permutation(a.kv_lora_rank, a.qk_rope_head_dim) if rope_interleave else None
            if a.q_lora_rank:
                add(f"{b}/attn/q_down/kernel", f"{p}.self_attn.q_a_proj.weight", "linear")
                add(f"{b}/attn/q_norm/scale", f"{p}.self_attn.q_a_layernorm.weight")
                add(f"{b}/attn/q_up/kernel", f"{p}.self_attn.q_b_proj.weight", "linear", q_perm)
            else:
                add(f"{b}/attn/q/kernel", f"{p}.self_attn.q_proj.weight", "linear", q_perm)
            add(f"{b}/attn/kv_down/kernel", f"{p}.self_attn.kv_a_proj_with_mqa.weight", "linear", kv_perm)
            add(f"{b}/attn/kv_norm/scale", f"{p}.self_attn.kv_a_layernorm.weight")
            add(f"{b}/attn/kv_up/kernel", f"{p}.self_attn.kv_b_proj.weight", "linear")
            add(f"{b}/attn/o/kernel", f"{p}.self_attn.o_proj.weight", "linear")
        add(f"{b}/ffn_norm/scale", f"{p}.post_attention_layernorm.weight")
        if is_moe_layer(m, i):
            e = m.moe
            add(f"{b}/ffn/router/kernel", f"{p}.mlp.gate.weight", "linear")
            out.append(Entry(f"{b}/ffn/router/bias", (f"{p}.mlp.gate.e_score_correction_bias",), "bias",
                             shape=(e.num_routed_experts,)))
            for x, name in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                out.append(Entry(f"{b}/ffn/{x}", tuple(f"{p}.mlp.experts.{j}.{name}.weight"
                                                      for j in range(e.num_routed_experts)), "experts"))
            if e.num_shared_experts:
                for x in ("gate", "up", "down"):
                    add(f"{b}/ffn/shared/{x}/kernel", f"{p}.mlp.shared_experts.{x}_proj.weight", "linear")
            else:
                for x, shape in (("gate", (0, m.d_model)), ("up", (0, m.d_model)), ("down", (m.d_model, 0))):
                    out.append(Entry(None, (f"{p}.mlp.shared_experts.{x}_proj.weight",), "empty", shape=shape))
        else:
            for x in ("gate", "up", "down"):
                add(f"{b}/ffn/{x}/kernel", f"{p}.mlp.{x}_proj.weight", "linear")
    add("final_norm/scale", "model.norm.weight")
    if not m.tie_embeddings:
        add("lm_head/kernel", "lm_head.weight", "linear")
    return out


def to_hf(m: ModelConfig, flat: dict[str, np.ndarray], rope_interleave: bool = True) -> dict[str, np.ndarray]:
    """HF tensors of an efftrain model's variables (flat: "a/b/c" path -> array; MTP modules skipped).
    HFError if a variable has no HF counterpart (so nothing is ever dropped silently)."""
    out, used = {}, set()
    for entry in entries(m, rope_interleave):
        arr = flat.get(entry.eff) if entry.eff else None
        if arr is None and entry.kind not in ("bias", "empty"):
            raise HFError(f"internal: the model has no variable {entry.eff} for {entry.hf[0]}")
        used.add(entry.eff)
        out.update(zip(entry.hf, entry.to_hf(arr)))
    left = sorted(k for k in flat if k not in used and not k.startswith("mtp/"))
    if left:
        raise HFError(f"internal: efftrain variable(s) {', '.join(left[:3])} have no HF counterpart")
    return out


IGNORED_ON_IMPORT = "rotary_emb.inv_freq"


def from_hf(m: ModelConfig, eff_shapes: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]],
            read: Callable[[str], np.ndarray], rope_interleave: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    """(efftrain path -> array, notes) from HF tensors. `shapes`: every tensor in the files and its shape;
    `read(name)` loads one; `eff_shapes`: the efftrain model's variable shapes. HFError for a missing tensor,
    an unexpected one or a shape that does not fit the config."""
    out, notes, expected = {}, [], set()
    for entry in entries(m, rope_interleave):
        want = entry.hf_shapes(eff_shapes.get(entry.eff) if entry.eff else None)
        expected.update(entry.hf)
        present = [n in shapes for n in entry.hf]
        if entry.kind == "bias" and entry.eff not in eff_shapes:  # --set model.moe.aux_free_bias=false
            notes.append(f"{entry.hf[0]} not imported: the model has no router bias (model.moe.aux_free_bias)")
            continue
        if entry.kind == "empty" or (entry.kind == "bias" and not any(present)):
            if entry.kind == "bias":
                notes.append(f"{entry.hf[0]} missing: router bias set to zeros")
                out[entry.eff] = np.zeros(entry.shape, np.float32)
            continue
        for name, ok in zip(entry.hf, present):
            if not ok:
                raise HFError(f"the weights lack tensor {name}, which config.json implies (wrong config.json, or "
                              "an incomplete snapshot?)")
        for name, shape in zip(entry.hf, want):
            if tuple(shapes[name]) != tuple(shape):
                raise HFError(f"tensor {name} has shape {list(shapes[name])} but config.json implies {list(shape)} "
                              "(the config does not match the weights)")
        out[entry.eff] = entry.from_hf([read(n) for n in entry.hf])
    ignored = []
    for name in sorted(set(shapes) - expected):
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if (name.endswith(IGNORED_ON_IMPORT) or (name == "lm_head.weight" and m.tie_embeddings)
                or (layer is not None and layer.isdigit() and int(layer) >= m.n_layers)):
            ignored.append(name)
            continue
        raise HFError(f"unexpected tensor {name} (shape {list(shapes[name])}): not part of this config.json's model "
                      "(wrong config.json, or an option efftrain does not have?)")
    if ignored:
        notes.append(f"{len(ignored)} tensor(s) not imported (e.g. {ignored[0]})")
    return out, notes


def split_fused_experts(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, int, slice | None]]:
    """Per-expert names for transformers 5's fused expert tensors (mlp.experts.gate_up_proj [E, 2H, D],
    mlp.experts.down_proj [E, D, H]): {virtual name: (fused name, expert, row slice or None)}."""
    virtual = {}
    for name, shape in shapes.items():
        if name.endswith(".mlp.experts.gate_up_proj") and len(shape) == 3:
            base, h = name[: -len("gate_up_proj")], shape[1] // 2
            for e in range(shape[0]):
                virtual[f"{base}{e}.gate_proj.weight"] = (name, e, slice(0, h))
                virtual[f"{base}{e}.up_proj.weight"] = (name, e, slice(h, 2 * h))
        elif name.endswith(".mlp.experts.down_proj") and len(shape) == 3:
            base = name[: -len("down_proj")]
            for e in range(shape[0]):
                virtual[f"{base}{e}.down_proj.weight"] = (name, e, None)
    return virtual
