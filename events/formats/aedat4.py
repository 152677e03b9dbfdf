"""AEDAT 4.0 (DV software): decoded by the ``aedat`` package after our own structural checks.

File layout: ``#!AER-DAT4.0\\r\\n``, a uint32 length, the IOHeader flatbuffer (compression,
data-table position, the XML description of the streams), then packets: int32 stream id,
int32 byte size, that many bytes of a (possibly LZ4/ZSTD-compressed) size-prefixed flatbuffer.

The ``aedat`` decoder trusts the IOHeader and allocates whatever a packet header asks for, so
before handing it the file we walk every packet header ourselves: sizes must fit in the file,
stream ids must be declared, and every compressed packet must inflate to at most the per-packet
cap (declared frame content sizes are checked; LZ4 frames without one, as DV writes them, are
bounded by LZ4's maximum ratio of 255:1; anything else is decompressed once with a bound). That
stops decompression bombs before anything large is allocated. The total cap
(``max_decompressed``) is checked on declared sizes before decoding and on what the decoder
returns while decoding.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from typing import Any

import numpy as np

from .._types import EVENT_DTYPE, EventFormatError, Recording
from ._common import Limits, check_count, check_sensor, finish

MAGIC = b"#!AER-DAT4.0\r\n"
COMPRESSION = {0: "none", 1: "lz4", 2: "lz4_high", 3: "zstd", 4: "zstd_high"}
#: no single packet may inflate beyond this (DV writes packets of a few hundred kB)
MAX_PACKET_BYTES = 256 << 20
#: LZ4's worst-case compression ratio: an LZ4 frame of n bytes inflates to at most 255 n
LZ4_MAX_RATIO = 255
#: bytes of one event in an EVTS flatbuffer (int64 t, int16 x, int16 y, bool on, padding)
EVENT_STRUCT_BYTES = 16


def _u32(b: bytes, pos: int, what: str) -> int:
    if pos < 0 or pos + 4 > len(b):
        raise EventFormatError(f"AEDAT4 IOHeader: {what} out of range", offset=pos)
    return struct.unpack_from("<I", b, pos)[0]


def parse_ioheader(buf: bytes, base: int) -> dict[str, Any]:
    """Decode the IOHeader flatbuffer (compression, data-table position, description), checked."""
    n = len(buf)
    root = _u32(buf, 0, "root offset")
    if root + 4 > n:
        raise EventFormatError("AEDAT4 IOHeader root offset points outside the header", offset=base)
    vt = root - struct.unpack_from("<i", buf, root)[0]
    if vt < 0 or vt + 4 > n:
        raise EventFormatError("AEDAT4 IOHeader vtable outside the header", offset=base + root)
    vt_size, _ = struct.unpack_from("<HH", buf, vt)
    if vt_size < 4 or vt + vt_size > n:
        raise EventFormatError("AEDAT4 IOHeader vtable size is invalid", offset=base + vt)

    def field(i: int) -> int:
        at = 4 + 2 * i
        if at + 2 > vt_size:
            return 0
        return struct.unpack_from("<H", buf, vt + at)[0]

    out: dict[str, Any] = {"compression": 0, "data_table_position": -1, "description": ""}
    off = field(0)
    if off:
        if root + off + 4 > n:
            raise EventFormatError("AEDAT4 IOHeader compression field out of range", offset=base + root)
        out["compression"] = struct.unpack_from("<i", buf, root + off)[0]
    off = field(1)
    if off:
        if root + off + 8 > n:
            raise EventFormatError("AEDAT4 IOHeader data position out of range", offset=base + root)
        out["data_table_position"] = struct.unpack_from("<q", buf, root + off)[0]
    off = field(2)
    if off:
        spos = root + off + _u32(buf, root + off, "description offset")
        slen = _u32(buf, spos, "description length")
        if spos + 4 + slen > n:
            raise EventFormatError("AEDAT4 IOHeader description runs past the header", offset=base + spos)
        out["description"] = buf[spos + 4 : spos + 4 + slen].decode("utf-8", errors="replace")
    if out["compression"] not in COMPRESSION:
        raise EventFormatError(f"AEDAT4 unknown compression {out['compression']}", offset=base)
    return out


def parse_description(xml: str) -> dict[int, dict[str, Any]]:
    """Streams declared in the IOHeader XML: id -> {type identifier, size, source, ...}."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise EventFormatError(f"AEDAT4 IOHeader description is not valid XML: {exc}") from exc
    streams: dict[int, dict[str, Any]] = {}
    out_info = next((n for n in root.iter("node") if n.get("name") == "outInfo"), None)
    if out_info is None:
        raise EventFormatError("AEDAT4 description has no outInfo node")
    for node in out_info.findall("node"):
        try:
            sid = int(node.get("name", ""))
        except ValueError as exc:
            raise EventFormatError(f"AEDAT4 stream node with non-numeric id {node.get('name')!r}") from exc
        attrs = {a.get("key"): (a.text or "") for a in node.findall("attr")}
        info: dict[str, Any] = {"type": attrs.get("typeIdentifier", ""), "name": attrs.get("originalOutputName", "")}
        inf = node.find("node[@name='info']")
        if inf is not None:
            ia = {a.get("key"): (a.text or "") for a in inf.findall("attr")}
            for k in ("sizeX", "sizeY"):
                if k in ia:
                    try:
                        info[k] = int(ia[k])
                    except ValueError as exc:
                        raise EventFormatError(f"AEDAT4 stream {sid}: {k}={ia[k]!r} is not an integer") from exc
            if "source" in ia:
                info["source"] = ia["source"]
        streams[sid] = info
    if not streams:
        raise EventFormatError("AEDAT4 description declares no stream")
    return streams


