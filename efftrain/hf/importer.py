"""`efftrain import-hf`: a local Llama / DeepseekV3 checkpoint directory -> an efftrain run directory.

The run gets what `efftrain train` writes (efftrain.train.rundir): config.yaml (the model section from
config.json, efftrain.hf.mapping.efftrain_model; data, train and the rest at their defaults, with
data.tokenizer_path set to the run's tokenizer and train.max_steps 1, plus any --set overrides), run.json
(parameter counts, FLOPs, "imported_from"), tokenizer.json and ONE finalized series checkpoint (step 1, or
the step recorded by an efftrain export, or --step) holding the weights, fresh AdamW moments and the data-iterator
state of an untrained run. So `efftrain info`, `eval`, `eval --text`, `ptq` and grid branches
(train.init_from) work on it. RUN_DIR/hf_source/ keeps the source's config.json, generation_config.json,
tokenizer files and tensor dtypes, from which export-hf writes the same checkpoint back.

The tokenizer: efftrain's data pipeline separates documents with "<|endoftext|>" (efftrain.data.tokenizer).
A tokenizer that lacks it gets its eos token renamed to "<|endoftext|>" in RUN_DIR/tokenizer.json (same id,
same encoding of every text); hf_source/ keeps the original.

Nothing is downloaded: DIR is a local directory (a snapshot, e.g. from `huggingface-cli download`).
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from efftrain.config import ConfigError, apply_override, from_dict
from efftrain.hf import HFError
from efftrain.hf.export import HF_SOURCE, SOURCE_TENSORS
from efftrain.hf.files import (CONFIG, GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG, TOKENIZER_FILES,
                               TensorFiles, check_target, dump_json, output_dir, read_json)
from efftrain.hf.mapping import DEEPSEEK_V3, efftrain_model, from_hf, split_fused_experts

DEFAULT_SEQ_LEN = 256
DEFAULT_STEP = 1  # the series step of an imported checkpoint (a branch needs train.init_from_step >= 1)


# ---- the tokenizer ----------------------------------------------------------------------------------
def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def eos_token(src: Path, tok: dict, hf: dict) -> str | None:
    """The eos token's text: tokenizer_config.json / special_tokens_map.json, else config.json's
    eos_token_id looked up in tokenizer.json's added tokens."""
    for name in (TOKENIZER_CONFIG, "special_tokens_map.json"):
        if (src / name).is_file():
            content = _token_content(read_json(src / name).get("eos_token"))
            if content:
                return content
    eos_id = hf.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    for t in tok.get("added_tokens") or []:
        if t.get("id") == eos_id:
            return t.get("content")
    return None


def efftrain_tokenizer(src: Path, hf: dict) -> tuple[str, list[str]]:
    """(tokenizer.json text for the run, notes): the source's, with its eos token renamed to <|endoftext|>
    if it has no such token (module docstring)."""
    from tokenizers import Tokenizer

    from efftrain.data.tokenizer import EOT

    path = src / TOKENIZER
    if not path.is_file():
        hint = " (it has tokenizer.model: load it with AutoTokenizer and save_pretrained once to get tokenizer.json)" \
            if (src / "tokenizer.model").is_file() else ""
        raise HFError(f"{path}: not found: efftrain needs the fast tokenizer file{hint}")
    text = path.read_text(encoding="utf-8")
    try:
        original = Tokenizer.from_str(text)
        tok = json.loads(text)
    except Exception as e:  # tokenizers raises a bare Exception
        raise HFError(f"{path}: not a readable tokenizers file ({str(e).splitlines()[0][:200] if str(e) else e})") from None
    if original.token_to_id(EOT) is not None:
        return text, []
    eos = eos_token(src, tok, hf)
    if eos is None or original.token_to_id(eos) is None:
        raise HFError(f"{src}: the tokenizer has no '{EOT}' and no eos token (tokenizer_config.json eos_token or "
                      "config.json eos_token_id): efftrain needs a document separator")
    for t in tok.get("added_tokens") or []:
        if t.get("content") == eos:
            t["content"] = EOT
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict) and eos in vocab:
        tok["model"]["vocab"] = {(EOT if k == eos else k): v for k, v in vocab.items()}
    elif isinstance(vocab, list):
        for piece in vocab:
            if isinstance(piece, list) and piece and piece[0] == eos:
                piece[0] = EOT
    renamed = json.dumps(tok, ensure_ascii=False)
    check = Tokenizer.from_str(renamed)
    if check.token_to_id(EOT) != original.token_to_id(eos):
        raise HFError(f"{path}: could not name the eos token '{eos}' {EOT} (internal)")
    return renamed, [f"tokenizer: eos token '{eos}' (id {original.token_to_id(eos)}) is named {EOT} in the run's "
                     "tokenizer.json (efftrain's document separator); hf_source/ keeps the original"]


