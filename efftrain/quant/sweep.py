"""The PTQ sweep over a run's checkpoint series: one row of QiD per combination.

For each finalized series checkpoint and each (method, bits, group size, format), the 16-bit and the
quantized parameters (weight-only quantization, efftrain.quant.apply) are run on the same val windows
and each window (seq_len+1 tokens) is scored separately (efftrain.eval.compare_params). The eval set
is a seeded random sample of disjoint windows spread over the whole val split, identical for every
checkpoint and every replicate of the run (efftrain.data.pipeline.val_window_indices):
ceil(PTQSpec.eval_tokens / seq_len) windows (default 1M tokens), or eval_batches × the run's
batch_size windows when eval_batches is set, at most every window the val split has.

Rows go to RUN_DIR/ptq.csv (CSV_COLUMNS):
  run_id, step, tokens      the run (name-confighash) and the checkpoint (tokens seen)
  epochs                    tokens / the run's train tokens (run.json train_tokens_available)
  params_total/_active/_nonembed   the run's parameter counts (run.json)
  params_quantized          weight elements this PTQ quantized (QuantReport.n_params)
  method, bits, group_size, format  the combination (format 'int+head' when the head is quantized)
  loss_16, loss_q           mean token cross-entropy (nats; main model) of each model over the windows
  qid                       loss_q − loss_16 = mean of the per-window differences (Ouyang et al. 2024;
                            Kumar et al. 2024)
  qid_se                    its standard error: std(ddof=1)/sqrt(eval_windows) of those differences
  kl, kl_se                 mean token KL(p_16 ‖ p_q) (nats, fp32 log-softmax) and its standard error
  top1_agree                fraction of positions where both models' argmax agree
  eff_bits, model_bytes     bits per quantized weight incl. scales/zeros; bytes of the whole model
  n_quantized, expert_fallbacks   matrices quantized; routed experts that fell back to RTN
  calib_samples, calib_seq_len, calib_seed   the calibration set
  eval_windows, eval_tokens, eval_seed       the eval set (eval_tokens = windows × seq_len scored tokens)
  warmup_steps, seed, data_seed   the run's optim.warmup_steps, train.seed, data.shuffle_seed
  seconds                   wall time of quantizing and evaluating the combination (rows scored together,
                            PTQSpec.eval_rows: its quantization + the shared evaluation / the rows sharing it)
  recovery_* ...             recovery rows only (efftrain.quant.recovery.RECOVERY_COLUMNS; empty in plain
                            rows): recovery_method, recovery_tokens (budget), recovery_tokens_seen,
                            recovery_steps, recovery_rank, recovery_alpha, recovery_lr, adapter_params,
                            recovery_trainable_params, loss_q_before, qid_before, qid_before_se,
                            recovered_fraction (= (qid_before − qid) / qid_before), recovered_fraction_se,
                            recovery_train_loss (mean train CE of the last tenth of its steps)
  scheme, act_quant, kv_quant, kv_bytes_per_token, rotation, smooth_alpha
                            the row's scheme (efftrain.quant.scheme.SCHEME_COLUMNS): its name ('w4a16', 'w8a8',
                            'fp8', 'w16a16+kv-int4', ...), the activation / KV quantizer labels, the KV cache's
                            bytes per token (all layers; 16-bit when kv_quant is empty), the rotation, SmoothQuant's α
  method_label              the method, marked '+rtn-fallback' when some routed experts had too few
                            calibration tokens and were quantized with RTN (expert_fallbacks of them)
Recovery rows (PTQSpec.recovery; docs/RECOVERY.md): for each combination and recovery setting that
applies to it, one more row whose `format` reads '<format>+<setting label>' (e.g. 'int+lora-t65536-r8-a16'),
so that the row key (step, method, bits, group_size, format) identifies the recovery too; its loss,
qid and kl columns are those of the recovered model against the same 16-bit checkpoint.
Scheme rows (PTQSpec activations, smoothquant_alphas, kv_cache, rotations; methods fp8-block and none;
efftrain.quant.scheme): the checkpoint is rotated / smoothed / quantized / given runtime quantizers as
the scheme says, and scored against the same 16-bit hidden states; `format` reads '<weight format>'
followed by the scheme's suffix ('int+a8', 'none+kv-int4', 'int+rot-hadamard+a8'), weight-only rows
keep theirs.
Rows are appended and fsynced one complete row at a time; rows already present are skipped, so a
killed sweep resumes where it stopped. A ptq.csv written before some of these columns existed is
rewritten (atomically) with the current header and empty cells in the new columns, then appended.
Calibration windows (PTQSpec.calib_samples sequences, default 128) are drawn at random, with
PTQSpec.calib_seed, from the train split, never from the val tokens the losses are measured on.

The 16-bit model's last hidden states on the eval windows are computed once per checkpoint and shared
by its rows (efftrain.eval.reference_states: windows × seq_len × d_model values on the device), so a
row runs one model forward, plus the 16-bit final norm and head. Up to PTQSpec.eval_rows quantized rows
of the checkpoint's structure (weight-only ones) are scored in one pass over the eval windows
(efftrain.eval.compare_params_many), so that 16-bit head and its log-softmax run once per batch for
all of them; each row keeps the single-row formulas (its numbers differ from eval_rows 1 in the last
float bits at most), and the rows are written one by one in the same order. Compiled programs
persist across processes: the sweep turns on JAX's persistent compilation cache
(efftrain.xla.enable_compilation_cache: ~/.cache/efftrain/jax, EFFTRAIN_COMPILATION_CACHE=off opts out).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Annotated, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from efftrain.config import MeshConfig, format_validation_error
from efftrain.data import prepare_data
from efftrain.data.pipeline import read_windows, val_window_count
from efftrain.eval import (compare_params, compare_params_many, eval_set, paired_windows, reference_states,
                           summarize_paired)
from efftrain.files import write_atomic
from efftrain.model.transformer import build_model
from efftrain.quant.activations import ActQuant
from efftrain.quant.apply import (METHODS, QuantReport, QuantSettings, count_bytes, dequantize_arrays, linears_of,
                                  load_dequantized, packed_arrays)
from efftrain.quant.errors import PTQError  # noqa: F401 - raised here, imported from here by callers
from efftrain.quant.formats import make_format
from efftrain.quant.kvcache import KVQuant, check_kv_quant
from efftrain.quant.recovery import (RECOVERY_COLUMNS, RecoverySpec, check_recovery, recovery_line, recovery_row,
                                     unique_entries)
from efftrain.quant.scheme import FP8_BLOCK, NO_WEIGHTS, SCHEME_COLUMNS, Scheme, apply_scheme
from efftrain.train.checkpoint import CheckpointStore
from efftrain.train.rundir import PTQ_TABLE, QUANTIZED, abstract_train_state, load_run_config, read_run_info
from efftrain.train.sharding import checkpoint_mesh, describe, on_mesh
from efftrain.xla import enable_compilation_cache

CSV_COLUMNS = ["run_id", "step", "tokens", "epochs", "params_total", "params_active", "params_nonembed",
               "params_quantized", "method", "bits", "group_size", "format", "loss_16", "loss_q", "qid", "qid_se",
               "kl", "kl_se", "top1_agree", "eff_bits", "model_bytes", "n_quantized", "expert_fallbacks",
               "calib_samples", "calib_seq_len", "calib_seed", "eval_windows", "eval_tokens", "eval_seed",
               "warmup_steps", "seed", "data_seed", "seconds", *RECOVERY_COLUMNS, *SCHEME_COLUMNS, "method_label"]
KEY_COLUMNS = ("step", "method", "bits", "group_size", "format")
CALIB_SEED = 1234  # PTQSpec.calib_seed's default
SWEEP_METHODS = (*METHODS, FP8_BLOCK, NO_WEIGHTS)  # PTQSpec.methods
ACTIVATION_CHOICES = ("none", "int8", "int4", "fp8")
KV_CHOICES = ("none", "int8", "int4", "fp8")
KV_GRANULARITIES = ("token", "group")
ROTATION_CHOICES = ("none", "hadamard", "orthogonal")


class PTQSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # weight quantizers; billm is 1-bit (its rows ignore `bits`), fp8-block is E4M3 in 128×128 blocks (8 bits),
    # none keeps the weights 16-bit (rows of the other axes alone, e.g. a quantized KV cache)
    methods: list[Literal["rtn", "gptq", "awq", "awq-linear", "billm", "fp8-block", "none"]] = ["rtn", "gptq", "awq"]
    bits: list[int] = [2, 3, 4, 8]
    group_sizes: list[int] = [128]
    formats: list[Literal["int", "nf4", "fp4", "fp8"]] = ["int"]
    symmetric: bool = False
    calib_samples: int = Field(128, ge=1)  # the GPTQ / AWQ papers' setting
    calib_seq_len: int | None = Field(None, ge=2)
    calib_seed: int = Field(CALIB_SEED, ge=0)
    checkpoints: Literal["all"] | list[int] = "all"
    eval_tokens: int = Field(1_000_000, ge=1)  # scored val tokens (whole windows, at most the val split)
    eval_seed: int = Field(0, ge=0)
    eval_batches: int | None = Field(None, ge=1)  # overrides eval_tokens: eval_batches × batch_size windows
    # weight-only rows of one checkpoint scored together in one pass over the eval set; 1 = one pass per row;
    # each extra row keeps one more quantized copy of the parameters on the device
    eval_rows: int = Field(4, ge=1)
    damp: float = Field(0.01, ge=0)
    act_order: bool = False
    min_expert_tokens: int | None = Field(None, ge=1)  # None: 2 × each expert matrix's input width
    expert_calibration: Literal["routed", "all"] = "routed"  # experts calibrated on their tokens, or on all
    expert_gate_weighted: bool = False  # expert Hessians / Grams weighted by the gate (score with 'all')
    awq_clip: bool = True  # AWQ's clipping search (awq, awq-linear)
    awq_duo_scaling: bool = False  # AWQ scales x_mean^α / w_mean^(1-α) (AutoAWQ's duo_scaling)
    quantize_head: bool = False
    save: bool = False
    # schemes beyond weight-only (efftrain.quant.scheme; docs/PTQ.md "Schemes"): each list is one more
    # axis of the row product; "none" entries give the weight-only rows
    activations: list[Literal["none", "int8", "int4", "fp8"]] = ["none"]  # every block GEMM's input
    kv_cache: list[Literal["none", "int8", "int4", "fp8"]] = ["none"]  # MHA K/V, MLA c_kv + k_rope
    kv_granularity: Literal["token", "group"] = "token"
    kv_group: int = Field(64, ge=1)
    rotations: list[Literal["none", "hadamard", "orthogonal"]] = ["none"]  # QuaRot-style residual rotation
    rotate_values: bool = False  # with a rotation: also a per-head rotation of V / O
    rotation_seed: int = Field(0, ge=0)
    # SmoothQuant's migration strengths for the activation-quantized rows; null = not smoothed
    smoothquant_alphas: list[Annotated[float, Field(ge=0, le=1)] | None] = [None]
    # recovery fine-tuning after PTQ (efftrain.quant.recovery; docs/RECOVERY.md): one more row per
    # combination and entry, e.g. [{method: lora, tokens: 65536, rank: 8, alpha: 16, lr: 1e-3}]
    recovery: list[RecoverySpec] = []
    # the mesh each checkpoint is laid over (efftrain.train.sharding.checkpoint_mesh); null: the run's
    # train.mesh where it shards parameters and this process has the devices, else one device
    mesh: MeshConfig | None = None

    @field_validator("recovery", mode="before")
    @classmethod
    def _one_recovery(cls, v):
        return [v] if isinstance(v, dict) else v

    @field_validator("recovery")
    @classmethod
    def _distinct_recovery(cls, v):
        return unique_entries(v)

    @field_validator("methods", "activations", "kv_cache", "rotations", "smoothquant_alphas")
    @classmethod
    def _no_repeats(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"values repeat: {v}")
        return v

    @model_validator(mode="after")
    def _schemes_fit(self):
        if self.smoothquant_alphas != [None] and set(self.activations) == {"none"}:
            raise ValueError("smoothquant_alphas smooth activations for their quantizer: they need activations "
                             "int8, int4 or fp8")
        if not self.smoothquant_alphas:
            raise ValueError("smoothquant_alphas: give at least one entry (null = no smoothing)")
        if self.rotate_values and set(self.rotations) == {"none"}:
            raise ValueError("rotate_values needs a rotation (rotations: hadamard or orthogonal)")
        if self.recovery and ("none" in self.methods or "fp8-block" in self.methods):
            raise ValueError("recovery rows need a weight quantizer (rtn, gptq, awq, awq-linear); drop 'none' "
                             "and 'fp8-block' from methods or the recovery entries")
        return self

    @field_validator("bits")
    @classmethod
    def _bits_in_range(cls, v):
        bad = [b for b in v if not 2 <= b <= 8]
        if bad:
            raise ValueError(f"bits must be between 2 and 8, got {bad}")
        return v

    @field_validator("group_sizes")
    @classmethod
    def _groups(cls, v):
        bad = [g for g in v if g != -1 and g < 1]
        if bad:
            raise ValueError(f"group sizes must be -1 (whole channel) or positive, got {bad}")
        return v


def make_spec(**fields) -> PTQSpec:
    try:
        return PTQSpec(**fields)
    except ValidationError as e:
        raise PTQError(format_validation_error(e).replace("invalid config", "invalid PTQ request")) from None


def combinations(spec: PTQSpec) -> list[QuantSettings]:
    """Every valid (method, bits, group, format) of the spec's weight quantizers (efftrain.quant.apply);
    code-book formats only at their bit width; billm once per group size (1 bit, the int format)."""
    out = []
    methods = [m for m in spec.methods if m in METHODS]
    for method, bits, group, fmt in itertools.product(methods, spec.bits, spec.group_sizes, spec.formats):
        if method == "billm":
            if (bits, fmt) != (spec.bits[0], spec.formats[0]):
                continue
            bits, fmt = 1, "int"
        else:
            try:
                make_format(bits, fmt, spec.symmetric)
            except ValueError:
                continue  # e.g. nf4 at 3 bits
        out.append(QuantSettings(method=method, bits=bits, group_size=group, fmt=fmt, symmetric=spec.symmetric,
                                 damp=spec.damp, act_order=spec.act_order, awq_clip=spec.awq_clip,
                                 awq_duo_scaling=spec.awq_duo_scaling, min_expert_tokens=spec.min_expert_tokens,
                                 expert_calibration=spec.expert_calibration,
                                 expert_gate_weighted=spec.expert_gate_weighted, quantize_head=spec.quantize_head))
    if not out and methods:
        raise PTQError(f"no valid (bits, format) combination in bits={spec.bits} formats={spec.formats} "
                       "(nf4/fp4 need 4 bits, fp8 needs 8)")
    return out


def schemes(spec: PTQSpec) -> list[Scheme]:
    """Every row's scheme without recovery: the weight combinations (plus 'fp8-block' and 'none' when
    asked for) × rotations × activations × SmoothQuant strengths (activation-quantized rows only) × KV
    caches; the weight-only rows first, in `combinations` order."""
    weights = [Scheme(s.method, s) for s in combinations(spec)]
    weights += [Scheme(m) for m in (FP8_BLOCK, NO_WEIGHTS) if m in spec.methods]
    kvs = [None if k == "none" else KVQuant(k, spec.kv_granularity, spec.kv_group) for k in spec.kv_cache]
    acts = [None if a == "none" else ActQuant(a) for a in spec.activations]
    out = []
    with_alpha = [(act, alpha) for act in acts  # SmoothQuant only prepares activations for their quantizer
                  for alpha in ([None] if act is None else spec.smoothquant_alphas)]
    for rotation, (act, alpha), kv, w in itertools.product(spec.rotations, with_alpha, kvs, weights):
        rot = None if rotation == "none" else rotation
        scheme = Scheme(w.method, w.weights, acts=act, kv=kv, rotation=rot, rotate_values=spec.rotate_values and rot is not None,
                        rotation_seed=spec.rotation_seed, smooth_alpha=alpha)
        if scheme.method == NO_WEIGHTS and act is None and kv is None and rot is None and kvs == [None]:
            continue  # the 16-bit model itself, QiD 0 by construction: kept only as the 16-bit cache's KV point
        out.append(scheme)
    if not out:
        raise PTQError(f"no row to run: methods {spec.methods} with activations {spec.activations}, kv_cache "
                       f"{spec.kv_cache}, rotations {spec.rotations} leave only the 16-bit model")
    return sorted(out, key=lambda sc: not sc.weight_only)


def row_formats(spec: PTQSpec, rows: list[Scheme] | None = None) -> list[tuple[Scheme, RecoverySpec | None, str]]:
    """Every row of one checkpoint: (scheme, recovery entry or None, its `format` column), weight-only
    rows first, then the other schemes' rows ('<format>+<scheme suffix>'), then each weight-only
    combination's recovery rows ('<format>+<label>')."""
    rows = schemes(spec) if rows is None else rows
    plain = [(sc, None, sc.row_format) for sc in rows]
    return plain + [(sc, e, f"{sc.row_format}+{e.label}") for sc in rows if sc.weight_only
                    for e in spec.recovery if e.applies_to(sc.weights)]


