"""Event Stream ``.es`` (neuromorphic-systems / neuromorphic-paris; also written by ``faery``).

Layout (specification version 2.x, all multi-byte fields little-endian):

* bytes 0-11 ``Event Stream``, 12-14 major, minor, patch version, 15 the event type
  (0 generic, 1 DVS, 2 ATIS, 3 asynchronous display, 4 colour); for DVS, ATIS and colour,
  bytes 16-19 the sensor width and height (uint16 each).
* then a byte stream decoded by a state machine. In the idle state a byte is either a special
  byte or the first byte of an event; the further bytes of an event are plain data:

  ============  ========================  =========================================  =========
  type          special bytes (idle)      event byte 0                               event size
  ============  ========================  =========================================  =========
  DVS           0xFF: t += 127; 0xFE      ``dt << 1 | is_increase`` (dt 0..126)      5 bytes
  ATIS          0xFC-0xFF: t += 63*(b&3)  ``dt << 2 | polarity << 1 | is_tc``       5 bytes
  colour        0xFF: t += 254; 0xFE      ``dt`` (0..253)                            8 bytes
  generic       0xFF: t += 254; 0xFE      ``dt`` (0..253), then size bytes, data     variable
  ============  ========================  =========================================  =========

  (0xFE, and 0xFC for ATIS, is *reset*: it only resynchronises, adding no time.) After byte 0
  come x and y (uint16 each); colour events add r, g, b bytes; a generic event has size bytes
  ``s << 1 | more`` (7 bits each, least significant first) and that many data bytes.

Times are microseconds from the start of the stream (the first event's t is its own delta).
Event Stream's y axis runs bottom-up (faery flips y both ways), so :func:`parse` converts to the
project convention with ``y = H - 1 - y_raw``; :func:`decode` returns the raw fields.

``events.read`` returns DVS events, and the DVS events of an ATIS stream (ATIS threshold
crossings, the exposure measurements, are skipped and counted in ``metadata["skipped"]``).
Colour and generic streams carry no polarity: ``read`` refuses them with a clear error and
:func:`decode` gives their raw fields (colour: t, x, y, r, g, b; generic: t and where each
event's data bytes lie in the file). The asynchronous display type (3) is refused.

A truncated last event is an error (faery drops it silently); trailing overflow or reset bytes
are accepted. Timestamps only ever grow, so every stream is in time order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._types import EVENT_DTYPE, EventFormatError, Recording
from ._common import Limits, check_count, check_sensor, finish
from ._jit import kernel, register

MAGIC = b"Event Stream"
TYPES = {0: "generic", 1: "dvs", 2: "atis", 3: "display", 4: "color"}
CODES = {v: k for k, v in TYPES.items()}

#: per fixed-size event type: event size in bytes, smallest special byte, time unit of one
#: overflow step, shift of the time delta in byte 0
_LAYOUT = {"dvs": (5, 0xFE, 127, 1), "atis": (5, 0xFC, 63, 2), "color": (8, 0xFE, 254, 0)}

#: raw fields returned by :func:`decode` (y as stored, bottom-up)
DVS_RAW = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("on", "u1")])
ATIS_RAW = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("exposure", "u1"), ("polarity", "u1")])
COLOR_RAW = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("r", "u1"), ("g", "u1"), ("b", "u1")])
#: a generic event's data bytes are ``data[offset : offset + size]``
GENERIC_RAW = np.dtype([("t", "<i8"), ("offset", "<i8"), ("size", "<i8")])


@dataclass(frozen=True)
class Header:
    version: tuple[int, int, int]
    event_type: str
    width: int
    height: int
    #: byte offset of the first event byte
    start: int


def parse_header(data: Any) -> Header:
    """Check the magic bytes, the version (2.x) and the event type; read the sensor size."""
    n = len(data)
    if n < len(MAGIC) or bytes(data[: len(MAGIC)]) != MAGIC:
        raise EventFormatError("not an Event Stream file (no 'Event Stream' magic bytes)", offset=0)
    if n < 16:
        raise EventFormatError("Event Stream header truncated (no version or event type)", offset=min(n, 12))
    version = (int(data[12]), int(data[13]), int(data[14]))
    if version[0] != 2:
        raise EventFormatError(
            f"Event Stream version {'.'.join(map(str, version))} is not supported (only 2.x)", offset=12
        )
    code = int(data[15])
    kind = TYPES.get(code)
    if kind is None:
        raise EventFormatError(f"unknown Event Stream event type {code}", offset=15)
    if kind == "display":
        raise EventFormatError(
            "Event Stream asynchronous display events (type 3) are not supported", offset=15
        )
    if kind == "generic":
        return Header(version, kind, 0, 0, 16)
    if n < 20:
        raise EventFormatError("Event Stream header truncated (no sensor size)", offset=16)
    w = int(data[16]) | (int(data[17]) << 8)
    h = int(data[18]) | (int(data[19]) << 8)
    check_sensor(w, h, what="Event Stream sensor size", offset=16)
    return Header(version, kind, w, h, 20)


@register
def scan_fixed(
    buf: np.ndarray,
    start: Any,
    size: Any,
    special: Any,
    unit: Any,
    shift: Any,
    atis: Any,
    starts: np.ndarray,
    ts: np.ndarray,
) -> tuple[Any, Any]:
    """Walk the state machine of a fixed-size event type (compiled by numba): write each
    event's first byte offset and timestamp; return (events, final time)."""
    n = len(buf)
    i = start
    t = np.int64(0)
    k = 0
    while i < n:
        b = np.int64(buf[i])
        if b >= special:
            if atis:
                t += unit * (b & 3)
            elif b == 0xFF:
                t += unit
            i += 1
        else:
            t += b >> shift
            starts[k] = i
            ts[k] = t
            k += 1
            i += size
    return k, t


