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

One process of a multi-process run (efftrain.train.distributed) passes ``rows``, the rows of each
global batch its devices hold: the same order is batched as window indices and only those rows are
read (``order.batch(batch_size).map(read rows)``), so row r of batch k is window ``order[k * batch_size
+ r]`` in every process, the union over processes is the one-process batch, and the state is the
same ``{"next_index": k}`` (a checkpoint moves between process counts).

Validation (the eval set): a seeded random sample of val windows spread over the whole val split.
The val tokens are cut into disjoint windows of seq_len+1 tokens (window ``j`` is
``tokens[j*(seq_len+1) : (j+1)*(seq_len+1)]``, ``val_window_count = n_tokens // (seq_len+1)``: no
token is shared by two windows, so per-window losses are separate measurements). `val_window_indices`
draws ``min(n, available)`` of them uniformly without replacement - the first n of
``np.random.default_rng(seed).permutation(available)`` - and sorts them. The sample depends only on
the number of val tokens, seq_len, n and the eval seed (not on train.seed or data.shuffle_seed), so
every checkpoint and every replicate of a run is evaluated on identical windows; a smaller sample of
the same seed is a subset of a larger one. `val_windows` reads the sampled windows.

`val_batches` (training-time val loss, `efftrain eval`) takes ``n_batches * batch_size`` sampled
windows, rounded down to whole batches, in sampled order; if val holds fewer windows than
``batch_size``, it returns ONE batch with all available windows (a smaller batch) rather than failing;
pass ``allow_partial=False`` to get a DataError instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import grain
import numpy as np

from efftrain.data.cache import TokenCache, build_token_cache
from efftrain.data.corpus import DataError

if TYPE_CHECKING:
    from efftrain.config import Config

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


class _ReadRows:
    """Picklable reader of some rows of a batch of window indices: int[B] -> int32[len(rows), seq_len + 1]."""

    def __init__(self, tokens: np.ndarray, seq_len: int, rows: np.ndarray):
        self.tokens, self.seq_len, self.rows = tokens, seq_len, rows

    def __call__(self, windows) -> np.ndarray:
        return read_windows(self.tokens, np.asarray(windows)[self.rows] * self.seq_len, self.seq_len + 1)


def make_train_dataset(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                       rows: np.ndarray | None = None) -> grain.IterDataset:
    """The grain IterDataset behind `make_train_iterator` (infinite; batches int32[B, seq_len+1], or
    int32[len(rows), seq_len+1]: those rows of each batch)."""
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    n = num_windows(len(tokens), seq_len, batch_size)
    order = grain.MapDataset.range(n).shuffle(seed=seed).repeat()
    if rows is None:
        batches = order.map(_ReadWindow(tokens, seq_len)).batch(batch_size, drop_remainder=True)
    else:
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= batch_size):
            raise DataError(f"batch rows {rows.min()}..{rows.max()} are outside a batch of {batch_size}")
        batches = order.batch(batch_size, drop_remainder=True).map(_ReadRows(tokens, seq_len, rows))
    return batches.to_iter_dataset(_READ_OPTIONS)


def make_train_iterator(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                        rows: np.ndarray | None = None) -> grain.DatasetIterator:
    """Infinite iterator of shuffled np.int32 batches of shape [batch_size, seq_len + 1] (with `rows`:
    only those rows of each batch, [len(rows), seq_len + 1]; module docstring).

    ``it.get_state()`` is a JSON-serialisable dict; ``it.set_state(state)`` (on this iterator or on a
    fresh one built with the same arguments, with or without `rows`) makes the next batches identical
    to those that followed the saved state."""
    return iter(make_train_dataset(tokens, seq_len=seq_len, batch_size=batch_size, seed=seed, rows=rows))


def val_window_count(n_tokens: int, seq_len: int) -> int:
    """Number of disjoint val windows of seq_len+1 tokens in n_tokens tokens (DataError if none)."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    n = max(0, int(n_tokens) // (seq_len + 1))
    if n < 1:
        raise DataError(f"{n_tokens} val tokens give 0 windows of seq_len+1 = {seq_len + 1} tokens: "
                        "use more val data or a smaller seq_len")
    return n


def val_window_indices(n_tokens: int, seq_len: int, n_windows: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(n_windows, val_window_count)`` disjoint val windows, drawn uniformly
    without replacement with ``np.random.default_rng(seed)`` (see the module docstring)."""
    if n_windows < 1:
        raise DataError(f"the number of val windows must be >= 1, got {n_windows}")
    avail = val_window_count(n_tokens, seq_len)
    order = np.random.default_rng(seed).permutation(avail)
    return np.sort(order[:min(int(n_windows), avail)])


def val_windows(tokens: np.ndarray, *, seq_len: int, n_windows: int, seed: int = 0) -> np.ndarray:
    """The sampled val windows, int32[min(n_windows, available), seq_len + 1], in index order."""
    idx = val_window_indices(len(tokens), seq_len, n_windows, seed)
    return read_windows(tokens, idx * (seq_len + 1), seq_len + 1)  # stride seq_len+1: disjoint windows


def read_windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """int32[len(starts), length]: ``tokens[s : s + length]`` for each start (one gather, memmap-friendly)."""
    starts = np.asarray(starts, np.int64)
    return np.asarray(tokens[starts[:, None] + np.arange(length)], dtype=np.int32)


def val_set_windows(n_tokens: int, *, seq_len: int, batch_size: int, n_batches: int,
                    allow_partial: bool = True) -> tuple[int, int]:
    """(windows, batch size) of the training-time val set: n_batches * batch_size windows rounded down
    to whole batches, or one smaller batch of every window when val has fewer than batch_size."""
    if n_batches < 1 or batch_size < 1:
        raise DataError(f"n_batches and batch_size must be >= 1, got {n_batches} and {batch_size}")
    avail = val_window_count(n_tokens, seq_len)
    if avail < batch_size:
        if not allow_partial:
            raise DataError(f"{n_tokens} val tokens give {avail} windows of seq_len+1 = {seq_len + 1} tokens, "
                            f"fewer than batch_size {batch_size}")
        return avail, avail
    return min(n_batches, avail // batch_size) * batch_size, batch_size


def val_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, n_batches: int, seed: int = 0,
                allow_partial: bool = True) -> list[np.ndarray]:
    """Validation batches of seeded, spread val windows (see `val_set_windows` and the module docstring).

    Returns ``min(n_batches, available // batch_size)`` batches of int32[batch_size, seq_len+1]. If
    there are fewer windows than batch_size, returns a single batch of all of them (allow_partial,
    the default) or raises DataError. DataError if there is not even one window."""
    n, batch_size = val_set_windows(len(tokens), seq_len=seq_len, batch_size=batch_size, n_batches=n_batches,
                                    allow_partial=allow_partial)
    windows = val_windows(tokens, seq_len=seq_len, n_windows=n, seed=seed)
    return [windows[i:i + batch_size] for i in range(0, n, batch_size)]


def prepare_data(cfg: Config, vocab_size: int | None = None,
                 progress: Callable[[str], None] | None = None) -> TokenCache:
    """Build or reuse the token cache for a full `Config`:
    ``build_token_cache(cfg.data, vocab_size or cfg.model.vocab_size, progress=progress)``."""

    return build_token_cache(cfg.data, vocab_size if vocab_size is not None else cfg.model.vocab_size,
                             progress=progress)
