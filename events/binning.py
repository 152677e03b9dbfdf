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

import functools
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

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
# Table entry for "outside the ROI": beyond any frame offset, clamped onto the trash cell.
_OUTSIDE = 1 << 62


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
        return bin_events(
            events, self.roi, self.dt_us, t0, n_bins, self.polarity, self.mode, self.pool
        )


#: The VDIB authors' MNIST-DVS preprocessing (../shared/VDIB-REFERENCE.md): they read jAER
#: DVS128 addresses as ``x_a = 127 - x_raw`` and ``y_a = y_raw`` (y up) and keep
#: ``48 <= x_a, y_a <= 73``. Our readers give ``x = 127 - x_raw`` (the same mirrored x, the
#: image jAER shows) and ``y = 127 - y_raw`` (top-left origin), so the same 26 x 26 pixels are
#: ``48 <= x <= 73`` and ``54 <= y <= 79``: ROI(48, 54, 26, 26). 10 ms bins, split polarity,
#: presence. The scale-4 digit spans x 48..74, y 54..75 (5th-95th percentile of the events of
#: the real recording mnist_0_scale04_0001), so the crop is centred on it.
MNIST_DVS = BinSpec(ROI(48, 54, 26, 26), 10_000, "split", "presence", 1)


@functools.lru_cache(maxsize=32)
def _lut(roi: ROI, polarity: str, pool: int) -> tuple[np.ndarray, int, int, int]:
    """Table ``(p, y, x) -> cell`` for one frame, plus the frame size and its (y, x) extents.

    The table covers ``x < roi.x + roi.width + 1`` and ``y < roi.y + roi.height + 1``; larger
    coordinates are clipped onto the last (outside) column/row. Cells are numbered
    ``c*H*W + (y' * W + x')``; outside the ROI the table holds ``_OUTSIDE``, which stays past
    every frame after the bin offset is added and is then clamped onto the trash cell.
    """
    c_n = 1 if polarity == "merge" else 2
    h, w = roi.height // pool, roi.width // pool
    hl, wl = roi.y + roi.height + 1, roi.x + roi.width + 1
    frame = c_n * h * w
    lut3 = np.full((2, hl, wl), _OUTSIDE, dtype=np.intp)
    yy = np.arange(h * pool) // pool
    xx = np.arange(w * pool) // pool
    cell = yy[:, None] * w + xx[None, :]
    for p in (0, 1):
        c = 0 if polarity == "merge" else p
        lut3[p, roi.y : roi.y + h * pool, roi.x : roi.x + w * pool] = c * h * w + cell
    lut = lut3.reshape(-1)
    lut.flags.writeable = False  # cached and shared
    return lut, frame, hl, wl


# Table entry for "outside the ROI" in the compiled loop: three of them plus a frame offset stay
# below 2**63, and any sum holding one is past the trash cell (clamped onto it).
_FAR = 1 << 60


