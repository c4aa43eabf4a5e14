"""The `efftrain` command line.

  efftrain train CONFIG [--set key=value ...] [--out RUN_DIR]   train or resume a run
  efftrain eval RUN_DIR [--step N ...] [--tokens T ...] [--json]  val loss/perplexity per checkpoint
                                                                 (--text FILE: on a text file instead)
  efftrain ptq RUN_DIR [--methods rtn,gptq,awq] [--bits 2,3,4,8]  QiD of every checkpoint -> ptq.csv
  efftrain info RUN_DIR [--json]                                 the run and its finalized checkpoints
  efftrain presets                                               list the presets in configs/
  efftrain grid run|status|export SPEC                           experiment grids (train x PTQ) -> SQLite
  efftrain grid merge DEST SRC [SRC ...] [--prefer dest|source] merge the stores of a grid run in pieces
  efftrain fit TABLE [--law ouyang|kumar|both]                   QiD scaling-law fits with bootstrap CIs
  efftrain report SPEC_OR_DB --out DIR                           HTML + Markdown report with plots
  efftrain export-hf RUN_DIR --out DIR [--step N | --quantized NAME]  a checkpoint -> transformers checkpoint dir
  efftrain import-hf DIR --out RUN_DIR                           a local Llama/DeepseekV3 checkpoint -> run dir

Every command exits non-zero with a one-line `error:` cause on bad input. Exit codes (docs/RELIABILITY.md):
0 done; 1 failure (data, checkpoint, disk full, non-finite training); 2 bad config/arguments or an
unusable run directory (incl. one locked by another trainer); 75 interrupted by SIGTERM/SIGINT after
writing a resume checkpoint (requeue and re-run the same command); 130 Ctrl-C outside training.

All argument parsing is here: each `cmd_*` turns its arguments into typed values, calls the plain
function that does the work (train, eval_run, run_ptq_sweep, run_grid, run_fit, build_report, ...) and
prints. Those modules are imported when a command runs, not with this one ("lazy" below), so that
`efftrain --help` and argument errors answer at once instead of after loading JAX, orbax and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from efftrain.config import ConfigError, list_presets, load_config, yaml_load
from efftrain.files import is_disk_full
from efftrain.formatting import text_table

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal with a resume checkpoint written; run again


# ---- argument values ------------------------------------------------------------------------
def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated integers, got '{text}'") from None


def parse_alpha_list(text: str) -> list[float | None]:
    """--smoothquant-alphas: comma-separated numbers or 'none'."""
    try:
        return [None if x.strip() == "none" else float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--smoothquant-alphas: expected comma-separated numbers or 'none', got '{text}'") from None


def parse_choice_list(text: str, what: str, valid: tuple[str, ...], single: bool = False) -> list[str]:
    """Comma-separated names, each one of `valid` (exactly one if `single`); ConfigError naming the valid
    ones otherwise."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in valid]
    if bad or not items or (single and len(items) > 1):
        got = (f"unknown value(s) {', '.join(map(repr, bad))}" if bad else "no value given" if not items
               else "one value expected")
        raise ConfigError(f"{what}: {got}; valid: {', '.join(valid)}")
    return items


def parse_numbers(text: str, n: int, what: str) -> list[float]:
    """Exactly n comma-separated numbers (e.g. --predict N,D,P)."""
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != n:
        raise ConfigError(f"{what} expects {n} comma-separated numbers, got '{text}'")
    numbers = []
    for p in parts:
        try:
            numbers.append(float(p))
        except ValueError:
            raise ConfigError(f"'{p}' is not a number") from None
    return numbers


