"""The `efftrain` command line.

  efftrain train CONFIG [--set key=value ...] [--out RUN_DIR]   train or resume a run
  efftrain eval RUN_DIR [--step N ...] [--tokens T ...] [--json]  val loss/perplexity per checkpoint
  efftrain ptq RUN_DIR [--methods rtn,gptq,awq] [--bits 2,3,4,8]  QiD of every checkpoint -> ptq.csv
  efftrain info RUN_DIR [--json]                                 the run and its finalized checkpoints
  efftrain presets                                               list the presets in configs/
  efftrain grid run|status|export SPEC                           experiment grids (train x PTQ) -> SQLite
  efftrain fit TABLE [--law ouyang|kumar|both]                   QiD scaling-law fits with bootstrap CIs
  efftrain report SPEC_OR_DB --out DIR                           HTML + Markdown report with plots

Every command exits non-zero with a one-line `error:` cause on bad input. Exit codes (docs/RELIABILITY.md):
0 done; 1 failure (data, checkpoint, disk full, non-finite training); 2 bad config/arguments or an
unusable run directory (incl. one locked by another trainer); 75 interrupted by SIGTERM/SIGINT after
writing a resume checkpoint (requeue and re-run the same command); 130 Ctrl-C outside training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal with a resume checkpoint written; run again


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- commands -------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from efftrain.config import load_config
    from efftrain.train.loop import train

    cfg = load_config(args.config, args.set)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    train(cfg, out, skip_nonfinite=args.skip_nonfinite, fallback=args.fallback)
    return 0


def cmd_eval(args) -> int:
    from efftrain.eval import eval_run

    if args.quantized:
        from efftrain.eval import evaluate_model, val_set
        from efftrain.quant.sweep import load_quantized

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


def cmd_ptq(args) -> int:
    from efftrain.quant.apply import EXPERT_CALIBRATION, METHODS
    from efftrain.quant.formats import FORMATS
    from efftrain.quant.sweep import make_spec, parse_choice_list, parse_int_list, run_ptq_sweep

    fields = {"methods": parse_choice_list(args.methods, "--methods", METHODS),
              "bits": parse_int_list(args.bits, "--bits"),
              "group_sizes": parse_int_list(args.group_size, "--group-size"),
              "formats": parse_choice_list(args.formats, "--formats", FORMATS),
              "symmetric": args.symmetric, "save": args.save,
              "act_order": args.act_order, "quantize_head": args.quantize_head,
              "awq_clip": not args.no_awq_clip, "awq_duo_scaling": args.awq_duo_scaling,
              "expert_calibration": parse_choice_list(args.expert_calibration, "--expert-calibration",
                                                      EXPERT_CALIBRATION, single=True)[0],
              "expert_gate_weighted": args.expert_gate_weighted}
    optional = {"min_expert_tokens": args.min_expert_tokens,
                "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
                "calib_seed": args.calib_seed, "eval_tokens": args.eval_tokens, "eval_seed": args.eval_seed,
                "eval_batches": args.eval_batches}
    fields.update({k: v for k, v in optional.items() if v is not None})  # else the PTQSpec default
    if args.checkpoints != "all":
        fields["checkpoints"] = parse_int_list(args.checkpoints, "--checkpoints")
    run_ptq_sweep(args.run_dir, make_spec(**fields))
    return 0


def cmd_info(args) -> int:
    from efftrain.train.checkpoint import CheckpointStore
    from efftrain.train.loop import load_run_config

    run_dir = Path(args.run_dir)
    cfg = load_run_config(run_dir)
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    store = CheckpointStore(run_dir, read_only=True)
    series = store.series()
    resume = [store.meta("resume", s) for s in store.steps("resume")]
    store.close()
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
    print(f"  series checkpoints ({len(series)}):")
    print(_table(series, [("step", "step", "d"), ("tokens_seen", "tokens", ",d"),
                          ("target_tokens", "target", ",d"), ("val_loss", "val_loss", ".4f"),
                          ("wall_time_s", "wall_s", ".1f")]))
    if resume:
        print(f"  resume checkpoint: step {resume[-1]['step']} ({resume[-1]['tokens_seen']:,} tokens)")
    return 0


def cmd_presets(args) -> int:
    from efftrain.config import list_presets, load_config

    for name in list_presets():
        c = load_config(name)
        m = c.model
        techniques = [t for t, on in (("mla", m.attention == "mla"), ("moe", m.moe.enabled),
                                      (f"mtp{m.mtp.depth}", m.mtp.depth > 0), ("fp8", c.fp8.enabled)) if on]
        print(f"{name:18s} d{m.d_model} L{m.n_layers} vocab {m.vocab_size} seq {c.data.seq_len}  "
              f"{'+'.join(techniques) or 'dense'}")
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
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("ptq", help="quantize every series checkpoint; append QiD rows to RUN_DIR/ptq.csv")
    p.add_argument("run_dir")
    p.add_argument("--methods", default="rtn,gptq,awq", help="comma-separated: rtn, gptq, awq, awq-linear "
                                                             "(docs/PTQ.md)")
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
    p.add_argument("--save", action="store_true", help="also write packed quantized checkpoints to RUN_DIR/quantized/")
    p.set_defaults(func=cmd_ptq)

    p = sub.add_parser("info", help="the run's config, sizes and finalized checkpoints")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("presets", help="list the config presets")
    p.set_defaults(func=cmd_presets)

    from efftrain.analysis.commands import register as register_analysis
    from efftrain.grid.commands import register as register_grid

    register_grid(sub)  # grid run|status|export
    register_analysis(sub)  # fit, report
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import absl.logging

    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax's informational warnings
    from efftrain.config import ConfigError
    from efftrain.train.checkpoint import CheckpointError
    from efftrain.train.checkpoint import is_disk_full
    from efftrain.train.loop import Interrupted, RunDirError

    try:
        from efftrain.data import DataError
    except ImportError:  # pragma: no cover
        DataError = ConfigError
    try:
        return args.func(args)
    except (ConfigError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, CheckpointError, ValueError) as e:
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
