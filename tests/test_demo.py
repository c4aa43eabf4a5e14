"""`make demo`: its spec and the sequence of commands it runs (the commands themselves are tested
in their own files; the whole demo runs in `make demo`)."""

import efftrain.cli
from efftrain import demo
from efftrain.grid.spec import load_spec
from efftrain.train.rundir import total_steps_of
from efftrain.train.series import series_points


def test_demo_spec_trains_dense_and_deepseek_with_at_least_8_checkpoints():
    spec = load_spec(demo.SPEC)
    cells = spec.cells()
    assert len(cells) == 4  # two variants x two paired seeds
    assert sorted((c.replicate, c.seed) for c in cells) == [("deepseek", 0), ("deepseek", 1), ("dense", 0),
                                                            ("dense", 1)]
    techniques = set()
    for cell in cells:
        cfg = cell.config
        assert cfg.data.source == "pystdlib"
        points, dropped = series_points(cfg.checkpoint, cfg.tokens_per_step, total_steps_of(cfg))
        assert len(points) >= 8 and not dropped
        techniques.add((cfg.model.attention, cfg.model.moe.enabled, cfg.model.mtp.depth))
    assert techniques == {("mha", False, 0), ("mla", True, 1)}


def test_demo_runs_grid_eval_fit_report_in_order(monkeypatch):
    calls = []
    monkeypatch.setattr(efftrain.cli, "main", lambda argv: calls.append(argv) or 0)
    assert demo.main() == 0
    commands = [argv[0] for argv in calls]
    assert commands == ["grid"] + ["eval"] * 4 + ["fit", "report"]
    assert calls[0][:2] == ["grid", "run"] and calls[-1][-2] == "--out"


def test_demo_stops_at_the_first_failing_step(monkeypatch):
    calls = []
    monkeypatch.setattr(efftrain.cli, "main", lambda argv: calls.append(argv) or 1)
    assert demo.main() == 1 and len(calls) == 1
