"""Shared test setup: 8 fake CPU devices (for the data-parallel tests) and tiny configs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# training and the PTQ sweep turn on JAX's persistent compilation cache (efftrain.xla): off in the tests,
# which must not write to the user's ~/.cache, and whose thousands of tiny programs it would serialize one
# by one (the whole suite took twice as long with it); modules that gain from it set up their own
# (test_faults.py, test_grid.py)
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


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache of its own for a module of many short runs (and their child processes):
    each train() builds a fresh jitted step, which would otherwise compile again (~4 s on CPU). Modules
    opt in with `pytestmark = pytest.mark.usefixtures("compile_cache")`; yields the settings as env vars."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla-cache")),
                "jax_persistent_cache_min_compile_time_secs": 0, "jax_persistent_cache_min_entry_size_bytes": 0}
    before = {name: getattr(jax.config, name) for name in settings}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield {name.upper(): str(value) for name, value in settings.items()}
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
