"""Prophesee EVT 2.0 and EVT 3.0 ``.raw`` files: ``% `` header lines, then little-endian words.

EVT 2.0 (32-bit words, type in bits 28-31):
``0x0`` CD_OFF / ``0x1`` CD_ON: ``ts_low`` bits 22-27, ``x`` bits 11-21, ``y`` bits 0-10;
``0x8`` TIME_HIGH: bits 0-27 are :math:`t \\gg 6`; so :math:`t = (\\mathrm{th} \\ll 6) \\mid
\\mathrm{ts\\_low}`. ``0xA`` EXT_TRIGGER, ``0xE`` OTHERS, ``0xF`` CONTINUED are skipped.

EVT 3.0 (16-bit words, type in bits 12-15), a stateful stream:
``0x0`` ADDR_Y (y = bits 0-10), ``0x2`` ADDR_X (x = bits 0-10, polarity bit 11; one event),
``0x3`` VECT_BASE_X (base x, polarity), ``0x4`` VECT_12 / ``0x5`` VECT_8 (a 12/8-bit mask:
one event at ``base + i`` per set bit i, then ``base += 12/8``), ``0x6`` TIME_LOW and ``0x8``
TIME_HIGH (12 bits each): :math:`t = L \\cdot 2^{24} + (\\mathrm{th} \\ll 12) \\mid
\\mathrm{tl}`, where the loop count L grows when TIME_HIGH steps back by at least half its range
(the 24-bit counter wrapped, every 16.8 s). ``0xA`` EXT_TRIGGER, ``0xE`` OTHERS, ``0x7``/``0xF``
CONTINUED are skipped and counted. As in openeb, words before the first TIME_HIGH are dropped.
Both decoders are vectorised (forward-filled state, no Python loop per word).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .._types import EventFormatError, Recording
from ._common import Limits, check_count, check_sensor, finish, size_from_events, text_header

#: ``plugin_name`` / ``sensor_generation`` fragments -> sensor size (openeb's camera plugins)
SENSORS = [
    ("imx636", 1280, 720),
    ("gen41", 1280, 720),
    ("gen4", 1280, 720),
    ("imx8", 640, 512),
    ("genx320", 320, 320),
    ("gen31", 640, 480),
    ("gen3", 640, 480),
]


def _ffill_index(mask: np.ndarray) -> np.ndarray:
    """For each position, the index of the last True at or before it (-1 if none)."""
    idx = np.where(mask, np.arange(len(mask), dtype=np.int64), -1)
    return np.maximum.accumulate(idx) if len(idx) else idx


def parse_header(lines: list[str]) -> tuple[dict[str, str], tuple[int, int] | None]:
    fields: dict[str, str] = {}
    for line in lines:
        body = line[1:].strip()
        if not body or body.lower() == "end":
            continue
        key, _, value = body.partition(" ")
        fields[key] = value.strip()
    size = None
    text = "\n".join(lines)
    m = re.search(r"height=(\d+);width=(\d+)", text) or None
    if m:
        size = (int(m.group(2)), int(m.group(1)))
    m2 = re.search(r"width=(\d+);height=(\d+)", text)
    if m2:
        size = (int(m2.group(1)), int(m2.group(2)))
    m3 = re.search(r"geometry\s+(\d+)x(\d+)", text)
    if m3:
        size = (int(m3.group(1)), int(m3.group(2)))
    m4 = re.search(r"^%\s*[Ww]idth\s+(\d+)", text, re.M)
    m5 = re.search(r"^%\s*[Hh]eight\s+(\d+)", text, re.M)
    if m4 and m5:
        size = (int(m4.group(1)), int(m5.group(1)))
    if size is None:
        hint = (fields.get("plugin_name", "") + " " + fields.get("sensor_generation", "")).lower().replace(".", "")
        for frag, w, h in SENSORS:
            if frag in hint:
                size = (w, h)
                break
    return fields, size


def parse(data: bytes, *, limits: Limits, version: str = "evt3", name: str = "") -> Recording:
    lines, start = text_header(data, b"%")
    fields, size = parse_header(lines)
    meta: dict[str, Any] = {"header": fields, "skipped": {}}
    if "serial_number" in fields or "plugin_name" in fields:
        meta["camera"] = " ".join(v for k, v in fields.items() if k in ("plugin_name", "serial_number"))
    if size is not None:
        check_sensor(*size, what="header sensor size", offset=0)
    if version == "evt2":
        events, offsets = _evt2(data, start, limits, meta)
    else:
        events, offsets = _evt3(data, start, limits, meta)
    if size is None:
        size = size_from_events(events)
        meta["sensor_size_from"] = "event coordinates"
    return finish(events, size[0], size[1], version, meta, offsets=offsets)


def _evt2(data: bytes, start: int, limits: Limits, meta: dict[str, Any]):
    body = len(data) - start
    if body % 4:
        raise EventFormatError(f"EVT 2.0 data of {body} bytes is not a whole number of 32-bit words",
                               offset=start + body - body % 4)
    w = np.frombuffer(data, "<u4", count=body // 4, offset=start)
    typ = w >> 28
    is_th = typ == 0x8
    first = int(np.argmax(is_th)) if is_th.any() else len(w)
    meta["skipped"]["before_first_time_high"] = first
    w, typ, is_th = w[first:], typ[first:], is_th[first:]
    th = (w & 0x0FFFFFFF).astype(np.int64)
    last = _ffill_index(is_th)
    th_seq = th[is_th]
    # TIME_HIGH is a 28-bit counter of 64 us units: unwrap it
    if len(th_seq) > 1:
        wraps = np.diff(th_seq) < -(1 << 27)
        if wraps.any():
            add = np.zeros(len(th_seq), np.int64)
            add[1:] = np.cumsum(wraps) << 28
            th_seq = th_seq + add
            th = th.copy()
            th[is_th] = th_seq
    cd = typ <= 1
    n = int(np.count_nonzero(cd))
    check_count(n, limits, offset=start)
    for code, label in ((0xA, "ext_trigger"), (0xE, "others"), (0xF, "continued")):
        c = int(np.count_nonzero(typ == code))
        if c:
            meta["skipped"][label] = c
    unknown = int(len(w) - n - np.count_nonzero(is_th) - sum(meta["skipped"].get(k, 0) for k in ("ext_trigger", "others", "continued")))
    if unknown:
        meta["skipped"]["unknown"] = unknown
    wc = w[cd]
    t = (th[last[cd]] << 6) | ((wc >> 22) & 0x3F).astype(np.int64)
    from ._common import build_events

    events = build_events(t, (wc >> 11) & 0x7FF, wc & 0x7FF, typ[cd])
    offsets = start + 4 * (first + np.flatnonzero(cd))
    return events, offsets


def _evt3(data: bytes, start: int, limits: Limits, meta: dict[str, Any]):
    from ._common import build_events

    body = len(data) - start
    if body % 2:
        raise EventFormatError(f"EVT 3.0 data of {body} bytes is not a whole number of 16-bit words",
                               offset=start + body - 1)
    w = np.frombuffer(data, "<u2", count=body // 2, offset=start)
    typ = (w >> 12).astype(np.uint8)
    is_th = typ == 0x8
    first = int(np.argmax(is_th)) if is_th.any() else len(w)
    meta["skipped"]["before_first_time_high"] = first
    w, typ, is_th = w[first:], typ[first:], is_th[first:]
    pay = (w & 0x0FFF).astype(np.int64)

    # time: forward-filled TIME_HIGH (with 24-bit loop unwrapping) and TIME_LOW
    th_full = np.zeros(len(w), np.int64)
    th_seq = pay[is_th]
    if len(th_seq) > 1:
        loops = np.zeros(len(th_seq), np.int64)
        loops[1:] = np.cumsum(np.diff(th_seq) <= -(1 << 11))
        th_seq = th_seq + (loops << 12)
    th_full[is_th] = th_seq
    th_ff = th_full[np.maximum(_ffill_index(is_th), 0)]
    is_tl = typ == 0x6
    tl_idx = _ffill_index(is_tl)
    tl_ff = np.where(tl_idx >= 0, pay[np.maximum(tl_idx, 0)], 0)
    t_all = (th_ff << 12) | tl_ff

    is_y = typ == 0x0
    y_idx = _ffill_index(is_y)
    y_all = np.where(y_idx >= 0, pay[np.maximum(y_idx, 0)] & 0x7FF, 0)

    is_x = typ == 0x2
    is_base = typ == 0x3
    is_v12 = typ == 0x4
    is_v8 = typ == 0x5
    is_vec = is_v12 | is_v8
    for code, label in ((0xA, "ext_trigger"), (0xE, "others"), (0x7, "continued_4"), (0xF, "continued_12")):
        c = int(np.count_nonzero(typ == code))
        if c:
            meta["skipped"][label] = c
    known = is_th | is_tl | is_y | is_x | is_base | is_vec | np.isin(typ, (0xA, 0xE, 0x7, 0xF))
    unknown = int(len(w) - np.count_nonzero(known))
    if unknown:
        meta["skipped"]["unknown"] = unknown

    # vectors: x0 = base + (steps of earlier vector words since that base)
    step = np.where(is_v12, 12, np.where(is_v8, 8, 0)).astype(np.int64)
    cum = np.cumsum(step)
    base_idx = _ffill_index(is_base)
    vec_pos = np.flatnonzero(is_vec)
    bi = base_idx[vec_pos]
    orphan = bi < 0
    if orphan.any():
        meta["skipped"]["vector_without_base"] = int(np.count_nonzero(orphan))
        vec_pos, bi = vec_pos[~orphan], bi[~orphan]
    x0 = (pay[bi] & 0x7FF) + (cum[vec_pos] - step[vec_pos] - cum[bi])
    pv = (pay[bi] >> 11) & 1
    masks = pay[vec_pos] & np.where(is_v12[vec_pos], 0xFFF, 0xFF)
    bits = ((masks[:, None] >> np.arange(12)) & 1).astype(bool)
    pop = bits.sum(axis=1)

    x_pos = np.flatnonzero(is_x)
    prod = np.concatenate([x_pos, vec_pos])
    counts = np.concatenate([np.ones(len(x_pos), np.int64), pop])
    order = np.argsort(prod, kind="stable")
    prod, counts = prod[order], counts[order]
    n = int(counts.sum())
    check_count(n, limits, offset=start)
    starts = np.cumsum(counts) - counts
    slot = np.empty(len(prod), np.int64)
    slot[order] = starts  # slot[k] = first output index of the k-th entry of [x_pos, vec_pos]

    t = np.empty(n, np.int64)
    x = np.empty(n, np.int64)
    y = np.empty(n, np.int64)
    p = np.empty(n, np.int64)
    off = np.empty(n, np.int64)
    sx = slot[: len(x_pos)]
    t[sx] = t_all[x_pos]
    x[sx] = pay[x_pos] & 0x7FF
    y[sx] = y_all[x_pos]
    p[sx] = (pay[x_pos] >> 11) & 1
    off[sx] = x_pos
    if len(vec_pos):
        r, col = np.nonzero(bits)
        rank = np.arange(len(r)) - np.repeat(np.cumsum(pop) - pop, pop)
        sv = slot[len(x_pos) :][r] + rank
        wpos = vec_pos[r]
        t[sv] = t_all[wpos]
        x[sv] = x0[r] + col
        y[sv] = y_all[wpos]
        p[sv] = pv[r]
        off[sv] = wpos
    if n and int(x.max()) > 0xFFFF:
        i = int(np.argmax(x > 0xFFFF))
        raise EventFormatError(f"EVT 3.0 vector runs past x={int(x[i])}", offset=start + 2 * (first + int(off[i])))
    events = build_events(t, x, y, p)
    return events, start + 2 * (first + off)
