"""`train(cfg, run_dir)`: corpus -> token cache -> grain windows -> jitted steps -> checkpoint series.

Re-running on an existing run directory resumes from its newest finalized checkpoint (series or
resume) and continues bitwise identically on CPU: the model, optimizer and MoE-bias state, the grain
iterator state and the step counter all come from the checkpoint. A run directory whose stored config
differs in anything but logging/eval/checkpoint-frequency fields is refused with the diff.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from efftrain.config import Config, ConfigError, from_dict, resume_blocking_diff
from efftrain.model.attention import kv_cache_bytes_per_token
from efftrain.model.transformer import build_model, flops_per_token, parameter_counts
from efftrain.train.checkpoint import CheckpointStore, abstract_like, write_json_atomic
from efftrain.train.optimizer import lr_schedule, make_optimizer
from efftrain.train.series import series_points
from efftrain.train.step import init_state, make_eval_step, make_train_step


class RunDirError(ValueError):
    """The run directory cannot be used for this config."""


# bf16 dense peak FLOP/s per device, for the MFU estimate (None: unknown, MFU not shown)
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "h800": 989e12, "a100": 312e12, "l4": 121e12,
              "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12, "tpu v5p": 459e12, "tpu v6": 918e12}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "").lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


def total_steps_of(cfg: Config) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, -(-cfg.train.max_tokens // cfg.tokens_per_step))


def load_run_config(run_dir: Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no config.yaml)")
    import yaml

    from efftrain.config import yaml_load

    try:
        return from_dict(yaml_load(path.read_text()))
    except (ConfigError, yaml.YAMLError) as e:
        raise RunDirError(f"{path}: stored config no longer parses: {e}") from None


def check_run_dir(run_dir: Path, cfg: Config) -> bool:
    """True if run_dir already holds this run (resume); raises on an incompatible config."""
    if not (run_dir / "config.yaml").exists():
        if run_dir.exists() and any(p.name != "tb" for p in run_dir.iterdir()):
            raise RunDirError(f"{run_dir} exists and is not an efftrain run directory; choose another --out")
        return False
    old = load_run_config(run_dir)
    diff = resume_blocking_diff(old, cfg)
    if diff:
        lines = "\n".join(f"  {k}: {a!r} (run) -> {b!r} (now)" for k, a, b in diff)
        raise RunDirError(f"{run_dir} holds a run with a different config; refusing to resume:\n{lines}\n"
                          "Use another --out for a new run.")
    return True


def environment_info() -> dict[str, Any]:
    import flax
    import optax
    import orbax.checkpoint

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax": getattr(orbax.checkpoint, "__version__", "?"),
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "argv": sys.argv,
    }


def format_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{2 if n < 10 * size else 1}f}{unit}"
    return f"{n:.0f}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def flatten_metrics(metrics: dict) -> dict[str, float]:
    """Device metrics -> flat JSON-able floats (per-layer MoE stats summarised and per layer)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "moe":
            for name, per_layer in value.items():
                arr = np.asarray(per_layer, dtype=np.float64)
                if name == "load":
                    continue
                out[f"moe/{name}"] = float(arr.mean())
                for i, v in enumerate(arr.reshape(arr.shape[0], -1)[:, 0]):
                    out[f"moe/{name}/l{i}"] = float(v)
        elif key == "mtp_ce":
            for k, v in enumerate(np.asarray(value).reshape(-1)):
                out[f"mtp_ce/{k + 1}"] = float(v)
        else:
            out[key] = float(np.asarray(value))
    return out


