"""A run directory: what `efftrain train` writes and every later command reads; the one module that
knows its layout.

  RUN_DIR/config.yaml      the run's resolved config (CONFIG)
  RUN_DIR/run.json         parameter counts, FLOPs, corpus identity, environment, train tokens (RUN_INFO)
  RUN_DIR/tokenizer.json   the tokenizer it was trained with (TOKENIZER)
  RUN_DIR/metrics.jsonl    one JSON record per logged step (METRICS); TensorBoard events in tb/ (TENSORBOARD)
  RUN_DIR/checkpoints/     series and resume checkpoints (efftrain.train.checkpoint.CheckpointStore)
  RUN_DIR/ptq.csv          the PTQ sweep's QiD rows (PTQ_TABLE; efftrain.quant.sweep)
  RUN_DIR/quantized/NAME/  packed quantized checkpoints of `efftrain ptq --save` (QUANTIZED)
  RUN_DIR/.lock            held by the process that trains in it (LOCK)

Reading a run: `load_run_config`, `read_run_info`, `read_metrics`; its finalized checkpoints
(`finalized`, `series_steps`, both through CheckpointStore, which lists only committed ones); the
abstract train state of its config (`abstract_train_state`: shapes only, nothing allocated) and the
model at one checkpoint (`load_model`); the val loss that training records in every checkpoint
(`make_val_loss`: the mean over the training-time val batches of each batch's mean token
cross-entropy), with which the grid scores its averaged checkpoints too. Writing one: `write_config`,
`write_tokenizer`, `write_run_info`, `adopt_run_files`, `write_run_file`, each atomic
(efftrain.files) with a one-line CheckpointError when the disk is full.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh

from efftrain.config import Config, ConfigError, from_dict, yaml_load
from efftrain.data import val_batches
from efftrain.files import TMP_SUFFIX, write_atomic
from efftrain.model.mtp import acceptance_rate
from efftrain.model.transformer import Transformer, build_model
from efftrain.train.checkpoint import CheckpointStore, checkpoints_dir, write_failure
from efftrain.train.optimizer import make_optimizer
from efftrain.train.sharding import on_mesh
from efftrain.train.step import init_state, make_eval_step

CONFIG = "config.yaml"
RUN_INFO = "run.json"
TOKENIZER = "tokenizer.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
PTQ_TABLE = "ptq.csv"
QUANTIZED = "quantized"
LOCK = ".lock"


class RunDirError(ValueError):
    """The run directory cannot be used for this config."""


# ---- reading -------------------------------------------------------------------------------------
def load_run_config(run_dir: str | Path) -> Config:
    """The config the run was trained with; RunDirError if it has none or it no longer parses."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no {CONFIG})")
    try:
        return from_dict(yaml_load(path.read_text()))
    except (ConfigError, yaml.YAMLError) as e:
        raise RunDirError(f"{path}: stored config no longer parses: {e}") from None


def read_run_info(run_dir: str | Path, *, missing_ok: bool = True) -> dict[str, Any]:
    """run.json: {} when the run has none and `missing_ok`, else FileNotFoundError; ValueError if it
    is not JSON."""
    path = Path(run_dir) / RUN_INFO
    if missing_ok and not path.exists():
        return {}
    return json.loads(path.read_text())


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl ([] without one); a line cut short by a kill is skipped."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def check_foreign_dir(run_dir: Path) -> None:
    """Refuse an existing directory that is not (the start of) an efftrain run directory."""
    if run_dir.exists() and not (run_dir / CONFIG).exists() and any(
            p.name not in (TENSORBOARD, LOCK) and not p.name.endswith(TMP_SUFFIX) for p in run_dir.iterdir()):
        raise RunDirError(f"{run_dir} exists and is not an efftrain run directory; choose another --out")


def finalized(run_dir: str | Path, kind: str = "series") -> list[dict[str, Any]]:
    """The metadata of the run's finalized `kind` checkpoints, oldest first (CheckpointError if the run
    has no checkpoints directory)."""
    store = CheckpointStore(run_dir, read_only=True)
    try:
        return [store.meta(kind, s) for s in store.steps(kind)]
    finally:
        store.close()


def series_steps(run_dir: str | Path) -> list[int]:
    """Steps of the run's finalized series checkpoints; [] before it has any (or any checkpoint at all)."""
    if not checkpoints_dir(run_dir).is_dir():
        return []
    store = CheckpointStore(run_dir, read_only=True)
    try:
        return store.steps("series")
    finally:
        store.close()


