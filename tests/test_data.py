"""Tests for efftrain.data: corpus sources, tokenizer, token cache, grain pipeline.

Small on purpose (vocab 300-512, a few dozen documents, tmp cache dirs): the whole file runs in a few
seconds on 2 CPU cores and never touches the network.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from efftrain.config import DataConfig, from_dict
from efftrain.data import (
    EOT,
    DataError,
    Document,
    TokenCache,
    build_token_cache,
    corpus_identity,
    eot_id,
    is_val,
    iter_documents,
    load_tokenizer,
    make_train_iterator,
    num_windows,
    prepare_data,
    train_tokenizer,
    val_batches,
)
from efftrain.data import cache as cache_mod
from efftrain.data.corpus import stdlib_root

CODE_SAMPLES = [
    "def greet(name: str) -> str:\n    return f'héllo, {name} ∑ → 🐍'\n",
    "class Ünïcode:\n\t'''docstring with tabs\tand CRLF'''\r\n    x = [1, 2, 3]  # 日本語のコメント\n",
    "import os\nprint(os.path.join('a', 'b'))\n\n\n    \n",
    "s = '<|endoftext|> inside a string must stay text'\nemoji = '👩‍💻🏳️‍🌈'\n",
    "for i in range(10):\n    if i % 2:\n        continue\n    yield i ** 2\n",
] * 8


def stdlib_cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("max_documents", 60)
    kw.setdefault("seq_len", 32)
    kw.setdefault("val_fraction", 0.2)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("tokenizer_train_chars", 200_000)
    return DataConfig(source="pystdlib", **kw)


def write_files(directory: Path, texts: list[str], suffix: str = ".txt") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, t in enumerate(texts):
        p = directory / f"doc{i:03d}{suffix}"
        p.write_text(t, encoding="utf-8")
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
def test_tokenizer_round_trip_and_eot(tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    tok = train_tokenizer(CODE_SAMPLES, 320, path)
    assert path.is_file()
    assert eot_id(tok) == 0 and tok.token_to_id(EOT) == 0
    assert tok.get_vocab_size() == 320
    unseen = "λx: x ≠ ∞  # never seen: Ω ∮ 😀 \x00\x7f\u2028 ok\r\n"
    for text in CODE_SAMPLES[:5] + [unseen]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert 0 not in ids  # literal <|endoftext|> text is encoded as bytes, never as EOT
    loaded = load_tokenizer(path)
    assert loaded.encode(unseen).ids == tok.encode(unseen).ids
    assert loaded.decode(loaded.encode(CODE_SAMPLES[3]).ids) == CODE_SAMPLES[3]


def test_tokenizer_training_is_deterministic(tmp_path):
    a = train_tokenizer(CODE_SAMPLES, 400, tmp_path / "a.json")
    b = train_tokenizer(iter(CODE_SAMPLES), 400, tmp_path / "b.json")
    assert a.get_vocab() == b.get_vocab()
    ja, jb = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert ja["model"]["merges"] == jb["model"]["merges"] and ja["model"]["merges"]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not a tokenizer")
    with pytest.raises(DataError, match="cannot parse tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer(CODE_SAMPLES, 100, tmp_path / "t.json")


# ----------------------------------------------------------------------------------------------
# Corpus sources
# ----------------------------------------------------------------------------------------------
def test_pystdlib_max_documents_and_identity(tmp_path):
    cfg = stdlib_cfg(tmp_path, max_documents=25)
    docs = list(iter_documents(cfg))
    assert len(docs) == 25
    ids = [d.doc_id for d in docs]
    assert ids == sorted(ids)
    root = stdlib_root()
    for d in docs:
        assert d.doc_id.endswith(".py") and not d.doc_id.startswith("/")
        assert "site-packages" not in d.doc_id
        assert (root / d.doc_id).read_bytes().decode("utf-8") == d.text
        assert d.text.strip()
    ident = corpus_identity(cfg)
    assert ident == corpus_identity(cfg)
    assert ident["num_documents"] == 25 and ident["source"] == "pystdlib"
    assert ident["python"].endswith(".".join(map(str, sys.version_info[:3])))
    json.dumps(ident)
    assert corpus_identity(stdlib_cfg(tmp_path, max_documents=26))["content_sha256"] != ident["content_sha256"]


def test_files_source_globs_sorted_relative_ids(tmp_path):
    write_files(tmp_path / "data" / "b", ["bee\n", "   \n"])  # whitespace-only doc is skipped
    write_files(tmp_path / "data" / "a", ["ay\n"])
    cfg = DataConfig(source="files", paths=[str(tmp_path / "data" / "**" / "*.txt"),
                                            str(tmp_path / "data" / "a" / "doc000.txt")])  # duplicate
    docs = list(iter_documents(cfg))
    assert docs == [Document("a/doc000.txt", "ay\n"), Document("b/doc000.txt", "bee\n")]
    # moving the data folder changes neither ids nor identity
    moved = tmp_path / "elsewhere"
    (tmp_path / "data").rename(moved)
    cfg2 = DataConfig(source="files", paths=[str(moved / "**" / "*.txt")])
    assert corpus_identity(cfg2)["content_sha256"] == corpus_identity(
        DataConfig(source="files", paths=[str(moved / "a" / "*.txt"), str(moved / "b" / "*.txt")]))["content_sha256"]
    assert [d.doc_id for d in iter_documents(cfg2)] == ["a/doc000.txt", "b/doc000.txt"]


def test_jsonl_source(tmp_path):
    p = tmp_path / "c.jsonl"
    rows = [{"text": "first doc\n", "id": 1}, {"text": "line\u2028sep inside"}, {"body": "x", "text": None},
            {"text": "third"}]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n\n"
                 + "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
    docs = list(iter_documents(DataConfig(source="jsonl", paths=[str(p)])))
    assert docs == [Document("c.jsonl:1", "first doc\n"), Document("c.jsonl:2", "line\u2028sep inside"),
                    Document("c.jsonl:5", "third")]
    assert len(list(iter_documents(DataConfig(source="jsonl", paths=[str(p)], max_documents=2)))) == 2
    q = tmp_path / "d.jsonl"
    q.write_text(json.dumps({"content": "custom field"}) + "\n")
    assert [d.text for d in iter_documents(DataConfig(source="jsonl", paths=[str(q)], text_field="content"))] == \
        ["custom field"]


def test_parquet_source(tmp_path):
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "gamma ∑"], "n": [1, 2, 3]}), p, row_group_size=2)
    docs = list(iter_documents(DataConfig(source="parquet", paths=[str(tmp_path / "*.parquet")])))
    assert docs == [Document("c.parquet:0", "alpha"), Document("c.parquet:2", "gamma ∑")]


def test_hf_source_with_fake_datasets(monkeypatch):
    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": "one"}, {"text": "two"}, {"text": "three"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    cfg = DataConfig(source="hf", hf_dataset="org/ds", hf_config="c", hf_split="train", max_documents=2)
    docs = list(iter_documents(cfg))
    assert [d.text for d in docs] == ["one", "two"] and docs[0].doc_id == "org/ds/c/train:0"
    assert calls == {"name": "org/ds", "config": "c", "split": "train", "streaming": True}


# ----------------------------------------------------------------------------------------------
# DataError cases
# ----------------------------------------------------------------------------------------------
def test_corpus_errors(tmp_path, monkeypatch):
    def docs(**kw):
        return list(iter_documents(DataConfig(**kw)))

    with pytest.raises(DataError, match="not found: .*nope.txt"):
        docs(source="files", paths=[str(tmp_path / "nope.txt")])
    with pytest.raises(DataError, match="matched no files"):
        docs(source="files", paths=[str(tmp_path / "*.md")])
    with pytest.raises(DataError, match="is a directory"):
        docs(source="files", paths=[str(tmp_path)])
    with pytest.raises(DataError, match="needs data.paths"):
        docs(source="files")
    write_files(tmp_path / "blank", ["", "  \n\t"])
    with pytest.raises(DataError, match="empty corpus"):
        docs(source="files", paths=[str(tmp_path / "blank" / "*.txt")])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\xff\xfe\x00")
    with pytest.raises(DataError, match="cannot decode .*bin.txt"):
        docs(source="files", paths=[str(binary)])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        docs(source="jsonl", paths=[str(bad)])
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="nofield.jsonl:1: no field 'text'"):
        docs(source="jsonl", paths=[str(nofield)])
    notobj = tmp_path / "list.jsonl"
    notobj.write_text('["text"]\n')
    with pytest.raises(DataError, match="expected a JSON object"):
        docs(source="jsonl", paths=[str(notobj)])
    notstr = tmp_path / "num.jsonl"
    notstr.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="is a int, not a string"):
        docs(source="jsonl", paths=[str(notstr)])

    pqf = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a"]}), pqf)
    with pytest.raises(DataError, match="no column 'text'"):
        docs(source="parquet", paths=[str(pqf)])
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet at all")
    with pytest.raises(DataError, match="cannot read .*fake.parquet as parquet"):
        docs(source="parquet", paths=[str(fake)])

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        docs(source="hf", hf_dataset="org/ds")
    with pytest.raises(DataError, match="needs data.hf_dataset"):
        docs(source="hf")


def test_data_errors_are_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        list(iter_documents(DataConfig(source="files", paths=[str(tmp_path / "x" / "*.txt")])))
    assert isinstance(e.value, DataError) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------
def test_split_by_hash_is_stable_and_disjoint(tmp_path):
    # pinned values: a change of hash function (or use of Python's salted hash()) breaks these
    assert [is_val(f"doc{i}", 0.3) for i in range(8)] == [is_val(f"doc{i}", 0.3) for i in range(8)]
    pinned = {i: is_val(f"doc{i}", 0.3) for i in range(8)}
    assert pinned == {0: True, 1: False, 2: False, 3: True, 4: False, 5: False, 6: True, 7: False}
    ids = [f"pkg/mod{i}.py" for i in range(4000)]
    frac = np.mean([is_val(i, 0.1) for i in ids])
    assert 0.08 < frac < 0.12
    # monotone in val_fraction: a val doc stays val when the fraction grows
    assert all(is_val(i, 0.2) for i in ids if is_val(i, 0.1))

    cfg = stdlib_cfg(tmp_path)
    cache = build_token_cache(cfg, 300)
    docs = list(iter_documents(cfg))
    val_ids = {d.doc_id for d in docs if is_val(d.doc_id, cfg.val_fraction)}
    assert 0 < len(val_ids) < len(docs)
    assert cache.meta["val_docs"] == len(val_ids) and cache.meta["train_docs"] == len(docs) - len(val_ids)


# ----------------------------------------------------------------------------------------------
# Token cache
# ----------------------------------------------------------------------------------------------
def _split_docs(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    ends = np.flatnonzero(tokens == eot)
    assert len(ends) and ends[-1] == len(tokens) - 1  # every document is followed by EOT
    return np.split(np.asarray(tokens), ends + 1)[:-1]


def test_token_cache_contents(tmp_path):
    cfg = stdlib_cfg(tmp_path)
    messages = []
    cache = build_token_cache(cfg, 300, progress=messages.append)
    assert isinstance(cache, TokenCache) and not cache.reused and messages
    assert isinstance(cache.train, np.memmap) and cache.train.dtype == np.uint16 and cache.val.dtype == np.uint16
    assert cache.directory.parent == tmp_path / "cache" / "tokens"
    assert sorted(p.name for p in cache.directory.iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert cache.tokenizer_path == cache.directory / "tokenizer.json"
    tok = load_tokenizer(cache.tokenizer_path)
    assert cache.eot_id == eot_id(tok) == 0 and tok.get_vocab_size() == cache.vocab_size <= 300
    docs = list(iter_documents(cfg))
    for split, arr in (("train", cache.train), ("val", cache.val)):
        want = [d.text for d in docs if is_val(d.doc_id, cfg.val_fraction) == (split == "val")]
        got = [tok.decode(seg[:-1].tolist()) for seg in _split_docs(arr, cache.eot_id)]
        assert got == want
        assert cache.meta[f"{split}_tokens"] == len(arr)
    assert int(cache.train.max()) < cache.vocab_size
    assert cache.identity["corpus"] == corpus_identity(cfg)
    json.dumps(cache.identity)


def test_token_cache_deterministic_and_reused(tmp_path, monkeypatch):
    a = build_token_cache(stdlib_cfg(tmp_path, cache_dir=str(tmp_path / "a")), 300)
    b = build_token_cache(stdlib_cfg(tmp_path, cache_dir=str(tmp_path / "b")), 300)
    assert not a.reused and not b.reused and a.directory != b.directory
    assert a.directory.name == b.directory.name and a.identity == b.identity
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert a.tokenizer_path.read_bytes() == b.tokenizer_path.read_bytes()

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache was complete")

    monkeypatch.setattr(cache_mod, "train_tokenizer", boom)
    monkeypatch.setattr(cache_mod, "_TokenWriter", boom)
    again = build_token_cache(stdlib_cfg(tmp_path, cache_dir=str(tmp_path / "a")), 300)
    assert again.reused and again.directory == a.directory
    np.testing.assert_array_equal(again.train, a.train)


def test_token_cache_env_default_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFTRAIN_CACHE", str(tmp_path / "env"))
    base = build_token_cache(stdlib_cfg(tmp_path, cache_dir=None, max_documents=30), 300)
    assert base.directory.parent == tmp_path / "env" / "tokens"
    other_vocab = build_token_cache(stdlib_cfg(tmp_path, cache_dir=None, max_documents=30), 320)
    other_split = build_token_cache(stdlib_cfg(tmp_path, cache_dir=None, max_documents=30, val_fraction=0.3), 300)
    assert len({base.directory, other_vocab.directory, other_split.directory}) == 3
    assert not other_vocab.reused and not other_split.reused


def test_incomplete_cache_is_rebuilt(tmp_path):
    cfg = stdlib_cfg(tmp_path, max_documents=30)
    first = build_token_cache(cfg, 300)
    train = np.array(first.train)
    (first.directory / "meta.json").unlink()
    (first.directory / "train.bin").write_bytes(b"\x00\x00")  # truncated leftover
    again = build_token_cache(cfg, 300)
    assert not again.reused and again.directory == first.directory
    np.testing.assert_array_equal(again.train, train)
    assert build_token_cache(cfg, 300).reused
    assert not list(first.directory.glob("*tmp*"))


def test_provided_tokenizer(tmp_path):
    tok_file = tmp_path / "given.json"
    train_tokenizer(CODE_SAMPLES, 300, tok_file)
    cfg = stdlib_cfg(tmp_path, max_documents=30, tokenizer_path=str(tok_file))
    cache = build_token_cache(cfg, 512)
    assert cache.identity["tokenizer"]["kind"] == "file" and cache.vocab_size == 300
    assert cache.tokenizer_path.read_bytes() == tok_file.read_bytes()
    with pytest.raises(DataError, match="vocab 300 > model vocab_size 299"):
        build_token_cache(cfg, 299)
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(DataError, match="cannot parse tokenizer"):
        build_token_cache(stdlib_cfg(tmp_path, tokenizer_path=str(bad)), 300)


def test_token_cache_split_errors(tmp_path):
    with pytest.raises(DataError, match=r"val split has \d+ tokens, fewer than data.seq_len\+1"):
        build_token_cache(stdlib_cfg(tmp_path, max_documents=30, seq_len=1_000_000), 300)
    # two documents whose ids both land in train (resp. val)
    d = tmp_path / "two"
    write_files(d, ["print('a')\n" * 50, "print('b')\n" * 50])
    assert not any(is_val(f"doc{i:03d}.txt", 0.001) for i in range(2))
    with pytest.raises(DataError, match="val split is empty.*val_fraction"):
        build_token_cache(DataConfig(source="files", paths=[str(d / "*.txt")], val_fraction=0.001,
                                     cache_dir=str(tmp_path / "c")), 300)
    assert all(is_val(f"doc{i:03d}.txt", 0.99) for i in range(2))
    with pytest.raises(DataError, match="train split is empty"):
        build_token_cache(DataConfig(source="files", paths=[str(d / "*.txt")], val_fraction=0.99,
                                     cache_dir=str(tmp_path / "c")), 300)


def test_jsonl_cache_end_to_end(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": t}) + "\n" for t in CODE_SAMPLES))
    cfg = DataConfig(source="jsonl", paths=[str(p)], val_fraction=0.2, seq_len=8, cache_dir=str(tmp_path / "c"))
    cache = build_token_cache(cfg, 300)
    assert len(_split_docs(cache.train, 0)) + len(_split_docs(cache.val, 0)) == len(CODE_SAMPLES)


def test_prepare_data_uses_model_vocab(tmp_path):
    cfg = from_dict({"model": {"vocab_size": 320}, "train": {"max_steps": 1},
                     "data": {"max_documents": 30, "val_fraction": 0.2, "seq_len": 16, "tokenizer_train_chars": 200000,
                              "cache_dir": str(tmp_path / "c")}})
    cache = prepare_data(cfg)
    assert cache.identity["tokenizer"]["vocab_size"] == 320
    assert prepare_data(cfg, vocab_size=300).identity["tokenizer"]["vocab_size"] == 300


# ----------------------------------------------------------------------------------------------
# grain pipeline
# ----------------------------------------------------------------------------------------------
def _starts(batch: np.ndarray, seq_len: int) -> list[int]:
    """With tokens = arange, a window's first value is its start; window i starts at i*seq_len."""
    for row in batch:
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + seq_len + 1))
    assert all(int(r[0]) % seq_len == 0 for r in batch)
    return [int(r[0]) // seq_len for r in batch]


def test_train_iterator_shapes_and_epochs():
    seq_len, bs = 8, 4
    tokens = np.arange(10 * seq_len + 5, dtype=np.uint16)  # 10 windows (tail of 4 tokens unused)
    assert num_windows(len(tokens), seq_len) == 10
    it = make_train_iterator(tokens, seq_len=seq_len, batch_size=bs, seed=3)
    batches = [next(it) for _ in range(10)]  # 40 windows = 4 epochs
    for b in batches:
        assert b.shape == (bs, seq_len + 1) and b.dtype == np.int32
        assert np.array_equal(b[:, 1:][:, :-1], b[:, :-1][:, 1:])  # targets are inputs shifted by one
    order = [i for b in batches for i in _starts(b, seq_len)]
    epochs = [order[k * 10:(k + 1) * 10] for k in range(4)]
    assert all(sorted(e) == list(range(10)) for e in epochs)  # every window exactly once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled per epoch
    same = make_train_iterator(tokens, seq_len=seq_len, batch_size=bs, seed=3)
    assert all(np.array_equal(next(same), b) for b in batches)
    other = make_train_iterator(tokens, seq_len=seq_len, batch_size=bs, seed=4)
    assert not all(np.array_equal(next(other), b) for b in batches)


@pytest.mark.parametrize("k", [1, 2, 3, 7])  # 3 and 7 straddle the epoch boundary (10 windows, batch 3)
def test_train_iterator_restore(k):
    tokens = np.arange(10 * 16 + 1, dtype=np.uint16)
    make = lambda: make_train_iterator(tokens, seq_len=16, batch_size=3, seed=11)  # noqa: E731
    it = make()
    for _ in range(k):
        next(it)
    state = it.get_state()
    restored_state = json.loads(json.dumps(state))  # orbax JsonSave round trip
    expected = [next(it) for _ in range(6)]
    fresh = make()
    fresh.set_state(restored_state)
    assert all(np.array_equal(next(fresh), e) for e in expected)
    it.set_state(restored_state)  # rewinding the same iterator also works
    assert all(np.array_equal(next(it), e) for e in expected)


def test_train_iterator_from_cache_memmap(tmp_path):
    cache = build_token_cache(stdlib_cfg(tmp_path, max_documents=30), 300)
    it = make_train_iterator(cache.train, seq_len=32, batch_size=4, seed=0)
    b = next(it)
    assert b.shape == (4, 33) and b.dtype == np.int32 and int(b.max()) < cache.vocab_size


def test_num_windows_errors():
    assert num_windows(17, 8) == 2 and num_windows(16, 8) == 1 and num_windows(9, 8) == 1
    with pytest.raises(DataError, match="fewer than batch_size 3"):
        num_windows(17, 8, 3)
    with pytest.raises(DataError, match="0 windows"):
        num_windows(8, 8)
    with pytest.raises(DataError, match="fewer than batch_size"):
        make_train_iterator(np.arange(20, dtype=np.uint16), seq_len=8, batch_size=4, seed=0)


def _val_starts(windows: np.ndarray, seq_len: int) -> list[int]:
    """With tokens = arange, a val window's first value is its start; val window j starts at j*(seq_len+1)."""
    for row in windows:
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + seq_len + 1))
    assert all(int(r[0]) % (seq_len + 1) == 0 for r in windows)
    return [int(r[0]) // (seq_len + 1) for r in windows]


def test_val_batches():
    seq_len = 4
    tokens = np.arange(7 * (seq_len + 1) + 3, dtype=np.uint32)  # 7 disjoint windows (+ a short tail)
    vb = val_batches(tokens, seq_len=seq_len, batch_size=2, n_batches=10)
    assert len(vb) == 3 and all(b.shape == (2, 5) and b.dtype == np.int32 for b in vb)
    starts = [i for b in vb for i in _val_starts(b, seq_len)]
    assert len(set(starts)) == 6 and starts == sorted(starts) and max(starts) < 7
    again = val_batches(tokens, seq_len=seq_len, batch_size=2, n_batches=10)
    assert all(np.array_equal(x, y) for x, y in zip(vb, again))
    assert len(val_batches(tokens, seq_len=seq_len, batch_size=2, n_batches=2)) == 2
    small = val_batches(tokens, seq_len=seq_len, batch_size=16, n_batches=3)  # fewer windows than batch
    assert len(small) == 1 and small[0].shape == (7, 5)
    assert _val_starts(small[0], seq_len) == list(range(7))
    with pytest.raises(DataError):
        val_batches(tokens, seq_len=seq_len, batch_size=16, n_batches=3, allow_partial=False)
    with pytest.raises(DataError, match="0 windows"):
        val_batches(tokens[:4], seq_len=seq_len, batch_size=1, n_batches=1)


def test_val_sample_is_seeded_spread_disjoint_and_nested():
    from efftrain.data.pipeline import val_window_count, val_window_indices, val_windows

    seq_len, avail = 16, 1000
    tokens = np.arange(avail * (seq_len + 1) + 5, dtype=np.uint32)
    assert val_window_count(len(tokens), seq_len) == avail
    w = val_windows(tokens, seq_len=seq_len, n_windows=100, seed=0)
    assert w.shape == (100, seq_len + 1) and w.dtype == np.int32
    starts = _val_starts(w, seq_len)  # each window is seq_len+1 consecutive tokens on the disjoint grid
    assert starts == sorted(starts) and len(set(starts)) == 100  # sorted, without replacement
    spans = [(int(r[0]), int(r[-1])) for r in w]
    assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # no token in two windows
    # spread over the whole split: every tenth of it holds some windows, not just the start
    assert len({s * 10 // avail for s in starts}) == 10 and max(starts) > 0.9 * avail
    # deterministic in (tokens, seq_len, count, seed) only; another seed draws other windows
    np.testing.assert_array_equal(w, val_windows(tokens, seq_len=seq_len, n_windows=100, seed=0))
    assert not np.array_equal(w, val_windows(tokens, seq_len=seq_len, n_windows=100, seed=1))
    # a smaller sample of the same seed is a subset of a larger one; the count is capped at the split
    assert set(val_window_indices(len(tokens), seq_len, 30, 0)) <= set(starts)
    assert list(val_window_indices(len(tokens), seq_len, 10**6, 0)) == list(range(avail))
    with pytest.raises(DataError, match="must be >= 1"):
        val_window_indices(len(tokens), seq_len, 0)


def test_val_set_does_not_depend_on_train_or_shuffle_seed(cache_dir):
    """Replicates of a run (other train.seed / data.shuffle_seed) are evaluated on identical windows."""
    from conftest import tiny_raw
    from efftrain.eval import val_set

    raw = tiny_raw(cache_dir)  # batch_size 8, eval_batches 2
    base = val_set(from_dict(raw))
    other = val_set(from_dict({**raw, "train": {**raw["train"], "seed": 7},
                               "data": {**raw["data"], "shuffle_seed": 99}}))
    assert base.n == 16 and np.array_equal(base.windows, other.windows)
    assert not np.array_equal(base.windows, val_set(from_dict(raw), seed=1).windows)


def test_tokenizer_sample_spreads_over_every_train_document():
    from efftrain.data.cache import _train_texts

    docs = [Document(f"doc{i}.py", chr(97 + i) * 100) for i in range(8)]
    train = [d for d in docs if not is_val(d.doc_id, 0.2)]
    total = sum(len(d.text) for d in train)
    sample = list(_train_texts(iter(docs), 0.2, total // 2, total))
    assert len(sample) == len(train)  # every train document contributes, not just the first ones
    assert all(len(t) == 50 for t in sample) and sum(map(len, sample)) == total // 2
