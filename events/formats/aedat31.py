"""AEDAT 3.1 (cAER / libcaer): ``#`` header lines up to ``#!END-HEADER``, then event packets.

Each packet: a 28-byte little-endian header ``int16 eventType, int16 eventSource,
int32 eventSize, int32 eventTSOffset, int32 eventTSOverflow, int32 eventCapacity,
int32 eventNumber, int32 eventValid`` followed by ``eventCapacity * eventSize`` bytes.
Polarity events (type 1, 8 bytes): ``uint32 data`` (bit 0 valid mark, bit 1 polarity,
bits 2-16 y, bits 17-31 x) and ``int32 timestamp``; the full time is
:math:`t = (\\mathrm{tsOverflow} \\ll 31) \\mid \\mathrm{timestamp}` microseconds.
Other packet types and invalid (bit 0 clear) events are skipped and counted.

Coordinates are taken as stored: libcaer writes (0, 0) at the top left ("CG format": its DVS128
driver flips both axes of the raw address and inverts the polarity bit), which is the project's
convention.
"""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np

from .._types import EVENT_DTYPE, EventFormatError, Recording
from ._common import Limits, check_count, finish
from .aedat2 import CHIPS

END = b"#!END-HEADER\r\n"
HEADER = struct.Struct("<hhiiiiii")
TYPES = {
    0: "special",
    1: "polarity",
    2: "frame",
    3: "imu6",
    4: "imu9",
    5: "sample",
    6: "ear",
    7: "config",
    8: "point1d",
    9: "point2d",
    10: "point3d",
    11: "point4d",
    12: "spike",
}
#: cAER source names (lower case, no separators) -> sensor size; DVXplorer added
SOURCES = [(frag, w, h) for frag, w, h, _ in CHIPS] + [("dvxplorerlite", 320, 240), ("dvxplorer", 640, 480)]