def check_schemes(model, cfg, spec: PTQSpec) -> None:
    """Fail before any work if a scheme cannot apply to this model (a KV group that does not divide the
    cached vectors)."""
    for kind in spec.kv_cache:
        if kind != "none":
            try:
                check_kv_quant(cfg.model, KVQuant(kind, spec.kv_granularity, spec.kv_group))
            except ValueError as e:
                raise PTQError(f"kv_cache {kind}: {e}") from None


def check_group_sizes(model, spec: PTQSpec) -> None:
    """Fail before any work if a group size does not divide some quantized weight's input dim."""
    if spec.quantize_head and model.lm_head is None:
        raise PTQError("quantize_head needs an untied output head, but this model ties it to the embedding")
    dims = {lin.kernel.get_value().shape[0] for block in model.blocks for _, lin in linears_of(block)}
    for block in model.blocks:
        if block.is_moe:
            dims |= {block.ffn.w_gate.get_value().shape[1], block.ffn.w_down.get_value().shape[1]}
    for g in spec.group_sizes:
        bad = sorted(d for d in dims if g != -1 and g < d and d % g)
        if bad:
            raise PTQError(f"group size {g} does not divide the input dims {bad} of this model's weights "
                           f"(use a divisor, or -1 for whole channels)")


def calibration_windows(train_tokens: np.ndarray, n: int, seq_len: int, seed: int = CALIB_SEED) -> np.ndarray:
    """n windows of seq_len train tokens, drawn without replacement with np.random.default_rng(seed)."""
    windows = (len(train_tokens) - 1) // seq_len
    if windows < n:
        raise PTQError(f"too little calibration data: {n} samples x {seq_len} tokens requested, the train split "
                       f"has {windows} windows of {seq_len}")
    rng = np.random.default_rng(seed)
    return read_windows(train_tokens, np.sort(rng.choice(windows, size=n, replace=False)) * seq_len, seq_len)


