"""Recovery fine-tuning after PTQ (issue #20, efftrain.quant.recovery): LoRA adapters on the frozen
quantized weights start exactly at the quantized model and leave its codes bitwise frozen; a short LoRA
budget lowers 2-bit QiD; QAT's fake quantization is RTN's with a straight-through gradient, and with a
zero budget QAT is plain PTQ; bad settings are one-line errors; recovery rows carry their columns, are
keyed by their setting and skipped when present (ptq.csv, the grid store, the grid's expected rows); the
report states the trend of the recovered fraction with D/N."""

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from efftrain.cli import main
from efftrain.config import from_dict
from efftrain.data import prepare_data
from efftrain.eval import compare_params, eval_set, reference_states, summarize_paired
from efftrain.grid.store import ResultsStore
from efftrain.model.layers import linears_of
from efftrain.quant import quantize_rtn
from efftrain.quant.apply import QuantSettings, quantize_model
from efftrain.quant.formats import kernel_format, make_format
from efftrain.quant.recovery import (LoRALinear, LoRAParam, RecoverySpec, add_adapters, check_recovery, fake_quant,
                                     fake_quantize_model, paired_windows, parse_recovery_option, recovery_row,
                                     train_recovery)
from efftrain.quant.sweep import PTQError, calibration_windows, make_spec, read_rows, run_ptq_sweep
from efftrain.train.checkpoint import CheckpointStore
from efftrain.train.loop import train
from efftrain.train.rundir import abstract_train_state, load_run_config

from conftest import tiny_raw

QUIET = dict(log=lambda *_: None)
BATCH, SEQ = 16, 32
LORA = {"method": "lora", "tokens": 64 * BATCH * SEQ, "rank": 8, "alpha": 16, "lr": 1e-3}  # 64 steps
QAT = {"method": "qat", "tokens": 4 * BATCH * SEQ}


@pytest.fixture(autouse=True)
def _no_persistent_compilation_cache(monkeypatch):
    monkeypatch.setenv("EFFTRAIN_COMPILATION_CACHE", "off")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache_dir):
    """A tiny dense model (d 64, 2 layers, vocab 384, seq 32) trained to the end of a cosine schedule:
    2-bit whole-channel RTN costs it about 0.05 nats."""
    path = tmp_path_factory.mktemp("recovery") / "run"
    raw = tiny_raw(cache_dir, model={"vocab_size": 384, "d_model": 64, "n_layers": 2, "n_heads": 2, "mlp_hidden": 128,
                                     "compute_dtype": "float32"},
                   optim={"lr": 3e-3, "warmup_steps": 10, "min_lr_ratio": 0.0},
                   train={"batch_size": BATCH, "max_steps": 300, "eval_every": 0, "eval_batches": 2,
                          "log_every": 100, "data_parallel": 1},
                   checkpoint={"tokens": [], "async_save": False, "resume_every": 1000})
    train(from_dict(raw), path, **QUIET)
    return path


@pytest.fixture(scope="module")
def ckpt(run):
    """The run's checkpoint, its calibration windows, eval set and 16-bit reference states."""
    cfg = load_run_config(run)
    graphdef, abstract = abstract_train_state(cfg)
    store = CheckpointStore(run, read_only=True)
    state, _, _ = store.restore("series", 300, abstract)
    store.close()
    cache = prepare_data(cfg)
    windows = eval_set(cfg, 128, val_tokens=cache.val)
    return SimpleNamespace(cfg=cfg, graphdef=graphdef, params=state["params"], rest=state["rest"], abstract=abstract,
                           train=cache.train, calib=calibration_windows(cache.train, 16, SEQ), windows=windows,
                           reference=reference_states(graphdef, state["params"], state["rest"], windows))