@functools.lru_cache(maxsize=32)
def _maps(roi: ROI, polarity: str, pool: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-axis tables for the compiled loop: ``xmap[x]`` = output column, ``ymap[y]`` = output
    row times W, ``cbase[p]`` = channel offset, each ending with one ``_FAR`` entry that every
    coordinate outside the ROI is sent to; the cell of an event is ``cbase[p] + ymap[y] +
    xmap[x]`` (tiny tables, always in L1)."""
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
    flat: np.ndarray, t: np.ndarray, x: np.ndarray, y: np.ndarray, p: np.ndarray, xmap: np.ndarray,
    ymap: np.ndarray, cbase: np.ndarray, t0: int, dt: int, n_bins: int, stride: int, count: bool,
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
    events: np.ndarray, lut: np.ndarray, hl: int, wl: int, stride: int, dt_us: int, t0: int,
    n_bins: int, out: np.ndarray, tmp: np.ndarray, flags: np.ndarray,
) -> int:
    """Write the flat cell index of every event into ``out`` (``intp``, same length).

    Frames are ``stride = C*H*W`` cells apart; events outside the ROI or outside
    ``[t0, t0 + n_bins*dt)`` get the trash cell ``n_bins * stride`` (one past the frames).
    ``events`` is at most one chunk long; ``tmp`` (int64) and ``flags`` (bool) are scratch
    buffers at least as long. Returns ``max(t) - t0`` over the chunk.
    """
    n = len(events)
    a, tmp, flags = out[:n], tmp[:n], flags[: max(n - 1, 0)]
    # Cell within the frame: lut[(p * hl + min(y, hl-1)) * wl + min(x, wl-1)]. Copying each
    # strided field into a contiguous buffer first is faster than mixed-type ufuncs on it; a
    # p > 1 lands past the table and take(mode="clip") gives the last entry, _OUTSIDE.
    # Minimums on the uint64 view also send negative coordinates (signed input dtypes) out.
    tu = tmp.view(np.uint64)
    np.copyto(a, events["p"], casting="unsafe")
    if events.dtype["p"].kind == "i":
        au = a.view(np.uint64)
        np.minimum(au, 2, out=au)
    a *= hl
    np.copyto(tmp, events["y"], casting="unsafe")
    np.minimum(tu, hl - 1, out=tu)
    a += tmp
    a *= wl
    np.copyto(tmp, events["x"], casting="unsafe")
    np.minimum(tu, wl - 1, out=tu)
    a += tmp
    lut.take(a, out=a, mode="clip")
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
    return d.astype(np.int8)


def _accumulate(
    flat: np.ndarray, events: np.ndarray, lut: np.ndarray, hl: int, wl: int, stride: int,
    dt_us: int, t0: int, n_bins: int, mode: str, fresh: bool = False,
    maps: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, size: int | None = None,
) -> int:
    """Add ``events`` into ``flat`` (``n_bins * stride + 1`` uint8 cells, the last one trash):
    presence ORs, counts add with saturation at 255. ``fresh``: ``flat`` is all zeros.
    Returns ``max(t) - t0`` (-1 without events)."""
    n = len(events)
    t_max = -1
    if n == 0:
        return t_max
    k = kernel(accumulate_events, size) if maps is not None else None
    if k is not None and all(events.dtype[f].kind in "iub" for f in ("t", "x", "y", "p")):
        xmap, ymap, cbase = maps  # type: ignore[misc]
        return int(k(flat, events["t"], events["x"], events["y"], events["p"], xmap, ymap, cbase, t0, dt_us, n_bins,
                     stride, mode == "count"))
    m = min(n, _CHUNK)
    tmp, flags = np.empty(m, dtype=np.int64), np.empty(m, dtype=bool)
    if mode == "presence":
        idx = np.empty(m, dtype=np.intp)
        # Fused per chunk: indices are assigned while they are still in cache.
        for s in range(0, n, _CHUNK):
            chunk = events[s : s + _CHUNK]
            t_max = max(t_max, _fill_index(chunk, lut, hl, wl, stride, dt_us, t0, n_bins, idx, tmp, flags))
            flat[idx[: len(chunk)]] = 1
        return t_max
    cells = len(flat)
    if fresh and cells <= _BINCOUNT_CELLS and cells <= 8 * n:
        # Dense enough: one bincount over every cell.
        idx = np.empty(n, dtype=np.intp)
        for s in range(0, n, _CHUNK):
            t_max = max(
                t_max, _fill_index(events[s : s + _CHUNK], lut, hl, wl, stride, dt_us, t0, n_bins, idx[s:], tmp, flags)
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
        t_max = max(t_max, _fill_index(chunk, lut, hl, wl, stride, dt_us, t0, n_bins, a, tmp, flags))
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
    events: np.ndarray, roi: ROI, dt_us: int, t0: int, n_bins: int | None, polarity: str, mode: str,
    pool: int, shape: tuple[int, int, int],
) -> np.ndarray:
    """``n_bins=None``: enough bins for the latest event. It is guessed from the last event (the
    latest for sorted events, which saves a pass over ``t``) and redone if an event was later."""
    lut, stride, hl, wl = _lut(roi, "merge" if polarity == "merge" else "split", pool)
    guess = n_bins is None
    if n_bins is None:
        n_bins = max((int(events["t"][-1]) - t0) // dt_us + 1, 1)
    flat = np.zeros(n_bins * stride + 1, dtype=np.uint8)  # + the trash cell
    maps = _maps(roi, "merge" if polarity == "merge" else "split", pool)
    t_max = _accumulate(flat, events, lut, hl, wl, stride, dt_us, t0, n_bins, mode, fresh=True, maps=maps,
                        size=len(events))
    if guess and t_max // dt_us + 1 != n_bins:
        return _bin_split_or_merge(events, roi, dt_us, t0, max(t_max // dt_us + 1, 0), polarity, mode, pool, shape)
    return flat[:-1].reshape(n_bins, *shape)  # drop the trash cell (a view, no copy)


class BinSegment(NamedTuple):
    """Consecutive completed bins. ``reset`` = a gap longer than ``max_gap_us`` came before."""

    frames: np.ndarray  # [k, C, H, W]
    bin_end_us: np.ndarray  # int64 [k], exclusive end time of each bin
    reset: bool


class Binner:
    """Streaming :func:`bin_events`: push chunks of events, get completed bins.

    The stream clock is event time (DESIGN.md "Time"). Bin ``k`` is complete when an event at
    or after its end arrives, or on :meth:`flush`. Bins without events between two events are
    emitted (time passes for the neurons). Rules, each independent of how the stream is
    chunked:

    * ``t0=None`` aligns bin 0 to the ``t`` of the first event pushed (no rounding to a
      multiple of ``dt``), the same as ``bin_events(..., t0=None)`` on the whole recording.
    * An event in a bin that was already emitted (before the open bin) is late: dropped and
      counted in ``late_events``. Within the open bin order does not matter.
    * An event more than ``max_gap_us`` after the latest kept event is a gap: the open bin is
      emitted, the empty bins in between are *not*, ``gaps`` is incremented, and the next
      segment (starting at the bin of the post-gap event, on the same ``t0 + k*dt`` grid) has
      ``reset=True``. ``max_gap_us=None`` disables this (every empty bin is stepped).

    Without gaps and late events, the concatenated frames of ``push`` * n + ``flush`` equal
    ``bin_events(all_events, roi, dt, t0, None, ...)``.
    """

    def __init__(self, spec: BinSpec, t0: int | None = None, max_gap_us: int | None = 1_000_000):
        if max_gap_us is not None and int(max_gap_us) < spec.dt_us:
            raise ValueError(f"max_gap_us ({max_gap_us}) must be at least dt_us ({spec.dt_us})")
        self.spec = spec
        self.max_gap_us = None if max_gap_us is None else int(max_gap_us)
        self.t0: int | None = None if t0 is None else int(t0)
        self._pol = "split" if spec.polarity == "signed" else spec.polarity
        self._inner_shape = (1 if self._pol == "merge" else 2, *spec.shape[1:])
        self._table, self._stride, self._hl, self._wl = _lut(spec.roi, self._pol, spec.pool)
        self._maps = _maps(spec.roi, self._pol, spec.pool)
        # All bins < _k_next have been emitted. _acc is the partial frame of bin _k_next when
        # that bin is open (has seen an event), else None.
        self._k_next = 0
        self._acc: np.ndarray | None = None
        self._t_max: int | None = self.t0
        self._reset_pending = False
        self.late_events = 0
        self.gaps = 0
        self.bins_emitted = 0
        self.events_in = 0

    # -- helpers -----------------------------------------------------------------------------
    def _new(self, n: int) -> np.ndarray:
        return np.zeros(n * self._stride + 1, dtype=np.uint8)

    def _bin_into(self, flat: np.ndarray, ev: np.ndarray, k_first: int, n: int) -> None:
        t0 = self.t0 if self.t0 is not None else 0  # set by the first push
        _accumulate(
            flat, ev, self._table, self._hl, self._wl, self._stride, self.spec.dt_us,
            t0 + k_first * self.spec.dt_us, n, self.spec.mode, maps=self._maps,
        )

    def _emit(self, out: list[BinSegment], flat: np.ndarray, n: int, k_first: int) -> None:
        """Emit the first ``n`` frames of ``flat`` as bins ``k_first ...``."""
        if n == 0:
            return
        s = self.spec
        frames = flat[: n * self._stride].reshape(n, *self._inner_shape)
        t0 = self.t0 if self.t0 is not None else 0
        ends = t0 + (np.arange(k_first, k_first + n, dtype=np.int64) + 1) * s.dt_us
        if s.polarity == "signed":
            frames = _signed(frames)
        if out and not self._reset_pending:
            prev = out[-1]
            out[-1] = BinSegment(
                np.concatenate([prev.frames, frames]), np.concatenate([prev.bin_end_us, ends]),
                prev.reset,
            )
        else:
            out.append(BinSegment(frames, ends, self._reset_pending))
        self._reset_pending = False
        self.bins_emitted += n

    def _advance(self, out: list[BinSegment], ev: np.ndarray, k_last: int) -> None:
        """Bin ``ev`` (all in bins ``_k_next..k_last``), emit bins before ``k_last``."""
        n = k_last - self._k_next + 1
        if n == 1:
            # The common case for small chunks: everything lands in the open bin.
            if self._acc is None:
                self._acc = self._new(1)
            self._bin_into(self._acc, ev, self._k_next, 1)
            return
        flat = self._new(n)
        if self._acc is not None:
            flat[: self._stride] = self._acc[: self._stride]
        self._bin_into(flat, ev, self._k_next, n)
        self._emit(out, flat, n - 1, self._k_next)
        self._acc = self._new(1)
        self._acc[: self._stride] = flat[(n - 1) * self._stride : n * self._stride]
        self._k_next = k_last

    def _close_open(self, out: list[BinSegment]) -> None:
        if self._acc is not None:
            self._emit(out, self._acc, 1, self._k_next)
            self._k_next += 1
            self._acc = None

    # -- public ------------------------------------------------------------------------------
    def push(self, events: np.ndarray) -> list[BinSegment]:
        """Add a chunk of events (any length, ideally sorted); return the bins it completed."""
        out: list[BinSegment] = []
        n = len(events)
        if n == 0:
            return out
        self.events_in += n
        dt = self.spec.dt_us
        t = np.asarray(events["t"], dtype=np.int64)
        if self.t0 is None:
            self.t0 = int(t[0])
            self._t_max = self.t0
        k = t - self.t0
        k //= dt
        # An event is late if its bin is before the open bin: the open bin is the bin of the
        # latest event so far, and never before _k_next (bins already emitted).
        before = np.empty(n, dtype=np.int64)
        before[0] = self._k_next
        if n > 1:
            np.maximum.accumulate(k[:-1], out=before[1:])
            np.maximum(before[1:], self._k_next, out=before[1:])
        keep = k >= before
        n_late = n - int(np.count_nonzero(keep))
        if n_late:
            self.late_events += n_late
            events, t, k = events[keep], t[keep], k[keep]
            if len(events) == 0:
                return out
        # Gaps: more than max_gap_us after the latest kept event (running max, so that events
        # out of order inside the open bin do not fake a gap).
        cuts: list[int] = []
        if self.max_gap_us is not None:
            prev = np.empty(len(t), dtype=np.int64)
            prev[0] = self._t_max if self._t_max is not None else t[0]
            if len(t) > 1:
                np.maximum.accumulate(t[:-1], out=prev[1:])
                np.maximum(prev[1:], prev[0], out=prev[1:])
            cuts = np.flatnonzero(t - prev > self.max_gap_us).tolist()
        self._t_max = max(int(t.max()), self._t_max if self._t_max is not None else int(t[0]))
        bounds = [0, *cuts, len(events)]
        for i in range(len(bounds) - 1):
            a, b = bounds[i], bounds[i + 1]
            if a == b:
                continue
            if i > 0:
                # A gap precedes events[a]: close the open bin, skip the empty ones.
                self.gaps += 1
                self._close_open(out)
                self._k_next = int(k[a])
                self._reset_pending = True
            self._advance(out, events[a:b], int(k[b - 1]))
        return out

    def flush(self) -> list[BinSegment]:
        """Emit the open bin as complete (a later event in it will be late)."""
        out: list[BinSegment] = []
        self._close_open(out)
        return out
