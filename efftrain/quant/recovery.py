"""Recovery fine-tuning after weight-only PTQ: can the quantization damage be trained away? (issue #20)

Each recovery setting gives one row per (checkpoint, PTQ combination) beside the plain PTQ rows of the
sweep (efftrain.quant.sweep); docs/RECOVERY.md has the equations, citations, options and row columns.

  lora  QLoRA-style (Dettmers et al. 2023, arXiv 2305.14314 §3; LoRA: Hu et al. 2021, arXiv 2106.09685
        §4.1). The PTQ result stays frozen as it is stored - packed codes, fp16 scales (and zeros) -
        and is dequantized inside every forward; each adapted block Linear gets trainable fp32 adapters

            y = x·Ŵ + (α/r)·(x·A)·B,    A [in, r] ~ N(0, 1/in),    B [r, out] = 0,

        so training starts exactly at the quantized model. Only A and B are trained (embedding, head,
        norms, routed experts and every quantized kernel stay bitwise frozen), on windows of the TRAIN
        split, for a budget of `tokens` (whole batches), with the run's optimizer family (optax from its
        OptimConfig: Adam moments, clipping, moment dtype) at a constant learning rate after an optional
        linear warmup; weight decay off for the adapters unless asked for.
  qat   quantization-aware continuation from the 16-bit checkpoint (straight-through estimator: Bengio,
        Léonard & Courville 2013, arXiv 1308.3432): in the forward every weight that PTQ quantizes is
        replaced by its RTN fake-quantization at the row's bits / group / format, with the quantizer of
        `rtn` itself (efftrain.quant.formats.rtn_kernel), as

            w_fq = sg(Q(w)) + (w − sg(w))       (forward: exactly Q(w); ∂w_fq/∂w = I)

        and all parameters are trained for the same budget with the run's optimizer (its weight decay);
        the trained weights are then quantized by the row's PTQ method (RTN / GPTQ / AWQ).

Both rows measure QiD before and after on the same eval windows against the same 16-bit reference: the
ORIGINAL checkpoint's (for QAT too - its continued 16-bit weights are not the reference), so that

    recovered_fraction = (qid_before − qid_after) / qid_before

is comparable between methods and budgets. qid_before is the plain PTQ of the original checkpoint,
measured inside the row (it equals the plain row's qid). Both methods train on train tokens the model
has not necessarily seen, so a fraction above 1 (the recovered model beating the 16-bit one) is
possible; keep the budget small next to the checkpoint's D. The objective is the main model's token
cross-entropy only: MTP and MoE balance losses are not part of it, and MoE router biases stay frozen.

Implementation: one jitted functional step (trainable state and optimizer state donated, the frozen
state not), a lax.scan over micro-batches when the run accumulates gradients; the losses stay on the
device and are read once after the last step (no host sync inside the loop). The step factory is
cached per (model structure, optimizer settings), so the rows of a sweep with one setting compile it
once per shape; QAT passes the int grid's largest code as data, so int bit widths share one program.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from efftrain.config import Config, yaml_load
from efftrain.data.pipeline import make_train_iterator
from efftrain.eval import EvalSet, paired_windows, summarize_paired
from efftrain.fp8 import fp8_linear
from efftrain.model.layers import Linear, cross_entropy, deterministic_gradients, linears_of, observe_input
from efftrain.quant.apply import (EXPERT_WEIGHTS, METHODS, QuantReport, QuantSettings, count_bytes,
                                  quantize_model)
from efftrain.quant.errors import PTQError
from efftrain.quant.formats import (Packed, QuantFormat, decode, kernel_format, make_format, resolve_group_size,
                                    rtn_kernel)
from efftrain.train.optimizer import make_optimizer
from efftrain.xla import step_options

RECOVERY_METHODS = ("lora", "qat")
LORA_RANK = 8  # defaults of a lora entry
LORA_ALPHA = 16.0
LORA_LR_FACTOR = 0.3  # default learning rates: these × the run's peak optim.lr (docs/RECOVERY.md)
QAT_LR_FACTOR = 0.1

# the recovery columns of a PTQ row (ptq.csv and the results store); empty in plain PTQ rows
RECOVERY_COLUMNS = ["recovery_method", "recovery_tokens", "recovery_tokens_seen", "recovery_steps",
                    "recovery_rank", "recovery_alpha", "recovery_lr", "adapter_params", "recovery_trainable_params",
                    "loss_q_before", "qid_before", "qid_before_se", "recovered_fraction", "recovered_fraction_se",
                    "recovery_train_loss"]  # (the row's `seconds` include the recovery's training)


def _ptq_error(message: str) -> PTQError:
    return PTQError(message)


# ----------------------------------------------------------------------------------------------
# The setting of one recovery
# ----------------------------------------------------------------------------------------------
class RecoverySpec(BaseModel):
    """One recovery setting (an entry of PTQSpec.recovery; grid specs: `ptq: {recovery: [...]}`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    method: str  # lora | qat
    tokens: int  # train tokens spent (whole batches of batch_size × seq_len; at least one batch)
    rank: int | None = None  # lora: adapter rank r (default 8), 1 <= r <= min(in, out) of every adapted Linear
    alpha: float | None = Field(None, gt=0)  # lora: scale α/r (default α = 16)
    lr: float | None = Field(None, gt=0, le=10.0)  # None: lora 0.3 ×, qat 0.1 × the run's peak optim.lr
    warmup_steps: int = Field(0, ge=0)  # linear warmup, then constant
    weight_decay: float | None = Field(None, ge=0)  # None: lora 0 (adapters), qat the run's optim.weight_decay
    targets: list[str] | None = None  # lora: block Linears by name (attn/q, ffn/down, ...); None = all
    batch_size: int | None = Field(None, ge=1)  # sequences per step; None = the run's train.batch_size
    seed: int = Field(0, ge=0)  # adapter init and the order of the train windows
    bits: list[int] | None = None  # only after PTQ at these bit widths (None: every one of the sweep)
    ptq_methods: list[str] | None = None  # only after these PTQ methods (None: every one of the sweep)

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if v not in RECOVERY_METHODS:
            raise ValueError(f"unknown recovery method {v!r} (valid: {', '.join(RECOVERY_METHODS)})")
        return v

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v):
        if isinstance(v, float) and math.isfinite(v) and v == int(v):
            v = int(v)  # 6.5e4 in YAML
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"recovery tokens must be a positive token count (at least one batch), got {v}")
        return v

    @field_validator("rank")
    @classmethod
    def _rank(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"recovery rank must be >= 1, got {v}")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v):
        if v is not None and (not v or any(not 2 <= b <= 8 for b in v)):
            raise ValueError(f"recovery bits must be a non-empty list of bit widths between 2 and 8, got {v}")
        return v

    @field_validator("ptq_methods")
    @classmethod
    def _ptq_methods(cls, v):
        bad = [m for m in v or [] if m not in METHODS]
        if v is not None and (bad or not v):
            raise ValueError(f"recovery ptq_methods: unknown {bad or 'empty list'} (valid: {', '.join(METHODS)})")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        if v is not None and not v:
            raise ValueError("recovery targets must name at least one Linear (or be left out: all block Linears)")
        return v

    @model_validator(mode="after")
    def _lora_only(self):
        if self.method == "qat":
            given = [k for k in ("rank", "alpha", "targets") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"recovery {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to "
                                 "method lora only (qat trains every weight)")
        return self

    # ---- resolved values -------------------------------------------------------------------------
    @property
    def r(self) -> int:
        return self.rank if self.rank is not None else LORA_RANK

    @property
    def a(self) -> float:
        return self.alpha if self.alpha is not None else LORA_ALPHA

    @property
    def label(self) -> str:
        """The setting in the row key: the `format` column reads '<format>+<label>', e.g.
        'int+lora-t65536-r8-a16'. Defaults that depend on the run (lr, weight decay, batch) appear only
        when given; the bits / ptq_methods filters choose rows and are not part of it."""
        parts = [self.method, f"t{self.tokens}"]
        if self.method == "lora":
            parts += [f"r{self.r}", f"a{self.a:g}"]
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.warmup_steps:
            parts.append(f"w{self.warmup_steps}")
        if self.weight_decay is not None:
            parts.append(f"wd{self.weight_decay:g}")
        if self.targets is not None:
            parts.append("on." + ".".join(t.replace("/", "_") for t in sorted(self.targets)))
        if self.batch_size is not None:
            parts.append(f"b{self.batch_size}")
        if self.seed:
            parts.append(f"s{self.seed}")
        return "-".join(parts)

    def applies_to(self, s: QuantSettings) -> bool:
        return (self.bits is None or s.bits in self.bits) and (self.ptq_methods is None or s.method in self.ptq_methods)

    def batch(self, cfg: Config) -> int:
        return self.batch_size or cfg.train.batch_size

    def steps(self, cfg: Config) -> int:
        """Optimizer steps of the budget: whole batches, never more tokens than `tokens`."""
        return self.tokens // (self.batch(cfg) * cfg.data.seq_len)

    def learning_rate(self, cfg: Config) -> float:
        if self.lr is not None:
            return self.lr
        return cfg.optim.lr * (LORA_LR_FACTOR if self.method == "lora" else QAT_LR_FACTOR)

    def optim(self, cfg: Config):
        """The run's OptimConfig with this recovery's learning rate, warmup and weight decay, constant schedule."""
        wd = self.weight_decay if self.weight_decay is not None else (0.0 if self.method == "lora"
                                                                      else cfg.optim.weight_decay)
        return cfg.optim.model_copy(update={"lr": self.learning_rate(cfg), "schedule": "constant",
                                            "warmup_steps": self.warmup_steps, "weight_decay": wd})


