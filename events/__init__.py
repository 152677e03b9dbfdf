"""Event-camera data: one dtype, readers and writers, binning, streaming, simulation.

Imports numpy only (never torch or fastapi). Names are loaded lazily so importing ``events``
stays cheap and each sub-module can be used on its own.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._types import EVENT_DTYPE, EventFormatError, EventLimitError, Recording, empty_events

_LAZY = {
    # readers / writers
    "read": "events.readers",
    "sniff_format": "events.readers",
    "write_aedat4": "events.writers",
    "write_npz": "events.writers",
    # binning / streaming
    "ROI": "events.binning",
    "BinSpec": "events.binning",
    "BinSegment": "events.binning",
    "Binner": "events.binning",
    "expand_segments": "events.binning",
    "count_bins": "events.binning",
    "bin_events": "events.binning",
    "MNIST_DVS": "events.binning",
    # simulation
    "simulate": "events.simulate",
    "simulate_mnist_dvs": "events.simulate",
}

__all__ = ["EVENT_DTYPE", "EventFormatError", "EventLimitError", "Recording", "empty_events", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'events' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
