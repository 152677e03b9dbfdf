"""service.wsfast: binary frames parsed by the service, everything else by the websockets
library, over a raw socket (frames split across reads, several per read, pings, fragments)."""

from __future__ import annotations

import base64
import json
import os
import socket
import time

import numpy as np

from service.protocol import FRAME_MAGIC, encode_events


def _frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


class _Conn:
    def __init__(self, port: int) -> None:
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            (
                f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101")

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            assert chunk, "connection closed"
            self.buf += chunk

    def recv(self) -> tuple[int, bytes]:
        self._need(2)
        op, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        h = 2
        if n == 126:
            self._need(4)
            n, h = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            self._need(10)
            n, h = int.from_bytes(self.buf[2:10], "big"), 10
        self._need(h + n)
        payload, self.buf = self.buf[h : h + n], self.buf[h + n :]
        return op, payload

    def send_slowly(self, data: bytes, pieces: int) -> None:
        for part in np.array_split(np.frombuffer(data, np.uint8), pieces):
            self.s.sendall(part.tobytes())
            time.sleep(0.01)


def test_binary_fast_path_with_splits_pings_and_fragments(live_server, mnist_dvs_events):
    ev = mnist_dvs_events[:4000]
    packets = [encode_events(c) for c in np.array_split(ev, 40)]
    c = _Conn(live_server.port)
    start = json.dumps({"type": "start", "sensor": {"width": 128, "height": 128}, "emit": 2}).encode()
    c.send_slowly(_frame(1, start), 7)  # a text frame split over several reads: the library's
    op, msg = c.recv()
    assert op == 1 and json.loads(msg)["type"] == "ready"
    c.s.sendall(b"".join(_frame(2, p) for p in packets[:10]))  # several binary frames in one read
    for p in packets[10:14]:
        c.send_slowly(_frame(2, p), 3)  # each split across reads
    c.s.sendall(_frame(9, b"hi") + _frame(2, packets[14]))  # a ping between binary frames
    for p in packets[15:30]:
        c.s.sendall(_frame(2, p))
    # a fragmented binary message: from here on the library parses everything
    half = len(packets[30]) // 2
    c.s.sendall(_frame(2, packets[30][:half], fin=False) + _frame(0, packets[30][half:]))
    for p in packets[31:]:
        c.s.sendall(_frame(2, p))
    c.s.sendall(_frame(1, b'{"type": "end"}'))
    frames, pongs, end = 0, 0, None
    while end is None:
        op, msg = c.recv()
        if op == 10:
            pongs += 1
            assert msg == b"hi"
        elif op == 2:
            assert msg[:4] == FRAME_MAGIC
            frames += 1
        elif op == 1 and json.loads(msg)["type"] == "end":
            end = json.loads(msg)
    op, msg = c.recv()
    assert op == 8 and int.from_bytes(msg[:2], "big") == 1000
    assert pongs == 1 and end["events"] == len(ev) and end["late_events"] == 0
    assert frames == end["frames_sent"] > 0 and end["bins"] > 0


def test_oversized_frame_closes_1009(live_server):
    c = _Conn(live_server.port)
    c.s.sendall(_frame(1, json.dumps({"type": "start", "sensor": {"width": 128, "height": 128}}).encode()))
    assert json.loads(c.recv()[1])["type"] == "ready"
    limit = live_server.server.config.ws_max_size
    # only the header of a frame over uvicorn's limit: the library refuses it before the payload
    c.s.sendall(bytes([0x82, 0x80 | 127]) + (limit + 1).to_bytes(8, "big") + b"mask")
    while True:
        op, msg = c.recv()
        if op == 8:
            break
    assert int.from_bytes(msg[:2], "big") == 1009
