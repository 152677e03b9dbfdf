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
Each has two decoders giving identical results: one compiled pass (numba; EVT 3.0 a word-by-word
state machine) and a vectorised numpy one (forward-filled state), used for inputs under a
million words or without numba (see ``_jit``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from .._types import EVENT_DTYPE, EventFormatError, Recording
from ._common import Limits, check_count, check_sensor, finish, size_from_events, text_header
from ._jit import kernel, register

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
        hint = (
            (fields.get("plugin_name", "") + " " + fields.get("sensor_generation", ""))
            .lower()
            .replace(".", "")
        )
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
    fast = _evt2_fast if version == "evt2" else _evt3_fast
    got = fast(data, start, limits, meta)
    stats = None
    offsets: np.ndarray | Callable[[int], int]
    if got is not None:
        events, offsets, stats = got
    elif version == "evt2":
        events, offsets = _evt2(data, start, limits, meta)
    else:
        events, offsets = _evt3(data, start, limits, meta)
    if size is None:
        size = size_from_events(events) if stats is None or len(events) == 0 else (stats[0] + 1, stats[1] + 1)
        meta["sensor_size_from"] = "event coordinates"
    return finish(
        events,
        size[0],
        size[1],
        version,
        meta,
        offsets=offsets,
        monotonic=None if stats is None else stats[2],
        in_bounds=stats is not None and stats[0] < size[0] and stats[1] < size[1],
    )


def _shrink(out: np.ndarray, n: int) -> np.ndarray:
    """``out[:n]``, trimmed in place (realloc) when ``out`` owns its buffer."""
    if n == len(out):
        return out
    try:
        out.resize((n,), refcheck=False)
        return out
    except ValueError:  # pragma: no cover - always our own array here
        return out[:n].copy()


def _evt2_fast(
    data: Any, start: int, limits: Limits, meta: dict[str, Any]
) -> tuple[np.ndarray, Callable[[int], int], tuple[int, int, bool]] | None:
    """EVT 2.0 in one compiled pass (same semantics as :func:`_evt2`); None without numba."""
    body = len(data) - start
    decode = kernel(decode_evt2, body // 4)
    if decode is None:
        return None
    if body % 4:
        return None  # the numpy path raises the error
    w = np.frombuffer(data, "<u4", count=body // 4, offset=start)
    cap = min(len(w), limits.max_events + 1)
    out = np.empty(cap, EVENT_DTYPE)
    counts = np.zeros(16, np.int64)
    n, first, x_max, y_max, mono = decode(w, out["t"], out["x"], out["y"], out["p"], counts)
    check_count(int(n) if n <= cap else limits.max_events + 1, limits, offset=start)  # n = cap + 1: full
    meta["skipped"]["before_first_time_high"] = int(first)
    for code, label in ((0xA, "ext_trigger"), (0xE, "others"), (0xF, "continued")):
        if counts[code]:
            meta["skipped"][label] = int(counts[code])
    unknown = int(counts[[2, 3, 4, 5, 6, 7, 9, 0xB, 0xC, 0xD]].sum())
    if unknown:
        meta["skipped"]["unknown"] = unknown
    events = _shrink(out, int(n))

    def offset(i: int) -> int:  # the i-th CD word after the first TIME_HIGH
        ww = w[first:]
        return start + 4 * (int(first) + int(np.flatnonzero((ww >> 28) <= 1)[i]))

    return events, offset, (int(x_max), int(y_max), bool(mono))


@register
def decode_evt2(
    w: np.ndarray,
    t_out: np.ndarray,
    x_out: np.ndarray,
    y_out: np.ndarray,
    p_out: np.ndarray,
    counts: np.ndarray,
) -> tuple[Any, Any, Any, Any, Any]:
    """EVT 2.0 words to events (compiled by numba): words before the first TIME_HIGH are
    dropped; TIME_HIGH (28 bits of 64 µs) wraps when it steps back by more than 2^27. Stops
    when the outputs are full. Returns (events, index of the first TIME_HIGH, max x, max y,
    t never decreases); ``counts[type]`` counts the other words."""
    nw = len(w)
    first = 0
    while first < nw and (w[first] >> 28) != 0x8:
        first += 1
    cap = len(t_out)
    n = 0
    th = np.int64(0)
    prev = np.int64(-1)
    add = np.int64(0)
    last = np.int64(-(2**62))
    x_max = np.int64(-1)
    y_max = np.int64(-1)
    mono: Any = True
    for i in range(first, nw):
        v = np.int64(w[i])
        typ = v >> 28
        if typ <= 1:
            if n == cap:
                return n + 1, first, x_max, y_max, mono
            t = (th << 6) | ((v >> 22) & 0x3F)
            x = (v >> 11) & 0x7FF
            y = v & 0x7FF
            t_out[n] = t
            x_out[n] = x
            y_out[n] = y
            p_out[n] = typ
            n += 1
            mono &= t >= last
            last = t
            x_max = max(x_max, x)
            y_max = max(y_max, y)
        elif typ == 0x8:
            raw = v & 0x0FFFFFFF
            if prev >= 0 and raw - prev < -(np.int64(1) << np.int64(27)):
                add += np.int64(1) << np.int64(28)
            prev = raw
            th = raw + add
        else:
            counts[typ] += 1
    return n, first, x_max, y_max, mono


def _evt2(data: bytes, start: int, limits: Limits, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    body = len(data) - start
    if body % 4:
        raise EventFormatError(
            f"EVT 2.0 data of {body} bytes is not a whole number of 32-bit words",
            offset=start + body - body % 4,
        )
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
    unknown = int(
        len(w)
        - n
        - np.count_nonzero(is_th)
        - sum(meta["skipped"].get(k, 0) for k in ("ext_trigger", "others", "continued"))
    )
    if unknown:
        meta["skipped"]["unknown"] = unknown
    wc = w[cd]
    t = (th[last[cd]] << 6) | ((wc >> 22) & 0x3F).astype(np.int64)
    from ._common import build_events

    events = build_events(t, (wc >> 11) & 0x7FF, wc & 0x7FF, typ[cd])
    offsets = start + 4 * (first + np.flatnonzero(cd))
    return events, offsets


def _evt3_fast(
    data: Any, start: int, limits: Limits, meta: dict[str, Any]
) -> tuple[np.ndarray, Callable[[int], int], tuple[int, int, bool]] | None:
    """EVT 3.0 in compiled passes (same semantics as :func:`_evt3`); None without numba.

    The state machine runs word by word; when the output fills up (vectors yield up to 12
    events per word) it returns its state, the output grows by half and it resumes."""
    body = len(data) - start
    decode = kernel(decode_evt3, body // 2)
    if decode is None:
        return None
    if body % 2:
        return None  # the numpy path raises the error
    w = np.frombuffer(data, "<u2", count=body // 2, offset=start)
    state = np.zeros(_S_LEN, np.int64)
    state[_S_LAST] = -(2**62)
    state[_S_XMAX] = state[_S_YMAX] = -1
    state[_S_MONO] = 1
    state[_S_PREV_TH] = -1
    counts = np.zeros(16, np.int64)
    cap = min(len(w) + 16, limits.max_events + 13)
    out = np.empty(cap, EVENT_DTYPE)
    while True:
        done = decode(w, out["t"], out["x"], out["y"], out["p"], counts, state)
        n = int(state[_S_N])
        if n > limits.max_events:
            check_count(n, limits, offset=start)
        if done:
            break
        if state[_S_BAD] >= 0:
            i = int(state[_S_BAD])
            raise EventFormatError(f"EVT 3.0 vector runs past x={int(state[_S_BADX])}", offset=start + 2 * i)
        grown = np.empty(min(max(cap * 3 // 2, n + 12), limits.max_events + 13), EVENT_DTYPE)
        grown[:n] = out[:n]
        out, cap = grown, len(grown)
    first = int(state[_S_FIRST])
    meta["skipped"]["before_first_time_high"] = first
    for code, label in ((0xA, "ext_trigger"), (0xE, "others"), (0x7, "continued_4"), (0xF, "continued_12")):
        if counts[code]:
            meta["skipped"][label] = int(counts[code])
    unknown = int(counts[[0x1, 0x9, 0xB, 0xC, 0xD]].sum())
    if unknown:
        meta["skipped"]["unknown"] = unknown
    if state[_S_ORPHANS]:
        meta["skipped"]["vector_without_base"] = int(state[_S_ORPHANS])
    check_count(n, limits, offset=start)
    events = _shrink(out, n)

    def offset(i: int) -> int:  # the word that produced event i
        return start + 2 * int(locate_evt3(w, first, i))

    return events, offset, (int(state[_S_XMAX]), int(state[_S_YMAX]), bool(state[_S_MONO]))


# decode_evt3's state vector (resumable when the output fills up)
(
    _S_I,
    _S_N,
    _S_FIRST,
    _S_TH,
    _S_TL,
    _S_Y,
    _S_BASE,
    _S_POL,
    _S_HAVE_BASE,
    _S_LOOPS,
    _S_PREV_TH,
    _S_LAST,
    _S_XMAX,
    _S_YMAX,
    _S_MONO,
    _S_ORPHANS,
    _S_BAD,
    _S_BADX,
    _S_STARTED,
    _S_LEN,
) = range(20)


@register
def decode_evt3(
    w: np.ndarray,
    t_out: np.ndarray,
    x_out: np.ndarray,
    y_out: np.ndarray,
    p_out: np.ndarray,
    counts: np.ndarray,
    state: np.ndarray,
) -> bool:
    """EVT 3.0 state machine (compiled by numba), resumable: returns True when every word is
    decoded, False when the outputs are full (``state`` says where to resume) or a vector runs
    past x = 65535 (``state[_S_BAD]`` = its word index). Timestamps: ``(TH + loops * 4096) << 12
    | TL``, a loop when TIME_HIGH steps back by at least 2048."""
    nw = len(w)
    cap = len(t_out)
    if state[_S_STARTED] == 0:  # skip to the first TIME_HIGH
        first = 0
        while first < nw and (w[first] >> 12) != 0x8:
            first += 1
        state[_S_FIRST] = first
        state[_S_I] = first
        state[_S_STARTED] = 1
        state[_S_BAD] = -1
    i, n = state[_S_I], state[_S_N]
    th, tl, y, base, pol, have_base = (
        state[_S_TH],
        state[_S_TL],
        state[_S_Y],
        state[_S_BASE],
        state[_S_POL],
        state[_S_HAVE_BASE],
    )
    loops, prev_th, last = state[_S_LOOPS], state[_S_PREV_TH], state[_S_LAST]
    x_max, y_max, mono, orphans = state[_S_XMAX], state[_S_YMAX], state[_S_MONO], state[_S_ORPHANS]
    done = True
    while i < nw:
        if n + 12 > cap:
            done = False
            break
        v = np.int64(w[i])
        typ = v >> 12
        if typ == 0x2:
            t = (th << 12) | tl
            x = v & 0x7FF
            t_out[n] = t
            x_out[n] = x
            y_out[n] = y
            p_out[n] = (v >> 11) & 1
            n += 1
            if t < last:
                mono = 0
            last = t
            x_max = max(x_max, x)
            y_max = max(y_max, y)
        elif typ == 0x4 or typ == 0x5:
            step = 12 if typ == 0x4 else 8
            if have_base == 0:
                orphans += 1
            else:
                mask = v & (0xFFF if typ == 0x4 else 0xFF)
                if mask:
                    t = (th << 12) | tl
                    if t < last:
                        mono = 0
                    last = t
                    y_max = max(y_max, y)
                    for b in range(step):
                        if (mask >> b) & 1:
                            x = base + b
                            if x > 0xFFFF:
                                state[_S_BAD] = i
                                state[_S_BADX] = x
                                done = False
                                break
                            t_out[n] = t
                            x_out[n] = x
                            y_out[n] = y
                            p_out[n] = pol
                            n += 1
                            x_max = max(x_max, x)
                    if state[_S_BAD] >= 0:
                        break
                base += step
        elif typ == 0x0:
            y = v & 0x7FF
        elif typ == 0x3:
            base = v & 0x7FF
            pol = (v >> 11) & 1
            have_base = 1
        elif typ == 0x6:
            tl = v & 0xFFF
        elif typ == 0x8:
            raw = v & 0xFFF
            if prev_th >= 0 and raw - prev_th <= -2048:
                loops += 1
            prev_th = raw
            th = raw + (loops << 12)
        else:
            counts[typ] += 1
        i += 1
    state[_S_I], state[_S_N] = i, n
    state[_S_TH], state[_S_TL], state[_S_Y], state[_S_BASE] = th, tl, y, base
    state[_S_POL], state[_S_HAVE_BASE], state[_S_LOOPS], state[_S_PREV_TH] = pol, have_base, loops, prev_th
    state[_S_LAST], state[_S_XMAX], state[_S_YMAX], state[_S_MONO], state[_S_ORPHANS] = (
        last,
        x_max,
        y_max,
        mono,
        orphans,
    )
    return done


def locate_evt3(w: np.ndarray, first: int, k: int) -> int:
    """Index of the word that produced event ``k`` (error messages only; numpy)."""
    w = w[first:]
    typ = w >> 12
    is_base = typ == 0x3
    is_vec = (typ == 0x4) | (typ == 0x5)
    has_base = np.cumsum(is_base) > 0
    per = np.where(typ == 0x2, 1, 0)
    masks = np.where(typ == 0x4, w & 0xFFF, w & 0xFF).astype(np.int64)
    pop = ((masks[:, None] >> np.arange(12)) & 1).sum(axis=1)
    per = np.where(is_vec & has_base, pop, per)
    return first + int(np.searchsorted(np.cumsum(per), k, side="right"))


def _evt3(data: Any, start: int, limits: Limits, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    body = len(data) - start
    if body % 2:
        raise EventFormatError(
            f"EVT 3.0 data of {body} bytes is not a whole number of 16-bit words", offset=start + body - 1
        )
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
        return cast(np.ndarray, table[np.cumsum(mask, dtype=np.int32)[where_]])

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
    # vector words before the base (no base at all: every vector is an orphan, masked below)
    before = (
        np.searchsorted(vec_pos, base_pos[np.maximum(b, 0)]) if len(base_pos) else np.zeros(len(b), np.int64)
    )
    cum_at_base = np.where(before > 0, cum[np.maximum(before - 1, 0)], 0)
    base_word = (
        w[base_pos[np.maximum(b, 0)]].astype(np.int64) if len(base_pos) else np.zeros(len(b), np.int64)
    )
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
            raise EventFormatError(
                f"EVT 3.0 vector runs past x={int(xv[i])}", offset=start + 2 * (first + int(vec_pos[r[i]]))
            )
        out["t"][sv] = t_prod[kv][r]
        out["x"][sv] = xv
        out["y"][sv] = y_prod[kv][r]
        out["p"][sv] = pv[r]
        off[sv] = vec_pos[r]
    return out, start + 2 * (first + off)
