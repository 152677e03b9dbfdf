"""Hostile-client bench (issue 10): each class of attack against a ``vdib serve`` subprocess on
loopback, bounded in time and size, while a few normal streams replay MNIST-DVS in real time.

For every attack: the server's RSS before / peak during / after (a few seconds after the
attack ended), the other streams' p99 frame latency (bin end -> frame received, end to end) in
a window before, during and after, and what the attacker got (close codes, HTTP statuses).
Targets (issue 10): other streams' p99 under 50 ms, RSS back within 10 % of its start.

Attackers connect from 127.0.0.2 (still loopback) so that the per-client connection limit
applies to them and not to the normal streams from 127.0.0.1.

    python -m bench.attack [--streams 6] [--only slowloris,ping_flood] [--out bench/results/attack]

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.service import REPO, RESULTS, _RawStream, make_packets, prepare_checkpoints, ws_frame

ATTACKER = "127.0.0.2"
P99_TARGET_MS = 50.0
RSS_TOLERANCE = 0.10
#: seconds after an attack at which its RSS "after" is read (the server trims at most every 10 s)
RSS_WAIT_S = 11.0
#: the server's limits for this bench (small enough that every class reaches its limit quickly)
SERVER_ENV = {
    "VDIB_HEADER_TIMEOUT_S": "3",
    "VDIB_BODY_TIMEOUT_S": "5",
    "VDIB_START_TIMEOUT_S": "5",
    "VDIB_MAX_CONNECTIONS_PER_CLIENT": "64",
    "VDIB_MAX_SESSIONS": "64",
    "VDIB_IDLE_TIMEOUT_S": "20",
    "VDIB_MAX_CONCURRENT_UPLOADS": "2",
    "VDIB_STATS_INTERVAL_S": "1.0",
}


# ---------------------------------------------------------------------------- server
class Server:
    def __init__(self, checkpoints: Path) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        env = dict(
            os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", VDIB_TORCH_THREADS="1", **SERVER_ENV
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "vdib_cli.py"),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--checkpoints",
                str(checkpoints),
                "--log-level",
                "warning",
                "--workers",
                "1",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        import httpx

        for _ in range(600):
            try:
                if httpx.get(self.http + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode() if self.proc.stderr else "server died")
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_s(self) -> float:
        """CPU seconds the server process has used (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return (err or b"").decode(errors="replace")


# ---------------------------------------------------------------------------- background streams
class Background:
    """``n`` normal streams replaying the recording in real time (10 ms packets, a frame every
    3 bins); every frame's end-to-end latency is recorded with its arrival time."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.samples: list[tuple[float, float]] = []  # (arrival, latency s)
        self.closed_codes: list[str] = []
        self.stop = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        packets, _ = make_packets(loops=150)  # ~5 min of event time
        frames_pre = [ws_frame(2, pk) for _, pk in packets]
        start = ws_frame(
            1, json.dumps({"type": "start", "sensor": {"width": 128, "height": 128}, "emit": 3}).encode()
        )
        perf = time.perf_counter
        base = [0.0] * self.n
        conns = []
        for i in range(self.n):

            def on_frame(payload: bytes, i: int = i) -> None:
                now = perf()
                self.samples.append(
                    (now, now - (base[i] + int.from_bytes(payload[12:20], "little", signed=True) / 1e6))
                )

            def on_text(payload: bytes) -> None:
                obj = json.loads(payload)
                if obj["type"] == "error":
                    self.closed_codes.append(str(obj["code"]))

            _, proto = await loop.create_connection(
                functools.partial(_RawStream, self.port, on_frame, on_text), "127.0.0.1", self.port
            )
            await asyncio.wait_for(proto.opened, 30)
            proto.transport.write(start)
            conns.append(proto)
        await asyncio.sleep(0.5)
        t0 = perf() + 0.1
        for i in range(self.n):
            base[i] = t0 + i * 0.01 / self.n
        j = 0
        while not self.stop and j < len(packets):
            due = t0 + packets[j][0]
            delay = due - perf()
            if delay > 0:
                await asyncio.sleep(delay)
            for c in conns:
                if not c.transport.is_closing():
                    c.transport.write(frames_pre[j])
            j += 1
        for c in conns:
            if not c.transport.is_closing():
                c.transport.write(ws_frame(1, b'{"type": "end"}'))
        await asyncio.sleep(1.0)
        self.dead = sum(c.closed.done() for c in conns)

    def p99(self, t0: float, t1: float) -> tuple[float | None, int]:
        lat = [v for t, v in self.samples if t0 <= t < t1]
        return (float(np.percentile(np.asarray(lat) * 1e3, 99)) if lat else None), len(lat)


# ---------------------------------------------------------------------------- attacker helpers
async def open_attacker(port: int, addr: str = ATTACKER) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(addr, 0))


def masked(opcode: int, payload: bytes) -> bytes:
    return ws_frame(opcode, payload)


async def ws_attacker(port: int, messages: list[bytes], read_s: float = 10.0, pace: float = 0.0) -> str:
    """Open a websocket from the attacker address, send pre-built frames, return the close code
    the server sent (or what happened)."""
    try:
        r, w = await open_attacker(port)
    except OSError as exc:
        return f"connect:{type(exc).__name__}"
    key = base64.b64encode(os.urandom(16)).decode()
    w.write(
        (
            f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    try:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        if b" 101 " not in head.split(b"\r\n")[0]:
            w.close()
            return "http:" + head.split(b" ")[1].decode()
        for m in messages:
            w.write(m)
            if pace:
                await asyncio.sleep(pace)
            elif w.transport.get_write_buffer_size() > 1 << 20:
                await w.drain()
        return await asyncio.wait_for(_close_code(r), read_s)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as exc:
        return type(exc).__name__
    finally:
        w.close()


async def _close_code(r: asyncio.StreamReader) -> str:
    while True:
        h = await r.readexactly(2)
        n = h[1] & 0x7F
        if n == 126:
            n = int.from_bytes(await r.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await r.readexactly(8), "big")
        payload = await r.readexactly(n)
        if h[0] & 0x0F == 8:
            return str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "close"


async def http_attacker(port: int, method: str, path: str, body: bytes, headers: str = "") -> str:
    try:
        r, w = await open_attacker(port)
    except OSError as exc:
        return f"connect:{type(exc).__name__}"
    try:
        w.write(
            (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}"
                "Connection: close\r\n\r\n"
            ).encode()
            + body
        )
        line = await asyncio.wait_for(r.readline(), 120)
        return line.split(b" ")[1].decode() if line else "closed"
    except (TimeoutError, ConnectionError, IndexError) as exc:
        return type(exc).__name__
    finally:
        w.close()


def count(codes: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in codes:
        out[c] = out.get(c, 0) + 1
    return dict(sorted(out.items()))


START = json.dumps({"type": "start", "sensor": {"width": 128, "height": 128}}).encode()


def packet(t: list[int]) -> bytes:
    from events import EVENT_DTYPE
    from service.protocol import encode_events

    ev = np.zeros(len(t), EVENT_DTYPE)
    ev["t"], ev["x"], ev["y"], ev["p"] = t, 60, 60, 1
    return encode_events(ev)


# ---------------------------------------------------------------------------- attacks
async def a_time_amplification(port: int) -> dict[str, Any]:
    """Events just under max_gap_us apart (one message), dt_us=1 streams and uploads, an upload
    spanning more bins than max_upload_bins."""
    spaced = masked(2, packet([i * 999_000 for i in range(5000)]))
    codes = await asyncio.gather(*(ws_attacker(port, [masked(1, START), spaced]) for _ in range(20)))
    dt1 = json.dumps({"type": "start", "sensor": {"width": 128, "height": 128}, "dt_us": 1}).encode()
    codes += await asyncio.gather(*(ws_attacker(port, [masked(1, dt1)]) for _ in range(10)))
    csv = b"t,x,y,p\n0,1,1,1\n1000000,1,1,1\n"
    st = [await http_attacker(port, "POST", "/v1/naturalize?dt_us=1&filename=a.csv", csv) for _ in range(5)]
    long = ("t,x,y,p\n" + "".join(f"{i * 900_000},1,1,1\n" for i in range(3000))).encode()
    st += [
        await http_attacker(port, "POST", "/v1/naturalize?dt_us=1000&filename=a.csv", long) for _ in range(5)
    ]
    return {"ws_close_codes": count(list(codes)), "http_status": count(st)}


async def a_session_churn(port: int) -> dict[str, Any]:
    """150 streams, 15 at a time, opened and closed every way (end, protocol error, disconnect)
    with a large message each (30k events over 1 s of bins): the memory must come back."""
    big = masked(2, packet([i * 33 for i in range(30_000)]))
    end = masked(1, b'{"type": "end"}')
    bad = masked(2, b"VDEV\x02\x00\x00\x00\x00\x00\x00\x00")
    codes: list[str] = []
    for _k in range(10):
        batch = []
        for i in range(15):
            tail = [end] if i % 3 == 0 else [bad] if i % 3 == 1 else []
            batch.append(ws_attacker(port, [masked(1, START), big, *tail], read_s=3 if not tail else 10))
        codes += await asyncio.gather(*batch)
    return {"ws_close_codes": count(codes)}


async def a_space_amplification(port: int) -> dict[str, Any]:
    """A few-byte CSV whose events make a 16384 x 16384 sensor, with roi=full."""
    csv = b"t,x,y,p\n0,0,0,1\n10,16383,16383,0\n"
    st = [await http_attacker(port, "POST", "/v1/naturalize?roi=full&filename=a.csv", csv) for _ in range(5)]
    return {"http_status": count(st)}


async def a_bad_input(port: int) -> dict[str, Any]:
    """Inputs that used to give 500 / 1011: ROI past uint16, t0_us out of range, deep JSON,
    AEDAT 4 cut inside its magic, junk uploads."""
    roi = json.dumps(
        {"type": "start", "sensor": {"width": 65536, "height": 65536}, "roi": [65500, 0, 52, 52]}
    ).encode()
    t0 = json.dumps({"type": "start", "sensor": {"width": 128, "height": 128}, "t0_us": 2**63 - 1}).encode()
    deep = b'{"type": "start", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    codes = await asyncio.gather(
        *(ws_attacker(port, [masked(1, m)]) for m in (roi, t0, deep) for _ in range(5))
    )
    st = [
        await http_attacker(port, "POST", "/v1/naturalize?roi=65500,0,52,52", os.urandom(4096))
        for _ in range(5)
    ]
    st += [await http_attacker(port, "POST", "/v1/naturalize", os.urandom(200_000)) for _ in range(5)]
    return {"ws_close_codes": count(list(codes)), "http_status": count(st)}


async def a_ping_flood(port: int) -> dict[str, Any]:
    """5 connections sending 20,000 pings each as fast as the socket takes them."""
    ping = masked(1, b'{"type": "ping"}')
    codes = await asyncio.gather(*(ws_attacker(port, [masked(1, START), ping * 20_000]) for _ in range(5)))
    return {"ws_close_codes": count(list(codes))}


async def a_flush_flood(port: int) -> dict[str, Any]:
    flush = masked(1, b'{"type": "flush"}')
    codes = await asyncio.gather(
        *(
            ws_attacker(port, [masked(1, START), masked(2, packet([0, 5000])), flush * 20_000])
            for _ in range(5)
        )
    )
    return {"ws_close_codes": count(list(codes))}


async def a_aedat4_bomb(port: int) -> dict[str, Any]:
    """A ZSTD AEDAT 4 stream and upload of 3M identical events (tens of KB compressed)."""
    import io

    from events import EVENT_DTYPE, write_aedat4

    ev = np.zeros(3_000_000, EVENT_DTYPE)
    ev["t"] = np.arange(len(ev)) // 1000
    buf = io.BytesIO()
    write_aedat4(buf, ev, 128, 128, compression="zstd", packet_events=1_000_000)
    data = buf.getvalue()
    del ev
    codes = await asyncio.gather(*(ws_attacker(port, [masked(1, START), masked(2, data)]) for _ in range(3)))
    st = [await http_attacker(port, "POST", "/v1/naturalize?format=npz&emit=last", data) for _ in range(2)]
    return {"compressed_bytes": len(data), "ws_close_codes": count(list(codes)), "http_status": count(st)}


async def a_upload_flood(port: int) -> dict[str, Any]:
    """30 concurrent 4 MB junk-as-N-MNIST uploads."""
    junk = np.random.default_rng(0).integers(0, 256, 4_000_000, dtype=np.uint8).tobytes()
    st = await asyncio.gather(
        *(http_attacker(port, "POST", "/v1/naturalize?filename=a.bin&format=npz", junk) for _ in range(30))
    )
    return {"http_status": count(list(st))}


async def a_idle_connections(port: int) -> dict[str, Any]:
    """200 websocket connections from one address that never send a start message; then a
    normal client (another address) must still get a session."""
    conns = []
    refused = 0
    for _ in range(200):
        try:
            r, w = await open_attacker(port)
        except OSError:
            refused += 1
            continue
        key = base64.b64encode(os.urandom(16)).decode()
        w.write(
            (
                f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        conns.append((r, w))
    await asyncio.sleep(1.0)
    # a legitimate client from 127.0.0.1
    r, w = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    w.write(
        (
            f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
    w.write(masked(1, START))  # after the 101 (RFC 6455 4.1: no frames before the server's answer)
    h = await asyncio.wait_for(r.readexactly(2), 10)
    n = h[1] & 0x7F
    n = int.from_bytes(await r.readexactly(2), "big") if n == 126 else n
    obj = json.loads(await r.readexactly(n))
    legit = (
        obj["type"] if obj["type"] == "ready" else f"{obj['type']} {obj.get('code')}: {obj.get('message')}"
    )
    w.close()
    closed = 0
    for rr, ww in conns:
        try:
            data = await asyncio.wait_for(rr.read(1 << 16), 0.01)
            closed += data == b""
        except TimeoutError:
            pass
        except ConnectionError:
            closed += 1
        ww.close()
    return {"attempted": 200, "refused_or_reset": refused + closed, "legit_client_got": legit}


async def a_slowloris(port: int) -> dict[str, Any]:
    """60 connections sending request headers, 40 sending a body, at 10 bytes per second, and 4
    websocket connections trickling a 1 MB binary frame at ~6 kB/s; how many of each are still
    open after 12 s (a websocket message must complete within idle_timeout_s: 20 s here)."""
    opened: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    kinds: list[str] = []

    # one source address per kind, each under the per-client limit (that limit has its own attack)
    addrs = {"headers": "127.0.0.3", "body": "127.0.0.4", "ws_frame": "127.0.0.5"}

    async def trickle(
        kind: str, prefix: bytes, data: bytes, per_s: float, seconds: float, after_101: bytes = b""
    ) -> None:
        try:
            r, w = await open_attacker(port, addrs[kind])
        except OSError:
            return
        opened.append(w)
        readers.append(r)
        kinds.append(kind)
        w.write(prefix)
        if after_101:  # a websocket: the start message once upgraded, then the trickled frame
            try:
                await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                return
            w.write(after_101)
        t = time.perf_counter()
        i = 0
        step = max(1, int(per_s / 10))
        while time.perf_counter() - t < seconds and not w.is_closing():
            w.write(data[i : i + step])
            i += step
            await asyncio.sleep(0.1)
            if r.at_eof():
                break

    hdr = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 10_000
    body_prefix = b"POST /v1/naturalize HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    key = base64.b64encode(os.urandom(16)).decode()
    ws_prefix = (
        f"GET /v1/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    big = masked(2, packet(list(range(0, 80_000))))  # ~1 MB frame
    tasks = [trickle("headers", hdr[:5], hdr[5:], 10, 12) for _ in range(60)]
    tasks += [trickle("body", body_prefix, b"x" * 100_000, 10, 12) for _ in range(40)]
    tasks += [trickle("ws_frame", ws_prefix, big, 6000, 12, masked(1, START)) for _ in range(4)]
    await asyncio.gather(*tasks)
    still_open = {"headers": 0, "body": 0, "ws_frame": 0}
    answers: list[str] = []
    for r, w, kind in zip(readers, opened, kinds, strict=True):
        try:
            data = await asyncio.wait_for(r.read(1 << 16), 0.05)
            if data.startswith(b"HTTP/1.1 4"):
                answers.append(data[9:12].decode())
            still_open[kind] += data != b"" and not r.at_eof()
        except TimeoutError:
            still_open[kind] += 1
        except ConnectionError:
            pass
        w.close()
    return {"connections": len(opened), "still_open_after_12s": still_open, "http_answers": count(answers)}


ATTACKS: dict[str, Callable[[int], Awaitable[dict[str, Any]]]] = {
    "time_amplification": a_time_amplification,
    "session_churn": a_session_churn,
    "space_amplification": a_space_amplification,
    "bad_input": a_bad_input,
    "ping_flood": a_ping_flood,
    "flush_flood": a_flush_flood,
    "aedat4_bomb": a_aedat4_bomb,
    "upload_flood": a_upload_flood,
    "idle_connections": a_idle_connections,
    "slowloris": a_slowloris,
}


# ---------------------------------------------------------------------------- driver
async def _drain(server: Server, n_streams: int, limit: float) -> float | None:
    """Seconds until the server holds no more streams than the background's (None: not within
    ``limit``): a server that is behind still holds the attack's streams that ended normally."""
    import httpx

    t = time.perf_counter()
    async with httpx.AsyncClient() as c:
        while time.perf_counter() - t < limit:
            try:
                if (await c.get(server.http + "/readyz", timeout=10)).json()["streams"] <= n_streams:
                    return round(time.perf_counter() - t, 1)
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            await asyncio.sleep(0.5)
    return None


