"""``.npy`` / ``.npz`` of the event dtype (never unpickled: ``allow_pickle=False`` always).

``.npy``: one structured array with fields t, x, y, p (any integer/bool types; tonic's
``(x, y, t, p)`` order and ``on`` for ``p`` accepted). ``.npz``: an ``events`` array plus
optional ``width`` / ``height`` scalars, as ``events.write_npz`` writes.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from .._types import EVENT_DTYPE, EventFormatError, EventLimitError, Recording
from ._common import Limits, build_events, check_count, check_sensor, finish, size_from_events


def _load_npy(buf: Any, limits: Limits, what: str, offset: int = 0, length: int | None = None) -> np.ndarray:
    """The array of the ``.npy`` bytes ``buf[offset:offset+length]``, as a zero-copy view."""
    if length is None:
        length = len(buf) - offset
    head = io.BytesIO(bytes(buf[offset : offset + min(length, (1 << 16) + 16)]))
    try:
        version = np.lib.format.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(head, max_header_size=1 << 16)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(head, max_header_size=1 << 16)
    except (ValueError, EOFError) as exc:
        raise EventFormatError(f"{what}: bad .npy header: {exc}", offset=0) from exc
    if dtype.hasobject:
        raise EventFormatError(f"{what}: object arrays are refused (no pickle)", offset=0)
    n = int(np.prod(shape)) if shape else 1
    check_count(n, limits, offset=0)
    start = head.tell()
    if n * dtype.itemsize > length - start:
        raise EventFormatError(f"{what}: header claims {n} items but the data is truncated", offset=start)
    try:
        arr = np.frombuffer(buf, dtype=dtype, count=n, offset=offset + start)
    except (ValueError, TypeError) as exc:
        raise EventFormatError(f"{what}: {exc}", offset=0) from exc
    return arr.reshape(shape, order="F" if fortran else "C")


def _to_events(arr: np.ndarray, what: str) -> np.ndarray:
    names = arr.dtype.names or ()
    p_name = (
        "p" if "p" in names else ("on" if "on" in names else ("polarity" if "polarity" in names else None))
    )
    t_name = "t" if "t" in names else ("timestamp" if "timestamp" in names else None)
    if arr.ndim != 1 or t_name is None or p_name is None or "x" not in names or "y" not in names:
        raise EventFormatError(
            f"{what}: expected a 1-D structured array with t, x, y, p fields, got "
            f"shape {arr.shape} dtype {arr.dtype}",
            offset=0,
        )
    for k in (t_name, "x", "y", p_name):
        if arr.dtype[k].kind not in "iub":
            raise EventFormatError(f"{what}: field {k} has non-integer type {arr.dtype[k]}", offset=0)
    if arr.ndim == 1 and arr.dtype == EVENT_DTYPE and arr.flags.c_contiguous:
        # one byte copy out of the file's buffer (a structured copy is 4x slower)
        out = np.empty(len(arr), EVENT_DTYPE)
        out.view(np.uint8)[:] = arr.view(np.uint8)
        if len(out) == 0 or int(out["p"].max()) <= 1:
            return out
        arr = out  # p beyond 0/1: normalised below
    for k in ("x", "y"):
        if len(arr) and (int(arr[k].min()) < 0 or int(arr[k].max()) > 0xFFFF):
            raise EventFormatError(f"{what}: field {k} holds values outside 0..65535", offset=0)
    if len(arr) and arr.dtype[t_name].kind == "u" and int(arr[t_name].max()) >= 1 << 63:
        raise EventFormatError(f"{what}: timestamps do not fit in int64", offset=0)
    return build_events(arr[t_name], arr["x"], arr["y"], arr[p_name] > 0)


class _MapFile:
    """An mmap as the seekable file zipfile wants (``mmap.seekable`` only exists from 3.13)."""

    def __init__(self, m: Any):
        self._m = m

    def seekable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)


def _member_array(
    z: zipfile.ZipFile, info: zipfile.ZipInfo, data: Any, limits: Limits, what: str
) -> np.ndarray:
    """The array stored in one npz member: a view into ``data`` for a stored (uncompressed)
    member after its CRC-32 is checked (zipfile would copy it twice); inflated otherwise."""
    at = info.header_offset
    if info.compress_type == zipfile.ZIP_STORED and info.flag_bits & 1 == 0:
        if at + 30 > len(data) or bytes(data[at : at + 4]) != b"PK\x03\x04":
            raise EventFormatError(f"npz: member {info.filename} has no local header", offset=at)
        name_len, extra_len = struct.unpack("<HH", bytes(data[at + 26 : at + 30]))
        begin = at + 30 + name_len + extra_len
        if info.compress_size != info.file_size or begin + info.file_size > len(data):
            raise EventFormatError(f"npz: member {info.filename} runs past the end of the archive", offset=at)
        view = memoryview(data)[begin : begin + info.file_size]
        try:
            if zlib.crc32(view) != info.CRC:
                raise EventFormatError(
                    f"npz: member {info.filename} is corrupt (CRC-32 mismatch)", offset=begin
                )
        finally:
            view.release()
        return _load_npy(data, limits, what, begin, info.file_size)
    try:
        with z.open(info) as f:
            out = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise EventFormatError(f"npz: member {info.filename} is corrupt: {exc}", offset=at) from exc
    if len(out) > info.file_size:
        raise EventFormatError(f"npz: member {info.filename} is longer than declared", offset=at)
    return _load_npy(out, limits, what)


def parse(data: Any, *, limits: Limits, kind: str = "npy", name: str = "") -> Recording:
    meta: dict[str, Any] = {"skipped": {}}
    size = None
    if kind == "npy":
        arr = _load_npy(data, limits, "npy")
    else:
        try:
            z = zipfile.ZipFile(_MapFile(data) if hasattr(data, "seek") else io.BytesIO(data))
            infos = {i.filename: i for i in z.infolist()}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
            raise EventFormatError(f"npz: not a valid zip archive: {exc}", offset=0) from exc
        total = sum(i.file_size for i in infos.values())
        if total > limits.max_decompressed or total > 64 * max(len(data), 1 << 20):
            raise EventLimitError(f"npz: members inflate to {total} bytes (decompression bomb?)", offset=0)
        if "events.npy" not in infos:
            raise EventFormatError(f"npz: no 'events' array (members: {sorted(infos)[:10]})", offset=0)
        arr = _member_array(z, infos["events.npy"], data, limits, "npz events")
        if "width.npy" in infos and "height.npy" in infos:
            w = _member_array(z, infos["width.npy"], data, limits, "npz width")
            h = _member_array(z, infos["height.npy"], data, limits, "npz height")
            if w.size != 1 or h.size != 1 or w.dtype.kind not in "iu" or h.dtype.kind not in "iu":
                raise EventFormatError("npz: width/height must be integer scalars", offset=0)
            size = (int(w.reshape(())), int(h.reshape(())))
            check_sensor(*size, what="npz sensor size", offset=0)
    events = _to_events(arr, kind)
    if size is None:
        size = size_from_events(events)
        meta["sensor_size_from"] = "event coordinates"
    return finish(events, size[0], size[1], kind, meta)
