"""What efftrain asks of the XLA compiler: persistent caches and per-program compile options.

efftrain never edits `XLA_FLAGS`: every setting it needs is passed to the one program that needs it, as
`jax.jit(..., compiler_options=...)` (XLA DebugOptions fields, checked by XLA at compile time), so a
deterministic training step and a fast-compiling PTQ program can live in one process, and a user's own
`XLA_FLAGS` keep working for everything else.

Caches (all under $XDG_CACHE_HOME/efftrain, i.e. ~/.cache/efftrain):

  jax/        JAX's persistent compilation cache (`enable_compilation_cache`, turned on by `train` and
              the PTQ sweep): a program compiled once on a machine is loaded, not compiled, by later
              processes. $EFFTRAIN_COMPILATION_CACHE
              moves it; `off` (or 0) opts out; a cache directory already set in JAX is left alone.
  autotune/   XLA's per-fusion autotuning results on GPUs (`autotune_cache_dir`): which GEMM/fusion
              kernel XLA picked for each fusion, kept across processes. XLA's own determinism notes
              (openxla docs/determinism.md) say compilation is deterministic only with persisted
              autotuning - without it, timing noise picks different kernels, with different rounding,
              in different processes. $EFFTRAIN_AUTOTUNE_CACHE moves it; `off` opts out.

Programs:

  `step_options(deterministic)`  the training step (efftrain.train.step): the autotune cache. The step
      needs no XLA option for determinism: train.deterministic changes the step's formulation instead
      (docs/REPRODUCIBILITY.md). XLA's own switch, `xla_gpu_exclude_nondeterministic_ops`, makes cuDNN's
      attention backward deterministic for one attention layer, but compiling a step with two or more
      crashes inside XLA 0.11.2 (IndexError: raw_hash_map::at; docs/BENCHMARKS.md has the bisection).
  `ptq_options()`  the PTQ programs (GPTQ/AWQ/RTN kernels and Hessians, efftrain.quant): float32
      HIGHEST-precision matrix algebra, for which cuBLAS is the right kernel anyway; Triton GEMM
      fusions are switched off for them (`xla_gpu_enable_triton_gemm=false`) because autotuning
      their tile configurations cost 10-20 s per new shape: the first GPTQ row of dense-25m compiled
      for 72 s with them and 6 s without (H200, docs/BENCHMARKS.md).

On other backends (CPU, TPU) the options are empty: XLA:CPU runs the same program the same way every
time, so a CPU run is bitwise reproducible without help (tests/test_train.py asserts it).

Target platform. Every choice made for GPUs (cuDNN or Pallas attention, the Triton and Mosaic FP8 kernels,
the scatter-free embedding gradient, the GPU compile options) asks `on_gpu()` while tracing, which
reads `target_platform()`: the platform set by `for_platform` (the train step's `platform` argument),
else JAX's default backend. So a program lowered on one host for another (`jax.export(...,
platforms=["tpu"])` on a CPU, tests/test_tpu_lowering.py) makes the choices of the platform it is for;
on a TPU, and on CPUs, every one of them is the XLA implementation.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from pathlib import Path

import jax

COMPILATION_CACHE_ENV = "EFFTRAIN_COMPILATION_CACHE"
AUTOTUNE_CACHE_ENV = "EFFTRAIN_AUTOTUNE_CACHE"
COMPILATION_CACHE_BYTES = 4 << 30
_OFF = ("", "0", "off", "false", "no")


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "efftrain"


def _cache_dir(env: str, default: str) -> Path | None:
    """The directory named by `env`, or cache_root()/default; None when `env` says off."""
    value = os.environ.get(env)
    if value is not None and value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser() if value else cache_root() / default


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache for this process; returns the directory in use, or
    None when opted out. JAX persists only programs that took at least
    `jax_persistent_cache_min_compile_time_secs` to compile (default 1 s); most PTQ programs (one per
    layer shape and method, the paired evaluation) compile in 0.1-1 s each but are many, and a new
    process would compile them all again: the threshold is lowered to 0 unless it was set to something
    other than its default.

    The size is bounded here, once per process (`prune_cache`: oldest entries first, down to
    COMPILATION_CACHE_BYTES), not by JAX's own `jax_compilation_cache_max_size`: that one scans every
    entry of the directory on every write, so a process writing thousands of small programs into a
    cache of thousands spends minutes on it (the CPU demo ran 2x slower)."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = _cache_dir(COMPILATION_CACHE_ENV, "jax")
    if path is None:
        return None
    prune_cache(path, COMPILATION_CACHE_BYTES)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return str(path)


def prune_cache(path: Path, max_bytes: int) -> int:
    """Delete the least recently written files of the cache directory `path` until it holds at most
    `max_bytes`; returns how many were deleted (a missing directory: 0; files another process deletes
    meanwhile are skipped)."""
    entries = []
    for f in Path(path).glob("*") if Path(path).is_dir() else ():
        try:
            st = f.stat()
        except OSError:
            continue
        if f.is_file():
            entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    removed = 0
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        try:
            f.unlink()
        except OSError:
            continue
        total -= size
        removed += 1
    return removed


# jax.export's platform names -> jax.default_backend()'s
_PLATFORM_NAMES = {"cuda": "gpu", "rocm": "gpu"}
_target_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("efftrain_target_platform",
                                                                              default=None)


def platform_name(platform: str) -> str:
    """'cpu' | 'gpu' | 'tpu' for a backend or jax.export platform name ('cuda' and 'rocm' are 'gpu')."""
    name = platform.lower()
    return _PLATFORM_NAMES.get(name, name)


def target_platform() -> str:
    """The platform the program being traced is for: the innermost `for_platform`'s, else JAX's default
    backend."""
    return _target_platform.get() or platform_name(jax.default_backend())


@contextlib.contextmanager
def for_platform(platform: str | None):
    """Within: `target_platform()` is `platform` (a backend or jax.export name); None changes nothing.
    A context variable, read at trace time, so it holds in the tracing thread only."""
    if platform is None:
        yield
        return
    token = _target_platform.set(platform_name(platform))
    try:
        yield
    finally:
        _target_platform.reset(token)


def on_gpu() -> bool:
    """Whether the program being traced is for a GPU (`target_platform`)."""
    return target_platform() == "gpu"


def autotune_cache_dir() -> str | None:
    """The per-fusion autotune cache directory for GPU programs (created), or None (off / not a GPU)."""
    path = _cache_dir(AUTOTUNE_CACHE_ENV, "autotune") if on_gpu() else None
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _with_autotune_cache(options: dict) -> dict:
    path = autotune_cache_dir()
    return {**options, "xla_gpu_per_fusion_autotune_cache_dir": path} if path else options


def step_options(deterministic: bool) -> dict:
    """compiler_options of the training step (for `target_platform()`)."""
    if not on_gpu():
        return {}
    return _with_autotune_cache({})


def ptq_options() -> dict:
    """compiler_options of the PTQ programs (float32 matrix algebra; for `target_platform()`)."""
    if not on_gpu():
        return {}
    return _with_autotune_cache({"xla_gpu_enable_triton_gemm": False})


def describe(options: dict) -> str:
    """`key=value ...` of compile options, for run.json and error messages."""
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()) or "none"


def eval_options() -> dict:
    """compiler_options of the eval programs (held-out loss, paired PTQ scoring; for
    `target_platform()`): on a GPU, the per-fusion autotune cache, as the training step, so that every
    process on a machine reuses the first one's kernel choices and scores the same model to the same
    bits (each process autotuning its own GEMMs picks differently-rounding kernels)."""
    return step_options(deterministic=True)


def _deferred_jit(options_of, fn, jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled with `options_of()`, decided at the first call (so that
    importing a module does not initialise a JAX backend); a call inside another jitted function is
    inlined into it (which carries its own options), as with jax.jit."""
    jitted = None
    plain = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal jitted
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return plain(*args, **kwargs)
        if jitted is None:
            options = options_of()
            jitted = jax.jit(fn, compiler_options=options, **jit_kwargs) if options else plain
        return jitted(*args, **kwargs)

    def cache_size() -> int:  # compiled programs, as jax.jit's _cache_size (tests count them)
        return plain._cache_size() + (jitted._cache_size() if jitted not in (None, plain) else 0)

    def clear_cache() -> None:
        plain.clear_cache()
        if jitted is not None and jitted is not plain:
            jitted.clear_cache()

    call._cache_size, call.clear_cache = cache_size, clear_cache
    return call


