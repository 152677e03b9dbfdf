"""Python client for the websocket protocol (version 1, service/protocol.py, docs/service.md).

Synchronous, built on ``websockets.sync``: one thread sends, a reader thread collects frames,
stats and the end/error messages. :func:`replay_file` replays a recording (optionally paced to
its timestamps); :func:`replay_dv` forwards a dv-processing NetworkWriter stream.

Example::

    from service.client import StreamClient, StreamOptions
    with StreamClient("ws://127.0.0.1:8000/v1/stream", 128, 128, StreamOptions(seed=1)) as c:
        c.send_events(events)          # events.EVENT_DTYPE array
        summary = c.end()
    summary.frames[0].image()          # uint8 [28, 28]
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .protocol import SUBPROTOCOL, Frame, decode_frame, encode_events


@dataclass
class StreamOptions:
    """Fields of the start message (None: the server's default)."""

    model: str | None = None
    roi: Any = None
    dt_us: int | None = None
    emit: int | str | None = None
    seed: int = 0
    spikes: bool = False
    inputs: bool = False
    format: str = "binary"
    api_key: str | None = None
    key_in: str = "subprotocol"  # how to send api_key: "subprotocol", "header" or "start"

    def start_message(self, width: int, height: int) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "type": "start",
            "protocol": 1,
            "sensor": {"width": width, "height": height},
            "seed": self.seed,
            "spikes": self.spikes,
            "inputs": self.inputs,
            "format": self.format,
        }
        for k in ("model", "roi", "dt_us", "emit"):
            if getattr(self, k) is not None:
                msg[k] = getattr(self, k)
        if self.api_key and self.key_in == "start":
            msg["api_key"] = self.api_key
        return msg


@dataclass
class StreamSummary:
    """Everything a stream returned."""

    ready: dict[str, Any] | None = None
    frames: list[Frame] = field(default_factory=list)
    frame_times: list[float] = field(default_factory=list)  # perf_counter at receipt
    stats: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    close_code: int | None = None
    events_sent: int = 0
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and self.close_code in (1000, None)

    def describe(self) -> str:
        fps = len(self.frames) / self.wall_s if self.wall_s > 0 else 0.0
        last = self.end or (self.stats[-1] if self.stats else {})
        parts = [
            f"{self.events_sent} events sent",
            f"{len(self.frames)} frames in {self.wall_s:.2f} s ({fps:.1f} frames/s)",
            f"dropped {last.get('dropped_frames', 0)}",
            f"late events {last.get('late_events', 0)}",
            f"close code {self.close_code}",
        ]
        if self.ready is not None:  # which model the service gave the stream, and why
            parts.append(f"model {self.ready.get('model')} ({self.ready.get('model_reason') or 'named'})")
        if self.error:
            parts.append(f"error {self.error.get('code')}: {self.error.get('message')}")
        return ", ".join(parts)

    def images(self) -> np.ndarray:
        return np.stack([f.image() for f in self.frames]) if self.frames else np.zeros((0, 0, 0), np.uint8)

    def save(self, path: str) -> None:
        np.savez_compressed(
            path,
            images=self.images(),
            bin=np.array([f.bin for f in self.frames]),
            bin_end_us=np.array([f.bin_end_us for f in self.frames], dtype=np.int64),
        )


class StreamClient:
    """One websocket stream (context manager). Frames are collected by a reader thread."""

    def __init__(
        self,
        url: str,
        width: int,
        height: int,
        options: StreamOptions | None = None,
        open_timeout: float = 10.0,
    ) -> None:
        from websockets.sync.client import connect
        from websockets.typing import Subprotocol

        self.options = options or StreamOptions()
        protocols = [SUBPROTOCOL]
        headers = {}
        if self.options.api_key and self.options.key_in == "subprotocol":
            protocols.append(f"bearer.{self.options.api_key}")
        if self.options.api_key and self.options.key_in == "header":
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        self.summary = StreamSummary()
        self._t0 = time.perf_counter()
        self.ws = connect(
            url,
            subprotocols=[Subprotocol(p) for p in protocols],
            additional_headers=headers,
            max_size=None,  # type: ignore[arg-type]
            open_timeout=open_timeout,
            compression=None,
        )
        self.ws.send(json.dumps(self.options.start_message(width, height)))
        self._ready = threading.Event()
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._ready.wait(open_timeout)
        if self.summary.ready is None and self.summary.error is not None:
            return

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        s = self.summary
        try:
            for msg in self.ws:
                if isinstance(msg, bytes):
                    s.frames.append(decode_frame(msg))
                    s.frame_times.append(time.perf_counter())
                    continue
                obj = json.loads(msg)
                kind = obj.get("type")
                if kind == "ready":
                    s.ready = obj
                    self._ready.set()
                elif kind == "frame":
                    import base64

                    from .render import unpack_spikes

                    spikes = None
                    if "spikes" in obj:
                        spikes = unpack_spikes(
                            base64.b64decode(obj["spikes"]), obj["spike_rows"], obj["n_readout"]
                        )
                    s.frames.append(
                        Frame(
                            obj["bin"],
                            obj["bin_end_us"],
                            base64.b64decode(obj["image"]),
                            base64.b64decode(obj["input"]) if "input" in obj else None,
                            spikes,
                        )
                    )
                    s.frame_times.append(time.perf_counter())
                elif kind == "stats":
                    s.stats.append(obj)
                elif kind == "end":
                    s.end = obj
                elif kind == "error":
                    s.error = obj
        except ConnectionClosed:
            pass
        finally:
            rcvd = getattr(self.ws.protocol, "close_rcvd", None)
            s.close_code = rcvd.code if rcvd is not None else None
            s.wall_s = time.perf_counter() - self._t0
            self._ready.set()
            self._done.set()

    def send_events(self, events: np.ndarray) -> None:
        """Send one event packet (``events.EVENT_DTYPE`` or any array with t, x, y, p fields)."""
        self.ws.send(encode_events(events))
        self.summary.events_sent += len(events)

    def send_raw(self, data: bytes) -> None:
        """Send raw bytes (e.g. pieces of an AEDAT 4 stream)."""
        self.ws.send(data)

    def flush(self) -> None:
        self.ws.send(json.dumps({"type": "flush"}))

    def end(self, timeout: float = 60.0) -> StreamSummary:
        """Send ``end`` and wait for the remaining frames and the close."""
        from websockets.exceptions import ConnectionClosed

        try:
            self.ws.send(json.dumps({"type": "end"}))
        except ConnectionClosed:
            pass
        self._done.wait(timeout)
        self.close()
        return self.summary

    def close(self) -> None:
        self.ws.close()
        self._reader.join(5)

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def packets_by_time(events: np.ndarray, packet_us: int) -> list[np.ndarray]:
    """Split time-sorted events into packets of ``packet_us`` of event time."""
    if len(events) == 0:
        return []
    t = events["t"]
    k = (t - t[0]) // max(1, packet_us)
    cuts = np.flatnonzero(np.diff(k)) + 1
    return np.split(events, cuts)


