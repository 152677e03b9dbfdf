"""``vdib train``, ``vdib train-judge``, ``vdib evaluate`` and the experiment grids: the training package's commands.

Heavy imports (torch, the trainer) stay inside the command functions so ``vdib --help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a VDIB naturalizer from a TOML config")
    p.add_argument("config", type=Path, help="TOML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, dotted keys (e.g. --set train.examples=2000); repeatable",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the run in run_dir from its last checkpoint"
    )
    p.add_argument("--run-dir", type=Path, default=None, help="run directory (default: from the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    j = subparsers.add_parser("train-judge", help="train the LeNet-5 judge on MNIST")
    j.add_argument("--data", type=Path, default=None, help="MNIST idx folder (default ../shared/data/mnist)")
    j.add_argument("--out", type=Path, default=None, help="output folder (default checkpoints/judge)")
    j.add_argument("--epochs", type=int, default=None)
    j.add_argument("--train-limit", type=int, default=10_000, help="training digits used (0 = all)")
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--threads", type=int, default=None, help="torch threads")
    j.add_argument("--no-progress", action="store_true")
    j.set_defaults(func=_cmd_train_judge)

    t = subparsers.add_parser("table1", help="train the paper's Table 1 grid and write table1.{md,json,png}")
    t.add_argument("--examples", type=int, default=200_000)
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--rules", nargs="+", choices=["vdib", "vdib-bptt"], default=["vdib", "vdib-bptt"])
    t.add_argument("--encodings", nargs="+", choices=["rate", "ttfs"], default=["rate", "ttfs"])
    t.add_argument("--decodings", nargs="+", choices=["time", "rate"], default=["time", "rate"])
    t.add_argument("--train-limit", type=int, default=0, help="training digits (0 = all at hand)")
    t.add_argument("--root", type=Path, default=None, help="run directories (default runs/table1)")
    t.add_argument("--out", type=Path, default=None, help="tables and plot (default: the root)")
    t.add_argument(
        "--variant", default="", help="name of these cells in the tables (e.g. vdib-lr); default the rule"
    )
    t.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    t.add_argument("--collect-only", action="store_true")
    t.add_argument("--progress", action="store_true")
    t.set_defaults(func=_cmd_table1)

    dv = subparsers.add_parser(
        "dvs-dt",
        help="MNIST-DVS at several bin widths dt: train the default config per dt, "
        "write dvs-dt.{md,json,png}",
    )
    dv.add_argument("--dts", type=float, nargs="+", default=[10, 25, 50], help="bin widths in ms")
    dv.add_argument("--train-digits", type=int, default=5000, help="simulated training digits")
    dv.add_argument("--test-digits", type=int, default=1000, help="simulated test digits")
    dv.add_argument("--examples", type=int, default=150_000, help="training examples per dt")
    dv.add_argument(
        "--window-ms", type=float, default=600.0, help="training window (data.crop_T = window / dt)"
    )
    dv.add_argument("--root", type=Path, default=None, help="run directories (default runs/dvs-dt)")
    dv.add_argument("--out", type=Path, default=None, help="tables and plot (default: the root)")
    dv.add_argument(
        "--workers", type=int, default=None, help="processes simulating the digits (default: all cores)"
    )
    dv.add_argument("--jobs", type=int, default=1, help="dt cells trained in parallel processes")
    dv.add_argument(
        "--real",
        type=Path,
        default=None,
        help="real MNIST-DVS recordings for the sanity check (default ../shared/data/events/aedat2)",
    )
    dv.add_argument(
        "--set", dest="extra", action="append", default=[], help="extra config override (every dt)"
    )
    dv.add_argument("--no-progress", action="store_true")
    dv.set_defaults(func=_cmd_dvs_dt)

    b = subparsers.add_parser("predictive", help="predictive-coding study (paper Figure 2): lag and β sweeps")
    b.add_argument("--lags", type=int, nargs="+", default=list(range(-4, 5)))
    b.add_argument("--betas", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0])
    b.add_argument("--examples", type=int, default=50_000)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", type=Path, default=None, help="default runs/predictive")
    b.add_argument(
        "--kl-reduction",
        choices=["mean", "sum"],
        default="mean",
        help="ℓ_e divided by T·N_Y (authors' code) or summed (eq. 10)",
    )
    b.add_argument("--name", default="predictive", help="output file stem")
    b.add_argument("--progress", action="store_true")
    b.set_defaults(func=_cmd_predictive)

    ab = subparsers.add_parser("ablation", help="the vdib rule's fixes switched on in turn")
    ab.add_argument("--examples", type=int, default=200_000)
    ab.add_argument("--encoding", choices=["rate", "ttfs"], default="ttfs")
    ab.add_argument("--decoding", choices=["time", "rate"], default="time")
    ab.add_argument("--seed", type=int, default=0)
    ab.add_argument("--root", type=Path, default=None)
    ab.add_argument("--out", type=Path, default=None, help="default: the root (runs/ablation)")
    ab.add_argument("--progress", action="store_true")
    ab.set_defaults(func=_cmd_ablation)

    ts = subparsers.add_parser(
        "tsne", help="t-SNE of readout spike windows of several checkpoints (Figure 3)"
    )
    ts.add_argument("checkpoints", nargs="+", help="LABEL=CHECKPOINT_DIR")
    ts.add_argument("--n", type=int, default=1000)
    ts.add_argument("--data", type=Path, default=None)
    ts.add_argument("--out", type=Path, default=None, help="PNG (default runs/tsne/tsne.png)")
    ts.set_defaults(func=_cmd_tsne)

    tv = subparsers.add_parser(
        "time-vs-rate", help="time minus rate decoding versus budget and tau_d (tables + plot)"
    )
    tv.add_argument(
        "--cells",
        type=Path,
        nargs="+",
        default=None,
        help="Table 1 cell lines (default docs/results/table1-cells.jsonl + table1-vdib-lr-cells.jsonl)",
    )
    tv.add_argument(
        "--tau-cells",
        type=Path,
        default=None,
        help="tau_d sweep cells (default docs/results/time_vs_rate-tau-cells.jsonl)",
    )
    tv.add_argument("--out", type=Path, default=None, help="default runs/time-vs-rate")
    tv.set_defaults(func=_cmd_time_vs_rate)

    x = subparsers.add_parser(
        "export", help="re-store a checkpoint as float16/bfloat16/int8/int4 and re-measure it"
    )
    x.add_argument("src", type=Path, help="checkpoint directory")
    x.add_argument("dst", type=Path, help="new checkpoint directory")
    x.add_argument("--weights", choices=["float32", "float16", "bfloat16", "int8", "int4"], default="int4")
    x.add_argument("--title", default=None, help="model card title")
    x.add_argument("--notes", default="", help="model card paragraph")
    x.add_argument("--limit", type=int, default=None, help="evaluate on the first N test items only")
    x.add_argument("--data", type=Path, default=None)
    x.set_defaults(func=_cmd_export)

    e = subparsers.add_parser(
        "evaluate", help="evaluate a naturalizer checkpoint (judge accuracy, MSE, SSIM)"
    )
    e.add_argument("checkpoint", type=Path, help="naturalizer checkpoint directory")
    e.add_argument(
        "--data",
        type=Path,
        default=None,
        help="MNIST idx folder (image checkpoints) or MNIST-DVS recordings folder",
    )
    e.add_argument("--judge", type=Path, default=None, help="judge checkpoint (default checkpoints/judge)")
    e.add_argument("--limit", type=int, default=None, help="evaluate on the first N test items only")
    e.add_argument("--out", type=Path, default=None, help="results directory (markdown, JSON, plots)")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=500)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_evaluate)

    from .scene_cli import register as register_scenes  # vdib scenes evaluate / train

    register_scenes(subparsers)


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .trainer import load_config, train

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        raise SystemExit(f"vdib train: {exc}") from None
    if args.run_dir is not None:
        cfg.run.dir = str(args.run_dir)
    if not cfg.run.command:
        import shlex

        cfg.run.command = "vdib " + shlex.join(sys.argv[1:])
    result = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(result.get("final_eval", {}), indent=None))
    return 0


def _cmd_train_judge(args: argparse.Namespace) -> int:
    import time

    import torch

    from .judge import (
        JudgeConfig,
        default_judge_dir,
        hardware_string,
        load_mnist_tensors,
        save_judge,
        train_judge,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = JudgeConfig(seed=args.seed, train_limit=args.train_limit or None)
    if args.epochs:
        cfg.epochs = args.epochs
    t0 = time.perf_counter()
    trx, tr_y, tex, te_y, trf, tef = load_mnist_tensors(args.data, cfg.train_limit)
    model, metrics = train_judge(trx, tr_y, tex, te_y, cfg, progress=not args.no_progress)
    out = args.out or default_judge_dir()
    cmd = (
        "vdib train-judge"
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + (f" --seed {args.seed}" if args.seed else "")
    )
    prov = {"train_files": trf, "test_files": tef, "hardware": hardware_string(), "command": cmd}
    save_judge(out, model, cfg, metrics, prov)
    print(
        json.dumps(
            {
                "test_accuracy": metrics["test_accuracy"],
                "train_seconds": metrics["train_seconds"],
                "total_seconds": round(time.perf_counter() - t0, 1),
                "out": str(out),
            }
        )
    )
    return 0


def _cmd_table1(args: argparse.Namespace) -> int:
    import itertools

    from .studies.common import RUNS, GridCell
    from .studies.table1 import collect, run_cell

    root = args.root or RUNS / "table1"
    out = args.out or root
    if not args.collect_only:
        for seed, rule, enc, dec in itertools.product(args.seeds, args.rules, args.encodings, args.decodings):
            cell = GridCell(enc, dec, rule, seed, variant=args.variant, overrides=tuple(args.extra))
            print(
                json.dumps(run_cell(root, cell, args.examples, args.train_limit, args.progress)), flush=True
            )
            collect(root, out)
    collect(root, out)
    print(f"wrote {out / 'table1.md'}")
    return 0


def _cmd_dvs_dt(args: argparse.Namespace) -> int:
    import os
    import shlex

    from .studies.common import RUNS
    from .studies.dvs_dt import REAL_MNIST_DVS, dvs_dt_study

    if args.jobs < 1 or (args.workers is not None and args.workers < 1):
        raise SystemExit("vdib dvs-dt: --jobs and --workers must be >= 1")
    if min(args.train_digits, args.test_digits, args.examples) < 1:
        raise SystemExit("vdib dvs-dt: --train-digits, --test-digits and --examples must be >= 1")
    root = args.root or RUNS / "dvs-dt"
    res = dvs_dt_study(
        args.dts,
        root,
        args.out or root,
        args.train_digits,
        args.test_digits,
        args.examples,
        args.window_ms,
        args.extra,
        args.workers or os.cpu_count() or 1,
        args.jobs,
        args.real or REAL_MNIST_DVS,
        progress=not args.no_progress,
        command="vdib " + shlex.join(sys.argv[1:]),
        log=lambda m: print(m, flush=True),
    )
    print(
        json.dumps([{k: r.get(k) for k in ("dt_ms", "judge_accuracy", "ssim", "mse")} for r in res["rows"]])
    )
    return 0


def _cmd_time_vs_rate(args: argparse.Namespace) -> int:
    from .studies.common import RESULTS, RUNS
    from .studies.time_vs_rate import time_vs_rate

    cells = args.cells or [
        p for p in (RESULTS / "table1-cells.jsonl", RESULTS / "table1-vdib-lr-cells.jsonl") if p.is_file()
    ]
    if not cells:
        raise SystemExit("vdib time-vs-rate: no cell records (--cells)")
    tau = args.tau_cells or (RESULTS / "time_vs_rate-tau-cells.jsonl")
    out = args.out or RUNS / "time-vs-rate"
    res = time_vs_rate(cells[0], out, tau if tau.is_file() else None, cells[1:])
    print(
        json.dumps(
            {
                k: [(r["encoding"], r["rule"], r["key"], r["time_minus_rate"]) for r in v]
                for k, v in res.items()
            }
        )
    )
    print(f"wrote {out / 'time_vs_rate.md'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import main

    argv = [str(args.src), str(args.dst), "--weights", args.weights, "--notes", args.notes]
    argv += ["--title", args.title] if args.title else []
    argv += ["--limit", str(args.limit)] if args.limit is not None else []
    argv += ["--data", str(args.data)] if args.data is not None else []
    return main(argv)


def _cmd_predictive(args: argparse.Namespace) -> int:
    from .studies.common import RUNS
    from .studies.predictive import predictive_study

    res = predictive_study(
        args.lags,
        args.betas,
        args.examples,
        args.seed,
        args.out or RUNS / "predictive",
        progress=args.progress,
        kl_reduction=args.kl_reduction,
        name=args.name,
    )
    print(
        json.dumps(
            {
                "lags": [(r["lag"], r["accuracy"]) for r in res["lags"]],
                "betas": [(r["beta"], r["spike_rate"]) for r in res["betas"]],
            }
        )
    )
    return 0


def _cmd_ablation(args: argparse.Namespace) -> int:
    from .studies.ablation import ablation
    from .studies.common import RUNS

    root = args.root or RUNS / "ablation"
    rows = ablation(
        root, args.out or root, args.examples, args.encoding, args.decoding, args.seed, progress=args.progress
    )
    print(json.dumps(rows))
    return 0


def _cmd_tsne(args: argparse.Namespace) -> int:
    from .studies.tsne import tsne_figure

    pairs = [
        (c.split("=", 1)[0], Path(c.split("=", 1)[1])) if "=" in c else (Path(c).name, Path(c))
        for c in args.checkpoints
    ]
    from .studies.common import RUNS

    print(json.dumps(tsne_figure(pairs, args.out or RUNS / "tsne" / "tsne.png", args.n, args.data)))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        judge_dir=args.judge,
        limit=args.limit,
        out_dir=args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress and not args.json,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            if not isinstance(v, dict | list):
                print(f"{k}: {v}", file=sys.stdout)
    return 0
