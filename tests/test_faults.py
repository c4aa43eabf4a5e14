"""Fault tolerance (docs/RELIABILITY.md): signals, non-finite steps, torn small files, interrupted
deletes, full disks, corrupt checkpoints, two trainers on one run directory, another corpus, config
values that cannot be meant."""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from efftrain.cli import EXIT_REQUEUE, main
from efftrain.config import ConfigError, config_warnings, from_dict, load_config
from efftrain.files import is_disk_full
from efftrain.train import checkpoint as ckpt
from efftrain.train import loop
from efftrain.train.checkpoint import CheckpointStore, NonFiniteError
from efftrain.train.loop import Interrupted, RunLock, RunLockedError, train
from efftrain.train.rundir import RunDirError, load_run_config

from conftest import tiny_raw

QUIET = dict(log=lambda *_: None)
STEPS = 12  # series at 2, 6 and 12; resume every 5


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


def array_sums(run, kind="series", step=STEPS):
    return json.loads((run / "checkpoints" / kind / str(step) / "checksums" / "metadata").read_text())["arrays"]


def one_error_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error:") and all(n in lines[-1] for n in needles), err
    assert sum(ln.startswith("error:") for ln in lines) == 1, err


pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted run of the tiny config: (raw config, run dir, TrainResult)."""
    raw = tiny_raw(cache_dir, train__max_steps=STEPS)
    run = tmp_path_factory.mktemp("faults") / "reference"
    return raw, run, train(from_dict(raw), run, **QUIET)


def copy_run(reference, tmp_path):
    raw, run, _ = reference
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    return dst, config


# ----------------------------------------------------------------------------------------------
# 1. signals; 6. the run-directory lock
# ----------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import os, pathlib, sys, time
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as j
    original = j.JsonCheckpointHandler._save_fn

    async def slow_series_6(self, x, directory):  # hold the series save of step 6 in flight
        if isinstance(x, dict) and x.get("kind") == "series" and x.get("step") == 6:
            pathlib.Path(os.environ["MARK"]).write_text("saving")
            time.sleep(1.0)
        return await original(self, x, directory)

    j.JsonCheckpointHandler._save_fn = slow_series_6
    from efftrain.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigint_during_an_inflight_save_writes_a_resume_checkpoint_and_exits_75(reference, tmp_path, compile_cache):
    """The hang of the issue: SIGINT while the series save of step 6 is still being written (the resume
    save of step 10 waits for it, so the signal comes before the end). Now: the step finishes, a resume
    checkpoint is written, every save is waited for, exit 75; meanwhile a second trainer is refused with
    the holder's pid; the resumed run equals the uninterrupted one bitwise."""
    raw, _, ref = reference
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**raw, "checkpoint": {**raw["checkpoint"], "async_save": True}}))
    run, mark = tmp_path / "run", tmp_path / "mark"
    child = subprocess.Popen([sys.executable, "-c", CHILD, "train", str(config), "--out", str(run)],
                             env={**os.environ, **compile_cache, "MARK": str(mark)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not mark.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert mark.exists(), child.communicate()[0]
        with pytest.raises(RunLockedError, match=rf"being trained by another process \(pid {child.pid} "):
            train(from_dict(raw), run, **QUIET)
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=60)  # no hang
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == EXIT_REQUEUE, out
    stopped = int(out.split("stopped after step ")[1].split()[0])
    assert 6 < stopped < STEPS and "interrupted: SIGINT received" in out and "Traceback" not in out
    store = CheckpointStore(run, read_only=True)
    assert store.steps("series") == [2, 6] and store.steps("resume") == [stopped]  # the in-flight save finished
    resumed = train(from_dict(raw), run, **QUIET)  # the lock died with the process
    assert {**{s: ref.losses[s] for s in range(1, stopped + 1)}, **resumed.losses} == ref.losses
    for a, b in zip(leaves(ref.final_state), leaves(resumed.final_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigterm_in_process_finishes_the_step_and_raises_interrupted(tiny_config, tmp_path):
    def log(line):
        if line.startswith("step 03/"):
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(logging={"tensorboard": False, "progress": True})
    with pytest.raises(Interrupted) as info:
        train(cfg, tmp_path / "run", log=log)
    # the signal came during step 3's logging: step 4 is the one that finishes
    assert info.value.signum == signal.SIGTERM and "stopped after step 4" in str(info.value)
    assert CheckpointStore(tmp_path / "run", read_only=True).steps("resume") == [4]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    RunLock(tmp_path / "run").release()  # train released it


def test_grid_passes_the_interruption_on(tmp_path, cache_dir, monkeypatch):
    from efftrain.grid import runner
    from efftrain.grid.store import ResultsStore

    raw = tiny_raw(cache_dir)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    spec = {"name": "g", "base": "base.yaml", "runs_dir": str(tmp_path / "runs"), "axes": {"optim.lr": [1e-3]},
            "ptq": {"methods": ["rtn"], "bits": [8], "group_sizes": [-1], "eval_tokens": 4096}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))

    def interrupted(cell, log):
        raise Interrupted("SIGTERM received: stopped after step 3", signal.SIGTERM)

    monkeypatch.setattr(runner, "_train", interrupted)
    assert main(["grid", "run", str(tmp_path / "grid.yaml")]) == EXIT_REQUEUE
    with ResultsStore(tmp_path / "runs" / "results.sqlite", read_only=True) as store:
        assert [r["status"] for r in store.runs()] == ["pending"]


def test_a_second_trainer_is_refused_with_the_holders_pid(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock(run)
    with pytest.raises(RunLockedError, match=rf"pid {os.getpid()} "):
        train(tiny_config(), run, **QUIET)
    lock.release()


# ----------------------------------------------------------------------------------------------
# 2. non-finite steps
# ----------------------------------------------------------------------------------------------
def poison(monkeypatch, steps):
    """Make the train step's loss and new parameters NaN at the given (1-based) steps."""
    real = loop.make_train_step

    def make(graphdef, cfg, tx, *options, **kw):
        inner = real(graphdef, cfg, tx, *options, **kw)
        bad = jnp.asarray([(s - 1) * cfg.tokens_per_step for s in steps], jnp.float32)

        def step(state, batch, tokens_seen):
            new, metrics = inner(state, batch, tokens_seen)
            factor = jnp.where(jnp.any(tokens_seen == bad), jnp.nan, 1.0)
            params = jax.tree.map(lambda p: p * factor.astype(p.dtype), new["params"])
            return {**new, "params": params}, {**metrics, "loss": metrics["loss"] * factor}

        return step

    monkeypatch.setattr(loop, "make_train_step", make)


def test_a_nonfinite_step_halts_within_one_step_and_is_never_checkpointed(tiny_config, tmp_path, monkeypatch):
    poison(monkeypatch, [9])  # 9 is no log or save step (log_every 4): its flag is read during step 10
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"non-finite loss/gradient at step 9 \(loss nan.*newest checkpoint: "
                                             r".*checkpoints/series/6"):
        train(tiny_config(train__log_every=4), run, **QUIET)
    store = CheckpointStore(run, read_only=True)
    assert store.steps("series") == [2, 6] and store.steps("resume") == [5]
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]


def test_skip_nonfinite_skips_a_bounded_number_of_steps(tiny_config, tmp_path, monkeypatch):
    poison(monkeypatch, [9, 11])
    # with compile options, as every GPU step has them: only a top-level jit may take them, so the
    # skipping step must be one program (it once wrapped the jitted step in a second jit)
    monkeypatch.setattr(loop, "step_options", lambda deterministic: {"xla_cpu_enable_fast_math": False})
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 11 .*--skip-nonfinite 1 spent on steps \[9\]"):
        train(tiny_config(), run, skip_nonfinite=1, **QUIET)
    store = CheckpointStore(run, read_only=True)
    assert store.steps("resume") == [10] and store.meta("resume", 10)["skipped_steps"] == [9]
    records = {json.loads(x)["step"]: json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()}
    assert records[9]["skipped"] and np.isnan(records[9]["loss"]) and np.isfinite(records[10]["loss"])


def test_nonfinite_checkpoints_are_refused_at_save_and_at_restore(reference, tmp_path, monkeypatch, capfd):
    run, _ = copy_run(reference, tmp_path)
    store = CheckpointStore(run, async_save=False)
    abstract = ckpt.abstract_like(reference[2].final_state)
    state, data, meta = store.restore("series", STEPS, abstract)
    state["params"] = jax.tree.map(lambda p: p * jnp.nan, state["params"])
    with pytest.raises(NonFiniteError, match=r"refusing to write the resume checkpoint at step 30: non-finite "
                                             r"values in \['params'\]"):
        store.save("resume", 30, state, data, meta)
    assert store.steps("resume") == [10]
    # a NaN checkpoint from before the save refused them: eval and ptq refuse it with one line
    monkeypatch.setattr(ckpt, "nonfinite_leaves", lambda _: [])
    shutil.rmtree(run / "checkpoints" / "series" / str(STEPS))
    assert STEPS not in store.steps("series")
    store.save("series", STEPS, state, data, meta)
    store.close()
    monkeypatch.undo()
    capfd.readouterr()
    assert main(["eval", str(run), "--step", str(STEPS)]) == 1
    one_error_line(capfd.readouterr().err, f"series/{STEPS} holds non-finite values")
    assert main(["ptq", str(run), "--methods", "rtn", "--bits", "8", "--group-size", "-1", "--checkpoints",
                 str(STEPS), "--eval-batches", "1", "--calib-samples", "2"]) == 1
    one_error_line(capfd.readouterr().err, f"series/{STEPS} holds non-finite values")


def test_validation_rejects_infinite_and_absurd_values_and_warns_about_ignored_ones(capsys):
    for override, message in [("optim.lr=.inf", "optim.lr: Input should be a finite number"),
                              ("optim.lr=1e6", "optim.lr: Input should be less than or equal to 10"),
                              ("model.init_std=1e30", "model.init_std: Input should be less than or equal to 1"),
                              ("optim.eps=.nan", "optim.eps: Input should be a finite number")]:
        with pytest.raises(ConfigError, match=message):
            load_config("dense-tiny", [override])
    assert main(["train", "dense-tiny", "--set", "optim.lr=.inf"]) == 2
    assert "finite number" in capsys.readouterr().err
    assert config_warnings(load_config("dense-tiny", ["model.mla.kv_lora_rank=8", "model.moe.top_k=1"])) == [
        "model.mla.kv_lora_rank is ignored: model.attention is mha",
        "model.moe.top_k is ignored: model.moe.enabled is false"]
    assert "model.head_dim (16) is ignored" in config_warnings(load_config("mla-tiny", ["model.head_dim=16"]))[0]
    assert config_warnings(load_config("deepseek-tiny")) == []


# ----------------------------------------------------------------------------------------------
# 3. torn small files, interrupted deletes
# ----------------------------------------------------------------------------------------------
def test_kills_while_writing_config_or_deleting_a_checkpoint_leave_a_usable_run(tiny_config, tmp_path, monkeypatch,
                                                                              capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml.tmp").write_text("name: cut sh")  # a first start killed while writing config.yaml
    real_rmtree = shutil.rmtree

    def rmtree_killed_halfway(path, *args, **kwargs):  # deletes some files, then "dies"
        files = sorted(p for p in pathlib.Path(path).rglob("*") if p.is_file())
        for f in files[: len(files) // 2]:
            f.unlink()
        raise OSError(errno.EINTR, "killed")

    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_halfway)
    train(tiny_config(), run, stop_at_step=7, **QUIET)  # resume 5 -> 7: 5 goes to the trash, half deleted
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert CheckpointStore(run, read_only=True).steps("resume") == [7]
    assert any((run / "checkpoints" / "resume" / ".trash").iterdir())
    assert main(["info", str(run)]) == 0 and "resume checkpoint: step 7" in capsys.readouterr().out

    real_replace = pathlib.Path.replace

    def killed_before_rename(self, target):
        if pathlib.Path(target).name == "config.yaml":
            raise KeyboardInterrupt  # the rerun is killed while rewriting config.yaml
        return real_replace(self, target)

    monkeypatch.setattr(pathlib.Path, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(), run, **QUIET)
    monkeypatch.undo()
    assert load_run_config(run) == tiny_config()  # still the whole old file
    assert train(tiny_config(), run, **QUIET).steps == 12
    assert not any((run / "checkpoints" / "resume" / ".trash").iterdir())


# ----------------------------------------------------------------------------------------------
# 4. full disks
# ----------------------------------------------------------------------------------------------
def test_disk_full_inside_an_async_checkpoint_write_is_one_line_and_reruns_work(cache_dir, tmp_path, monkeypatch,
                                                                               capfd):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as j

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(cache_dir, checkpoint={"tokens": [512, 1536], "resume_every": 5,
                                                                      "async_save": True})))
    run = tmp_path / "run"
    original = j.JsonCheckpointHandler._save_fn

    def straggler(item_dir):  # what tensorstore does after orbax gave up: the state item's writes go on
        for i in range(30):
            time.sleep(0.1)
            target = item_dir.parent / "state.orbax-checkpoint-tmp" / "d" / f"late-{i}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x" * 64)

    async def full_at_series_6(self, x, directory):  # runs in orbax's background commit thread
        if isinstance(x, dict) and x.get("kind") == "series" and x.get("step") == 6:
            threading.Thread(target=straggler, args=(Path(directory),), daemon=True).start()
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, x, directory)

    monkeypatch.setattr(j.JsonCheckpointHandler, "_save_fn", full_at_series_6)
    assert main(["train", str(config), "--out", str(run)]) == 1
    one_error_line(capfd.readouterr().err, "error: disk full while writing the series checkpoint at step 6",
                   str(run / "checkpoints" / "series" / "6"))
    store = CheckpointStore(run, read_only=True)  # reported before the next save: none after the failed one
    assert store.steps("series") == [2] and store.steps("resume") == [5]
    monkeypatch.undo()
    assert main(["train", str(config), "--out", str(run)]) == 0
    assert CheckpointStore(run, read_only=True).steps("series") == [2, 6, 12]  # no series point lost
    # the raw tensorstore text of a real full disk is recognised too
    assert is_disk_full(ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database: Failed to '
                                   "write 236115 bytes to file 7: No space left on device [os_error_code='28']"))


