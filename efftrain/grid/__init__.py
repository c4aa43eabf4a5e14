"""Experiment grids: a YAML spec expands into cells (resolved configs keyed by their hash); the runner
trains each cell, quantizes every checkpoint and records everything in one SQLite store per grid.

  spec.py      GridSpec / Cell, load_spec, expansion (product x zip x variants, cooldown branches,
               checkpoint averaging), GridError
  store.py     ResultsStore: runs_dir/results.sqlite (runs, checkpoints, ptq), export, merge of the
               stores of a grid run in pieces
  schedule.py  the order parallel workers take the families in (costliest first, replicates spread,
               a replicate held while its sibling compiles)
  runner.py    run_grid (resumable, idempotent; worker processes; SLURM via submitit), grid_status
(the `grid run|status|export|merge` commands' argument parsing lives in efftrain/cli.py)
"""

from efftrain.grid.spec import Cell, GridError, GridSpec, expand_spec, load_spec

__all__ = ["Cell", "GridError", "GridSpec", "expand_spec", "load_spec"]
