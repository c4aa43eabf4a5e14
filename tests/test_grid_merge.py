"""`efftrain grid merge`: the stores of a grid run in pieces merge into the store of an unsplit run,
with no lost or duplicate row; conflicts refuse the merge (or --prefer resolves them); bad sources
are one-line errors. Fast: stores are built through the ResultsStore API with synthetic rows, nothing
trains."""

import json
import sqlite3
from pathlib import Path

import pytest

from efftrain.cli import main as cli
from efftrain.grid.spec import expand_spec, expected_checkpoints, expected_ptq_keys, expected_ptq_rows
from efftrain.grid.store import (MergeConflict, ResultsStore, StoreError, advanced_run_state, merge_stores,
                                 read_store_rows)

from test_grid import SMALL, write_spec

SPEC = {"axes": {"model.mlp_hidden": [48, 64]}, "ptq": {"methods": ["rtn", "gptq"], "bits": [3, 4]}}


# ----------------------------------------------------------------------------------------------
# helpers: a grid of two cells, its stores, and pieces carved out of them
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def grid(tmp_path, cache_dir):
    """(spec path, spec, cells): two main cells, checkpoints at steps 2 and 6, 8 PTQ rows each."""
    spec_path = write_spec(tmp_path, cache_dir, SPEC, **SMALL)
    spec, cells = expand_spec(spec_path)
    return spec_path, spec, cells


def ptq_row(cell, step, method, bits, group_size, fmt):
    """A PTQ sweep row shaped like the real ones, its values a function of the row's identity."""
    qid = round(0.1 * (8 - bits) + 0.01 * step + (0.05 if method == "gptq" else 0.0), 6)
    return {"run_id": f"{cell.name}-abcd1234", "step": step, "tokens": 256 * step, "params_total": 1000,
            "params_active": 1000, "params_nonembed": 800, "method": method, "bits": bits,
            "group_size": group_size, "format": fmt, "loss_16": 5.0, "loss_q": 5.0 + qid, "qid": qid,
            "qid_se": 0.001, "eff_bits": bits + 0.125, "model_bytes": 500, "n_quantized": 6, "expert_fallbacks": 0,
            "calib_samples": 8, "calib_seq_len": 32, "seconds": 0.25, "seed": cell.seed,
            "data_seed": cell.data_seed}


def record_cell(store, spec, cell, *, status="done", error=None):
    """What the runner records for a finished cell: its run record, checkpoints, PTQ rows, status."""
    store.register_cell(cell, ckpt_expected=len(expected_checkpoints(cell)), ptq_expected=expected_ptq_rows(spec, cell))
    store.set_params(cell.key, {"total": 1000, "active": 1000, "non_embedding": 800, "embedding": 200},
                     train_tokens=4096)
    store.add_checkpoints(cell.key, [{"step": s, "tokens_seen": 256 * s, "val_loss": 6.0 - 0.1 * s,
                                      "target_tokens": 256 * s} for s in expected_checkpoints(cell)], train_tokens=4096)
    for key in sorted(expected_ptq_keys(spec, cell)):
        store.add_ptq_row(ptq_row(cell, *key), cell)
    store.set_status(cell.key, status, error=error)


def unsplit_store(path, spec, cells) -> Path:
    with ResultsStore(path) as store:
        for cell in cells:
            record_cell(store, spec, cell)
    return path


