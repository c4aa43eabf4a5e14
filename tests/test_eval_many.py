"""Several quantized rows of one checkpoint scored in one pass over the eval set: compare_params_many
against compare_params row by row, the sweep's PTQSpec.eval_rows against one pass per row, and the
bench_ptq options that measure it."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.eval import EvalSet, compare_params, compare_params_many, reference_states
from efftrain.model.transformer import build_model
from efftrain.quant.sweep import CSV_COLUMNS, make_spec, read_rows, row_key, run_ptq_sweep
from efftrain.train.loop import train
from efftrain.train.step import make_paired_many_fn

from conftest import tiny_raw

QUIET = dict(log=lambda *_: None)
SEQ = 16


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache(monkeypatch):
    """The sweep's persistent compilation cache would write to the user's cache dir: off in these tests."""
    monkeypatch.setenv("EFFTRAIN_COMPILATION_CACHE", "off")


@pytest.fixture(scope="module")
def setup():
    """The tiny model, three "quantized" parameter sets (rounded to grids of different steps) and 11
    windows in batches of 4 (the last one padded)."""
    cfg = from_dict(tiny_raw("unused", train={"batch_size": 4, "max_steps": 1}))
    graphdef, params, rest = nnx.split(build_model(cfg.model, seed=0), nnx.Param, ...)
    quantized = [jax.tree.map(lambda p, step=step: jnp.round(p / step) * step, params)
                 for step in (1 / 4, 1 / 8, 1 / 32)]
    windows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (11, SEQ + 1)).astype(np.int32)
    return graphdef, params, quantized, rest, EvalSet(windows, batch_size=4)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("with_reference", [False, True])
def test_rows_scored_together_equal_rows_scored_one_by_one(setup, k, with_reference):
    graphdef, params, quantized, rest, ragged = setup
    assert ragged.n % ragged.batch_size  # the padded windows must be dropped along the window axis
    reference = reference_states(graphdef, params, rest, ragged) if with_reference else None
    together = compare_params_many(graphdef, params, quantized[:k], rest, ragged, reference)
    one_by_one = [compare_params(graphdef, params, q, rest, ragged, reference) for q in quantized[:k]]
    assert len(together) == k
    for got, want in zip(together, one_by_one):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    if k == 3:  # the three grids give three different rows, in order
        assert len({row["kl"] for row in together}) == 3


def test_the_many_row_program_does_not_grow_with_k(setup):
    """The K sets run through one lax.map body: the traced program is the same for 1 and 3 sets."""
    graphdef, params, quantized, rest, ragged = setup
    hidden = reference_states(graphdef, params, rest, ragged)[0]
    fn = make_paired_many_fn(graphdef)

    def program(k):
        stacked = jax.tree.map(lambda *x: jnp.stack(x), *quantized[:k])
        return str(jax.make_jaxpr(fn)(hidden, params, stacked, rest, ragged.batches()[0]))

    assert len(program(1).splitlines()) == len(program(3).splitlines())
    out = fn(hidden, params, jax.tree.map(lambda *x: jnp.stack(x), *quantized), rest, ragged.batches()[0])
    assert {key: v.shape for key, v in out.items()} == {key: (3, 4) for key in ("loss_16", "loss_q", "kl",
                                                                                  "top1_agree")}


def test_sets_of_other_dtypes_are_refused(setup):
    graphdef, params, quantized, rest, ragged = setup
    half = jax.tree.map(lambda p: p.astype(jnp.bfloat16), quantized[0])
    with pytest.raises(ValueError, match="dtypes"):
        compare_params_many(graphdef, params, [quantized[1], half], rest, ragged)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    """The tests' tiny config trained for 12 steps: series checkpoints at steps 2, 6 and 12."""
    run = tmp_path_factory.mktemp("eval-many") / "run"
    train(from_dict(tiny_raw(cache_dir)), run, **QUIET)
    return run


