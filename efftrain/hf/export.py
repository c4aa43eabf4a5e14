"""`efftrain export-hf`: one checkpoint of a run -> a transformers checkpoint directory.

    DIR/model.safetensors        the main model's weights (efftrain.hf.mapping.entries: names, transposes,
                                 RoPE rows); MTP modules are left out (noted in the metadata)
    DIR/config.json              LlamaConfig or DeepseekV3Config fields + "efftrain": {...} metadata (run,
                                 checkpoint, step, tokens, notes, and "quantized": {...} for a saved
                                 quantized checkpoint, exported as its dequantized weights)
    DIR/generation_config.json   bos / eos / pad token ids
    DIR/tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                 the run's tokenizer as a PreTrainedTokenizerFast: <|endoftext|> as bos, eos
                                 and pad (the run's document separator), no token added by encode, and
                                 split_special_tokens (a literal "<|endoftext|>" in text is ordinary bytes,
                                 as in efftrain). A run made by import-hf exports its source's tokenizer files.

Everything is written into a temporary directory that is renamed to DIR only when whole
(efftrain.hf.files.output_dir). Loading the run needs JAX (orbax); the writing needs numpy and safetensors.
"""

from __future__ import annotations

from collections import Counter
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

from efftrain.hf import HFError
from efftrain.hf.files import (CONFIG, GENERATION_CONFIG, SPECIAL_TOKENS_MAP, TOKENIZER, TOKENIZER_CONFIG,
                               TOKENIZER_FILES, WEIGHTS, check_target, dump_json, numpy_dtype, output_dir,
                               read_json, save_tensors)
from efftrain.hf.mapping import architecture_for, export_notes, hf_config, to_hf

DTYPES = ("auto", "float32", "bfloat16", "float16")
HF_SOURCE = "hf_source"  # RUN_DIR/hf_source/: what import-hf kept of its source (efftrain.hf.importer)
SOURCE_TENSORS = "tensors.json"  # RUN_DIR/hf_source/tensors.json: {tensor name: safetensors dtype}
FP32_TENSORS = (".mlp.gate.weight", ".mlp.gate.e_score_correction_bias")  # HF keeps the router in fp32
QUANT_KEYS = ("method", "method_label", "bits", "group_size", "format", "symmetric", "eff_bits", "qid", "kl",
              "params_quantized", "step", "tokens")
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def efftrain_version() -> str:
    try:
        return importlib_metadata.version("efftrain")
    except importlib_metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def flat_variables(model) -> dict[str, np.ndarray]:
    """Every variable of an efftrain model (Params and e.g. MoE router biases): "a/b/c" path -> numpy array."""
    from flax import nnx

    return {"/".join(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model))}


def _load(run_dir: Path, step: int | None, tokens: int | None, quantized: str | None):
    """(cfg, model, checkpoint description, step, tokens_seen, quantized metadata or None)."""
    if quantized is not None:
        from efftrain.quant.sweep import load_quantized  # lazy: JAX

        cfg, model, meta = load_quantized(run_dir, quantized)
        info = {k: meta[k] for k in QUANT_KEYS if k in meta}
        return cfg, model, f"quantized/{quantized}", meta.get("step"), meta.get("tokens"), {"name": quantized, **info}
    from efftrain.eval import select_checkpoints  # lazy: JAX
    from efftrain.train.rundir import load_model

    chosen = select_checkpoints(run_dir, [step] if step is not None else None, [tokens] if tokens is not None else None)
    meta = chosen[-1]
    cfg, model, _ = load_model(run_dir, meta["step"])
    return cfg, model, f"series/{meta['step']}", meta["step"], meta.get("tokens_seen"), None


def source_dir(run_dir: Path, cfg) -> Path | None:
    """What import-hf kept of the checkpoint this run came from: RUN_DIR/hf_source/, or that of the run
    whose tokenizer it uses (a run branched from an imported one with train.init_from shares its
    data.tokenizer_path); None for a run trained from scratch."""
    candidates = [run_dir / HF_SOURCE]
    if cfg.data.tokenizer_path:
        candidates.append(Path(cfg.data.tokenizer_path).expanduser().parent / HF_SOURCE)
    return next((c for c in candidates if (c / CONFIG).is_file() and (c / TOKENIZER).is_file()), None)


def _tokenizer_files(run_dir: Path, source: Path | None, seq_len: int) -> dict[str, bytes | str]:
    """File name -> content of the exported tokenizer."""
    if source is not None and (source / TOKENIZER).is_file():
        return {name: (source / name).read_bytes() for name in TOKENIZER_FILES if (source / name).is_file()}
    from efftrain.data.tokenizer import EOT

    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "split_special_tokens": True, "model_max_length": seq_len,
              "model_input_names": ["input_ids", "attention_mask"]}
    return {TOKENIZER: (run_dir / TOKENIZER).read_bytes(), TOKENIZER_CONFIG: dump_json(config),
            SPECIAL_TOKENS_MAP: dump_json(special)}