def copy_store(src: Path, dst: Path) -> Path:
    """A byte-level snapshot through SQLite's backup API (safe with WAL)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close(), b.close()
    return dst


def carve(src: Path, dst: Path, *, keep_runs=lambda key: True, keep_checkpoint=lambda key, step: True,
          keep_ptq=lambda key, step, method: True) -> Path:
    """A piece of a store: a copy with the rows the predicates reject deleted."""
    copy_store(src, dst)
    con = sqlite3.connect(dst)
    con.create_function("keep_run", 1, lambda k: int(keep_runs(k)))
    con.create_function("keep_ckpt", 2, lambda k, s: int(keep_checkpoint(k, s)))
    con.create_function("keep_ptq", 3, lambda k, s, m: int(keep_ptq(k, s, m)))
    with con:
        con.execute("DELETE FROM runs WHERE NOT keep_run(key)")
        con.execute("DELETE FROM checkpoints WHERE NOT keep_ckpt(run_key, step)")
        con.execute("DELETE FROM ptq WHERE NOT keep_ptq(run_key, step, method)")
    con.close()
    return dst


def tables(path: Path) -> dict[str, list[tuple]]:
    """Every table of a store as its sorted rows (order of insertion does not matter)."""
    with ResultsStore(path, read_only=True) as store:
        return {name: sorted(store.table(name)[1], key=repr) for name in ("runs", "checkpoints", "ptq")}


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# (1) pieces merge into the unsplit store
# ----------------------------------------------------------------------------------------------
def test_pieces_split_by_cell_and_by_rows_merge_into_the_unsplit_store(grid, tmp_path, capsys):
    spec_path, spec, (a, b) = grid
    whole = unsplit_store(tmp_path / "whole" / "results.sqlite", spec, [a, b])
    # piece 1: cell a whole; cell b begun (its run record running, the step-2 rows only): a lost machine
    piece1 = carve(whole, tmp_path / "piece1" / "results.sqlite",
                   keep_checkpoint=lambda key, step: key == a.key or step == 2,
                   keep_ptq=lambda key, step, method: key == a.key or step == 2)
    with ResultsStore(piece1) as store:
        store.set_status(b.key, "running")
    # piece 2: cell b whole; cell a's rtn rows and step-2 checkpoint again (overlap), its record failed
    piece2 = carve(whole, tmp_path / "piece2" / "results.sqlite",
                   keep_checkpoint=lambda key, step: key == b.key or step == 2,
                   keep_ptq=lambda key, step, method: key == b.key or method == "rtn")
    with ResultsStore(piece2) as store:
        store.set_status(a.key, "failed", error="RuntimeError: out of memory")

    dest = tmp_path / "runs"  # the spec's runs_dir, which does not exist yet
    assert not dest.exists()
    path, (s1, s2) = merge_stores(dest, [piece1.parent, piece2])
    assert path == spec.db_path and path.is_file()
    assert tables(path) == tables(whole)  # no row lost, none twice, statuses as in the unsplit run

    assert (s1.tables["runs"].added, s1.tables["checkpoints"].added, s1.tables["ptq"].added) == (2, 3, 12)
    assert s1.total("duplicates") == 0 and s1.total("conflicts") == 0
    assert (s2.tables["runs"].added, s2.tables["checkpoints"].added, s2.tables["ptq"].added) == (0, 1, 4)
    # duplicates: both run records, both step-2 checkpoints, a's 4 rtn rows and b's 4 step-2 rows
    assert (s2.tables["runs"].duplicates, s2.tables["checkpoints"].duplicates, s2.tables["ptq"].duplicates) == (2, 2, 8)
    assert s2.statuses_advanced == 1 and s2.total("conflicts") == 0  # b: running -> done; a stays done

    # status and export read the merged store as the unsplit one
    assert cli(["grid", "status", str(spec_path), "--json"]) == 0
    merged_status = json.loads(capsys.readouterr().out)
    assert cli(["grid", "status", str(spec_path), "--json", "--runs-dir", str(whole.parent)]) == 0
    assert merged_status == json.loads(capsys.readouterr().out)
    assert {r["status"] for r in merged_status} == {"done"} and all(r["ptq_rows"] == 8 for r in merged_status)
    exports = []
    for runs_dir in (dest, whole.parent):
        out = tmp_path / f"export-{runs_dir.name}.csv"
        assert cli(["grid", "export", str(spec_path), "--runs-dir", str(runs_dir), "--out", str(out)]) == 0
        exports.append(sorted(out.read_text().splitlines()))
    capsys.readouterr()
    assert exports[0] == exports[1] and len(exports[0]) == 1 + 16


def test_cli_prints_what_each_source_added_and_the_totals(grid, tmp_path, capsys):
    _, spec, (a, b) = grid
    whole = unsplit_store(tmp_path / "whole.sqlite", spec, [a, b])
    piece1 = carve(whole, tmp_path / "p1.sqlite", keep_runs=lambda k: k == a.key,
                   keep_checkpoint=lambda k, s: k == a.key, keep_ptq=lambda k, s, m: k == a.key)
    piece2 = carve(whole, tmp_path / "p2.sqlite", keep_runs=lambda k: k == b.key,
                   keep_checkpoint=lambda k, s: k == b.key, keep_ptq=lambda k, s, m: k == b.key or m == "rtn")
    assert cli(["grid", "merge", str(tmp_path / "merged.sqlite"), str(piece1), str(piece2)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{piece1}: runs 1 added, checkpoints 2 added, PTQ rows 8 added; 0 duplicates skipped")
    assert out[1].startswith(f"{piece2}: runs 1 added, checkpoints 2 added, PTQ rows 8 added; 4 duplicates skipped")
    assert out[2].startswith("merged 2 store(s) into") and "4 duplicates skipped, 0 filled in, 0 conflicts" in out[2]
    assert out[2].endswith("it holds 2 runs, 4 checkpoints, 16 PTQ rows")
    assert tables(tmp_path / "merged.sqlite") == tables(whole)


# ----------------------------------------------------------------------------------------------
# (2) merging is idempotent
# ----------------------------------------------------------------------------------------------
def test_merging_the_same_source_twice_changes_nothing(grid, tmp_path):
    _, spec, cells = grid
    source = unsplit_store(tmp_path / "source.sqlite", spec, cells)
    dest = tmp_path / "dest.sqlite"
    merge_stores(dest, [source])
    before = tables(dest)
    _, (again,) = merge_stores(dest, [source])
    assert tables(dest) == before == tables(source)
    assert again.total("added") == again.total("filled") == again.total("conflicts") == again.statuses_advanced == 0
    assert again.total("duplicates") == 2 + 4 + 16
    _, (s1, s2) = merge_stores(dest, [source, source])  # twice in one command, too
    assert tables(dest) == before and s1.total("added") == s2.total("added") == 0


def test_a_rerun_with_the_same_results_at_another_time_is_a_duplicate(grid, tmp_path):
    """`seconds` and `recorded` say when and how fast a row was measured: they may differ between two
    records of one result, and the destination keeps its own."""
    _, spec, cells = grid
    dest = unsplit_store(tmp_path / "dest.sqlite", spec, cells)
    rerun = tmp_path / "rerun.sqlite"
    with ResultsStore(rerun) as store:
        for cell in cells:
            record_cell(store, spec, cell)
        store.con.execute("UPDATE ptq SET seconds = seconds + 1")
    before = tables(dest)
    (summary,) = ResultsStore(dest).merge_many([rerun])
    assert summary.total("conflicts") == 0 and summary.tables["ptq"].duplicates == 16
    assert tables(dest) == before


# ----------------------------------------------------------------------------------------------
# (3) conflicts
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def conflicting(grid, tmp_path):
    """(dest, source, cell): the source holds one PTQ row of `cell` with another qid (a nondeterministic
    rerun), one checkpoint row with another val_loss, and a row the destination lacks."""
    _, spec, (a, b) = grid
    whole = unsplit_store(tmp_path / "whole.sqlite", spec, [a, b])
    dest = carve(whole, tmp_path / "dest" / "results.sqlite", keep_ptq=lambda k, s, m: not (k == b.key and s == 6))
    source = copy_store(whole, tmp_path / "source" / "results.sqlite")
    con = sqlite3.connect(source)
    with con:
        con.execute("UPDATE ptq SET qid = 0.999 WHERE run_key = ? AND step = 2 AND method = 'gptq' AND bits = 3",
                    (a.key,))
        con.execute("UPDATE checkpoints SET val_loss = 9.5 WHERE run_key = ? AND step = 6", (a.key,))
    con.close()
    return dest, source, a


def test_a_conflict_refuses_the_merge_and_leaves_dest_unchanged(conflicting):
    dest, source, cell = conflicting
    rows, data = tables(dest), dest.read_bytes()
    with pytest.raises(MergeConflict, match=r"refused, nothing changed: 2 row\(s\) differ") as info:
        with ResultsStore(dest) as store:
            store.merge_from(source)
    message = str(info.value)
    assert "\n" not in message and f"checkpoint of run {cell.key} at step 6: val_loss" in message
    assert "--prefer dest or --prefer source" in message
    assert tables(dest) == rows and dest.read_bytes() == data  # the new step-6 rows of b were not added
    wal = dest.with_name(dest.name + "-wal")  # (a read-only open leaves an empty one behind)
    assert not wal.exists() or wal.stat().st_size == 0  # nothing pending either


def test_cli_conflict_is_one_line_and_prefer_picks_a_side(conflicting, capsys):
    dest, source, cell = conflicting
    rows = tables(dest)
    assert cli(["grid", "merge", str(dest.parent), str(source.parent)]) == 2
    assert "2 row(s) differ" in one_error_line(capsys.readouterr().err)
    assert tables(dest) == rows

    kept = copy_store(dest, dest.with_name("kept.sqlite"))
    assert cli(["grid", "merge", str(kept), str(source), "--prefer", "dest"]) == 0
    assert "2 conflicts (kept the dest's)" in capsys.readouterr().out

    assert cli(["grid", "merge", str(dest), str(source), "--prefer", "source"]) == 0
    assert "2 conflicts (kept the source's)" in capsys.readouterr().out

    def row(path):
        with ResultsStore(path, read_only=True) as store:
            (ptq,) = [r for r in store.ptq_rows(cell.key) if (r["step"], r["method"], r["bits"]) == (2, "gptq", 3)]
            (ckpt,) = [c for c in store.checkpoints(cell.key) if c["step"] == 6]
            return ptq["qid"], ckpt["val_loss"], len(store.ptq_rows())

    assert row(dest) == (0.999, 9.5, 16)  # the source's values, and the rows dest lacked
    assert row(kept)[:2] != (0.999, 9.5) and row(kept)[2] == 16


# ----------------------------------------------------------------------------------------------
# (4) bad sources and destinations
# ----------------------------------------------------------------------------------------------
def _not_a_store(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.sqlite"
    if kind == "text":
        path.write_text("step,qid\n1,0.5\n")
    elif kind == "other-db":
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE notes (x TEXT)")
        con.commit()
        con.close()
    elif kind == "corrupt":
        path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    return path


@pytest.mark.parametrize("kind, match", [("missing", "no results database at"),
                                         ("text", "cannot be read as a results store"),
                                         ("other-db", "is not a results store"),
                                         ("corrupt", "cannot be read as a results store")])
def test_cli_a_bad_source_is_one_line_and_creates_nothing(tmp_path, capsys, kind, match):
    source = _not_a_store(tmp_path, kind)
    dest = tmp_path / "new" / "merged"
    assert cli(["grid", "merge", str(dest), str(source)]) == 2
    assert match in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


def test_cli_a_dest_that_is_not_a_results_store_is_refused_untouched(grid, tmp_path, capsys):
    _, spec, cells = grid
    source = unsplit_store(tmp_path / "source.sqlite", spec, cells)
    dest = _not_a_store(tmp_path, "other-db")
    data = dest.read_bytes()
    assert cli(["grid", "merge", str(dest), str(source)]) == 2
    assert "is not a results store" in one_error_line(capsys.readouterr().err)
    assert dest.read_bytes() == data


def test_an_existing_dest_survives_a_bad_second_source(grid, tmp_path):
    _, spec, cells = grid
    dest = unsplit_store(tmp_path / "dest.sqlite", spec, cells[:1])
    good = unsplit_store(tmp_path / "good.sqlite", spec, cells[1:])
    rows = tables(dest)
    with pytest.raises(StoreError, match="no results database"):
        merge_stores(dest, [good, tmp_path / "lost.sqlite"])
    assert tables(dest) == rows


# ----------------------------------------------------------------------------------------------
# (5) statuses
# ----------------------------------------------------------------------------------------------
def test_status_merge_done_beats_failed_whichever_side_holds_it(grid, tmp_path):
    _, spec, (a, b) = grid
    done, failed = tmp_path / "done.sqlite", tmp_path / "failed.sqlite"
    with ResultsStore(done) as store:
        record_cell(store, spec, a)
        record_cell(store, spec, b, status="failed", error="RuntimeError: boom")
    with ResultsStore(failed) as store:  # the other way round
        record_cell(store, spec, a, status="failed", error="RuntimeError: boom")
        record_cell(store, spec, b)
    for first, second in ((done, failed), (failed, done)):
        dest = tmp_path / f"merged-{first.stem}.sqlite"
        _, (_, s2) = merge_stores(dest, [first, second])
        assert s2.total("conflicts") == 0 and s2.statuses_advanced == 1
        with ResultsStore(dest, read_only=True) as store:
            assert [(r["status"], r["error"]) for r in store.runs()] == [("done", None), ("done", None)]


def test_status_progress_order():
    def run(status):
        return {"status": status, "error": f"{status}!", "started": 1.0, "finished": 2.0, "host": "h", "pid": 1}

    order = ["pending", "running", "failed", "done"]
    for i, lower in enumerate(order):
        for higher in order[i + 1:]:
            assert advanced_run_state(run(lower), run(higher))["status"] == higher
            assert advanced_run_state(run(higher), run(lower)) is None
        assert advanced_run_state(run(lower), run(lower)) is None  # a tie keeps the destination's


def test_a_done_cells_incomplete_note_counts_the_merged_rows(grid, tmp_path):
    """A piece that finished a cell without all its rows notes "incomplete: N of M"; once another piece
    supplies the rest, the merged cell is done with no note, as `grid status` and the rows say."""
    _, spec, (a, _) = grid
    whole = tmp_path / "whole.sqlite"
    with ResultsStore(whole) as store:
        record_cell(store, spec, a)
    short = carve(whole, tmp_path / "short.sqlite", keep_ptq=lambda k, s, m: m == "rtn")
    with ResultsStore(short) as store:
        store.set_status(a.key, "done", error="incomplete: 4 of 8 PTQ rows")
    rest = carve(whole, tmp_path / "rest.sqlite", keep_ptq=lambda k, s, m: m == "gptq")
    with ResultsStore(rest) as store:
        store.set_status(a.key, "running")
    dest = tmp_path / "merged.sqlite"
    merge_stores(dest, [short])
    with ResultsStore(dest, read_only=True) as store:
        assert store.run(a.key)["error"] == "incomplete: 4 of 8 PTQ rows"
    merge_stores(dest, [rest])
    with ResultsStore(dest, read_only=True) as store:
        assert store.run(a.key)["status"] == "done" and store.run(a.key)["error"] is None
        assert store.ptq_count(a.key) == 8


# ----------------------------------------------------------------------------------------------
# schemas of other versions
# ----------------------------------------------------------------------------------------------
OLD_SCHEMA = """
    CREATE TABLE runs (key TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL DEFAULT 'pending');
    CREATE TABLE checkpoints (run_key TEXT NOT NULL, step INTEGER NOT NULL, tokens INTEGER, val_loss REAL,
                              target_tokens INTEGER, PRIMARY KEY (run_key, step));
    CREATE TABLE ptq (run_key TEXT NOT NULL, step INTEGER NOT NULL, method TEXT NOT NULL, bits INTEGER NOT NULL,
                      group_size INTEGER NOT NULL, format TEXT NOT NULL, qid REAL,
                      UNIQUE (run_key, step, method, bits, group_size, format));
    INSERT INTO runs (key, name, status) VALUES ('abc', 'dense', 'done');
    INSERT INTO checkpoints VALUES ('abc', 10, 640, 5.5, 640);
    INSERT INTO ptq VALUES ('abc', 10, 'rtn', 3, 128, 'int', 0.5);
    INSERT INTO ptq VALUES ('abc', 10, 'rtn', 4, 128, 'int', 0.25);
