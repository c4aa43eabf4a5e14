"""`make demo`: the main job, small, on the built-in corpus (this interpreter's standard library).

One command from corpus to conclusions (experiments/demo.yaml): a tiny dense model and its
DeepSeek-style twin (MLA + DeepSeekMoE + MTP) each trained with a 10-checkpoint log-spaced series →
every checkpoint quantized with RTN / GPTQ / AWQ at 2/3/4/8 bits → the eval table of each run →
the Ouyang QiD fit per method → an HTML/Markdown report. Runs in a few minutes on 2 CPU cores;
re-running skips everything already done.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before JAX loads (below): quiet XLA's C++ logging

from efftrain import cli  # noqa: E402
from efftrain.grid.spec import load_spec  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "experiments" / "demo.yaml"


def main() -> int:
    started = time.time()
    spec = load_spec(SPEC)
    steps = [
        ("train + PTQ sweep", ["grid", "run", str(SPEC)]),
        *[(f"eval {cell.name}", ["eval", str(cell.run_dir)]) for cell in spec.cells()],
        ("QiD fit (Ouyang et al. 2024), per method", ["fit", str(SPEC), "--group-by", "method", "--n-boot", "200"]),
        ("report", ["report", str(SPEC), "--out", str(spec.runs_dir / "report")]),
    ]
    for title, argv in steps:
        print(f"\n=== {title}: efftrain {' '.join(argv)}", flush=True)
        code = cli.main(argv)
        if code:
            return code
    print(f"\ndemo finished in {time.time() - started:.0f}s. Report: {spec.runs_dir / 'report' / 'report.html'} "
          f"(and report.md); runs in {spec.runs_dir}/ — try: .venv/bin/efftrain info {spec.cells()[0].run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