def unique_entries(entries: list[RecoverySpec]) -> list[RecoverySpec]:
    """The entries, ValueError if two of them give the same rows (the same label)."""
    seen: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e.label in seen:
            raise ValueError(f"recovery entries {seen[e.label]} and {i} are the same setting ({e.label})")
        seen[e.label] = i
    return entries


def parse_recovery_option(text: str) -> dict[str, Any]:
    """`efftrain ptq --recovery`: 'METHOD[:key=value,...]' (list values joined by '+', e.g.
    targets=attn/q+attn/v, bits=2+3) or a YAML mapping '{method: lora, tokens: 65536}' -> a dict for
    RecoverySpec. ConfigError on a malformed option."""
    from efftrain.config import ConfigError

    text = text.strip()
    if text.startswith("{"):
        try:
            value = yaml_load(text)
        except Exception:  # yaml.YAMLError
            value = None
        if not isinstance(value, dict):
            raise ConfigError(f"--recovery '{text}': not a YAML mapping")
        return value
    method, _, rest = text.partition(":")
    if not method.strip():
        raise ConfigError(f"--recovery '{text}': expected METHOD[:key=value,...], e.g. "
                          "lora:tokens=65536,rank=8,alpha=16 or qat:tokens=65536")
    out: dict[str, Any] = {"method": method.strip()}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--recovery '{text}': '{item}' is not key=value")
        key = key.strip()
        parts = value.split("+") if key in ("targets", "bits", "ptq_methods") else [value]
        values = []
        for p in parts:
            try:
                values.append(yaml_load(p.strip()))
            except Exception:  # yaml.YAMLError: keep the text
                values.append(p.strip())
        out[key] = values if key in ("targets", "bits", "ptq_methods") else values[0]
    return out