def test_disk_full_while_appending_metrics_leaves_a_torn_line_that_resume_drops(cache_dir, tmp_path, monkeypatch,
                                                                                capfd):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_raw(cache_dir)))
    run = tmp_path / "run"
    real_open = pathlib.Path.open

    class FillsUp:
        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 8:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return FillsUp(f) if self.name == "metrics.jsonl" and mode == "a" else f

    monkeypatch.setattr(pathlib.Path, "open", open_)
    assert main(["train", str(config), "--out", str(run)]) == 1
    one_error_line(capfd.readouterr().err, "disk full while writing a line of", str(run / "metrics.jsonl"))
    assert not (run / "metrics.jsonl").read_text().endswith("\n")
    monkeypatch.undo()
    assert main(["train", str(config), "--out", str(run)]) == 0
    assert "dropped 1 torn line" in capfd.readouterr().out
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


# ----------------------------------------------------------------------------------------------
# 5. corrupt bytes
# ----------------------------------------------------------------------------------------------
def test_corrupt_checkpoints_are_named_and_train_can_fall_back(reference, tmp_path, capfd):
    run, config = copy_run(reference, tmp_path)
    data_files = sorted((run / "checkpoints" / "series" / str(STEPS) / "state").rglob("d/*"),
                        key=lambda p: p.stat().st_size)
    raw = bytearray(data_files[-1].read_bytes())  # the largest array file of the newest checkpoint
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(255 - b for b in raw[mid:mid + 64])
    data_files[-1].write_bytes(bytes(raw))
    (run / "checkpoints" / "resume" / "10" / "data" / "metadata").write_text('{"next_index": "x"}')
    capfd.readouterr()
    assert main(["eval", str(run), "--step", str(STEPS)]) == 1
    one_error_line(capfd.readouterr().err, f"checkpoints/series/{STEPS}")
    assert main(["train", str(config), "--out", str(run)]) == 1
    one_error_line(capfd.readouterr().err, f"checkpoints/series/{STEPS}", "--fallback", "(resume step 10)")
    assert main(["train", str(config), "--out", str(run), "--fallback"]) == 0
    out = capfd.readouterr().out
    assert "resume/10 is corrupt: the data-iterator state does not match" in out
    assert "resuming" in out and "from the series checkpoint at step 6" in out
    assert sorted(p.name.rsplit("-", 2)[0] for p in (run / "checkpoints" / "corrupt").iterdir()) == [
        "resume-10", f"series-{STEPS}"]
    assert array_sums(run) == array_sums(reference[1])  # re-made bitwise
    assert main(["eval", str(run), "--step", str(STEPS)]) == 0


