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

import functools
import os
import re
import struct
import tempfile
from typing import Any

import numpy as np

from .._types import EVENT_DTYPE, EventFormatError, EventLimitError, Recording
from ._common import Limits, check_count, check_sensor, finish, scan_packed
from ._jit import kernel

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
    return int(struct.unpack_from("<I", b, pos)[0])


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
        return int(struct.unpack_from("<H", buf, vt + at)[0])

    out: dict[str, Any] = {
        "compression": 0,
        "data_table_position": -1,
        "data_table_field": None,
        "description": "",
    }
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
        out["data_table_field"] = root + off  # where the int64 lies in ``buf``
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
        info: dict[str, Any] = {
            "type": attrs.get("typeIdentifier", ""),
            "name": attrs.get("originalOutputName", ""),
        }
        inf = node.find("node[@name='info']")
        if inf is not None:
            ia = {a.get("key"): (a.text or "") for a in inf.findall("attr")}
            for k in ("sizeX", "sizeY"):
                if k in ia:
                    try:
                        info[k] = int(ia[k])
                    except ValueError as exc:
                        raise EventFormatError(
                            f"AEDAT4 stream {sid}: {k}={ia[k]!r} is not an integer"
                        ) from exc
            if "source" in ia:
                info["source"] = ia["source"]
        streams[sid] = info
    if not streams:
        raise EventFormatError("AEDAT4 description declares no stream")
    return streams


class _Source:
    """Random access to the file being pre-scanned: slices of the buffer, or ``pread`` on a
    descriptor of the same file (for an mmap, the page fault of each packet header costs about
    five times a ``pread`` of its 8 bytes)."""

    def __init__(self, data: Any, fd: int | None = None):
        self.data, self.fd, self.n = data, fd, len(data)

    def get(self, pos: int, n: int) -> bytes:
        if self.fd is None:
            return bytes(self.data[pos : pos + n])
        out = os.pread(self.fd, n, pos)
        if len(out) != min(n, self.n - pos):
            raise EventFormatError("AEDAT4 file changed while it was read", offset=pos)
        return out


def _inflated_size(
    comp: int, src: _Source, begin: int, size: int, pos: int, packet: int, head: bytes = b""
) -> tuple[int, bool]:
    """(upper bound on what the ``size`` bytes at ``begin`` inflate to, whether it is exact).

    Reads only the frame header (``head``, when the caller already has it) unless it must
    decompress (bounded) to find out.
    """
    if comp == 0:
        return size, True
    if comp in (1, 2) and LZ4_MAX_RATIO * size <= MAX_PACKET_BYTES:
        # LZ4 cannot inflate past 255:1, so a small packet is safe whatever its header says
        # (DV does not store content sizes); the total is then enforced while decoding
        return LZ4_MAX_RATIO * size, False
    head = head[: min(size, 32)] if len(head) >= min(size, 32) else src.get(begin, min(size, 32))
    if comp in (1, 2):
        import lz4.frame

        try:
            declared = lz4.frame.get_frame_info(head).get("content_size", 0)
        except Exception as exc:  # lz4 raises RuntimeError on a bad frame header
            raise EventFormatError(
                f"AEDAT4 corrupt LZ4 packet header: {exc}", offset=pos, packet=packet
            ) from exc
        if declared:
            return int(declared), True
        return _bounded_lz4(src.get(begin, size), pos, packet), True
    import zstandard

    try:
        declared = zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise EventFormatError(
            f"AEDAT4 corrupt ZSTD packet header: {exc}", offset=pos, packet=packet
        ) from exc
    if declared >= 0:
        return int(declared), True
    return _bounded_zstd(src.get(begin, size), pos, packet), True


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