def quantized(ck, s):
    model = nnx.merge(ck.graphdef, jax.tree.map(jnp.array, ck.params), ck.rest)
    report = quantize_model(model, ck.calib, s)
    _, qparams, _ = nnx.split(model, nnx.Param, ...)
    return model, report, compare_params(ck.graphdef, ck.params, qparams, ck.rest, ck.windows, ck.reference)


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_zero_initialised_adapters_leave_the_quantized_model_unchanged(ckpt, method):
    s = QuantSettings(method=method, bits=3, group_size=-1)
    model, report, plain = quantized(ckpt, s)
    kernels = {f"{li}/{name}": lin.kernel[...] for li, b in enumerate(model.blocks) for name, lin in linears_of(b)}
    n = add_adapters(model, report, s, RecoverySpec(**LORA))
    adapted = {f"{li}/" + "/".join(map(str, path)): m for li, b in enumerate(model.blocks)
               for path, m in nnx.iter_modules(b) if isinstance(m, LoRALinear)}
    assert set(adapted) == set(kernels)  # every block Linear, at its path
    for key, m in adapted.items():  # the frozen base is the packed codes, dequantized exactly to the PTQ kernel
        assert m.packed_base and np.array_equal(m.base_kernel(), kernels[key])
        assert not np.asarray(m.lora_b[...]).any()
    assert n == sum(8 * sum(k.shape) for k in kernels.values())
    graphdef_a, lora, frozen = nnx.split(model, LoRAParam, ...)
    after = summarize_paired(paired_windows(ckpt.graphdef, ckpt.params, ckpt.rest, ckpt.windows, ckpt.reference, graphdef_a,
                                     (lora, frozen)))
    for k in ("loss_16", "loss_q", "qid", "kl", "top1_agree"):
        assert after[k] == pytest.approx(plain[k], abs=1e-6), k


def test_base_weights_stay_bitwise_frozen_while_the_adapters_train(ckpt):
    s = QuantSettings(method="rtn", bits=2, group_size=-1)
    model, report, _ = quantized(ckpt, s)
    add_adapters(model, report, s, RecoverySpec(**LORA))
    graphdef_a, lora, frozen = nnx.split(model, LoRAParam, ...)
    names = {str(path[-1]) for path, _ in nnx.to_flat_state(lora)}
    assert names == {"lora_a", "lora_b"}  # the only trainable parameters
    before = leaves(frozen)
    assert any(x.dtype == np.uint8 for x in before)  # the codes themselves are the frozen base
    trained, info = train_recovery(graphdef_a, lora, frozen, ckpt.cfg, RecoverySpec(**LORA), ckpt.train, steps=8)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(before, leaves(frozen)))
    b_after = [np.asarray(v) for path, v in nnx.to_flat_state(trained) if str(path[-1]) == "lora_b"]
    assert all(np.abs(b).max() > 0 for b in b_after)
    assert info["steps"] == 8 and info["tokens_seen"] == 8 * BATCH * SEQ and math.isfinite(info["train_loss"])


@pytest.fixture(scope="module")
def sweep(run):
    """One sweep: plain 2-bit RTN, a LoRA recovery of 64 steps, a QAT recovery of 4 steps."""
    spec = make_spec(methods=["rtn"], bits=[2], group_sizes=[-1], calib_samples=16, eval_tokens=128 * SEQ,
                     recovery=[LORA, QAT])
    return spec, run_ptq_sweep(run, spec, **QUIET)


def test_a_short_lora_budget_lowers_2bit_qid(sweep):
    _, rows = sweep
    plain, lora, qat = rows
    assert (plain["format"], lora["format"], qat["format"]) == \
        ("int", "int+lora-t32768-r8-a16-lr0.001", "int+qat-t2048")
    assert lora["qid_before"] == pytest.approx(plain["qid"], abs=1e-6) and plain["qid"] > 0.02  # measured in the row
    assert lora["loss_16"] == plain["loss_16"]  # the same 16-bit reference: the original checkpoint
    assert lora["qid"] < 0.7 * lora["qid_before"]
    assert lora["recovered_fraction"] == pytest.approx((lora["qid_before"] - lora["qid"]) / lora["qid_before"])
    assert lora["recovered_fraction"] - 2 * lora["recovered_fraction_se"] > 0
    assert qat["qid_before"] == pytest.approx(plain["qid"], abs=1e-6) and math.isfinite(qat["qid"])