def _inflated_size(comp: int, data: Any, begin: int, size: int, pos: int, packet: int) -> tuple[int, bool]:
    """(upper bound on what ``data[begin:begin+size]`` inflates to, whether it is exact).

    Reads only the frame header unless it must decompress (bounded) to find out.
    """
    if comp == 0:
        return size, True
    if comp in (1, 2) and LZ4_MAX_RATIO * size <= MAX_PACKET_BYTES:
        # LZ4 cannot inflate past 255:1, so a small packet is safe whatever its header says
        # (DV does not store content sizes); the total is then enforced while decoding
        return LZ4_MAX_RATIO * size, False
    head = bytes(data[begin : begin + min(size, 32)])
    if comp in (1, 2):
        import lz4.frame

        try:
            declared = lz4.frame.get_frame_info(head).get("content_size", 0)
        except Exception as exc:  # lz4 raises RuntimeError on a bad frame header
            raise EventFormatError(f"AEDAT4 corrupt LZ4 packet header: {exc}", offset=pos, packet=packet) from exc
        if declared:
            return int(declared), True
        return _bounded_lz4(bytes(data[begin : begin + size]), pos, packet), True
    import zstandard

    try:
        declared = zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise EventFormatError(f"AEDAT4 corrupt ZSTD packet header: {exc}", offset=pos, packet=packet) from exc
    if declared >= 0:
        return int(declared), True
    return _bounded_zstd(bytes(data[begin : begin + size]), pos, packet), True


def _bounded_lz4(chunk: bytes, pos: int, packet: int) -> int:
    import lz4.frame

    d = lz4.frame.LZ4FrameDecompressor()
    try:
        total = len(d.decompress(chunk, max_length=1 << 20))
        while not d.eof and not d.needs_input and total <= MAX_PACKET_BYTES:
            total += len(d.decompress(b"", max_length=1 << 20))
    except Exception as exc:  # lz4 raises RuntimeError on corrupt blocks
        raise EventFormatError(f"AEDAT4 corrupt LZ4 packet: {exc}", offset=pos, packet=packet) from exc
    return total


def _bounded_zstd(chunk: bytes, pos: int, packet: int) -> int:
    import zstandard

    total = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(chunk) as r:
            while total <= MAX_PACKET_BYTES:
                out = r.read(1 << 20)
                if not out:
                    break
                total += len(out)
    except zstandard.ZstdError as exc:
        raise EventFormatError(f"AEDAT4 corrupt ZSTD packet: {exc}", offset=pos, packet=packet) from exc
    return total


