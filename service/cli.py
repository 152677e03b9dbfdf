"""``vdib serve`` (the service) and ``vdib stream`` (replay a recording or a DV camera to it)."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the naturalization service (HTTP + websocket + viewer)")
    p.add_argument(
        "--host",
        default=os.environ.get("VDIB_HOST", "127.0.0.1"),
        help="address to bind (default 127.0.0.1 or $VDIB_HOST; 0.0.0.0 for every interface)",
    )
    p.add_argument(
        "--port", type=int, default=_env_int("VDIB_PORT", 8000), help="port (default 8000 or $VDIB_PORT)"
    )
    p.add_argument(
        "--checkpoints", default=None, help="checkpoints directory (default: the shipped checkpoints/)"
    )
    p.add_argument("--engine", choices=("torch", "onnx"), default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.add_argument(
        "--model",
        default=None,
        help="model for every request that names none (default: chosen by the recording's sensor)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads per process (default 1: per-step GEMMs are small; 0 = torch's default)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="server processes on the port, each with its own models and streams (default: $VDIB_WORKERS, "
        "else the number of cores this process may use); metrics merged across them",
    )
    p.set_defaults(func=_serve)

    s = subparsers.add_parser(
        "stream", help="replay a recording (or a DV network stream) to a running service"
    )
    s.add_argument("file", nargs="?", help="event file (any format events.read reads)")
    s.add_argument(
        "--dv",
        default=None,
        metavar="tcp://HOST:PORT",
        help="read a DV NetworkWriter stream instead of a file",
    )
    s.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    s.add_argument("--realtime", action="store_true", help="pace packets to the recording's timestamps")
    s.add_argument("--speed", type=float, default=1.0, help="replay speed factor with --realtime")
    s.add_argument("--model", default=None)
    s.add_argument("--roi", default=None, help="x,y,w,h | centre | full | default")
    s.add_argument("--dt-us", type=int, default=None)
    s.add_argument("--emit", default=None, help="frame every k bins, or 'last'")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--packet-us", type=int, default=10_000, help="event time per packet")
    s.add_argument("--api-key", default=os.environ.get("VDIB_API_KEY"))
    s.add_argument("--out", default=None, help="write the received frames to this .npz")
    s.add_argument("--max-seconds", type=float, default=None, help="stop a --dv stream after this long")
    s.set_defaults(func=_stream)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .settings import Settings
    from .workers import default_workers, tune_gc
    from .workers import run as run_workers

    workers = args.workers if args.workers is not None else _env_int("VDIB_WORKERS", 0) or default_workers()
    if workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    tune_gc()

    overrides: dict[str, object] = {"torch_threads": args.torch_threads}
    if args.checkpoints:
        overrides["checkpoints_dir"] = args.checkpoints
    if args.engine:
        overrides["engine"] = args.engine
    if args.device:
        overrides["device"] = args.device
    if args.model:
        overrides["default_model"] = args.model
    settings = Settings(**overrides)  # type: ignore[arg-type]
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(
        f"vdib service: viewer at http://{host}:{args.port}/  (API docs at /docs, "
        f"checkpoints {settings.checkpoints_dir}, engine {settings.engine}, workers {workers})",
        flush=True,
    )
    from .app import uvicorn_options

    common = dict(host=args.host, port=args.port, log_level=args.log_level, **uvicorn_options(settings))
    if workers > 1:
        # worker processes build their app from the environment: the CLI's choices go through it
        run_workers(workers, {k: str(v) for k, v in overrides.items()}, **common)
    else:
        uvicorn.run(create_app(settings), **common)  # type: ignore[arg-type]
    return 0


def _stream(args: argparse.Namespace) -> int:
    from .client import StreamOptions, replay_dv, replay_file

    if (args.file is None) == (args.dv is None):
        print("give either a FILE or --dv tcp://HOST:PORT", file=sys.stderr)
        return 2
    emit: int | str | None = None
    if args.emit is not None:
        emit = "last" if args.emit == "last" else int(args.emit)
    roi: object = args.roi
    if args.roi and "," in args.roi:
        roi = [int(v) for v in args.roi.split(",")]
    opts = StreamOptions(
        model=args.model, roi=roi, dt_us=args.dt_us, emit=emit, seed=args.seed, api_key=args.api_key
    )
    if args.dv:
        summary = replay_dv(args.url, args.dv, opts, max_seconds=args.max_seconds, progress=True)
    else:
        summary = replay_file(
            args.url,
            args.file,
            opts,
            realtime=args.realtime,
            speed=args.speed,
            packet_us=args.packet_us,
            progress=True,
        )
    if args.out:
        summary.save(args.out)
    print(summary.describe())
    return 0 if summary.ok else 1
