"""The websocket protocol, version 1: message schemas and the binary layouts (docs/service.md).

Client -> server
  * text ``{"type": "start", ...}`` (:class:`StartMessage`), exactly once, first;
  * binary event packets: :data:`EVENT_MAGIC` packets (layout below) or the bytes of an AEDAT 4
    stream (the file header first, then whole or split packets);
  * text ``{"type": "flush"}``: complete the open bin now and emit a frame for the last bin;
  * text ``{"type": "end"}``: flush, send the remaining frames and the final stats, close 1000;
  * text ``{"type": "ping"}``: answered by ``{"type": "pong"}``.

Event packet (little-endian, no padding)::

    offset  size  field
    0       4     magic b"VDEV"
    4       2     version (uint16) = 1
    6       2     flags (uint16) = 0, reserved
    8       4     count N (uint32)
    12      13*N  records: t int64 (µs), x uint16, y uint16, p uint8 (0 off, 1 on)

Server -> client
  * text ``{"type": "ready", ...}`` once the start message is accepted;
  * frames: binary (:data:`FRAME_MAGIC` layout below, ``format="binary"``) or text
    ``{"type": "frame", ...}`` (``format="json"``);
  * text ``{"type": "stats", ...}`` every ``stats_interval_s`` and ``{"type": "end", ...}``;
  * text ``{"type": "error", "code": C, "message": M}`` right before a close with code ``C``.

Frame (binary, little-endian)::

    0   4  magic b"VDFR"
    4   1  version = 1
    5   1  flags: bit 0 spikes present, bit 1 event (input) image present
    6   2  reserved
    8   4  bin index (uint32): 0-based count of stepped bins since the stream started
    12  8  bin end time (int64, µs, event clock)
    20  4  image length L1 (uint32): the reconstruction, 8-bit grayscale PNG
    24  4  input length L2 (uint32): the event image (RGB PNG, off red, on green), 0 if absent
    28  2  spike rows K (uint16): bins since the previous frame (spikes of each)
    30  2  n_readout N (uint16)
    32  L1 bytes PNG | L2 bytes PNG | K * ceil(N/8) bytes bit-packed spikes (little bit order)
"""

from __future__ import annotations

import base64
import json
import struct
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from events import EVENT_DTYPE

PROTOCOL_VERSION = 1
SUBPROTOCOL = "vdib.v1"
EVENT_MAGIC = b"VDEV"
FRAME_MAGIC = b"VDFR"
AEDAT4_MAGIC = b"#!AER-DAT4.0"
EVENT_HEADER = struct.Struct("<4sHHI")
FRAME_HEADER = struct.Struct("<4sBBHIqIIHH")
#: Largest |t0_us| a start message may give (bin end times stay far inside int64).
MAX_T_US = 1 << 62
#: Largest emit period in bins.
MAX_EMIT = 1_000_000

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # idle timeout, server shutting down
CLOSE_UNSUPPORTED = 1003  # wrong message kind, unknown model/encoding/version
CLOSE_INVALID = 1007  # malformed JSON, start message or event packet
CLOSE_POLICY = 1008  # authentication, limits other than size
CLOSE_TOO_BIG = 1009  # message over max_message_bytes
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # session limit reached


class ProtocolError(Exception):
    """A client broke the protocol; carries the close code to use."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Sensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(gt=0, le=65536)
    height: int = Field(gt=0, le=65536)


class StartMessage(BaseModel):
    """The first client message. Unknown fields are rejected (close 1007)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["start"]
    protocol: int = PROTOCOL_VERSION
    model: str | None = None
    sensor: Sensor
    roi: list[int] | Literal["default", "centre", "center", "full"] | None = None
    dt_us: int | None = Field(None, gt=0, le=10_000_000)
    emit: int | Literal["last"] | None = None  # every k bins; default ~30 frames/s of event time
    spikes: bool = False
    inputs: bool = False
    seed: int = Field(0, ge=0, lt=2**63)
    format: Literal["binary", "json"] = "binary"
    encoding: Literal["auto", "packed", "aedat4"] = "auto"
    t0_us: int | None = None
    api_key: str | None = None

    @field_validator("emit")
    @classmethod
    def _emit(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and not 1 <= v <= MAX_EMIT:
            raise ValueError(f"emit must be between 1 and {MAX_EMIT} bins, or 'last'")
        return v

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: object) -> object:
        if isinstance(v, list) and len(v) != 4:
            raise ValueError("roi must be [x, y, width, height]")
        return v


