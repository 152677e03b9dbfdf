"""The streams' ingest path: :class:`StreamBinner`, :class:`events.Binner` in one compiled loop.

A live stream pushes ~100 small packets per second (10 ms of events each). ``events.Binner``
handles such a packet in ~13 numpy calls (late-event filter, gap search, accumulation, frame
emission), ~20 us of mostly Python/numpy call overhead for ~70 events. :class:`StreamBinner`
runs the same rules event by event in one numba loop, with the whole binner state in a small
int64 array (~3 us per packet), and gives the same bins, ``late_events`` and ``gaps`` as
``events.Binner`` for any chunking (tests/service/test_ingest.py compares them on random
streams with late events, gaps and out-of-ROI events).

Rules (those of ``events.Binner``; events are handled in arrival order):

* the first event sets ``t0`` unless given; event ``i`` lies in bin ``k = (t - t0) // dt``;
* ``k`` below the open bin (all bins before it were emitted) -> late: dropped and counted;
* ``t`` more than ``max_gap_us`` after the latest kept event -> gap: the open bin is emitted,
  the empty bins in between are not, the next emitted bin carries ``reset``;
* ``k`` past the open bin -> the open bin and the empty bins up to ``k`` are emitted;
* otherwise the event is added to the open bin's frame (presence: 1, count: +1 saturating at
  255; events outside the ROI or with a polarity other than 0/1 only open the bin).

Polarity ``signed`` (rarely served) keeps ``events.Binner``; :func:`make_binner` chooses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# st slots (int64). State: t0, t0 known, open bin index, open bin has events, latest kept t,
# reset pending, late events, gaps. Constants: dt, max gap (-1: none), count mode, stride, x/y
# map lengths, offsets of ymap and cbase in the tables.
(_T0, _HAVE_T0, _K, _OPEN, _TMAX, _RESET, _LATE, _GAPS, _DT, _MAXGAP, _COUNT, _STRIDE, _NX, _NY, _YOFF,
 _COFF) = range(16)
_SLOTS = 16
#: frames emitted per kernel call before control returns to Python (a long silence without a
#: gap emits many empty bins; the loop resumes where it stopped)
_CAP = 16
#: bytes of one packed event record (protocol.RECORD_DTYPE: t int64, x uint16, y uint16, p uint8)
_RECORD = 13


def _ingest(buf: Any, st: Any, acc: Any, tab: Any, out: Any, outk: Any, base: int, n: int, start: int,
            check: bool) -> tuple[int, int]:
    """Bin packed event records ``buf[base + 13*i ...]`` for ``i = start .. n-1`` into the open
    frame ``acc`` (``stride`` cells + a trash cell), emitting complete bins into ``out`` (frames)
    and ``outk`` (row 0: bin index, row 1: reset), at most ``outk.shape[1]`` per call.

    Returns the number of frames emitted and the index of the first event not handled (a call
    resumes where the previous one stopped; the state is consistent at every return). With
    ``check``, returns ``(-1, 0)`` (nothing done) when some event has a polarity other than 0
    or 1; else such events only open their bin, like ``events.Binner``. Arrays are contiguous
    and few: numba's dispatch costs ~0.1 us per contiguous array, far more for strided ones."""
    stride = st[11]
    dt = st[8]
    max_gap = st[9]
    count = st[10] != 0
    nx = st[12]
    ny = st[13]
    yoff = st[14]
    coff = st[15]
    i = start
    cap = outk.shape[1]
    if i == 0 and check:
        for j in range(n):
            if buf[base + 13 * j + 12] > 1:
                return -1, 0
    n_out = 0
    while i < n:
        o = base + 13 * i
        ti = np.int64(0)
        for b in range(8):
            ti |= np.int64(buf[o + b]) << np.int64(8 * b)
        if st[1] == 0:
            st[0] = ti
            st[1] = 1
            st[4] = ti
        k = (ti - st[0]) // dt
        if k < st[2]:
            st[6] += 1
            i += 1
            continue
        if max_gap >= 0 and ti - st[4] > max_gap:
            if st[3] == 1:
                if n_out >= cap:
                    return n_out, i
                for c in range(stride):
                    out[n_out, c] = acc[c]
                    acc[c] = 0
                acc[stride] = 0
                outk[0, n_out] = st[2]
                outk[1, n_out] = st[5]
                n_out += 1
                st[3] = 0
            st[7] += 1
            st[2] = k
            st[5] = 1
        while k > st[2]:
            if n_out >= cap:
                return n_out, i
            if st[3] == 1:
                for c in range(stride):
                    out[n_out, c] = acc[c]
                    acc[c] = 0
                acc[stride] = 0
                st[3] = 0
            else:
                for c in range(stride):
                    out[n_out, c] = 0
            outk[0, n_out] = st[2]
            outk[1, n_out] = st[5]
            st[5] = 0
            n_out += 1
            st[2] += 1
        xi = np.int64(buf[o + 8]) | (np.int64(buf[o + 9]) << np.int64(8))
        yi = np.int64(buf[o + 10]) | (np.int64(buf[o + 11]) << np.int64(8))
        pi: Any = np.int64(buf[o + 12])
        pi = pi if pi <= 1 else 2
        xi = xi if xi < nx else nx
        yi = yi if yi < ny else ny
        cell = min(tab[coff + pi] + tab[yoff + yi] + tab[xi], stride)
        if count:
            v = acc[cell]
            if v < 255:
                acc[cell] = v + 1
        else:
            acc[cell] = 1
        st[3] = 1
        if ti > st[4]:
            st[4] = ti
        i += 1
    return n_out, i


