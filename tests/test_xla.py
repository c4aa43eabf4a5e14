"""efftrain.xla: the compile caches and the per-program compile options."""

from types import SimpleNamespace

from efftrain import xla


def test_persistent_compilation_cache_is_opt_out(monkeypatch, tmp_path):
    """On by default in the user cache dir, EFFTRAIN_COMPILATION_CACHE=off disables it, a path moves it,
    and a directory already configured in JAX is kept (jax.config faked: the session's is left alone)."""

    class Config(SimpleNamespace):
        def update(self, key, value):
            setattr(self, key, value)

    def run(env, preset=None):
        cfg = Config(jax_compilation_cache_dir=preset, jax_compilation_cache_max_size=-1,
                     jax_persistent_cache_min_compile_time_secs=1.0)
        monkeypatch.setattr(xla, "jax", SimpleNamespace(config=cfg))
        if env is None:
            monkeypatch.delenv("EFFTRAIN_COMPILATION_CACHE", raising=False)
        else:
            monkeypatch.setenv("EFFTRAIN_COMPILATION_CACHE", env)
        return xla.enable_compilation_cache(), cfg

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path, cfg = run(None)
    assert path == cfg.jax_compilation_cache_dir == str(tmp_path / "efftrain" / "jax")
    assert cfg.jax_compilation_cache_max_size == -1  # JAX's per-write eviction stays off (prune_cache bounds it)
    assert cfg.jax_persistent_cache_min_compile_time_secs == 0.0  # PTQ's many sub-second programs persist too
    assert run("off") == (None, Config(jax_compilation_cache_dir=None, jax_compilation_cache_max_size=-1,
                                       jax_persistent_cache_min_compile_time_secs=1.0))
    assert run(str(tmp_path / "c"))[0] == str(tmp_path / "c")
    assert run(None, preset="/elsewhere")[0] == "/elsewhere"


def test_prune_cache_deletes_the_oldest_files_down_to_the_budget(tmp_path):
    import os

    for i, size in enumerate([300, 200, 100]):  # written oldest first
        f = tmp_path / f"entry{i}-cache"
        f.write_bytes(b"x" * size)
        os.utime(f, (1000 + i, 1000 + i))
    assert xla.prune_cache(tmp_path, 350) == 1  # 600 bytes: the oldest (300) goes
    assert sorted(f.name for f in tmp_path.iterdir()) == ["entry1-cache", "entry2-cache"]
    assert xla.prune_cache(tmp_path, 350) == 0
    assert xla.prune_cache(tmp_path / "missing", 0) == 0


def test_options_are_empty_off_gpu_and_carry_the_autotune_cache_on_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(xla, "on_gpu", lambda: False)
    assert xla.step_options(True) == xla.step_options(False) == xla.ptq_options() == xla.eval_options() == {}
    monkeypatch.setattr(xla, "on_gpu", lambda: True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("EFFTRAIN_AUTOTUNE_CACHE", raising=False)
    cache = str(tmp_path / "efftrain" / "autotune")
    assert xla.step_options(True) == {"xla_gpu_per_fusion_autotune_cache_dir": cache}
    assert xla.ptq_options() == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_per_fusion_autotune_cache_dir": cache}
    # eval programs share the cache: a second process scores a model with the first one's kernels
    assert xla.eval_options() == {"xla_gpu_per_fusion_autotune_cache_dir": cache}
    assert (tmp_path / "efftrain" / "autotune").is_dir()
    monkeypatch.setenv("EFFTRAIN_AUTOTUNE_CACHE", "off")
    assert xla.step_options(True) == {}
    assert xla.describe({"a": True, "b": "x"}) == "a=true b=x" and xla.describe({}) == "none"


def test_ptq_jit_compiles_with_its_options_and_inlines_when_nested(monkeypatch):
    """The options reach XLA (an unknown one is rejected) and a ptq_jit function called inside another
    one is inlined instead of passing options to a nested jit (which jax refuses)."""
    import jax.numpy as jnp
    import pytest

    monkeypatch.setattr(xla, "ptq_options", lambda: {"xla_gpu_enable_triton_gemm": False})

    @xla.ptq_jit
    def inner(x):
        return x * 2

    @xla.ptq_jit(static_argnames=("k",))
    def outer(x, k):
        return inner(x) + k

    assert outer(jnp.ones(3), k=1).tolist() == [3.0, 3.0, 3.0]
    assert inner(jnp.ones(2)).tolist() == [2.0, 2.0]
    monkeypatch.setattr(xla, "ptq_options", lambda: {"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        xla.ptq_jit(lambda x: x + 1)(jnp.ones(2))


def test_eval_programs_compile_with_eval_options(monkeypatch):
    """The paired PTQ scoring and held-out loss programs are built with eval_jit, whose options reach
    XLA (an unknown one is rejected at the first call)."""
    import jax.numpy as jnp
    import pytest

    from efftrain.train import step

    monkeypatch.setattr(xla, "eval_options", lambda: {"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        xla.eval_jit(lambda x: x + 1)(jnp.ones(2))
    for make in (step.make_window_loss_fn, step.make_hidden_fn, step.make_paired_eval_fn,
                 step.make_paired_from_hidden_fn, step.make_paired_many_fn):
        assert make(None).__code__ is xla.eval_jit(lambda x: x).__code__, make.__name__  # eval_jit's wrapper


def test_guard_first_compile_names_the_setting_in_one_line():
    import pytest

    calls = []

    def broken(x):
        calls.append(x)
        if len(calls) == 1:
            raise IndexError("absl::container_internal::raw_hash_map<>::at\nmore\nlines")
        return x

    guarded = xla.guard_first_compile(broken, {"xla_opt": True}, "train.deterministic=true")
    with pytest.raises(ValueError) as e:
        guarded(1)
    assert str(e.value) == ("train.deterministic=true: XLA could not compile the program with xla_opt=true "
                            "(IndexError: absl::container_internal::raw_hash_map<>::at)")
    assert guarded(2) == 2  # not compiled yet: the next call is guarded again, and passes

    def oom(x):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        xla.guard_first_compile(oom, {"o": 1}, "s")(0)
    assert xla.guard_first_compile(broken, {}, "s") is broken


def test_train_with_a_rejected_compile_option_is_one_error_line_and_no_checkpoint(monkeypatch, tiny_config,
                                                                                  tmp_path, capsys):
    """XLA rejecting the step's options: `efftrain train` prints one `error:` line naming the setting,
    exits non-zero and writes no checkpoint."""
    from efftrain import cli
    from efftrain.train import loop

    monkeypatch.setattr(loop, "step_options", lambda deterministic: {"xla_no_such_option": 1})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(tiny_config(train__max_steps=2).to_yaml())
    code = cli.main(["train", str(cfg_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1
    assert err[0].startswith("error: train.deterministic=true: XLA could not compile the program with "
                             "xla_no_such_option=1")
    assert not list((tmp_path / "run").glob("checkpoints/*/*"))
