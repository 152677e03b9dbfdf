"""Protection against hostile clients (issue 10): connection-level limits and timeouts, message
rate limits, work budgets and log redaction.

* :class:`GuardedH11Protocol`: uvicorn's h11 HTTP protocol with a header timeout (a request's
  headers, websocket handshakes included, must arrive within ``header_timeout_s`` of the
  connection or of the previous response: slowloris), a body timeout (a started body must be
  complete within ``body_timeout_s`` + 5 s, else the connection is closed; the upload routes
  answer 408 at ``body_timeout_s`` themselves) and a limit of open connections per client
  address (``max_connections_per_client``: more are closed at once, before any byte is read).
* :class:`GuardedWebSocketProtocol`: uvicorn's ``websockets-sansio`` protocol keeping the
  per-client count of an upgraded connection (:mod:`service.wsfast` subclasses it).
* :class:`TokenBucket`: the per-stream message rate limits.
* :class:`Budget`: an upload's CPU-seconds budget and its cancellation when the client leaves.
* :func:`estimate_bins`: the bins a recording would step, from its event times, before binning.
* :func:`install_log_redaction`: API keys and tokens in query strings never reach the logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from events.binning import count_bins

log = logging.getLogger("vdib.service")


# ---------------------------------------------------------------------------- connections
class _Guard:
    """Per-server state: open connections per client address, and the limits (keyword
    ``limits`` of the protocol classes, bound by :func:`service.app.uvicorn_options`)."""

    def __init__(self, limits: dict[str, float]) -> None:
        self.per_client: dict[str, int] = {}
        self.max_per_client = int(limits.get("max_connections_per_client", 0) or 0)
        self.header_timeout = float(limits.get("header_timeout_s", 0.0) or 0.0)
        self.body_timeout = float(limits.get("body_timeout_s", 0.0) or 0.0)
        self.refused = 0
        self.timed_out = 0

    def enter(self, host: str) -> bool:
        n = self.per_client.get(host, 0) + 1
        if self.max_per_client and n > self.max_per_client:
            self.refused += 1
            return False
        self.per_client[host] = n
        return True

    def leave(self, host: str) -> None:
        n = self.per_client.get(host, 0) - 1
        if n > 0:
            self.per_client[host] = n
        else:
            self.per_client.pop(host, None)


def guard_of(server_state: Any, limits: dict[str, float] | None = None) -> _Guard:
    """The :class:`_Guard` of a uvicorn server (created by its first connection)."""
    g = getattr(server_state, "vdib_guard", None)
    if g is None:
        g = _Guard(limits or {})
        server_state.vdib_guard = g
    return g


class GuardedH11Protocol(H11Protocol):
    """See the module docstring. Use with ``uvicorn.Config(http=functools.partial(GuardedH11Protocol,
    limits={...}))`` (:func:`service.app.uvicorn_options`)."""

    def __init__(self, *args: Any, limits: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard = guard_of(self.server_state, limits)
        self._peer: str | None = None  # counted against the per-client limit while set
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""  # "head": waiting for request headers, "body": for the rest of a body

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else ""
        if not self._guard.enter(host):
            transport.abort()  # before reading a byte: no buffer, no task
            return
        self._peer = host
        self._arm("head")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._peer is not None:
            self._guard.leave(self._peer)
            self._peer = None
        super().connection_lost(exc)
        TRIMMER.request()  # a request body's buffers back to the OS (at most every 10 s)

    def handle_events(self) -> None:
        super().handle_events()
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_state()

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._disarm()
        peer, self._peer = self._peer, None
        super().handle_websocket_upgrade(event)
        proto = self.transport.get_protocol()
        if isinstance(proto, GuardedWebSocketProtocol):
            proto.adopt(peer, self._guard)
        elif peer is not None:
            self._guard.leave(peer)

    # ------------------------------------------------------------------ timers
    def _follow_state(self) -> None:
        import h11

        if self.transport is None or self.transport.is_closing() or self.transport.get_protocol() is not self:
            self._disarm()
            return
        theirs = self.conn.their_state
        if theirs is h11.IDLE:
            if self._phase != "head":
                self._arm("head")
        elif theirs is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        else:
            self._disarm()

    def _arm(self, phase: str) -> None:
        self._disarm()
        t = self._guard.header_timeout if phase == "head" else self._guard.body_timeout + 5.0
        if t > 0:
            self._phase = phase
            self._timer = self.loop.call_later(t, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = ""

    def _expired(self) -> None:
        self._timer = None
        if self.transport is None or self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        self._guard.timed_out += 1
        log.info(
            "closing a connection from %s: request %s not received in time",
            self._peer,
            "headers" if self._phase == "head" else "body",
        )
        self._phase = ""
        self.transport.close()


#: Bytes one websocket message may have until the app marks the connection started (the stream
#: route sets ``scope[STARTED]`` once the key is checked, before its ``ready``): the start message
#: is small, so a client that has not authenticated buffers no more than this per connection
#: (over it: 1009 from the websocket layer).
PRE_START_MAX_BYTES = 64 * 1024
#: The scope key an app sets to lift :data:`PRE_START_MAX_BYTES` (then the configured size applies).
STARTED = "vdib.started"


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O websocket protocol that releases the per-client connection count of
    the HTTP connection it was upgraded from when it closes, and accepts messages of at most
    :data:`PRE_START_MAX_BYTES` until the app marks the connection started (``scope[STARTED]``,
    seen when the app next sends)."""

    _vdib_peer: str | None = None
    _vdib_guard: _Guard | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._full_max = self.config.ws_max_size
        self._answered = False
        self.conn.max_message_size = min(PRE_START_MAX_BYTES, self._full_max)

    def app_answered(self) -> None:
        """The app marked the stream started (authenticated): the full message size from now on."""
        self._answered = True
        self.conn.max_message_size = self._full_max

    async def send(self, message: Any) -> None:
        if not self._answered and self.scope.get(STARTED):
            self.app_answered()
        await super().send(message)

    def adopt(self, peer: str | None, guard: _Guard) -> None:
        self._vdib_peer, self._vdib_guard = peer, guard

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            peer, self._vdib_peer = self._vdib_peer, None
            if peer is not None and self._vdib_guard is not None:
                self._vdib_guard.leave(peer)


