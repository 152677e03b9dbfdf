"""``vdib events info|convert|render`` and ``vdib simulate mnist-dvs``.

Bad input files (``EventFormatError``) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MNIST = REPO_ROOT / ".." / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"

# The viewer's colours (service/render.py ``event_rgb``, the live page's "events" panel): on
# events green, off events red, both at one pixel yellow, on black.
ON_RGB = (0, 255, 0)
OFF_RGB = (255, 0, 0)
BOTH_RGB = (255, 255, 0)
BG_RGB = (0, 0, 0)
ROI_RGB = (80, 160, 255)  # the --roi box
TEXT_RGB = (230, 230, 230)
#: height of the legend strip under a rendered sheet or GIF frame
LEGEND_H = 18


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ev = subparsers.add_parser("events", help="inspect, convert and render event recordings")
    sub = ev.add_subparsers(dest="events_command", metavar="SUBCOMMAND")
    ev.set_defaults(func=_usage(ev))

    p = sub.add_parser("info", help="format, sensor, event count, duration, rates")
    p.add_argument("file")
    p.add_argument("--format", default=None, help="skip sniffing (aedat2, aedat4, evt3, ...)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)

    p = sub.add_parser("convert", help="write a recording as AEDAT 4 (.aedat4) or .npz")
    p.add_argument("file")
    p.add_argument("out", help="OUT.aedat4 or OUT.npz")
    p.add_argument("--format", default=None)
    p.add_argument("--compression", default="lz4", choices=["lz4", "lz4_high", "zstd", "zstd_high", "none"])
    p.set_defaults(func=_convert)

    p = sub.add_parser(
        "render",
        help="accumulated event frames as PNG (grid) or GIF (animation), in the viewer's "
        "colours (on green, off red, both yellow) with a legend",
    )
    p.add_argument("file")
    p.add_argument("out", help="OUT.png or OUT.gif")
    p.add_argument("--format", default=None)
    p.add_argument("--dt-ms", type=float, default=50.0, help="window per frame (default 50 ms)")
    p.add_argument("--frames", type=int, default=12, help="PNG: windows spread over the recording")
    p.add_argument("--max-frames", type=int, default=400, help="GIF: at most this many frames")
    p.add_argument("--scale", type=int, default=0, help="pixel magnification (0 = automatic)")
    p.add_argument("--roi", default=None, help="x,y,w,h or 'mnist-dvs': draw this box")
    p.set_defaults(func=_render)

    sim = subparsers.add_parser("simulate", help="simulate DVS recordings")
    ssub = sim.add_subparsers(dest="simulate_command", metavar="SUBCOMMAND")
    sim.set_defaults(func=_usage(sim))
    p = ssub.add_parser("mnist-dvs", help="MNIST-DVS-like AEDAT 4 recordings from MNIST digits")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, required=True, help="number of recordings (per scale)")
    p.add_argument("--scale", type=int, nargs="+", default=[4], choices=[4, 8, 16])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first MNIST index")
    p.add_argument("--duration-s", type=float, default=2.0)
    p.add_argument(
        "--mnist",
        default=None,
        help=f"MNIST images idx(.gz); labels beside it (default {DEFAULT_MNIST} when present)",
    )
    p.set_defaults(func=_simulate_mnist_dvs)

    p = ssub.add_parser(
        "compare", help="statistics of simulated MNIST-DVS recordings next to real recordings"
    )
    p.add_argument("real", nargs="+", help="real MNIST-DVS recordings (any readable format)")
    p.add_argument("--n", type=int, default=20, help="simulated recordings per real one")
    p.add_argument("--digit", type=int, default=None, help="simulate this digit (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mnist", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_compare)


def _fail(msg: str, code: int = 2) -> int:
    print(f"vdib: error: {msg}", file=sys.stderr)
    return code


def _read(args: argparse.Namespace) -> Any:
    import events

    return events.read(args.file, format=args.format)


def _guarded(fn: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int]:
    """Map bad input to exit code 2 (and I/O problems to 1) without a traceback."""

    def run(args: argparse.Namespace) -> int:
        from events import EventFormatError

        try:
            return int(fn(args) or 0)
        except BrokenPipeError:  # output piped into `head` and closed: not an error
            sys.stderr.close()
            return 0
        except EventFormatError as exc:
            return _fail(str(exc), 2)
        except ValueError as exc:
            return _fail(str(exc), 2)
        except OSError as exc:
            return _fail(str(exc), 1)

    run.__name__ = fn.__name__
    return run


def summary(rec: Any) -> dict[str, Any]:
    """What ``vdib events info`` prints: format, sensor, counts, duration, mean and peak rate."""

    ev = rec.events
    n = len(ev)
    dur_us = rec.duration_us
    out: dict[str, Any] = {
        "format": rec.format,
        "width": int(rec.width),
        "height": int(rec.height),
        "events": int(n),
        "duration_s": dur_us / 1e6,
        "t_first_us": int(ev["t"][0]) if n else None,
        "t_last_us": int(ev["t"][-1]) if n else None,
        "mean_rate_ev_s": (n / (dur_us / 1e6)) if dur_us > 0 else None,
        "peak_rate_ev_s_10ms": None,
        "on_fraction": float(ev["p"].mean()) if n else None,
    }
    if n:
        from events.simulate import peak_rate

        out["peak_rate_ev_s_10ms"] = peak_rate(ev["t"], 10_000)
    camera = rec.metadata.get("camera") if isinstance(rec.metadata, dict) else None
    if camera:
        out["camera"] = camera
    out["metadata"] = rec.metadata
    return out


@_guarded
def _info(args: argparse.Namespace) -> int:
    rec = _read(args)
    s = summary(rec)
    if args.json:
        print(json.dumps(s, default=str))
        return 0

    def rate(v: float | None) -> str:
        return "-" if v is None else f"{v / 1e3:,.1f} kev/s"

    print(f"file      {args.file}")
    print(f"format    {s['format']}" + (f"  ({s['camera']})" if s.get("camera") else ""))
    print(f"sensor    {s['width']} x {s['height']}")
    print(f"events    {s['events']:,}" + (f"  ({s['on_fraction']:.1%} on)" if s["events"] else ""))
    print(f"duration  {s['duration_s']:.6f} s")
    print(f"rate      mean {rate(s['mean_rate_ev_s'])}, peak {rate(s['peak_rate_ev_s_10ms'])} (10 ms)")
    skipped = rec.metadata.get("skipped") if isinstance(rec.metadata, dict) else None
    if skipped:
        print(f"skipped   {skipped}")
    return 0


@_guarded
def _convert(args: argparse.Namespace) -> int:
    import events

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".aedat4", ".npz"):
        return _fail(f"output must end in .aedat4 or .npz, not {out.name!r}")
    rec = _read(args)
    if suffix == ".aedat4":
        events.write_aedat4(out, rec.events, rec.width, rec.height, compression=args.compression)
    else:
        events.write_npz(out, rec.events, rec.width, rec.height)
    print(f"wrote {out} ({len(rec.events):,} events, {rec.width}x{rec.height})")
    return 0


def event_image(ev: Any, width: int, height: int) -> Any:
    """RGB uint8 [H, W, 3] in the viewer's colours: black, green where an ON event fell, red
    where an OFF event fell, yellow where both did (presence, as the viewer draws a frame)."""
    import numpy as np

    pix = ev["y"].astype(np.int64) * width + ev["x"]
    on = np.bincount(pix[ev["p"] == 1], minlength=width * height).reshape(height, width) > 0
    off = np.bincount(pix[ev["p"] != 1], minlength=width * height).reshape(height, width) > 0
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BG_RGB
    img[on] = ON_RGB
    img[off] = OFF_RGB
    img[on & off] = BOTH_RGB
    return img


def legend(width: int, roi: bool = False) -> Any:
    """A strip naming the colours (and the ROI box when drawn), ``width`` pixels wide."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (max(width, 1), LEGEND_H), BG_RGB)
    draw = ImageDraw.Draw(img)
    x = 4
    items: list[tuple[tuple[int, int, int], str, bool]] = [
        (ON_RGB, "on", True),
        (OFF_RGB, "off", True),
        (BOTH_RGB, "on+off", True),
    ]
    if roi:
        items.append((ROI_RGB, "roi", False))
    for colour, label, filled in items:
        box = [x, 4, x + 9, 13]
        draw.rectangle(box, fill=colour if filled else None, outline=colour)
        x += 13
        draw.text((x, 3), label, fill=TEXT_RGB)
        x += int(draw.textlength(label)) + 10
    return img