_KERNEL: Any = None


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        import numba

        _KERNEL = numba.njit(cache=True, nogil=True, boundscheck=False)(_ingest)
    return _KERNEL


def _maps(roi: Any, merge: bool, pool: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell of an event = ``cbase[p] + ymap[y] + xmap[x]``; the last entry of each map (and
    values of 2**60 and more) lead to the trash cell."""
    far = 1 << 60
    h, w = roi.height // pool, roi.width // pool
    xmap = np.full(roi.x + w * pool + 1, far, dtype=np.int64)
    xmap[roi.x : -1] = np.arange(w * pool) // pool
    ymap = np.full(roi.y + h * pool + 1, far, dtype=np.int64)
    ymap[roi.y : -1] = (np.arange(h * pool) // pool) * w
    cbase = np.array([0, 0 if merge else h * w, far], dtype=np.int64)
    return xmap, ymap, cbase


class StreamBinner:
    """``events.Binner`` for the ``split``/``merge`` polarities, one compiled loop per push
    (see the module docstring). Same rules and counters (``late_events``, ``gaps``); bins come
    back as ``(frames [m, C, H, W] uint8, bin_end_us [m] int64, reset [m] bool)`` parts."""

    def __init__(self, spec: Any, t0: int | None = None, max_gap_us: int | None = 1_000_000) -> None:
        if spec.polarity not in ("split", "merge"):
            raise ValueError(f"StreamBinner handles split/merge polarity, not {spec.polarity!r}")
        if max_gap_us is not None and int(max_gap_us) < spec.dt_us:
            raise ValueError(f"max_gap_us ({max_gap_us}) must be at least dt_us ({spec.dt_us})")
        self.spec = spec
        self.shape = tuple(spec.shape)
        self.stride = int(np.prod(self.shape))
        self.dt = int(spec.dt_us)
        xmap, ymap, cbase = _maps(spec.roi, spec.polarity == "merge", int(spec.pool))
        self.tab = np.concatenate([xmap, ymap, cbase])
        st = self.st = np.zeros(_SLOTS, dtype=np.int64)
        st[_DT] = self.dt
        st[_MAXGAP] = -1 if max_gap_us is None else int(max_gap_us)
        st[_COUNT] = spec.mode == "count"
        st[_STRIDE] = self.stride
        st[_NX], st[_NY] = len(xmap) - 1, len(ymap) - 1
        st[_YOFF], st[_COFF] = len(xmap), len(xmap) + len(ymap)
        if t0 is not None:
            st[_T0] = st[_TMAX] = int(t0)
            st[_HAVE_T0] = 1
        self.acc = np.zeros(self.stride + 1, dtype=np.uint8)
        self._out = np.zeros((_CAP, self.stride), dtype=np.uint8)
        self._outk = np.zeros((2, _CAP), dtype=np.int64)
        self._k = _kernel()
        self._shape_m = {m: (m, *self.shape) for m in range(1, _CAP + 1)}

    @property
    def late_events(self) -> int:
        return int(self.st[_LATE])

    @property
    def gaps(self) -> int:
        return int(self.st[_GAPS])

    @property
    def t0(self) -> int | None:
        return int(self.st[_T0]) if self.st[_HAVE_T0] else None

    def push_packed(self, buf: np.ndarray, offset: int, n: int, check: bool = True) -> list[tuple[np.ndarray, list[int], list[bool]]]:
        """Bin ``n`` packed records (``protocol.RECORD_DTYPE``, 13 bytes each) starting at byte
        ``offset`` of the uint8 array ``buf``; the completed bins as ``(frames [m, C, H, W],
        bin_end_us, reset)`` parts (usually none or one bin). ``check``: raise ValueError (and
        bin nothing) when a polarity is not 0 or 1."""
        out: list[tuple[np.ndarray, list[int], list[bool]]] = []
        i = 0
        while True:
            m, i = self._k(buf, self.st, self.acc, self.tab, self._out, self._outk, offset, n, i, check)
            if m:
                if m < 0:
                    raise ValueError("event polarity must be 0 or 1")
                ks, resets = self._outk[:, :m].tolist()
                t0, dt = int(self.st[_T0]), self.dt
                out.append((self._out[:m].reshape(self._shape_m[m]).copy(), [t0 + (k + 1) * dt for k in ks],
                            [r != 0 for r in resets]))
            if i >= n:
                return out

    def push(self, events: np.ndarray) -> list[tuple[np.ndarray, list[int], list[bool]]]:
        """Bin a chunk of events (a structured array with ``t``, ``x``, ``y``, ``p``); like
        ``events.Binner``, polarities other than 0 and 1 only open their bin."""
        from .protocol import RECORD_DTYPE

        n = len(events)
        if n == 0:
            return []
        if events.dtype == RECORD_DTYPE and events.flags.c_contiguous:
            rec = events
        else:
            rec = np.empty(n, dtype=RECORD_DTYPE)
            rec["t"] = events["t"]
            for f in ("x", "y"):
                rec[f] = np.clip(events[f], 0, 65535)
            p = np.asarray(events["p"])
            rec["p"] = np.where((p == 0) | (p == 1), p, 2)
        return self.push_packed(rec.view(np.uint8), 0, n, check=False)

    def flush(self) -> list[tuple[np.ndarray, list[int], list[bool]]]:
        """Emit the open bin (if it has seen an event)."""
        st = self.st
        if not st[_OPEN]:
            return []
        frames = self.acc[: self.stride].reshape(1, *self.shape).copy()
        ends = [int(st[_T0] + (st[_K] + 1) * self.dt)]
        reset = [bool(st[_RESET] != 0)]
        self.acc[:] = 0
        st[_OPEN] = 0
        st[_RESET] = 0
        st[_K] += 1
        return [(frames, ends, reset)]


def make_binner(spec: Any, t0: int | None, max_gap_us: int | None) -> Any:
    """A :class:`StreamBinner` when it handles ``spec`` and numba is usable (``VDIB_NUMBA`` is
    not ``0``), else ``events.Binner`` (the same bins)."""
    from events import Binner
    from events.formats import _jit

    if spec.polarity in ("split", "merge") and _jit.enabled():
        return StreamBinner(spec, t0, max_gap_us)
    return _BinnerAdapter(Binner(spec, t0=t0, max_gap_us=max_gap_us))


class _BinnerAdapter:
    """``events.Binner`` with :class:`StreamBinner`'s output: ``(frames, bin_end_us, reset)``."""

    def __init__(self, binner: Any) -> None:
        self.binner = binner

    @property
    def late_events(self) -> int:
        return int(self.binner.late_events)

    @property
    def gaps(self) -> int:
        return int(self.binner.gaps)

    @staticmethod
    def _convert(segments: list[Any]) -> list[tuple[np.ndarray, list[int], list[bool]]]:
        return [(seg.frames, [int(e) for e in seg.bin_end_us], [bool(seg.reset and j == 0) for j in range(len(seg.frames))])
                for seg in segments]

    def push(self, events: np.ndarray) -> list[tuple[np.ndarray, list[int], list[bool]]]:
        return self._convert(self.binner.push(events))

    def flush(self) -> list[tuple[np.ndarray, list[int], list[bool]]]:
        return self._convert(self.binner.flush())
