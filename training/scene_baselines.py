"""Baselines for general-scene reconstruction, scored by :mod:`training.scene_eval`.

* ``mid-gray``: a constant 0.5 image (the floor every method must beat).
* ``direct``: direct integration, ``L_p += ±C`` per event (C 0.2), no decay: drifts and has no
  absolute brightness.
* ``hpf``: Scheerlinck et al.'s high-pass filter (ACCV 2018): per event at pixel p
  ``L_p <- exp(-a (t_i - t_p) - b) L_p + c_i``, ``t_p <- t_i``; before output every pixel decays
  to the output time, ``L_p <- exp(-a (t - t_p)) L_p``; ``a = 2 pi f_c`` (f_c 0.06 Hz), per-event
  leak b 0.06, C 0.1.
* Display of both integrators: ``exp(L)``, then a robust 1st-99th percentile stretch to [0, 1]
  (falling back to min-max when fewer than 1 % of the pixels moved, so a sparse clip is not flat;
  a constant image, e.g. before any event, shows as 0.5).
* ``pienet`` / ``pienet-lite``: the published PIE-Net models (PyPI ``event-pienet``, MIT, weights in
  the wheel; the optional ``bench`` extra). Input as in EVREAL's standard config: one 5-bin voxel
  grid per output frame built from the events since the previous output (the first from the
  first event on), polarity ±1 spread bilinearly over the bins by time normalised to the window; the
  output's time is the window's last event (EVREAL's ``voxel_timestamp``), so a frame whose window
  ends more than 1 ms before it is not scored. The net is recurrent; state is reset per sequence.

Every method's ``reconstruct(events, width, height, timestamps_us)`` returns float32 [K, H, W]
in [0, 1] for the requested (any order) timestamps, from the first event on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

try:
    import numba

    _njit = numba.njit(cache=True, nogil=True)
except ImportError:  # pragma: no cover - numba is a core dependency
    numba = None  # type: ignore[assignment]

    def _njit(f):  # type: ignore[no-redef]
        return f


def robust_stretch(img: np.ndarray, lo_pct: float = 1.0, hi_pct: float = 99.0) -> np.ndarray:
    """Map the ``lo_pct``-``hi_pct`` percentile range of ``img`` to [0, 1], clipped.

    When that range collapses (fewer than 1 % of the pixels changed, as on a sparse clip) the
    full min-max range is used instead; a flat image shows as 0.5.
    """
    a = np.asarray(img, dtype=np.float64)
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    if not (hi - lo > 1e-12):
        lo, hi = float(a.min()), float(a.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or not (hi - lo > 1e-12):
        return np.full(a.shape, 0.5, dtype=np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _order(timestamps_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ts = np.asarray(timestamps_us, dtype=np.int64)
    order = np.argsort(ts, kind="stable")
    return ts, order


@_njit
def _integrate(t, x, y, p, width, height, times, a, b, c_on, c_off, out):  # pragma: no cover - jitted
    """Leaky integration; ``out[j]`` is L at ``times[j]`` (sorted ascending), decayed to that time.

    a = 0, b = 0 is direct integration. ``tp`` starts at the first event's time.
    """
    n = t.shape[0]
    L = np.zeros(height * width, dtype=np.float64)
    tp = np.empty(height * width, dtype=np.float64)
    t0 = float(t[0]) if n > 0 else 0.0
    tp[:] = t0
    k = 0
    for j in range(times.shape[0]):
        T = times[j]
        while k < n and t[k] <= T:
            i = int(y[k]) * width + int(x[k])
            ti = float(t[k])
            step = c_on if p[k] else -c_off
            if a == 0.0 and b == 0.0:
                L[i] += step
            else:
                L[i] = math.exp(-a * (ti - tp[i]) * 1e-6 - b) * L[i] + step
            tp[i] = ti
            k += 1
        Tf = float(T)
        for i in range(height * width):
            if a == 0.0:
                out[j, i] = L[i]
            else:
                out[j, i] = math.exp(-a * (Tf - tp[i]) * 1e-6) * L[i]
    return out


class _Integrator:
    name = "integrator"
    cutoff_hz = 0.0
    leak = 0.0
    contrast = 0.1

    def log_intensity(
        self, events: np.ndarray, width: int, height: int, timestamps_us: np.ndarray
    ) -> np.ndarray:
        """The filter state L (log intensity) at each timestamp, float64 [K, H, W]."""
        ts, order = _order(timestamps_us)
        out = np.zeros((len(ts), height * width), dtype=np.float64)
        if len(ts) == 0:
            return out.reshape(0, height, width)
        if len(events):
            xs = events["x"]
            ys = events["y"]
            if int(xs.max()) >= width or int(ys.max()) >= height:
                raise ValueError(f"events outside the {width}x{height} sensor")
        sorted_out = np.zeros_like(out)
        _integrate(
            np.ascontiguousarray(events["t"]),
            np.ascontiguousarray(events["x"]),
            np.ascontiguousarray(events["y"]),
            np.ascontiguousarray(events["p"]),
            width,
            height,
            ts[order],
            2.0 * math.pi * self.cutoff_hz,
            self.leak,
            self.contrast,
            self.contrast,
            sorted_out,
        )
        out[order] = sorted_out
        return out.reshape(len(ts), height, width)

    def reconstruct(
        self, events: np.ndarray, width: int, height: int, timestamps_us: np.ndarray
    ) -> np.ndarray:
        L = self.log_intensity(events, width, height, timestamps_us)
        return (
            np.stack([robust_stretch(np.exp(f)) for f in L])
            if len(L)
            else np.zeros((0, height, width), np.float32)
        )

    def info(self) -> dict[str, Any]:
        return {
            "params": 0,
            "macs_per_frame": None,
            "settings": {"cutoff_hz": self.cutoff_hz, "leak": self.leak, "contrast": self.contrast},
        }


class DirectIntegration(_Integrator):
    def __init__(self, contrast: float = 0.2):
        self.name = "direct"
        self.contrast = contrast


class HighPassFilter(_Integrator):
    def __init__(self, cutoff_hz: float = 0.06, leak: float = 0.06, contrast: float = 0.1):
        self.name = "hpf"
        self.cutoff_hz = cutoff_hz
        self.leak = leak
        self.contrast = contrast


class MidGray:
    def __init__(self, value: float = 0.5):
        self.name = "mid-gray"
        self.value = value

    def reconstruct(
        self, events: np.ndarray, width: int, height: int, timestamps_us: np.ndarray
    ) -> np.ndarray:
        return np.full((len(timestamps_us), height, width), self.value, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {"params": 0, "macs_per_frame": 0}


# ---------------------------------------------------------------------------------------------
# PIE-Net (event-pienet)
# ---------------------------------------------------------------------------------------------


@_njit
def _voxel(t, x, y, p, width, height, bins, out):  # pragma: no cover - jitted
    """EVREAL/E2VID voxel grid: polarity ±1, bilinear in time over ``bins`` bins of the window."""
    n = t.shape[0]
    if n == 0:
        return out
    t0 = float(t[0])
    dt = float(t[n - 1]) - t0
    if dt <= 0.0:
        dt = 1.0
    for k in range(n):
        tn = (bins - 1) * (float(t[k]) - t0) / dt
        ti = int(tn)
        tf = tn - ti
        pol = 1.0 if p[k] else -1.0
        xi = int(x[k])
        yi = int(y[k])
        if ti < bins:
            out[ti, yi, xi] += pol * (1.0 - tf)
        if ti + 1 < bins:
            out[ti + 1, yi, xi] += pol * tf
    return out


def voxel_grid(events: np.ndarray, width: int, height: int, bins: int = 5) -> np.ndarray:
    out = np.zeros((bins, height, width), dtype=np.float32)
    if len(events) == 0:
        return out
    return _voxel(
        np.ascontiguousarray(events["t"]),
        np.ascontiguousarray(events["x"]),
        np.ascontiguousarray(events["y"]),
        np.ascontiguousarray(events["p"]),
        width,
        height,
        bins,
        out,
    )


def pienet_available() -> str | None:
    """None when ``event-pienet`` can be imported, else why not."""
    try:
        import pie_net  # noqa: F401
    except ImportError as exc:
        return f"event-pienet is not installed ({exc}); pip install --no-deps event-pienet"
    return None


class PIENetMethod:
    """PIE-Net or PIE-Net-Lite on between-output-frames 5-bin voxel grids (EVREAL ``std``)."""

    def __init__(self, variant: str = "pie-net", *, bins: int = 5, count_cost: bool = False):
        import torch
        from pie_net import load_model

        self._torch = torch
        self.variant = variant
        self.name = "pienet-lite" if "lite" in variant else "pienet"
        self.net = load_model(pretrained=True, device="cpu", variant=variant).eval()
        self.bins = bins
        self.count_cost = count_cost
        self.output_times_us: np.ndarray | None = None
        self.last_counters: dict[str, float] | None = None

    def reconstruct(
        self, events: np.ndarray, width: int, height: int, timestamps_us: np.ndarray
    ) -> np.ndarray:
        from .scene_eval import CostCounter

        torch = self._torch
        ts, order = _order(timestamps_us)
        sorted_ts = ts[order]
        t = events["t"]
        out = np.zeros((len(ts), height, width), dtype=np.float32)
        out_t = np.zeros(len(ts), dtype=np.int64)
        self.net.reset_states()
        counter = CostCounter(self.net, spiking=False) if self.count_cost else None
        start = 0
        with torch.inference_mode():
            if counter is not None:
                counter.__enter__()
            try:
                for j, T in enumerate(sorted_ts):
                    stop = int(np.searchsorted(t, T, side="right"))
                    win = events[start:stop]
                    vox = torch.from_numpy(voxel_grid(win, width, height, self.bins))[None]
                    img = self.net(vox)["image"]
                    out[order[j]] = np.clip(img[0, 0].numpy(), 0.0, 1.0)
                    out_t[order[j]] = int(win["t"][-1]) if len(win) else int(T)
                    start = max(start, stop)
            finally:
                if counter is not None:
                    counter.__exit__(None, None, None)
                    self.last_counters = counter.totals()
        self.output_times_us = out_t
        return out

    def info(self) -> dict[str, Any]:
        from .scene_eval import count_parameters

        return {
            "params": count_parameters(self.net),
            "package": "event-pienet",
            "variant": self.variant,
            "input": f"{self.bins}-bin voxel grid between output frames",
        }


BASELINES = ("mid-gray", "direct", "hpf", "pienet", "pienet-lite")


def build_baseline(name: str, *, count_cost: bool = False) -> Any:
    """A baseline method by name (see :data:`BASELINES`)."""
    if name == "mid-gray":
        return MidGray()
    if name == "direct":
        return DirectIntegration()
    if name == "hpf":
        return HighPassFilter()
    if name == "pienet":
        return PIENetMethod("pie-net", count_cost=count_cost)
    if name == "pienet-lite":
        return PIENetMethod("pie-net-lite", count_cost=count_cost)
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
