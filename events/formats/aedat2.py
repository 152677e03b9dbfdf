"""jAER AEDAT 1.0 / 2.0: ``#`` header lines, then big-endian (address, timestamp) pairs.

AEDAT 2.0 pairs are uint32 address + int32 timestamp (8 bytes); AEDAT 1.0 pairs are uint16
address + int32 timestamp (6 bytes). Timestamps tick in microseconds and wrap at 2**32.

Address layouts (raw fields as jAER stores them):

* DVS128 (``Tmpdiff128``/``DVS128`` chip classes): ``p_raw = a & 1``,
  ``x_raw = (a >> 1) & 0x7F``, ``y_raw = (a >> 8) & 0x7F``; bit 15 marks sync/special words.
* DAVIS (``DAVIS240*``, ``Davis346*``, ...): bit 31 set = APS sample (bits 10-11 = 0..2) or IMU
  word (bits 10-11 = 3); bit 31 clear with bit 10 set = external-input (special) event; else a
  DVS event with ``y_raw = (a >> 22) & 0x1FF``, ``x_raw = (a >> 12) & 0x3FF``,
  ``p_raw = (a >> 11) & 1``.

Conversion to the project convention (origin top-left, y down; see docs/events-formats.md):

* DVS128: jAER's extractor mirrors x (``setFlipx(true)``: ``x_jaer = 127 - x_raw``) and inverts
  the type bit (``setFliptype(true)``: ON when ``p_raw == 0``); jAER's y runs bottom-up. Hence
  ``x = W-1-x_raw``, ``y = H-1-y_raw``, ``p = 1 - p_raw``.
* DAVIS: jAER uses ``x_raw`` as is and ``y_raw`` bottom-up, so ``x = x_raw``,
  ``y = H-1-y_raw``, ``p = p_raw``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from .._types import EVENT_DTYPE, EventFormatError, Recording
from ._common import Limits, Offsets, check_count, finish, text_header, times_u32

#: chip-class (or hardware-interface) name fragment -> (width, height, layout); first match wins.
CHIPS: list[tuple[str, int, int, str]] = [
    ("davis240", 240, 180, "davis"),
    ("davis346", 346, 260, "davis"),
    ("dvs346", 346, 260, "davis"),
    ("davis640", 640, 480, "davis"),
    ("davis208", 208, 192, "davis"),
    ("davis128", 128, 128, "davis"),
    ("dvs128", 128, 128, "dvs128"),
    ("tmpdiff128", 128, 128, "dvs128"),
]
#: DAVIS sensor sizes tried, smallest first, when the header does not name the chip.
DAVIS_SIZES = [(128, 128), (208, 192), (240, 180), (346, 260), (640, 480)]


def _header_info(lines: list[str]) -> dict[str, Any]:
    info: dict[str, Any] = {"header_lines": len(lines)}
    for line in lines:
        body = line.lstrip("#").strip()
        if line.startswith("#!AER-DAT"):
            info["version"] = line[len("#!AER-DAT") :].strip()
        m = re.match(r"(AEChip|HardwareInterface)\s*:\s*(.+)", body)
        if m:
            info[m.group(1)] = m.group(2).strip()
        m = re.match(r"(created|Creation date)\s*:?\s*(.+)", body)
        if m and "created" not in info:
            info["created"] = m.group(2).strip()
    return info


def _chip(info: dict[str, Any]) -> tuple[int, int, str] | None:
    for key in ("AEChip", "HardwareInterface"):
        name = str(info.get(key, "")).lower().replace("_", "").replace(" ", "")
        if not name:
            continue
        for frag, w, h, layout in CHIPS:
            if frag in name:
                return w, h, layout
        if key == "HardwareInterface" and "davis" in name:
            return 0, 0, "davis"
    return None


def parse(data: bytes, *, limits: Limits, version: str | None = None, name: str = "") -> Recording:
    """Parse a jAER AEDAT 1.0/2.0 buffer (``version`` forces "1.0" or "2.0")."""
    lines, start = text_header(data, b"#")
    info = _header_info(lines)
    if version is None:
        # jAER: files without a version line are AEDAT 1.0
        version = info.get("version", "1.0")
    if version not in ("1.0", "2.0"):
        raise EventFormatError(f"unsupported jAER AEDAT version {version!r}", offset=0)
    word = 8 if version == "2.0" else 6
    body = len(data) - start
    n = body // word
    meta: dict[str, Any] = {"header": info, "aedat_version": version, "skipped": {}}
    if body % word:
        raise EventFormatError(
            f"AEDAT {version} data is truncated: {body} bytes after the header is not a multiple of {word}",
            offset=start + n * word,
        )
    check_count(n, limits, offset=start)
    chip = _chip(info)
    if version == "1.0":
        rec = np.frombuffer(data, dtype=[("a", ">u2"), ("t", ">u4")], count=n, offset=start)
        addr = rec["a"].astype(np.uint32)
        ts = rec["t"]
        layout = "dvs128"
    else:
        words = np.frombuffer(data, dtype=">u4", count=2 * n, offset=start)
        addr = words[0::2]
        ts = words[1::2]
        if chip is not None:
            layout = chip[2]
        else:
            # DVS128 addresses fit in 15 bits (+ sync bit 15); anything in bits 16-30 is DAVIS
            layout = "davis" if n and bool(np.any((addr & 0x7FFF0000) != 0)) else "dvs128"
    meta["layout"] = layout
    if layout == "dvs128":
        events, keep, (w, h), mono = _dvs128(data, start, n, word, addr, ts, meta)
    else:
        events, keep, (w, h), mono = _davis(data, start, n, addr, ts, chip, meta)
    meta["camera"] = info.get("AEChip") or info.get("HardwareInterface") or layout.upper()
    if keep is not None:
        kept = np.flatnonzero(keep)
        offsets: Offsets = lambda i: start + int(kept[i]) * word  # noqa: E731
    else:
        offsets = lambda i: start + i * word  # noqa: E731 - no 80 MB offset array for clean files
    return finish(
        events,
        w,
        h,
        "aedat2" if version == "2.0" else "aedat1",
        meta,
        offsets=offsets,
        monotonic=mono,
        in_bounds=True,
    )


def _le_words(data: bytes, start: int, n: int) -> np.ndarray:
    """The address words read little-endian: bit tests on them need no byte swapping."""
    return np.frombuffer(data, dtype="<u4", count=2 * n, offset=start)[0::2]


def _dvs128(
    data: bytes, start: int, n: int, word: int, addr: np.ndarray, ts: np.ndarray, meta: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], bool]:
    w = h = 128
    if word == 8:
        # big-endian mask 0xFFFF8000 (bits 15-31: sync/special) seen through a little-endian view
        special_any = n > 0 and bool(int(np.bitwise_or.reduce(_le_words(data, start, n))) & 0x0080FFFF)
    else:
        special_any = n > 0 and bool(np.any(addr & 0x8000))
    keep = None
    if special_any:
        special = (addr & 0xFFFF8000) != 0
        keep = ~special
        meta["skipped"]["special"] = int(np.count_nonzero(special))
        addr = addr[keep]
        ts = ts[keep]
        lo = (addr & 0xFF).astype(np.uint8)
        hi = ((addr >> 8) & 0xFF).astype(np.uint8)
    elif word == 8:
        # fast path: read the two low address bytes straight from the big-endian words
        u8 = np.frombuffer(data, dtype=np.uint8, count=n * 8, offset=start).reshape(n, 8)
        lo, hi = u8[:, 3], u8[:, 2]
    else:
        lo = (addr & 0xFF).astype(np.uint8)
        hi = ((addr >> 8) & 0xFF).astype(np.uint8)
    t, mono = times_u32(ts, meta)
    out = np.empty(len(t), dtype=EVENT_DTYPE)
    out["t"] = t
    out["x"] = (w - 1) - (lo >> 1)
    out["y"] = (h - 1) - (hi & 0x7F)
    out["p"] = 1 - (lo & 1)
    return out, keep, (w, h), mono


def _davis(
    data: bytes,
    start: int,
    n: int,
    addr: np.ndarray,
    ts: np.ndarray,
    chip: tuple[int, int, str] | None,
    meta: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int], bool]:
    # bit 31 (APS/IMU) and bit 10 (external input) of the big-endian word, little-endian view
    other_any = n > 0 and bool(int(np.bitwise_or.reduce(_le_words(data, start, n))) & 0x00040080)
    a = addr.astype(np.uint32)
    keep = None
    if other_any:
        aps_imu = (a >> 31) == 1
        imu = aps_imu & (((a >> 10) & 3) == 3)
        special = (~aps_imu) & ((a & 0x400) != 0)
        keep = ~(aps_imu | special)
        n_imu = int(np.count_nonzero(imu))
        meta["skipped"] = {
            "aps": int(np.count_nonzero(aps_imu)) - n_imu,
            "imu": n_imu,
            "special": int(np.count_nonzero(special)),
        }
        a = a[keep]
        ts = ts[keep]
    else:
        meta["skipped"] = {"aps": 0, "imu": 0, "special": 0}
    t, mono = times_u32(ts, meta)
    out = np.empty(len(t), dtype=EVENT_DTYPE)
    out["t"] = t
    del t
    # one reusable 32-bit scratch buffer: fresh 40 MB temporaries would each cost page faults
    tmp = np.empty_like(a)
    np.right_shift(a, 12, out=tmp)
    tmp &= 0x3FF
    mx = int(tmp.max()) if len(tmp) else 0
    out["x"] = tmp
    np.right_shift(a, 22, out=tmp)
    tmp &= 0x1FF
    my = int(tmp.max()) if len(tmp) else 0
    if chip is not None and chip[0] > 0:
        w, h = chip[0], chip[1]
    else:
        w, h = next(((sw, sh) for sw, sh in DAVIS_SIZES if mx < sw and my < sh), (mx + 1, my + 1))
        meta["sensor_size_from"] = "address range"
    if mx >= w or my >= h:
        xr = (a >> 12) & 0x3FF
        yr = (a >> 22) & 0x1FF
        i = int(np.argmax((xr >= w) | (yr >= h)))
        j = int(np.flatnonzero(keep)[i]) if keep is not None else i
        raise EventFormatError(
            f"DVS event {i} at raw (x={int(xr[i])}, y={int(yr[i])}) lies outside the {w}x{h} sensor",
            offset=start + 8 * j,
        )
    np.subtract(h - 1, tmp, out=tmp)
    out["y"] = tmp
    np.right_shift(a, 11, out=tmp)
    tmp &= 1
    out["p"] = tmp
    return out, keep, (w, h), mono
