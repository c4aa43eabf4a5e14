"""grain input pipeline over a flat token array.

Windows: window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``, for
``i < num_windows = (n_tokens - 1) // seq_len``. Consecutive windows share one token, so every token
(except a tail shorter than a window) is predicted exactly once per epoch; ``inputs = w[:-1]``,
``targets = w[1:]``. Windows run across document boundaries (documents are separated by
<|endoftext|>), as in GPT-style packed training.

Training order: ``MapDataset.range(num_windows).shuffle(seed).repeat()`` - a fresh permutation every
epoch (grain reseeds each epoch) - then ``.map(read window).batch(batch_size, drop_remainder=True)``.
Batches may straddle an epoch boundary, so no window is ever dropped. The iterator state is grain's
``{"next_index": k}``: JSON-serialisable, and ``set_state`` reproduces the following batches exactly.
Reading a window is a memmap slice (no worker processes, no read threads: the data is local).

Validation: `val_batches` takes the first windows of val in order, no shuffling. If val holds fewer
windows than ``batch_size``, it returns ONE batch with all available windows (a smaller batch) rather
than failing; pass ``allow_partial=False`` to get a DataError instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import grain
import numpy as np

from efftrain.data.corpus import DataError

if TYPE_CHECKING:
    from efftrain.config import Config
    from efftrain.data.cache import TokenCache

_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def num_windows(n_tokens: int, seq_len: int, batch_size: int = 1) -> int:
    """Number of training windows of seq_len+1 tokens (stride seq_len) in n_tokens tokens.
    DataError if there are fewer than `batch_size` windows."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    n = max(0, (int(n_tokens) - 1) // seq_len)
    if n < batch_size:
        raise DataError(f"{n_tokens} tokens give {n} windows of seq_len+1 = {seq_len + 1} tokens, "
                        f"fewer than batch_size {batch_size}: use more data or a smaller seq_len/batch_size")
    return n


class _ReadWindow:
    """Picklable window reader: index -> int32[seq_len + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len

    def __call__(self, i) -> np.ndarray:
        start = int(i) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)


def make_train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int) -> grain.IterDataset:
    """The grain IterDataset behind `make_train_iterator` (infinite; batches int32[B, seq_len+1])."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = num_windows(len(tokens), seq_len, batch_size)
    return (
        grain.MapDataset.range(n)
        .shuffle(seed=seed)
        .repeat()
        .map(_ReadWindow(tokens, seq_len))
        .batch(batch_size, drop_remainder=True)
        .to_iter_dataset(_READ_OPTIONS)
    )


def make_train_iterator(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Infinite iterator of shuffled np.int32 batches of shape [batch_size, seq_len + 1].

    ``it.get_state()`` is a JSON-serialisable dict; ``it.set_state(state)`` (on this iterator or on a
    fresh one built with the same arguments) makes the next batches identical to those that followed
    the saved state."""
    return iter(make_train_dataset(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed))


def val_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, n_batches: int,
                allow_partial: bool = True) -> list[np.ndarray]:
    """Deterministic validation batches: sequential windows from the start of `tokens`.

    Returns ``min(n_batches, num_windows // batch_size)`` batches of int32[batch_size, seq_len+1]. If
    there are fewer windows than batch_size, returns a single batch of all of them (allow_partial,
    the default) or raises DataError. DataError if there is not even one window."""
    if n_batches < 1 or batch_size < 1:
        raise DataError(f"n_batches and batch_size must be >= 1, got {n_batches} and {batch_size}")
    avail = num_windows(len(tokens), seq_len, 1 if allow_partial else batch_size)
    if avail < batch_size:
        batch_size, n = avail, 1
    else:
        n = min(n_batches, avail // batch_size)
    read = _ReadWindow(tokens, seq_len)
    return [np.stack([read(b * batch_size + j) for j in range(batch_size)]) for b in range(n)]


def prepare_data(cfg: Config, vocab_size: int | None = None,
                 progress: Callable[[str], None] | None = None) -> TokenCache:
    """Build or reuse the token cache for a full `Config`:
    ``build_token_cache(cfg.data, vocab_size or cfg.model.vocab_size, progress=progress)``."""
    from efftrain.data.cache import build_token_cache

    return build_token_cache(cfg.data, vocab_size if vocab_size is not None else cfg.model.vocab_size,
                             progress=progress)
