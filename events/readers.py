"""``read``: one entry point for every event-file format, sniffed from magic bytes and headers.

Every read is bounded (``max_bytes`` of input, ``max_events`` decoded, ``max_decompressed``
bytes inflated from compressed packets) and every problem with the bytes comes out as
:class:`events.EventFormatError` saying what is wrong and where. The caller's buffers are never
modified.
"""

from __future__ import annotations

import importlib
import io
import mmap
import os
from pathlib import Path
from typing import IO, Any, cast

from ._types import EventFormatError, EventLimitError, Recording
from .formats._common import Limits

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]

#: Default input bound for paths (files are read whole).
MAX_BYTES_PATH = 2 << 30
#: Default input bound for in-memory bytes and file objects (uploads).
MAX_BYTES_BUFFER = 256 << 20
#: Default bound on decoded events (each takes 15 bytes in memory).
MAX_EVENTS = 200_000_000
#: Default bound on the total bytes compressed packets may inflate to (AEDAT 4).
MAX_DECOMPRESSED = 4 << 30

#: every name ``read(format=...)`` accepts
FORMATS = (
    "aedat1",
    "aedat2",
    "aedat31",
    "aedat4",
    "evt2",
    "evt3",
    "dat",
    "nmnist",
    "csv",
    "npy",
    "npz",
    "es",
)

_EXT_HINTS = {
    ".aedat4": "aedat4",
    ".raw": "evt",
    ".dat": "dat",
    ".bin": "nmnist",
    ".csv": "csv",
    ".txt": "csv",
    ".npy": "npy",
    ".npz": "npz",
    ".aedat": "aedat",
    ".es": "es",
}


def _hint(name: str) -> str | None:
    return _EXT_HINTS.get(Path(name).suffix.lower()) if name else None


def _header_lines(data: bytes, prefix: bytes, limit: int = 1 << 16) -> list[bytes]:
    lines = []
    pos = 0
    while pos < min(len(data), limit) and data.startswith(prefix, pos):
        end = data.find(b"\n", pos)
        if end < 0:
            end = len(data)
        lines.append(data[pos:end].rstrip(b"\r"))
        pos = end + 1
    return lines


def _looks_text(head: bytes) -> bool:
    if not head:
        return False
    allowed = set(b"0123456789+-.eE,; \t\r\nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_#@\"'")
    return all(b in allowed for b in head)


def sniff_format(data: bytes | bytearray | memoryview, name: str = "") -> str:
    """Name the format of ``data`` from its magic bytes and header; ``name`` is only a hint.

    Returns one of :data:`FORMATS`; raises EventFormatError when nothing matches.
    """
    head = bytes(data[:4096])
    hint = _hint(name)
    if head.startswith(b"#!AER-DAT4"):
        return "aedat4"
    if head.startswith(b"#!AER-DAT3"):
        return "aedat31"
    if head.startswith(b"#!AER-DAT2"):
        return "aedat2"
    if head.startswith(b"#!AER-DAT1"):
        return "aedat1"
    if head.startswith(b"#!AER-DAT"):
        raise EventFormatError(f"unknown AEDAT version {head[:16]!r}", offset=0)
    if head.startswith(b"Event Stream"):
        return "es"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "npz"
    if head.startswith(b"%"):
        return _sniff_prophesee(bytes(data[: 1 << 16]), hint)
    if head.startswith(b"#"):
        # jAER writes '#' comment lines; a CSV may too: look past the comments
        lines = _header_lines(bytes(data[: 1 << 20]), b"#")
        after = sum(len(x) + 1 for x in lines)
        rest = bytes(data[after : after + 512])
        if hint == "csv" or (rest and _looks_text(rest)) or (not rest and hint == "csv"):
            return "csv"
        return "aedat1"
    if hint in ("npy", "npz", "aedat4", "es"):
        raise EventFormatError(f"file named {name!r} lacks the {hint} magic bytes", offset=0)
    if _looks_text(head[:512]):
        return "csv"
    if hint == "nmnist" or (len(data) % 5 == 0 and len(data) > 0 and _plausible_nmnist(data)):
        return "nmnist"
    raise EventFormatError("unknown event-file format (no known magic bytes or header)", offset=0)


