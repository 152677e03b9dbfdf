"""Benchmark of general-scene reconstruction: every method side by side in one run.

Scores (EVREAL standard protocol, raw and histogram-matched SSIM/MSE), ms per frame on one core,
parameters, MACs per frame, and for the VDIB scene model spikes and SynOps per frame, on the ECD
slider_depth excerpt, the DAVIS346 clip with its APS frames, and the simulated test set. Writes
bench/results/scenes.json, bench/results/scenes.md and docs/results/scenes/<test set>.png.

Run: ``.venv/bin/python bench/scenes.py`` (a few minutes on the 2-core dev machine; PIE-Net needs
``.venv/bin/pip install --no-deps event-pienet``). ``--quick`` skips the timing runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import scene_eval as se  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--checkpoint", type=Path, default=None, help="scene checkpoint (default checkpoints/scenes)"
    )
    ap.add_argument("--methods", default=",".join(se.METHOD_ORDER))
    ap.add_argument("--sets", default="ecd,davis346,simulated")
    ap.add_argument("--sim-clips", type=int, default=8)
    ap.add_argument("--sim-seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per sequence, best kept")
    ap.add_argument("--quick", action="store_true", help="no timing runs")
    ap.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench" / "results" / "scenes",
        help="path prefix for .json and .md",
    )
    ap.add_argument("--montages", type=Path, default=ROOT / "docs" / "results" / "scenes")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    test_sets = se.default_test_sets(
        [s for s in args.sets.split(",") if s], sim_n=args.sim_clips, sim_seed=args.sim_seed, log=log
    )
    if not test_sets:
        log("no test set available")
        return 1
    methods, skipped = se.build_methods([m for m in args.methods.split(",") if m], checkpoint=args.checkpoint)
    for k, v in skipped.items():
        log(f"skipped {k}: {v}")
    report, recons = se.run_benchmark(
        methods,
        test_sets,
        timing=not args.quick,
        repeats=args.repeats,
        progress=not args.no_progress,
        skipped=skipped,
    )
    report["command"] = "python bench/scenes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out_json = args.out.with_suffix(".json")
    out_md = args.out.with_suffix(".md")
    se.write_report(report, out_json, out_md)
    for p in se.write_montages(report, recons, test_sets, args.montages):
        log(f"wrote {p}")
    log(f"wrote {out_json} and {out_md}")
    print(se.markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