def test_sweep_rows_scored_together_equal_one_pass_per_row(tiny_run, tmp_path, monkeypatch):
    """eval_rows 3 against 1: the same rows in the same order, in the returned list, in on_row and in
    ptq.csv; 4 weight-only rows per checkpoint make a chunk of 3 and one of 1 (padded to 3, so that
    every row goes through the same program), which is scored before the KV-cache rows (another
    graphdef, one pass each) that follow it; 300 windows in batches of 256."""
    from efftrain.quant import sweep

    chunks = []

    def recorded(graphdef, params_16, params_q_list, *args, pad_to=None):
        chunks.append(pad_to or len(params_q_list))  # the sets the program scores
        return compare_params_many(graphdef, params_16, params_q_list, *args, pad_to=pad_to)

    monkeypatch.setattr(sweep, "compare_params_many", recorded)
    table = tiny_run / "ptq.csv"
    runs = {}
    for eval_rows in (3, 1):
        spec = make_spec(methods=["rtn"], bits=[2, 3, 4, 8], group_sizes=[-1], kv_cache=["none", "int8"],
                         checkpoints=[2, 6], calib_samples=8, eval_tokens=300 * 32, eval_rows=eval_rows)
        passed_on = []
        rows = run_ptq_sweep(tiny_run, spec, on_row=passed_on.append, **QUIET)
        assert passed_on == rows
        assert [row_key(r) for r in read_rows(table)] == [row_key(r) for r in rows]
        table.rename(tmp_path / f"ptq-{eval_rows}.csv")
        runs[eval_rows] = rows
    assert chunks == [3, 3, 3, 3]  # per checkpoint: 3 rows, then 1 row padded to 3
    together, one_by_one = runs[3], runs[1]
    assert len(together) == len(one_by_one) == 2 * 8
    assert [row_key(r) for r in together] == [row_key(r) for r in one_by_one]
    assert [r["format"] for r in together[:8]] == ["int"] * 4 + ["int+kv-int8"] * 4
    assert together[0]["eval_windows"] == 300
    for got, want in zip(together, one_by_one):
        for column in ("loss_16", "loss_q", "qid", "kl", "top1_agree"):
            assert got[column] == pytest.approx(want[column], rel=1e-5, abs=1e-6), (row_key(got), column)
        assert got["seconds"] > 0
        same = [c for c in CSV_COLUMNS if c not in ("loss_16", "loss_q", "qid", "qid_se", "kl", "kl_se",
                                                    "top1_agree", "seconds")]
        assert {c: got[c] for c in same} == {c: want[c] for c in same}


def test_bench_ptq_scores_warm_rows_in_chunks(tmp_path, cache_dir):
    """benchmarks/bench_ptq.py --small with --eval-rows 2: the first row alone, a compiling chunk, then
    two timed chunks of two rows; the JSON records eval_rows and the init seed."""
    path = Path(__file__).parent.parent / "benchmarks" / "bench_ptq.py"
    spec = importlib.util.spec_from_file_location("bench_ptq", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # the tests' tiny model and data (tests/conftest.py: its tokenizer and token cache are the session's)
    data = [f"data.{k}={v}" for k, v in tiny_raw(cache_dir)["data"].items() if k != "source"]
    data += [f"model.{k}={v}" for k, v in tiny_raw(cache_dir)["model"].items()]
    data = [arg for kv in data for arg in ("--set", kv)]
    out = tmp_path / "ptq.json"
    assert bench.main(["--small", "--methods", "rtn", "--bits", "3,4", "--eval-windows", "64", "--eval-rows", "2",
                       "--repeats", "2", "--init-seed", "1", *data, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["eval_rows"] == 2 and result["init_seed"] == 1 and result["eval_windows"] == 64
    (row,) = result["rows"]
    assert len(row["warm_rows_s"]) == 2 and row["first_row_s"] > 0 and row["first_chunk"]["seconds"] > 0
    assert row["rows_per_s"] == pytest.approx(1 / row["warm_row_s"])