def prescan(data: Any, limits: Limits) -> dict[str, Any]:
    """Validate the file structure and bound every packet; return header and per-stream counts."""
    if data[: len(MAGIC)] != MAGIC:
        raise EventFormatError("not an AEDAT 4.0 file (wrong magic)", offset=0)
    pos = len(MAGIC)
    if pos + 4 > len(data):
        raise EventFormatError("AEDAT4 truncated before the IOHeader length", offset=pos)
    hlen = struct.unpack_from("<I", data, pos)[0]
    pos += 4
    if pos + hlen > len(data):
        raise EventFormatError(f"AEDAT4 IOHeader of {hlen} bytes runs past the end of the file", offset=pos)
    header = parse_ioheader(bytes(data[pos : pos + hlen]), pos)
    streams = parse_description(header["description"])
    pos += hlen
    end = header["data_table_position"]
    if end < 0:
        end = len(data)
    elif end < pos or end > len(data):
        raise EventFormatError(f"AEDAT4 data table position {end} is outside the packet area", offset=pos - hlen)
    comp = header["compression"]
    total = 0
    n_packets = 0
    per_stream: dict[int, int] = {}
    while pos < end:
        if pos + 8 > end:
            raise EventFormatError("AEDAT4 truncated packet header", offset=pos, packet=n_packets)
        sid, size = struct.unpack_from("<iI", data, pos)
        if sid not in streams:
            raise EventFormatError(f"AEDAT4 packet for undeclared stream {sid}", offset=pos, packet=n_packets)
        if pos + 8 + size > end:
            raise EventFormatError(
                f"AEDAT4 packet of {size} bytes runs past the end of the data", offset=pos, packet=n_packets
            )
        if size < 8:
            raise EventFormatError(f"AEDAT4 packet of {size} bytes is too small", offset=pos, packet=n_packets)
        inflated, exact = _inflated_size(comp, data, pos + 8, size, pos, n_packets)
        if inflated > MAX_PACKET_BYTES:
            raise EventFormatError(
                f"AEDAT4 packet inflates to {inflated} bytes, more than the {MAX_PACKET_BYTES} allowed "
                "(decompression bomb?)",
                offset=pos,
                packet=n_packets,
            )
        total += inflated if exact else 0
        if total > limits.max_decompressed:
            raise EventFormatError(
                f"AEDAT4 packets inflate to more than max_decompressed={limits.max_decompressed} bytes",
                offset=pos,
                packet=n_packets,
            )
        per_stream[sid] = per_stream.get(sid, 0) + 1
        pos += 8 + size
        n_packets += 1
    return {
        "header": header,
        "streams": streams,
        "packets": n_packets,
        "packets_per_stream": per_stream,
        "compression": COMPRESSION[comp],
    }


def parse(data: Any, *, limits: Limits, path: str | None = None, name: str = "") -> Recording:
    """Parse an AEDAT 4.0 file (``path`` is decoded in place; bytes go through a temp file)."""
    info = prescan(data, limits)
    streams = info["streams"]
    event_ids = sorted(s for s, v in streams.items() if v["type"] == "EVTS")
    meta: dict[str, Any] = {
        "compression": info["compression"],
        "streams": {str(k): dict(v) for k, v in streams.items()},
        "packets": info["packets"],
        "skipped": {},
    }
    m = re.search(r"<attr key=\"(?:source|cameraModel)\" type=\"string\">([^<]*)</attr>", info["header"]["description"])
    if m:
        meta["camera"] = m.group(1)
    if not event_ids:
        width = height = 1
        for v in streams.values():
            if "sizeX" in v:
                width, height = v["sizeX"], v["sizeY"]
                break
        meta["skipped"] = {_kind(streams[s]["type"]): c for s, c in info["packets_per_stream"].items()}
        return finish(np.zeros(0, EVENT_DTYPE), width, height, "aedat4", meta)
    main = event_ids[0]
    width = int(streams[main].get("sizeX", 0))
    height = int(streams[main].get("sizeY", 0))
    check_sensor(width, height, what=f"AEDAT4 events stream {main} size")
    chunks, skipped, stats = _decode(data, path, main, streams, limits)
    for k, v in skipped.items():
        meta["skipped"][k] = v
    events = _concat(chunks)
    return finish(events, width, height, "aedat4", meta, monotonic=stats["monotonic"],
                  in_bounds=stats["x_max"] < width and stats["y_max"] < height)


