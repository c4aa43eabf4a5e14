"""`efftrain eval RUN_DIR --text FILE`: the loss of a run's model on a user's text file.

The file (UTF-8) is encoded with the run's tokenizer (RUN_DIR/tokenizer.json, no tokens added) and
preceded by the run's document separator <|endoftext|>, which precedes every document the run trained on
(for a run made by import-hf: its source's eos token), so every token of the text is scored, the first one
too. The ids are cut like training windows: window i = ids[i·T : i·T + T + 1] (T = data.seq_len), every
token predicted once with up to T tokens of context; a last, shorter window scores the rest. Reported:
  loss           mean token cross-entropy over the text's tokens (nats)
  perplexity     exp(loss)
  bits_per_byte  total cross-entropy in bits / UTF-8 bytes of the file (comparable across tokenizers)
  text_tokens    tokens of the text (= scored tokens), windows (incl. the short last one)
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from efftrain.hf import HFError


def text_ids(run_dir: Path, path: Path) -> tuple[np.ndarray, int]:
    """([separator] + the text's ids, the file's UTF-8 byte count)."""
    from efftrain.data.tokenizer import eot_id, load_tokenizer
    from efftrain.train.rundir import TOKENIZER

    path = Path(path)
    if not path.is_file():
        raise HFError(f"--text {path}: file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise HFError(f"--text {path}: not UTF-8 text ({e})") from None
    tok = load_tokenizer(Path(run_dir) / TOKENIZER)
    ids = tok.encode(text, add_special_tokens=False).ids
    if not ids:
        raise HFError(f"--text {path}: no text to score (0 tokens)")
    return np.asarray([eot_id(tok)] + ids, np.int32), len(text.encode("utf-8"))


def windows_of(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(full windows [n, seq_len + 1], the shorter last window or None)."""
    n_full = (len(ids) - 1) // seq_len
    full = np.stack([ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(n_full)]) if n_full else \
        np.zeros((0, seq_len + 1), np.int32)
    rest = ids[n_full * seq_len:]
    return full, (rest if len(rest) > 1 else None)


def text_loss(model, cfg, ids: np.ndarray, n_bytes: int) -> dict[str, Any]:
    """loss, perplexity, bits_per_byte, text_tokens, windows of `model` on ids ([separator] + text)."""
    import jax.numpy as jnp
    from flax import nnx

    from efftrain.eval import EvalSet, eval_batch_size, scores, window_loss_fn

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = window_loss_fn(graphdef)
    full, last = windows_of(ids, cfg.data.seq_len)
    total = 0.0
    if len(full):
        per_window = scores(fn, EvalSet(full, eval_batch_size(cfg)), params, rest)
        total += float(np.sum(per_window.astype(np.float64))) * cfg.data.seq_len
    if last is not None:
        total += float(np.asarray(fn(params, rest, jnp.asarray(last[None])))[0]) * (len(last) - 1)
    scored = len(ids) - 1
    loss = total / scored
    return {"loss": loss, "perplexity": math.exp(min(loss, 700)), "bits_per_byte": total / math.log(2) / n_bytes,
            "text_tokens": scored, "windows": len(full) + (last is not None)}


def eval_text(run_dir: str | Path, path: str | Path, *, steps: list[int] | None = None,
              tokens: list[int] | None = None, quantized: str | None = None,
              progress: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """One row per checkpoint (those of `steps` / nearest to `tokens` / all, or the saved quantized one)."""
    from efftrain.eval import select_checkpoints
    from efftrain.train.rundir import load_model, load_run_config

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ids, n_bytes = text_ids(run_dir, path)
    if ids.max() >= cfg.model.vocab_size:
        raise HFError(f"the run's tokenizer gives id {int(ids.max())} >= model.vocab_size {cfg.model.vocab_size}")
    rows = []
    if quantized is not None:
        from efftrain.quant.sweep import load_quantized

        _, model, meta = load_quantized(run_dir, quantized)
        row = {"checkpoint": quantized, "step": meta["step"], "tokens": meta["tokens"], "text": str(path),
               **text_loss(model, cfg, ids, n_bytes)}
        return [row]
    for meta in select_checkpoints(run_dir, steps, tokens):
        _, model, _ = load_model(run_dir, meta["step"])
        row = {"step": meta["step"], "tokens": meta["tokens_seen"], "text": str(path),
               **text_loss(model, cfg, ids, n_bytes)}
        rows.append(row)
        if progress:
            progress(row)
    return rows