@register
def decode_polarity(
    buf: np.ndarray,
    start: Any,
    shift: Any,
    atis: Any,
    width: Any,
    height: Any,
    limit: Any,
    t_out: np.ndarray,
    x_out: np.ndarray,
    y_out: np.ndarray,
    p_out: np.ndarray,
) -> tuple[Any, Any, Any, Any]:
    """DVS or ATIS streams straight to polarity events (compiled by numba): y flipped, ATIS
    threshold crossings skipped. Returns (events written, crossings skipped, status, offset):
    status 0 done, 1 the event at ``offset`` is truncated, 2 it lies outside the sensor, 3 it
    would be event number ``limit + 1``."""
    n = len(buf)
    special = 0xFC if atis else 0xFE
    i = start
    t = np.int64(0)
    k = 0
    skipped = 0
    while i < n:
        b = np.int64(buf[i])
        if b >= special:
            if atis:
                t += 63 * (b & 3)
            elif b == 0xFF:
                t += 127
            i += 1
            continue
        t += b >> shift
        if i + 5 > n:
            return k, skipped, 1, i
        x = np.int64(buf[i + 1]) | (np.int64(buf[i + 2]) << 8)
        y = np.int64(buf[i + 3]) | (np.int64(buf[i + 4]) << 8)
        if x >= width or y >= height:
            return k, skipped, 2, i
        if atis and (b & 1):
            skipped += 1
        else:
            if k == limit:
                return k, skipped, 3, i
            t_out[k] = t
            x_out[k] = x
            y_out[k] = height - 1 - y
            p_out[k] = ((b >> 1) & 1) if atis else (b & 1)
            k += 1
        i += 5
    return k, skipped, 0, i