def eval_windows_wanted(spec: PTQSpec, seq_len: int, batch_size: int) -> int:
    """Val windows the spec asks for: eval_batches × batch_size, else ceil(eval_tokens / seq_len)."""
    return spec.eval_batches * batch_size if spec.eval_batches else -(-spec.eval_tokens // seq_len)


# ----------------------------------------------------------------------------------------------
# ptq.csv
# ----------------------------------------------------------------------------------------------
def row_key(row: dict) -> tuple:
    return (int(row["step"]), str(row["method"]), int(row["bits"]), int(row["group_size"]), str(row["format"]))


def _read_table(path: Path) -> tuple[list[str] | None, list[dict]]:
    """(header, rows) of ptq.csv; PTQError unless the header is CSV_COLUMNS or a subset of them (an
    older table) holding the key columns. An empty file has header None."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    if header is not None and header != CSV_COLUMNS:
        unknown = [c for c in header if c not in CSV_COLUMNS]
        if unknown or len(set(header)) != len(header) or not set(KEY_COLUMNS) <= set(header):
            raise PTQError(f"{path}: unexpected columns {header} (unknown: {unknown or 'none'}); "
                           "move it away to start a new table")
    return header, rows


def read_rows(path: Path) -> list[dict]:
    """The rows of ptq.csv (an older table's rows have "" in the columns it lacks)."""
    if not path.exists():
        return []
    return [{c: r.get(c) or "" for c in CSV_COLUMNS} for r in _read_table(path)[1]]


def upgrade_table(path: Path) -> bool:
    """Rewrite an older ptq.csv (header a subset of CSV_COLUMNS, or an empty file) with the current
    header, its rows unchanged and empty cells in the new columns, atomically (efftrain.files). True if
    it was rewritten."""
    if not path.exists():
        return False
    header, rows = _read_table(path)
    if header == CSV_COLUMNS:
        return False
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue().encode())
    return True


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row[k] for k in CSV_COLUMNS})
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
class _Quantized(NamedTuple):
    """A quantized row waiting for its chunk's evaluation (`run_ptq_sweep`, PTQSpec.eval_rows)."""

    scheme: Scheme
    fmt: str  # its `format` column
    report: QuantReport
    model: nnx.Module  # holds `params`; kept for spec.save
    params: nnx.State
    model_bytes: int
    seconds: float  # quantization time


