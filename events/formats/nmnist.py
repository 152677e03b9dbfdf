"""N-MNIST / N-Caltech101 ``.bin`` (Orchard et al. 2015): 40-bit big-endian records.

Byte 0 = x, byte 1 = y, byte 2 bit 7 = polarity, bits 0-6 of byte 2 and bytes 3-4 = a 23-bit
timestamp in µs. A record with ``y == 240`` is a timestamp-overflow marker: every later event
gets :math:`2^{13}` µs more (as the dataset's own ``Read_Ndataset.m`` does). The sensor size is
34x34 (N-MNIST) when every event fits, else the ATIS's largest coordinates + 1 (N-Caltech101).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._types import EventFormatError, Recording
from ._common import Limits, build_events, check_count, finish, size_from_events

OVERFLOW_Y = 240
OVERFLOW_US = 1 << 13


def parse(data: bytes, *, limits: Limits, name: str = "") -> Recording:
    if len(data) % 5:
        raise EventFormatError(
            f"N-MNIST data of {len(data)} bytes is not a whole number of 5-byte events",
            offset=len(data) - len(data) % 5,
        )
    n = len(data) // 5
    check_count(n, limits, offset=0)
    r = np.frombuffer(data, dtype=np.uint8, count=5 * n).reshape(n, 5)
    ts = ((r[:, 2].astype(np.int64) & 0x7F) << 16) | (r[:, 3].astype(np.int64) << 8) | r[:, 4]
    over = r[:, 1] == OVERFLOW_Y
    meta: dict[str, Any] = {"skipped": {}}
    keep = np.flatnonzero(~over)
    if over.any():
        ts = ts + OVERFLOW_US * np.cumsum(over)
        meta["skipped"]["overflow_markers"] = int(np.count_nonzero(over))
    events = build_events(ts[keep], r[keep, 0], r[keep, 1], r[keep, 2] >> 7)
    w, h = size_from_events(events, default=(34, 34))
    if w <= 34 and h <= 34:
        w = h = 34
        meta["camera"] = "ATIS (N-MNIST 34x34)"
    else:
        meta["camera"] = "ATIS"
        meta["sensor_size_from"] = "event coordinates"
    return finish(events, w, h, "nmnist", meta, offsets=5 * keep)