# ---------------------------------------------------------------------------- rates
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved; :meth:`take` is False when empty."""

    __slots__ = ("rate", "burst", "tokens", "t")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = float(burst)
        self.t = now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True

    def spend(self, now: float, amount: float) -> bool:
        """Take ``amount`` already used (e.g. CPU seconds); False once the bucket is overdrawn."""
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate) - amount
        self.t = now
        return self.tokens >= 0.0


# ---------------------------------------------------------------------------- uploads
class BudgetExceeded(Exception):
    """An upload passed its CPU budget (HTTP 413)."""


class Cancelled(Exception):
    """The client left; the work was stopped."""


class Budget:
    """CPU seconds of one upload's worker thread, and a cancel flag set when the client leaves.

    :meth:`check` is called by the work between chunks (``RunOptions.check``); it raises
    :class:`Cancelled` or :class:`BudgetExceeded`. CPU time is the calling thread's
    (``time.thread_time``), counted from the first check in that thread."""

    def __init__(self, cpu_s: float) -> None:
        self.cpu_s = float(cpu_s)
        self.cancelled = threading.Event()
        self._start: dict[int, float] = {}
        self.used = 0.0

    def cancel(self) -> None:
        self.cancelled.set()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("the client disconnected")
        now = time.thread_time()
        start = self._start.setdefault(threading.get_ident(), now)
        used = self.used + (now - start)
        if used > self.cpu_s:
            raise BudgetExceeded(f"the request used more than its CPU budget of {self.cpu_s:g} s")

    def finish_thread(self) -> None:
        """Add this thread's CPU time to ``used`` (call at the end of a piece of work)."""
        start = self._start.pop(threading.get_ident(), None)
        if start is not None:
            self.used += time.thread_time() - start


#: The bins a recording would step, from its event times, before binning (``events.count_bins``).
estimate_bins = count_bins


# ---------------------------------------------------------------------------- logs
_SECRET_QUERY = re.compile(
    r"([?&;](?:api[_-]?key|apikey|key|token|access_token|auth|authorization|password|"
    r"secret|bearer)=)[^&;\s\"]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with the values of secret-looking query parameters replaced by ``***``."""
    return _SECRET_QUERY.sub(r"\1***", text)


class RedactQuery(logging.Filter):
    """Rewrites log record arguments (uvicorn's access and websocket lines hold the path with its
    query string) so that API keys and tokens in a query string are not logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "=" in a for a in args):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in args)
        elif isinstance(record.msg, str) and "=" in record.msg and not args:
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    """Add :class:`RedactQuery` to uvicorn's loggers once (idempotent)."""
    for name in ("uvicorn.access", "uvicorn.error", "uvicorn"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactQuery) for f in lg.filters):
            lg.addFilter(RedactQuery())


# ---------------------------------------------------------------------------- memory
class MemoryTrimmer:
    """Gives freed heap memory back to the OS (glibc ``malloc_trim``) after streams close or
    uploads end, at most once per ``interval_s`` (10 s), in a worker thread. Python frees a closed
    session at once, but glibc keeps the pages of its arenas (one per thread that allocated);
    without a trim the RSS after a burst of streams stays a few percent above its start."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last = float("-inf")
        self._running = False
        self._pending = False  # a trailing trim is scheduled
        self._again = False  # requested during a trim: one more after it
        self._loop: asyncio.AbstractEventLoop | None = None
        self.trims = 0
        self._trim: Any = None
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self._trim = getattr(libc, "malloc_trim", None)
        except OSError:
            self._trim = None

    def request(self) -> None:
        """Trim soon (call from the event loop): now, or at the end of the interval when the last
        trim was less than ``interval_s`` ago; a request during a trim gets one more trim after
        it (memory freed meanwhile comes back too); a no-op without glibc."""
        if self._pending and self._loop is not None and self._loop.is_closed():
            self._pending = self._running = False  # scheduled on a loop that is gone (tests)
        if self._trim is None or self._pending:
            return
        if self._running:
            self._again = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        wait = self._last + self.interval_s - time.monotonic()
        self._pending, self._loop = True, loop
        if wait > 0:
            loop.call_later(wait, self._start, loop)
        else:
            self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending = False
        self._running, self._last = True, time.monotonic()
        loop.run_in_executor(None, self._run, loop)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._trim(0)
            self.trims += 1
        finally:
            self._running = False
            if self._again:
                self._again = False
                if not loop.is_closed():
                    loop.call_soon_threadsafe(self.request)


#: The process's trimmer: streams closing, uploads ending and HTTP connections closing ask it.
TRIMMER = MemoryTrimmer()