def _chain(
    buf: np.ndarray, start: int, size: int, special: int, unit: int, shift: int, atis: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(first-byte offsets, timestamps) of every event, in numpy without a loop per byte.

    From a token start ``p`` the stream runs ``p, p + size, p + 2 size, ...`` (events) up to the
    first of those positions holding a special byte: the next special *token* is the first
    special-valued byte at or after ``p`` in the residue class of ``p`` modulo ``size``, and
    the stream resumes one byte later. So the special tokens form a chain through the positions
    of special-valued bytes (``succ`` by one ``searchsorted`` per residue class), which is
    followed by doubling (``S <- S + succ[S]``, ``succ <- succ[succ]``: log2(chain) rounds);
    the events are the arithmetic runs between consecutive special tokens."""
    n = len(buf)
    sp = np.flatnonzero(buf[start:] >= special).astype(np.int64) + start
    m = len(sp)
    chain = np.zeros(0, np.int64)
    if m:
        res = sp % size
        by_res = [np.flatnonzero(res == r) for r in range(size)]
        succ = np.full(m + 1, m, dtype=np.int64)  # index m: the end (maps to itself)
        nres = (res + 1) % size
        for r in range(size):
            idx = by_res[r]
            src = np.flatnonzero(nres == r)
            if not len(idx) or not len(src):
                continue
            j = np.searchsorted(sp[idx], sp[src] + 1)
            succ[src] = np.where(j < len(idx), idx[np.minimum(j, len(idx) - 1)], m)
        idx = by_res[start % size]
        first = int(np.searchsorted(sp[idx], start)) if len(idx) else 0
        if first < len(idx):
            reach = np.array([idx[first]], dtype=np.int64)
            while True:
                grown = np.unique(np.concatenate([reach, succ[reach]]))
                if len(grown) == len(reach):
                    break
                reach = grown
                succ = succ[succ]
            chain = sp[reach[reach < m]]
    seg_start = np.concatenate([[start], chain + 1])
    seg_end = np.concatenate([chain, [n]])
    counts = np.maximum(-((seg_start - seg_end) // size), 0)  # ceil((end - start) / size)
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    seg = np.repeat(np.arange(len(counts)), counts)
    starts = seg_start[seg] + size * (np.arange(total, dtype=np.int64) - first[seg])
    b = buf[chain].astype(np.int64)
    if atis:
        sdelta = unit * (b & 3)
    else:
        sdelta = np.where(b == 0xFF, unit, 0)
    before = np.concatenate([[0], np.cumsum(sdelta)])  # time added by the specials before segment j
    t = np.cumsum(buf[starts].astype(np.int64) >> shift) + before[seg]
    return starts, t


def _scan(buf: np.ndarray, start: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(first-byte offsets, timestamps) of every event of a fixed-size type."""
    size, special, unit, shift = _LAYOUT[kind]
    body = len(buf) - start
    scan = kernel(scan_fixed, body)
    if scan is not None:
        cap = body // size + 1
        starts = np.empty(cap, np.int64)
        ts = np.empty(cap, np.int64)
        k, _ = scan(buf, start, size, special, unit, shift, kind == "atis", starts, ts)
        return starts[:k], ts[:k]
    return _chain(buf, start, size, special, unit, shift, kind == "atis")


def _fields(buf: np.ndarray, starts: np.ndarray, header: Header) -> tuple[np.ndarray, np.ndarray]:
    """Raw x and y of each event, checked against the sensor."""
    size = _LAYOUT[header.event_type][0]
    complete = len(starts) - 1 if len(starts) and int(starts[-1]) + size > len(buf) else len(starts)
    x = buf[starts[:complete] + 1].astype(np.uint16) | (buf[starts[:complete] + 2].astype(np.uint16) << 8)
    y = buf[starts[:complete] + 3].astype(np.uint16) | (buf[starts[:complete] + 4].astype(np.uint16) << 8)
    bad = (x >= header.width) | (y >= header.height)
    if bad.any():
        i = int(np.argmax(bad))
        _bad_event(buf, header, i, int(starts[i]))
    if complete < len(starts):
        _bad_event(buf, header, complete, int(starts[complete]))
    return x, y


def _bad_event(buf: np.ndarray, header: Header, index: int, offset: int) -> None:
    """Raise the error for event ``index`` (first byte at ``offset``): truncated or off the sensor."""
    size = _LAYOUT[header.event_type][0]
    if offset + size > len(buf):
        raise EventFormatError(
            f"Event Stream {header.event_type} event {index} is truncated ({len(buf) - offset} of {size} bytes)",
            offset=offset,
        )
    x = int(buf[offset + 1]) | (int(buf[offset + 2]) << 8)
    y = int(buf[offset + 3]) | (int(buf[offset + 4]) << 8)
    raise EventFormatError(
        f"Event Stream event {index} at raw (x={x}, y={y}) lies outside the {header.width}x{header.height} sensor",
        offset=offset,
    )


def _generic(buf: np.ndarray, start: int, limits: Limits) -> np.ndarray:
    n = len(buf)
    rows: list[tuple[int, int, int]] = []
    i = start
    t = 0
    while i < n:
        b = int(buf[i])
        if b >= 0xFE:
            t += 254 if b == 0xFF else 0
            i += 1
            continue
        first = i
        t += b
        i += 1
        length = 0
        shift = 0
        while True:
            if i >= n:
                raise EventFormatError(
                    f"Event Stream generic event {len(rows)} is truncated (size bytes)", offset=first
                )
            s = int(buf[i])
            length |= (s >> 1) << shift
            shift += 7
            i += 1
            if not s & 1:
                break
            if shift > 63:
                raise EventFormatError("Event Stream generic event size runs over 64 bits", offset=i - 1)
        if i + length > n:
            raise EventFormatError(
                f"Event Stream generic event {len(rows)} is truncated ({n - i} of {length} data bytes)",
                offset=first,
            )
        rows.append((t, i, length))
        check_count(len(rows), limits, offset=first)
        i += length
    return np.array(rows, dtype=GENERIC_RAW) if rows else np.zeros(0, GENERIC_RAW)


def _buffer(data: Any) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8) if len(data) else np.zeros(0, np.uint8)