def ptq_jit(fn=None, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled with `ptq_options()`, decided at the first call. Usable as
    `@ptq_jit` or `@ptq_jit(static_argnames=...)`."""
    if fn is None:
        return functools.partial(ptq_jit, **jit_kwargs)
    return _deferred_jit(ptq_options, fn, jit_kwargs)


def eval_jit(fn=None, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled with `eval_options()`, decided at the first call."""
    if fn is None:
        return functools.partial(eval_jit, **jit_kwargs)
    return _deferred_jit(eval_options, fn, jit_kwargs)


def guard_first_compile(fn, options: dict, setting: str):
    """`fn` whose first call - where jax compiles it - turns a compiler failure under `options` into a
    ValueError naming `setting` (XLA reports rejected or crashing options with assorted exception
    types and multi-line messages). Out-of-memory and later calls pass through unchanged."""
    if not options:
        return fn
    compiled = False

    def call(*args, **kwargs):
        nonlocal compiled
        if compiled:
            return fn(*args, **kwargs)
        try:
            out = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - see the docstring
            text = str(e).strip().splitlines()[0] if str(e).strip() else ""
            if "RESOURCE_EXHAUSTED" in str(e):
                raise
            raise ValueError(f"{setting}: XLA could not compile the program with {describe(options)} "
                             f"({type(e).__name__}: {text[:300]})") from None
        compiled = True
        return out

    return call