def prescan(data: Any, limits: Limits, fd: int | None = None) -> dict[str, Any]:
    """Validate the file structure and bound every packet; return header and per-stream counts.

    ``fd``: an open descriptor of the file ``data`` maps, read with ``pread`` instead.
    """
    src = _Source(data, fd)
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
        raise EventFormatError(
            f"AEDAT4 data table position {end} is outside the packet area", offset=pos - hlen
        )
    comp = header["compression"]
    total = 0
    n_packets = 0
    per_stream: dict[int, int] = {}
    stream_bytes: dict[int, int] = {}  # compressed bytes per stream: sizes the output array
    sizes: list[int] = []
    while pos < end:
        if pos + 8 > end:
            raise EventFormatError("AEDAT4 truncated packet header", offset=pos, packet=n_packets)
        chunk = src.get(pos, 40)  # the packet header and the compressed frame's header
        sid, size = struct.unpack_from("<iI", chunk)
        if sid not in streams:
            raise EventFormatError(f"AEDAT4 packet for undeclared stream {sid}", offset=pos, packet=n_packets)
        if pos + 8 + size > end:
            raise EventFormatError(
                f"AEDAT4 packet of {size} bytes runs past the end of the data", offset=pos, packet=n_packets
            )
        if size < 8:
            raise EventFormatError(
                f"AEDAT4 packet of {size} bytes is too small", offset=pos, packet=n_packets
            )
        inflated, exact = _inflated_size(comp, src, pos + 8, size, pos, n_packets, chunk[8:])
        if inflated > MAX_PACKET_BYTES:
            raise EventFormatError(
                f"AEDAT4 packet inflates to {inflated} bytes, more than the {MAX_PACKET_BYTES} allowed "
                "(decompression bomb?)",
                offset=pos,
                packet=n_packets,
            )
        total += inflated if exact else 0
        if total > limits.max_decompressed:
            raise EventLimitError(
                f"AEDAT4 packets inflate to more than max_decompressed={limits.max_decompressed} bytes",
                offset=pos,
                packet=n_packets,
            )
        per_stream[sid] = per_stream.get(sid, 0) + 1
        stream_bytes[sid] = stream_bytes.get(sid, 0) + size
        sizes.append(size)
        pos += 8 + size
        n_packets += 1
    return {
        "header": header,
        "streams": streams,
        "packets": n_packets,
        "packets_per_stream": per_stream,
        "stream_bytes": stream_bytes,
        "packet_sizes": sizes,
        "compression": COMPRESSION[comp],
    }


def parse(data: Any, *, limits: Limits, path: str | None = None, name: str = "") -> Recording:
    """Parse an AEDAT 4.0 file (``path`` is decoded in place; bytes go through a temp file).

    The ``aedat`` decoder re-opens ``path``, so the file must not change between the pre-scan
    and the decode: its size and modification time are compared before and after, and the
    decoder is never asked for more packets than were pre-scanned (a recording still being
    appended to is refused rather than decoded past what was checked).
    """
    fd = None
    stamp: tuple[int, int] | None = None
    if path is not None and isinstance(data, (bytes, bytearray)):
        path = None  # the file could not be mapped (a pipe...): decode what was read, not the path again
    if path is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
            st = os.fstat(fd)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            fd = None
        if fd is not None and not hasattr(os, "pread"):  # no pread (Windows): slice the map
            os.close(fd)
            fd = None
        if stamp is not None and stamp[0] != len(data):
            if fd is not None:
                os.close(fd)
            raise EventFormatError("AEDAT4 file changed while it was read")
    try:
        info = prescan(data, limits, fd)
    finally:
        if fd is not None:
            os.close(fd)
    streams = info["streams"]
    event_ids = sorted(s for s, v in streams.items() if v["type"] == "EVTS")
    meta: dict[str, Any] = {
        "compression": info["compression"],
        "streams": {str(k): dict(v) for k, v in streams.items()},
        "packets": info["packets"],
        "skipped": {},
    }
    m = re.search(
        r"<attr key=\"(?:source|cameraModel)\" type=\"string\">([^<]*)</attr>", info["header"]["description"]
    )
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
    events, skipped, stats = _decode(
        data, path, main, streams, limits, info["stream_bytes"].get(main, 0), info["packet_sizes"]
    )
    if stamp is not None and path is not None:
        try:
            st2 = os.stat(path)
        except OSError as exc:
            raise EventFormatError(f"AEDAT4 file vanished while it was read: {exc}") from exc
        if (st2.st_size, st2.st_mtime_ns) != stamp:
            raise EventFormatError("AEDAT4 file changed while it was read")
    for k, v in skipped.items():
        meta["skipped"][k] = v
    return finish(
        events,
        width,
        height,
        "aedat4",
        meta,
        monotonic=stats["monotonic"],
        in_bounds=stats["x_max"] < width and stats["y_max"] < height,
    )


def _kind(type_id: str) -> str:
    return {"EVTS": "events", "FRME": "frames", "IMUS": "imus", "TRIG": "triggers"}.get(
        type_id, type_id or "unknown"
    )