def decode(data: Any, *, limits: Limits | None = None) -> tuple[Header, np.ndarray]:
    """The header and the raw events of any supported type (see :data:`DVS_RAW`,
    :data:`ATIS_RAW`, :data:`COLOR_RAW`, :data:`GENERIC_RAW`); y as stored (bottom-up)."""
    if limits is None:
        from ..readers import _limits

        limits = _limits(False, len(data), None, None)
    header = parse_header(data)
    buf = _buffer(data)
    if header.event_type == "generic":
        return header, _generic(buf, header.start, limits)
    starts, t = _scan(buf, header.start, header.event_type)
    check_count(
        len(starts),
        limits,
        offset=int(starts[limits.max_events]) if len(starts) > limits.max_events else None,
    )
    x, y = _fields(buf, starts, header)
    b0 = buf[starts]
    if header.event_type == "dvs":
        out = np.empty(len(starts), DVS_RAW)
        out["on"] = b0 & 1
    elif header.event_type == "atis":
        out = np.empty(len(starts), ATIS_RAW)
        out["exposure"] = b0 & 1
        out["polarity"] = (b0 >> 1) & 1
    else:
        out = np.empty(len(starts), COLOR_RAW)
        out["r"] = buf[starts + 5]
        out["g"] = buf[starts + 6]
        out["b"] = buf[starts + 7]
    out["t"] = t
    out["x"] = x
    out["y"] = y
    return header, out


