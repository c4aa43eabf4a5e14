"""Typed, strict, nested configuration for efftrain.

A config is a tree of pydantic models. Every section rejects unknown keys and wrong types, and the
cross-field checks in `Config._check_compatible` reject impossible combinations *before* anything is
compiled, with a message naming the offending fields.

Sources, later wins:
  1. the defaults below,
  2. a YAML preset (`configs/NAME.yaml`) or a YAML file path; a preset may start from another with
     `base: OTHER_PRESET`,
  3. dotted overrides `--set model.d_model=256` (values parsed as YAML: `true`, `1e-3`, `[1, 2]`, `null`).

Techniques are plain scalars: `model.attention: mha|mla`, `model.moe.enabled`, `model.mtp.depth`,
`fp8.enabled`. A disabled technique adds no parameters and changes no numerics.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, field_validator,
                      model_serializer, model_validator)

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"

DType = Literal["float32", "bfloat16"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` / `3E5` as floats (YAML 1.1 wants `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", __import__("re").X),
    list("-+0123456789."))


def _construct_number(loader, node):
    """`2e6` is an int (token counts), `2.0e6` and `1e-3` are floats."""
    text = loader.construct_scalar(node)
    value = yaml.SafeLoader.construct_yaml_float(loader, node)
    if "." not in text and "e" in text.lower() and value == int(value) and abs(value) < 2**63:
        return int(value)
    return value


_Loader.add_constructor("tag:yaml.org,2002:float", _construct_number)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A configuration problem; the message names the field(s) and the problem."""


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` / `.nan` are rejected for every float field (a diverged run otherwise)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    # fields added after configs were first stored, with the value that keeps the older behaviour: left out
    # of the dump while they hold it, so that every older config keeps its hash (a grid's cell keys and run
    # directories) and its stored config.yaml
    OMITTED_AT: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler: SerializerFunctionWrapHandler):
        out = handler(self)
        if isinstance(out, dict):
            for name, value in self.OMITTED_AT.items():
                if name in out and out[name] == value:
                    out.pop(name)
        return out


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class MLAConfig(_Section):
    """Multi-head latent attention (DeepSeek-V2 §2.1, V3 §2.1.1). Used when model.attention == 'mla'."""

    q_lora_rank: int = Field(0, ge=0, description="rank of the query latent c_q; 0 = full-rank queries")
    kv_lora_rank: int = Field(64, ge=1, description="rank of the shared key/value latent c_kv")
    qk_nope_head_dim: int = Field(32, ge=1, description="per-head query/key dims without RoPE")
    qk_rope_head_dim: int = Field(16, ge=2, description="decoupled RoPE dims (key shared by all heads)")
    v_head_dim: int = Field(32, ge=1, description="per-head value dims")


class MoEConfig(_Section):
    """DeepSeekMoE (V3 §2.1.2). Replaces the MLP of layers >= first_dense_layers when enabled."""

    enabled: bool = False
    num_routed_experts: int = Field(8, ge=0)
    num_shared_experts: int = Field(1, ge=0)
    top_k: int = Field(2, ge=1)
    expert_hidden: int = Field(128, ge=1, description="intermediate size of one (fine-grained) expert")
    first_dense_layers: int = Field(1, ge=0, description="leading layers that keep a dense MLP")
    score_func: Literal["softmax", "sigmoid"] = "sigmoid"
    normalize_gates: bool = True
    routed_scaling: float = Field(1.0, gt=0)
    aux_free_bias: bool = True
    bias_update_rate: float = Field(0.001, ge=0, description="gamma of the aux-loss-free bias update")
    seq_aux_loss_weight: float = Field(1e-4, ge=0, description="alpha of the sequence-wise balance loss")
    switch_aux_loss_weight: float = Field(0.0, ge=0, description="classic switch-transformer aux loss")
    dispatch: Literal["dropless", "capacity"] = "dropless"
    capacity_factor: float = Field(1.25, gt=0)
    dropless_impl: Literal["tiles", "ragged"] = Field(
        "tiles", description="dropless kernel: padded tiles of batched matmuls (fast) or jax.lax.ragged_dot "
                             "(exact reference, slow on GPU)")
    tile_rows: int | None = Field(None, ge=1, description="rows per tile of the dropless tile path; None = auto")
    expert_exchange: Literal["gspmd", "all_to_all"] = Field(
        "gspmd", description="with train.mesh.expert > 1: gspmd = one global dispatch, XLA places it (default); "
                             "all_to_all = each device dispatches its own tokens to the experts' devices with "
                             "two all-to-alls per layer (efftrain/model/expert_parallel.py, docs/SCALING.md); "
                             "a no-op without an expert axis")
    OMITTED_AT: ClassVar[dict[str, Any]] = {"expert_exchange": "gspmd"}


class MTPConfig(_Section):
    """Multi-token prediction (V3 §2.2). depth 0 = off."""

    depth: int = Field(0, ge=0)
    loss_weight: float = Field(0.3, ge=0, description="lambda while tokens_seen < loss_weight_switch_tokens")
    loss_weight_after: float | None = Field(None, ge=0, description="lambda after the switch (V3: 0.1)")
    loss_weight_switch_tokens: int | None = Field(None, ge=0)


class ModelConfig(_Section):
    vocab_size: int = Field(8192, ge=16)
    d_model: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; None = n_heads")
    head_dim: int | None = Field(None, ge=2, description="None = d_model // n_heads")
    mlp_hidden: int = Field(688, ge=1, description="SwiGLU intermediate size of a dense MLP")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0, le=1.0, description="std of the normal weight init (above 1 is a typo)")
    param_dtype: DType = "float32"
    compute_dtype: DType = "bfloat16"
    attention: Literal["mha", "mla"] = "mha"
    attention_impl: Literal["auto", "xla", "cudnn", "pallas"] = Field(
        "auto", description="causal attention kernel: auto = cuDNN on GPUs (the Pallas kernel with "
        "train.deterministic), XLA elsewhere; pallas = Pallas' Triton flash attention (GPU)"
    )
    mla: MLAConfig = MLAConfig()
    moe: MoEConfig = MoEConfig()
    mtp: MTPConfig = MTPConfig()

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads


# ----------------------------------------------------------------------------------------------
# FP8 simulation
# ----------------------------------------------------------------------------------------------
class FP8Config(_Section):
    """Simulated FP8 GEMM numerics (V3 §3.3). See efftrain/fp8/ for the maths.

    The fields after `router` only choose kernels: the same numbers, bit for bit, except the accumulator
    model's last bits (Mosaic, Triton and XLA sum a K-step in different orders; docs/FP8.md). run.json
    records what they resolve to on the backend (efftrain.fp8.implementation_record)."""

    enabled: bool = False
    fmt: str = Field("e4m3", description="format of forward GEMM inputs: e4m3, e5m2 or eXmY")
    grad_fmt: str = Field("e4m3", description="format of the gradient operand in backward GEMMs")
    act_block: tuple[int, int] = (1, 128)
    weight_block: tuple[int, int] = (128, 128)
    pow2_scales: bool = False
    accum_bits: int | None = Field(14, description="mantissa bits kept by the MMA accumulator; None = exact fp32")
    accum_rounding: Literal["truncate", "nearest"] = "truncate"
    k_step: int = Field(32, ge=1, description="K elements summed exactly per MMA step")
    promote_every: int | None = Field(128, description="promote partial sums to fp32 every N_C elements; None = never")
    forward: bool = True
    input_grad: bool = True
    weight_grad: bool = True
    embedding: bool = False
    output_head: bool = False
    router: bool = False
    quantize_impl: Literal["auto", "xla"] = Field(
        "auto", description="quantizer: auto = the one-pass Pallas kernel on GPU where the shapes fit, else XLA; "
                            "xla = always XLA")
    native_casts: bool = Field(True, description="Pallas quantizer: Triton's e4m3 convert (bit-exact on an H100) "
                                                 "instead of bit arithmetic")
    accumulate_impl: Literal["auto", "pallas", "xla"] = Field(
        "auto", description="accumulator-model kernel: auto = Mosaic on Hopper, else Triton, on GPUs; pallas = "
                            "Triton on any GPU; xla = the lax.scan reference (always used off GPU)")
    pallas_block_m: int = Field(64, description="Triton accumulator kernel: output tile rows (power of two >= 16)")
    pallas_block_n: int = Field(128, description="Triton accumulator kernel: output tile columns (power of two >= 16)")
    pallas_num_warps: Literal[1, 2, 4, 8, 16] = Field(4, description="Triton accumulator kernel: warps per program")
    pallas_num_stages: int = Field(2, ge=1, le=8, description="Triton accumulator kernel: software-pipeline stages")
    pallas_unroll: int = Field(1, ge=1, description="Triton accumulator kernel: K-steps whose MMAs issue together")
    pallas_window_unroll: int = Field(
        8, ge=0, description="Triton accumulator kernel: unroll promotion windows of up to this many K-steps")
    v3_fast_path: bool = Field(True, description="linear layers: the V3 recipe on 128-aligned shapes quantizes each "
                                                 "operand once, in the kernels' layouts")

    @field_validator("act_block", "weight_block", mode="before")
    @classmethod
    def _list_to_tuple(cls, v):
        return tuple(v) if isinstance(v, list) else v

    @field_validator("pallas_block_m", "pallas_block_n")
    @classmethod
    def _power_of_two_tile(cls, v):
        if v < 16 or v & (v - 1):
            raise ValueError(f"must be a power of two >= 16 (Triton block shapes), got {v}")
        return v


# ----------------------------------------------------------------------------------------------
# Data, training, checkpoints, logging
# ----------------------------------------------------------------------------------------------
class DataConfig(_Section):
    source: Literal["pystdlib", "files", "jsonl", "parquet", "hf"] = "pystdlib"
    paths: list[str] = Field(default_factory=list, description="files or globs for files/jsonl/parquet")
    text_field: str = "text"
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    max_documents: int | None = Field(None, ge=1, description="cap on documents read (quick runs)")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="documents routed to val by path hash")
    seq_len: int = Field(256, ge=2)
    tokenizer_path: str | None = Field(None, description="reuse this tokenizer.json instead of training one")
    tokenizer_train_chars: int = Field(20_000_000, ge=1000, description="characters used to train the BPE")
    cache_dir: str | None = Field(None, description="token cache; None = $EFFTRAIN_CACHE or ~/.cache/efftrain")
    shuffle_seed: int = 0


class OptimConfig(_Section):
    lr: float = Field(3e-3, gt=0, le=10.0, description="peak learning rate (AdamW; above 10 is a typo)")
    schedule: Literal["constant", "cosine", "linear", "wsd"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: final fraction of steps spent decaying")
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)
    moment_dtype: DType = "float32"


MESH_AXES = ("data", "fsdp", "expert")


class MeshConfig(_Section):
    """The device mesh (docs/SCALING.md): its axes' sizes, whose product must be the device count. The
    batch is split over all three; `fsdp` shards every large parameter (and its optimizer moments) along
    one divisible dimension, `expert` shards the routed experts' stacked kernels by expert."""

    data: int = Field(-1, description="data-parallel size (params replicated); -1 = the remaining devices")
    fsdp: int = Field(1, ge=1, description="fully-sharded data parallel: params/moments sharded, gathered by XLA")
    expert: int = Field(1, ge=1, description="expert parallel: routed experts split over this axis (MoE only)")

    @model_validator(mode="before")
    @classmethod
    def _known_axes(cls, raw):
        if isinstance(raw, dict):
            unknown = [k for k in raw if k not in MESH_AXES]
            if unknown:
                raise ValueError(f"unknown mesh axis {unknown[0]!r} (axes: {', '.join(MESH_AXES)})")
        return raw

    @property
    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "expert": self.expert}


class TrainConfig(_Section):
    batch_size: int = Field(16, ge=1, description="global sequences per optimizer step")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_tokens: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    seed: int = 0
    eval_every: int = Field(100, ge=0, description="steps between val evals; 0 = only at checkpoints")
    eval_batches: int = Field(8, ge=1)
    log_every: int = Field(10, ge=1)
    data_parallel: int = Field(-1, description="devices on the data axis; -1 = all (the older spelling of "
                                               "train.mesh: {data: N}, which may use fewer than all devices)")
    mesh: MeshConfig | None = Field(None, description="device mesh {data, fsdp, expert}; None = all devices on data "
                                                      "(or train.data_parallel of them)")
    deterministic: bool = Field(True, description="bitwise-reproducible steps on GPUs (docs/REPRODUCIBILITY.md)")
    init_from: str | None = Field(None, description="start from another run's series checkpoint (a branch): RUN_DIR")
    init_from_step: int | None = Field(None, ge=1, description="the series step of train.init_from to start at")
    OMITTED_AT: ClassVar[dict[str, Any]] = {"mesh": None}


class CheckpointConfig(_Section):
    tokens: list[int] = Field(default_factory=list, description="explicit series token counts")
    log_start: int | None = Field(None, ge=1, description="log-spaced series: first token count")
    log_stop: int | None = Field(None, ge=1, description="log-spaced series: last token count")
    per_decade: int = Field(0, ge=0, description="log-spaced series: points per factor of 10")
    include_final: bool = True
    resume_every: int = Field(200, ge=1, description="steps between rolling resume checkpoints")
    async_save: bool = True


class LoggingConfig(_Section):
    tensorboard: bool = True
    progress: bool = True


class Config(_Section):
    name: str = "run"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    fp8: FP8Config = FP8Config()

    @model_validator(mode="after")
    def _check_compatible(self) -> "Config":
        problems = list(_cross_field_problems(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # convenience -------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.train.batch_size * self.data.seq_len

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self, sections: tuple[str, ...] | None = None) -> str:
        d = self.to_dict()
        if sections is not None:
            d = {k: d[k] for k in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


FP8_FORMAT_PATTERN = "e4m3, e5m2 or eXmY with 2 <= X <= 8 and 1 <= Y <= 10"


def _fp8_format_ok(fmt: str) -> bool:
    m = re.fullmatch(r"e(\d+)m(\d+)", fmt.lower())
    return bool(m) and 2 <= int(m.group(1)) <= 8 and 1 <= int(m.group(2)) <= 10


def _cross_field_problems(c: Config):
    m = c.model
    if m.head_dim is None and m.d_model % m.n_heads:
        yield f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})"
    if m.n_heads % m.resolved_kv_heads:
        yield f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({m.resolved_kv_heads})"
    if m.attention == "mha" and m.resolved_head_dim % 2:
        yield f"model.head_dim ({m.resolved_head_dim}) must be even for RoPE"
    if m.attention == "mla":
        if m.n_kv_heads is not None:
            yield "model.n_kv_heads is a grouped-query setting and does not apply to model.attention=mla"
        if m.mla.kv_lora_rank > m.d_model:
            yield f"model.mla.kv_lora_rank ({m.mla.kv_lora_rank}) exceeds model.d_model ({m.d_model})"
        if m.mla.q_lora_rank > m.d_model:
            yield f"model.mla.q_lora_rank ({m.mla.q_lora_rank}) exceeds model.d_model ({m.d_model})"
        if m.mla.qk_rope_head_dim % 2:
            yield f"model.mla.qk_rope_head_dim ({m.mla.qk_rope_head_dim}) must be even for RoPE"
    if m.moe.enabled:
        if m.moe.num_routed_experts == 0:
            yield "model.moe.enabled is true but model.moe.num_routed_experts is 0 (an MoE needs experts)"
        elif m.moe.top_k > m.moe.num_routed_experts:
            yield (f"model.moe.top_k ({m.moe.top_k}) exceeds model.moe.num_routed_experts "
                   f"({m.moe.num_routed_experts})")
        if m.moe.first_dense_layers >= m.n_layers:
            yield (f"model.moe.first_dense_layers ({m.moe.first_dense_layers}) leaves no MoE layer in "
                   f"model.n_layers ({m.n_layers})")
    if m.mtp.depth >= c.data.seq_len:
        yield f"model.mtp.depth ({m.mtp.depth}) must be smaller than data.seq_len ({c.data.seq_len})"
    if (m.mtp.loss_weight_after is None) != (m.mtp.loss_weight_switch_tokens is None):
        yield "model.mtp.loss_weight_after and model.mtp.loss_weight_switch_tokens must be set together"
    if c.data.source in ("files", "jsonl", "parquet") and not c.data.paths:
        yield f"data.source={c.data.source} needs data.paths (files or globs)"
    if c.data.source == "hf" and not c.data.hf_dataset:
        yield "data.source=hf needs data.hf_dataset"
    if c.train.batch_size % c.train.grad_accum:
        yield (f"train.batch_size ({c.train.batch_size}) must be divisible by train.grad_accum "
               f"({c.train.grad_accum})")
    if c.train.max_tokens is None and c.train.max_steps is None:
        yield "set one of train.max_tokens or train.max_steps"
    if c.train.max_tokens is not None and c.train.max_steps is not None:
        yield "set only one of train.max_tokens and train.max_steps"
    if (c.train.init_from is None) != (c.train.init_from_step is None):
        yield "train.init_from and train.init_from_step must be set together"
    if c.train.data_parallel == 0 or c.train.data_parallel < -1:
        yield f"train.data_parallel ({c.train.data_parallel}) must be -1 (all devices) or >= 1"
    yield from _mesh_problems(c)
    ck = c.checkpoint
    if (ck.log_start is None) != (ck.log_stop is None) or ((ck.log_start is not None) != (ck.per_decade > 0)):
        yield "checkpoint.log_start, checkpoint.log_stop and checkpoint.per_decade must be set together"
    if ck.log_start is not None and ck.log_stop is not None and ck.log_start > ck.log_stop:
        yield f"checkpoint.log_start ({ck.log_start}) exceeds checkpoint.log_stop ({ck.log_stop})"
    if any(t <= 0 for t in ck.tokens):
        yield "checkpoint.tokens must be positive token counts"
    f = c.fp8
    for name in ("fmt", "grad_fmt"):
        if not _fp8_format_ok(getattr(f, name)):
            yield f"fp8.{name} '{getattr(f, name)}' is not a known format ({FP8_FORMAT_PATTERN})"
    if f.accum_bits is not None and not 1 <= f.accum_bits <= 23:
        yield f"fp8.accum_bits ({f.accum_bits}) must be between 1 and 23 (or null for exact fp32)"
    for name in ("act_block", "weight_block"):
        if min(getattr(f, name)) < 1:
            yield f"fp8.{name} {getattr(f, name)} must have positive sizes"
    if f.promote_every is not None and (f.promote_every < f.k_step or f.promote_every % f.k_step):
        yield f"fp8.promote_every ({f.promote_every}) must be a positive multiple of fp8.k_step ({f.k_step})"


def _mesh_problems(c: Config):
    mesh = c.train.mesh
    if mesh is None:
        return
    if c.train.data_parallel != -1:
        yield (f"train.data_parallel ({c.train.data_parallel}) and train.mesh are both set: train.data_parallel "
               "is the older spelling of train.mesh: {data: N}; drop it (or set it to -1)")
    if mesh.data == 0 or mesh.data < -1:
        yield f"train.mesh.data ({mesh.data}) must be -1 (the remaining devices) or >= 1"
    moe = c.model.moe
    if mesh.expert > 1:
        if not moe.enabled:
            yield f"train.mesh.expert ({mesh.expert}) needs model.moe.enabled (it splits the routed experts)"
        elif moe.num_routed_experts % mesh.expert:
            why = (" (model.moe.expert_exchange=all_to_all places the same number of experts on every expert "
                   "device)" if moe.expert_exchange == "all_to_all" else "")
            yield (f"model.moe.num_routed_experts ({moe.num_routed_experts}) must be divisible by "
                   f"train.mesh.expert ({mesh.expert}){why}")
    micro = c.train.batch_size // c.train.grad_accum
    split = mesh.fsdp * mesh.expert * max(mesh.data, 1)
    if micro % split:
        what = " x ".join(f"{k} {v}" for k, v in mesh.sizes.items() if v > 1) or "1"
        yield (f"micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by the mesh's "
               f"{split} batch shards ({what}; the batch is split over data x fsdp x expert)")


def config_warnings(c: Config) -> list[str]:
    """Settings that are valid but have no effect in this config (e.g. a base preset's MLA dims on a
    dense ablation cell): the trainer prints each as a warning."""
    m, out = c.model, []
    if m.attention == "mla" and m.head_dim is not None:
        out.append(f"model.head_dim ({m.head_dim}) is ignored by model.attention=mla (it uses "
                   "model.mla.qk_nope_head_dim + qk_rope_head_dim and v_head_dim)")

    def ignored(section: str, value: _Section, why: str) -> None:
        default = type(value)()
        changed = sorted(k for k in type(value).model_fields if getattr(value, k) != getattr(default, k))
        if changed:
            keys = changed[0] if len(changed) == 1 else "{" + ",".join(changed) + "}"
            out.append(f"model.{section}.{keys} {'is' if len(changed) == 1 else 'are'} ignored: {why}")

    if m.attention != "mla":
        ignored("mla", m.mla, f"model.attention is {m.attention}")
    if not m.moe.enabled:
        ignored("moe", m.moe, "model.moe.enabled is false")
    elif m.moe.expert_exchange == "all_to_all" and (c.train.mesh is None or c.train.mesh.expert <= 1):
        out.append("model.moe.expert_exchange=all_to_all has no effect without train.mesh.expert > 1 "
                   "(the plain dispatch runs)")
    return out


# ----------------------------------------------------------------------------------------------
# Loading: presets, files, overrides
# ----------------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _resolve_source(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown preset '{name_or_path}' (presets: {', '.join(list_presets())})")
    return preset


def load_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = _resolve_source(name_or_path)
    if str(path) in seen:
        raise ConfigError(f"circular 'base:' chain: {' -> '.join(seen + (str(path),))}")
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    return deep_merge(load_raw(str(base), seen + (str(path),)), raw)


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def set_dotted(raw: dict, key: str, value: Any) -> dict:
    """A copy of raw with the dotted `key` set to `value`. Setting train.max_steps or train.max_tokens
    drops the other, so an override of the training length replaces the preset's."""
    out = copy.deepcopy(raw)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = copy.deepcopy(value)
    if key in EXCLUSIVE_OVERRIDES and value is not None:
        out.get("train", {}).pop(EXCLUSIVE_OVERRIDES[key].split(".")[1], None)
    return out


# Setting one of these replaces the other from the preset.
EXCLUSIVE_OVERRIDES = {"train.max_steps": "train.max_tokens", "train.max_tokens": "train.max_steps"}


def apply_override(raw: dict, assignment: str) -> dict:
    """Apply one `dotted.key=value` override (value parsed as YAML) to a raw config dict."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form key=value")
    key, _, text = assignment.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{assignment}' has an empty key")
    try:
        value = yaml_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return set_dotted(raw, key, value)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in e and e["type"] not in ("value_error",) and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid config: " + "; ".join(lines)


def from_dict(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML path, apply dotted overrides and validate everything."""
    raw = load_raw(name_or_path)
    for assignment in overrides:
        raw = apply_override(raw, assignment)
    return from_dict(raw)


# ----------------------------------------------------------------------------------------------
# Comparing configs (resume safety)
# ----------------------------------------------------------------------------------------------
# Fields that may change when resuming a run: they affect only logging, evaluation and how often
# checkpoints are written, never the numbers of the optimisation itself.
RESUME_MUTABLE = (
    "name",
    "logging.",
    "train.eval_every",
    "train.eval_batches",
    "train.log_every",
    "train.data_parallel",
    "train.mesh",  # the layout over devices: a run saved on one mesh resumes on another (docs/SCALING.md)
    "train.mesh.",
    "train.deterministic",
    "checkpoint.",
    "data.cache_dir",
    "data.paths",
    "model.attention_impl",  # kernel choices: the same function, other rounding or speed
    "fp8.quantize_impl",
    "fp8.native_casts",
    "fp8.accumulate_impl",
    "fp8.pallas_block_m",
    "fp8.pallas_block_n",
    "fp8.pallas_num_warps",
    "fp8.pallas_num_stages",
    "fp8.pallas_unroll",
    "fp8.pallas_window_unroll",
    "fp8.v3_fast_path",
)


def flatten_dotted(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_dotted(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    a, b = flatten_dotted(old.to_dict()), flatten_dotted(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def resume_blocking_diff(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """Differences that make resuming `old` with `new` unsafe (architecture, optimizer, data...)."""
    return [d for d in config_diff(old, new) if not any(
        d[0] == m or (m.endswith(".") and d[0].startswith(m)) for m in RESUME_MUTABLE)]