def _run_eot(run_dir: Path) -> int:
    from efftrain.data.tokenizer import eot_id, load_tokenizer  # DataError if missing / unreadable

    return eot_id(load_tokenizer(run_dir / TOKENIZER))


def _cast(tensors: dict[str, np.ndarray], dtype: str, default: str, source_dtypes: dict[str, str]) -> dict:
    """Each tensor in its export dtype: `dtype`, or with auto the source checkpoint's dtype of that tensor
    (runs made by import-hf) else `default`; the router's weight and bias stay float32 unless the source had
    them otherwise (transformers keeps them in fp32)."""
    out = {}
    for name, arr in tensors.items():
        if dtype == "auto" and name in source_dtypes:
            want = SAFETENSORS_DTYPES.get(source_dtypes[name], default)
        elif name.endswith(FP32_TENSORS):
            want = "float32"
        else:
            want = default if dtype == "auto" else dtype
        out[name] = np.asarray(arr).astype(numpy_dtype(want), copy=False)
    return out


def export_hf(run_dir: str | Path, out: str | Path, *, step: int | None = None, tokens: int | None = None,
              quantized: str | None = None, dtype: str = "auto", force: bool = False,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the checkpoint (series `step`, nearest to `tokens`, the newest, or the saved quantized one named
    `quantized`) of `run_dir` to `out`; returns the config.json written. HFError (one line) for what HF
    cannot represent, before anything is loaded."""
    from efftrain.train.rundir import load_run_config  # lazy: JAX

    say = log or (lambda msg: None)
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise HFError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if quantized is not None and (step is not None or tokens is not None):
        raise HFError("--quantized names one checkpoint already; drop --step / --tokens")
    cfg = load_run_config(run_dir)
    arch = architecture_for(cfg.model)
    check_target(out, force)
    source = source_dir(run_dir, cfg)
    source_config = read_json(source / CONFIG) if source else {}
    source_dtypes = read_json(source / SOURCE_TENSORS) if source and (source / SOURCE_TENSORS).is_file() else {}
    eot = None if source else _run_eot(run_dir)

    cfg, model, checkpoint, at_step, tokens_seen, quant = _load(run_dir, step, tokens, quantized)
    rope_interleave = bool(source_config.get("rope_interleave", True))
    tensors = to_hf(cfg.model, flat_variables(model), rope_interleave=rope_interleave)
    del model
    tensors = _cast(tensors, dtype, cfg.model.param_dtype, source_dtypes)
    main_dtype = Counter(str(a.dtype) for a in tensors.values() if a.size).most_common(1)[0][0]

    if source:
        token_ids = {k: source_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        max_pos = int(source_config.get("max_position_embeddings") or cfg.data.seq_len)
    else:
        token_ids = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}
        max_pos = cfg.data.seq_len
    config = hf_config(cfg.model, arch, dtype=main_dtype, token_ids=token_ids, max_position_embeddings=max_pos,
                       rope_interleave=rope_interleave)
    if source and "initializer_range" in source_config:
        config["initializer_range"] = source_config["initializer_range"]
    notes = export_notes(cfg.model, cfg.fp8.enabled)
    meta: dict[str, Any] = {"exported_by": f"efftrain {efftrain_version()}", "run": str(run_dir.resolve()),
                            "run_name": cfg.name, "config_hash": cfg.hash(), "checkpoint": checkpoint,
                            "step": at_step, "tokens_seen": tokens_seen, "notes": notes}
    if quant is not None:
        meta["quantized"] = {**quant, "dequantized": True,
                             "weights": f"the dequantized values (codes x scales) in {main_dtype}"}
    if source:
        meta["imported_from"] = str(source)
    config["efftrain"] = meta
    generation = {"_from_model_config": False, **{k: v for k, v in token_ids.items() if v is not None}}
    if source and (source / GENERATION_CONFIG).is_file():
        generation = read_json(source / GENERATION_CONFIG)
    tokenizer = _tokenizer_files(run_dir, source, cfg.data.seq_len)

    with output_dir(out, force=force) as tmp:
        save_tensors(tmp / WEIGHTS, tensors)
        (tmp / CONFIG).write_text(dump_json(config), encoding="utf-8")
        (tmp / GENERATION_CONFIG).write_text(dump_json(generation), encoding="utf-8")
        for name, content in tokenizer.items():
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    n = sum(int(a.size) for a in tensors.values())
    say(f"export-hf: {run_dir} {checkpoint} -> {out} ({arch}, {len(tensors)} tensors, {n:,} parameters, "
        f"{main_dtype})")
    for note in notes:
        say(f"note: {note}")
    return config

