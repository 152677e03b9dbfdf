"""Writers: AEDAT 4.0 (opened by DV software, dv-processing and ``aedat``) and npz.

The AEDAT 4.0 writer emits the file DV's recorder writes, minus the optional seek table:
``#!AER-DAT4.0\\r\\n``, a uint32 length, the IOHeader flatbuffer (compression, data-table
position -1 = "no table, scan the packets", and the XML description of one ``EVTS`` stream),
then packets of ``packet_events`` events each: int32 stream id 0, int32 size, and the LZ4/ZSTD
frame of a size-prefixed ``EventPacket`` flatbuffer whose elements are 16-byte
``Event {int64 t; int16 x; int16 y; bool on}`` structs.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Callable
from typing import IO

import numpy as np

from ._types import EVENT_DTYPE

_COMPRESSION = {"none": 0, "lz4": 1, "lz4_high": 2, "zstd": 3, "zstd_high": 4}
#: the flatbuffer struct ``Event`` (8-byte aligned, 3 bytes of padding)
_FB_EVENT = np.dtype(
    {
        "names": ["t", "x", "y", "on"],
        "formats": ["<i8", "<i2", "<i2", "u1"],
        "offsets": [0, 8, 10, 12],
        "itemsize": 16,
    }
)

_DESCRIPTION = """<dv version="2.0">
    <node name="outInfo" path="/mainloop/Recorder/outInfo/">
        <node name="0" path="/mainloop/Recorder/outInfo/0/">
            <attr key="compression" type="string">{compression}</attr>
            <attr key="originalModuleName" type="string">vdib</attr>
            <attr key="originalOutputName" type="string">events</attr>
            <attr key="typeDescription" type="string">Array of events (polarity ON/OFF).</attr>
            <attr key="typeIdentifier" type="string">EVTS</attr>
            <node name="info" path="/mainloop/Recorder/outInfo/0/info/">
                <attr key="sizeX" type="int">{width}</attr>
                <attr key="sizeY" type="int">{height}</attr>
                <attr key="source" type="string">{source}</attr>
                <attr key="tsOffset" type="long">0</attr>
            </node>
        </node>
    </node>
