"""``vdib scenes ...``: the general-scene naturalizer's commands (evaluation here; training joins later).

Registered from :func:`training.cli.register`; heavy imports stay inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    sc = subparsers.add_parser(
        "scenes", help="general-scene reconstruction: evaluate (and train) the scene model"
    )
    sub = sc.add_subparsers(dest="scenes_command", metavar="SCENES_COMMAND")
    sc.set_defaults(func=lambda args: (sc.print_help(), 2)[1])

    ev = sub.add_parser(
        "evaluate",
        help="score the scene model and every baseline on real DAVIS frames and simulated clips (EVREAL std)",
        description="EVREAL standard protocol (SSIM, MSE; raw and histogram-matched) on the ECD slider_depth "
        "excerpt, the DAVIS346 clip with its APS frames, and the simulated test set; the "
        "mid-gray floor, direct integration, the high-pass filter and PIE-Net(-Lite) side by "
        "side, with ms/frame on one core, parameters, MACs, spikes and SynOps per frame.",
    )
    ev.add_argument(
        "checkpoint",
        type=Path,
        nargs="?",
        default=None,
        help="scene checkpoint directory (default checkpoints/scenes; skipped when absent)",
    )
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")
    ev.add_argument(
        "--out", type=Path, default=None, help="directory for scenes.json, scenes.md and montage PNGs"
    )
    ev.add_argument(
        "--methods",
        default=",".join(_method_order()),
        help="comma-separated methods (vdib, mid-gray, direct, hpf, pienet, pienet-lite)",
    )
    ev.add_argument("--sets", default="ecd,davis346,simulated", help="comma-separated test sets")
    ev.add_argument("--sim-clips", type=int, default=8, help="simulated test clips")
    ev.add_argument("--sim-seed", type=int, default=0)
    ev.add_argument("--no-timing", action="store_true", help="skip the one-core timing runs")
    ev.add_argument("--repeats", type=int, default=2, help="timed runs per sequence (best is kept)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_cmd_evaluate)

    tr = sub.add_parser(
        "train",
        help="train the scene model (vdib-bptt) on simulated scenes from bundled images",
        description="Simulated clips (training.scene_data) are generated into a cache by worker processes "
        "while the trainer samples random crops from them; checkpoints best/last/final under --out.",
    )
    tr.add_argument("--out", default="runs/scenes")
    tr.add_argument("--cache-dir", default="runs/scene-cache")
    tr.add_argument("--minutes", type=float, default=100.0, help="optimisation budget (wall clock)")
    tr.add_argument("--batch", type=int, default=8)
    tr.add_argument("--workers", type=int, default=1, help="simulator processes filling the clip cache")
    tr.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from .scene_train import main as train_main

    return train_main(
        [
            "--out",
            args.out,
            "--cache-dir",
            args.cache_dir,
            "--minutes",
            str(args.minutes),
            "--batch",
            str(args.batch),
            "--workers",
            str(args.workers),
            "--threads",
            str(args.threads),
            "--seed",
            str(args.seed),
        ]
    )


def _method_order() -> tuple[str, ...]:
    return ("vdib", "mid-gray", "direct", "hpf", "pienet", "pienet-lite")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import scene_eval as se

    def log(msg: str) -> None:
        sys.stderr.write(msg + "\n")

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in _method_order()]
    if unknown:
        log(f"unknown method(s): {', '.join(unknown)}; known: {', '.join(_method_order())}")
        return 2
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    try:
        test_sets = se.default_test_sets(sets, sim_n=args.sim_clips, sim_seed=args.sim_seed, log=log)
    except se.SceneEvalError as exc:
        log(str(exc))
        return 2
    if not test_sets:
        log("no test set is available (../shared/data missing and no simulated clips)")
        return 1
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        log(f"no checkpoint directory at {args.checkpoint}")
        return 2
    methods, skipped = se.build_methods(names, checkpoint=args.checkpoint)
    for k, v in skipped.items():
        log(f"method {k} skipped: {v}")
    if args.checkpoint is not None and "vdib" in skipped:
        return 1
    report, recons = se.run_benchmark(
        methods,
        test_sets,
        timing=not args.no_timing,
        repeats=args.repeats,
        progress=not args.no_progress,
        skipped=skipped,
    )
    if args.out is not None:
        se.write_report(report, args.out / "scenes.json", args.out / "scenes.md")
        for p in se.write_montages(report, recons, test_sets, args.out):
            log(f"wrote {p}")
    if args.json:
        sys.stdout.write(json.dumps(report, default=float) + "\n")
    else:
        sys.stdout.write(se.markdown(report))
    return 0