# ----------------------------------------------------------------------------------------------
# Checks against the run (before any work)
# ----------------------------------------------------------------------------------------------
def block_linears(model) -> dict[str, tuple[int, int]]:
    """Linear name inside a block (attn/q, ffn/down, ...) -> the smallest (in, out) it has in any block."""
    out: dict[str, tuple[int, int]] = {}
    for block in model.blocks:
        for name, lin in linears_of(block):
            shape = tuple(lin.kernel.get_value().shape)
            out[name] = shape if name not in out else min(out[name], shape, key=min)
    return out


def check_recovery(model, cfg: Config, entries: list[RecoverySpec]) -> None:
    """PTQError (one line) for a setting that cannot apply to this run: a budget below one batch, a warmup
    as long as the budget, a batch the run's micro-batch does not divide, unknown targets, a rank above
    min(in, out) of an adapted Linear. `model` may be abstract (nnx.eval_shape)."""
    linears = block_linears(model)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    for e in entries:
        batch, seq = e.batch(cfg), cfg.data.seq_len
        where = f"recovery {e.label}"
        if e.tokens < batch * seq:
            raise _ptq_error(f"{where}: tokens ({e.tokens:,}) must be at least one batch ({batch} x {seq} = "
                             f"{batch * seq:,} tokens)")
        if e.warmup_steps >= e.steps(cfg):
            raise _ptq_error(f"{where}: warmup_steps ({e.warmup_steps}) must be smaller than the budget's "
                             f"{e.steps(cfg)} steps")
        if batch > micro and batch % micro:
            raise _ptq_error(f"{where}: batch_size {batch} must be a multiple of the run's micro-batch {micro} "
                             f"(train.batch_size / train.grad_accum), or at most it")
        if e.method != "lora":
            continue
        names = list(linears) if e.targets is None else e.targets
        unknown = [t for t in names if t not in linears]
        if unknown:
            raise _ptq_error(f"{where}: unknown target(s) {unknown} (the block Linears: {', '.join(linears)})")
        name = min(names, key=lambda n: min(linears[n]))
        limit = min(linears[name])
        if e.r > limit:
            raise _ptq_error(f"{where}: rank {e.r} exceeds min(in, out) = {limit} of {name} (in {linears[name][0]}, "
                             f"out {linears[name][1]}); choose a rank from 1 to {limit}")