"""


def test_a_store_of_an_older_schema_merges_and_stays_as_it_was(tmp_path):
    old = tmp_path / "old.sqlite"
    con = sqlite3.connect(old)
    con.executescript(OLD_SCHEMA)
    con.close()
    data = old.read_bytes()
    dest = tmp_path / "dest.sqlite"
    with ResultsStore(dest) as store:  # a current store that already has one of the rows, more fully
        store.con.execute("INSERT INTO runs (key, name, status, seed) VALUES ('abc', 'dense', 'running', 0)")
        store.con.execute("INSERT INTO ptq (run_key, step, method, bits, group_size, format, qid, qid_se) "
                          "VALUES ('abc', 10, 'rtn', 3, 128, 'int', 0.5, 0.01)")
    _, (summary,) = merge_stores(dest, [old])
    assert old.read_bytes() == data  # the source was only read (no columns added to it)
    assert summary.tables["ptq"].added == 1 and summary.tables["ptq"].duplicates == 1
    assert summary.tables["checkpoints"].added == 1 and summary.total("conflicts") == 0
    with ResultsStore(dest, read_only=True) as store:
        rows = {r["bits"]: r for r in store.ptq_rows()}
        assert (rows[3]["qid"], rows[3]["qid_se"]) == (0.5, 0.01)
        assert (rows[4]["qid"], rows[4]["qid_se"]) == (0.25, None)
        assert store.run("abc")["status"] == "done" and store.run("abc")["seed"] == 0
        assert store.checkpoints("abc")[0]["epochs"] is None
    assert len(read_store_rows(old)["ptq"][0]) == len(read_store_rows(dest)["ptq"][0])  # read as the current schema

    fuller = tmp_path / "fuller.sqlite"  # the same row again, with the value the old schema lacked
    with ResultsStore(fuller) as store:
        store.con.execute("INSERT INTO ptq (run_key, step, method, bits, group_size, format, qid, qid_se) "
                          "VALUES ('abc', 10, 'rtn', 4, 128, 'int', 0.25, 0.02)")
    _, (summary,) = merge_stores(dest, [fuller])
    assert (summary.tables["ptq"].filled, summary.total("added"), summary.total("conflicts")) == (1, 0, 0)
    with ResultsStore(dest, read_only=True) as store:
        assert {r["bits"]: r["qid_se"] for r in store.ptq_rows()} == {3: 0.01, 4: 0.02}


def test_a_store_with_columns_this_version_does_not_know_is_refused(tmp_path):
    newer = tmp_path / "newer.sqlite"
    with ResultsStore(newer) as store:
        store.con.execute("ALTER TABLE ptq ADD COLUMN future_metric REAL")
    with pytest.raises(StoreError, match=r"column\(s\) \['future_metric'\] that this efftrain does not know"):
        merge_stores(tmp_path / "dest.sqlite", [newer])
    assert not (tmp_path / "dest.sqlite").exists()
