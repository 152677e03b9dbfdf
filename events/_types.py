"""The one event dtype, the recording container and the error types of ``events``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Every reader returns, and every transform takes, this dtype. ``t`` in microseconds; origin
#: top-left, x to the right, y down (AEDAT 4 / DV convention); ``p`` 0 = off, 1 = on.
EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])


class EventFormatError(ValueError):
    """Bad event data: what is wrong and where (byte ``offset`` and/or ``packet`` index).

    The only exception a reader lets escape; the service maps it to HTTP 415/422 or a
    websocket close code.
    """

    def __init__(self, message: str, *, offset: int | None = None, packet: int | None = None):
        where = []
        if packet is not None:
            where.append(f"packet {packet}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        super().__init__(f"{message} (at {', '.join(where)})" if where else message)
        self.offset = offset
        self.packet = packet


class EventLimitError(EventFormatError):
    """Bad event data that passes a configured limit (bytes, events, decompressed bytes, bins):
    refused before the work or the memory it asks for (the service answers 413 / close 1008)."""


@dataclass
class Recording:
    """Events sorted by ``t`` (stable) with the sensor size and what the reader learned."""

    events: np.ndarray
    width: int
    height: int
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_us(self) -> int:
        if len(self.events) == 0:
            return 0
        return int(self.events["t"][-1] - self.events["t"][0])

    def __len__(self) -> int:
        return len(self.events)


def empty_events(n: int = 0) -> np.ndarray:
    return np.zeros(n, dtype=EVENT_DTYPE)