def parse(data: bytes, *, limits: Limits, name: str = "") -> Recording:
    """Parse an AEDAT 3.x buffer (polarity packets; everything else skipped and counted)."""
    if data[:10] != b"#!AER-DAT3":
        raise EventFormatError("not an AEDAT 3 file (wrong magic)", offset=0)
    end = data.find(END, 0, 16 << 20)
    if end < 0:
        raise EventFormatError("AEDAT 3 header has no '#!END-HEADER' line", offset=0)
    header = bytes(data[:end]).decode("latin-1")
    start = end + len(END)
    meta: dict[str, Any] = {"header": {}, "skipped": {}, "sources": {}}
    for line in header.splitlines():
        line = line.strip()
        m = re.match(r"#!AER-DAT(\S+)", line)
        if m:
            meta["header"]["version"] = m.group(1)
        m = re.match(r"#Source (\d+):\s*(.+)", line)
        if m:
            meta["sources"][m.group(1)] = m.group(2).strip()
        m = re.match(r"#(Format|Start-Time):\s*(.+)", line)
        if m:
            meta["header"][m.group(1)] = m.group(2).strip()
    if meta["header"].get("Format", "RAW").upper() != "RAW":
        raise EventFormatError(
            f"AEDAT 3 format {meta['header']['Format']!r} (compressed) is not supported", offset=0
        )

    pos = start
    n_total = len(data)
    spans: list[tuple[int, int, int]] = []  # (data offset, events, overflow)
    n_events = 0
    packet = 0
    skipped: dict[str, int] = {}
    while pos < n_total:
        if pos + HEADER.size > n_total:
            raise EventFormatError("AEDAT 3 truncated packet header", offset=pos, packet=packet)
        etype, source, esize, tsoff, tsover, capacity, number, valid = HEADER.unpack_from(data, pos)
        if (
            esize <= 0
            or capacity < 0
            or number < 0
            or number > capacity
            or valid > number
            or valid < 0
            or tsover < 0
            or not (0 <= tsoff < max(esize, 1))
        ):
            raise EventFormatError(
                f"AEDAT 3 absurd packet header (type {etype}, size {esize}, capacity {capacity}, "
                f"number {number}, valid {valid}, tsOffset {tsoff}, tsOverflow {tsover})",
                offset=pos,
                packet=packet,
            )
        body = capacity * esize
        if pos + HEADER.size + body > n_total:
            raise EventFormatError(
                f"AEDAT 3 packet of {capacity} x {esize} bytes runs past the end of the file",
                offset=pos,
                packet=packet,
            )
        if etype == 1:
            if esize != 8 or tsoff != 4:
                raise EventFormatError(
                    f"AEDAT 3 polarity packet with event size {esize} / ts offset {tsoff} (expected 8 / 4)",
                    offset=pos,
                    packet=packet,
                )
            spans.append((pos + HEADER.size, number, tsover))
            n_events += number
            check_count(n_events, limits, offset=pos, packet=packet)
            meta["sources"].setdefault(str(source), meta["sources"].get(str(source), f"source {source}"))
        else:
            kind = TYPES.get(etype, f"type_{etype}")
            skipped[kind] = skipped.get(kind, 0) + number
        pos += HEADER.size + body
        packet += 1
    meta["packets"] = packet
    counts = np.array([n for _, n, _ in spans], dtype=np.int64)
    starts = np.array([off for off, _, _ in spans], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(counts)])

    def offset_of(i: int, valid_index: np.ndarray | None = None) -> int:
        k = int(valid_index[i]) if valid_index is not None else i
        s = int(np.searchsorted(first, k, side="right")) - 1
        return int(starts[s] + 8 * (k - first[s]))

    if spans:
        words = np.concatenate([np.frombuffer(data, "<u4", count=2 * n, offset=off) for off, n, _ in spans])
    else:
        words = np.zeros(0, "<u4")
    d = words[0::2]
    ts = words[1::2].view("<i4")
    valid_index = None
    # AND over every first byte: bit 0 stays set only if every event carries the valid mark
    if len(d) and not (int(np.bitwise_and.reduce(words.view(np.uint8)[0::8])) & 1):
        keep = (d & 1) == 1
        valid_index = np.flatnonzero(keep)
        skipped["invalid_polarity"] = int(len(d) - len(valid_index))
        d, ts = d[keep], ts[keep]
    if len(ts) and int(ts.min()) < 0:
        i = int(np.argmax(ts < 0))
        raise EventFormatError("AEDAT 3 negative polarity timestamp", offset=offset_of(i, valid_index))
    out = np.empty(len(d), dtype=EVENT_DTYPE)
    overflow = np.array([o for _, _, o in spans], dtype=np.int64)
    if overflow.any():
        over = np.repeat(overflow, counts)
        if valid_index is not None:
            over = over[valid_index]
        t64 = (over << 31) | ts.astype(np.int64)
    else:
        t64 = ts.astype(np.int64)
    # the order check on a contiguous copy is 3x cheaper than on the strided field
    mono = len(t64) < 2 or bool((t64[1:] >= t64[:-1]).all())
    out["t"] = t64
    del t64
    tmp = np.empty(len(d), dtype=np.uint32)
    np.right_shift(d, 17, out=tmp)
    mx = int(tmp.max()) if len(tmp) else 0
    out["x"] = tmp
    np.right_shift(d, 2, out=tmp)
    tmp &= 0x7FFF
    my = int(tmp.max()) if len(tmp) else 0
    out["y"] = tmp
    np.right_shift(d, 1, out=tmp)
    tmp &= 1
    out["p"] = tmp
    events = out
    meta["skipped"] = skipped
    w = h = 0
    for src in meta["sources"].values():
        key = src.lower().replace("_", "").replace(" ", "").replace("-", "")
        hit = next(((sw, sh) for frag, sw, sh in SOURCES if frag in key), None)
        if hit:
            w, h = hit
            meta["camera"] = src
            break
    if not w:
        w, h = mx + 1, my + 1
        meta["sensor_size_from"] = "event coordinates"
    return finish(
        events,
        w,
        h,
        "aedat31",
        meta,
        offsets=lambda i: offset_of(i, valid_index),
        in_bounds=mx < w and my < h,
        monotonic=mono,
    )
