"""Data pipeline: corpus sources -> byte-level BPE tokenizer -> token cache (memmap) -> grain batches.

    cache = prepare_data(cfg)                          # TokenCache (built once, then reused)
    it = make_train_iterator(cache.train, seq_len=cfg.data.seq_len, batch_size=B, seed=cfg.data.shuffle_seed)
    batch = next(it)                                   # int32[B, seq_len + 1]; inputs [:, :-1], targets [:, 1:]
    state = it.get_state()                             # JSON-serialisable; it.set_state(state) resumes exactly
    evals = val_batches(cache.val, seq_len=..., batch_size=B, n_batches=cfg.train.eval_batches)
"""

from efftrain.data.cache import TokenCache, build_token_cache
from efftrain.data.corpus import DataError, Document, corpus_identity, is_val, iter_documents
from efftrain.data.pipeline import make_train_iterator, num_windows, prepare_data, val_batches
from efftrain.data.tokenizer import EOT, eot_id, load_tokenizer, train_tokenizer

__all__ = [
    "DataError", "Document", "iter_documents", "is_val", "corpus_identity",
    "train_tokenizer", "load_tokenizer", "eot_id", "EOT",
    "TokenCache", "build_token_cache",
    "make_train_iterator", "num_windows", "val_batches", "prepare_data",
]
