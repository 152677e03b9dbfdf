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

from .._types import EVENT_DTYPE, EventFormatError, Recording
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


def _evt3(data: Any, start: int, limits: Limits, meta: dict[str, Any]):
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
    counts = np.bincount(typ, minlength=16)
    for code, label in ((0xA, "ext_trigger"), (0xE, "others"), (0x7, "continued_4"), (0xF, "continued_12")):
        if counts[code]:
            meta["skipped"][label] = int(counts[code])
    unknown = int(counts[[0x1, 0x9, 0xB, 0xC, 0xD]].sum())
    if unknown:
        meta["skipped"]["unknown"] = unknown

    # decoder state as "value of the latest word of that type", looked up only where events are:
    # the running count of each state word type indexes its value table (slot 0 = not seen yet)
    def state(mask: np.ndarray, values: np.ndarray, where_: np.ndarray) -> np.ndarray:
        table = np.concatenate([[0], values.astype(np.int64)])
        return table[np.cumsum(mask, dtype=np.int32)[where_]]

    th_seq = (w[is_th] & 0x0FFF).astype(np.int64)
    if len(th_seq) > 1:
        # the 24-bit time counter loops: TIME_HIGH stepping back by half its range or more
        loops = np.zeros(len(th_seq), np.int64)
        loops[1:] = np.cumsum(np.diff(th_seq) <= -(1 << 11))
        th_seq = th_seq + (loops << 12)
    is_tl = typ == 0x6
    is_y = typ == 0x0
    is_x = typ == 0x2
    is_vec = (typ == 0x4) | (typ == 0x5)
    prod = np.flatnonzero(is_x | is_vec)  # every word that yields events, in stream order
    prod_vec = is_vec[prod]
    k = np.flatnonzero(~prod_vec)  # ADDR_X words among them
    kv = np.flatnonzero(prod_vec)  # vector words among them
    x_pos = prod[k]
    vec_pos = prod[kv]
    t_prod = (state(is_th, th_seq, prod) << 12) | state(is_tl, w[is_tl] & 0x0FFF, prod)
    y_prod = state(is_y, w[is_y] & 0x07FF, prod)

    # vectors: x0 = base + (steps of the vector words since that base)
    is_base = typ == 0x3
    base_pos = np.flatnonzero(is_base)
    b = np.cumsum(is_base, dtype=np.int32)[vec_pos] - 1
    orphan = b < 0
    if orphan.any():
        meta["skipped"]["vector_without_base"] = int(np.count_nonzero(orphan))
    v12 = typ[vec_pos] == 0x4
    step = np.where(v12, 12, 8).astype(np.int64)
    cum = np.cumsum(step)
    before = np.searchsorted(vec_pos, base_pos[np.maximum(b, 0)])  # vector words before the base
    cum_at_base = np.where(before > 0, cum[np.maximum(before - 1, 0)], 0)
    base_word = w[base_pos[np.maximum(b, 0)]].astype(np.int64) if len(base_pos) else np.zeros(len(b), np.int64)
    x0 = (base_word & 0x7FF) + (cum - step - cum_at_base)
    pv = (base_word >> 11) & 1
    masks = (w[vec_pos] & np.where(v12, 0xFFF, 0xFF)).astype(np.int64)
    masks[orphan] = 0
    bits = ((masks[:, None] >> np.arange(12)) & 1).astype(bool)
    pop = bits.sum(axis=1)

    # output slots: one per ADDR_X word, popcount per vector word, in stream order
    per = np.ones(len(prod), np.int64)
    per[kv] = pop
    n = int(per.sum())
    check_count(n, limits, offset=start)
    slot = np.cumsum(per) - per
    out = np.empty(n, dtype=EVENT_DTYPE)
    off = np.empty(n, np.int64)
    sx = slot[k]
    wx = w[x_pos]
    out["t"][sx] = t_prod[k]
    out["x"][sx] = wx & 0x7FF
    out["y"][sx] = y_prod[k]
    out["p"][sx] = (wx >> 11) & 1
    off[sx] = x_pos
    if len(vec_pos):
        r, col = np.nonzero(bits)
        rank = np.arange(len(r)) - np.repeat(np.cumsum(pop) - pop, pop)
        sv = slot[kv][r] + rank
        xv = x0[r] + col
        if len(xv) and int(xv.max()) > 0xFFFF:
            i = int(np.argmax(xv > 0xFFFF))
            raise EventFormatError(f"EVT 3.0 vector runs past x={int(xv[i])}",
                                   offset=start + 2 * (first + int(vec_pos[r[i]])))
        out["t"][sv] = t_prod[kv][r]
        out["x"][sv] = xv
        out["y"][sv] = y_prod[kv][r]
        out["p"][sv] = pv[r]
        off[sv] = vec_pos[r]
    return out, start + 2 * (first + off)