# ---- the train state and the model of a run -------------------------------------------------------
def total_steps_of(cfg: Config) -> int:
    """Steps the run trains for: train.max_steps, or train.max_tokens rounded up to whole steps."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, -(-cfg.train.max_tokens // cfg.tokens_per_step))


def abstract_train_state(cfg: Config):
    """(graphdef, abstract state) of the run's train state without allocating it."""
    tx = make_optimizer(cfg.optim, total_steps_of(cfg))

    def build():
        return init_state(build_model(cfg.model, cfg.fp8, seed=cfg.train.seed), tx)[1]

    abstract = jax.eval_shape(build)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg.model, cfg.fp8, seed=cfg.train.seed)))
    return graphdef, abstract


def load_model(run_dir: str | Path, step: int, kind: str = "series",
               mesh: Mesh | None = None) -> tuple[Config, Transformer, dict]:
    """(config, model, meta) of one finalized checkpoint (params and other variables restored): on one
    device, or with `mesh` sharded over it as training lays the state out (efftrain.train.sharding.on_mesh)."""
    cfg = load_run_config(run_dir)
    graphdef, abstract = abstract_train_state(cfg)
    abstract = on_mesh(abstract, mesh)
    store = CheckpointStore(run_dir, read_only=True)
    try:
        state, _, meta = store.restore(kind, step, abstract)
    finally:
        store.close()
    return cfg, nnx.merge(graphdef, state["params"], state["rest"]), meta


def make_val_loss(graphdef, cfg: Config, val_tokens: np.ndarray) -> Callable[[Any, Any], float]:
    """val_loss(params, rest): the run's val loss, as training records it in every checkpoint's meta:
    the mean over train.eval_batches batches of batch_size seeded val windows (efftrain.data.val_batches,
    eval seed 0) of each batch's mean token cross-entropy of the main model. The batches go to the
    device once; the step compiles once."""
    step = make_eval_step(graphdef, cfg)
    batches = [jnp.asarray(b) for b in val_batches(val_tokens, seq_len=cfg.data.seq_len,
                                                   batch_size=cfg.train.batch_size, n_batches=cfg.train.eval_batches)]

    def val_loss(params, rest) -> float:
        return float(np.mean(jax.device_get([step(params, rest, b) for b in batches])))

    return val_loss


def make_mtp_acceptance(graphdef, cfg: Config, val_tokens: np.ndarray) -> Callable[[Any, Any], float] | None:
    """acceptance(params, rest) on the same val batches as `make_val_loss`: the mean over batches of
    efftrain.model.mtp.acceptance_rate (how often MTP module 1's draft of token i+2 equals the main
    model's next-token guess, i.e. a speculative-decoding acceptance rate); None without MTP modules.
    Recorded in every series checkpoint's meta, so the grid can follow it along the series."""
    if not cfg.model.mtp.depth:
        return None
    step = jax.jit(lambda params, rest, window: acceptance_rate(nnx.merge(graphdef, params, rest), window[:, :-1]))
    batches = [jnp.asarray(b) for b in val_batches(val_tokens, seq_len=cfg.data.seq_len,
                                                   batch_size=cfg.train.batch_size, n_batches=cfg.train.eval_batches)]

    def acceptance(params, rest) -> float:
        return float(np.mean(jax.device_get([step(params, rest, b) for b in batches])))

    return acceptance


# ---- writing -------------------------------------------------------------------------------------
def write_run_file(path: Path, data: str | bytes) -> None:
    """One of the run's small files, atomically; a one-line CheckpointError if it cannot be written."""
    try:
        write_atomic(path, data)
    except OSError as e:
        raise write_failure(str(path), e, "its previous content is intact") from None


def write_config(run_dir: Path, cfg: Config) -> None:
    write_run_file(Path(run_dir) / CONFIG, cfg.to_yaml())


def write_tokenizer(run_dir: Path, source: str | Path) -> None:
    write_run_file(Path(run_dir) / TOKENIZER, Path(source).read_bytes())


def write_run_info(run_dir: Path, info: dict[str, Any]) -> None:
    write_run_file(Path(run_dir) / RUN_INFO, json.dumps(info, indent=2, sort_keys=True) + "\n")


def adopt_run_files(parent: Path, run_dir: Path) -> None:
    """Give run_dir the tokenizer.json and run.json of `parent` where it has none of its own (a grid's
    averaged checkpoint is a run of its parent's model, data and sizes)."""
    for name in (TOKENIZER, RUN_INFO):
        if not (Path(run_dir) / name).exists():
            write_run_file(Path(run_dir) / name, (Path(parent) / name).read_bytes())
