"""``vdib model ...``: inspect checkpoints, export ONNX, write a random tiny checkpoint."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("model", help="inspect, export and create model checkpoints")
    sub = p.add_subparsers(dest="model_command", metavar="ACTION")

    info = sub.add_parser("info", help="print a checkpoint's config, metrics and parameter counts as JSON")
    info.add_argument("checkpoint", help="checkpoint directory (weights.safetensors + config.json)")
    info.set_defaults(func=_info)

    exp = sub.add_parser("export-onnx", help="export the one-step encoder and the decoder to ONNX")
    exp.add_argument("checkpoint")
    exp.add_argument("out_dir")
    exp.add_argument("--check", action="store_true", help="step both engines 20 times and compare")
    exp.set_defaults(func=_export)

    tiny = sub.add_parser("tiny", help="write a random-weight tiny checkpoint (for demos and tests)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--input-shape", default="2,26,26", help="C,H,W (default 2,26,26)")
    tiny.add_argument("--hidden", default="32", help="comma-separated hidden sizes ('' for none)")
    tiny.add_argument("--n-readout", type=int, default=16)
    tiny.add_argument("--tau-d", type=int, default=8)
    tiny.add_argument("--decoder", default="linear")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_tiny)
    p.set_defaults(func=_usage(p))


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, load_checkpoint

    try:
        model, meta = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}")
        return 1
    counts = {
        "encoder": sum(p.numel() for p in model.encoder.parameters()),
        "decoder": sum(p.numel() for p in model.decoder.parameters()),
    }
    out: dict[str, object] = {
        k: meta[k]
        for k in (
            "format_version",
            "model",
            "training",
            "metrics",
            "provenance",
            "code_version",
            "created_utc",
        )
        if k in meta
    }
    out["parameters"] = counts
    print(json.dumps(out, indent=2))
    return 0


def _export(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .checkpoint import CheckpointError, load_checkpoint
    from .onnx_export import OnnxEngine, export_onnx

    try:
        model, _ = load_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}")
        return 1
    paths = export_onnx(model, args.out_dir)
    for k, v in paths.items():
        print(f"{k}: {v}")
    if args.check:
        eng = OnnxEngine(args.out_dir)
        n_in, n_ro = model.config.encoder.n_inputs, model.config.encoder.n_readout
        g = torch.Generator().manual_seed(0)
        st_t, st_o = model.encoder.init_state(1), eng.init_state(1)
        worst, same = 0.0, True
        for _ in range(20):
            x = (torch.rand(1, n_in, generator=g) < 0.05).float()
            uni = torch.rand(1, n_ro, generator=g)
            with torch.no_grad():
                y_t, u_t, st_t = model.encoder.step_detailed(x, st_t, uni)
            y_o, u_o, _, st_o = eng.step(x.numpy(), st_o, uni.numpy())
            worst = max(worst, float(np.abs(u_o - u_t.numpy()).max()))
            same = same and bool((y_o == y_t.numpy()).all())
        print(f"parity over 20 steps: max |du| = {worst:.2e}, identical spikes: {same}")
        return 0 if same and worst <= 1e-4 else 1
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from .checkpoint import save_checkpoint
    from .testing import tiny_naturalizer

    shape = tuple(int(v) for v in args.input_shape.split(","))
    hidden = tuple(int(v) for v in args.hidden.split(",") if v.strip())
    nat = tiny_naturalizer(
        input_shape=shape,  # type: ignore[arg-type]
        hidden=hidden,
        n_readout=args.n_readout,
        tau_d=args.tau_d,
        decoder=args.decoder,
        seed=args.seed,
    )
    out = save_checkpoint(
        args.out_dir,
        nat,
        {"rule": None, "note": "random weights, not trained"},
        {},
        {"data": None, "generator": "model.testing.tiny_naturalizer", "seed": args.seed},
    )
    print(f"wrote {out}")
    return 0


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """A command that prints ``parser``'s help and fails (a group called without its sub-command)."""

    def run(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return run
