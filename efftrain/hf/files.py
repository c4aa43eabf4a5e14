"""Files of an HF checkpoint directory: safetensors in and out (numpy, no torch), JSON, and the atomic
output directory.

`output_dir` builds a directory under a temporary name beside the target and renames it into place only
when every file is written and fsynced: a failing or killed export or import leaves no target directory
(at most a `.NAME.partial-PID` directory, which the next run with the same target removes).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from efftrain.files import fsync_dir
from efftrain.hf import HFError

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)
PARTIAL = ".partial-"
FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def numpy_dtype(name: str):
    import ml_dtypes

    return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


def read_json(path: Path, what: str | None = None) -> dict[str, Any]:
    """A JSON object from `path`; HFError (naming the file) if it is missing or not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise HFError(f"{path}: not found{f' ({what})' if what else ''}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HFError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


# ---- safetensors ----------------------------------------------------------------------------------
class TensorFiles:
    """The tensors of a checkpoint directory (model.safetensors, or the shards of model.safetensors.index.json)
    without loading them: `shapes`, `dtypes` (safetensors names: F32, BF16, ...) and `read(name)`."""

    def __init__(self, directory: Path):
        import ml_dtypes  # noqa: F401  registers numpy's "bfloat16", which safetensors' numpy backend returns
        from safetensors import safe_open

        directory = Path(directory)
        index = directory / WEIGHTS_INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
        elif (directory / WEIGHTS).is_file():
            files = [WEIGHTS]
        else:
            found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
            hint = (f" (it has {', '.join(found[:2])}: PyTorch pickles, which efftrain does not read; re-save with "
                    "save_pretrained(DIR, safe_serialization=True))") if found else ""
            raise HFError(f"{directory}: no {WEIGHTS} or {WEIGHTS_INDEX}{hint}")
        self.handles, self.where, self.shapes, self.dtypes = {}, {}, {}, {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise HFError(f"{path}: not found (listed in {WEIGHTS_INDEX})")
            try:
                handle = safe_open(str(path), framework="np")
                keys = list(handle.keys())
            except Exception as e:  # safetensors raises SafetensorError / OSError for a damaged header
                raise HFError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]})") from None
            self.handles[name] = handle
            for key in keys:
                view = handle.get_slice(key)
                self.where[key], self.shapes[key], self.dtypes[key] = name, tuple(view.get_shape()), view.get_dtype()

    def read(self, key: str) -> np.ndarray:
        dtype = self.dtypes[key]
        if dtype not in FLOAT_DTYPES:
            raise HFError(f"tensor {key} has dtype {dtype}: efftrain imports float32, bfloat16 and float16 weights "
                          "(a quantized checkpoint?)")
        try:
            return self.handles[self.where[key]].get_tensor(key)
        except Exception as e:
            raise HFError(f"tensor {key} in {self.where[key]} is unreadable ({str(e).splitlines()[0][:200]})") from None


def save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """One safetensors file (metadata format pt, which transformers requires), fsynced."""
    import ml_dtypes  # noqa: F401  (bfloat16 arrays)
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ---- the atomic output directory ------------------------------------------------------------------
def check_target(target: Path, force: bool | None) -> None:
    """Refuse an existing, non-empty target unless `force` (then it is replaced once the new one is whole);
    force None: the command has no --force."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise HFError(f"{target} exists and is not a directory; choose another --out")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise HFError(f"{target} exists and is not empty; choose another --out"
                      f"{' or pass --force to replace it' if force is not None else ''}")


@contextmanager
def output_dir(target: Path, *, force: bool | None = None) -> Iterator[Path]:
    """Yields an empty temporary directory beside `target`; when the block ends without an error, every
    file in it is fsynced and it is renamed to `target` (an existing, non-empty `target` is replaced only
    then, and only with `force`: else HFError). On any error the temporary directory is removed and
    `target` is untouched."""
    check_target(target, force)
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}{PARTIAL}"
    for stale in target.parent.glob(f"{prefix}*"):  # left by a kill
        try:
            if not _alive(int(stale.name[len(prefix):])):
                shutil.rmtree(stale, ignore_errors=True)
        except ValueError:
            pass
    tmp = target.parent / f"{prefix}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(Path(root) / name, "rb") as f:
                    os.fsync(f.fileno())
            fsync_dir(Path(root))
        check_target(target, force)  # again: it may have appeared meanwhile
        old = None
        if target.exists():
            if any(target.iterdir()):
                old = target.parent / f".{target.name}.replaced-{os.getpid()}"
                target.rename(old)
            else:
                target.rmdir()
        try:
            tmp.rename(target)
        except BaseException:
            if old is not None:
                old.rename(target)
            raise
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()