# ----------------------------------------------------------------------------------------------
# 7. another corpus
# ----------------------------------------------------------------------------------------------
def test_resuming_on_another_corpus_is_refused_but_a_moved_one_is_not(cache_dir, tmp_path):
    import email

    corpus = tmp_path / "a"
    corpus.mkdir()
    for name in ("header.py", "generator.py", "feedparser.py", "charset.py", "base64mime.py", "utils.py"):
        shutil.copy(pathlib.Path(email.__file__).parent / name, corpus)  # header, generator: the val split
    data = {**tiny_raw(cache_dir)["data"], "source": "files", "max_documents": None}

    def cfg(path):
        return from_dict(tiny_raw(cache_dir, data={**data, "paths": [f"{path}/*.py"]}, train__max_steps=3))

    run = tmp_path / "run"
    train(cfg(corpus), run, stop_at_step=2, **QUIET)
    moved = tmp_path / "b"
    shutil.copytree(corpus, moved)
    (corpus / "base64mime.py").write_text("# changed\n")
    with pytest.raises(RunDirError, match=r"another corpus.*\n  corpus\.content_sha256: '\w+' \(run\) -> '\w+' \(now\)"):
        train(cfg(corpus), run, **QUIET)
    assert train(cfg(moved), run, **QUIET).steps == 3
