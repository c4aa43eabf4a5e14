"""Checkpoints of a run: the series (kept forever) and the rolling resume checkpoint (latest only).

Layout:  RUN_DIR/checkpoints/series/<step>/{state,data,meta,checksums}
         RUN_DIR/checkpoints/resume/<step>/{state,data,meta,checksums}
`state` is the train state pytree (params, other model variables such as MoE router biases, optimizer
state), `data` the grain iterator state (JSON), `meta` a JSON record: step, tokens_seen, target_tokens,
val_loss, wall_time_s, config_hash, kind; `checksums` the SHA-256 of every array's bytes (with its
dtype and shape) and of the data and meta records, computed from the host copy at save time.

Orbax writes each checkpoint into a temporary directory and renames it only when every item is
committed, so a crash or a full disk mid-save leaves nothing that `steps()` lists; saves are async
and overlap training, and a save first waits for the ones in flight (so that no checkpoint is written
after one that failed, and a re-run never skips a series point). A save is refused (NonFiniteError) if the state holds a NaN or an infinity, so
no finalized checkpoint is ever non-finite. A restore verifies the checksums (checkpoints written
before they existed are restored unverified) and refuses non-finite values, so eval, ptq and resume
all get a clear CheckpointError instead of wrong numbers. An old resume checkpoint is first renamed
into `<kind>/.trash/` (one atomic rename: never a listed half-deleted directory) and deleted from
there before the next save of that kind, or when the store is next opened for writing. A checkpoint
copied from another run (`copy_from`: a grid's cooldown branch starts from its parent's series
checkpoint) is copied into `checkpoints/.incoming/` and renamed into its kind's directory only when
whole, so it too is listed complete or not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from efftrain.files import is_disk_full
from efftrain.train.distributed import host_values

CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints: the store's directory
TRASH = ".trash"  # <kind>/.trash/<step>: checkpoints being deleted (never listed: not a step name)
QUARANTINE = "corrupt"  # checkpoints/corrupt/<kind>-<step>-<time>: set aside by a fallback resume
INCOMING = ".incoming"  # checkpoints/.incoming/<kind>-<step>: a copy from another run until it is whole


def checkpoints_dir(run_dir: str | Path) -> Path:
    """RUN_DIR/checkpoints (exists once the run has been trained, or a checkpoint copied into it)."""
    return Path(run_dir) / CHECKPOINTS


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


class NonFiniteError(CheckpointError):
    """NaN or infinite values: a training step diverged, or a checkpoint holds (or would hold) them."""


def _manager(path: Path, *, keep: int | None, async_save: bool, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only, todelete_subdir=None if read_only else TRASH)
    return ocp.CheckpointManager(path.resolve(), options=options)


def abstract_like(tree):
    """ShapeDtypeStructs of a state, with its arrays' shardings: a restore onto them lays the checkpoint
    out like `tree`, whatever mesh it was saved from."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _placed(abstract_state):
    """`abstract_state` with every leaf that has no sharding (e.g. from jax.eval_shape) put on the default
    device: a checkpoint saved on a mesh of N devices then restores onto one, also where those N devices
    do not exist (its recorded sharding is never used)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def place(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and getattr(leaf, "sharding", None) is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
        return leaf

    return jax.tree.map(place, abstract_state)


class _QuietOrbaxErrors(logging.Filter):
    """Drops the noise of a failed async save: orbax's ERROR records (a traceback per background thread)
    and asyncio's "exception was never retrieved" for its write tasks. Every such failure also reaches
    CheckpointStore, which reports it once. EFFTRAIN_DEBUG=1 keeps them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if os.environ.get("EFFTRAIN_DEBUG") or record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            message = record.getMessage()
            return not ("never retrieved" in message and ("orbax" in message or "OCDBT" in message))
        return "orbax" not in record.pathname


