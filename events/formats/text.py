"""CSV / text: one event per line, ``t x y p`` (comma, semicolon, tab or space separated).

faery's ``t,x@W,y@H,on`` header gives the sensor size.

An optional first line naming the columns (any order of ``t``/``timestamp``, ``x``, ``y``,
``p``/``polarity``/``on``) is honoured; ``#`` lines are comments. ``t`` is in µs (integers;
a column with a decimal point is read as seconds). Sensor size: ``# width W height H`` or
``# WxH`` in a comment when present, else the largest coordinates + 1.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Any

import numpy as np

from .._types import EventFormatError, Recording
from ._common import Limits, build_events, check_count, check_sensor, finish, size_from_events

NAMES = {
    "t": "t",
    "ts": "t",
    "timestamp": "t",
    "time": "t",
    "x": "x",
    "y": "y",
    "p": "p",
    "pol": "p",
    "polarity": "p",
    "on": "p",
}


def parse(data: bytes, *, limits: Limits, name: str = "") -> Recording:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise EventFormatError(f"CSV is not ASCII text: {exc.reason}", offset=exc.start) from exc
    lines = text.splitlines()
    meta: dict[str, Any] = {"skipped": {}}
    size = None
    body_start = 0
    for i, line in enumerate(lines):
        s = line.strip()
        if not s or s.startswith("#"):
            m = re.search(r"width\D+(\d+)\D+height\D+(\d+)", s) or re.search(r"(\d+)\s*x\s*(\d+)", s)
            if m and size is None:
                size = (int(m.group(1)), int(m.group(2)))
            body_start = i + 1
            continue
        break
    rows = lines[body_start:]
    order = ["t", "x", "y", "p"]
    if rows:
        first = [c.strip().strip('"').lower() for c in re.split(r"[,;\t ]+", rows[0].strip())]
        if first and all(re.fullmatch(r"[-+0-9.eE]+", c) is None for c in first):
            # faery writes the sensor size into the header: t,x@640,y@480,on
            dims = {c.split("@")[0]: c.split("@")[1] for c in first if "@" in c}
            if dims.get("x", "").isdigit() and dims.get("y", "").isdigit():
                size = (int(dims["x"]), int(dims["y"]))
            first = [c.split("@")[0] for c in first]
            try:
                order = [NAMES[c] for c in first]
            except KeyError as exc:
                raise EventFormatError(
                    f"CSV header names an unknown column {exc.args[0]!r}",
                    offset=_line_offset(lines, body_start),
                ) from exc
            if sorted(order) != ["p", "t", "x", "y"]:
                raise EventFormatError(
                    f"CSV header must name t, x, y and p once each, not {first}",
                    offset=_line_offset(lines, body_start),
                )
            rows = rows[1:]
            body_start += 1
    rows = [r for r in rows if r.strip() and not r.lstrip().startswith("#")]
    check_count(len(rows), limits)
    if rows:
        sep = "," if "," in rows[0] else (";" if ";" in rows[0] else None)
        blob = "\n".join(rows).replace(";", ",") if sep == ";" else "\n".join(rows)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                arr = np.loadtxt(io.StringIO(blob), delimiter="," if sep else None, dtype=np.float64, ndmin=2)
        except (ValueError, UserWarning) as exc:
            raise EventFormatError(
                f"CSV rows are not four numbers each: {exc}", offset=_line_offset(lines, body_start)
            ) from exc
        if arr.shape[1] != 4:
            raise EventFormatError(
                f"CSV rows have {arr.shape[1]} columns, expected 4 (t x y p)",
                offset=_line_offset(lines, body_start),
            )
    else:
        arr = np.zeros((0, 4))
    cols = {k: arr[:, i] for i, k in enumerate(order)}
    t = cols["t"]
    if len(t) and not np.all(np.isfinite(arr)):
        raise EventFormatError("CSV holds non-finite numbers", offset=_line_offset(lines, body_start))
    if len(t) and np.any(t != np.round(t)):
        t = t * 1e6  # seconds
        meta["time_unit"] = "s"
    for k in ("x", "y"):
        c = cols[k]
        if len(c) and (c.min() < 0 or c.max() > 0xFFFF or np.any(c != np.round(c))):
            raise EventFormatError(
                f"CSV {k} column holds values that are not pixel indices",
                offset=_line_offset(lines, body_start),
            )
    p = cols["p"]
    if len(p) and not np.all(np.isin(p, (-1, 0, 1))):
        raise EventFormatError("CSV polarity must be 0/1 (or -1/1)", offset=_line_offset(lines, body_start))
    if len(t) and (np.abs(t).max() >= 2**62):
        raise EventFormatError("CSV timestamp out of range", offset=_line_offset(lines, body_start))
    events = build_events(
        np.round(t).astype(np.int64),
        cols["x"].astype(np.int64),
        cols["y"].astype(np.int64),
        (p > 0).astype(np.uint8),
    )
    if size is None:
        size = size_from_events(events)
        meta["sensor_size_from"] = "event coordinates"
    check_sensor(*size)
    return finish(events, size[0], size[1], "csv", meta)


def _line_offset(lines: list[str], i: int) -> int:
    return sum(len(x) + 1 for x in lines[:i])