class MetricsLog:
    """metrics.jsonl (+ TensorBoard events when tensorboardX is installed and enabled)."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists():  # drop records newer than the checkpoint we resume from
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                print("note: tensorboardX not installed; TensorBoard events disabled", file=sys.stderr)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "event"):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens_seen: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss of that step (logged steps)
    val_losses: dict[int, float] = field(default_factory=dict)
    series: list[dict] = field(default_factory=list)
    final_state: Any = None  # the train state after the last step (params, other variables, optimizer)
    graphdef: Any = None


def make_mesh(cfg: Config) -> Mesh:
    devices = jax.devices()
    n = len(devices) if cfg.train.data_parallel == -1 else cfg.train.data_parallel
    if n > len(devices):
        raise ConfigError(f"train.data_parallel ({n}) exceeds the {len(devices)} available devices")
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % n:
        raise ConfigError(f"micro-batch (train.batch_size / train.grad_accum = {micro}) must be divisible by "
                          f"the {n} data-parallel devices")
    return Mesh(np.array(devices[:n]), ("data",))


def train(cfg: Config, run_dir: str | Path, *, stop_at_step: int | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train (or resume) the run in run_dir. `stop_at_step` ends early as if interrupted after that
    step's resume checkpoint (used by tests and for chunked jobs)."""
    from efftrain.data import make_train_iterator, prepare_data, val_batches

    run_dir = Path(run_dir)
    resuming = check_run_dir(run_dir, cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())

    # ---- data --------------------------------------------------------------------------------
    cache = prepare_data(cfg, progress=lambda msg: log(f"data: {msg}"))
    shutil.copyfile(cache.tokenizer_path, run_dir / "tokenizer.json")
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    val_set = [jnp.asarray(b) for b in val_batches(cache.val, seq_len=seq_len, batch_size=batch,
                                                     n_batches=cfg.train.eval_batches)]
    data_iter = make_train_iterator(cache.train, seq_len=seq_len, batch_size=batch, seed=cfg.data.shuffle_seed)

    # ---- model, optimizer, state -------------------------------------------------------------
    total_steps = total_steps_of(cfg)
    model = build_model(cfg.model, cfg.fp8, seed=cfg.train.seed)
    counts = parameter_counts(model)
    flops_tok = flops_per_token(model, seq_len)
    tx = make_optimizer(cfg.optim, total_steps)
    graphdef, state = init_state(model, tx)
    del model
    mesh = make_mesh(cfg)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data", None))
    state = jax.device_put(state, replicated)
    train_step = make_train_step(graphdef, cfg, tx)
    eval_step = make_eval_step(graphdef, cfg)
    schedule = lr_schedule(cfg.optim, total_steps)

    store = CheckpointStore(run_dir, async_save=cfg.checkpoint.async_save)
    start_step = 0
    latest = store.latest() if resuming else None
    if latest is not None:
        kind, step = latest
        state, data_state, meta = store.restore(kind, step, abstract_like(state))
        state = jax.device_put(state, replicated)
        data_iter.set_state(data_state)
        start_step = step
        log(f"resuming {run_dir} from the {kind} checkpoint at step {step} ({format_count(meta['tokens_seen'])} tokens)")

    elif cfg.train.init_from is not None:
        state, data_state, start_step = restore_branch_point(cfg, state)
        state = jax.device_put(state, replicated)
        data_iter.set_state(data_state)
        log(f"branching from {cfg.train.init_from} at step {start_step}")

    points, dropped = series_points(cfg.checkpoint, cfg.tokens_per_step, total_steps)
    if dropped:
        log(f"note: series targets beyond the end of training ({total_steps * cfg.tokens_per_step} tokens) "
            f"are skipped: {dropped}")
    series_at = {p.step: p for p in points}
    done_series = set(store.steps("series"))

    run_info = {
        "name": cfg.name, "config_hash": cfg.hash(), "environment": environment_info(),
        "corpus": cache.identity, "tokenizer": str(run_dir / "tokenizer.json"),
        "params": counts, "flops_per_token": flops_tok, "tokens_per_step": cfg.tokens_per_step,
        "total_steps": total_steps, "series_steps": [p.step for p in points],
        "train_tokens_available": int(len(cache.train)), "val_tokens": int(len(cache.val)),
        "kv_cache_bytes_per_token_per_layer_bf16": kv_cache_bytes_per_token(cfg.model),
    }
    write_json_atomic(run_dir / "run.json", run_info)
    if start_step == 0:
        log(f"efftrain {cfg.name}: {format_count(counts['total'])} params "
            f"({format_count(counts['non_embedding'])} non-embedding, {format_count(counts['active'])} active), "
            f"{total_steps} steps x {cfg.tokens_per_step} tokens, {len(points)} series checkpoints, "
            f"devices {len(mesh.devices.flat)}x {jax.devices()[0].device_kind}")
        log(f"versions: jax {jax.__version__}, python {platform.python_version()}; config hash {cfg.hash()}")

    metrics_log = MetricsLog(run_dir, cfg.logging.tensorboard, start_step)
    peak = peak_flops(jax.devices()[0])
    n_dev = len(mesh.devices.flat)
    accum = cfg.train.grad_accum
    result = TrainResult(run_dir=run_dir, steps=start_step, tokens_seen=start_step * cfg.tokens_per_step)

    def evaluate(st) -> float:
        losses = [eval_step(st["params"], st["rest"], b) for b in val_set]
        return float(np.mean(jax.device_get(losses)))

    def checkpoint(kind: str, step: int, st, val_loss: float | None, target: int | None = None):
        meta = {"tokens_seen": step * cfg.tokens_per_step, "target_tokens": target, "val_loss": val_loss,
                "wall_time_s": time.time() - t_start, "config_hash": cfg.hash(), "time": time.time()}
        store.save(kind, step, st, data_iter.get_state(), meta)

    t_start = time.time()
    t_window, steps_in_window, data_time = time.time(), 0, 0.0
    step = start_step
    try:
        while step < total_steps:
            t0 = time.time()
            window = np.asarray(next(data_iter)).reshape(accum, batch // accum, seq_len + 1)
            data_time += time.time() - t0
            tokens_seen = jnp.asarray(step * cfg.tokens_per_step, jnp.float32)
            state, metrics = train_step(state, jax.device_put(window, batch_sharding), tokens_seen)
            step += 1
            steps_in_window += 1
            val_loss = None
            is_series = step in series_at and step not in done_series
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or is_series or step == total_steps:
                val_loss = evaluate(state)
                result.val_losses[step] = val_loss
            if step % cfg.train.log_every == 0 or step == total_steps or val_loss is not None:
                flat = flatten_metrics(jax.device_get(metrics))
                elapsed = time.time() - t_window
                tok_s = steps_in_window * cfg.tokens_per_step / max(elapsed, 1e-9)
                record = {"step": step, "tokens": step * cfg.tokens_per_step, "lr": float(schedule(step - 1)),
                          **flat, "tokens_per_s": tok_s, "data_time_s": data_time, "step_time_s": elapsed}
                if peak:
                    record["mfu"] = tok_s * flops_tok / (peak * n_dev)
                if val_loss is not None:
                    record["val_loss"] = val_loss
                metrics_log.write(record)
                result.losses[step] = flat["loss"]
                if cfg.logging.progress:
                    log(progress_line(step, total_steps, record, t_start, start_step))
                t_window, steps_in_window, data_time = time.time(), 0, 0.0
            if is_series:
                checkpoint("series", step, state, val_loss, series_at[step].target_tokens)
                done_series.add(step)
            elif step % cfg.checkpoint.resume_every == 0 or step == stop_at_step:
                checkpoint("resume", step, state, val_loss)
            if stop_at_step is not None and step >= stop_at_step:
                break
        store.wait()
    finally:
        metrics_log.close()
        store.close()

    result.steps, result.tokens_seen = step, step * cfg.tokens_per_step
    result.final_state = state
    result.graphdef = graphdef
    result.series = CheckpointStore(run_dir, read_only=True).series()
    if step >= total_steps:
        log(f"done: {step} steps, {format_count(result.tokens_seen)} tokens, {len(result.series)} series "
            f"checkpoints in {run_dir}/checkpoints/series ({format_duration(time.time() - t_start)})")
    return result


def restore_branch_point(cfg: Config, state):
    """(state, data-iterator state, step) from the series checkpoint a branch run starts at.

    A branch must share the source run's architecture, data and batch size; its optimizer schedule
    may differ from there on (e.g. a WSD cooldown starting at the branch step)."""
    src = Path(cfg.train.init_from)
    src_cfg = load_run_config(src)
    same = ("model", "data", "fp8")
    diff = [d for d in resume_blocking_diff(src_cfg, cfg) if d[0].split(".")[0] in same
            or d[0] in ("train.batch_size", "train.seed")]
    if diff:
        lines = "\n".join(f"  {k}: {a!r} (source) -> {b!r} (branch)" for k, a, b in diff)
        raise RunDirError(f"train.init_from={src} has a different model/data config:\n{lines}")
    step = cfg.train.init_from_step
    store = CheckpointStore(src, read_only=True)
    if step not in store.steps("series"):
        raise RunDirError(f"train.init_from={src} has no series checkpoint at step {step} "
                          f"(available: {store.steps('series')})")
    restored, data_state, _ = store.restore("series", step, abstract_like(state))
    store.close()
    return restored, data_state, step


def progress_line(step: int, total: int, rec: dict, t_start: float, start_step: int) -> str:
    done = step - start_step
    eta = (time.time() - t_start) / max(done, 1) * (total - step)
    parts = [f"step {step:0{len(str(total))}d}/{total} ({100 * step / total:.1f}%)",
             f"tokens {format_count(rec['tokens'])}", f"loss {rec['loss']:.4f}"]
    if "val_loss" in rec:
        parts.append(f"val {rec['val_loss']:.4f}")
    parts += [f"lr {rec['lr']:.2e}", f"{format_count(rec['tokens_per_s'])} tok/s"]
    if "mfu" in rec:
        parts.append(f"mfu {100 * rec['mfu']:.0f}%")
    if "moe/max_vio" in rec:
        parts.append(f"maxvio {rec['moe/max_vio']:.2f}")
    parts.append(f"eta {format_duration(eta)}")
    return " | ".join(parts)