def _kind(type_id: str) -> str:
    return {"EVTS": "events", "FRME": "frames", "IMUS": "imus", "TRIG": "triggers"}.get(type_id, type_id or "unknown")


def _decode(
    data: bytes, path: str | None, main: int, streams: dict[int, dict[str, Any]], limits: Limits
) -> tuple[list[np.ndarray], dict[str, int], dict[str, Any]]:
    import aedat

    tmp = None
    if path is None:
        fd, tmp = tempfile.mkstemp(suffix=".aedat4")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path = tmp
    chunks: list[np.ndarray] = []
    skipped: dict[str, int] = {}
    n = 0
    index = -1
    decoded = 0  # bytes the decoder handed us: the total cap for packets of unknown inflated size
    # bounds and time order are checked per packet while it is still in cache
    x_max = y_max = -1
    monotonic = True
    last_t: int | None = None
    try:
        decoder = aedat.Decoder(path)
        for index, packet in enumerate(decoder):
            sid = packet.get("stream_id")
            decoded += _nbytes(packet)
            if decoded > limits.max_decompressed:
                raise EventFormatError(
                    f"AEDAT4 packets inflate to more than max_decompressed={limits.max_decompressed} bytes",
                    packet=index,
                )
            if "events" in packet and sid == main:
                ev = packet["events"]
                n += len(ev)
                check_count(n, limits, packet=index)
                if len(ev):
                    x_max = max(x_max, int(ev["x"].max()))
                    y_max = max(y_max, int(ev["y"].max()))
                    t = ev["t"]
                    if monotonic and (
                        (last_t is not None and int(t[0]) < last_t) or not bool((t[1:] >= t[:-1]).all())
                    ):
                        monotonic = False
                    last_t = int(t[-1])
                chunks.append(ev)
            else:
                kind = next((k for k in ("events", "frame", "imus", "triggers") if k in packet), "unknown")
                key = {"frame": "frames", "events": f"events_stream_{sid}"}.get(kind, kind)
                count = len(packet[kind]) if kind in ("events", "imus", "triggers") else 1
                skipped[key] = skipped.get(key, 0) + count
    except EventFormatError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - pyo3 panics derive from BaseException
        raise EventFormatError(
            f"AEDAT4 decoder error: {type(exc).__name__}: {exc}", packet=index + 1 if index >= -1 else None
        ) from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return chunks, skipped, {"x_max": x_max, "y_max": y_max, "monotonic": monotonic}


def _nbytes(packet: dict[str, Any]) -> int:
    total = 0
    for value in packet.values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, dict):
            total += sum(v.nbytes for v in value.values() if isinstance(v, np.ndarray))
    return total


def _concat(chunks: list[np.ndarray]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, EVENT_DTYPE)
    cat = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    names = cat.dtype.names or ()
    fields: Any = cat.dtype.fields or {}
    ours: Any = EVENT_DTYPE.fields or {}
    # aedat's packed (t u8, x u2, y u2, on bool) has exactly EVENT_DTYPE's byte layout, so the
    # array is reinterpreted, not copied. t comes from the file's int64, so the u8 -> i8 view is
    # exact; ``on`` is written as 0/1 by the decoder.
    if cat.dtype.itemsize == EVENT_DTYPE.itemsize and len(names) == 4 and all(
        fields[a][1] == ours[b][1] for a, b in zip(names, EVENT_DTYPE.names or (), strict=True)
    ):
        return cat.view(EVENT_DTYPE)
    out = np.empty(len(cat), EVENT_DTYPE)
    out["t"] = cat[names[0]]
    out["x"] = cat["x"]
    out["y"] = cat["y"]
    out["p"] = cat[names[3]] != 0
    return out