def default_emit(dt_us: int) -> int:
    """Bins per frame giving about 30 frames per second of event time: ``max(1, round(1/30 s / dt))``."""
    return max(1, round(1e6 / 30.0 / dt_us))


def parse_emit(emit: int | str | None, dt_us: int) -> int | None:
    """The emit rule of a stream or upload: a frame every ``k`` bins (an int, or a string of one,
    1 .. MAX_EMIT), ``None`` for ``"last"`` (only after the last bin); absent: :func:`default_emit`.
    ValueError for anything else."""
    if emit is None:
        return default_emit(dt_us)
    if emit == "last":
        return None
    try:
        k = int(emit)
    except (TypeError, ValueError):
        k = 0
    if isinstance(emit, bool) or not 1 <= k <= MAX_EMIT:
        raise ValueError(f"emit must be an integer from 1 to {MAX_EMIT} or 'last', got {emit!r}")
    return k


# ---------------------------------------------------------------------------- text messages
def parse_message(text: str) -> dict[str, Any]:
    """A client text message: a JSON object with a string ``type`` (ProtocolError 1007 else)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(CLOSE_INVALID, f"text message is not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(CLOSE_INVALID, "text message is JSON nested too deeply") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError(CLOSE_INVALID, "a text message must be a JSON object with a string 'type'")
    return obj


def parse_start(obj: dict[str, Any]) -> StartMessage:
    """The start message of a parsed text message: 1003 for another type or protocol version,
    1007 when a field is invalid (each one named)."""
    if obj.get("type") != "start":
        raise ProtocolError(CLOSE_UNSUPPORTED, f"expected a 'start' message, got {obj.get('type')!r}")
    if obj.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError(
            CLOSE_UNSUPPORTED,
            f"protocol version {obj.get('protocol')!r} is not supported (server speaks {PROTOCOL_VERSION})",
        )
    try:
        return StartMessage.model_validate(obj)
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ProtocolError(CLOSE_INVALID, f"bad start message: {errs}") from None


def ready_message(session: Any, start: StartMessage, limits: dict[str, Any]) -> str:
    """The ``ready`` message for an accepted start message (what the stream will do)."""
    entry, engine = session.entry, session.engine
    return json.dumps(
        {
            "type": "ready",
            "protocol": PROTOCOL_VERSION,
            "session": session.id,
            "model": entry.name,
            "model_reason": session.model_reason,
            "family": entry.family,
            "roi": list(session.roi),
            "pool": session.pool,
            "dt_us": session.dt_us,
            "emit": session.emit if session.emit is not None else "last",
            "input_shape": list(session.spec.shape),
            "image_shape": list(engine.image_shape),
            "n_readout": engine.n_readout,
            "tau_d": engine.tau_d,
            "format": start.format,
            "spikes": session.want_spikes,
            "inputs": start.inputs,
            "seed": start.seed,
            "limits": {
                **limits,
                "max_pending_bins": session.max_pending_bins or limits.get("max_pending_bins"),
            },
        }
    )


def error_message(code: int, message: str) -> str:
    """The ``error`` message sent right before a close with ``code``."""
    return json.dumps({"type": "error", "code": code, "message": message})


def pong_message() -> str:
    return json.dumps({"type": "pong", "t": time.time()})


def frame_json(
    bin_index: int,
    bin_end_us: int,
    image_png: bytes,
    input_png: bytes | None,
    spikes_packed: bytes | None,
    spike_rows: int,
    n_readout: int,
) -> str:
    """A frame as a text message (``format="json"``): the fields of the binary layout, PNGs and
    bit-packed spikes in base64 (``spikes``, ``spike_rows``, ``n_readout`` only when asked for)."""
    msg: dict[str, Any] = {
        "type": "frame",
        "bin": bin_index,
        "bin_end_us": bin_end_us,
        "image": base64.b64encode(image_png).decode(),
    }
    if input_png is not None:
        msg["input"] = base64.b64encode(input_png).decode()
    if spikes_packed is not None:
        msg["spikes"] = base64.b64encode(spikes_packed).decode()
        msg["spike_rows"] = spike_rows
        msg["n_readout"] = n_readout
    return json.dumps(msg)


def encode_events(events: np.ndarray) -> bytes:
    """An event packet (layout in the module docstring) holding ``events``."""
    if events.dtype == EVENT_DTYPE:
        rec = np.ascontiguousarray(events)
    else:
        rec = np.empty(len(events), dtype=EVENT_DTYPE)
        for name in ("t", "x", "y", "p"):
            rec[name] = events[name]
    return EVENT_HEADER.pack(EVENT_MAGIC, PROTOCOL_VERSION, 0, len(rec)) + rec.tobytes()


def packet_count(data: bytes | bytearray | memoryview, max_events: int | None = None) -> int:
    """Check an event packet's header and length; its number of events. Raises
    :class:`ProtocolError` (1007/1003/1009) when malformed (polarities are not checked)."""
    if len(data) < EVENT_HEADER.size:
        raise ProtocolError(
            CLOSE_INVALID, f"event packet of {len(data)} bytes is shorter than its 12-byte header"
        )
    magic, version, flags, count = EVENT_HEADER.unpack_from(data)
    if magic != EVENT_MAGIC:
        raise ProtocolError(
            CLOSE_UNSUPPORTED, f"binary message does not start with {EVENT_MAGIC!r} (got {bytes(magic)!r})"
        )
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            CLOSE_UNSUPPORTED, f"event packet version {version} is not supported (expected 1)"
        )
    expected = EVENT_HEADER.size + count * EVENT_DTYPE.itemsize
    if len(data) != expected:
        raise ProtocolError(
            CLOSE_INVALID, f"event packet says {count} events ({expected} bytes) but has {len(data)} bytes"
        )
    if max_events is not None and count > max_events:
        raise ProtocolError(
            CLOSE_TOO_BIG, f"event packet of {count} events exceeds the limit of {max_events}"
        )
    return int(count)


def decode_events(data: bytes | bytearray | memoryview, max_events: int | None = None) -> np.ndarray:
    """Parse an event packet; raises :class:`ProtocolError` (1007/1003) when malformed."""
    count = packet_count(data, max_events)
    rec = np.frombuffer(data, dtype=EVENT_DTYPE, count=count, offset=EVENT_HEADER.size)
    if count and int(rec["p"].max()) > 1:
        raise ProtocolError(CLOSE_INVALID, "event polarity must be 0 or 1")
    return rec


@dataclass
class Frame:
    """One decoded frame message (either layout)."""

    bin: int
    bin_end_us: int
    image_png: bytes
    input_png: bytes | None
    spikes: np.ndarray | None  # [K, N] uint8

    def image(self) -> np.ndarray:
        import io

        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.image_png)))


def encode_frame(
    bin_index: int,
    bin_end_us: int,
    image_png: bytes,
    input_png: bytes | None,
    spikes_packed: bytes | None,
    spike_rows: int,
    n_readout: int,
) -> bytes:
    flags = (1 if spikes_packed is not None else 0) | (2 if input_png is not None else 0)
    head = FRAME_HEADER.pack(
        FRAME_MAGIC,
        PROTOCOL_VERSION,
        flags,
        0,
        bin_index & 0xFFFFFFFF,
        bin_end_us,
        len(image_png),
        len(input_png or b""),
        spike_rows if spikes_packed is not None else 0,
        n_readout,
    )
    return head + image_png + (input_png or b"") + (spikes_packed or b"")


def decode_frame(data: bytes) -> Frame:
    """Parse a binary frame message (client side)."""
    from .render import unpack_spikes

    magic, version, flags, _, b, t, l1, l2, k, n = FRAME_HEADER.unpack_from(data)
    if magic != FRAME_MAGIC or version != PROTOCOL_VERSION:
        raise ValueError(f"not a version-1 frame message: {bytes(magic)!r} v{version}")
    o = FRAME_HEADER.size
    image = data[o : o + l1]
    o += l1
    inp = data[o : o + l2] if flags & 2 else None
    o += l2
    spikes = unpack_spikes(data[o:], k, n) if flags & 1 else None
    return Frame(b, t, bytes(image), bytes(inp) if inp is not None else None, spikes)
