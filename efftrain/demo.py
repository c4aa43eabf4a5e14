"""`make demo`: the main job, small, on the built-in corpus (this interpreter's standard library).

Trains the tiny dense baseline and the tiny DeepSeek variant (MLA + DeepSeekMoE + MTP), each with a
log-spaced series of 10 checkpoints, then prints the val loss of every checkpoint. Runs on 2 CPU
cores in a few minutes; re-running it resumes/skips finished runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEMO_RUNS = ("dense-tiny", "deepseek-tiny")


def main(out_dir: str = "runs/demo") -> int:
    from efftrain.cli import main as cli

    started = time.time()
    out = Path(out_dir)
    for preset in DEMO_RUNS:
        print(f"\n=== train {preset} -> {out / preset}", flush=True)
        code = cli(["train", preset, "--out", str(out / preset)])
        if code:
            return code
    for preset in DEMO_RUNS:
        print(f"\n=== eval {preset}", flush=True)
        code = cli(["eval", str(out / preset)])
        if code:
            return code
    print(f"\ndemo finished in {time.time() - started:.0f}s; runs in {out}/ "
          f"(try: .venv/bin/efftrain info {out / DEMO_RUNS[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
