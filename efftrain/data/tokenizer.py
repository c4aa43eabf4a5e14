"""Byte-level BPE tokenizer (GPT-2 style) trained with HF `tokenizers`.

* Model: BPE over bytes. The pre-tokenizer is ``ByteLevel(add_prefix_space=False)`` (GPT-2 regex
  split, each byte mapped to a printable character) and the decoder is ``ByteLevel``, so
  ``decode(encode(text)) == text`` for any Unicode text - no normaliser, no unknown token.
* The initial alphabet is all 256 byte symbols, so every byte sequence is encodable even if it never
  occurred in the training text; hence ``vocab_size >= 257``.
* ``<|endoftext|>`` is the only special token and has id 0 (`EOT`); the token cache appends it after
  every document. Literal ``<|endoftext|>`` text inside a document is encoded as ordinary bytes
  (``encode_special_tokens = True``, set on every tokenizer returned here) so documents can never
  inject a document boundary.
* Training is deterministic for a given text stream and ``tokenizers`` version (tested).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from efftrain.data.corpus import DataError

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def _finish(tok: Tokenizer) -> Tokenizer:
    tok.encode_special_tokens = True
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: Path) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries on `texts`; save it as JSON at `path`
    (a file path, written atomically; parent directories are created)."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level BPE (need >= {MIN_VOCAB})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.token_to_id(EOT) != 0:  # pragma: no cover - guaranteed by the trainer's ordering
        raise DataError(f"internal: {EOT} did not get id 0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return _finish(tok)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json; DataError if it is missing, does not parse, or lacks <|endoftext|>."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise DataError(f"cannot parse tokenizer file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if tok.token_to_id(EOT) is None:
        raise DataError(f"tokenizer {path} has no '{EOT}' token (needed as the document separator)")
    return _finish(tok)


def eot_id(tok: Tokenizer) -> int:
    """Id of <|endoftext|> (0 for tokenizers trained here)."""
    i = tok.token_to_id(EOT)
    if i is None:
        raise DataError(f"tokenizer has no '{EOT}' token")
    return i