def parse_assignments(items: list[str], what: str) -> dict[str, Any]:
    """KEY=VALUE items (--set, --fix) -> {key: value}, each value read as YAML (kept as text if it is not)."""
    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} '{item}' is not of the form key=value")
        try:
            out[key.strip()] = yaml_load(text) if text.strip() else ""
        except Exception:  # yaml.YAMLError: keep the text
            out[key.strip()] = text
    return out


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); every column right-aligned, '-' for a missing value."""
    cells = [[("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    return text_table(cells, [h for _, h, _ in columns], right=set(range(len(columns))))


# ---- run commands ---------------------------------------------------------------------------
def cmd_train(args) -> int:
    from efftrain.train.loop import train  # lazy (module docstring)

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    train(cfg, out, skip_nonfinite=args.skip_nonfinite, fallback=args.fallback)
    return 0


def cmd_eval(args) -> int:
    from efftrain.eval import eval_run, evaluate_model, val_set  # lazy (module docstring)

    if args.text:
        return _eval_text(args)
    if args.quantized:
        from efftrain.quant.sweep import load_quantized  # lazy (module docstring)

        cfg, model, meta = load_quantized(args.run_dir, args.quantized)
        row = {"checkpoint": args.quantized, "step": meta["step"], "tokens": meta["tokens"],
               **evaluate_model(model, cfg, val_set(cfg, args.batches))}
        print(json.dumps(row, indent=2) if args.json else
              f"{args.quantized}: val_loss {row['val_loss']:.4f} ± {row['val_loss_se']:.4f}  "
              f"ppl {row['perplexity']:.2f}  ({row['windows']} windows)")
        return 0

    def show(row):
        if not args.json:
            extra = f"  mtp_acceptance {row['mtp_acceptance']:.3f}" if "mtp_acceptance" in row else ""
            print(f"  step {row['step']:>7d}  tokens {row['tokens']:>12,d}  val_loss {row['val_loss']:.4f} "
                  f"± {row['val_loss_se']:.4f}  ppl {row['perplexity']:.2f}  windows {row['windows']}{extra}",
                  file=sys.stderr)

    rows = eval_run(args.run_dir, steps=args.step, tokens=args.tokens, n_batches=args.batches, progress=show)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        cols = [("step", "step", "d"), ("tokens", "tokens", ",d"), ("val_loss", "val_loss", ".4f"),
                ("val_loss_se", "±se", ".4f"), ("perplexity", "ppl", ".2f"), ("windows", "windows", "d")]
        if rows and "mtp_acceptance" in rows[0]:
            cols.append(("mtp_acceptance", "mtp_accept", ".3f"))
        print(_table(rows, cols))
    return 0


def _eval_text(args) -> int:
    from efftrain.hf.text_eval import eval_text  # lazy (module docstring)

    def show(row):
        if not args.json:
            print(f"  step {row['step']:>7d}  tokens {row['tokens']:>12,d}  loss {row['loss']:.4f}  "
                  f"ppl {row['perplexity']:.2f}  bits/byte {row['bits_per_byte']:.4f}", file=sys.stderr)

    rows = eval_text(args.run_dir, args.text, steps=args.step, tokens=args.tokens, quantized=args.quantized,
                     progress=show)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.text}: {rows[0]['text_tokens']:,} tokens in {rows[0]['windows']} window(s)")
    cols = [("step", "step", "d"), ("tokens", "tokens", ",d"), ("loss", "loss", ".4f"),
            ("perplexity", "ppl", ".2f"), ("bits_per_byte", "bits/byte", ".4f")]
    if args.quantized:
        cols.insert(0, ("checkpoint", "checkpoint", "s"))
    print(_table(rows, cols))
    return 0


def cmd_export_hf(args) -> int:
    from efftrain.hf.export import export_hf  # lazy (module docstring)

    export_hf(args.run_dir, args.out, step=args.step, tokens=args.tokens, quantized=args.quantized,
              dtype=args.dtype, force=args.force, log=lambda msg: print(msg, file=sys.stderr))
    print(args.out)
    return 0


def cmd_import_hf(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded (efftrain.hf reads local files only)
    from efftrain.hf.importer import import_hf  # lazy (module docstring)

    import_hf(args.src, args.out, overrides=args.set, step=args.step, tokens=args.tokens,
              log=lambda msg: print(msg, file=sys.stderr))
    print(args.out)
    return 0


def cmd_ptq(args) -> int:
    from efftrain.quant.apply import EXPERT_CALIBRATION  # lazy (module docstring)
    from efftrain.quant.formats import FORMATS
    from efftrain.quant.sweep import (ACTIVATION_CHOICES, KV_CHOICES, KV_GRANULARITIES, ROTATION_CHOICES, SWEEP_METHODS,
                                      make_spec, run_ptq_sweep)

    fields = {"methods": parse_choice_list(args.methods, "--methods", SWEEP_METHODS),
              "bits": parse_int_list(args.bits, "--bits"),
              "group_sizes": parse_int_list(args.group_size, "--group-size"),
              "formats": parse_choice_list(args.formats, "--formats", FORMATS),
              "symmetric": args.symmetric, "save": args.save,
              "act_order": args.act_order, "quantize_head": args.quantize_head,
              "awq_clip": not args.no_awq_clip, "awq_duo_scaling": args.awq_duo_scaling,
              "expert_calibration": parse_choice_list(args.expert_calibration, "--expert-calibration",
                                                      EXPERT_CALIBRATION, single=True)[0],
              "expert_gate_weighted": args.expert_gate_weighted,
              "activations": parse_choice_list(args.activations, "--activations", ACTIVATION_CHOICES),
              "kv_cache": parse_choice_list(args.kv_cache, "--kv-cache", KV_CHOICES),
              "kv_granularity": parse_choice_list(args.kv_granularity, "--kv-granularity", KV_GRANULARITIES,
                                                  single=True)[0],
              "rotations": parse_choice_list(args.rotations, "--rotations", ROTATION_CHOICES),
              "rotate_values": args.rotate_values}
    optional = {"min_expert_tokens": args.min_expert_tokens,
                "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
                "calib_seed": args.calib_seed, "eval_tokens": args.eval_tokens, "eval_seed": args.eval_seed,
                "eval_batches": args.eval_batches, "eval_rows": args.eval_rows, "kv_group": args.kv_group,
                "rotation_seed": args.rotation_seed,
                "smoothquant_alphas": args.smoothquant_alphas and parse_alpha_list(args.smoothquant_alphas)}
    fields.update({k: v for k, v in optional.items() if v is not None})  # else the PTQSpec default
    if args.checkpoints != "all":
        fields["checkpoints"] = parse_int_list(args.checkpoints, "--checkpoints")
    if args.mesh:  # the axes of train.mesh, as --set train.mesh.fsdp=4 gives them
        fields["mesh"] = parse_assignments(args.mesh.split(","), "--mesh")
    if args.recovery:  # recovery fine-tuning rows (docs/RECOVERY.md)
        from efftrain.quant.recovery import parse_recovery_option

        fields["recovery"] = [parse_recovery_option(text) for text in args.recovery]
    run_ptq_sweep(args.run_dir, make_spec(**fields))
    return 0


def cmd_info(args) -> int:
    from efftrain.train.rundir import finalized, load_run_config, read_run_info  # lazy (module docstring)
    from efftrain.xla import describe

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    info = read_run_info(run_dir)
    series = finalized(run_dir, "series")
    resume = finalized(run_dir, "resume")
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "run": info, "series": series, "resume": resume}, indent=2))
        return 0
    p = info.get("params", {})
    print(f"run {run_dir}  ({cfg.name}, config hash {cfg.hash()})")
    print(f"  model: {cfg.model.attention}, d_model {cfg.model.d_model}, layers {cfg.model.n_layers}, "
          f"moe {'on' if cfg.model.moe.enabled else 'off'}, mtp depth {cfg.model.mtp.depth}, "
          f"fp8 {'on' if cfg.fp8.enabled else 'off'}")
    if p:
        print(f"  params: total {p['total']:,}  non-embedding {p['non_embedding']:,}  active {p['active']:,}  "
              f"embedding {p['embedding']:,}  mtp {p['mtp']:,}")
        print(f"  flops/token {info['flops_per_token']:,}  kv-cache bytes/token/layer (bf16) "
              f"{info['kv_cache_bytes_per_token_per_layer_bf16']}")
        print(f"  steps {info['total_steps']} x {info['tokens_per_step']:,} tokens")
    if "deterministic" in info:  # runs trained before train.deterministic existed do not record it
        print(f"  deterministic {str(info['deterministic']).lower()}  "
              f"(XLA step options: {describe(info.get('xla_step_options', {}))})")
    print(f"  series checkpoints ({len(series)}):")
    print(_table(series, [("step", "step", "d"), ("tokens_seen", "tokens", ",d"),
                          ("target_tokens", "target", ",d"), ("val_loss", "val_loss", ".4f"),
                          ("wall_time_s", "wall_s", ".1f")]))
    if resume:
        print(f"  resume checkpoint: step {resume[-1]['step']} ({resume[-1]['tokens_seen']:,} tokens)")
    return 0


def cmd_presets(args) -> int:
    for name in list_presets():
        c = load_config(name)
        m = c.model
        techniques = [t for t, on in (("mla", m.attention == "mla"), ("moe", m.moe.enabled),
                                      (f"mtp{m.mtp.depth}", m.mtp.depth > 0), ("fp8", c.fp8.enabled)) if on]
        print(f"{name:18s} d{m.d_model} L{m.n_layers} vocab {m.vocab_size} seq {c.data.seq_len}  "
              f"{'+'.join(techniques) or 'dense'}")
    return 0


# ---- grid commands --------------------------------------------------------------------------
def _grid_spec(args):
    from efftrain.grid.spec import load_spec  # lazy (module docstring)

    return load_spec(args.spec, set_overrides=parse_assignments(args.set, "--set") or None, runs_dir=args.runs_dir)


def cmd_grid_run(args) -> int:
    from efftrain.grid.runner import run_grid  # lazy (module docstring)

    only = [k for item in args.only or [] for k in item.split(",") if k]
    results = run_grid(args.spec, workers=args.workers, retry_failed=args.retry_failed, only=only or None,
                       set_overrides=parse_assignments(args.set, "--set") or None, runs_dir=args.runs_dir,
                       slurm=args.slurm, train_only=args.train_only, no_train=args.no_train)
    failed = [k for k, s in results.items() if s == "failed"]
    if failed:
        print(f"error: {len(failed)} cell(s) failed: {', '.join(failed)} (see `efftrain grid status "
              f"{args.spec}`; rerun with --retry-failed)", file=sys.stderr)
        return 1
    return 0


def cmd_grid_status(args) -> int:
    from efftrain.grid.runner import grid_status  # lazy (module docstring)

    spec = _grid_spec(args)
    rows = grid_status(spec)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [[r["key"], r["name"], f"{r['seed']}/{r['data_seed']}", r["kind"], r["status"],
              f"{r['checkpoints']}/{r['checkpoints_expected']}", f"{r['ptq_rows']}/{r['ptq_expected']}",
              (r["error"] or "")[:60]] for r in rows]
    print(f"grid {spec.name} ({spec.path}): results in {spec.db_path}")
    print(text_table(table, ["key", "name", "seed", "kind", "status", "checkpoints", "ptq rows", "error"],
                     right={5, 6}))
    by = {s: sum(r["status"] == s for r in rows) for s in ("done", "running", "pending", "failed")}
    rows_done, rows_expected = sum(r["ptq_rows"] for r in rows), sum(r["ptq_expected"] for r in rows)
    print(f"{len(rows)} cells: " + ", ".join(f"{n} {s}" for s, n in by.items() if n) +
          f"; PTQ rows {rows_done}/{rows_expected}")
    return 0


def cmd_grid_export(args) -> int:
    from efftrain.grid.store import ResultsStore, export_table  # lazy (module docstring)

    spec = _grid_spec(args)
    out = Path(args.out) if args.out else spec.runs_dir / f"{args.table}.{args.format}"
    with ResultsStore(spec.db_path, read_only=True) as store:
        path = export_table(store, out, args.format, args.table)
        n = len(store.table(args.table)[1])
    print(f"{n} {args.table} rows -> {path}")
    return 0


def _merge_tally_text(tables: dict, prefer: str | None) -> str:
    """One line of what a merge did (tables: name -> TableTally)."""
    from efftrain.grid.store import TableTally  # lazy (module docstring)

    total = sum(tables.values(), TableTally())
    conflicts = f"{total.conflicts} conflicts" + (f" (kept the {prefer}'s)" if total.conflicts else "")
    return (f"runs {tables['runs'].added} added, checkpoints {tables['checkpoints'].added} added, "
            f"PTQ rows {tables['ptq'].added} added; {total.duplicates} duplicates skipped, "
            f"{total.filled} filled in, {conflicts}")


def cmd_grid_merge(args) -> int:
    from efftrain.grid.store import ResultsStore, TableTally, merge_stores  # lazy (module docstring)

    path, summaries = merge_stores(args.dest, args.sources, prefer=args.prefer)
    for s in summaries:
        print(f"{s.source}: {_merge_tally_text(s.tables, args.prefer)}; "
              f"{s.statuses_advanced} cell status(es) advanced")
    totals = {name: sum((s.tables[name] for s in summaries), TableTally()) for name in summaries[0].tables}
    with ResultsStore(path, read_only=True) as store:
        held = {name: len(store.table(name)[1]) for name in ("runs", "checkpoints", "ptq")}
    print(f"merged {len(summaries)} store(s) into {path}: {_merge_tally_text(totals, args.prefer)}; it holds "
          f"{held['runs']} runs, {held['checkpoints']} checkpoints, {held['ptq']} PTQ rows")
    return 0


# ---- analysis commands ----------------------------------------------------------------------
def cmd_fit(args) -> int:
    from efftrain.analysis.commands import run_fit  # lazy: scipy (module docstring)

    fixed = {k: float(v) for k, v in parse_assignments(args.fix, "--fix").items()} or None
    predict = [tuple(parse_numbers(text, 3, "--predict")) for text in args.predict or []]
    at = tuple(parse_numbers(args.at, 2, "--at")) if args.threshold is not None and args.at else None
    res = run_fit(args.table, law=args.law, group_by=[g for g in (args.group_by or "").split(",") if g],
                  filters=args.filter, n_boot=args.n_boot, seed=args.seed, fixed=fixed, predict=predict,
                  threshold=args.threshold, at=at)
    if args.json:
        print(json.dumps(res.to_json(), indent=2, default=lambda x: None))
        return 0
    print(res.fits_text())
    for note in res.notes:
        print(f"note: {note}", file=sys.stderr)
    if res.predictions:
        print(res.predictions_text())
    if res.thresholds:
        print(res.thresholds_text(args.at))
    return 0


def cmd_report(args) -> int:
    from efftrain.analysis.report import build_report  # lazy: matplotlib (module docstring)

    path = build_report(args.source, args.out, method=args.method, bits=args.bits, baseline=args.baseline,
                        n_boot=args.n_boot, log=lambda msg: print(msg, file=sys.stderr))
    print(path)
    return 0


# ---- parser ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="efftrain", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (or resume the run in --out)")
    p.add_argument("config", help="preset name (see `efftrain presets`) or path to a YAML config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set train.batch_size=32 (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<name>); an existing run resumes")
    p.add_argument("--skip-nonfinite", type=int, default=0, metavar="N",
                   help="skip (state unchanged) up to N steps whose loss, gradient or update is non-finite; "
                        "default 0: the first such step halts training")
    p.add_argument("--fallback", action="store_true",
                   help="if the newest checkpoint is damaged, move it to checkpoints/corrupt/ and resume from "
                        "the previous finalized one")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="val loss and perplexity of each series checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, action="append", help="only this step (repeatable)")
    p.add_argument("--tokens", type=int, action="append", help="checkpoint nearest to T tokens (repeatable)")
    p.add_argument("--batches", type=int, help="val batches of the run's batch_size windows, seeded sample "
                                                 "(default: the run's train.eval_batches, as in training)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quantized", metavar="NAME", help="evaluate RUN_DIR/quantized/NAME (from `ptq --save`)")
    p.add_argument("--text", metavar="FILE", help="loss / perplexity / bits per byte on this UTF-8 text file, "
                                                  "tokenized with the run's tokenizer, instead of the val split")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ptq", help="quantize every series checkpoint; append QiD rows to RUN_DIR/ptq.csv")
    p.add_argument("run_dir")
    p.add_argument("--methods", default="rtn,gptq,awq",
                   help="comma-separated weight quantizers: rtn, gptq, awq, awq-linear, billm (1-bit), fp8-block "
                        "(E4M3, 128x128 blocks), none (16-bit weights) (docs/PTQ.md)")
    p.add_argument("--bits", default="2,3,4,8", help="comma-separated weight bits, 2..8")
    p.add_argument("--group-size", default="128", help="comma-separated group sizes (-1 = whole channel)")
    p.add_argument("--formats", default="int", help="comma-separated: int, nf4 (4-bit), fp4 (4-bit), fp8 (8-bit)")
    p.add_argument("--checkpoints", default="all", help="'all' or comma-separated series steps")
    p.add_argument("--calib-samples", type=int, help="calibration sequences from the train split (default 128)")
    p.add_argument("--calib-seq-len", type=int, help="calibration sequence length (default: the run's seq_len)")
    p.add_argument("--calib-seed", type=int, help="seed of the calibration draw (default 1234)")
    p.add_argument("--eval-tokens", type=int,
                   help="scored val tokens, whole windows spread over the val split (default 1,000,000, "
                        "at most the val split)")
    p.add_argument("--eval-seed", type=int, help="seed of the val-window sample (default 0)")
    p.add_argument("--eval-batches", type=int,
                   help="instead of --eval-tokens: this many x the run's batch_size val windows")
    p.add_argument("--eval-rows", type=int,
                   help="weight-only rows of a checkpoint scored together in one pass over the eval windows "
                        "(default 4; 1 = one pass per row; each extra row holds one more quantized copy of the "
                        "parameters on the device)")
    p.add_argument("--symmetric", action="store_true", help="symmetric int grid (default asymmetric min-max)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize rows by decreasing Hessian diagonal")
    p.add_argument("--quantize-head", action="store_true",
                   help="also quantize the output head (default: kept in 16-bit, like embedding, router, norms)")
    p.add_argument("--no-awq-clip", action="store_true", help="AWQ: skip the clipping search (default on)")
    p.add_argument("--awq-duo-scaling", action="store_true", help="AWQ: scales x_mean^a / w_mean^(1-a) (AutoAWQ)")
    p.add_argument("--min-expert-tokens", type=int,
                   help="routed experts with fewer calibration tokens fall back to RTN (default 2 x the matrix's "
                        "input width)")
    p.add_argument("--expert-calibration", default="routed",
                   help="routed (each expert on the tokens routed to it) or all (every token, every expert)")
    p.add_argument("--expert-gate-weighted", action="store_true",
                   help="weight each token's row of an expert's statistics by its gate")
    p.add_argument("--activations", default="none",
                   help="comma-separated activation quantizers of every block GEMM input: none, int8, int4 "
                        "(per token), fp8 (E4M3, 1x128 tiles); e.g. --bits 8 --activations int8 = W8A8")
    p.add_argument("--kv-cache", default="none", help="comma-separated KV-cache quantizers: none, int8, int4, fp8 "
                                                      "(MHA K/V; MLA's latent c_kv and k_rope)")
    p.add_argument("--kv-granularity", default="token", help="KV scales per token (per head) or per group")
    p.add_argument("--kv-group", type=int, help="channels per KV scale with --kv-granularity group (default 64)")
    p.add_argument("--rotations", default="none",
                   help="comma-separated residual-stream rotations folded into the weights: none, hadamard, "
                        "orthogonal (QuaRot)")
    p.add_argument("--rotate-values", action="store_true", help="with a rotation: also rotate V/O per head")
    p.add_argument("--rotation-seed", type=int, help="seed of the random rotation (default 0)")
    p.add_argument("--smoothquant-alphas", metavar="A,...",
                   help="SmoothQuant migration strengths in [0, 1] for the activation-quantized rows, 'none' for "
                        "unsmoothed rows too, e.g. none,0.5 (default: none)")
    p.add_argument("--save", action="store_true", help="also write packed quantized checkpoints to RUN_DIR/quantized/")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="the device mesh each checkpoint is sharded over, e.g. data=2,fsdp=4 (default: the run's "
                        "train.mesh where it shards parameters and the devices are there; fsdp=1: one device; "
                        "docs/SCALING.md)")
    p.add_argument("--recovery", action="append", metavar="METHOD:K=V,...",
                   help="also a recovery fine-tuning row per combination (docs/RECOVERY.md), e.g. "
                        "lora:tokens=65536,rank=8,alpha=16,lr=1e-3 or qat:tokens=65536 (repeatable)")
    p.set_defaults(func=cmd_ptq)

    p = sub.add_parser("info", help="the run's config, sizes and finalized checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("presets", help="list the config presets")
    p.set_defaults(func=cmd_presets)

    _add_hf_commands(sub)  # export-hf, import-hf
    _add_grid_commands(sub)  # grid run|status|export|merge
    _add_analysis_commands(sub)  # fit, report
    return parser


def _add_hf_commands(subparsers) -> None:
    p = subparsers.add_parser("export-hf", help="write a checkpoint as a transformers checkpoint (docs/HF.md)",
                              description="Safetensors weights, config.json, generation_config.json and the run's "
                                          "tokenizer, loadable by AutoModelForCausalLM / AutoTokenizer with no "
                                          "custom code: LlamaForCausalLM (MHA/GQA) or DeepseekV3ForCausalLM (MLA "
                                          "and/or DeepSeekMoE). Written to a temporary directory renamed to DIR "
                                          "when whole.")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist, or be empty)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, help="this series checkpoint (default: the newest)")
    which.add_argument("--tokens", type=int, help="the series checkpoint nearest to T tokens")
    which.add_argument("--quantized", metavar="NAME", help="RUN_DIR/quantized/NAME (from `ptq --save`), exported "
                                                           "as its dequantized weights")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weight dtype (auto: the run's param_dtype, or an imported run's source dtypes)")
    p.add_argument("--force", action="store_true", help="replace an existing DIR (once the new one is whole)")
    p.set_defaults(func=cmd_export_hf)

    p = subparsers.add_parser("import-hf", help="make a run directory from a local Llama/DeepseekV3 checkpoint",
                              description="A local transformers checkpoint directory (config.json, safetensors, "
                                          "tokenizer.json) becomes a run directory with one series checkpoint, "
                                          "for eval, ptq and grid branches. Nothing is downloaded.")
    p.add_argument("src", metavar="DIR", help="local checkpoint directory (a snapshot path, not a hub id)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create (must not exist)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of the run's config, e.g. --set data.source=files --set "
                        "'data.paths=[corpus/*.txt]' --set model.compute_dtype=float32 (repeatable)")
    p.add_argument("--step", type=int, help="series step to record the checkpoint at (default 1, or what an "
                                            "efftrain export recorded); train.init_from_step branches from it")
    p.add_argument("--tokens", type=int, help="tokens the model was trained on, recorded as the checkpoint's "
                                              "tokens_seen (default 0, or what an efftrain export recorded)")
    p.set_defaults(func=cmd_import_hf)


def _spec_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", help="override the spec's runs_dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dotted override for every cell (changes the cells' keys), repeatable")


def _add_grid_commands(subparsers) -> None:
    grid = subparsers.add_parser("grid", help="run an experiment grid (train, PTQ-sweep, record)",
                                 description="Experiment grids: a YAML spec expands into cells keyed by config "
                                             "hash; results go to RUNS_DIR/results.sqlite.")
    gsub = grid.add_subparsers(dest="grid_command", required=True, metavar="{run,status,export,merge}")

    p = gsub.add_parser("run", help="train and PTQ-sweep every cell; rerun to resume")
    p.add_argument("spec", help="grid spec YAML (see experiments/)")
    p.add_argument("--workers", type=int, default=1,
                   help="cell families run in N processes (GPUs round-robin): costliest cells first, one replicate of "
                        "every cell before the next, a replicate held while its sibling compiles")
    p.add_argument("--retry-failed", action="store_true", help="also rerun cells that failed before")
    p.add_argument("--only", action="append", metavar="KEY",
                   help="only these cell keys (repeatable, or a,b); they run in the spec's order")
    p.add_argument("--slurm", metavar="OPTS", help="submit one job per unfinished family through submitit, "
                                                   "e.g. partition=gpu,time=2:00:00,gpus=1; with nodes=N>1 "
                                                   "one sbatch job per family trains each cell on N nodes")
    p.add_argument("--train-only", action="store_true",
                   help="only train the main and cooldown cells, in every task of a multi-process launch (the "
                        "srun step of a multi-node job; no results-store writes, no PTQ)")
    p.add_argument("--no-train", action="store_true",
                   help="everything but training: record, average, PTQ; a cell not yet trained fails (the "
                        "second step of a multi-node job)")
    _spec_options(p)
    p.set_defaults(func=cmd_grid_run)

    p = gsub.add_parser("status", help="cells, their status and progress")
    p.add_argument("spec")
    p.add_argument("--json", action="store_true")
    _spec_options(p)
    p.set_defaults(func=cmd_grid_status)

    p = gsub.add_parser("export", help="write a results table as CSV or Parquet")
    p.add_argument("spec")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--out", help="output file (default RUNS_DIR/<table>.<format>)")
    p.add_argument("--table", choices=("ptq", "runs", "checkpoints"), default="ptq")
    _spec_options(p)
    p.set_defaults(func=cmd_grid_export)

    p = gsub.add_parser("merge", help="merge the results stores of a grid run in pieces into one",
                        description="Copy the runs, checkpoints and PTQ rows of each SRC into DEST in one "
                                    "transaction (all or nothing). Rows already in DEST are skipped; rows whose "
                                    "values differ refuse the merge unless --prefer says which side wins. Each "
                                    "cell keeps the further along of its statuses (done > failed > running > "
                                    "pending).")
    p.add_argument("dest", help="results.sqlite, a runs dir or a grid spec (created if missing)")
    p.add_argument("sources", nargs="+", metavar="src", help="results.sqlite or runs dir of a piece (read only)")
    p.add_argument("--prefer", choices=("dest", "source"),
                   help="on rows whose values differ, keep DEST's or take SRC's (default: refuse the merge)")
    p.set_defaults(func=cmd_grid_merge)


def _add_analysis_commands(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit QiD scaling laws (Ouyang, Kumar) with bootstrap CIs",
                              description="Fit QiD = f(N, D, P) to PTQ rows. TABLE: grid spec, results.sqlite, "
                                          "CSV or Parquet (n_params or params_nonembed, tokens, bits, qid).")
    p.add_argument("table", help="grid spec, results.sqlite, CSV or Parquet table of PTQ rows")
    p.add_argument("--law", choices=("ouyang", "kumar", "both"), default="ouyang")
    p.add_argument("--group-by", default="", metavar="COLS", help="comma-separated columns, e.g. method,variant")
    p.add_argument("--filter", action="append", default=[], metavar="EXPR",
                   help="keep rows matching, e.g. method=gptq, bits<=4, schedule!=wsd-cooldown (repeatable)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs (0 = none; "
                                                            "default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fix", action="append", default=[], metavar="PARAM=VALUE",
                   help="hold a parameter fixed, e.g. gamma=5.4967 (repeatable)")
    p.add_argument("--json", action="store_true", help="print the fits as JSON")
    p.add_argument("--predict", action="append", metavar="N,D,P", help="predicted QiD per group (repeatable)")
    p.add_argument("--threshold", type=float, metavar="Q", help="tokens at which QiD reaches Q (needs --at)")
    p.add_argument("--at", metavar="N,P", help="non-embedding params and bits for --threshold")
    p.set_defaults(func=cmd_fit)

    p = subparsers.add_parser("report", help="HTML + Markdown report of a grid's results",
                              description="Writes DIR/report.html (self-contained) and DIR/report.md (+ PNGs).")
    p.add_argument("source", help="grid spec or results.sqlite")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--method", help="PTQ method of the technique comparison (default gptq if present)")
    p.add_argument("--bits", type=int, help="bit width of the technique comparison (default 3 if present)")
    p.add_argument("--baseline", help="variant (cell name) the others are compared with (default: the first "
                                      "cell with every technique off)")
    p.add_argument("--n-boot", type=int, default=300, help="bootstrap resamples")
    p.set_defaults(func=cmd_report)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import absl.logging  # lazy, as everything below (module docstring)

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's informational warnings
    from efftrain.data import DataError
    from efftrain.train.checkpoint import CheckpointError
    from efftrain.train.distributed import DistributedError
    from efftrain.train.loop import Interrupted
    from efftrain.train.rundir import RunDirError

    try:
        return args.func(args)
    except (ConfigError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, CheckpointError, DistributedError, ValueError) as e:
        if os.environ.get("EFFTRAIN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_REQUEUE
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except OSError as e:
        cause = "disk full" if is_disk_full(e) else (e.strerror or str(e))
        print(f"error: {cause} ({e.filename or 'writing'})", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