# ----------------------------------------------------------------------------------------------
# QAT
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_qat_with_a_zero_budget_is_plain_ptq(ckpt, method):
    s = QuantSettings(method=method, bits=3, group_size=-1)
    _, _, plain = quantized(ckpt, s)
    row, _, _ = recovery_row(ckpt.cfg, ckpt.graphdef, ckpt.params, ckpt.rest, s, RecoverySpec(**QAT), calib=ckpt.calib,
                             windows=ckpt.windows, reference=ckpt.reference, train_tokens=ckpt.train, steps=0)
    assert row["recovery_steps"] == 0 and row["recovery_tokens_seen"] == 0
    assert row["qid"] == pytest.approx(plain["qid"], abs=1e-6)
    assert row["loss_q"] == pytest.approx(plain["loss_q"], abs=1e-6)
    assert row["qid"] == row["qid_before"] and row["recovered_fraction"] == 0.0


def test_fake_quantization_is_rtn_and_its_gradient_passes_straight_through(ckpt):
    s = QuantSettings(method="rtn", bits=3, group_size=16)
    maxq = kernel_format(make_format(3))[1]
    w = jax.random.normal(jax.random.key(0), (64, 32)) * 0.05
    fq = fake_quant(w, s, maxq)
    assert np.array_equal(fq, quantize_rtn(w, bits=3, group_size=16))
    c = jax.random.normal(jax.random.key(1), w.shape)
    assert np.array_equal(jax.grad(lambda v: jnp.sum(c * fake_quant(v, s, maxq)))(w), c)
    x = jax.random.normal(jax.random.key(2), (8, 64))

    def f(v):
        return jnp.sum(jnp.tanh(x @ v))

    np.testing.assert_allclose(jax.grad(lambda v: f(fake_quant(v, s, maxq)))(w), jax.grad(f)(fq), rtol=1e-6, atol=1e-7)
    # on the model: exactly the weights RTN quantizes, on RTN's grid (formats match)
    s = QuantSettings(method="rtn", bits=3, group_size=-1)
    fake = nnx.merge(ckpt.graphdef, jax.tree.map(jnp.array, ckpt.params), ckpt.rest)
    fake_quantize_model(fake, s, maxq)
    ref, _, _ = quantized(ckpt, s)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(fake, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(ref, nnx.Param))):
        assert np.array_equal(np.asarray(a), np.asarray(b)), path


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry, match", [
    ({"method": "sft", "tokens": 4096}, r"recovery\.0\.method: unknown recovery method 'sft' \(valid: lora, qat\)"),
    ({"method": "lora", "tokens": 4096, "rank": 0}, r"rank must be >= 1, got 0"),
    ({"method": "lora", "tokens": 0}, r"positive token count"),
    ({"method": "qat", "tokens": 4096, "rank": 4}, r"rank applies to method lora only"),
    ({"method": "lora", "tokens": 4096, "alpha": -1.0}, r"recovery\.0\.alpha"),
    ({"method": "lora", "tokens": 4096, "bits": [9]}, r"between 2 and 8"),
    ({"method": "lora", "tokens": 4096, "ptq_methods": ["xyz"]}, r"valid: rtn, gptq, awq, awq-linear"),
    ({"method": "lora", "tokens": 4096, "colour": 1}, r"recovery\.0\.colour: unknown key"),
    ([LORA, LORA], r"recovery entries 0 and 1 are the same setting"),
])
def test_bad_settings_are_one_line_errors(entry, match):
    with pytest.raises(PTQError, match=match) as err:
        make_spec(recovery=entry)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("entry, match", [
    ({"method": "lora", "tokens": 4096, "rank": 65},
     r"rank 65 exceeds min\(in, out\) = 64 of attn/k \(in 64, out 64\); choose a rank from 1 to 64"),
    ({"method": "qat", "tokens": 100}, r"tokens \(100\) must be at least one batch \(16 x 32 = 512 tokens\)"),
    ({"method": "lora", "tokens": 4096, "targets": ["attn/x"]},
     r"unknown target\(s\) \['attn/x'\] \(the block Linears: attn/k, attn/o, attn/q, attn/v, ffn/down"),
    ({"method": "lora", "tokens": 2048, "warmup_steps": 4}, r"warmup_steps \(4\) must be smaller than the budget's 4"),
])
def test_settings_that_do_not_fit_the_run_are_refused_before_any_row(run, ckpt, entry, match):
    model = nnx.merge(ckpt.graphdef, ckpt.abstract["params"], ckpt.abstract["rest"])
    with pytest.raises(PTQError, match=match):
        check_recovery(model, ckpt.cfg, [RecoverySpec(**entry)])
    before = len(read_rows(run / "ptq.csv"))
    with pytest.raises(PTQError, match=match):
        run_ptq_sweep(run, make_spec(methods=["rtn"], bits=[4], recovery=entry), **QUIET)
    assert len(read_rows(run / "ptq.csv")) == before


