"""Corpus sources: where the training text comes from.

A corpus is a deterministic, ordered stream of `Document(doc_id, text)`:

* ``pystdlib`` - the running interpreter's standard library ``*.py`` files
  (``sysconfig.get_paths()["stdlib"]``). ``site-packages``/``dist-packages`` and ``__pycache__`` are
  excluded (they depend on what happens to be installed, not on the Python version); the stdlib's own
  test suites (``test/``, ``idle_test/``, ...) are **included** - they are ordinary Python code and are
  ~60 % of the ~31 MB. Files that are not valid UTF-8 (a handful of deliberately mis-encoded test
  files) are skipped. ``doc_id`` is the POSIX path relative to the stdlib root, so ids (and hence the
  train/val split) are the same on every machine with the same Python version.
* ``files`` - text files given as paths or globs in ``cfg.paths`` (``**`` is recursive). ``doc_id`` is
  the path relative to the deepest directory containing every matched file, so moving the data folder
  changes neither the corpus identity nor the split.
* ``jsonl`` - one JSON object per line, text under ``cfg.text_field``; blank lines are skipped;
  ``doc_id = "<file id>:<line number>"``.
* ``parquet`` - column ``cfg.text_field`` read with pyarrow; null cells are skipped;
  ``doc_id = "<file id>:<row>"``.
* ``hf`` - ``datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=True)``
  (imported lazily); ``doc_id = "<dataset>/<config>/<split>:<index>"``.

For every source, paths are visited in sorted order, documents whose text is empty or only
whitespace are skipped (they would add nothing but an end-of-text token), and ``cfg.max_documents``
caps the number of documents yielded. Every bad input raises `DataError` with a one-line message.

The train/val split is by document: `is_val` hashes the ``doc_id`` with SHA-1 (stable across
processes and machines, unlike ``hash()``), and `corpus_identity` fingerprints the content
(SHA-256 over every ``(doc_id, sha256(text))``) so that caches are keyed by what was actually read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from efftrain.config import DataConfig

IDENTITY_VERSION = 1
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class DataError(ValueError):
    """A data-pipeline input problem; the message is one line naming the offending input."""


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


# ----------------------------------------------------------------------------------------------
# Split and identity
# ----------------------------------------------------------------------------------------------
def is_val(doc_id: str, val_fraction: float) -> bool:
    """True if `doc_id` belongs to the validation split (deterministic: SHA-1 of the id)."""
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _source_identity(cfg: DataConfig) -> dict[str, Any]:
    ident: dict[str, Any] = {"version": IDENTITY_VERSION, "source": cfg.source,
                             "max_documents": cfg.max_documents}
    if cfg.source == "pystdlib":
        ident["python"] = f"{sys.implementation.name}-{'.'.join(map(str, sys.version_info[:3]))}"
    elif cfg.source in ("jsonl", "parquet"):
        ident["text_field"] = cfg.text_field
    elif cfg.source == "hf":
        ident.update(hf_dataset=cfg.hf_dataset, hf_config=cfg.hf_config, hf_split=cfg.hf_split,
                     text_field=cfg.text_field)
    return ident


class Fingerprint:
    """Accumulates the content fingerprint of a document stream."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n_docs = 0
        self.n_chars = 0

    def add(self, doc: Document) -> None:
        self.h.update(json.dumps([doc.doc_id, text_sha256(doc.text)]).encode())
        self.h.update(b"\n")
        self.n_docs += 1
        self.n_chars += len(doc.text)

    def finish(self, cfg: DataConfig) -> dict[str, Any]:
        return {**_source_identity(cfg), "num_documents": self.n_docs, "num_chars": self.n_chars,
                "content_sha256": self.h.hexdigest()}


def corpus_identity(cfg: DataConfig) -> dict[str, Any]:
    """Fingerprint of the corpus `cfg` selects: source, python version (pystdlib), text field,
    max_documents, number of documents and characters, and SHA-256 over the ordered list of
    (doc_id, sha256(text)). Reads the whole corpus once; JSON-serialisable and stable across runs."""
    fp = Fingerprint()
    for doc in iter_documents(cfg):
        fp.add(doc)
    return fp.finish(cfg)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def iter_documents(cfg: DataConfig) -> Iterator[Document]:
    """Yield the corpus documents in a deterministic order (see the module docstring)."""
    readers = {"pystdlib": _iter_pystdlib, "files": _iter_files, "jsonl": _iter_jsonl,
               "parquet": _iter_parquet, "hf": _iter_hf}
    if cfg.source not in readers:
        raise DataError(f"unknown data.source '{cfg.source}' (expected one of {', '.join(readers)})")
    n = 0
    for doc in readers[cfg.source](cfg):
        if not doc.text.strip():
            continue
        yield doc
        n += 1
        if cfg.max_documents is not None and n >= cfg.max_documents:
            return
    if n == 0:
        raise DataError(f"empty corpus: data.source={cfg.source} yielded no non-empty documents"
                        + (f" (paths {list(cfg.paths)})" if cfg.paths else ""))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _iter_pystdlib(cfg: DataConfig) -> Iterator[Document]:
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(f"python standard library directory not found: {root}")
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        rels.extend((rel_dir / f).as_posix() for f in filenames if f.endswith(".py"))
    for rel in sorted(rels):
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # undecodable or unreadable stdlib file: skipped (documented)
        yield Document(rel, text)


