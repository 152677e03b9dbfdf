"""Read and bin throughput of ``events`` per file format, next to other readers, on one core.

    python -m bench.events [--events 10000000] [--repeat 3]

Writes ``bench/results/events.json`` and ``bench/results/events.md``. A synthetic recording of
``--events`` events (moving edges plus noise, 5 s) is written in a temporary folder in each
format: AEDAT 2.0 and 3.1 as hand-made bytes (DVS128 addresses / polarity packets), AEDAT 4
(LZ4 and ZSTD) and npz with our writers, EVT 2.0 / EVT 3.0 / DAT with ``faery``. Each file is
then read by ``events.read`` (and by ``aedat`` / ``faery`` where they read the format), and
read + binned (full sensor pooled to ~64 px across, 10 ms, split, presence). Timings are the best CPU time of
``--repeat`` runs, with the process pinned to one CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "parse_aedat2_31_mev_s": 100.0,
    "aedat4_vs_aedat_pkg": 0.9,  # ours >= 90 % of the aedat package alone
    "binning_mev_s": 200.0,
}


def synthetic(n: int, width: int, height: int, seed: int = 0, span_us: int = 5_000_000) -> np.ndarray:
    """Sorted events: 80 % on a few moving edges (so files compress like real ones), 20 % noise."""
    from events import EVENT_DTYPE

    rng = np.random.default_rng(seed)
    ev = np.zeros(n, EVENT_DTYPE)
    t = np.sort(rng.integers(0, span_us, n))
    edge = rng.random(n) < 0.8
    k = rng.integers(0, 4, n)
    speed = np.array([60.0, -45.0, 90.0, 30.0])[k]  # px/s
    x = (rng.integers(0, width, 4)[k] + speed * t * 1e-6 + rng.normal(0, 1.0, n)) % width
    y = rng.integers(0, height, n)
    x = np.where(edge, x, rng.integers(0, width, n))
    ev["t"], ev["x"], ev["y"] = t, x.astype(np.uint16), y
    ev["p"] = np.where(edge, (speed > 0).astype(np.uint8) ^ (rng.random(n) < 0.1), rng.integers(0, 2, n))
    return ev


def write_aedat2_dvs128(path: Path, ev: np.ndarray) -> None:
    """jAER AEDAT 2.0, DVS128 addresses (x mirrored, y bottom-up, polarity inverted)."""
    addr = (
        ((127 - ev["y"].astype(np.uint32)) << 8)
        | ((127 - ev["x"].astype(np.uint32)) << 1)
        | (1 - ev["p"].astype(np.uint32))
    )
    words = np.empty((len(ev), 2), ">u4")
    words[:, 0] = addr
    words[:, 1] = ev["t"].astype(np.uint32)
    header = b"#!AER-DAT2.0\r\n# This is a raw AE data file created by bench/events.py\r\n#HardwareInterface: DVS128\r\n"
    path.write_bytes(header + words.tobytes())


def write_aedat31(path: Path, ev: np.ndarray, packet: int = 8192) -> None:
    """AEDAT 3.1 polarity packets (coordinates as stored: top-left origin)."""
    header = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"
    data = (
        (ev["x"].astype(np.uint32) << 17)
        | (ev["y"].astype(np.uint32) << 2)
        | (ev["p"].astype(np.uint32) << 1)
        | 1
    )
    t = ev["t"]
    parts = [header]
    for s in range(0, len(ev), packet):
        e = min(s + packet, len(ev))
        n = e - s
        overflow = int(t[s]) >> 31
        body = np.empty((n, 2), "<u4")
        body[:, 0] = data[s:e]
        body[:, 1] = (t[s:e] & 0x7FFFFFFF).astype(np.uint32)
        parts.append(struct.pack("<hhiiiiii", 1, 1, 8, 4, overflow, n, n, n))
        parts.append(body.tobytes())
    path.write_bytes(b"".join(parts))


def write_with_faery(path: Path, ev: np.ndarray, width: int, height: int, **kw: Any) -> None:
    import faery

    arr = np.zeros(len(ev), faery.EVENTS_DTYPE)
    arr["t"], arr["x"], arr["y"], arr["on"] = ev["t"], ev["x"], ev["y"], ev["p"] == 1
    faery.events_stream_from_array(arr, (width, height)).to_file(path, zero_t0=False, **kw)


def read_aedat_pkg(path: Path) -> int:
    import aedat

    n = 0
    for packet in aedat.Decoder(str(path)):
        if "events" in packet:
            n += len(packet["events"])
    return n


def read_aedat_pkg_array(path: Path) -> int:
    """``aedat`` decoding into one array (its packets concatenated): the work ``events.read``
    has to do at least, as the ``aedat`` column only iterates and drops the packets."""
    import aedat

    chunks = [p["events"] for p in aedat.Decoder(str(path)) if "events" in p]
    return len(np.concatenate(chunks)) if chunks else 0


def read_faery(path: Path) -> int:
    import faery

    return sum(len(c) for c in faery.events_stream_from_file(path))


WALL: list[float] = []


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Best CPU time (user + system, all threads of this process) of ``repeat`` runs.

    CPU time rather than wall time because the development machine's 2 cores are shared: with
    the process pinned to one CPU the two agree when nothing else runs. The best wall time is
    appended to ``WALL``.
    """
    out, cpu, wall = None, [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    WALL.append(min(wall))
    return min(cpu), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    import events
    from events.binning import MNIST_DVS, ROI, Binner, BinSpec, bin_events

    n = args.events
    rows: list[dict[str, Any]] = []
    binning: list[dict[str, Any]] = []
    print(f"generating {n:,} events ...", flush=True)
    sets = {
        (128, 128): synthetic(n, 128, 128, 0),
        (346, 260): synthetic(n, 346, 260, 1),
        (640, 480): synthetic(n, 640, 480, 2),
    }

    def bin_full(rec: Any) -> np.ndarray:
        # A model-input-sized grid: the full sensor pooled to about 64 px across.
        pool = max(1, max(rec.width, rec.height) // 64)
        return bin_events(
            rec.events, ROI.full(rec.width, rec.height), 10_000, None, None, "split", "presence", pool
        )

    with tempfile.TemporaryDirectory(prefix="vdib-bench-") as tmp:
        d = Path(tmp)
        files: list[tuple[str, Path, tuple[int, int], dict[str, Callable[[Path], int]]]] = []
        plan: list[tuple[str, str, tuple[int, int], Callable[[Path, np.ndarray, int, int], None], dict]] = [
            ("aedat2", "f.aedat", (128, 128), lambda p, e, w, h: write_aedat2_dvs128(p, e), {}),
            ("aedat31", "f31.aedat", (128, 128), lambda p, e, w, h: write_aedat31(p, e), {}),
            (
                "aedat4 (lz4)",
                "lz4.aedat4",
                (346, 260),
                lambda p, e, w, h: events.write_aedat4(p, e, w, h, "lz4"),
                {"aedat": read_aedat_pkg, "aedat_array": read_aedat_pkg_array, "faery": read_faery},
            ),
            (
                "aedat4 (zstd)",
                "zstd.aedat4",
                (346, 260),
                lambda p, e, w, h: events.write_aedat4(p, e, w, h, "zstd"),
                {"aedat": read_aedat_pkg, "aedat_array": read_aedat_pkg_array, "faery": read_faery},
            ),
            (
                "evt2",
                "f2.raw",
                (640, 480),
                lambda p, e, w, h: write_with_faery(p, e, w, h, version="evt2"),
                {"faery": read_faery},
            ),
            (
                "evt3",
                "f3.raw",
                (640, 480),
                lambda p, e, w, h: write_with_faery(p, e, w, h, version="evt3"),
                {"faery": read_faery},
            ),
            (
                "dat",
                "f.dat",
                (640, 480),
                lambda p, e, w, h: write_with_faery(p, e, w, h, version="dat2"),
                {"faery": read_faery},
            ),
            ("npz", "f.npz", (346, 260), lambda p, e, w, h: events.write_npz(p, e, w, h), {}),
        ]
        for name, fname, size, writer, others in plan:
            path = d / fname
            t0 = time.perf_counter()
            try:
                writer(path, sets[size], *size)
            except Exception as exc:  # a writer we do not own failing must not stop the bench
                print(f"  {name}: cannot write ({exc!r}); skipped", flush=True)
                continue
            print(
                f"  wrote {name}: {path.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            files.append((name, path, size, others))

        for name, path, size, others in files:
            src = sets[size]
            try:
                dt, rec = best(lambda p=path: events.read(p), args.repeat)
            except events.EventFormatError as exc:  # report, do not stop the bench
                print(f"  {name}: our reader failed: {exc}", flush=True)
                rows.append(
                    {
                        "format": name,
                        "sensor": f"{size[0]}x{size[1]}",
                        "events": len(src),
                        "file_mb": round(path.stat().st_size / 1e6, 1),
                        "identical": False,
                        "read_mev_s": f"failed: {exc}",
                        "read_bin_mev_s": "-",
                    }
                )
                continue
            ok = len(rec.events) == len(src) and bool(np.array_equal(rec.events, src))
            del rec
            dtb, _ = best(lambda p=path: bin_full(events.read(p)), args.repeat)
            row: dict[str, Any] = {
                "format": name,
                "sensor": f"{size[0]}x{size[1]}",
                "events": len(src),
                "file_mb": round(path.stat().st_size / 1e6, 1),
                "identical": ok,
                "read_mev_s": round(len(src) / dt / 1e6, 1),
                "read_bin_mev_s": round(len(src) / dtb / 1e6, 1),
                "read_wall_s": round(WALL[-2], 3),
                "read_bin_wall_s": round(WALL[-1], 3),
            }
            for lib, fn in others.items():
                try:
                    dto, cnt = best(lambda p=path, f=fn: f(p), args.repeat)
                    row[f"{lib}_mev_s"] = round(cnt / dto / 1e6, 1) if cnt == len(src) else f"count {cnt}"
                except Exception as exc:
                    row[f"{lib}_mev_s"] = f"failed: {type(exc).__name__}"
            print(f"  {row}", flush=True)
            rows.append(row)

    ev = sets[(346, 260)]
    cases = [
        ("full 346x260, split, presence", dict(roi=ROI.full(346, 260))),
        ("full 346x260, split, count", dict(roi=ROI.full(346, 260), mode="count")),
        ("full 346x260, merge, presence, pool 4", dict(roi=ROI.full(346, 260), polarity="merge", pool=4)),
        ("centre 26x26 crop, split, presence", dict(roi=ROI.centre(346, 260, 26, 26))),
        ("full, signed, presence", dict(roi=ROI.full(346, 260), polarity="signed")),
    ]
    for label, kw in cases:
        dt, out = best(lambda k=kw: bin_events(ev, dt_us=10_000, t0=None, n_bins=None, **k), args.repeat)
        binning.append(
            {
                "case": label,
                "mev_s": round(len(ev) / dt / 1e6, 1),
                "shape": list(out.shape),
                "output_mb": round(out.nbytes / 1e6, 1),
            }
        )
        print(f"  bin {label}: {binning[-1]['mev_s']} Mev/s", flush=True)
    for chunk in (1_000, 65_536):
        spec = BinSpec(ROI.full(346, 260), 10_000)

        def stream(c: int = chunk, s: BinSpec = spec) -> int:
            b = Binner(s, max_gap_us=None)
            k = 0
            for i in range(0, len(ev), c):
                k += sum(seg.n_bins for seg in b.push(ev[i : i + c]))
            return k + sum(seg.n_bins for seg in b.flush())

        dt, k = best(stream, args.repeat)
        binning.append(
            {
                "case": f"Binner.push, chunks of {chunk:,} events",
                "mev_s": round(len(ev) / dt / 1e6, 1),
                "shape": [k, *spec.shape],
                "output_mb": round(k * int(np.prod(spec.shape)) / 1e6, 1),
            }
        )
        print(f"  {binning[-1]}", flush=True)
    mnist = sets[(128, 128)]
    dt, out = best(lambda: MNIST_DVS.bin(mnist), args.repeat)
    binning.append(
        {
            "case": "MNIST_DVS preset on 128x128",
            "mev_s": round(len(mnist) / dt / 1e6, 1),
            "shape": list(out.shape),
            "output_mb": round(out.nbytes / 1e6, 1),
        }
    )

    by = {r["format"]: r for r in rows}
    checks = {}
    for f in ("aedat2", "aedat31"):
        if f in by:
            v = by[f]["read_mev_s"]
            checks[f"{f} parse >= {TARGETS['parse_aedat2_31_mev_s']:.0f} Mev/s"] = (
                isinstance(v, float) and v >= TARGETS["parse_aedat2_31_mev_s"]
            )
    for f in ("aedat4 (lz4)", "aedat4 (zstd)"):
        r = by.get(f)
        if r and isinstance(r.get("aedat_mev_s"), float) and isinstance(r["read_mev_s"], float):
            checks[f"{f} within 10 % of aedat"] = (
                r["read_mev_s"] >= TARGETS["aedat4_vs_aedat_pkg"] * r["aedat_mev_s"]
            )
    for b in binning:
        if "presence" in b["case"] or "preset" in b["case"]:
            checks[f"binning {b['case']} >= {TARGETS['binning_mev_s']:.0f} Mev/s"] = (
                b["mev_s"] >= TARGETS["binning_mev_s"]
            )

    info = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": _cpu(),
        "pinned_to_one_cpu": hasattr(os, "sched_setaffinity"),
        "events": n,
        "repeat": args.repeat,
        "command": "python -m bench.events " + " ".join(argv or sys.argv[1:]),
    }
    result = {"info": info, "targets": TARGETS, "read": rows, "binning": binning, "checks": checks}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "events.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "events.md").write_text(_markdown(result))
    print(f"wrote {args.out / 'events.json'} and {args.out / 'events.md'}")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _markdown(r: dict[str, Any]) -> str:
    i = r["info"]
    lines = [
        "# events: read and bin throughput",
        "",
        f"{i['events']:,} events per file, best of {i['repeat']}, one CPU ({i['cpu']}), "
        f"Python {i['python']}, numpy {i['numpy']}, {i['date_utc']}. Reproduce: `{i['command'].strip()}`. "
        "Mev/s = events / best CPU time (process pinned to one CPU; the machine's 2 cores are shared).",
        "",
        "Read = `events.read(path)` (file bytes to sorted EVENT_DTYPE array); read + bin adds "
        "`bin_events` over the full sensor pooled to ~64 px across (10 ms bins, split polarity, "
        "presence). Other readers only decode to their own arrays; `aedat` only iterates its packets "
        "(dropping each), `aedat` -> array also concatenates them into one array (what a reader "
        "returning one array has to do at least). The synthetic recordings are "
        "5 s long, 80 % of the events on moving edges, 20 % noise. Binning the full sensor "
        "unpooled is bound by writing its output (9 bytes of frames per event here).",
        "",
        "| format | sensor | file MB | identical | read Mev/s | read + bin Mev/s | aedat Mev/s | aedat -> array Mev/s | faery Mev/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["read"]:
        lines.append(
            f"| {row['format']} | {row['sensor']} | {row['file_mb']} | {'yes' if row['identical'] else 'NO'} | "
            f"{row['read_mev_s']} | {row['read_bin_mev_s']} | {row.get('aedat_mev_s', '-')} | "
            f"{row.get('aedat_array_mev_s', '-')} | {row.get('faery_mev_s', '-')} |"
        )
    lines += [
        "",
        "| binning (in memory, 5 s, 10 ms bins) | Mev/s | output [T, C, H, W] | output MB |",
        "|---|---|---|---|",
    ]
    for b in r["binning"]:
        lines.append(f"| {b['case']} | {b['mev_s']} | {b['shape']} | {b['output_mb']} |")
    lines += ["", "| target | met |", "|---|---|"]
    for k, v in r["checks"].items():
        lines.append(f"| {k} | {'yes' if v else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
