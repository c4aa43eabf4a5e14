"""Files that a reader, or a kill at any moment, sees whole: the old content or the new, never part.

`atomic_path` hands out a temporary name beside the target; when the block that writes it ends
without an error, the file is fsynced, renamed over the target (one atomic rename) and its directory
fsynced, so the rename itself survives a crash; on any error the temporary file is removed and the
target is untouched. `write_atomic` writes bytes or text that way.

The temporary name is NAME.tmp (`tmp_path`), or .NAME.tmp.PID with `per_process=True`, for files
that several processes may write at once: concurrent builders of one token cache write identical
bytes, and whichever rename comes last wins harmlessly. `is_disk_full` tells a full disk or quota
from other write failures (the OS error, or tensorstore's text of it).
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"  # NAME.tmp: an atomic write of NAME in progress (or cut short by a kill)


def tmp_path(path: Path, *, per_process: bool = False) -> Path:
    """Where an atomic write of `path` writes first: NAME.tmp, or .NAME.tmp.PID with `per_process`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_SUFFIX}.{os.getpid()}" if per_process else path.name + TMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make the renames in `directory` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path, *, per_process: bool = False) -> Iterator[Path]:
    """Yields the temporary path to write `path`'s new content to; on success it is fsynced and renamed
    over `path`, and the directory fsynced. On any error (OSError, a KeyboardInterrupt) the temporary
    file is removed, `path` keeps its old content and the error propagates."""
    path = Path(path)
    tmp = tmp_path(path, per_process=per_process)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: str | bytes, *, per_process: bool = False) -> None:
    """Write a small file atomically (`atomic_path`); OSError if it cannot be written."""
    with atomic_path(path, per_process=per_process) as tmp:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


_DISK_FULL = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")


def is_disk_full(e: BaseException) -> bool:
    """True if the write failed for want of space (ENOSPC) or quota (EDQUOT)."""
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or bool(_DISK_FULL.search(str(e)))