def replay_events(
    client: StreamClient,
    events: np.ndarray,
    *,
    realtime: bool,
    speed: float = 1.0,
    packet_us: int = 10_000,
    progress: bool = False,
) -> StreamSummary:
    """Send ``events`` packet by packet (paced to event time with ``realtime``), then end."""
    packets = packets_by_time(events, packet_us)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(events), unit="ev", unit_scale=True, desc="stream", mininterval=0.5)
    start = time.perf_counter()
    t_first = int(events["t"][0]) if len(events) else 0
    for pk in packets:
        if realtime:
            due = start + (int(pk["t"][-1]) - t_first) / 1e6 / speed
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        if client.summary.error is not None:
            break
        client.send_events(pk)
        if bar is not None:
            # set_postfix(refresh=False): the postfix alone must not redraw; update() redraws at
            # most every mininterval (0.5 s), so the bar draws at most twice a second
            el = time.perf_counter() - start
            bar.set_postfix(
                frames=len(client.summary.frames),
                fps=f"{len(client.summary.frames) / max(el, 1e-6):.1f}",
                refresh=False,
            )
            bar.update(len(pk))
    summary = client.end()
    if bar is not None:
        bar.close()
    return summary


def replay_file(
    url: str,
    path: str,
    options: StreamOptions | None = None,
    *,
    realtime: bool = False,
    speed: float = 1.0,
    packet_us: int = 10_000,
    progress: bool = False,
) -> StreamSummary:
    """Read an event file and replay it to ``url``."""
    import events as ev

    rec = ev.read(path)
    with StreamClient(url, rec.width, rec.height, options) as client:
        if client.summary.ready is None:
            client.close()
            return client.summary
        return replay_events(
            client, rec.events, realtime=realtime, speed=speed, packet_us=packet_us, progress=progress
        )


def replay_dv(
    url: str,
    address: str,
    options: StreamOptions | None = None,
    *,
    max_seconds: float | None = None,
    progress: bool = False,
) -> StreamSummary:
    """Forward the events of a dv-processing NetworkWriter (``tcp://HOST:PORT``) to ``url``."""
    import dv_processing as dv

    from events import EVENT_DTYPE

    if not address.startswith("tcp://"):
        raise ValueError(f"--dv takes tcp://HOST:PORT, got {address!r}")
    host, _, port = address[len("tcp://") :].rpartition(":")
    reader = dv.io.NetworkReader(host, int(port))
    if not reader.isEventStreamAvailable():
        raise RuntimeError(f"{address} does not serve an event stream")
    res = reader.getEventResolution()
    width, height = int(res[0]), int(res[1])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="ev", unit_scale=True, desc=f"dv {address}", mininterval=0.5)
    start = time.perf_counter()
    with StreamClient(url, width, height, options) as client:
        if client.summary.ready is None:
            return client.summary
        while reader.isRunning():
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
            batch = reader.getNextEventBatch()
            if batch is None:
                time.sleep(0.001)
                continue
            arr = batch.numpy()
            ev = np.empty(len(arr), dtype=EVENT_DTYPE)
            ev["t"], ev["x"], ev["y"], ev["p"] = arr["timestamp"], arr["x"], arr["y"], arr["polarity"]
            if len(ev):
                client.send_events(ev)
            if bar is not None:
                bar.set_postfix(frames=len(client.summary.frames), refresh=False)
                bar.update(len(ev))
            if client.summary.error is not None:
                break
        summary = client.end()
    if bar is not None:
        bar.close()
    return summary