def test_cli_recovery_option(run, capsys):
    assert parse_recovery_option("lora:tokens=6.5e4,rank=8,targets=attn/q+attn/v,lr=1e-3,bits=2+3") == {
        "method": "lora", "tokens": 65000.0, "rank": 8, "targets": ["attn/q", "attn/v"], "lr": 1e-3, "bits": [2, 3]}
    assert RecoverySpec(**parse_recovery_option("lora:tokens=6.5e4")).tokens == 65000
    assert parse_recovery_option("{method: qat, tokens: 4096}") == {"method": "qat", "tokens": 4096}
    for option, code, match in [("lora:tokens", 2, "'tokens' is not key=value"),
                                ("sft:tokens=4096", 1, "unknown recovery method 'sft' (valid: lora, qat)"),
                                ("lora", 1, "recovery.0.tokens: Field required")]:
        assert main(["ptq", str(run), "--methods", "rtn", "--bits", "4", "--recovery", option]) == code
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err, err


# ----------------------------------------------------------------------------------------------
# Rows: columns, resume, the grid store and the grid's expected rows
# ----------------------------------------------------------------------------------------------
def test_rows_carry_their_recovery_columns_and_a_rerun_skips_them(run, sweep, tmp_path):
    spec, rows = sweep
    _, lora, qat = rows
    assert (lora["recovery_method"], lora["recovery_rank"], lora["recovery_alpha"], lora["recovery_lr"]) == \
        ("lora", 8, 16.0, 1e-3)
    assert (lora["recovery_tokens"], lora["recovery_tokens_seen"], lora["recovery_steps"]) == (32768, 32768, 64)
    assert lora["adapter_params"] == lora["recovery_trainable_params"] == 2 * 8 * (4 * 128 + 3 * (64 + 128))
    assert (qat["recovery_method"], qat["recovery_rank"], qat["adapter_params"]) == ("qat", None, None)
    assert qat["recovery_lr"] == pytest.approx(0.1 * 3e-3) and qat["recovery_steps"] == 4
    stored = {r["format"]: r for r in read_rows(run / "ptq.csv")}
    assert stored["int+lora-t32768-r8-a16-lr0.001"]["recovery_rank"] == "8"
    assert stored["int"]["recovery_method"] == ""  # plain rows: empty recovery columns
    assert run_ptq_sweep(run, spec, **QUIET) == []  # resumable: every row keyed by its setting is present

    cell = SimpleNamespace(name="c", replicate="c", key="k1", schedule="cosine", kind="main", values={})
    with ResultsStore(tmp_path / "results.sqlite") as store:
        assert all(store.add_ptq_row(r, cell) for r in rows)
        assert not store.add_ptq_row(lora, cell)  # recorded once
        got = {r["format"]: r for r in store.ptq_rows()}
        assert got[lora["format"]]["recovered_fraction"] == pytest.approx(lora["recovered_fraction"])
        assert got[lora["format"]]["qid_before"] == pytest.approx(lora["qid_before"])
        assert got["int"]["recovery_method"] is None
        assert store.ptq_keys("k1")["k1"] == {(300, "rtn", 2, -1, r["format"]) for r in rows}