def _decode(
    data: bytes,
    path: str | None,
    main: int,
    streams: dict[int, dict[str, Any]],
    limits: Limits,
    main_bytes: int,
    packet_sizes: list[int],
) -> tuple[np.ndarray, dict[str, int], dict[str, Any]]:
    """Decode every packet with ``aedat``; the events of stream ``main`` go into one array.

    Each packet's events are copied into a growing EVENT_DTYPE array while they are in cache,
    and checked there (largest x and y, time order) in the same pass by a compiled loop when
    numba is available. Keeping the decoder's per-packet arrays and concatenating them at the
    end costs twice as much: every packet lands in freshly faulted-in memory, and the
    concatenation copies everything once more.
    """
    import aedat

    tmp = None
    if path is None:
        fd, tmp = tempfile.mkstemp(suffix=".aedat4")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        path = tmp
    skipped: dict[str, int] = {}
    n = 0
    index = -1
    decoded = 0  # bytes the decoder handed us: the total cap for packets of unknown inflated size
    out = np.empty(0, EVENT_DTYPE)
    raw_dtype, raw_ok = None, False
    seen_bytes = 0  # compressed bytes of the events packets decoded so far (sizes the output)
    scan = kernel(scan_packed, main_bytes // 8)
    # bounds and time order are checked per packet while it is still in cache
    x_max = y_max = -1
    monotonic = True
    last_t = np.iinfo(np.int64).min
    try:
        decoder = aedat.Decoder(path)
        for index, packet in enumerate(decoder):
            if index >= len(packet_sizes):
                raise EventFormatError(
                    f"AEDAT4 decoder returned more packets than the {len(packet_sizes)} pre-scanned "
                    "(the file changed while it was read?)",
                    packet=index,
                )
            sid = packet.get("stream_id")
            ev = packet.get("events")
            # the common packet is {stream_id, events}: its size without a call
            decoded += ev.nbytes if len(packet) == 2 and ev is not None else _nbytes(packet)
            if decoded > limits.max_decompressed:
                raise EventLimitError(
                    f"AEDAT4 packets inflate to more than max_decompressed={limits.max_decompressed} bytes",
                    packet=index,
                )
            if ev is not None and sid == main:
                k = len(ev)
                seen_bytes += packet_sizes[index]
                if k == 0:
                    continue
                if n + k > limits.max_events:
                    check_count(n + k, limits, packet=index)
                if n + k > len(out):
                    out = _grow(out, n, n + k, main_bytes, seen_bytes, limits)
                if ev.dtype is not raw_dtype:  # aedat reuses one dtype object: checked once
                    raw_ok = _packed_layout(ev.dtype)
                    raw_dtype = ev.dtype
                if raw_ok and ev.flags.c_contiguous:
                    dst = out[n : n + k].view(np.uint8)
                    dst[:] = ev.view(np.uint8)
                    if scan is not None:
                        last_t, x_max, y_max, monotonic = scan(dst, last_t, x_max, y_max, monotonic)
                        n += k
                        continue
                else:
                    _assign(out[n : n + k], ev)
                x_max = max(x_max, int(ev["x"].max()))
                y_max = max(y_max, int(ev["y"].max()))
                t = out["t"][n : n + k]
                if monotonic and (int(t[0]) < last_t or not bool((t[1:] >= t[:-1]).all())):
                    monotonic = False
                last_t = int(t[-1])
                n += k
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
    return _shrink(out, n), skipped, {"x_max": int(x_max), "y_max": int(y_max), "monotonic": bool(monotonic)}


@functools.lru_cache(maxsize=8)
def _packed_layout(dtype: np.dtype) -> bool:
    """Whether ``dtype`` has EVENT_DTYPE's packed byte layout, so its bytes can be copied as is
    (aedat's ``t u8, x u2, y u2, on bool``: t comes from the file's int64, so reinterpreting it
    as int64 is exact, and ``on`` is written as 0/1 by the decoder)."""
    names = dtype.names or ()
    fields: Any = dtype.fields or {}
    ours: Any = EVENT_DTYPE.fields or {}
    return (
        dtype.itemsize == EVENT_DTYPE.itemsize
        and len(names) == 4
        and all(
            fields[a][1] == ours[b][1]
            and fields[a][0].itemsize == ours[b][0].itemsize
            and fields[a][0].kind in "iub"
            and fields[a][0].byteorder in "<=|"
            for a, b in zip(names, EVENT_DTYPE.names or (), strict=True)
        )
    )


def _assign(dst: np.ndarray, ev: np.ndarray) -> None:
    names = ev.dtype.names or ()
    dst["t"] = ev[names[0]]
    dst["x"] = ev["x"]
    dst["y"] = ev["y"]
    dst["p"] = ev[names[3]] != 0


def _grow(out: np.ndarray, n: int, need: int, main_bytes: int, seen_bytes: int, limits: Limits) -> np.ndarray:
    """A larger output array holding ``out[:n]``: the first time sized from the events per
    compressed byte so far times the stream's compressed size, plus 1/8 (untouched pages of an
    over-estimate cost no memory, and the end is trimmed in place), later 1.5x."""
    if len(out) == 0:
        cap = need * max(main_bytes, 1) // max(seen_bytes, 1)
        cap = max(cap + cap // 8, need)
    else:
        cap = max(need, len(out) * 3 // 2)
    cap = min(cap, limits.max_events + 1) if need <= limits.max_events else need
    new = np.empty(cap, EVENT_DTYPE)
    new[:n] = out[:n]
    return new


def _shrink(out: np.ndarray, n: int) -> np.ndarray:
    """``out[:n]`` without a copy where possible (realloc of the array's own buffer)."""
    if n == len(out):
        return out
    if n == 0:
        return np.zeros(0, EVENT_DTYPE)
    try:
        out.resize((n,), refcheck=False)
        return out
    except ValueError:  # pragma: no cover - the array is always our own here
        return out[:n].copy()


def _nbytes(packet: dict[str, Any]) -> int:
    ev = packet.get("events")
    if len(packet) == 2 and isinstance(ev, np.ndarray):  # the common case: stream_id, events
        return ev.nbytes
    total = 0
    for value in packet.values():
        if isinstance(value, np.ndarray):
            total += value.nbytes
        elif isinstance(value, dict):
            total += sum(v.nbytes for v in value.values() if isinstance(v, np.ndarray))
    return total


class Aedat4StreamDecoder:
    """Incremental AEDAT 4 decoding of a byte stream (a live DV stream cut anywhere).

    Whole packets are cut from the bytes as they arrive. The file header (version line, uint32
    size, IOHeader flatbuffer) is kept, with its data-table position set to -1 (the packets of a
    live stream end nowhere in particular), and put before each batch of complete packets, which
    :func:`events.read` then checks and decodes like a file. Bytes at or after the original
    data-table position (the file's index, not packets) are ignored. Raises
    :class:`~events.EventFormatError` for bad bytes, a header or packet over ``max_buffer``
    bytes, or more than ``max_events`` events / ``max_decompressed`` decompressed bytes in the
    packets one :meth:`feed` completes (:class:`~events.EventLimitError`).
    """

    def __init__(self, max_buffer: int, max_events: int, max_decompressed: int | None = None) -> None:
        self.buf = bytearray()
        self.header: bytes | None = None
        self.max_buffer = max_buffer
        self.max_events = max_events
        self.max_decompressed = max_decompressed
        self.offset = 0  # absolute stream offset of buf[0]
        self.table_at = -1  # absolute offset of the data table (-1: none)

    def _take_header(self, end: int) -> None:
        base = len(MAGIC) + 4
        head = bytearray(self.buf[:end])
        info = parse_ioheader(bytes(head[base:]), base)
        self.table_at = int(info["data_table_position"])
        if info["data_table_field"] is not None:
            struct.pack_into("<q", head, base + info["data_table_field"], -1)
        self.header = bytes(head)
        del self.buf[:end]
        self.offset = end

    def feed(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        """The events of the packets that ``data`` completes (``EVENT_DTYPE``, maybe none)."""
        from ..readers import read

        none = np.zeros(0, EVENT_DTYPE)
        if self.table_at >= 0 and self.offset >= self.table_at:
            return none
        self.buf += data
        if len(self.buf) > self.max_buffer:
            raise EventLimitError(f"AEDAT 4 packet larger than {self.max_buffer} bytes", offset=self.offset)
        if self.header is None:
            if len(self.buf) < len(MAGIC) + 4:
                if not MAGIC.startswith(bytes(self.buf[: len(MAGIC)])):
                    raise EventFormatError("AEDAT 4 stream does not start with '#!AER-DAT4.0'", offset=0)
                return none
            if bytes(self.buf[: len(MAGIC)]) != MAGIC:
                raise EventFormatError("AEDAT 4 stream does not start with '#!AER-DAT4.0'", offset=0)
            (hsize,) = struct.unpack_from("<i", self.buf, len(MAGIC))
            if hsize < 0 or hsize > self.max_buffer:
                raise EventFormatError(f"AEDAT 4 header size {hsize} is invalid", offset=len(MAGIC))
            end = len(MAGIC) + 4 + hsize
            if len(self.buf) < end:
                return none
            self._take_header(end)
        limit = len(self.buf) if self.table_at < 0 else min(len(self.buf), self.table_at - self.offset)
        o = 0
        while limit - o >= 8:
            _, size = struct.unpack_from("<ii", self.buf, o)
            if size < 0 or size > self.max_buffer:
                raise EventFormatError(f"AEDAT 4 packet size {size} is invalid", offset=self.offset + o)
            if limit - o - 8 < size:
                break
            o += 8 + size
        if o == 0:
            return none
        chunk = self.header + bytes(self.buf[:o])  # type: ignore[operator]
        del self.buf[:o]
        self.offset += o
        return read(
            chunk, format="aedat4", max_events=self.max_events, max_decompressed=self.max_decompressed
        ).events