# ----------------------------------------------------------------------------------------------
# LoRA on a quantized model
# ----------------------------------------------------------------------------------------------
class LoRAParam(nnx.Param):
    """A LoRA adapter matrix (A or B): the only trainable parameters of a lora recovery."""


class FrozenBase(nnx.Variable):
    """The frozen quantized weight of an adapted Linear: its packed codes, fp16 scales and zeros (and
    awq-linear's 1/s), or - only if those do not reproduce the quantized kernel exactly - that kernel."""


class LoRALinear(nnx.Module):
    """y = x·Ŵ + (α/r)·(x·A)·B with Ŵ dequantized from the frozen codes in every call (compute dtype, as
    Linear computes x·W) and the adapter path in float32. `fp8` is None so that `apply_shared_input`
    calls this layer (its shared-input path reads `kernel` directly); the base GEMM keeps the Linear's
    simulated-FP8 numerics (`base_fp8`)."""

    def __init__(self, lin: Linear, w_hat: jax.Array, packed: Packed | None, inv_s, f: QuantFormat, *,
                 rank: int, alpha: float, key: jax.Array):
        d_in, d_out = w_hat.shape
        self.compute_dtype = lin.compute_dtype
        self.base_fp8 = lin.fp8
        self.fp8 = None
        self.kernel_dtype = w_hat.dtype
        self.scale = float(alpha) / rank
        self.fmt = kernel_format(f)[0]  # static part of the grid (int widths share it; decode needs no width)
        self.packed_base = packed is not None
        self.has_inv_s = packed is not None and inv_s is not None
        if packed is not None:
            codes, scales, zeros = packed_base(packed, f)
            self.codes, self.scales, self.zeros = FrozenBase(codes), FrozenBase(scales), FrozenBase(zeros)
            if inv_s is not None:
                self.inv_s = FrozenBase(jnp.asarray(inv_s, jnp.float32))
        else:
            self.dense = FrozenBase(w_hat)
        self.lora_a = LoRAParam(jax.random.normal(key, (d_in, rank), jnp.float32) / math.sqrt(d_in))
        self.lora_b = LoRAParam(jnp.zeros((rank, d_out), jnp.float32))

    def base_kernel(self) -> jax.Array:
        """Ŵ from the codes (the arithmetic of efftrain.quant.formats.unpack): equal to the PTQ kernel."""
        if not self.packed_base:
            return self.dense[...]
        return dequantize_base(self.codes[...], self.scales[...], self.zeros[...],
                               self.inv_s[...] if self.has_inv_s else None, self.fmt, self.kernel_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        observe_input(self, x)
        w = self.base_kernel().astype(self.compute_dtype)
        xc = x.astype(self.compute_dtype)
        y = fp8_linear(xc, w, self.base_fp8) if self.base_fp8 is not None else jnp.dot(xc, w)
        delta = jnp.dot(jnp.dot(x.astype(jnp.float32), self.lora_a[...]), self.lora_b[...]) * self.scale
        return (y.astype(jnp.float32) + delta).astype(self.compute_dtype)


def packed_base(packed: Packed, f: QuantFormat) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(uint8 codes, fp16 scales, fp16 zeros) of a stored weight; the zeros of a format without zero
    points are the constant that `unpack` uses (2^(b-1) for symmetric int, 0 for code books)."""
    scales = jnp.asarray(packed.scales, jnp.float16)
    zeros = packed.zeros if packed.zeros is not None else \
        jnp.full(scales.shape, (f.maxq + 1) // 2 if f.is_int else 0, jnp.float16)
    return jnp.asarray(packed.codes, jnp.uint8), scales, jnp.asarray(zeros, jnp.float16)


def dequantize_base(codes, scales, zeros, inv_s, fmt: QuantFormat, dtype) -> jax.Array:
    """The dequantized [in, out] weight of codes [in, out] with scales / zeros [in/g, out] (and awq-linear's
    1/s [in]), in the arithmetic of efftrain.quant.formats.unpack / dequantize_arrays."""
    n_in, n_out = codes.shape
    ng = scales.shape[0]
    cg = codes.reshape(ng, n_in // ng, n_out).astype(jnp.int32)
    w = decode(cg, scales.astype(jnp.float32)[:, None, :], zeros.astype(jnp.float32)[:, None, :], fmt)
    w = w.reshape(n_in, n_out)
    if inv_s is not None:  # awq-linear: w_eff = Q(diag(s) w) · (1/s)
        w = w * inv_s[:, None]
    return w.astype(dtype)


def _replace(block, name: str, module) -> None:
    parts = name.split("/")
    parent = block
    for p in parts[:-1]:
        parent = parent[int(p)] if p.isdigit() else getattr(parent, p)
    if parts[-1].isdigit():
        parent[int(parts[-1])] = module
    else:
        setattr(parent, parts[-1], module)


def add_adapters(model, report: QuantReport, s: QuantSettings, entry: RecoverySpec) -> int:
    """Replace the targeted Linears of the quantized `model` (in place) by LoRALinears on their packed
    codes; returns the adapter parameter count. A Linear whose codes do not reproduce its kernel exactly
    (checked once, one transfer) keeps the dequantized kernel as its frozen base instead."""
    f = make_format(s.bits, s.fmt, s.symmetric)
    fs = kernel_format(f)[0]
    chosen = []
    for li, block in enumerate(model.blocks):
        for name, lin in linears_of(block):
            if entry.targets is None or name in entry.targets:
                packed, inv_s = report.packed.get(f"blocks/{li}/{name}/kernel", (None, None))
                chosen.append((block, name, lin, packed, inv_s))
    checks = [jnp.array_equal(dequantize_base(*packed_base(p, f), None if i is None else jnp.asarray(i, jnp.float32),
                                              fs, lin.kernel[...].dtype), lin.kernel[...])
              if p is not None else jnp.asarray(False) for _, _, lin, p, i in chosen]
    exact = jax.device_get(checks)  # one transfer; a mismatch has never been seen (then: the dense kernel)
    key = jax.random.key(entry.seed)
    count = 0
    for i, ((block, name, lin, packed, inv_s), ok) in enumerate(zip(chosen, exact)):
        new = LoRALinear(lin, lin.kernel[...], packed if ok else None, inv_s, f, rank=entry.r, alpha=entry.a,
                         key=jax.random.fold_in(key, i))
        _replace(block, name, new)
        count += int(new.lora_a[...].size + new.lora_b[...].size)
    return count


# ----------------------------------------------------------------------------------------------
# QAT: straight-through fake quantization
# ----------------------------------------------------------------------------------------------
def ste(w: jax.Array, q: jax.Array) -> jax.Array:
    """sg(q) + (w − sg(w)): q in the forward (exactly), the identity in the backward."""
    return jax.lax.stop_gradient(q.astype(w.dtype)) + (w - jax.lax.stop_gradient(w))


def fake_quant(w: jax.Array, s: QuantSettings, maxq) -> jax.Array:
    """RTN fake quantization of w [..., in, out] at the row's grid (rtn_kernel: the `rtn` quantizer), with
    the straight-through gradient. `maxq`: the traced largest code (kernel_format)."""
    fs = kernel_format(make_format(s.bits, s.fmt, s.symmetric))[0]
    g = resolve_group_size(s.group_for(w.shape[-2]), w.shape[-2])
    return ste(w, rtn_kernel(w.astype(jnp.float32), maxq, f=fs, g=g))


def fake_quantize_model(model, s: QuantSettings, maxq) -> None:
    """In place (inside a traced function): every weight quantize_model quantizes -> fake_quant of it."""
    for block in model.blocks:
        for _, lin in linears_of(block):
            lin.kernel[...] = fake_quant(lin.kernel[...], s, maxq)
        if block.is_moe:
            for name in EXPERT_WEIGHTS:
                var = getattr(block.ffn, name)
                var[...] = fake_quant(var[...], s, maxq)
    if s.quantize_head and model.lm_head is not None:
        model.lm_head.kernel[...] = fake_quant(model.lm_head.kernel[...], s, maxq)


# ----------------------------------------------------------------------------------------------
# The training step and loop
# ----------------------------------------------------------------------------------------------
def _qat_static(s: QuantSettings) -> QuantSettings:
    """The QAT settings the step is specialised on: the int width is data (maxq), the rest static."""
    f = make_format(s.bits, s.fmt, s.symmetric)
    return QuantSettings(method="rtn", bits=8 if f.is_int else s.bits, group_size=s.group_size, fmt=s.fmt,
                         symmetric=f.symmetric, quantize_head=s.quantize_head)


@functools.lru_cache(maxsize=16)
def make_recovery_step(graphdef, optim, deterministic: bool, qat: QuantSettings | None = None):
    """step(trainable, opt_state, frozen, batch [accum, micro, T+1], maxq) -> (trainable, opt_state, loss),
    jitted, trainable and opt_state donated. lora: graphdef of the adapted model, trainable its LoRAParams;
    qat (the static QuantSettings): graphdef of the run's model, trainable its Params, fake-quantized with
    the STE in the forward. Loss: the main model's token cross-entropy. Cached: one function (and one
    compile per shape) per (structure, optimizer settings)."""
    tx = make_optimizer(optim, optim.warmup_steps + 1)  # constant after the warmup; the total only clips it

    def loss_of(trainable, frozen, window, maxq):
        token = deterministic_gradients.set(deterministic)
        try:
            model = nnx.merge(graphdef, trainable, frozen)
            if qat is not None:
                fake_quantize_model(model, qat, maxq)
            return cross_entropy(model(window[:, :-1]).logits, window[:, 1:])
        finally:
            deterministic_gradients.reset(token)

    grad_fn = jax.value_and_grad(loss_of)

    def step(trainable, opt_state, frozen, batch, maxq):
        if batch.shape[0] == 1:
            loss, grads = grad_fn(trainable, frozen, batch[0], maxq)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)

            def body(acc, window):
                loss, g = grad_fn(trainable, frozen, window, maxq)
                return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g), loss

            grads, losses = jax.lax.scan(body, zeros, batch)
            grads = jax.tree.map(lambda g, p: (g / batch.shape[0]).astype(p.dtype), grads, trainable)
            loss = jnp.mean(losses)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return tx, jax.jit(step, donate_argnums=(0, 1), compiler_options=step_options(deterministic) or None)


def train_recovery(graphdef, trainable, frozen, cfg: Config, entry: RecoverySpec, train_tokens: np.ndarray, *,
                   steps: int | None = None, qat: QuantSettings | None = None) -> tuple[Any, dict]:
    """Train `trainable` (frozen: untouched, not donated) for entry.steps(cfg) steps (or `steps`) on train
    windows drawn with entry.seed. Returns (trainable, info: steps, tokens_seen, train_loss, seconds).
    PTQError if the training loss became non-finite."""
    steps = entry.steps(cfg) if steps is None else steps
    batch, seq = entry.batch(cfg), cfg.data.seq_len
    micro = min(batch, cfg.train.batch_size // cfg.train.grad_accum)
    accum = batch // micro
    maxq = kernel_format(make_format(qat.bits, qat.fmt, qat.symmetric))[1] if qat is not None else None
    t0 = time.time()
    losses = []
    trainable = jax.tree.map(jnp.array, trainable)  # a copy: the step donates it (and nnx.merge shares it)
    if steps > 0:
        tx, step = make_recovery_step(graphdef, entry.optim(cfg), cfg.train.deterministic,
                                      None if qat is None else _qat_static(qat))
        opt_state = tx.init(trainable)
        it = make_train_iterator(train_tokens, seq_len=seq, batch_size=batch, seed=entry.seed)
        for _ in range(steps):
            window = jnp.asarray(np.asarray(next(it)).reshape(accum, micro, seq + 1))
            trainable, opt_state, loss = step(trainable, opt_state, frozen, window, maxq)
            losses.append(loss)
    host = np.asarray(jax.device_get(losses), np.float64)  # the loop's one transfer
    if not np.isfinite(host).all():
        bad = int(np.argmax(~np.isfinite(host)))
        raise _ptq_error(f"recovery {entry.label}: non-finite training loss at step {bad + 1} of {steps}; "
                         f"lower its lr ({entry.learning_rate(cfg):g})")
    tail = host[-max(1, steps // 10):] if steps else host
    return trainable, {"steps": steps, "tokens_seen": steps * batch * seq,
                       "train_loss": float(tail.mean()) if steps else None, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------
# Evaluation against the original 16-bit checkpoint
# ----------------------------------------------------------------------------------------------
def recovered_fraction(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> tuple[float, float]:
    """(f, se) with f = (B − A)/B = 1 − A/B, A and B the mean per-window QiD after and before; se by the
    delta method over the (paired) windows: Var f ≈ [Var a/B² − 2A·Cov(a, b)/B³ + A²·Var b/B⁴] / n."""
    b = before["loss_q"].astype(np.float64) - before["loss_16"]
    a = after["loss_q"].astype(np.float64) - after["loss_16"]
    A, B, n = a.mean(), b.mean(), len(a)
    if B == 0 or not math.isfinite(B):
        return math.nan, math.nan
    f = float((B - A) / B)
    if n < 2:
        return f, math.nan
    cov = np.cov(a, b, ddof=1)
    var = (cov[0, 0] / B**2 - 2 * A * cov[0, 1] / B**3 + A**2 * cov[1, 1] / B**4) / n
    return f, float(math.sqrt(max(var, 0.0)))


# ----------------------------------------------------------------------------------------------
# One row
# ----------------------------------------------------------------------------------------------
def recovery_row(cfg: Config, graphdef, params, rest, s: QuantSettings, entry: RecoverySpec, *,
                 calib: np.ndarray, windows: EvalSet, reference: list, train_tokens: np.ndarray,
                 steps: int | None = None) -> tuple[dict, QuantReport, Any]:
    """Quantize the checkpoint (params, rest) with `s`, recover it with `entry`, measure before and after
    against the checkpoint itself. Returns (the row's loss and recovery columns, the QuantReport of the
    quantization whose bits the deployed model has, that quantized model - None for lora, whose adapters
    are not a plain quantized model). `steps` overrides the budget (tests: 0)."""
    t0 = time.time()
    model = nnx.merge(graphdef, jax.tree.map(jnp.array, params), rest)  # a copy: quantization writes into it
    report = quantize_model(model, calib, s)
    _, qparams, qrest = nnx.split(model, nnx.Param, ...)
    before = paired_windows(graphdef, params, rest, windows, reference, graphdef, (qparams, qrest))
    model_bytes = count_bytes(model, report)
    out_model, adapter_params = None, None
    if entry.method == "lora":
        adapter_params = add_adapters(model, report, s, entry)
        graphdef_a, trainable, frozen = nnx.split(model, LoRAParam, ...)
        trained, info = train_recovery(graphdef_a, trainable, frozen, cfg, entry, train_tokens, steps=steps)
        after = paired_windows(graphdef, params, rest, windows, reference, graphdef_a, (trained, frozen))
        n_trainable = adapter_params
        model_bytes += 2 * adapter_params  # adapters stored at 16 bits beside the codes
    else:
        trained, info = train_recovery(graphdef, params, rest, cfg, entry, train_tokens, steps=steps, qat=s)
        out_model = nnx.merge(graphdef, trained, rest)
        report = quantize_model(out_model, calib, s)  # the row's PTQ method on the QAT weights
        _, qat_qparams, qat_rest = nnx.split(out_model, nnx.Param, ...)
        after = paired_windows(graphdef, params, rest, windows, reference, graphdef, (qat_qparams, qat_rest))
        n_trainable = int(sum(x.size for x in jax.tree.leaves(params)))
        model_bytes = count_bytes(out_model, report)
    before_s, after_s = summarize_paired(before), summarize_paired(after)
    frac, frac_se = recovered_fraction(before, after)
    row = {**after_s, "model_bytes": model_bytes,
           "recovery_method": entry.method, "recovery_tokens": entry.tokens,
           "recovery_tokens_seen": info["tokens_seen"],
           "recovery_steps": info["steps"], "recovery_rank": entry.r if entry.method == "lora" else None,
           "recovery_alpha": entry.a if entry.method == "lora" else None, "recovery_lr": entry.learning_rate(cfg),
           "adapter_params": adapter_params, "recovery_trainable_params": n_trainable,
           "loss_q_before": before_s["loss_q"], "qid_before": before_s["qid"], "qid_before_se": before_s["qid_se"],
           "recovered_fraction": frac, "recovered_fraction_se": frac_se, "recovery_train_loss": info["train_loss"],
           "seconds": time.time() - t0}
    return row, report, out_model


def recovery_line(row: dict) -> str:
    """The per-row log line of a recovery row."""
    frac = row["recovered_fraction"]
    frac_text = "n/a" if frac is None or not math.isfinite(frac) else \
        f"{100 * frac:.0f}%" + (f" ± {100 * row['recovered_fraction_se']:.0f}%"
                                if math.isfinite(row.get("recovered_fraction_se") or math.nan) else "")
    extra = f", {row['adapter_params']:,} adapter params" if row.get("adapter_params") else ""
    return (f"  {row.get('method_label') or row['method']:4s} w{row['bits']} g{row['group_size']} {row['format']}  "
            f"QiD {row['qid_before']:+.4f} -> {row['qid']:+.4f} ± {row['qid_se']:.4f}  recovered {frac_text}  "
            f"({row['recovery_steps']} steps, {row['recovery_tokens_seen']:,} tokens{extra}, "
            f"lr {row['recovery_lr']:g})  {row['seconds']:.1f}s")