def test_grid_specs_take_recovery_and_expect_its_rows(tmp_path, cache_dir):
    from efftrain.grid import runner as grid_runner
    from efftrain.grid.spec import GridError, expected_ptq_keys, load_spec

    base = tiny_raw(cache_dir, checkpoint={"tokens": [], "async_save": False})  # one checkpoint: the last step
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))

    def spec_with(recovery):
        path = tmp_path / "grid.yaml"
        path.write_text(yaml.safe_dump({"name": "g", "base": "base.yaml", "runs_dir": str(tmp_path / "runs"),
                                        "ptq": {"methods": ["rtn"], "bits": [2, 4], "group_sizes": [-1],
                                                "recovery": recovery}}))
        return load_spec(path)

    spec = spec_with({"method": "lora", "tokens": 4096, "rank": 4, "bits": [2]})
    (cell,) = spec.cells()
    assert expected_ptq_keys(spec, cell) == {(12, "rtn", 2, -1, "int"), (12, "rtn", 4, -1, "int"),
                                             (12, "rtn", 2, -1, "int+lora-t4096-r4-a16")}
    with pytest.raises(GridError, match=r"ptq\.recovery\.0\.method: unknown recovery method 'x' \(valid: lora, qat\)"):
        spec_with({"method": "x", "tokens": 4096})
    bad = spec_with([{"method": "lora", "tokens": 4096, "rank": 33}])  # d_model 32
    with pytest.raises(GridError, match=r"rank 33 exceeds min\(in, out\) = 32 .*; change ptq\.recovery"):
        grid_runner.preflight(bad, bad.cells(), **QUIET)


# ----------------------------------------------------------------------------------------------
# The report's section
# ----------------------------------------------------------------------------------------------
def test_report_states_whether_recoverability_falls_with_d_over_n(tmp_path):
    from efftrain.analysis.report_parts import Context, Doc, GridResults
    from efftrain.analysis.report_recovery import recovery_groups, section_recovery

    runs = [{"key": f"k{s}", "name": f"dense,seed={s}", "replicate": "dense", "seed": s, "data_seed": s,
             "kind": "main", "parent": None, "config": {}} for s in range(3)]
    labels = {r["key"]: "dense" for r in runs}
    rng = np.random.default_rng(0)

    def rows(slope, setting):
        out = []
        for s in range(3):
            for i, dn in enumerate([1, 3, 10, 30, 100]):
                out.append({"run_key": f"k{s}", "step": 100 * (i + 1), "warmup_steps": 10, "tokens": dn * 1000,
                            "n_params": 1000, "method": "rtn", "bits": 2, "group_size": -1,
                            "format": f"int+{setting}", "recovery_method": setting.split("-")[0], "qid": 0.02,
                            "qid_before": 0.05, "qid_before_se": 0.002,
                            "recovered_fraction": 0.8 + slope * math.log10(dn) + rng.normal(0, 0.02)})
        out.append({**out[-1], "step": 5, "tokens": 500})  # inside warmup: left out, counted
        out.append({**out[-1], "step": 600, "tokens": 200_000, "qid_before": 0.001})  # unresolved before
        return out

    all_rows = rows(-0.2, "lora-t4096-r8-a16") + rows(0.0, "qat-t4096")
    groups = {g.setting: g for g in recovery_groups(all_rows, runs, labels)}
    falls, flat = groups["lora-t4096-r8-a16"], groups["qat-t4096"]
    assert falls.verdict == "recoverability falls as D/N grows" and falls.slope.n == 3
    assert falls.slope.estimate == pytest.approx(-0.2, abs=0.05) and falls.slope.hi < 0
    assert flat.verdict == "no detectable trend"
    assert falls.left_out == {"warmup": 1, "unresolved": 1} and len(falls.points) == 5
    assert all(p["fraction"].n == 3 and p["fraction"].defined for p in falls.points)  # a CI over seeds per point

    res = GridResults(name="g", db_path=tmp_path / "x.sqlite", runs_dir=tmp_path, runs=runs, checkpoints=[],
                      rows=all_rows)
    ctx = Context(res=res, out=tmp_path, baseline="dense", n_boot=0, labels=labels, rows=all_rows)
    doc = Doc()
    section_recovery(ctx, doc)
    text = doc.markdown()
    assert "## Recovery fine-tuning" in text and "recoverability falls as D/N grows" in text
    assert "no detectable trend" in text and not ctx.notes
    assert (tmp_path / "recovery_lora-t4096-r8-a16_rtn_g-1_int.png").is_file()


def test_recovery_benchmark_smoke(tmp_path):
    """benchmarks/bench_recovery.py --small runs both methods and writes their timings."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "bench_recovery.py"
    spec = importlib.util.spec_from_file_location("bench_recovery", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--small", "--out", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in rows] == ["lora", "qat"] and all(r["steps"] == 2 for r in rows)
    assert all(r["first_row_s"] > 0 and r["warm_row_s"] > 0 for r in rows)