</dv>
"""


def _ioheader(compression: int, description: str) -> bytes:
    """IOHeader flatbuffer: root -> table {compression:int32, dataTablePosition:int64, infoNode:string}."""
    desc = description.encode("utf-8")
    head = bytearray()
    head += struct.pack("<I", 24)  # root table offset
    head += b"IOHE"  # file identifier
    head += struct.pack("<HHHHH", 10, 20, 4, 8, 16)  # vtable at 8: size, table size, field offsets
    head += b"\0" * (24 - len(head))
    head += struct.pack("<i", 24 - 8)  # table at 24: soffset to the vtable
    head += struct.pack("<i", compression)  # 28
    head += struct.pack("<q", -1)  # 32: no data table
    head += struct.pack("<I", 48 - 40)  # 40: offset to the string at 48
    head += b"\0" * 4
    head += struct.pack("<I", len(desc)) + desc + b"\0"
    head += b"\0" * (-len(head) % 8)
    return bytes(head)


def _event_packet(events: np.ndarray) -> bytes:
    """Size-prefixed EventPacket flatbuffer holding ``events``."""
    n = len(events)
    body = np.zeros(n, dtype=_FB_EVENT)
    body["t"] = events["t"]
    body["x"] = events["x"]
    body["y"] = events["y"]
    body["on"] = events["p"] != 0
    head = bytearray()
    total = 32 + 16 * n
    head += struct.pack("<I", total - 4)  # size prefix
    head += struct.pack("<I", 16)  # root: table at 4 + 16 = 20
    head += b"EVTS"
    head += struct.pack("<HHH", 6, 8, 4)  # vtable at 12
    head += b"\0\0"
    head += struct.pack("<i", 20 - 12)  # table at 20: soffset to the vtable
    head += struct.pack("<I", 28 - 24)  # 24: offset to the vector at 28
    head += struct.pack("<I", n)  # 28: vector length; elements start at 32 (8-aligned)
    return bytes(head) + body.tobytes()


def _compressor(compression: str) -> Callable[[bytes], bytes]:
    if compression in ("lz4", "lz4_high"):
        import lz4.frame

        level = lz4.frame.COMPRESSIONLEVEL_MINHC if compression == "lz4_high" else 0
        return lambda b: lz4.frame.compress(b, compression_level=level)
    if compression in ("zstd", "zstd_high"):
        import zstandard

        c = zstandard.ZstdCompressor(level=3 if compression == "zstd" else 19)
        return c.compress
    return lambda b: b


def write_aedat4(
    dest: str | os.PathLike[str] | IO[bytes],
    events: np.ndarray,
    width: int,
    height: int,
    compression: str = "lz4",
    *,
    packet_events: int = 16384,
    source: str = "vdib",
) -> None:
    """Write ``events`` (EVENT_DTYPE) to an AEDAT 4.0 file that DV software opens.

    ``compression``: "lz4" (default, what DV uses), "lz4_high", "zstd", "zstd_high" or "none".
    Events must lie on the ``width`` x ``height`` sensor and be sorted by time (DV requires
    monotonic time within a stream); ValueError otherwise.
    """
    if compression not in _COMPRESSION:
        raise ValueError(f"compression must be one of {sorted(_COMPRESSION)}, not {compression!r}")
    events = np.asarray(events)
    if events.dtype != EVENT_DTYPE:
        raise ValueError(f"events must have EVENT_DTYPE, not {events.dtype}")
    if not (0 < width <= 32767 and 0 < height <= 32767):
        raise ValueError(f"sensor size {width}x{height} does not fit AEDAT 4's int16 coordinates")
    if len(events):
        if int(events["x"].max()) >= width or int(events["y"].max()) >= height:
            raise ValueError(f"events lie outside the {width}x{height} sensor")
        if np.any(np.diff(events["t"]) < 0):
            raise ValueError("events must be sorted by t")
    if packet_events <= 0:
        raise ValueError("packet_events must be positive")
    compress = _compressor(compression)
    desc = _DESCRIPTION.format(
        compression=compression.upper().replace("_HIGH", "_HIGH"),
        width=int(width),
        height=int(height),
        source=source,
    )
    header = _ioheader(_COMPRESSION[compression], desc)
    own = isinstance(dest, (str, os.PathLike))
    f: IO[bytes] = open(dest, "wb") if isinstance(dest, (str, os.PathLike)) else dest
    try:
        f.write(b"#!AER-DAT4.0\r\n")
        f.write(struct.pack("<I", len(header)))
        f.write(header)
        for start in range(0, len(events), packet_events):
            chunk = compress(_event_packet(events[start : start + packet_events]))
            f.write(struct.pack("<iI", 0, len(chunk)))
            f.write(chunk)
    finally:
        if own:
            f.close()


def write_npz(
    dest: str | os.PathLike[str] | IO[bytes], events: np.ndarray, width: int, height: int, **metadata: object
) -> None:
    """Write ``events`` plus ``width``/``height`` (and scalar metadata) to an uncompressed .npz.

    ``events.read`` reads it back (no pickle: the events array has a plain structured dtype).
    """
    events = np.asarray(events)
    if events.dtype != EVENT_DTYPE:
        raise ValueError(f"events must have EVENT_DTYPE, not {events.dtype}")
    arrays: dict[str, np.ndarray] = {
        "events": events,
        "width": np.asarray(np.int64(width)),
        "height": np.asarray(np.int64(height)),
    }
    for k, v in metadata.items():
        arr = np.asarray(v)
        if arr.dtype == object:
            raise ValueError(f"metadata {k!r} is not a plain number/string array")
        if k in arrays:
            raise ValueError(f"metadata key {k!r} is reserved")
        arrays[k] = arr
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    data = buf.getvalue()
    if isinstance(dest, (str, os.PathLike)):
        with open(dest, "wb") as f:
            f.write(data)
    else:
        dest.write(data)
