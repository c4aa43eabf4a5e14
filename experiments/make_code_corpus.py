"""Build a local Python-source corpus larger than the built-in `pystdlib` one, for GPU runs that may not
download anything (the lent GPU machines reach no network).

    python experiments/make_code_corpus.py corpus/code                 # stdlib + installed packages
    python experiments/make_code_corpus.py corpus/code --archive corpus/code.tar.xz

It copies every UTF-8 `*.py` file of this interpreter's standard library (tests included) and of every
directory on sys.path that holds installed packages (site-packages of the active environment) into
OUT/stdlib/... and OUT/site/..., skipping byte-identical duplicates (vendored copies), and prints the
totals. Train on it with

    --set data.source=files --set 'data.paths=["corpus/code/**/*.py"]'

Documents are split into train/val by a hash of their path, as for any `files` corpus. The result
depends on the interpreter and the installed packages: record the printed totals with your results.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
import tarfile
from pathlib import Path


def source_roots() -> list[tuple[str, Path]]:
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for entry in sys.path:
        p = Path(entry)
        if p.is_dir() and p.name in ("site-packages", "dist-packages"):
            roots.append(("site", p))
    return roots


def collect(out: Path) -> tuple[int, int, int]:
    """Copy the files; returns (files written, characters, duplicates skipped)."""
    seen: set[str] = set()
    files = chars = dups = 0
    for label, root in source_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "site-packages", "dist-packages"))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                src = Path(dirpath) / name
                try:
                    data = src.read_bytes()
                    text = data.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                digest = hashlib.sha256(data).hexdigest()
                if not text.strip() or digest in seen:
                    dups += bool(text.strip())
                    continue
                seen.add(digest)
                dest = out / label / src.relative_to(root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                files += 1
                chars += len(text)
    return files, chars, dups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to create (must not exist)")
    parser.add_argument("--archive", type=Path, default=None, help="also write OUT as a .tar.xz here")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; choose a new directory", file=sys.stderr)
        return 2
    files, chars, dups = collect(args.out)
    print(f"{args.out}: {files} files, {chars / 1e6:.1f}M characters ({dups} duplicate files skipped); "
          f"python {sys.version.split()[0]}")
    if args.archive is not None:
        with tarfile.open(args.archive, "w:xz") as tar:
            tar.add(args.out, arcname=args.out.name)
        print(f"{args.archive}: {args.archive.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
