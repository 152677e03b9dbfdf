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

from .._types import EventFormatError, Recording
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
from .evt import parse_header

CD_TYPES = (0x00, 0x0C)


def parse(data: bytes, *, limits: Limits, name: str = "") -> Recording:
    lines, start = text_header(data, b"%")
    fields, size = parse_header(lines)
    meta: dict[str, Any] = {"header": fields, "skipped": {}}
    if lines:
        if start + 2 > len(data):
            if start == len(data):
                raise EventFormatError("DAT file ends after its header (no event type/size bytes)", offset=start)
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
        raise EventFormatError(f"DAT data of {body} bytes is not a whole number of 8-byte events",
                               offset=start + body - body % 8)
    n = body // 8
    check_count(n, limits, offset=start)
    if size is not None:
        check_sensor(*size, what="header sensor size", offset=0)
    rec = np.frombuffer(data, dtype=[("t", "<u4"), ("a", "<u4")], count=n, offset=start)
    a = rec["a"]
    t, wraps = unwrap(rec["t"].astype(np.int64), 1 << 32)
    meta["time_wraps"] = wraps
    events = build_events(t, a & 0x3FFF, (a >> 14) & 0x3FFF, (a >> 28) & 1)
    if size is None:
        size = size_from_events(events)
        meta["sensor_size_from"] = "event coordinates"
    return finish(events, size[0], size[1], "dat", meta, offsets=start + 8 * np.arange(n, dtype=np.int64))
