"""Prophesee DAT (N-CARS, older Prophesee tools): ``% `` header lines, then (when a header is
present) one byte event type and one byte event size, then 8-byte records: uint32 timestamp
(µs) and uint32 address with ``x`` in bits 0-13, ``y`` in bits 14-27 and polarity in bit 28.

Only CD events (type 0x00 or 0x0C, size 8) are supported. The sensor size comes from
``% Width`` / ``% Height`` (or ``% geometry WxH``) header lines when present, else from the
largest coordinates (N-CARS crops carry no geometry).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._types import EVENT_DTYPE, EventFormatError, Recording
from ._common import (
    Limits,
    build_events,
    check_count,
    check_sensor,
    finish,
    size_from_events,
    text_header,
    unwrap,
)
from ._jit import kernel, register
from .evt import parse_header

CD_TYPES = (0x00, 0x0C)


def parse(data: bytes, *, limits: Limits, name: str = "") -> Recording:
    lines, start = text_header(data, b"%")
    fields, size = parse_header(lines)
    meta: dict[str, Any] = {"header": fields, "skipped": {}}
    if lines:
        if start + 2 > len(data):
            if start == len(data):
                raise EventFormatError(
                    "DAT file ends after its header (no event type/size bytes)", offset=start
                )
            raise EventFormatError("DAT truncated event type/size bytes", offset=start)
        ev_type, ev_size = data[start], data[start + 1]
        if ev_type not in CD_TYPES or ev_size != 8:
            raise EventFormatError(
                f"DAT event type 0x{ev_type:02x} / size {ev_size} is not supported (CD events, size 8)",
                offset=start,
            )
        meta["event_type"] = int(ev_type)
        start += 2
    body = len(data) - start
    if body % 8:
        raise EventFormatError(
            f"DAT data of {body} bytes is not a whole number of 8-byte events", offset=start + body - body % 8
        )
    n = body // 8
    check_count(n, limits, offset=start)
    if size is not None:
        check_sensor(*size, what="header sensor size", offset=0)
    rec = np.frombuffer(data, dtype=[("t", "<u4"), ("a", "<u4")], count=n, offset=start)
    decode = kernel(decode_dat, n)
    stats = None
    if decode is not None:
        events = np.empty(n, EVENT_DTYPE)
        wraps, x_max, y_max, mono = decode(
            rec["t"], rec["a"], events["t"], events["x"], events["y"], events["p"]
        )
        stats = (int(x_max), int(y_max), bool(mono))
    else:
        a = rec["a"]
        t, wraps = unwrap(rec["t"].astype(np.int64), 1 << 32)
        events = build_events(t, a & 0x3FFF, (a >> 14) & 0x3FFF, (a >> 28) & 1)
    meta["time_wraps"] = int(wraps)
    if size is None:
        size = size_from_events(events) if stats is None or n == 0 else (stats[0] + 1, stats[1] + 1)
        meta["sensor_size_from"] = "event coordinates"
    return finish(
        events,
        size[0],
        size[1],
        "dat",
        meta,
        offsets=lambda i: start + 8 * i,
        monotonic=None if stats is None else stats[2],
        in_bounds=stats is not None and stats[0] < size[0] and stats[1] < size[1],
    )


@register
def decode_dat(
    ts: np.ndarray,
    addr: np.ndarray,
    t_out: np.ndarray,
    x_out: np.ndarray,
    y_out: np.ndarray,
    p_out: np.ndarray,
) -> tuple[Any, Any, Any, Any]:
    """One pass (compiled by numba): unwrap the 32-bit µs counter (a step back of more than
    2^31 is one wrap, as :func:`unwrap`), split the address, and return (wraps, max x, max y,
    whether t never decreases)."""
    wraps = 0
    add = np.int64(0)
    prev = np.int64(0)
    last = np.int64(-(2**62))
    x_max = np.int64(-1)
    y_max = np.int64(-1)
    mono: Any = True
    for i in range(len(ts)):
        raw = np.int64(ts[i])
        if i > 0 and raw - prev < -(np.int64(1) << np.int64(31)):
            wraps += 1
            add += np.int64(1) << np.int64(32)
        prev = raw
        t = raw + add
        a = np.int64(addr[i])
        x = a & 0x3FFF
        y = (a >> 14) & 0x3FFF
        t_out[i] = t
        x_out[i] = x
        y_out[i] = y
        p_out[i] = (a >> 28) & 1
        mono &= t >= last
        last = t
        x_max = max(x_max, x)
        y_max = max(y_max, y)
    return wraps, x_max, y_max, mono
