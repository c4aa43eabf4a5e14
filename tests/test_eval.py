"""Per-window evaluation: the jitted per-window and paired (16-bit vs quantized) functions against
independent numpy references, fixed-shape padded batches, and the summary statistics."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from efftrain.config import from_dict
from efftrain.eval import EvalSet, compare_params, evaluate_model, mean_and_se, paired_eval_fn, scores, window_loss_fn
from efftrain.model.transformer import build_model
from efftrain.train.step import make_eval_step

from conftest import tiny_raw

SEQ = 16


@pytest.fixture(scope="module")
def setup():
    cfg = from_dict(tiny_raw("unused", train={"batch_size": 4, "max_steps": 1}))
    model = build_model(cfg.model, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    # a "quantized" model: every parameter rounded to a coarse grid (changes the logits, not the graph)
    qparams = jax.tree.map(lambda p: jnp.round(p * 8) / 8, params)
    windows = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (11, SEQ + 1)).astype(np.int32)
    return cfg, model, graphdef, params, qparams, rest, windows


def log_softmax64(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


_logits = nnx.jit(lambda model, inputs: model(inputs).logits)  # (eagerly, every primitive compiles on its own)


def reference(graphdef, params, rest, windows):
    """float64 numpy log-probs [n, T, V] of the main model on each window (run one window at a time)."""
    model = nnx.merge(graphdef, params, rest)
    return np.concatenate([log_softmax64(_logits(model, jnp.asarray(w[None, :-1]))) for w in windows])


def ce64(logp, windows):
    return -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0].mean(axis=-1)


def test_per_window_losses_average_to_the_batch_mean_loss(setup):
    cfg, _, graphdef, params, _, rest, windows = setup
    per_window = scores(window_loss_fn(graphdef), EvalSet(windows[:8], batch_size=4), params, rest)
    assert per_window.shape == (8,)
    old = make_eval_step(graphdef, cfg)  # the batch-mean loss of two batches of 4
    batch_means = [float(old(params, rest, jnp.asarray(windows[i:i + 4]))) for i in (0, 4)]
    assert np.mean(per_window) == pytest.approx(np.mean(batch_means), rel=1e-6)
    np.testing.assert_allclose(per_window, ce64(reference(graphdef, params, rest, windows[:8]), windows[:8]),
                               rtol=1e-5)


def test_ragged_last_batch_is_padded_dropped_and_compiled_once(setup):
    _, _, graphdef, params, _, rest, windows = setup
    fn = window_loss_fn(graphdef)
    ragged = EvalSet(windows, batch_size=4)  # 11 windows: batches of 4, 4, 3 (+1 padding)
    assert {b.shape for b in ragged.batches()} == {(4, SEQ + 1)} and len(ragged.batches()) == 3
    before = fn._cache_size()
    got = scores(fn, ragged, params, rest)
    assert fn._cache_size() - before <= 1  # one shape, at most one new compile
    one_by_one = scores(fn, EvalSet(windows, batch_size=1), params, rest)
    assert got.shape == (11,)
    np.testing.assert_allclose(got, one_by_one, rtol=1e-5)
    assert ragged.n == 11 and ragged.tokens == 11 * SEQ
    # a list of batches (the old calling convention) gives the same numbers
    as_list = evaluate_model(nnx.merge(graphdef, params, rest), setup[0], [windows[:6], windows[6:]])
    assert as_list["windows"] == 11 and as_list["val_loss"] == pytest.approx(float(np.mean(got)), rel=1e-6)


def test_paired_kl_top1_and_losses_match_a_float64_reference(setup):
    _, _, graphdef, params, qparams, rest, windows = setup
    got = scores(paired_eval_fn(graphdef), EvalSet(windows, batch_size=4), params, qparams, rest)
    lp16, lpq = reference(graphdef, params, rest, windows), reference(graphdef, qparams, rest, windows)
    kl = (np.exp(lp16) * (lp16 - lpq)).sum(axis=-1).mean(axis=-1)
    top1 = (lp16.argmax(-1) == lpq.argmax(-1)).mean(axis=-1)
    assert kl.min() > 1e-3  # the rounding really changed the model
    np.testing.assert_allclose(got["kl"], kl, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(got["top1_agree"], top1, atol=1 / SEQ + 1e-6)  # at most one fp near-tie
    assert np.mean(got["top1_agree"]) == pytest.approx(np.mean(top1), abs=0.02)
    np.testing.assert_allclose(got["loss_16"], ce64(lp16, windows), rtol=1e-5)
    np.testing.assert_allclose(got["loss_q"], ce64(lpq, windows), rtol=1e-5)

    row = compare_params(graphdef, params, qparams, rest, EvalSet(windows, batch_size=4))
    diff = ce64(lpq, windows) - ce64(lp16, windows)
    assert row["qid"] == pytest.approx(row["loss_q"] - row["loss_16"], abs=1e-9)
    assert row["qid"] == pytest.approx(diff.mean(), rel=1e-4)
    assert row["qid_se"] == pytest.approx(np.std(diff, ddof=1) / math.sqrt(len(diff)), rel=1e-3)
    assert row["kl"] == pytest.approx(kl.mean(), rel=1e-3)
    assert row["kl_se"] == pytest.approx(np.std(kl, ddof=1) / math.sqrt(len(kl)), rel=1e-2)


def test_a_model_against_itself(setup):
    _, _, graphdef, params, _, rest, windows = setup
    row = compare_params(graphdef, params, params, rest, EvalSet(windows, batch_size=4))
    assert row["qid"] == 0 and row["qid_se"] == 0 and row["kl"] == 0 and row["kl_se"] == 0
    assert row["top1_agree"] == 1.0


def test_mean_and_se():
    x = np.array([1.0, 2.0, 4.0, 7.0])
    mean, se = mean_and_se(x)
    assert mean == 3.5 and se == pytest.approx(np.std(x, ddof=1) / 2)
    assert math.isnan(mean_and_se([2.0])[1])


def test_eval_run_reports_se_and_windows_on_the_training_val_windows(tiny_config, tmp_path, capsys):
    """`efftrain eval` scores the windows training-time val loss used (train.eval_batches x batch_size,
    eval seed 0), so it reproduces each checkpoint's recorded val_loss; --json and the table show the
    standard error and the window count."""
    import json

    from efftrain.cli import main
    from efftrain.eval import eval_run
    from efftrain.train.loop import train

    run = tmp_path / "run"
    result = train(tiny_config(), run, log=lambda *_: None)  # batch_size 8, eval_batches 2
    rows = eval_run(run)
    assert [r["step"] for r in rows] == [m["step"] for m in result.series]
    for row, meta in zip(rows, result.series):
        assert row["windows"] == 16 and 0 < row["val_loss_se"] < 0.5
        assert row["val_loss"] == pytest.approx(meta["val_loss"], rel=1e-5)
    assert eval_run(run, n_batches=1)[0]["windows"] == 8
    assert main(["eval", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["val_loss_se"], r["windows"]) for r in out] == [(r["val_loss_se"], r["windows"]) for r in rows]
    assert main(["eval", str(run)]) == 0
    captured = capsys.readouterr()
    assert "±se" in captured.out and "windows" in captured.out and " ± " in captured.err


def test_reusing_the_16_bit_hidden_states_gives_the_same_row(setup):
    """A PTQ row computed from the 16-bit model's cached hidden states (one forward per row) equals the
    row that runs both models, and a model against itself still has exactly zero QiD and KL."""
    from efftrain.eval import reference_states

    _, _, graphdef, params, qparams, rest, windows = setup
    ragged = EvalSet(windows, batch_size=4)
    ref = reference_states(graphdef, params, rest, ragged)
    assert [h.shape for h in ref] == [(4, SEQ, setup[0].model.d_model)] * 3
    both = compare_params(graphdef, params, qparams, rest, ragged)
    cached = compare_params(graphdef, params, qparams, rest, ragged, ref)
    assert cached.keys() == both.keys()
    for key in both:
        assert cached[key] == pytest.approx(both[key], rel=1e-6, abs=1e-9), key
    itself = compare_params(graphdef, params, params, rest, ragged, ref)
    assert itself["kl"] == 0 and itself["top1_agree"] == 1.0 and abs(itself["qid"]) < 1e-6