# ---- writing a run ----------------------------------------------------------------------------------
def set_variables(model, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays ("a/b/c" variable path -> values) into the model's variables, in their dtypes."""
    import jax.numpy as jnp

    for key, value in arrays.items():
        node = model
        parts = key.split("/")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        var = getattr(node, parts[-1])
        if tuple(var[...].shape) != tuple(value.shape):
            raise HFError(f"internal: {key} has shape {list(value.shape)}, the model {list(var[...].shape)}")
        var[...] = jnp.asarray(np.asarray(value, dtype=np.float32), var[...].dtype)


def save_run(run_dir: Path, cfg, model, tokenizer_json: str | bytes, *, step: int = 0, tokens_seen: int = 0,
             meta: dict | None = None, info: dict | None = None) -> None:
    """Write `model` as a run directory with one finalized series checkpoint at `step` (config.yaml,
    tokenizer.json, run.json, checkpoints/series/STEP), through the project's run-directory and checkpoint
    code; the optimizer state is AdamW's initial state and the data iterator at its start."""
    from efftrain.model.block import kv_cache_bytes_per_token
    from efftrain.model.transformer import flops_per_token, parameter_counts
    from efftrain.train.checkpoint import CheckpointStore
    from efftrain.train.optimizer import make_optimizer
    from efftrain.train.rundir import TOKENIZER as RUN_TOKENIZER, total_steps_of, write_config, write_run_file, \
        write_run_info
    from efftrain.train.step import init_state

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    write_run_file(run_dir / RUN_TOKENIZER, tokenizer_json if isinstance(tokenizer_json, bytes)
                   else tokenizer_json.encode("utf-8"))
    counts = parameter_counts(model)
    run_info = {"name": cfg.name, "config_hash": cfg.hash(), "params": counts,
                "flops_per_token": flops_per_token(model, cfg.data.seq_len), "tokens_per_step": cfg.tokens_per_step,
                "total_steps": total_steps_of(cfg), "series_steps": [step], "train_tokens_available": None,
                "val_tokens": None, "kv_cache_bytes_per_token_per_layer_bf16": kv_cache_bytes_per_token(cfg.model),
                "tokenizer": str(Path(cfg.data.tokenizer_path or run_dir / RUN_TOKENIZER)), **(info or {})}
    _, state = init_state(model, make_optimizer(cfg.optim, total_steps_of(cfg)))
    record = {"tokens_seen": int(tokens_seen), "target_tokens": None, "val_loss": None, "wall_time_s": 0.0,
              "config_hash": cfg.hash(), "time": time.time(), **(meta or {})}
    store = CheckpointStore(run_dir, async_save=False)
    try:
        store.save("series", step, state, {"next_index": 0}, record)
        store.wait()
    finally:
        store.close()
    write_run_info(run_dir, run_info)


# ---- import -----------------------------------------------------------------------------------------
def _tensor_reader(files: TensorFiles):
    """(shapes, read) over the files' tensors, with transformers 5's fused expert tensors also visible under
    their per-expert names (mapping.split_fused_experts)."""
    virtual = split_fused_experts(files.shapes)
    fused = {v[0] for v in virtual.values()}
    shapes = {k: s for k, s in files.shapes.items() if k not in fused}
    for name, (src, _, rows) in virtual.items():
        shape = files.shapes[src][1:]
        shapes[name] = ((rows.stop - rows.start),) + tuple(shape[1:]) if rows is not None else tuple(shape)
    cache: dict[str, np.ndarray] = {}

    def read(name: str) -> np.ndarray:
        if name not in virtual:
            return files.read(name)
        src, e, rows = virtual[name]
        if src not in cache:
            cache.clear()
            cache[src] = files.read(src)
        a = cache[src][e]
        return a if rows is None else a[rows]

    return shapes, read


def import_hf(src: str | Path, out: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
              step: int | None = None, tokens: int | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Make run directory `out` from the local checkpoint directory `src`; returns `out`. HFError (one line)
    for missing files, an architecture or option efftrain lacks (the config.json field named), or weights
    that do not fit config.json. Nothing is written unless all of it is."""
    from efftrain.hf.export import flat_variables
    from efftrain.model.transformer import build_model

    say = log or (lambda msg: None)
    src, out = Path(src).expanduser(), Path(out)
    if step is not None and step < 0:
        raise HFError(f"--step {step}: a series step is >= 0")
    if not src.is_dir():
        raise HFError(f"{src}: not a local directory (nothing is downloaded: pass the path of a local snapshot, "
                      "e.g. one from `huggingface-cli download`)")
    hf = read_json(src / CONFIG, "the model's config")
    arch, model_raw, notes = efftrain_model(hf)
    exported = hf.get("efftrain") if isinstance(hf.get("efftrain"), dict) else {}
    tokenizer_json, tok_notes = efftrain_tokenizer(src, hf)
    files = TensorFiles(src)
    check_target(out, None)

    final = out.absolute()
    max_pos = hf.get("max_position_embeddings")
    raw: dict[str, Any] = {
        "name": exported.get("run_name") or src.name or "imported",
        "model": model_raw,
        "data": {"tokenizer_path": str(final / TOKENIZER),
                 "seq_len": min(DEFAULT_SEQ_LEN, int(max_pos)) if max_pos else DEFAULT_SEQ_LEN},
        "train": {"max_steps": 1},
    }
    try:
        for assignment in overrides:
            raw = apply_override(raw, assignment)
        cfg = from_dict(raw)
    except ConfigError as e:
        raise HFError(f"the efftrain config made from {src / CONFIG}{' and --set' if overrides else ''} does not "
                      f"validate: {e}") from None

    from tokenizers import Tokenizer

    n_tok = Tokenizer.from_str(tokenizer_json).get_vocab_size()
    if n_tok > cfg.model.vocab_size:
        raise HFError(f"{src / TOKENIZER} has {n_tok} tokens but config.json vocab_size is {cfg.model.vocab_size}")

    model = build_model(cfg.model, cfg.fp8, seed=cfg.train.seed)
    eff = flat_variables(model)
    shapes, read = _tensor_reader(files)
    rope_interleave = bool(hf.get("rope_interleave", True)) if arch == DEEPSEEK_V3 else True
    arrays, weight_notes = from_hf(cfg.model, {k: v.shape for k, v in eff.items()}, shapes, read, rope_interleave)
    del eff
    set_variables(model, arrays)
    del arrays
    # an efftrain export records its checkpoint's step and tokens; else step 1 (train.init_from_step >= 1)
    step = step if step is not None else int(exported.get("step") or DEFAULT_STEP)
    tokens_seen = tokens if tokens is not None else int(exported.get("tokens_seen") or 0)
    notes = notes + tok_notes + weight_notes
    origin = {"path": str(src.resolve()), "architecture": arch, "notes": notes,
              "dtypes": dict(sorted(collections.Counter(files.dtypes.values()).items()))}
    with output_dir(out) as tmp:
        save_run(tmp, cfg, model, tokenizer_json, step=step, tokens_seen=tokens_seen,
                 meta={"imported_from": str(src.resolve())}, info={"imported_from": origin})
        keep = tmp / HF_SOURCE
        keep.mkdir()
        for name in (CONFIG, GENERATION_CONFIG) + TOKENIZER_FILES:
            if (src / name).is_file():
                (keep / name).write_bytes((src / name).read_bytes())
        (keep / SOURCE_TENSORS).write_text(dump_json(files.dtypes), encoding="utf-8")
    say(f"import-hf: {src} ({arch}) -> {out}: series checkpoint at step {step}, "
        f"{sum(int(np.prod(s)) for s in files.shapes.values()):,} parameters in the files")
    for note in notes:
        say(f"note: {note}")
    return out