def parse(data: Any, *, limits: Limits, name: str = "") -> Recording:
    """Parse an Event Stream buffer into polarity events (DVS, or the DVS events of ATIS)."""
    header = parse_header(data)
    if header.event_type in ("color", "generic"):
        what = (
            "colour events (RGB, no polarity)"
            if header.event_type == "color"
            else ("generic events (no pixel coordinates)")
        )
        raise EventFormatError(
            f"Event Stream {what} cannot be read as polarity events; use events.formats.es.decode for "
            "their raw fields",
            offset=15,
        )
    buf = _buffer(data)
    atis = header.event_type == "atis"
    meta: dict[str, Any] = {
        "es_version": ".".join(map(str, header.version)),
        "event_type": header.event_type,
        "camera": header.event_type.upper(),
        "skipped": {},
    }
    body = len(buf) - header.start
    decode_k = kernel(decode_polarity, body)
    if decode_k is not None:
        events = np.empty(min(body // 5 + 1, limits.max_events), EVENT_DTYPE)
        k, skipped, status, where_ = decode_k(
            buf,
            header.start,
            _LAYOUT[header.event_type][3],
            atis,
            header.width,
            header.height,
            limits.max_events,
            events["t"],
            events["x"],
            events["y"],
            events["p"],
        )
        if status == 3:
            check_count(k + 1, limits, offset=int(where_))
        elif status:
            _bad_event(buf, header, int(k + skipped), int(where_))
        events = events[:k].copy() if k < len(events) // 2 else events[:k]
        if atis:
            meta["skipped"]["exposure"] = int(skipped)
        return finish(events, header.width, header.height, "es", meta, monotonic=True, in_bounds=True)
    starts, t = _scan(buf, header.start, header.event_type)
    x, y = _fields(buf, starts, header)
    b0 = buf[starts]
    if atis:
        dvs = (b0 & 1) == 0
        meta["skipped"]["exposure"] = int(len(starts) - np.count_nonzero(dvs))
        keep = np.flatnonzero(dvs)
        t, x, y, p = t[keep], x[keep], y[keep], (b0[keep] >> 1) & 1
        offsets = starts[keep]
    else:
        p = b0 & 1
        offsets = starts
    # the bound on decoded events applies to what comes back (ATIS exposure events are dropped)
    check_count(
        len(t), limits, offset=int(offsets[limits.max_events]) if len(t) > limits.max_events else None
    )
    events = np.empty(len(t), EVENT_DTYPE)
    events["t"] = t
    events["x"] = x
    events["y"] = (header.height - 1) - y.astype(np.int64)
    events["p"] = p
    return finish(events, header.width, header.height, "es", meta, monotonic=True, in_bounds=True)


def encode(event_type: str, raw: np.ndarray, width: int = 0, height: int = 0) -> bytes:
    """Event Stream 2.0.0 bytes of raw events (fields as :func:`decode` returns them, y bottom-up,
    t non-decreasing and >= 0). For generic events, ``raw`` is a sequence of (t, bytes)."""
    if event_type not in CODES or event_type == "display":
        raise ValueError(f"cannot encode Event Stream event type {event_type!r}")
    head = MAGIC + bytes([2, 0, 0, CODES[event_type]])
    if event_type == "generic":
        return head + _encode_generic(raw)
    if not (0 < width < 65536 and 0 < height < 65536):
        raise ValueError(f"sensor size {width}x{height} does not fit in uint16")
    head += int(width).to_bytes(2, "little") + int(height).to_bytes(2, "little")
    size, _special, unit, shift = _LAYOUT[event_type]
    t = np.asarray(raw["t"], dtype=np.int64)
    if len(t) == 0:
        return head
    d = np.diff(t, prepend=0)
    if d.min() < 0:
        raise ValueError("Event Stream times must be non-negative and non-decreasing")
    if len(raw) and (int(raw["x"].max()) >= width or int(raw["y"].max()) >= height):
        raise ValueError(f"events outside the {width}x{height} sensor")
    steps, rem = np.divmod(d, unit)
    if event_type == "atis":  # one overflow byte carries up to 3 steps of 63 us
        n_over = steps // 3 + (steps % 3 != 0)
    else:
        n_over = steps
    ev_pos = np.cumsum(n_over + size) - size
    out = np.full(int(ev_pos[-1]) + size, 0xFF, dtype=np.uint8)
    if event_type == "atis":
        part = steps % 3
        has = part != 0
        out[ev_pos[has] - 1] = 0xFC | part[has]
        b0 = (
            (rem << shift)
            | (np.asarray(raw["polarity"], np.int64) << 1)
            | np.asarray(raw["exposure"], np.int64)
        )
    elif event_type == "dvs":
        b0 = (rem << shift) | np.asarray(raw["on"], np.int64)
    else:
        b0 = rem
    out[ev_pos] = b0
    x = np.asarray(raw["x"], np.int64)
    y = np.asarray(raw["y"], np.int64)
    out[ev_pos + 1] = x & 0xFF
    out[ev_pos + 2] = x >> 8
    out[ev_pos + 3] = y & 0xFF
    out[ev_pos + 4] = y >> 8
    if event_type == "color":
        for j, c in ((5, "r"), (6, "g"), (7, "b")):
            out[ev_pos + j] = raw[c]
    return head + out.tobytes()


def _encode_generic(raw: Any) -> bytes:
    out = bytearray()
    prev = 0
    for t, payload in raw:
        d = int(t) - prev
        if d < 0:
            raise ValueError("Event Stream times must be non-negative and non-decreasing")
        prev = int(t)
        steps, rem = divmod(d, 254)
        out += b"\xff" * steps
        out.append(rem)
        length = len(payload)
        while True:
            more = length >> 7
            out.append(((length & 0x7F) << 1) | (1 if more else 0))
            length = more
            if not length:
                break
        out += bytes(payload)
    return bytes(out)


def from_events(events: np.ndarray, width: int, height: int) -> bytes:
    """Event Stream DVS bytes of project-convention events (y top-down, flipped on the way)."""
    raw = np.empty(len(events), DVS_RAW)
    raw["t"] = events["t"]
    raw["x"] = events["x"]
    raw["y"] = (height - 1) - events["y"].astype(np.int64)
    raw["on"] = events["p"] != 0
    return encode("dvs", raw, width, height)