def run_ptq_sweep(run_dir: str | Path, spec: PTQSpec, *, on_row: Callable[[dict], None] | None = None,
                  log: Callable[[str], None] = print) -> list[dict]:
    """Append the missing rows of `spec` to RUN_DIR/ptq.csv; returns the new rows."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    enable_compilation_cache()
    store = CheckpointStore(run_dir, read_only=True)
    series = store.series()
    if not series:
        raise PTQError(f"{run_dir}: no finalized series checkpoints to quantize")
    if spec.checkpoints != "all":
        missing = set(spec.checkpoints) - {m["step"] for m in series}
        if missing:
            raise PTQError(f"no series checkpoint at step(s) {sorted(missing)}; available {[m['step'] for m in series]}")
        series = [m for m in series if m["step"] in set(spec.checkpoints)]
    rows_of = row_formats(spec)
    mesh = checkpoint_mesh(cfg, spec.mesh)
    graphdef, abstract = abstract_train_state(cfg)
    abstract = on_mesh(abstract, mesh)  # restored sharded where the mesh splits parameters
    abstract_model = nnx.merge(graphdef, abstract["params"], abstract["rest"])
    check_group_sizes(abstract_model, spec)
    check_schemes(abstract_model, cfg, spec)
    check_recovery(abstract_model, cfg, spec.recovery)
    table = run_dir / PTQ_TABLE
    if upgrade_table(table):
        log(f"ptq: {table}: rewritten with the current columns (new ones empty in its existing rows)")
    done = {row_key(r) for r in read_rows(table)}

    seq_len = spec.calib_seq_len or cfg.data.seq_len
    cache = prepare_data(cfg)
    calib = calibration_windows(cache.train, spec.calib_samples, seq_len, spec.calib_seed)
    wanted = eval_windows_wanted(spec, cfg.data.seq_len, cfg.train.batch_size)
    windows = eval_set(cfg, wanted, seed=spec.eval_seed, val_tokens=cache.val).laid_over(mesh)
    log(f"ptq: eval set: {windows.n:,} val windows x {cfg.data.seq_len} = {windows.tokens:,} tokens, seed "
        f"{spec.eval_seed} ({wanted:,} windows requested, {val_window_count(len(cache.val), cfg.data.seq_len):,} "
        f"in the val split); calibration: {spec.calib_samples} x {seq_len} train tokens, seed {spec.calib_seed}")
    log("ptq: parameters on one device" if mesh is None else
        f"ptq: parameters sharded over {describe(mesh)}; each block gathered onto one device while it is quantized")
    info = read_run_info(run_dir, missing_ok=False)
    counts = info["params"]
    train_tokens = info.get("train_tokens_available")
    run_id = f"{cfg.name}-{cfg.hash()[:8]}"

    new_rows = []
    total = len(series) * len(rows_of)
    for ci, meta in enumerate(series):
        todo = [(s, e, fmt) for s, e, fmt in rows_of
                if (meta["step"], s.method, s.bits, s.group_size, fmt) not in done]
        log(f"ptq: checkpoint step {meta['step']} ({meta['tokens_seen']:,} tokens): {len(todo)} of "
            f"{len(rows_of)} combinations to run [{ci + 1}/{len(series)}]")
        if not todo:
            continue
        state, _, _ = store.restore("series", meta["step"], abstract)
        params, rest = state["params"], state["rest"]
        reference = reference_states(graphdef, params, rest, windows)  # the 16-bit side, shared by the rows
        common = {
            "run_id": run_id, "step": meta["step"], "tokens": meta["tokens_seen"],
            "epochs": meta["tokens_seen"] / train_tokens if train_tokens else None,
            "params_total": counts["total"], "params_active": counts["active"],
            "params_nonembed": counts["non_embedding"],
            "calib_samples": spec.calib_samples, "calib_seq_len": seq_len, "calib_seed": spec.calib_seed,
            "eval_windows": windows.n, "eval_tokens": windows.tokens, "eval_seed": spec.eval_seed,
            "warmup_steps": cfg.optim.warmup_steps, "seed": cfg.train.seed, "data_seed": cfg.data.shuffle_seed,
            **{c: None for c in RECOVERY_COLUMNS},
        }

        def finish(sc, entry, fmt, fields, report, model, seconds):
            """The complete row: built, saved (spec.save), appended to ptq.csv, passed on and logged."""
            row = {
                **common, "params_quantized": report.n_params,
                "method": sc.method, "bits": sc.bits, "group_size": sc.group_size, "format": fmt, **fields,
                **sc.columns(cfg.model),
                "eff_bits": report.eff_bits if report.n_params else 16.0,  # method none: 16-bit weights
                "n_quantized": report.n_weights,
                "expert_fallbacks": report.expert_fallbacks, "method_label": report.method_label,
                "seconds": seconds,
            }
            if spec.save:
                if model is not None and sc.weight_only and sc.method != "billm":
                    save_quantized(run_dir, row, sc.weights, report, model)
                else:
                    log(f"  {quantized_name(row)}: not saved (only weight-only rows of packed codes are: not LoRA "
                        "adapters, runtime quantizers, rotations, BiLLM or FP8 blocks)")
            append_row(table, row)
            new_rows.append(row)
            if on_row is not None:
                on_row(row)
            log((row_line(row) if entry is None else recovery_line(row)) + expert_note(report))

        chunk: list[_Quantized] = []  # quantized rows of the checkpoint's structure, scored together

        def score_chunk():
            """Score the chunk's rows in one pass over the eval set, then finish them in order; each row's
            seconds = its quantization + its share of the pass. A short chunk is padded to eval_rows with
            copies of its last row, so every row goes through the one eval_rows-row program wherever the
            chunks happen to break: a sweep killed and rerun computes the same bits as an uninterrupted
            one (tests/test_grid.py); eval_rows 1 is the single-row program (compare_params)."""
            if not chunk:
                return
            t0 = time.time()
            if spec.eval_rows == 1:
                scored = [compare_params(graphdef, params, chunk[0].params, rest, windows, reference)]
            else:
                scored = compare_params_many(graphdef, params, [q.params for q in chunk], rest, windows, reference,
                                             pad_to=spec.eval_rows)
            share = (time.time() - t0) / len(chunk)
            for q, scores_ in zip(chunk, scored):
                finish(q.scheme, None, q.fmt, {**scores_, "model_bytes": q.model_bytes}, q.report, q.model,
                       q.seconds + share)
            chunk.clear()

        for sc, entry, fmt in todo:
            if entry is not None:
                score_chunk()  # rows leave in todo order
                t0 = time.time()
                fields, report, model = recovery_row(cfg, graphdef, params, rest, sc.weights, entry, calib=calib,
                                                     windows=windows, reference=reference, train_tokens=cache.train)
                finish(sc, entry, fmt, fields, report, model, time.time() - t0)
                continue
            t0 = time.time()
            # a copy, on the checkpoint's shardings: quantization writes into it
            model = nnx.merge(graphdef, jax.tree.map(jnp.array, params), rest)
            report = apply_scheme(model, calib, sc)
            graphdef_q, qparams, qrest = nnx.split(model, nnx.Param, ...)
            quantized = _Quantized(sc, fmt, report, model, qparams, count_bytes(model, report), time.time() - t0)
            if graphdef_q == graphdef:  # weight-only: the same structure as the checkpoint
                chunk.append(quantized)
                if len(chunk) == spec.eval_rows:
                    score_chunk()
                continue
            # runtime quantizers or an untied head: another graphdef, scored against the same reference
            score_chunk()
            t0 = time.time()
            scores_ = summarize_paired(paired_windows(graphdef, params, rest, windows, reference, graphdef_q,
                                                      (qparams, qrest)))
            finish(sc, None, fmt, {**scores_, "model_bytes": quantized.model_bytes}, report, model,
                   quantized.seconds + time.time() - t0)
        score_chunk()
    store.close()
    log(f"ptq: {len(new_rows)} new rows in {table} ({total} combinations in all)")
    return new_rows


def row_line(row: dict) -> str:
    """The per-row log line: method (its label, e.g. 'gptq+rtn-fallback'), bits, group, format, QiD ± se,
    KL, top1, bits/weight, time."""
    return (f"  {row.get('method_label') or row['method']:4s} w{row['bits']} g{row['group_size']} {row['format']:4s}  "
            f"QiD {row['qid']:+.4f} ± {row['qid_se']:.4f}  KL {row['kl']:.4f}  top1 {100 * row['top1_agree']:.1f}%  "
            f"{row['eff_bits']:.2f} bits/weight  {row['seconds']:.1f}s")


def expert_note(report) -> str:
    """'' without routed experts; else their calibration tokens (min / median / max over the layers'
    experts) and, loudly, how many fell back to RTN."""
    if not report.expert_tokens:
        return ""
    t = np.concatenate(report.expert_tokens)
    note = f"  [experts: calibration tokens min {t.min():,} / median {int(np.median(t)):,} / max {t.max():,}"
    if report.expert_fallbacks:
        note += f"; {report.expert_fallbacks} of {t.size} experts on RTN (too few tokens)"
    return note + "]"


# ----------------------------------------------------------------------------------------------
# Quantized checkpoints
# ----------------------------------------------------------------------------------------------
def quantized_name(row: dict) -> str:
    return f"step{row['step']}-{row['method']}-w{row['bits']}-g{row['group_size']}-{row['format']}"


def save_quantized(run_dir: Path, row: dict, s: QuantSettings, report, model) -> Path:
    """RUN_DIR/quantized/<name>/{weights.npz, meta.json}: packed codes + fp16 scales/zeros for every
    quantized weight and the remaining (16-bit-kept) parameters at their stored precision."""
    final = run_dir / QUANTIZED / quantized_name(row)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays = packed_arrays(report)
    quantized_paths = {k.split("#")[0] for k in report.packed}
    for path, var in nnx.to_flat_state(nnx.state(model)):  # Params and e.g. MoE router biases
        key = "/".join(map(str, path))
        if key not in quantized_paths:
            arrays[f"{key}|float"] = np.asarray(var[...])
    np.savez(tmp / "weights.npz", **arrays)
    (tmp / "meta.json").write_text(json.dumps({**row, "symmetric": s.symmetric}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_quantized(run_dir: str | Path, name: str):
    """(cfg, model with the dequantized weights, meta) of a saved quantized checkpoint."""
    run_dir = Path(run_dir)
    qdir = run_dir / QUANTIZED / name
    if not (qdir / "meta.json").is_file():
        available = sorted(p.name for p in (run_dir / QUANTIZED).glob("*") if (p / "meta.json").is_file()) \
            if (run_dir / QUANTIZED).is_dir() else []
        raise PTQError(f"no quantized checkpoint '{name}' in {run_dir}/quantized (available: {available or 'none'})")
    cfg = load_run_config(run_dir)
    meta = json.loads((qdir / "meta.json").read_text())
    try:
        with np.load(qdir / "weights.npz") as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise PTQError(f"{qdir}/weights.npz is unreadable ({e})") from None
    model = build_model(cfg.model, cfg.fp8, seed=cfg.train.seed)
    floats = {k.split("|")[0]: v for k, v in arrays.items() if k.endswith("|float")}
    load_dequantized(model, floats)
    packed = {k: v for k, v in arrays.items() if not k.endswith("|float")}
    load_dequantized(model, dequantize_arrays(packed, bits=meta["bits"], fmt=meta["format"].split("+")[0]))
    return cfg, model, meta
