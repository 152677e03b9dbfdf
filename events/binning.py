"""Events to spike frames: one-shot :func:`bin_events` and the streaming :class:`Binner`.

Bin ``k`` covers ``[t0 + k*dt, t0 + (k+1)*dt)`` (DESIGN.md "Time"). A frame is ``[C, H, W]``:

* ``polarity="split"``: C = 2, channel 0 = off events, channel 1 = on events;
* ``polarity="merge"``: C = 1, both polarities together;
* ``polarity="signed"``: C = 1, ``int8`` holding ``split[on] - split[off]`` (so presence gives
  -1/0/+1 and counts give ``clip(min(n_on, 255) - min(n_off, 255), -128, 127)``).

``mode="presence"`` stores 1 where at least one event fell in the (polarity, pixel, bin) cell
(the MNIST-DVS preprocessing of the VDIB authors); ``mode="count"`` stores the number of events,
saturated at 255. ``pool`` sums (count) or ORs (presence) ``pool x pool`` blocks of the ROI:
``H = roi.height // pool``, ``W = roi.width // pool``; rows and columns of the ROI past
``H * pool`` / ``W * pool`` are ignored, like floor-mode pooling.

Speed: with numba (a dependency; ``VDIB_NUMBA=0``, a missing numba or fewer than a million
events in ``bin_events`` select the numpy path, which gives identical frames; the streaming
``Binner`` always uses the loop) each event goes through one compiled loop: bin and cell from
three tiny tables (``cbase[p] + ymap[y] + xmap[x]``), outside events sent to a trash cell
without branching, the bin division only when ``t`` leaves the current bin. About 300 Mev/s on
one core for the full 346 x 260 sensor unpooled, 400+ pooled or cropped
(``python -m bench.events``). The numpy path works in cache-sized chunks: a look-up table maps
``(p, y, x)`` to the output cell, the bin offset is added, and presence is one fancy-index
assignment (``out[idx] = 1``), counts a ``np.bincount``; about 150-210 Mev/s. ``np.add.at``
would be ~22 Mev/s.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

import numpy as np

from ._types import EVENT_DTYPE, EventFormatError, EventLimitError
from .formats import _jit
from .formats._jit import kernel, register

Polarity = Literal["split", "merge", "signed"]
Mode = Literal["presence", "count"]

_POLARITIES = ("split", "merge", "signed")
_MODES = ("presence", "count")
# Events per chunk: the record slice (13 B/event) and two int64 buffers stay in L2.
_CHUNK = 65536
# Above this many output cells, counts are accumulated per chunk instead of one global bincount
# (whose int64 result would be 8x the output size).
_BINCOUNT_CELLS = 1 << 24
#: Bytes of ROI look-up tables kept between calls (least recently used ROIs are dropped first).
TABLE_CACHE_BYTES = 16 << 20
#: Largest frame (cells ``C * H * W`` after pooling) a spec may ask for: 64 M cells (a 2-channel
#: 5792 x 5792 frame); larger ROIs are refused before anything is allocated (pool them).
MAX_FRAME_CELLS = 1 << 26


class ROI(NamedTuple):
    """A rectangle of the sensor in event coordinates (origin top-left, x right, y down)."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def centre(cls, sensor_w: int, sensor_h: int, w: int, h: int) -> ROI:
        """The ``w x h`` crop centred on a ``sensor_w x sensor_h`` sensor (rounded down-left)."""
        if not (0 < w <= sensor_w and 0 < h <= sensor_h):
            raise ValueError(f"a {w}x{h} crop does not fit a {sensor_w}x{sensor_h} sensor")
        return cls((sensor_w - w) // 2, (sensor_h - h) // 2, w, h)

    @classmethod
    def full(cls, sensor_w: int, sensor_h: int) -> ROI:
        """The whole sensor."""
        if sensor_w <= 0 or sensor_h <= 0:
            raise ValueError(f"bad sensor size {sensor_w}x{sensor_h}")
        return cls(0, 0, sensor_w, sensor_h)


def _check(roi: ROI, dt_us: int, polarity: str, mode: str, pool: int) -> None:
    if polarity not in _POLARITIES:
        raise ValueError(f"polarity must be one of {_POLARITIES}, not {polarity!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, not {mode!r}")
    if int(dt_us) <= 0:
        raise ValueError(f"dt_us must be positive, not {dt_us}")
    if int(pool) < 1:
        raise ValueError(f"pool must be >= 1, not {pool}")
    x, y, w, h = (int(v) for v in roi)
    if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > 65535 or y + h > 65535:
        raise ValueError(f"bad ROI {tuple(roi)}")
    if w // pool == 0 or h // pool == 0:
        raise ValueError(f"pool {pool} leaves nothing of a {w}x{h} ROI")
    if 2 * (w // pool) * (h // pool) > MAX_FRAME_CELLS:
        raise ValueError(
            f"a {w}x{h} ROI at pool {pool} makes frames of {2 * (w // pool) * (h // pool)} cells, "
            f"over the limit of {MAX_FRAME_CELLS}: pool it"
        )


@dataclass(frozen=True)
class BinSpec:
    """How a stream becomes frames: ROI, bin width, polarity handling, cell mode, pooling."""

    roi: ROI
    dt_us: int
    polarity: Polarity = "split"
    mode: Mode = "presence"
    pool: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "roi", ROI(*(int(v) for v in self.roi)))
        _check(self.roi, self.dt_us, self.polarity, self.mode, self.pool)

    @property
    def channels(self) -> int:
        return 2 if self.polarity == "split" else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one frame."""
        return (self.channels, self.roi.height // self.pool, self.roi.width // self.pool)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.int8 if self.polarity == "signed" else np.uint8)

    def bin(self, events: np.ndarray, t0: int | None = None, n_bins: int | None = None) -> np.ndarray:
        """``bin_events`` with this spec."""
        return bin_events(events, self.roi, self.dt_us, t0, n_bins, self.polarity, self.mode, self.pool)


#: The VDIB authors' MNIST-DVS preprocessing (../shared/VDIB-REFERENCE.md): they read jAER
#: DVS128 addresses as ``x_a = 127 - x_raw`` and ``y_a = y_raw`` (y up) and keep
#: ``48 <= x_a, y_a <= 73``. Our readers give ``x = 127 - x_raw`` (the same mirrored x, the
#: image jAER shows) and ``y = 127 - y_raw`` (top-left origin), so the same 26 x 26 pixels are
#: ``48 <= x <= 73`` and ``54 <= y <= 79``: ROI(48, 54, 26, 26). 10 ms bins, split polarity,
#: presence. The scale-4 digit spans x 48..74, y 54..75 (5th-95th percentile of the events of
#: the real recording mnist_0_scale04_0001), so the crop is centred on it.
MNIST_DVS = BinSpec(ROI(48, 54, 26, 26), 10_000, "split", "presence", 1)


class _TableCache:
    """ROI tables by key, least recently used first out, at most ``max_bytes`` in all (a table
    larger than that is built for the call and not kept). Thread-safe (uploads bin in threads)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any, build: Callable[[], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]  # type: ignore[no-any-return]
        value = build()
        size = sum(a.nbytes for a in value)
        with self._lock:
            if size <= self.max_bytes and key not in self._items:
                self._items[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, old) = self._items.popitem(last=False)
                    self._bytes -= old
        return value

    @property
    def nbytes(self) -> int:
        return self._bytes


#: The per-axis tables of recent ROIs (a few kB each; bounded in bytes, see _TableCache).
_TABLES = _TableCache(TABLE_CACHE_BYTES)

# Table entry for "outside the ROI": three of them plus a frame offset stay below 2**63, and any
# sum holding one is past the trash cell (clamped onto it).
_FAR = 1 << 60


def _maps(roi: ROI, polarity: str, pool: int) -> tuple[np.ndarray, ...]:
    """Per-axis tables: ``xmap[x]`` = output column, ``ymap[y]`` = output row times W,
    ``cbase[p]`` = channel offset, each ending with one ``_FAR`` entry that every coordinate
    outside the ROI is sent to; the cell of an event is ``cbase[p] + ymap[y] + xmap[x]``. Their
    size follows the ROI's sides (never its area); cached in bytes (:data:`TABLE_CACHE_BYTES`)."""
    return _TABLES.get((roi, polarity, pool), lambda: _build_maps(roi, polarity, pool))


def _build_maps(roi: ROI, polarity: str, pool: int) -> tuple[np.ndarray, ...]:
    h, w = roi.height // pool, roi.width // pool
    xmap = np.full(roi.x + w * pool + 1, _FAR, dtype=np.int64)
    xmap[roi.x : -1] = np.arange(w * pool) // pool
    ymap = np.full(roi.y + h * pool + 1, _FAR, dtype=np.int64)
    ymap[roi.y : -1] = (np.arange(h * pool) // pool) * w
    cbase = np.array([0, 0 if polarity == "merge" else h * w, _FAR], dtype=np.int64)
    for a in (xmap, ymap, cbase):
        a.flags.writeable = False  # cached and shared
    return xmap, ymap, cbase


@register
def accumulate_events(
    flat: np.ndarray,
    t: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    p: np.ndarray,
    xmap: np.ndarray,
    ymap: np.ndarray,
    cbase: np.ndarray,
    t0: int,
    dt: int,
    n_bins: int,
    stride: int,
    count: bool,
) -> Any:
    """Fused binning loop (compiled by numba): for each event, bin ``k = (t - t0) // dt`` and
    cell ``k * stride + cbase[p] + ymap[y] + xmap[x]``; presence sets it to 1, count adds 1
    saturating at 255. Events outside the ROI, the window ``0 <= k < n_bins`` or with ``p``
    not 0/1 go to the trash cell ``flat[n_bins * stride]`` (no branch to mispredict when
    in/out alternates, as it does for a crop). The division is only done when ``t`` leaves the
    current bin (events are mostly sorted). Returns ``max(t - t0)`` over all events (>= -1)."""
    t_max = np.int64(-1)
    nx = len(xmap) - 1
    ny = len(ymap) - 1
    trash = np.int64(n_bins) * stride
    far = np.int64(1) << np.int64(60)
    lo: Any = np.int64(0)
    hi: Any = np.int64(0)  # current bin [lo, hi) in t - t0; empty at first
    base: Any = far
    for i in range(len(t)):
        ti = np.int64(t[i]) - t0
        t_max = max(t_max, ti)
        pi: Any = np.int64(p[i])
        xi: Any = np.int64(x[i])
        yi: Any = np.int64(y[i])
        pi = pi if 0 <= pi <= 1 else 2
        xi = xi if 0 <= xi < nx else nx
        yi = yi if 0 <= yi < ny else ny
        if ti < lo or ti >= hi:
            if ti < 0:
                lo, hi, base = -far, np.int64(0), far
            else:
                k = ti // dt
                if k >= n_bins:
                    lo, hi, base = np.int64(n_bins) * dt, far, far
                else:
                    lo, hi, base = k * dt, k * dt + dt, k * stride
        c = min(base + cbase[pi] + ymap[yi] + xmap[xi], trash)
        if count:
            v = flat[c]
            if v < 255:
                flat[c] = v + 1
        else:
            flat[c] = 1
    return t_max


@register
def signed_frames(split: np.ndarray, out: np.ndarray) -> None:
    """``out[T, HW] = clip(split[T, 1, HW] - split[T, 0, HW], -128, 127)`` (compiled by numba)."""
    for k in range(split.shape[0]):
        for j in range(split.shape[2]):
            d = np.int16(split[k, 1, j]) - np.int16(split[k, 0, j])
            out[k, j] = max(-128, min(127, d))


def _fill_index(
    events: np.ndarray,
    maps: tuple[np.ndarray, ...],
    stride: int,
    dt_us: int,
    t0: int,
    n_bins: int,
    out: np.ndarray,
    tmp: np.ndarray,
    tmp2: np.ndarray,
    flags: np.ndarray,
) -> int:
    """Write the flat cell index of every event into ``out`` (``intp``, same length).

    Frames are ``stride = C*H*W`` cells apart; events outside the ROI or outside
    ``[t0, t0 + n_bins*dt)`` get the trash cell ``n_bins * stride`` (one past the frames).
    ``events`` is at most one chunk long; ``tmp``, ``tmp2`` (int64) and ``flags`` (bool) are
    scratch buffers at least as long. Returns ``max(t) - t0`` over the chunk.
    """
    xmap, ymap, cbase = maps
    n = len(events)
    a, tmp, tmp2, flags = out[:n], tmp[:n], tmp2[:n], flags[: max(n - 1, 0)]
    # Cell within the frame: cbase[min(p, 2)] + ymap[min(y, ny)] + xmap[min(x, nx)], the last
    # entry of each table being _FAR (outside). Copying each strided field into a contiguous
    # buffer first is faster than mixed-type ufuncs on it; minimums on the uint64 view also
    # send negative values (signed input dtypes) to the last entry.
    tu = tmp.view(np.uint64)
    for field, table in (("p", cbase), ("y", ymap), ("x", xmap)):
        np.copyto(tmp, events[field], casting="unsafe")
        np.minimum(tu, len(table) - 1, out=tu)
        if field == "p":
            table.take(tmp, out=a)
        else:
            table.take(tmp, out=tmp2)
            a += tmp2
    # Bin k = (t - t0) // dt, offset k * stride; k outside [0, n_bins) -> offset n_bins * stride.
    np.copyto(tmp, events["t"], casting="unsafe")
    tmp -= t0
    k0, k1 = int(tmp[0]) // dt_us, int(tmp[-1]) // dt_us
    if 0 <= k1 - k0 <= 64:
        np.greater_equal(tmp[1:], tmp[:-1], out=flags)
        if flags.all():
            # Sorted chunk spanning few bins: add each bin's offset to its slice (no division).
            cuts = np.searchsorted(tmp, np.arange(k0 + 1, k1 + 1, dtype=np.int64) * dt_us).tolist()
            lo = 0
            for k, hi in zip(range(k0, k1 + 1), [*cuts, n], strict=True):
                if hi > lo:
                    a[lo:hi] += (k if 0 <= k < n_bins else n_bins) * stride
                lo = hi
            np.minimum(a, n_bins * stride, out=a)
            return int(tmp[-1])
    t_max = int(tmp.max())
    tmp //= dt_us
    # A negative k is huge as uint64, so one minimum sends both ends of the window to n_bins.
    np.minimum(tu, n_bins, out=tu)
    tmp *= stride
    a += tmp
    np.minimum(a, n_bins * stride, out=a)
    return t_max


def _empty_out(n_bins: int, shape: tuple[int, int, int], polarity: str) -> np.ndarray:
    dtype = np.int8 if polarity == "signed" else np.uint8
    return np.zeros((n_bins, *shape), dtype=dtype)


def bin_events(
    events: np.ndarray,
    roi: ROI,
    dt_us: int,
    t0: int | None = None,
    n_bins: int | None = None,
    polarity: Polarity = "split",
    mode: Mode = "presence",
    pool: int = 1,
) -> np.ndarray:
    """Bin events into frames ``[T, C, H, W]`` (``uint8``; ``int8`` for ``polarity="signed"``).

    Event ``i`` goes to bin ``k = floor((t_i - t0) / dt_us)`` and cell
    ``(c, (y_i - roi.y) // pool, (x_i - roi.x) // pool)``; events outside the ROI or outside
    ``0 <= k < n_bins`` are ignored, as are polarities other than 0 and 1. The events need not
    be sorted and are never modified.

    Args:
        events: structured array with fields ``t``, ``x``, ``y``, ``p`` (``EVENT_DTYPE``).
        roi: the sensor rectangle to keep.
        dt_us: bin width in microseconds.
        t0: start of bin 0; ``None`` = the first event's ``t`` (``events["t"][0]``, the earliest
            one for sorted events), 0 when there are none.
        n_bins: number of bins; ``None`` = enough to cover the latest event,
            ``(max(t) - t0) // dt + 1`` (0 without events or when all precede ``t0``).
        polarity: ``"split"`` (C=2: off, on), ``"merge"`` (C=1) or ``"signed"`` (C=1, on - off).
        mode: ``"presence"`` (0/1) or ``"count"`` (saturated at 255).
        pool: integer pooling factor of the ROI.
    """
    roi = ROI(*(int(v) for v in roi))
    dt_us = int(dt_us)
    _check(roi, dt_us, polarity, mode, int(pool))
    pool = int(pool)
    if events.dtype.names is None or not {"t", "x", "y", "p"} <= set(events.dtype.names):
        raise ValueError(f"events need fields t, x, y, p; got dtype {events.dtype}")
    n = len(events)
    if t0 is None:
        t0 = int(events["t"][0]) if n else 0
    t0 = int(t0)
    if n_bins is not None:
        n_bins = int(n_bins)
        if n_bins < 0:
            raise ValueError(f"n_bins must be >= 0, not {n_bins}")
    shape = (1 if polarity == "merge" else 2, roi.height // pool, roi.width // pool)
    if n == 0 or n_bins == 0:
        out = _empty_out(n_bins or 0, shape, polarity)
        return out[:, :1] if polarity == "signed" else out
    frames = _bin_split_or_merge(events, roi, dt_us, t0, n_bins, polarity, mode, pool, shape)
    if polarity == "signed":
        return _signed(frames)
    return frames


def _signed(split: np.ndarray) -> np.ndarray:
    """``[T, 2, H, W]`` uint8 (off, on) -> ``[T, 1, H, W]`` int8 ``clip(on - off, -128, 127)``."""
    k = kernel(signed_frames, split.size // 4)
    if k is not None and split.flags.c_contiguous:
        t_n, _, h, w = split.shape
        out = np.empty((t_n, 1, h, w), dtype=np.int8)
        k(split.reshape(t_n, 2, h * w), out.reshape(t_n, h * w))
        return out
    d = split[:, 1:2].astype(np.int16) - split[:, 0:1]
    np.clip(d, -128, 127, out=d)
    return cast(np.ndarray, d.astype(np.int8))


def _accumulate(
    flat: np.ndarray,
    events: np.ndarray,
    maps: tuple[np.ndarray, ...],
    stride: int,
    dt_us: int,
    t0: int,
    n_bins: int,
    mode: str,
    fresh: bool = False,
    size: int | None = None,
) -> int:
    """Add ``events`` into ``flat`` (``n_bins * stride + 1`` uint8 cells, the last one trash):
    presence ORs, counts add with saturation at 255. ``fresh``: ``flat`` is all zeros. ``size``:
    the compiled loop is used from this many events (None: always, when numba is usable).
    Returns ``max(t) - t0`` (-1 without events)."""
    n = len(events)
    t_max = -1
    if n == 0:
        return t_max
    k = kernel(accumulate_events, size)
    if k is not None and all(events.dtype[f].kind in "iub" for f in ("t", "x", "y", "p")):
        xmap, ymap, cbase = maps
        return int(
            k(
                flat,
                events["t"],
                events["x"],
                events["y"],
                events["p"],
                xmap,
                ymap,
                cbase,
                t0,
                dt_us,
                n_bins,
                stride,
                mode == "count",
            )
        )
    m = min(n, _CHUNK)
    tmp, tmp2, flags = np.empty(m, dtype=np.int64), np.empty(m, dtype=np.int64), np.empty(m, dtype=bool)
    if mode == "presence":
        idx = np.empty(m, dtype=np.intp)
        # Fused per chunk: indices are assigned while they are still in cache.
        for s in range(0, n, _CHUNK):
            chunk = events[s : s + _CHUNK]
            t_max = max(t_max, _fill_index(chunk, maps, stride, dt_us, t0, n_bins, idx, tmp, tmp2, flags))
            flat[idx[: len(chunk)]] = 1
        return t_max
    cells = len(flat)
    if fresh and cells <= _BINCOUNT_CELLS and cells <= 8 * n:
        # Dense enough: one bincount over every cell.
        idx = np.empty(n, dtype=np.intp)
        for s in range(0, n, _CHUNK):
            t_max = max(
                t_max,
                _fill_index(
                    events[s : s + _CHUNK], maps, stride, dt_us, t0, n_bins, idx[s:], tmp, tmp2, flags
                ),
            )
        counts = np.bincount(idx, minlength=cells)
        np.minimum(counts, 255, out=counts)
        flat[:] = counts
        return t_max
    # Sparse: per chunk, a bincount over the range of cells the chunk touches (a few bins for
    # time-sorted events), added with saturation.
    idx = np.empty(m, dtype=np.intp)
    for s in range(0, n, _CHUNK):
        chunk = events[s : s + _CHUNK]
        a = idx[: len(chunk)]
        t_max = max(t_max, _fill_index(chunk, maps, stride, dt_us, t0, n_bins, a, tmp, tmp2, flags))
        a = a[a < cells - 1]  # the trash cell would stretch the range to the end
        if len(a) == 0:
            continue
        lo, hi = int(a.min()), int(a.max()) + 1
        if hi - lo > 8 * len(a):
            # Scattered (unsorted) chunk: sort its cells instead of counting over the range.
            u, c = np.unique(a, return_counts=True)
            c += flat[u]
            np.minimum(c, 255, out=c)
            flat[u] = c
            continue
        a -= lo
        c = np.bincount(a, minlength=hi - lo)
        c += flat[lo:hi]
        np.minimum(c, 255, out=c)
        flat[lo:hi] = c
    return t_max


def _bin_split_or_merge(
    events: np.ndarray,
    roi: ROI,
    dt_us: int,
    t0: int,
    n_bins: int | None,
    polarity: str,
    mode: str,
    pool: int,
    shape: tuple[int, int, int],
) -> np.ndarray:
    """``n_bins=None``: enough bins for the latest event. It is guessed from the last event (the
    latest for sorted events, which saves a pass over ``t``) and redone if an event was later."""
    maps = _maps(roi, "merge" if polarity == "merge" else "split", pool)
    stride = shape[0] * shape[1] * shape[2]
    guess = n_bins is None
    if n_bins is None:
        n_bins = max((int(events["t"][-1]) - t0) // dt_us + 1, 1)
    flat = np.zeros(n_bins * stride + 1, dtype=np.uint8)  # + the trash cell
    t_max = _accumulate(flat, events, maps, stride, dt_us, t0, n_bins, mode, fresh=True, size=len(events))
    if guess and t_max // dt_us + 1 != n_bins:
        return _bin_split_or_merge(
            events, roi, dt_us, t0, max(t_max // dt_us + 1, 0), polarity, mode, pool, shape
        )
    return flat[:-1].reshape(n_bins, *shape)  # drop the trash cell (a view, no copy)


def count_bins(t: np.ndarray, dt_us: int, max_gap_us: int | None) -> int:
    """The bins a :class:`Binner` (``t0`` = the first event) steps for events at times ``t``,
    without binning them: each run of events with no silence longer than ``max_gap_us`` steps
    every bin from its first to its last event (empty ones included); longer silences are not
    stepped. Exact for sorted times; an upper bound otherwise (late events only lower it)."""
    n = len(t)
    if n == 0:
        return 0
    t = np.asarray(t, dtype=np.int64)
    k = (t - int(t[0])) // int(dt_us)
    if max_gap_us is None:
        return int(k.max()) + 1
    first = np.concatenate(([0], np.flatnonzero(np.diff(t) > int(max_gap_us)) + 1))
    run_max = np.maximum.reduceat(k, first)  # the max also covers unsorted runs
    return int(np.sum(run_max - k[first] + 1))


# ---------------------------------------------------------------------------- streaming
# Binner state slots (int64): t0, t0 known, open bin index, open bin has events, latest kept t,
# reset pending, late events, gaps; constants: dt, max gap (-1: none), count mode, stride, x/y
# table lengths - 1, offsets of ymap and cbase in the concatenated tables.
(
    _T0,
    _HAVE_T0,
    _K,
    _OPEN,
    _TMAX,
    _RESET,
    _LATE,
    _GAPS,
    _DT,
    _MAXGAP,
    _COUNT,
    _STRIDE,
    _NX,
    _NY,
    _YOFF,
    _COFF,
) = range(16)
#: bytes of one packed event record (EVENT_DTYPE: t int64, x uint16, y uint16, p uint8)
RECORD_BYTES = EVENT_DTYPE.itemsize
#: bytes of completed frames one compiled call may write before Python takes them
_OUT_BYTES = 1 << 20
_NO_LIMIT = 1 << 62


@register
def stream_bins(
    buf: np.ndarray,
    st: np.ndarray,
    acc: np.ndarray,
    tab: np.ndarray,
    out: np.ndarray,
    outk: np.ndarray,
    base: int,
    n: int,
    start: int,
    check: bool,
    budget: int,
) -> Any:
    """The streaming binner's loop (compiled by numba): packed records ``buf[base + 13*i ...]``
    (``EVENT_DTYPE`` bytes) for ``i = start .. n-1``, in arrival order, into the open frame
    ``acc`` (``stride`` cells + a trash cell), with the whole binner state in ``st``.

    Completed bins go to ``outk`` (row 0: first bin index, row 1: reset, row 2: 0 for a frame,
    which is copied into ``out[j]``, else the length of a run of bins without events, which is
    never materialized; row 3: the end time of the (first) bin), at most ``outk.shape[1]``
    entries per call. Returns ``(entries, next
    event, status)``: status 0, -1 (``check`` and a polarity other than 0/1: nothing done) or
    -2 (completing the next bins would pass ``budget`` bins in this call; stopped before).
    The state is consistent at every return, so a call resumes where the previous one stopped."""
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
                return 0, 0, -1
    n_out = 0
    used = np.int64(0)
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
            st[6] += 1  # late: its bin was emitted
            i += 1
            continue
        gap = max_gap >= 0 and ti - st[4] > max_gap
        if (gap or k > st[2]) and st[3] == 1:  # the open bin is complete
            if n_out >= cap:
                return n_out, i, 0
            if used + 1 > budget:
                return n_out, i, -2
            for c in range(stride):
                out[n_out, c] = acc[c]
                acc[c] = 0
            acc[stride] = 0
            outk[0, n_out] = st[2]
            outk[1, n_out] = st[5]
            outk[2, n_out] = 0
            outk[3, n_out] = st[0] + (st[2] + 1) * dt
            n_out += 1
            used += 1
            st[3] = 0
            st[5] = 0
            st[2] += 1
        if gap:  # the empty bins up to this one are not stepped; reset before the next bin
            st[7] += 1
            st[2] = k
            st[5] = 1
        elif k > st[2]:  # bins without events up to this one: one run
            if n_out >= cap:
                return n_out, i, 0
            if used + (k - st[2]) > budget:
                return n_out, i, -2
            outk[0, n_out] = st[2]
            outk[1, n_out] = st[5]
            outk[2, n_out] = k - st[2]
            outk[3, n_out] = st[0] + (st[2] + 1) * dt
            n_out += 1
            used += k - st[2]
            st[5] = 0
            st[2] = k
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
    return n_out, i, 0


class BinSegment(NamedTuple):
    """Consecutive completed bins: ``frames [k, C, H, W]`` ending at ``bin_end_us [k]`` (int64,
    exclusive ends), or, when ``empty > 0``, a run of ``empty`` bins without events (never
    materialized: ``frames`` has no rows and ``bin_end_us`` holds the end of the run's first bin;
    bin ``j`` of the run ends at ``bin_end_us[0] + j * dt``). ``reset``: a gap longer than
    ``max_gap_us`` came before the segment's first bin (the consumer resets its state)."""

    frames: np.ndarray
    bin_end_us: np.ndarray
    reset: bool
    empty: int = 0

    @property
    def n_bins(self) -> int:
        return self.empty or len(self.frames)


def expand_segments(segments: list[BinSegment], dt_us: int) -> list[BinSegment]:
    """The same bins with every run of empty bins materialized as zero frames (for consumers
    that want every frame, e.g. tests; a stream must not: a run can be millions of bins)."""
    out = []
    for seg in segments:
        if seg.empty:
            shape = (seg.empty, *seg.frames.shape[1:])
            ends = int(seg.bin_end_us[0]) + np.arange(seg.empty, dtype=np.int64) * dt_us
            seg = BinSegment(np.zeros(shape, dtype=seg.frames.dtype), ends, seg.reset)
        out.append(seg)
    return out


class Binner:
    """Streaming :func:`bin_events`: push chunks of events, get completed bins.

    The stream clock is event time (DESIGN.md "Time"). Bin ``k`` is complete when an event at
    or after its end arrives, or on :meth:`flush`. Bins without events between two events are
    emitted as runs (:class:`BinSegment` with ``empty > 0``: time passes for the neurons, but
    no frame is allocated for them). Rules, each independent of how the stream is chunked:

    * ``t0=None`` aligns bin 0 to the ``t`` of the first event pushed (no rounding to a
      multiple of ``dt``), the same as ``bin_events(..., t0=None)`` on the whole recording.
    * An event in a bin that was already emitted (before the open bin) is late: dropped and
      counted in ``late_events``. Within the open bin order does not matter.
    * An event more than ``max_gap_us`` after the latest kept event is a gap: the open bin is
      emitted, the empty bins in between are *not*, ``gaps`` is incremented, and the next
      segment (starting at the bin of the post-gap event, on the same ``t0 + k*dt`` grid) has
      ``reset=True``. ``max_gap_us=None`` disables this (every empty bin is stepped).
    * ``push(..., max_bins=N)`` raises :class:`~events.EventLimitError` before completing more
      than ``N`` bins (runs of empty bins count with their length); the binner is then spent.

    Without gaps and late events, the concatenated frames of ``push`` * n + ``flush``
    (:func:`expand_segments`) equal ``bin_events(all_events, roi, dt, t0, None, ...)``.

    With numba (``VDIB_NUMBA`` not ``0``) every push is one compiled loop over the events'
    bytes (:func:`stream_bins`, ~3 us for a 10 ms packet of a live stream); without it a numpy
    path gives the same segments. :meth:`push_packed` bins packed ``EVENT_DTYPE`` records
    straight from a message's bytes.
    """

    def __init__(self, spec: BinSpec, t0: int | None = None, max_gap_us: int | None = 1_000_000):
        if max_gap_us is not None and int(max_gap_us) < spec.dt_us:
            raise ValueError(f"max_gap_us ({max_gap_us}) must be at least dt_us ({spec.dt_us})")
        self.spec = spec
        self.max_gap_us = None if max_gap_us is None else int(max_gap_us)
        self._pol = "split" if spec.polarity == "signed" else spec.polarity
        self._inner_shape = (1 if self._pol == "merge" else 2, *spec.shape[1:])
        self._stride = int(np.prod(self._inner_shape))
        self._dt = int(spec.dt_us)
        self._maps = _maps(spec.roi, self._pol, spec.pool)
        xmap, ymap, cbase = self._maps
        self._tab = np.concatenate([xmap, ymap, cbase])
        st = self._st = np.zeros(16, dtype=np.int64)
        st[_DT] = self._dt
        st[_MAXGAP] = -1 if max_gap_us is None else int(max_gap_us)
        st[_COUNT] = spec.mode == "count"
        st[_STRIDE] = self._stride
        st[_NX], st[_NY] = len(xmap) - 1, len(ymap) - 1
        st[_YOFF], st[_COFF] = len(xmap), len(xmap) + len(ymap)
        if t0 is not None:
            st[_T0] = st[_TMAX] = int(t0)
            st[_HAVE_T0] = 1
        self._acc = np.zeros(self._stride + 1, dtype=np.uint8)  # the open bin + a trash cell
        self._kernel = kernel(stream_bins) if _jit.enabled() else None
        cap = max(1, min(64, _OUT_BYTES // self._stride))
        self._out = np.zeros((cap, self._stride), dtype=np.uint8)
        self._outk = np.zeros((4, cap), dtype=np.int64)
        self._out_flat = self._out.reshape(-1)
        self._shapes = [(m, *self._inner_shape) for m in range(cap + 1)]
        self._is_signed = spec.polarity == "signed"
        self._no_frames = np.zeros((0, *spec.shape), dtype=spec.dtype)
        self.bins_emitted = 0
        self.events_in = 0

    # -- counters and state ------------------------------------------------------------------
    @property
    def t0(self) -> int | None:
        return int(self._st[_T0]) if self._st[_HAVE_T0] else None

    @property
    def late_events(self) -> int:
        return int(self._st[_LATE])

    @property
    def gaps(self) -> int:
        return int(self._st[_GAPS])

    # -- emitting ----------------------------------------------------------------------------
    def _frames(self, out: list[BinSegment], flat: np.ndarray, k_first: int, n: int, reset: bool) -> None:
        """Emit ``n`` frames (the first ``n * stride`` cells of ``flat``, copied) as bins ``k_first...``."""
        frames = flat[: n * self._stride].reshape(
            self._shapes[n] if n < len(self._shapes) else (n, *self._inner_shape)
        )
        frames = _signed(frames) if self._is_signed else frames.copy()
        t0, dt = int(self._st[_T0]), self._dt
        # bin ends from Python ints: a few numpy calls would cost more than the whole bin
        ends = np.array([t0 + (k + 1) * dt for k in range(k_first, k_first + n)], dtype=np.int64)
        out.append(BinSegment(frames, ends, reset))
        self.bins_emitted += n

    def _run(self, out: list[BinSegment], k_first: int, n: int, reset: bool) -> None:
        end = int(self._st[_T0]) + (k_first + 1) * self._dt
        out.append(BinSegment(self._no_frames, np.array([end], dtype=np.int64), reset, n))
        self.bins_emitted += n

    def _take(self, out: list[BinSegment], m: int) -> int:
        """Turn the compiled loop's ``m`` entries into segments; the number of bins."""
        ks, resets, runs = self._outk[:3, :m].tolist()
        bins = 0
        j = 0
        while j < m:
            if runs[j]:
                self._run(out, ks[j], runs[j], resets[j] != 0)
                bins += runs[j]
                j += 1
                continue
            j2 = j + 1
            while j2 < m and not runs[j2] and not resets[j2]:
                j2 += 1
            self._frames(out, self._out_flat[j * self._stride :], ks[j], j2 - j, resets[j] != 0)
            bins += j2 - j
            j = j2
        return bins

    # -- public ------------------------------------------------------------------------------
    def push(self, events: np.ndarray, *, max_bins: int | None = None) -> list[BinSegment]:
        """Add a chunk of events (any length, ideally sorted); return the bins it completed.
        ``max_bins``: raise :class:`~events.EventLimitError` instead of completing more bins."""
        n = len(events)
        if n == 0:
            return []
        if self._kernel is None:
            return self._push_numpy(events, max_bins)
        if events.dtype == EVENT_DTYPE and events.flags.c_contiguous:
            rec = events
        else:
            rec = np.empty(n, dtype=EVENT_DTYPE)
            rec["t"] = events["t"]
            for f in ("x", "y"):  # negative or huge coordinates: outside every ROI
                v = np.asarray(events[f])
                rec[f] = np.where((v < 0) | (v > 65535), 65535, v)
            p = np.asarray(events["p"])
            rec["p"] = np.where((p == 0) | (p == 1), p, 2)
        return self.push_packed(rec.view(np.uint8), 0, n, check=False, max_bins=max_bins)

    def push_packed(
        self, buf: np.ndarray, offset: int, n: int, *, check: bool = True, max_bins: int | None = None
    ) -> list[BinSegment]:
        """Bin ``n`` packed ``EVENT_DTYPE`` records (13 bytes each) starting at byte ``offset`` of
        the uint8 array ``buf`` (e.g. a websocket message) without copying them. ``check``: raise
        :class:`~events.EventFormatError` (and bin nothing) when a polarity is not 0 or 1.
        ``max_bins`` as in :meth:`push`."""
        if n <= 0:
            return []
        if offset < 0 or offset + n * RECORD_BYTES > len(buf):
            raise EventFormatError(f"{n} records of {RECORD_BYTES} bytes do not fit after byte {offset}")
        if self._kernel is None:
            ev = np.frombuffer(buf, dtype=EVENT_DTYPE, count=n, offset=offset)
            if check and n and int(ev["p"].max()) > 1:
                raise EventFormatError("event polarity must be 0 or 1")
            return self._push_numpy(ev, max_bins)
        out: list[BinSegment] = []
        budget = _NO_LIMIT if max_bins is None else int(max_bins)
        used = 0
        i = 0
        self.events_in += n
        while i < n:
            m, i, status = self._kernel(
                buf, self._st, self._acc, self._tab, self._out, self._outk, offset, n, i, check, budget - used
            )
            if status == -1:
                self.events_in -= n
                raise EventFormatError("event polarity must be 0 or 1")
            if m == 1 and self._outk[2, 0] == 0 and not self._is_signed:
                # the common case of a live stream: one complete bin (what _take does, inlined)
                out.append(
                    BinSegment(
                        self._out[:1].reshape(self._shapes[1]).copy(),
                        self._outk[3, :1].copy(),
                        self._outk[1, 0] != 0,
                    )
                )
                self.bins_emitted += 1
                used += 1
            elif m:
                used += self._take(out, m)
            if status == -2:
                raise EventLimitError(f"the events complete more than max_bins={max_bins} bins")
        return out

    def flush(self) -> list[BinSegment]:
        """Emit the open bin as complete (a later event in it will be late)."""
        out: list[BinSegment] = []
        st = self._st
        if st[_OPEN]:
            self._frames(out, self._acc, int(st[_K]), 1, bool(st[_RESET]))
            self._acc[:] = 0
            st[_OPEN] = 0
            st[_RESET] = 0
            st[_K] += 1
        return out

    # -- numpy path (no numba): the same rules, vectorised per push -------------------------
    def _push_numpy(self, events: np.ndarray, max_bins: int | None) -> list[BinSegment]:
        out: list[BinSegment] = []
        st = self._st
        n = len(events)
        self.events_in += n
        dt = self._dt
        t = np.asarray(events["t"], dtype=np.int64)
        if not st[_HAVE_T0]:
            st[_T0] = st[_TMAX] = int(t[0])
            st[_HAVE_T0] = 1
        k = t - int(st[_T0])
        k //= dt
        # An event is late if its bin is before the open bin: the open bin is the bin of the
        # latest event so far, and never before st[_K] (bins already emitted). Kept events
        # therefore come in non-decreasing bin order.
        before = np.empty(n, dtype=np.int64)
        before[0] = st[_K]
        if n > 1:
            np.maximum.accumulate(k[:-1], out=before[1:])
            np.maximum(before[1:], st[_K], out=before[1:])
        keep = k >= before
        n_late = n - int(np.count_nonzero(keep))
        if n_late:
            st[_LATE] += n_late
            events, t, k = events[keep], t[keep], k[keep]
            if len(events) == 0:
                return out
        # Gaps: more than max_gap_us after the latest kept event (running max, so that events
        # out of order inside the open bin do not fake a gap).
        cuts: list[int] = []
        if self.max_gap_us is not None:
            prev = np.empty(len(t), dtype=np.int64)
            prev[0] = st[_TMAX]
            if len(t) > 1:
                np.maximum.accumulate(t[:-1], out=prev[1:])
                np.maximum(prev[1:], prev[0], out=prev[1:])
            cuts = np.flatnonzero(t - prev > self.max_gap_us).tolist()
        st[_TMAX] = max(int(t.max()), int(st[_TMAX]))
        budget = _NO_LIMIT if max_bins is None else int(max_bins)
        bounds = [0, *cuts, len(events)]
        for i in range(len(bounds) - 1):
            a, b = bounds[i], bounds[i + 1]
            if a == b:
                continue
            if i > 0:
                # A gap precedes events[a]: close the open bin, skip the empty ones.
                st[_GAPS] += 1
                if st[_OPEN]:
                    budget -= 1
                    if budget < 0:
                        raise EventLimitError(f"the events complete more than max_bins={max_bins} bins")
                    out += self.flush()
                st[_K] = int(k[a])
                st[_RESET] = 1
            budget = self._advance_numpy(out, events[a:b], k[a:b], budget, max_bins)
        return out

    def _advance_numpy(
        self, out: list[BinSegment], ev: np.ndarray, k: np.ndarray, budget: int, max_bins: int | None
    ) -> int:
        """Bin ``ev`` (bins ``k``, non-decreasing, none before the open bin); emit the bins before
        the last one; frames only for bins with events (distinct bins are binned compactly)."""
        st = self._st
        k_open, stride = int(st[_K]), self._stride
        change = np.flatnonzero(k[1:] != k[:-1]) + 1
        uk = k[np.concatenate(([0], change))].tolist()  # distinct bins, ascending
        completed = uk[-1] - k_open
        if completed > budget:
            raise EventLimitError(f"the events complete more than max_bins={max_bins} bins")
        compact = np.zeros(len(k), dtype=np.int64)  # index of each event's bin among uk
        compact[change] = 1
        np.cumsum(compact, out=compact)
        ev2 = np.empty(
            len(ev), dtype=[("t", "<i8"), ("x", ev.dtype["x"]), ("y", ev.dtype["y"]), ("p", ev.dtype["p"])]
        )
        ev2["t"] = compact * self._dt
        for f in ("x", "y", "p"):
            ev2[f] = ev[f]
        flat = np.zeros(len(uk) * stride + 1, dtype=np.uint8)
        was_open = bool(st[_OPEN])
        if was_open and uk[0] == k_open:
            flat[:stride] = self._acc[:stride]  # the open bin's partial frame
        _accumulate(flat, ev2, self._maps, stride, self._dt, 0, len(uk), self.spec.mode, size=len(ev2))
        if was_open and uk[0] != k_open:
            out += self.flush()  # the open bin is complete
        k_next = int(st[_K])
        j = 0
        while j < len(uk) - 1:  # every distinct bin but the last is complete
            if uk[j] > k_next:
                self._run(out, k_next, uk[j] - k_next, bool(st[_RESET]))
                st[_RESET] = 0
            j2 = j + 1
            while j2 < len(uk) - 1 and uk[j2] == uk[j2 - 1] + 1:
                j2 += 1
            self._frames(out, flat[j * stride :], uk[j], j2 - j, bool(st[_RESET]))
            st[_RESET] = 0
            k_next = uk[j2 - 1] + 1
            j = j2
        if uk[-1] > k_next:
            self._run(out, k_next, uk[-1] - k_next, bool(st[_RESET]))
            st[_RESET] = 0
        self._acc[:stride] = flat[(len(uk) - 1) * stride : len(uk) * stride]
        self._acc[stride] = 0
        st[_OPEN] = 1
        st[_K] = uk[-1]
        return int(budget - completed)
