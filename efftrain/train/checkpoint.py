"""Checkpoints of a run: the series (kept forever) and the rolling resume checkpoint (latest only).

Layout:  RUN_DIR/checkpoints/series/<step>/{state,data,meta}
         RUN_DIR/checkpoints/resume/<step>/{state,data,meta}
`state` is the train state pytree (params, other model variables such as MoE router biases, optimizer
state), `data` the grain iterator state (JSON), `meta` a JSON record: step, tokens_seen, target_tokens,
val_loss, wall_time_s, config_hash, kind.

Orbax writes each checkpoint into a temporary directory and renames it only when every item is
committed, so a crash or a full disk mid-save leaves nothing that `steps()` lists; saves are async
and overlap training.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which and why."""


def _manager(path: Path, *, keep: int | None, async_save: bool, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only)
    return ocp.CheckpointManager(path.resolve(), options=options)


def abstract_like(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointStore:
    KINDS = ("series", "resume")

    def __init__(self, run_dir: str | Path, *, async_save: bool = True, read_only: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        if read_only and not self.root.is_dir():
            raise CheckpointError(f"{run_dir}: no checkpoints directory (was this run trained?)")
        self.managers = {
            "series": _manager(self.root / "series", keep=None, async_save=async_save, read_only=read_only),
            "resume": _manager(self.root / "resume", keep=1, async_save=async_save, read_only=read_only),
        }

    # writing -------------------------------------------------------------------------------------
    def save(self, kind: str, step: int, state, data_state: dict, meta: dict[str, Any]) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({**meta, "kind": kind, "step": step}),
        )
        try:
            self.managers[kind].save(step, args=args, force=True)
        except OSError as e:
            raise _save_error(kind, step, e) from None

    def wait(self) -> None:
        for kind, mgr in self.managers.items():
            try:
                mgr.wait_until_finished()
            except OSError as e:
                raise _save_error(kind, None, e) from None

    def close(self) -> None:
        for mgr in self.managers.values():
            mgr.close()

    # reading -------------------------------------------------------------------------------------
    def steps(self, kind: str) -> list[int]:
        """Finalized checkpoints only (orbax lists nothing that did not commit)."""
        self.managers[kind].reload()
        return sorted(self.managers[kind].all_steps())

    def latest(self) -> tuple[str, int] | None:
        """The newest finalized checkpoint of either kind, preferring series on ties."""
        best = None
        for kind in self.KINDS:
            for step in self.steps(kind):
                if best is None or step > best[1]:
                    best = (kind, step)
        return best

    def meta(self, kind: str, step: int) -> dict[str, Any]:
        try:
            out = self.managers[kind].restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises assorted types for damaged files
            raise CheckpointError(f"{self.root / kind / str(step)}: metadata unreadable ({e})") from None
        return dict(out["meta"])

    def restore(self, kind: str, step: int, abstract_state) -> tuple[Any, dict, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        try:
            out = self.managers[kind].restore(step, args=args)
        except Exception as e:
            raise CheckpointError(
                f"{self.root / kind / str(step)}: cannot restore ({type(e).__name__}: {str(e)[:300]}); "
                "the checkpoint is damaged or was written by a different model config") from None
        return out["state"], dict(out["data"]), dict(out["meta"])

    def series(self) -> list[dict[str, Any]]:
        return [self.meta("series", s) for s in self.steps("series")]


def _save_error(kind: str, step: int | None, e: OSError) -> CheckpointError:
    where = f"{kind} checkpoint" + (f" at step {step}" if step is not None else "")
    if e.errno == errno.ENOSPC:
        return CheckpointError(f"disk full while writing the {where}; nothing was finalized — free space "
                               "and re-run the same command to resume")
    return CheckpointError(f"could not write the {where}: {e}")


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