_GLOB_CHARS = set("*?[")


def _expand_paths(cfg: DataConfig) -> list[tuple[str, Path]]:
    """Expand cfg.paths to a sorted, de-duplicated list of (doc id prefix, file path)."""
    if not cfg.paths:
        raise DataError(f"data.source={cfg.source} needs data.paths (files or globs)")
    found: dict[str, Path] = {}
    for pattern in cfg.paths:
        pattern = os.path.expanduser(pattern)
        if _GLOB_CHARS & set(pattern):
            matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
            files = [m for m in matches if m.is_file()]
            if not files:
                where = "" if os.path.isabs(pattern) else f" (relative to the working directory {os.getcwd()})"
                raise DataError(f"glob '{pattern}' matched no files{where}")
        else:
            p = Path(pattern)
            if not p.exists():
                raise DataError(f"data path not found: {pattern}")
            if p.is_dir():
                raise DataError(f"data path is a directory: {pattern} (use a glob such as '{pattern}/**/*.txt')")
            files = [p]
        for f in files:
            found.setdefault(str(f.resolve()), f.resolve())
    paths = list(found.values())
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    out = sorted((p.relative_to(root).as_posix(), p) for p in paths)
    return out


def check_paths(cfg: DataConfig) -> None:
    """Raise DataError now if a files / jsonl / parquet source's paths or globs find nothing (cheap:
    no file is read), so a grid can refuse a bad spec before it trains anything."""
    if cfg.source in ("files", "jsonl", "parquet"):
        _expand_paths(cfg)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"cannot decode {path} as UTF-8 (byte {e.start}): not a text file?") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _iter_files(cfg: DataConfig) -> Iterator[Document]:
    for rel, path in _expand_paths(cfg):
        yield Document(rel, _read_text(path))


def _text_of(value: Any, where: str, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' is a {type(value).__name__}, not a string")
    return value


def _iter_lines(path: Path) -> Iterator[bytes]:
    """Lines of a file split on b"\\n" only (JSON strings may hold U+2028), streamed."""
    try:
        with open(path, "rb") as f:
            yield from f
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _iter_jsonl(cfg: DataConfig) -> Iterator[Document]:
    field = cfg.text_field
    for rel, path in _expand_paths(cfg):
        for lineno, raw in enumerate(_iter_lines(path), 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{where}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if field not in obj:
                raise DataError(f"{where}: no field '{field}' (data.text_field); keys: {sorted(obj)[:8]}")
            value = _text_of(obj[field], where, field)
            if value is not None:
                yield Document(f"{rel}:{lineno}", value)


def _iter_parquet(cfg: DataConfig) -> Iterator[Document]:
    import pyarrow.parquet as pq  # lazy: an optional dependency, needed only for parquet corpora

    field = cfg.text_field
    for rel, path in _expand_paths(cfg):
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            raise DataError(f"cannot read {path} as parquet: {str(e).splitlines()[0]}") from None
        names = pf.schema_arrow.names
        if field not in names:
            raise DataError(f"{path}: no column '{field}' (data.text_field); columns: {names[:8]}")
        row = 0
        for batch in pf.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                text = _text_of(value, f"{path} row {row}", field)
                if text is not None:
                    yield Document(f"{rel}:{row}", text)
                row += 1


def _iter_hf(cfg: DataConfig) -> Iterator[Document]:
    if not cfg.hf_dataset:
        raise DataError("data.source=hf needs data.hf_dataset")
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError:
        raise DataError("data.source=hf needs the 'datasets' package: pip install 'efftrain[hf]'") from None
    name = f"{cfg.hf_dataset}/{cfg.hf_config or 'default'}/{cfg.hf_split}"
    try:
        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=True)
    except Exception as e:
        raise DataError(f"cannot load HF dataset {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    field = cfg.text_field
    for i, row in enumerate(ds):
        if field not in row:
            raise DataError(f"HF dataset {name} row {i}: no field '{field}' (data.text_field); keys: {sorted(row)[:8]}")
        text = _text_of(row[field], f"HF dataset {name} row {i}", field)
        if text is not None:
            yield Document(f"{name}:{i}", text)
