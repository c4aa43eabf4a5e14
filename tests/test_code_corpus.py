"""experiments/make_code_corpus.py: the offline Python-source corpus for GPU runs without network."""

import importlib.util
from pathlib import Path

import pytest

from efftrain.config import DataConfig
from efftrain.data.corpus import iter_documents

SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "make_code_corpus.py"


@pytest.fixture()
def make_corpus():
    spec = importlib.util.spec_from_file_location("make_code_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_collects_utf8_sources_once_and_trains_as_a_files_corpus(make_corpus, tmp_path, monkeypatch):
    lib, site = tmp_path / "lib", tmp_path / "site-packages"
    (lib / "pkg").mkdir(parents=True)
    (site / "vendored" / "__pycache__").mkdir(parents=True)
    (lib / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (site / "vendored" / "a_copy.py").write_text("def a():\n    return 1\n")  # byte-identical: skipped
    (site / "vendored" / "b.py").write_text("B = 'é'\n")
    (site / "vendored" / "latin1.py").write_bytes(b"X = '\xe9'\n")  # not UTF-8: skipped
    (site / "vendored" / "empty.py").write_text("\n")  # blank: skipped
    (site / "vendored" / "notes.txt").write_text("not python")
    (site / "vendored" / "__pycache__" / "c.py").write_text("C = 3\n")
    monkeypatch.setattr(make_corpus, "source_roots", lambda: [("stdlib", lib), ("site", site)])

    out = tmp_path / "corpus"
    assert make_corpus.main([str(out), "--archive", str(tmp_path / "c.tar.xz")]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["site/vendored/b.py", "stdlib/pkg/a.py"]
    assert (tmp_path / "c.tar.xz").stat().st_size > 0
    assert make_corpus.main([str(out)]) == 2  # refuses to write into an existing directory

    cfg = DataConfig(source="files", paths=[str(out / "**" / "*.py")])
    docs = {d.doc_id: d.text for d in iter_documents(cfg)}
    assert docs == {"site/vendored/b.py": "B = 'é'\n", "stdlib/pkg/a.py": "def a():\n    return 1\n"}