def _quiet_orbax_failures() -> None:
    """Install the filters above (once), and an unraisable-exception hook that drops the "Event loop is
    closed" errors of tensorstore writes still completing after orbax gave up on a failed save."""
    if getattr(_quiet_orbax_failures, "done", False):
        return
    _quiet_orbax_failures.done = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_QuietOrbaxErrors())
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if (not os.environ.get("EFFTRAIN_DEBUG") and isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def _tree_signature(path: Path) -> tuple:
    """(files, bytes, newest mtime) of everything under `path`, as far as it can be listed."""
    files = size = newest = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:
                continue
            files, size, newest = files + 1, size + st.st_size, max(newest, st.st_mtime_ns)
    return files, size, newest


def _settle(path: Path, *, quiet_s: float = 0.3, limit_s: float = 30.0) -> None:
    """Wait until nothing under `path` has changed for `quiet_s` (at most `limit_s`). A failed async save
    is reported as soon as one of its items fails, while tensorstore still completes the writes of the
    others in its own threads; a re-run that reused the directory meanwhile would race them."""
    deadline, before = time.monotonic() + limit_s, _tree_signature(path)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = _tree_signature(path)
        if now == before:
            return
        before = now


def _empty(directory: Path) -> None:
    """Delete what `directory` holds, as far as possible: a later open retries, and nothing in the trash
    or in .incoming is ever listed."""
    for p in directory.iterdir() if directory.is_dir() else ():
        try:
            shutil.rmtree(p)
        except OSError:
            pass


class CheckpointStore:
    KINDS = ("series", "resume")

    def __init__(self, run_dir: str | Path, *, async_save: bool = True, read_only: bool = False):
        self.root = checkpoints_dir(run_dir)
        if read_only and not self.root.is_dir():
            raise CheckpointError(f"{run_dir}: no checkpoints directory (was this run trained?)")
        _quiet_orbax_failures()
        self.read_only = read_only
        self.pending: dict[str, int] = {}  # kind -> step of the save in flight
        self.managers = {
            "series": _manager(self.root / "series", keep=None, async_save=async_save, read_only=read_only),
            "resume": _manager(self.root / "resume", keep=1, async_save=async_save, read_only=read_only),
        }
        if not read_only:
            for kind in self.KINDS:
                self._empty_trash(kind)
            _empty(self.root / INCOMING)  # copies cut short by a kill

    def directory(self, kind: str) -> Path:
        return self.root / kind

    def path(self, kind: str, step: int) -> Path:
        return self.directory(kind) / str(step)

    # writing -------------------------------------------------------------------------------------
    def save(self, kind: str, step: int, state, data_state: dict, meta: dict[str, Any]) -> None:
        """Start writing a checkpoint (async unless the store was opened with async_save=False).
        Raises NonFiniteError (nothing written) if the state holds a NaN or an infinity."""
        host = host_values(state)  # gathered where the state spans processes
        bad = nonfinite_leaves(host)
        if bad:
            raise NonFiniteError(f"refusing to write the {kind} checkpoint at step {step}: non-finite values in "
                                 f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
        meta = {**meta, "kind": kind, "step": step}
        # Every save in flight must have committed first: a failed series save is then reported before any
        # later checkpoint exists, so a re-run resumes from before it and writes it again.
        self.wait()
        self._empty_trash(kind)
        self._discard_leftovers(kind, step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta),
            checksums=ocp.args.JsonSave(checksums(host, data_state, meta)),
        )
        try:
            self.managers[kind].save(step, args=args, force=True)
        except Exception as e:  # OSError; tensorstore raises ValueError with the OS error in its text
            raise write_failure(f"the {kind} checkpoint at step {step} ({self.path(kind, step)})", e) from None
        self.pending[kind] = step

    def _wait(self, kind: str) -> None:
        try:
            self.managers[kind].wait_until_finished()
        except Exception as e:
            step = self.pending.get(kind)
            if step is not None:
                self._discard_leftovers(kind, step)  # a re-run, even in this process, starts it afresh
            where = f"the {kind} checkpoint" + (f" at step {step} ({self.path(kind, step)})" if step else "")
            raise write_failure(where, e) from None
        finally:
            self.pending.pop(kind, None)

    def wait(self) -> None:
        """Block until every save in flight is finalized (CheckpointError if one failed)."""
        for kind in self.KINDS:
            self._wait(kind)

    def close(self) -> None:
        for mgr in self.managers.values():
            mgr.close()
        if not self.read_only:
            for kind in self.KINDS:
                self._empty_trash(kind)

    def _empty_trash(self, kind: str) -> None:
        _empty(self.root / kind / TRASH)

    def _discard_leftovers(self, kind: str, step: int) -> None:
        """Move what a failed or killed save of (kind, step) left (orbax's `<step>.orbax-checkpoint-tmp*`,
        never listed) to the trash, once its last writes have settled: orbax would otherwise reuse it."""
        for leftover in self.directory(kind).glob(f"{step}.orbax-checkpoint-tmp*"):
            _settle(leftover)
            trash = self.root / kind / TRASH / f"{leftover.name}-{time.time_ns()}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            try:
                leftover.rename(trash)
            except OSError:
                pass  # gone already, or not movable: orbax reports it if it matters

    def quarantine(self, kind: str, step: int) -> Path:
        """Move a damaged checkpoint out of the listed ones (one rename) to checkpoints/corrupt/."""
        dst = self.root / QUARANTINE / f"{kind}-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        self.path(kind, step).rename(dst)
        self.managers[kind].reload()
        return dst

    def copy_from(self, source: "CheckpointStore", kind: str, step: int, *, as_kind: str) -> Path:
        """Copy `source`'s finalized `kind` checkpoint at `step` into this store as its `as_kind`
        checkpoint at that step, byte for byte (its meta and checksums unchanged); returns its path. The
        copy is written to checkpoints/.incoming/ and renamed into place once whole, so a kill leaves
        nothing listed. A step this store already has finalized is left as it is; CheckpointError if
        `source` has no finalized `kind` checkpoint at `step`."""
        if self.read_only:
            raise CheckpointError(f"{self.root}: opened read-only; cannot copy a checkpoint into it")
        final = self.path(as_kind, step)
        if step in self.steps(as_kind):
            return final
        available = source.steps(kind)
        if step not in available:
            raise CheckpointError(f"{source.directory(kind)}: no finalized checkpoint at step {step} to copy "
                                  f"(finalized: {available})")
        incoming = self.root / INCOMING / f"{as_kind}-{step}"
        shutil.rmtree(incoming, ignore_errors=True)
        incoming.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(source.path(kind, step), incoming)
        except OSError as e:
            shutil.rmtree(incoming, ignore_errors=True)
            raise write_failure(f"a copy of {source.path(kind, step)} ({incoming})", e,
                                "nothing of it was listed") from None
        final.parent.mkdir(parents=True, exist_ok=True)
        incoming.rename(final)
        self.managers[as_kind].reload()
        return final

    # reading -------------------------------------------------------------------------------------
    def steps(self, kind: str) -> list[int]:
        """Finalized checkpoints only (orbax lists nothing that did not commit)."""
        self.managers[kind].reload()
        return sorted(self.managers[kind].all_steps())

    def finalized(self) -> list[tuple[str, int]]:
        """Every finalized checkpoint, newest first, series before resume on ties."""
        return sorted(((k, s) for k in self.KINDS for s in self.steps(k)),
                      key=lambda ks: (-ks[1], self.KINDS.index(ks[0])))

    def latest(self) -> tuple[str, int] | None:
        """The newest finalized checkpoint of either kind, preferring series on ties."""
        done = self.finalized()
        return done[0] if done else None

    def meta(self, kind: str, step: int) -> dict[str, Any]:
        try:
            out = self.managers[kind].restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises assorted types for damaged files
            raise CheckpointError(f"{self.path(kind, step)}: metadata unreadable ({e})") from None
        return dict(out["meta"])

    def restore(self, kind: str, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """(state, data-iterator state, meta), verified against the checksums written with it. The state
        is laid out as `abstract_state`'s shardings say (any mesh; a leaf without one: the default
        device), not as it was when saved (docs/SCALING.md)."""
        where = self.path(kind, step)
        items = {"state": ocp.args.StandardRestore(_placed(abstract_state)), "data": ocp.args.JsonRestore(),
                 "meta": ocp.args.JsonRestore()}
        if (where / "checksums").is_dir():
            items["checksums"] = ocp.args.JsonRestore()
        try:
            out = self.managers[kind].restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(
                f"{where}: cannot restore ({type(e).__name__}: {' '.join(str(e).split())[:300]}); "
                "the checkpoint is damaged or was written by a different model config") from None
        state, data_state, meta = out["state"], dict(out["data"]), dict(out["meta"])
        host = host_values(state)  # gathered where the state spans processes
        if "checksums" in items:
            problem = checksum_mismatch(dict(out["checksums"]), host, data_state, meta)
            if problem:
                raise CheckpointError(f"{where} is corrupt: {problem} does not match the SHA-256 recorded when it "
                                      "was saved")
        bad = nonfinite_leaves(host)
        if bad:
            raise NonFiniteError(f"{where} holds non-finite values ({', '.join(bad[:3])}): it was written by a "
                                 "run that diverged; it cannot be evaluated or resumed")
        return state, data_state, meta

    def series(self) -> list[dict[str, Any]]:
        return [self.meta("series", s) for s in self.steps("series")]


# ---- integrity ----------------------------------------------------------------------------------
def _leaves(host_state) -> list[tuple[str, np.ndarray]]:
    return [(jax.tree_util.keystr(path), np.asarray(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]]


def nonfinite_leaves(host_state) -> list[str]:
    """Key paths of the floating-point leaves that hold a NaN or an infinity."""
    return [key for key, a in _leaves(host_state)
            if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all()]


def _array_sha256(a: np.ndarray) -> str:
    h = hashlib.sha256(f"{a.dtype.name}{list(a.shape)}".encode())
    h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # hashlib releases the GIL
    return h.hexdigest()


def _json_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _array_sums(host_state) -> list[list[str]]:
    leaves = _leaves(host_state)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_array_sha256, [a for _, a in leaves]))
    return [[key, d] for (key, _), d in zip(leaves, digests)]


def checksums(host_state, data_state: dict, meta: dict) -> dict[str, Any]:
    """The `checksums` item: SHA-256 of each array (flatten order) and of the data and meta records."""
    return {"algorithm": "sha256", "arrays": _array_sums(host_state), "data": _json_sha256(data_state),
            "meta": _json_sha256(meta)}


def checksum_mismatch(recorded: dict, host_state, data_state: dict, meta: dict) -> str | None:
    """What does not match the recorded checksums (None: everything does)."""
    if recorded.get("data") != _json_sha256(data_state):
        return "the data-iterator state"
    if recorded.get("meta") != _json_sha256(meta):
        return "the metadata record"
    now = _array_sums(host_state)
    if len(now) != len(recorded.get("arrays", [])):
        return f"the number of arrays ({len(now)} restored, {len(recorded.get('arrays', []))} recorded)"
    for (key, digest), (_, want) in zip(now, recorded["arrays"]):
        if digest != want:
            return f"array {key}"
    return None


# ---- write failures ---------------------------------------------------------------------------
def write_failure(what: str, e: BaseException,
                  kept: str = "nothing of it was finalized and the earlier checkpoints are intact") -> CheckpointError:
    """One-line CheckpointError for a failed write of `what` (a description naming the path); `kept`
    says what is still intact."""
    if is_disk_full(e):
        return CheckpointError(f"disk full while writing {what}; {kept} — free space and re-run the same "
                               "command to resume")
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return CheckpointError(f"could not write {what}: {first}")