def _with_legend(img: Any, roi: bool) -> Any:
    from PIL import Image

    out = Image.new("RGB", (img.width, img.height + LEGEND_H), BG_RGB)
    out.paste(img, (0, 0))
    out.paste(legend(img.width, roi), (0, img.height))
    return out


def _windows(rec: Any, dt_us: int, count: int | None) -> list[tuple[int, int]]:
    """Window start/end times: ``count`` windows spread evenly, or all consecutive ones."""
    import numpy as np

    ev = rec.events
    if len(ev) == 0:
        return [(0, dt_us)]
    t0, t1 = int(ev["t"][0]), int(ev["t"][-1])
    if count is None:
        return [(s, s + dt_us) for s in range(t0, t1 + 1, dt_us)]
    starts = np.linspace(t0, max(t0, t1 - dt_us + 1), count).astype(np.int64)
    return [(int(s), int(s) + dt_us) for s in np.unique(starts)]


def _frame(rec: Any, start: int, end: int, scale: int, roi: tuple[int, ...] | None, label: str) -> Any:
    import numpy as np
    from PIL import Image, ImageDraw

    t = rec.events["t"]
    a, b = np.searchsorted(t, [start, end])
    img = Image.fromarray(event_image(rec.events[a:b], rec.width, rec.height))
    img = img.resize((rec.width * scale, rec.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)
    if roi:
        x, y, w, h = roi
        draw.rectangle([x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=ROI_RGB)
    draw.text((3, 2), label, fill=TEXT_RGB)
    draw.rectangle([0, 0, img.width - 1, img.height - 1], outline=(160, 160, 160))
    return img


@_guarded
def _render(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm import tqdm

    out = Path(args.out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".gif"):
        return _fail(f"output must end in .png or .gif, not {out.name!r}")
    if args.dt_ms <= 0:
        return _fail("--dt-ms must be positive")
    if args.roi == "mnist-dvs":
        from events.binning import MNIST_DVS

        args.roi = ",".join(str(v) for v in MNIST_DVS.roi)
    try:
        roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None
    except ValueError:
        return _fail(f"--roi needs x,y,w,h or mnist-dvs, not {args.roi!r}")
    if roi is not None and len(roi) != 4:
        return _fail("--roi needs x,y,w,h")
    rec = _read(args)
    scale = args.scale or max(1, -(-256 // max(rec.width, rec.height)))
    dt_us = max(1, int(round(args.dt_ms * 1000)))
    t_origin = int(rec.events["t"][0]) if len(rec.events) else 0
    if suffix == ".png":
        wins = _windows(rec, dt_us, max(1, args.frames))
        tiles = [
            _frame(rec, s, e, scale, roi, f"{(s - t_origin) / 1e6:.3f}-{(e - t_origin) / 1e6:.3f} s")
            for s, e in wins
        ]
        cols = min(len(tiles), 4)
        rows = -(-len(tiles) // cols)
        tw, th = tiles[0].size
        sheet = Image.new("RGB", (cols * (tw + 4) + 4, rows * (th + 4) + 4), (60, 60, 60))
        for i, tile in enumerate(tiles):
            sheet.paste(tile, (4 + (i % cols) * (tw + 4), 4 + (i // cols) * (th + 4)))
        sheet = _with_legend(sheet, roi is not None)
        sheet.save(out)
        print(f"wrote {out}: {len(tiles)} windows of {args.dt_ms:g} ms, {sheet.width}x{sheet.height}")
        return 0
    wins = _windows(rec, dt_us, None)
    if len(wins) > args.max_frames:
        print(f"note: {len(wins)} windows; rendering the first {args.max_frames}", file=sys.stderr)
        wins = wins[: args.max_frames]
    frames = [
        _with_legend(_frame(rec, s, e, scale, roi, f"{(s - t_origin) / 1e6:.3f} s"), roi is not None)
        for s, e in tqdm(wins, desc="render", unit="frame", disable=len(wins) < 50)
    ]
    frames[0].save(out, save_all=True, append_images=frames[1:], duration=max(20, int(args.dt_ms)), loop=0)
    print(f"wrote {out}: {len(frames)} frames of {args.dt_ms:g} ms")
    return 0


@_guarded
def _simulate_mnist_dvs(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    from tqdm import tqdm

    import events
    from events.mnist_idx import load_mnist
    from events.simulate import simulate_mnist_dvs

    if args.n <= 0:
        return _fail("--n must be positive")
    images = Path(args.mnist) if args.mnist else DEFAULT_MNIST
    if not images.exists():
        return _fail(f"MNIST images not found: {images} (give --mnist PATH)")
    labels = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    if labels == images or not labels.exists():
        return _fail(f"MNIST labels not found beside {images} (expected {labels.name})")
    x, y = load_mnist(images, labels)
    if args.start < 0 or args.start + args.n > len(x):
        return _fail(f"--start {args.start} --n {args.n} exceeds the {len(x)} images")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.csv"
    counters: dict[tuple[int, int], int] = {}
    rows = []
    jobs = [(i, s) for s in args.scale for i in range(args.start, args.start + args.n)]
    for i, scale in tqdm(jobs, desc="mnist-dvs", unit="rec"):
        digit = int(y[i])
        k = counters.get((digit, scale), 0) + 1
        counters[(digit, scale)] = k
        # One seed per (seed, image, scale): a recording does not depend on --n or --start.
        rng = np.random.default_rng(np.random.SeedSequence([args.seed, i, scale]))
        rec = simulate_mnist_dvs(x[i], scale=scale, duration_s=args.duration_s, seed=rng)
        rel = Path(str(digit)) / f"scale{scale:02d}" / f"mnist_{digit}_scale{scale:02d}_{k:04d}.aedat4"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        events.write_aedat4(out / rel, rec.events, rec.width, rec.height)
        rows.append(
            {
                "path": rel.as_posix(),
                "digit": digit,
                "scale": scale,
                "mnist_index": i,
                "mnist_file": images.name,
                "seed": args.seed,
                "events": len(rec.events),
                "duration_s": args.duration_s,
            }
        )
    with index_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} recordings and {index_path}")
    return 0


_STAT_KEYS = [
    ("events_per_s", "events / s", "{:,.0f}"),
    ("peak_events_per_s_10ms", "peak events / s (10 ms)", "{:,.0f}"),
    ("on_fraction", "ON fraction", "{:.2f}"),
    ("extent_x_px", "extent x (5-95 %, px)", "{:.1f}"),
    ("extent_y_px", "extent y (5-95 %, px)", "{:.1f}"),
    ("centre_x", "median x", "{:.1f}"),
    ("centre_y", "median y", "{:.1f}"),
    ("active_pixels", "active pixels", "{:,.0f}"),
    ("events_per_active_pixel", "events per active pixel", "{:.1f}"),
    ("mnist_dvs_cells_per_bin", "set cells per 10 ms bin in the MNIST_DVS crop", "{:.1f}"),
]


def _scale_of(path: str) -> int:
    import re

    m = re.search(r"scale(\d+)", Path(path).name)
    return int(m.group(1)) if m and int(m.group(1)) in (4, 8, 16) else 4


@_guarded
def _compare(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    import events
    from events.mnist_idx import load_mnist
    from events.simulate import recording_stats, simulate_mnist_dvs

    images = Path(args.mnist) if args.mnist else DEFAULT_MNIST
    labels = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    if not images.exists() or not labels.exists():
        return _fail(f"MNIST files not found: {images} (give --mnist PATH)")
    x, y = load_mnist(images, labels)
    pool = np.flatnonzero(y == args.digit) if args.digit is not None else np.arange(len(x))
    result = []
    for path in args.real:
        rec = events.read(path)
        scale = _scale_of(path)
        real = recording_stats(rec.events, rec.width, rec.height)
        dur = rec.duration_us / 1e6
        sims = []
        for j in tqdm(range(args.n), desc=Path(path).name, unit="rec", disable=args.json):
            i = int(pool[j % len(pool)])
            rng = np.random.default_rng(np.random.SeedSequence([args.seed, i, scale]))
            # simulate at least 1 s and compare a clip as long as the real recording
            sim = simulate_mnist_dvs(x[i], scale=scale, duration_s=max(dur, 1.0), seed=rng)
            ev = sim.events
            ev = ev[ev["t"] <= int(dur * 1e6)]
            sims.append(recording_stats(ev, 128, 128))
        row = {
            "file": Path(path).name,
            "scale": scale,
            "duration_s": dur,
            "real": real,
            "simulated": {
                k: {"mean": float(np.mean([s[k] for s in sims])), "std": float(np.std([s[k] for s in sims]))}
                for k, _, _ in _STAT_KEYS
                if k in real
            },
        }
        result.append(row)
    if args.json:
        print(json.dumps(result))
        return 0
    digit = "all digits" if args.digit is None else f"digit {args.digit}"
    for row in result:
        print(
            f"\n{row['file']} (scale {row['scale']}, {row['duration_s']:.2f} s) vs {args.n} simulated ({digit})\n"
        )
        print("| statistic | real | simulated (mean +- std) |")
        print("|---|---|---|")
        for k, label, fmt in _STAT_KEYS:
            if k in row["simulated"]:
                m = row["simulated"][k]
                print(
                    f"| {label} | {fmt.format(row['real'][k])} | {fmt.format(m['mean'])} +- {fmt.format(m['std'])} |"
                )
    return 0


def _usage(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """A command that prints ``parser``'s help and fails (a group called without its sub-command)."""

    def run(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return run