def _plausible_nmnist(data: bytes | bytearray | memoryview) -> bool:
    import numpy as np

    n = min(len(data) // 5, 2000)
    if n < 2:
        return False
    r = np.frombuffer(bytes(data[: n * 5]), dtype=np.uint8).reshape(n, 5).astype(np.int64)
    t = ((r[:, 2] & 0x7F) << 16) | (r[:, 3] << 8) | r[:, 4]
    return bool(np.all(np.diff(t) >= 0))


def _sniff_prophesee(head: bytes, hint: str | None) -> str:
    text = b"\n".join(_header_lines(head, b"%")).decode("latin-1").lower()
    if "evt 2.1" in text or "evt21" in text:
        raise EventFormatError("Prophesee EVT 2.1 is not supported", offset=0)
    if "evt 3" in text or "evt3" in text:
        return "evt3"
    if "evt 2" in text or "evt2" in text:
        return "evt2"
    if hint == "dat" or "data file containing" in text or "version" in text:
        return "dat"
    if hint == "evt":
        # openeb's default for .raw files without an 'evt' line (Gen3 cameras) is EVT 2.0
        return "evt2"
    return "dat"


def _limits(
    source_is_path: bool, max_bytes: int | None, max_events: int | None, max_decompressed: int | None
) -> Limits:
    return Limits(
        max_bytes=int(
            max_bytes if max_bytes is not None else (MAX_BYTES_PATH if source_is_path else MAX_BYTES_BUFFER)
        ),
        max_events=int(max_events if max_events is not None else MAX_EVENTS),
        max_decompressed=int(max_decompressed if max_decompressed is not None else MAX_DECOMPRESSED),
    )


def _load(source: Source, limits: Limits) -> tuple[Any, str | None, str]:
    """Return (bytes or a read-only mmap, path or None, name hint), enforcing ``max_bytes``.

    Files are memory-mapped: the binary parsers only take ``np.frombuffer`` views and small
    slices, so an 80 MB recording is never copied into a bytes object first.
    """
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > limits.max_bytes:
                    raise EventLimitError(f"{path}: {size} bytes exceeds max_bytes={limits.max_bytes}")
                if size == 0:
                    return b"", path, path
                try:
                    data: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):  # not mappable (a pipe, /proc ...): read it
                    data = f.read(limits.max_bytes + 1)
        except OSError as exc:
            raise EventFormatError(f"cannot read {path}: {exc}") from exc
        if len(data) > limits.max_bytes:
            raise EventLimitError(f"{path}: more than max_bytes={limits.max_bytes} bytes")
        return data, path, path
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > limits.max_bytes:
            raise EventLimitError(f"{len(source)} bytes exceeds max_bytes={limits.max_bytes}")
        # bytes() copies bytearray/memoryview so the parsers can never touch the caller's buffer
        return (source if isinstance(source, bytes) else bytes(source)), None, ""
    read = getattr(source, "read", None)
    if read is None:
        raise TypeError(f"read() takes a path, bytes or a binary file object, not {type(source).__name__}")
    try:
        data = read(limits.max_bytes + 1)
    except (OSError, ValueError) as exc:
        raise EventFormatError(f"cannot read the file object: {exc}") from exc
    if isinstance(data, str):
        raise TypeError("read() needs a binary file object (opened with 'rb')")
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise EventLimitError(f"input exceeds max_bytes={limits.max_bytes}")
    name = getattr(source, "name", "")
    return data, None, name if isinstance(name, str) else ""


def _parse(fmt: str, data: bytes, path: str | None, name: str, limits: Limits) -> Recording:
    if fmt in ("aedat1", "aedat2"):
        mod = importlib.import_module("events.formats.aedat2")
        return cast(
            Recording, mod.parse(data, limits=limits, version="1.0" if fmt == "aedat1" else "2.0", name=name)
        )
    if fmt in ("evt2", "evt3"):
        mod = importlib.import_module("events.formats.evt")
        return cast(Recording, mod.parse(data, limits=limits, version=fmt, name=name))
    if fmt == "aedat4":
        mod = importlib.import_module("events.formats.aedat4")
        return cast(Recording, mod.parse(data, limits=limits, path=path, name=name))
    if fmt in ("npy", "npz"):
        mod = importlib.import_module("events.formats.npy")
        return cast(Recording, mod.parse(data, limits=limits, kind=fmt, name=name))
    module = {"aedat31": "aedat31", "dat": "dat", "nmnist": "nmnist", "csv": "text", "es": "es"}.get(fmt)
    if module is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return cast(
        Recording, importlib.import_module(f"events.formats.{module}").parse(data, limits=limits, name=name)
    )


def read(
    source: Source,
    format: str | None = None,
    *,
    max_bytes: int | None = None,
    max_events: int | None = None,
    max_decompressed: int | None = None,
) -> Recording:
    """Read an event recording from a path, bytes or a binary file object.

    ``format`` (one of :data:`FORMATS`) skips sniffing. Defaults: ``max_bytes`` 2 GiB for paths
    and 256 MiB for bytes/file objects, ``max_events`` 200 M, ``max_decompressed`` 4 GiB.
    Returns a :class:`Recording` whose events are sorted by time (stable). Raises
    :class:`EventFormatError` for anything wrong with the input (including I/O errors).
    """
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    limits = _limits(isinstance(source, (str, os.PathLike)), max_bytes, max_events, max_decompressed)
    data, path, name = _load(source, limits)
    try:
        fmt = format or sniff_format(data, name)
        if isinstance(data, mmap.mmap) and fmt == "csv":
            data = data[:]  # the text loader wants real bytes (npy/npz take views of the map)
        rec = _parse(fmt, data, path, name, limits)
    except EventFormatError:
        raise
    except (MemoryError, RecursionError) as exc:
        raise EventFormatError(f"{fmt}: input too large or too deeply nested to decode ({exc!r})") from exc
    except (
        ValueError,
        IndexError,
        KeyError,
        TypeError,
        OverflowError,
        UnicodeError,
        io.UnsupportedOperation,
    ) as exc:
        # a parser bug or an unforeseen corruption: still the one error type, with the cause chained
        raise EventFormatError(f"{fmt}: malformed input ({type(exc).__name__}: {exc})") from exc
    finally:
        if isinstance(data, mmap.mmap):
            try:
                data.close()
            except BufferError:  # a traceback still holds a view; the GC closes it later
                pass
    rec.metadata.setdefault("source", name or "<bytes>")
    return rec


def describe(rec: Recording) -> dict[str, Any]:
    """A small JSON-able summary (format, sensor, events, duration) of a recording."""
    return {
        "format": rec.format,
        "width": rec.width,
        "height": rec.height,
        "events": len(rec),
        "duration_s": rec.duration_us / 1e6,
    }
