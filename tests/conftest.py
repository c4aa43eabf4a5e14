"""Shared test setup: 8 fake CPU devices (for the data-parallel tests) and tiny configs."""

import os

# LLVM at -O1 instead of XLA's default -O2 for the CPU programs: the suite spends most of its time
# compiling many small programs, each run a few times; measured 14:35 -> 12:39 for the whole suite on the
# 2-core CI-sized machine (docs/BENCHMARKS.md). The HLO passes (fusion, layout) are unchanged; tests
# assert semantics and tolerances, never CPU speed.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# training and the PTQ sweep turn on JAX's persistent compilation cache in ~/.cache (efftrain.xla): never
# from the tests. The session has its own cache instead (`_session_compilation_cache`).
os.environ.setdefault("EFFTRAIN_COMPILATION_CACHE", "off")

import pytest  # noqa: E402

from efftrain.config import from_dict  # noqa: E402


def tiny_raw(tmp_cache: str, **sections) -> dict:
    """A tiny but real config: 40 stdlib documents, 384-token BPE, d_model 32, 2 layers."""
    raw = {
        "name": "test",
        "model": {"vocab_size": 384, "d_model": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64,
                  "compute_dtype": "float32"},
        "data": {"source": "pystdlib", "max_documents": 60, "seq_len": 32, "val_fraction": 0.2,
                 "tokenizer_train_chars": 200000, "cache_dir": tmp_cache},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"batch_size": 8, "max_steps": 12, "eval_every": 0, "eval_batches": 2, "log_every": 1,
                  "data_parallel": 1},
        "checkpoint": {"tokens": [512, 1536], "resume_every": 5, "async_save": False},
        "logging": {"tensorboard": False, "progress": False},
    }
    for key, value in sections.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return raw


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture
def tiny_config(cache_dir):
    def make(**sections):
        return from_dict(tiny_raw(cache_dir, **sections))

    return make


CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="session", autouse=True)
def _session_compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the whole session, shared by the xdist workers and every child
    process (as JAX_* variables): each train() and each PTQ sweep builds fresh jitted functions, so the
    same programs (the tiny config's step, the PTQ kernels of a layer shape, ...) would otherwise be
    compiled again in every test that runs them (a fresh directory per session: nothing is carried over
    from an earlier run). Yields the settings as env vars."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, common to the workers
    path = root / "xla-cache"
    path.mkdir(exist_ok=True)
    settings = dict(zip(CACHE_SETTINGS, (str(path), 0, 0)))
    before = {name: getattr(jax.config, name) for name in settings}
    env_before = {name.upper(): os.environ.get(name.upper()) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)
    compilation_cache.reset_cache()
    yield {name.upper(): str(value) for name, value in settings.items()}
    for name, value in before.items():
        jax.config.update(name, value)
    for name, value in env_before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def compile_cache(_session_compilation_cache):
    """The persistent XLA cache's settings as env vars, for modules whose child processes should use it
    too (the session's cache is on in this process already; child processes inherit it through os.environ,
    unless a test builds their environment itself)."""
    return _session_compilation_cache