async def _sample(server: Server, peak: list[float]) -> None:
    while True:
        peak.append(server.rss_mb())
        await asyncio.sleep(0.2)


async def run(server: Server, names: list[str], n_streams: int, settle: float) -> list[dict[str, Any]]:
    bg = Background(server.port, n_streams)
    bg_task = asyncio.create_task(bg.run())
    perf = time.perf_counter
    await asyncio.sleep(4.0)  # streams started and warm
    results = []
    for name in names:
        rss0 = server.rss_mb()
        t_before = perf()
        await asyncio.sleep(settle)
        peak = [server.rss_mb()]

        sampler = asyncio.create_task(_sample(server, peak))
        c0 = server.cpu_s()
        t0 = perf()
        try:
            outcome = await asyncio.wait_for(ATTACKS[name](server.port), 120)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next attack
            outcome = {"error": f"{type(exc).__name__}: {exc}"}
        t1 = perf()
        drained = await _drain(server, n_streams, 90.0)  # the attack's streams gone (or 90 s passed)
        cpu = server.cpu_s() - c0  # the attack's cost to the server, the background's share included
        sampler.cancel()
        await asyncio.sleep(settle)
        t_after = perf()
        await asyncio.sleep(settle)
        # the server gives freed heap pages back at most every 10 s (MemoryTrimmer): RSS after that
        await asyncio.sleep(max(0.0, t1 + RSS_WAIT_S - perf()))
        rss1 = server.rss_mb()
        p_before, n_before = bg.p99(t_before, t0)
        p_during, n_during = bg.p99(t0, t1)
        p_after, n_after = bg.p99(t_after, perf())
        row = {
            "attack": name,
            "seconds": round(t1 - t0, 2),
            "outcome": outcome,
            "drain_s": drained,
            "server_cpu_s": round(cpu, 2),
            "rss_mb": {"before": round(rss0, 1), "peak": round(max(peak), 1), "after": round(rss1, 1)},
            "rss_returned": bool(rss1 <= rss0 * (1 + RSS_TOLERANCE)),
            "p99_ms": {"before": p_before, "during": p_during, "after": p_after},
            "frames": {"before": n_before, "during": n_during, "after": n_after},
            "p99_ok": all(p is not None and p < P99_TARGET_MS for p in (p_before, p_during, p_after)),
            "server_alive": server.alive(),
            "load_avg_1min": round(os.getloadavg()[0], 1),  # of the whole machine (others' work included)
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    bg.stop = True
    await bg_task
    results.append(
        {
            "background": {
                "streams": n_streams,
                "error_closes": count(bg.closed_codes),
                "frames": len(bg.samples),
            }
        }
    )
    return results


def write_md(res: dict[str, Any], path: Path) -> None:
    lines = [
        "# Hostile-client bench (`python -m bench.attack`)",
        "",
        f"{res['date']}, {res['host']}; server `vdib serve` ({res['model']}), {res['streams']} normal streams "
        f"(MNIST-DVS in real time, emit 3) during every attack; attackers on {ATTACKER}. Server limits: "
        + ", ".join(f"`{k}={v}`" for k, v in SERVER_ENV.items())
        + ".",
        "",
        f"Targets: other streams' p99 < {P99_TARGET_MS:g} ms before/during/after; RSS {RSS_WAIT_S:g} s after "
        f"the attack within {RSS_TOLERANCE:.0%} of before.",
        "",
        "| attack | s | outcome | drained after s | server CPU s | RSS MB before / peak / after | returned | "
        "p99 ms before / during / after | p99 ok | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.1f}"

    for r in res["attacks"]:
        if "attack" not in r:
            continue
        o = json.dumps(r["outcome"]).replace("|", "/")
        rss, p = r["rss_mb"], r["p99_ms"]
        lines.append(
            f"| {r['attack']} | {r['seconds']} | `{o}` | {r.get('drain_s', '-')} | {r.get('server_cpu_s', '-')} | "
            f"{rss['before']} / {rss['peak']} / {rss['after']} | "
            f"{'yes' if r['rss_returned'] else '**no**'} | {f(p['before'])} / {f(p['during'])} / "
            f"{f(p['after'])} | {'yes' if r['p99_ok'] else '**no**'} | {r.get('load_avg_1min', '-')} |"
        )
    bg = [r for r in res["attacks"] if "background" in r]
    if bg:
        lines += [
            "",
            f"Background streams: {json.dumps(bg[0]['background'])} (error closes must be none; they "
            "answer the server's keep-alive pings, so they live past uvicorn's 20 s ping timeout).",
        ]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--only", default=None, help="comma-separated attacks (default: all)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of the before and after windows")
    ap.add_argument("--out", default=str(RESULTS / "attack"))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(ATTACKS)
    tmp = Path(tempfile.mkdtemp())
    checkpoints, model = prepare_checkpoints(tmp)
    server = Server(checkpoints)
    gc.disable()
    try:
        attacks = asyncio.run(run(server, names, args.streams, args.settle))
    finally:
        gc.enable()
        err = server.stop()
    res = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": f"{os.cpu_count()} cores",
        "model": model,
        "streams": args.streams,
        "attacks": attacks,
        "server_errors": [ln for ln in err.splitlines() if "ERROR" in ln or "Traceback" in ln][:50],
        "server_stderr_tail": err.splitlines()[-200:],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    write_md(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
