"""A DVS simulator (intensity frames -> events) and an MNIST-DVS-like recording generator.

The pixel model (after ESIM, Rebecq et al. 2018, and v2e, Hu et al. 2021), per pixel:

* log intensity :math:`L = \\log(I + \\varepsilon)`, optionally low-passed by the
  photoreceptor, :math:`\\tau \\dot L_f = L - L_f` (discretised per frame step as
  :math:`L_f \\leftarrow L_f + (1 - e^{-\\Delta t/\\tau})(L - L_f)`);
* a reference level :math:`L_r` (the log intensity at the last event); whenever
  :math:`L_f - L_r` crosses :math:`+C_{on}` an ON event is emitted and :math:`L_r \\mathrel{+}=
  C_{on}` (OFF likewise with :math:`-C_{off}`), so a large change gives several events;
* thresholds differ per pixel: :math:`C \\sim \\mathcal N(\\bar C, \\sigma_C^2)`, clipped at
  :math:`0.01` (fixed-pattern mismatch);
* between two frames :math:`L_f` is linearly interpolated in time, so the :math:`j`-th crossing
  of a step from :math:`L_a` at :math:`t_a` to :math:`L_b` at :math:`t_b` happens at
  :math:`t_a + (L_r + jC - L_a)/(L_b - L_a)\\,(t_b - t_a)`;
* a refractory period :math:`R`: a crossing less than :math:`R` after the pixel's last event is
  not emitted (the reference still moves past it, as the pixel is held in reset);
* background activity: Poisson events at ``noise_rate_hz`` per pixel, ``noise_on_fraction``
  of them ON, that do not touch the reference;
* leak: the reference level drifts down by ``leak_rate_hz`` ON thresholds per second (junction
  leakage of the reset switch, as in v2e), so a static pixel emits slow ON events;
* hot pixels: a fraction ``hot_pixel_fraction`` of the pixels fire Poisson events at
  ``hot_pixel_rate_hz`` with a fixed polarity per pixel.

General scenes (:func:`simulate_scene`): a background image seen through a moving camera (a
random planar homography path: translation, rotation, zoom, perspective) with independently
moving foreground objects (textured, soft-edged masks), rendered lazily at a frame rate that
keeps every pixel's motion under ``max_px_per_frame``; the exact intensity frame at any
requested time comes with the events (:class:`SceneClip`).

Everything random comes from one ``np.random.Generator``. Work per frame pair is vectorised
over the pixels whose level crossed a threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, cast

import numpy as np

from ._types import EVENT_DTYPE, Recording


@dataclass(frozen=True)
class DVSParams:
    """Pixel parameters of the simulator (log-intensity units for thresholds)."""

    threshold_on: float = 0.25
    threshold_off: float = 0.25
    threshold_sigma: float = 0.03
    refractory_us: float = 1_000.0
    eps: float = 0.02  # added to the intensity before the log (dark current); 0 < eps
    lowpass_tau_us: float = 0.0  # photoreceptor time constant; 0 = none
    noise_rate_hz: float = 0.0  # background activity per pixel
    noise_on_fraction: float = 0.8  # BA noise of DVS128 recordings is mostly ON
    leak_rate_hz: float = 0.0  # reference drift, in ON thresholds per second
    hot_pixel_fraction: float = 0.0  # share of pixels that fire on their own
    hot_pixel_rate_hz: float = 0.0  # their event rate

    def __post_init__(self) -> None:
        if not (self.threshold_on > 0 and self.threshold_off > 0 and self.threshold_sigma >= 0):
            raise ValueError("thresholds must be positive and threshold_sigma >= 0")
        if self.eps <= 0 or self.refractory_us < 0 or self.lowpass_tau_us < 0 or self.noise_rate_hz < 0:
            raise ValueError("eps must be > 0; refractory, low-pass tau and noise rate >= 0")
        if self.leak_rate_hz < 0 or self.hot_pixel_rate_hz < 0 or not 0 <= self.hot_pixel_fraction <= 1:
            raise ValueError("leak and hot-pixel rates must be >= 0 and hot_pixel_fraction in [0, 1]")
        if not 0 <= self.noise_on_fraction <= 1:
            raise ValueError("noise_on_fraction must lie in [0, 1]")


def _rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _crossings(
    n: np.ndarray,
    c: np.ndarray,
    level0: np.ndarray,
    la: np.ndarray,
    lb: np.ndarray,
    ta: float,
    tb: float,
    t_last: np.ndarray,
    refractory: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times of the emitted crossings of ``n`` levels ``level0 + j*c`` (j = 1..n), per pixel.

    All arrays are per crossing pixel (``c`` negative for OFF); returns (position of the pixel
    in these arrays per event, time per event, time of each pixel's last emitted event or NaN).
    """
    slope = lb - la  # nonzero: the level moved by at least one threshold in this step
    slope = np.where(slope == 0, 1e-12, slope)
    span = tb - ta
    t1 = ta + np.clip((level0 + c - la) / slope, 0.0, 1.0) * span
    dt_cross = np.abs(c / slope) * span  # time between consecutive crossings
    if refractory > 0:
        # First crossing at least R after the last event, then every m-th (greedy, exact for
        # evenly spaced crossings).
        wait = t_last + refractory - t1
        j0 = np.where(wait > 0, np.ceil(wait / np.maximum(dt_cross, 1e-12)), 0.0) + 1
        m = np.maximum(np.ceil(refractory / np.maximum(dt_cross, 1e-12)), 1.0)
    else:
        j0 = np.ones_like(t1)
        m = np.ones_like(t1)
    j0 = np.minimum(j0, n + 1)  # n + 1 = nothing emitted (also keeps inf/NaN out)
    k = np.where(j0 <= n, np.floor((n - j0) / m) + 1, 0).astype(np.int64)
    total = int(k.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0), np.full(len(n), np.nan)
    rep = np.repeat(np.arange(len(n)), k)
    within = np.arange(total) - np.repeat(np.cumsum(k) - k, k)
    j = j0[rep] + within * m[rep]
    t = t1[rep] + (j - 1) * dt_cross[rep]
    last = np.full(len(n), np.nan)
    has = k > 0
    last[has] = t1[has] + (j0[has] + (k[has] - 1) * m[has] - 1) * dt_cross[has]
    return rep, np.minimum(t, tb), last


def simulate(
    frames: np.ndarray | Iterable[np.ndarray],
    timestamps_us: np.ndarray | Iterable[float],
    params: DVSParams | None = None,
    *,
    seed: int | np.random.Generator | None = None,
    **overrides: Any,
) -> np.ndarray:
    """Turn intensity frames into DVS events (``EVENT_DTYPE``, sorted by ``t``).

    Args:
        frames: ``[N, H, W]`` linear intensities (any non-negative scale, e.g. 0..1), or an
            iterable of ``[H, W]`` frames (consumed once: a long video need not fit in memory).
        timestamps_us: ``N`` non-decreasing frame times in microseconds.
        params: pixel parameters; keyword ``overrides`` replace single fields.
        seed: seed or generator for the threshold mismatch and the noise.

    The first frame sets the reference (no events at ``t_0``). Event times are floored to
    whole microseconds and lie in ``[t_0, t_{N-1}]``.
    """
    p = replace(params or DVSParams(), **overrides)
    rng = _rng(seed)
    it: Iterator[np.ndarray] = iter(frames)
    ts: Iterator[float] = iter(
        np.asarray(timestamps_us, dtype=np.float64).tolist()
        if isinstance(timestamps_us, np.ndarray)
        else timestamps_us
    )
    try:
        first = np.asarray(next(it), dtype=np.float64)
        t_prev = float(next(ts))
    except StopIteration:
        return np.zeros(0, EVENT_DTYPE)
    if first.ndim != 2:
        raise ValueError(f"frames must be [N, H, W]; got a frame of shape {first.shape}")
    if np.any(first < 0):
        raise ValueError("intensities must be non-negative")
    h, w = first.shape
    c_on = np.maximum(rng.normal(p.threshold_on, p.threshold_sigma, h * w), 0.01)
    c_off = np.maximum(rng.normal(p.threshold_off, p.threshold_sigma, h * w), 0.01)
    c_min = float(min(c_on.min(), c_off.min()))
    lf = np.log(first.reshape(-1) + p.eps)
    ref = lf.copy()
    t_last = np.full(h * w, -np.inf)
    t_start = t_prev
    pix_parts: list[np.ndarray] = []
    t_parts: list[np.ndarray] = []
    pol_parts: list[np.ndarray] = []
    for frame in it:
        try:
            t_now = float(next(ts))
        except StopIteration:
            raise ValueError("fewer timestamps than frames") from None
        if t_now < t_prev:
            raise ValueError(f"timestamps go backwards ({t_now} < {t_prev})")
        frame = np.asarray(frame, dtype=np.float64)
        if frame.shape != (h, w):
            raise ValueError(f"frame of shape {frame.shape} in a {h}x{w} video")
        target = np.log(frame.reshape(-1) + p.eps)
        la = lf
        if p.lowpass_tau_us > 0:
            a = 1.0 - math.exp(-(t_now - t_prev) / p.lowpass_tau_us)
            lb = la + a * (target - la)
        else:
            lb = target
        lf = lb  # the true level, where the next step starts
        if p.leak_rate_hz > 0:
            # The reference sinks linearly over the step (v2e's leak): the same crossings as a
            # level rising by the leak against a fixed reference; the reference moves after.
            leak = p.leak_rate_hz * (t_now - t_prev) * 1e-6 * c_on
            lb = lb + leak
        d = lb - ref
        cand = np.flatnonzero(np.abs(d) >= c_min)
        if len(cand):
            dc = d[cand]
            up = dc > 0
            c = np.where(up, c_on[cand], -c_off[cand])  # signed threshold: ON up, OFF down
            n = np.floor(dc / c)
            sel = n >= 1
            if sel.any():
                i, nn, cc = cand[sel], n[sel], c[sel]
                rep, t, last = _crossings(
                    nn, cc, ref[i], la[i], lb[i], t_prev, t_now, t_last[i], p.refractory_us
                )
                ref[i] += nn * cc
                emitted = ~np.isnan(last)
                t_last[i[emitted]] = last[emitted]
                if len(rep):
                    pix_parts.append(i[rep])
                    t_parts.append(t)
                    pol_parts.append(up[sel][rep].astype(np.uint8))
        if p.leak_rate_hz > 0:
            ref -= leak
        t_prev = t_now
    if p.noise_rate_hz > 0 and t_prev > t_start:
        n_noise = rng.poisson(p.noise_rate_hz * h * w * (t_prev - t_start) * 1e-6)
        pix_parts.append(rng.integers(0, h * w, n_noise))
        t_parts.append(rng.uniform(t_start, t_prev, n_noise))
        pol_parts.append((rng.random(n_noise) < p.noise_on_fraction).astype(np.uint8))
    if p.hot_pixel_fraction > 0 and p.hot_pixel_rate_hz > 0 and t_prev > t_start:
        n_hot = int(round(p.hot_pixel_fraction * h * w))
        hot = rng.choice(h * w, n_hot, replace=False)
        hot_pol = rng.integers(0, 2, n_hot).astype(np.uint8)
        k = rng.poisson(p.hot_pixel_rate_hz * (t_prev - t_start) * 1e-6, n_hot)
        pix_parts.append(np.repeat(hot, k))
        t_parts.append(rng.uniform(t_start, t_prev, int(k.sum())))
        pol_parts.append(np.repeat(hot_pol, k))
    if not pix_parts:
        return np.zeros(0, EVENT_DTYPE)
    pix = np.concatenate(pix_parts)
    t = np.floor(np.concatenate(t_parts)).astype(np.int64)
    pol = np.concatenate(pol_parts)
    order = np.argsort(t, kind="stable")
    out = np.empty(len(order), EVENT_DTYPE)
    out["t"] = t[order]
    out["x"] = (pix[order] % w).astype(np.uint16)
    out["y"] = (pix[order] // w).astype(np.uint16)
    out["p"] = pol[order]
    return out


# -- moving images --------------------------------------------------------------------------


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (the lens), radius 3 sigma, edges extended."""
    if sigma <= 0:
        return img
    r = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = img.shape
    pad = np.pad(img, r, mode="edge")
    rows = sum(k[i] * pad[:, i : i + w] for i in range(2 * r + 1))  # [h + 2r, w]
    return np.asarray(sum(k[i] * rows[i : i + h] for i in range(2 * r + 1)))


def place_image(
    image: np.ndarray,
    canvas_hw: tuple[int, int],
    centre_xy: tuple[float, float],
    zoom: float,
    background: float = 0.0,
) -> np.ndarray:
    """Draw ``image`` (values 0..1) on a canvas of ``background``, centred at sub-pixel
    ``centre_xy`` (canvas pixel coordinates) and magnified by ``zoom``, by bilinear sampling.

    Canvas pixel ``(u, v)`` samples the image at ``((u - cx) / zoom + (w-1)/2,
    (v - cy) / zoom + (h-1)/2)``; outside the image the intensity is ``background``.
    """
    hc, wc = canvas_hw
    hi, wi = image.shape
    img = np.pad(np.asarray(image, dtype=np.float64), 1)  # zero border for bilinear edges
    cx, cy = centre_xy
    u = (np.arange(wc) - cx) / zoom + (wi - 1) / 2 + 1
    v = (np.arange(hc) - cy) / zoom + (hi - 1) / 2 + 1
    u0 = np.clip(np.floor(u).astype(np.int64), 0, wi)
    v0 = np.clip(np.floor(v).astype(np.int64), 0, hi)
    fu = np.clip(u - u0, 0.0, 1.0)
    fv = np.clip(v - v0, 0.0, 1.0)
    inside_u = (u >= 0) & (u <= wi + 1)
    inside_v = (v >= 0) & (v <= hi + 1)
    a = img[np.ix_(v0, u0)]
    b = img[np.ix_(v0, u0 + 1)]
    c = img[np.ix_(v0 + 1, u0)]
    d = img[np.ix_(v0 + 1, u0 + 1)]
    top = a + (b - a) * fu[None, :]
    bot = c + (d - c) * fu[None, :]
    val = top + (bot - top) * fv[:, None]
    val *= inside_v[:, None] & inside_u[None, :]
    return cast(np.ndarray, background + (1.0 - background) * val)


def _erf(x: np.ndarray) -> np.ndarray:
    """Error function (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7), numpy only."""
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return cast(np.ndarray, sign * (1.0 - poly * np.exp(-x * x)))


def _block_weights(n_out: int, n_in: int, centre: float, zoom: float, sigma: float) -> np.ndarray:
    """``[n_out, n_in]``: how much of input block ``j`` (``zoom`` wide) a Gaussian spot of
    std ``sigma`` at output pixel ``u`` sees, ``Phi((r_j - u)/sigma) - Phi((l_j - u)/sigma)``."""
    edges = centre + (np.arange(n_in + 1) - n_in / 2) * zoom  # block j spans [edges[j], edges[j+1])
    u = np.arange(n_out)[:, None]
    cdf = 0.5 * (1.0 + _erf((edges[None, :] - u) / (np.sqrt(2.0) * max(sigma, 1e-3))))
    return np.diff(cdf, axis=1)


def render_blocks(
    image: np.ndarray,
    canvas_hw: tuple[int, int],
    centre_xy: tuple[float, float],
    zoom: float,
    background: float = 0.0,
    blur_px: float = 0.3,
) -> np.ndarray:
    """A monitor showing ``image`` (0..1) magnified by pixel replication, seen through a lens.

    Each image pixel is a ``zoom x zoom`` block of constant intensity (how a monitor shows a
    magnified digit), centred at ``centre_xy``; each sensor pixel samples the screen at its
    centre through a Gaussian blur of std ``blur_px`` (the DVS128 photodiode fills ~9 % of the
    pixel, so it samples a spot rather than averaging the pixel area). Separable and exact:
    ``W_y @ image @ W_x^T`` with :func:`_block_weights`.
    """
    hc, wc = canvas_hw
    img = np.asarray(image, dtype=np.float64)
    wy = _block_weights(hc, img.shape[0], centre_xy[1], zoom, blur_px)
    wx = _block_weights(wc, img.shape[1], centre_xy[0], zoom, blur_px)
    return cast(np.ndarray, background + (1.0 - background) * (wy @ img @ wx.T))


def simulate_trajectory(
    image: np.ndarray,
    centres_xy: np.ndarray,
    timestamps_us: np.ndarray,
    canvas_hw: tuple[int, int],
    zoom: float = 1.0,
    background: float = 0.1,
    blur_px: float = 0.25,
    params: DVSParams | None = None,
    *,
    seed: int | np.random.Generator | None = None,
    **overrides: Any,
) -> np.ndarray:
    """Events of one image (values 0..1) moved along a path across a ``canvas_hw`` sensor.

    ``centres_xy`` ``[N, 2]`` (sub-pixel, sensor coordinates) at ``timestamps_us`` ``[N]``; the
    image is drawn by :func:`render_blocks` (pixel-replicated, ``zoom`` sensor pixels per image
    pixel, lens blur ``blur_px``) on a ``background`` screen, one frame per timestamp, and fed
    to :func:`simulate`. Frames are rendered lazily, so long paths need no frame stack.
    """
    centres = np.asarray(centres_xy, dtype=np.float64)
    ts = np.asarray(timestamps_us)
    if centres.ndim != 2 or centres.shape[1] != 2 or len(centres) != len(ts):
        raise ValueError("centres_xy must be [N, 2] with one row per timestamp")
    img = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
    frames = (
        render_blocks(img, canvas_hw, (float(x), float(y)), zoom, background, blur_px) for x, y in centres
    )
    return simulate(frames, ts, params, seed=seed, **overrides)


# -- MNIST-DVS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MnistDvsConfig:
    """How the MNIST-DVS recordings were made, as far as the real recordings show.

    The digits were shown on an LCD monitor and moved slowly while a DVS128 watched. In the
    real recording ``mnist_0_scale04_0001`` the digit's event centroid swings about +-5 px in x
    with a period of ~1.25 s and about +-1.7 px in y at twice that frequency (a figure-of-eight),
    and the events come in bursts every ~13 ms (a ~75 Hz monitor refresh moving the digit in
    steps). ``zoom`` per scale: scale 4 draws the 28x28 MNIST image at ~1 sensor pixel per
    MNIST pixel, scale 8 twice, scale 16 four times (measured spatial extents in
    docs/events-binning-sim.md). Real pixels fire their events for an edge within ~30 ms (a
    sharp edge over a small photodiode), so the digit is drawn as pixel-replicated blocks seen
    through little blur, and an 8 ms photoreceptor low-pass spreads each refresh step's events.
    """

    canvas: int = 128
    centre_xy: tuple[float, float] = (60.5, 64.0)  # where the real scale-4 digit sits (ours)
    centre_jitter_px: float = 1.0
    zoom_per_scale: float = 0.26  # zoom = scale * this
    amplitude_xy_px: tuple[float, float] = (4.5, 1.7)  # at scale 4; x scale/4 (like the digit)
    period_s: float = 1.25
    period_jitter: float = 0.1  # relative
    drift_px: float = 0.3  # OU jitter of the path (saccade-like), std in px at scale 4
    refresh_hz: float = 75.0
    sample_us: int = 1_000  # simulator time step
    background: float = 0.1  # monitor black relative to white
    gamma: float = 1.0  # monitor: intensity = background + (1 - background) * value ** gamma
    blur_px: float = 0.25  # lens blur on the sensor (Gaussian std, sensor pixels)
    render: str = "blocks"  # "blocks": pixel-replicated digit, point-sampled; "bilinear": smooth
    # Tuned against the real recordings (docs/events-binning-sim.md).
    dvs: DVSParams = DVSParams(
        threshold_on=0.32,
        threshold_off=0.32,
        threshold_sigma=0.05,
        refractory_us=1_000.0,
        eps=0.02,
        lowpass_tau_us=8_000.0,
        noise_rate_hz=0.012,
        noise_on_fraction=0.8,
    )


def mnist_dvs_trajectory(
    duration_s: float, rng: np.random.Generator, config: MnistDvsConfig, scale: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Digit centre per monitor refresh: (times_us [M], centres_xy [M, 2]).

    A figure-of-eight sweep ``x = A_x sin(2 pi t / P + phi)``, ``y = A_y sin(4 pi t / P + 2 phi
    + psi)`` plus Ornstein-Uhlenbeck jitter; amplitudes grow with the scale like the digit (the
    real scale-8 clip has ~3.6x the event rate of the scale-4 recording, as edges twice as long
    moving twice as fast would give).
    """
    cfg = config
    k = scale / 4
    m = int(math.ceil(duration_s * cfg.refresh_hz)) + 1
    t = np.arange(m) / cfg.refresh_hz
    period = cfg.period_s * (1 + cfg.period_jitter * rng.uniform(-1, 1))
    phase = rng.uniform(0, 2 * np.pi)
    ax, ay = (a * k for a in cfg.amplitude_xy_px)
    x = ax * np.sin(2 * np.pi * t / period + phase)
    y = ay * np.sin(4 * np.pi * t / period + 2 * phase + rng.uniform(-0.5, 0.5))
    # Ornstein-Uhlenbeck jitter with a ~0.2 s correlation time: small irregular moves.
    if cfg.drift_px > 0:
        a = math.exp(-1 / (0.2 * cfg.refresh_hz))
        noise = rng.normal(0, k * cfg.drift_px * math.sqrt(1 - a * a), (m, 2))
        ou = np.zeros((m, 2))
        ou[0] = rng.normal(0, k * cfg.drift_px, 2)
        for i in range(1, m):
            ou[i] = a * ou[i - 1] + noise[i]
        x = x + ou[:, 0]
        y = y + ou[:, 1]
    c = np.asarray(cfg.centre_xy) + rng.normal(0, cfg.centre_jitter_px, 2)
    return (t * 1e6).astype(np.int64), np.stack([x + c[0], y + c[1]], axis=1)


def simulate_mnist_dvs(
    digit_image: np.ndarray,
    scale: int = 4,
    duration_s: float = 2.0,
    seed: int | np.random.Generator | None = None,
    config: MnistDvsConfig | None = None,
) -> Recording:
    """An MNIST-DVS-like recording of one MNIST digit (``[28, 28]``, 0..1 or 0..255).

    The digit is drawn on a 128x128 monitor image at ``zoom = 0.26 * scale`` sensor pixels
    per MNIST pixel (:func:`render_blocks`), moved along :func:`mnist_dvs_trajectory` (updated
    at the monitor refresh rate), sampled every ``config.sample_us`` and fed to
    :func:`simulate`. Only the box the digit sweeps is simulated (the rest of the sensor sees a
    constant screen); background noise covers the whole sensor. Returns a :class:`Recording`
    (128x128, format ``"simulated"``) whose metadata holds the scale and the parameters.
    """
    if scale not in (4, 8, 16):
        raise ValueError(f"MNIST-DVS scales are 4, 8 and 16, not {scale}")
    if duration_s <= 0:
        raise ValueError("duration_s must be positive")
    cfg = config or MnistDvsConfig()
    rng = _rng(seed)
    img = np.asarray(digit_image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"digit_image must be 2-D, got shape {img.shape}")
    if img.max() > 1.0:
        img = img / 255.0
    img = np.clip(img, 0.0, 1.0) ** cfg.gamma  # the monitor's transfer curve
    zoom = scale * cfg.zoom_per_scale
    t_refresh, centres = mnist_dvs_trajectory(duration_s, rng, cfg, scale)
    duration_us = int(round(duration_s * 1e6))
    t_samples = np.arange(0, duration_us + 1, cfg.sample_us, dtype=np.int64)
    # index of the monitor image on screen at each sample time
    shown = np.searchsorted(t_refresh, t_samples, side="right") - 1
    # The box the digit (plus blur) ever covers; outside it nothing changes.
    half = np.array(img.shape[::-1]) / 2 * zoom + 3 * cfg.blur_px + 2
    lo = np.clip(np.floor(centres.min(axis=0) - half), 0, cfg.canvas).astype(int)
    hi = np.clip(np.ceil(centres.max(axis=0) + half) + 1, 0, cfg.canvas).astype(int)
    (x0, y0), (x1, y1) = lo, hi
    box = (max(int(y1 - y0), 1), max(int(x1 - x0), 1))
    cache: dict[int, np.ndarray] = {}

    def frames() -> Iterator[np.ndarray]:
        for i in shown.tolist():
            f = cache.get(i)
            if f is None:
                cache.clear()
                cx, cy = float(centres[i, 0]) - x0, float(centres[i, 1]) - y0
                if cfg.render == "blocks":
                    f = render_blocks(img, box, (cx, cy), zoom, cfg.background, cfg.blur_px)
                else:
                    f = _blur(place_image(img, box, (cx, cy), zoom, cfg.background), cfg.blur_px)
                cache[i] = f
            yield f

    ev = simulate(frames(), t_samples, replace(cfg.dvs, noise_rate_hz=0.0), seed=rng)
    ev["x"] += np.uint16(x0)
    ev["y"] += np.uint16(y0)
    if cfg.dvs.noise_rate_hz > 0:
        n = rng.poisson(cfg.dvs.noise_rate_hz * cfg.canvas**2 * duration_us * 1e-6)
        noise = np.empty(n, EVENT_DTYPE)
        noise["t"] = np.floor(rng.uniform(0, duration_us, n)).astype(np.int64)
        noise["x"] = rng.integers(0, cfg.canvas, n)
        noise["y"] = rng.integers(0, cfg.canvas, n)
        noise["p"] = rng.random(n) < cfg.dvs.noise_on_fraction
        ev = np.concatenate([ev, noise])
        ev = ev[np.argsort(ev["t"], kind="stable")]
    meta = {
        "simulator": "vdib events.simulate_mnist_dvs",
        "scale": int(scale),
        "duration_s": float(duration_s),
        "zoom": zoom,
        "config": {k: v for k, v in asdict(cfg).items() if k != "dvs"},
        "dvs": asdict(cfg.dvs),
    }
    return Recording(ev, cfg.canvas, cfg.canvas, "simulated", meta)


# -- general scenes ---------------------------------------------------------------------------


def _sample_bilinear(image: np.ndarray, sx: np.ndarray, sy: np.ndarray, boundary: str) -> np.ndarray:
    """Bilinear samples of ``image`` [h, w] at float coordinates; ``boundary`` "reflect" mirrors
    the image (endless texture), "zero" gives 0 outside."""
    h, w = image.shape
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = sx - x0
    fy = sy - y0

    def take(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        if boundary == "reflect":
            xx = np.abs((xx + w) % (2 * w) - w)  # period 2w mirror: ... 1 0 0 1 ... (edge repeated)
            yy = np.abs((yy + h) % (2 * h) - h)
            return cast(np.ndarray, image[np.minimum(yy, h - 1), np.minimum(xx, w - 1)])
        inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        return np.where(inside, image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)], 0.0)

    a = take(y0, x0)
    b = take(y0, x0 + 1)
    c = take(y0 + 1, x0)
    d = take(y0 + 1, x0 + 1)
    top = a + (b - a) * fx
    return cast(np.ndarray, top + (c + (d - c) * fx - top) * fy)


def warp_image(
    image: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int], boundary: str = "reflect"
) -> np.ndarray:
    """``image`` seen through the homography ``matrix`` ``[3, 3]``, which maps output pixel
    ``(u, v, 1)`` to source coordinates ``(x, y, w)`` (divided by ``w``); bilinear sampling."""
    hc, wc = out_hw
    u, v = np.meshgrid(np.arange(wc, dtype=np.float64), np.arange(hc, dtype=np.float64))
    m = np.asarray(matrix, dtype=np.float64)
    den = m[2, 0] * u + m[2, 1] * v + m[2, 2]
    sx = (m[0, 0] * u + m[0, 1] * v + m[0, 2]) / den
    sy = (m[1, 0] * u + m[1, 1] * v + m[1, 2]) / den
    return _sample_bilinear(np.asarray(image, dtype=np.float64), sx, sy, boundary)


def dead_leaves(
    hw: tuple[int, int],
    seed: int | np.random.Generator | None = None,
    *,
    r_min: float = 2.0,
    r_max: float | None = None,
    alpha: float = 3.0,
    textured: float = 0.4,
) -> np.ndarray:
    """A dead-leaves image (Lee, Mumford & Huang 2001) ``[h, w]`` in [0, 1]: opaque discs of
    radius ``~ r^-alpha`` on ``[r_min, r_max]`` drop until the image is covered; the scale-
    invariant statistics of natural images. A ``textured`` share of the discs carries a
    sinusoidal grating or a linear gradient instead of a flat grey."""
    rng = _rng(seed)
    h, w = hw
    r_max = r_max or 0.5 * max(h, w)
    img = np.full((h, w), np.nan)
    yy, xx = np.mgrid[0:h, 0:w]
    # inverse-CDF sampling of r^-alpha on [r_min, r_max]
    a1 = 1.0 - alpha
    for i in range(20_000):
        if i % 64 == 0 and not np.isnan(img).any():
            break
        r = (r_min**a1 + rng.random() * (r_max**a1 - r_min**a1)) ** (1.0 / a1)
        cx, cy = rng.uniform(-r, w + r), rng.uniform(-r, h + r)
        x0, x1 = max(int(cx - r), 0), min(int(cx + r) + 1, w)
        y0, y1 = max(int(cy - r), 0), min(int(cy + r) + 1, h)
        if x0 >= x1 or y0 >= y1:
            continue
        sub = img[y0:y1, x0:x1]
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        disc = (dx * dx + dy * dy <= r * r) & np.isnan(sub)  # earlier leaves lie on top
        if not disc.any():
            continue
        g = rng.uniform(0.0, 1.0)
        if rng.random() < textured:
            th = rng.uniform(0, np.pi)
            proj = dx * np.cos(th) + dy * np.sin(th)
            amp = rng.uniform(0.1, 0.5) * min(g, 1 - g) * 2
            val = g + amp * (np.sin(proj * rng.uniform(0.2, 1.5)) if rng.random() < 0.5 else proj / r)
        else:
            val = np.full(disc.shape, g)
        sub[disc] = val[disc]
    img[np.isnan(img)] = rng.uniform(0.0, 1.0)
    return cast(np.ndarray, np.clip(img, 0.0, 1.0))


@dataclass(frozen=True)
class SceneConfig:
    """Random camera and object motion and sensor spread of :func:`simulate_scene`.

    Every range ``(lo, hi)`` is drawn uniformly per clip (``*_log`` ranges log-uniformly).
    Speeds are in sensor pixels per second at the canvas centre; ``rotation_deg_s`` and
    ``zoom_per_s`` add to the speed at the corners. Thresholds: ``C_on`` from ``threshold``,
    ``C_off = C_on * ratio`` with ``ratio`` in ``[1/threshold_ratio, threshold_ratio]``.
    """

    height: int = 64
    width: int = 64
    speed_px_s: tuple[float, float] = (10.0, 300.0)
    rotation_deg_s: tuple[float, float] = (-20.0, 20.0)
    zoom_per_s: tuple[float, float] = (-0.4, 0.4)
    perspective: float = 2e-4  # max |h20|, |h21| of the view homography (1/px)
    view_scale: tuple[float, float] = (0.5, 2.0)  # source pixels per sensor pixel (log-uniform)
    n_objects: tuple[int, int] = (0, 3)
    object_size: tuple[float, float] = (0.2, 0.6)  # of the canvas' shorter side
    object_speed_px_s: tuple[float, float] = (10.0, 400.0)
    contrast: tuple[float, float] = (0.5, 1.0)  # intensity span hi - lo of the clip
    gamma: tuple[float, float] = (0.7, 1.4)
    threshold: tuple[float, float] = (0.1, 0.7)
    threshold_ratio: float = 1.5
    threshold_sigma: tuple[float, float] = (0.0, 0.05)
    refractory_us: tuple[float, float] = (0.0, 1_000.0)
    noise_rate_hz_log: tuple[float, float] = (0.003, 1.0)
    leak_rate_hz_log: tuple[float, float] = (0.001, 0.2)
    hot_pixel_fraction: tuple[float, float] = (0.0, 5e-4)
    hot_pixel_rate_hz: tuple[float, float] = (5.0, 100.0)
    lowpass_tau_us: tuple[float, float] = (0.0, 3_000.0)
    eps: tuple[float, float] = (0.005, 0.05)
    max_px_per_frame: float = 1.0
    max_frame_dt_us: int = 2_000


@dataclass
class SceneClip:
    """Events of a simulated scene and its exact intensity frames.

    ``frames`` ``[K, H, W]`` float32 in [0, 1] at ``frame_times_us`` ``[K]`` (what a perfect
    camera would show at those instants); ``metadata`` records every drawn parameter.
    """

    events: np.ndarray
    width: int
    height: int
    frames: np.ndarray
    frame_times_us: np.ndarray
    metadata: dict[str, Any]


def _uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def _log_uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1])))) if r[1] > r[0] else float(r[0])


def _similarity(cx: float, cy: float, angle: float, scale: float, ox: float, oy: float) -> np.ndarray:
    """Maps canvas ``(u, v)`` to source: rotate/scale about the canvas point ``(ox, oy)``, then
    put it at source ``(cx, cy)``."""
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[c, -s, cx - c * ox + s * oy], [s, c, cy - s * ox - c * oy], [0.0, 0.0, 1.0]])


class _SceneMotion:
    """A clip's deterministic render function ``t_us -> frame [H, W]`` plus its speed bound."""

    def __init__(
        self,
        background: np.ndarray,
        objects: list[tuple[np.ndarray, np.ndarray]],
        cfg: SceneConfig,
        rng: np.random.Generator,
    ):
        self.h, self.w = cfg.height, cfg.width
        self.bg = np.asarray(background, dtype=np.float64)
        bh, bw = self.bg.shape
        ox, oy = (self.w - 1) / 2, (self.h - 1) / 2
        self.origin = (ox, oy)
        radius = math.hypot(ox, oy)
        self.cam_scale = _log_uniform(rng, cfg.view_scale)
        speed = _uniform(rng, cfg.speed_px_s)
        heading = rng.uniform(0, 2 * np.pi)
        self.cam_v = np.array([math.cos(heading), math.sin(heading)]) * speed * self.cam_scale  # source px/s
        self.cam_w = math.radians(_uniform(rng, cfg.rotation_deg_s))
        self.cam_z = _uniform(rng, cfg.zoom_per_s)
        self.cam_angle = rng.uniform(0, 2 * np.pi)
        self.cam_c = np.array([rng.uniform(0, bw), rng.uniform(0, bh)])
        self.persp = rng.uniform(-cfg.perspective, cfg.perspective, 2)
        max_speed = speed + abs(self.cam_w) * radius + abs(self.cam_z) * radius
        self.objects = []
        side = min(self.h, self.w)
        for img, mask in objects:
            size = _uniform(rng, cfg.object_size) * side
            scale = max(img.shape) / size  # source px per canvas px
            v = _uniform(rng, cfg.object_speed_px_s)
            hd = rng.uniform(0, 2 * np.pi)
            w = math.radians(rng.uniform(-45, 45))
            start = np.array([rng.uniform(0, self.w), rng.uniform(0, self.h)])
            self.objects.append(
                (
                    img,
                    mask,
                    scale,
                    start,
                    np.array([math.cos(hd), math.sin(hd)]) * v,
                    w,
                    rng.uniform(0, 2 * np.pi),
                )
            )
            max_speed = max(max_speed, v + abs(w) * size)
        self.max_speed = max_speed
        span = _uniform(rng, cfg.contrast)
        self.lo = rng.uniform(0.0, 1.0 - span)
        self.span = span
        self.gamma = _log_uniform(rng, cfg.gamma)

    def __call__(self, t_us: float) -> np.ndarray:
        t = t_us * 1e-6
        ox, oy = self.origin
        c = self.cam_c + self.cam_v * t
        m = _similarity(
            c[0], c[1], self.cam_angle + self.cam_w * t, self.cam_scale * math.exp(self.cam_z * t), ox, oy
        )
        persp = np.array([[1.0, 0, 0], [0, 1.0, 0], [self.persp[0], self.persp[1], 1.0]])
        shift = np.array([[1.0, 0, -ox], [0, 1.0, -oy], [0, 0, 1.0]])
        unshift = np.array([[1.0, 0, ox], [0, 1.0, oy], [0, 0, 1.0]])
        frame = warp_image(self.bg, m @ unshift @ persp @ shift, (self.h, self.w), "reflect")
        for img, mask, scale, start, vel, w, a0 in self.objects:
            pos = start + vel * t
            ih, iw = img.shape
            mo = _similarity((iw - 1) / 2, (ih - 1) / 2, a0 + w * t, scale, pos[0], pos[1])
            alpha = np.clip(warp_image(mask, mo, (self.h, self.w), "zero"), 0.0, 1.0)
            obj = warp_image(img, mo, (self.h, self.w), "zero")
            frame = frame * (1 - alpha) + obj * alpha
        return cast(np.ndarray, self.lo + self.span * np.clip(frame, 0.0, 1.0) ** self.gamma)


def object_mask(hw: tuple[int, int], seed: int | np.random.Generator | None = None) -> np.ndarray:
    """A soft-edged random foreground shape ``[h, w]`` in [0, 1]: an ellipse, a rectangle or a
    star-shaped blob, anti-aliased over about one pixel."""
    rng = _rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx - (w - 1) / 2) / (w / 2), (yy - (h - 1) / 2) / (h / 2)
    kind = rng.integers(0, 3)
    if kind == 0:
        d = 1 - np.sqrt(u**2 + v**2)
    elif kind == 1:
        a, b = rng.uniform(0.5, 1.0, 2)
        d = np.minimum(a - np.abs(u), b - np.abs(v))
    else:
        th = np.arctan2(v, u)
        k = rng.integers(3, 7)
        r = 0.7 + 0.25 * np.sin(k * th + rng.uniform(0, 2 * np.pi))
        d = r - np.sqrt(u**2 + v**2)
    return cast(np.ndarray, np.clip(0.5 + d * min(h, w) / 2, 0.0, 1.0))


def simulate_scene(
    background: np.ndarray,
    objects: list[tuple[np.ndarray, np.ndarray]] | None = None,
    *,
    duration_us: int,
    frame_times_us: np.ndarray | None = None,
    config: SceneConfig | None = None,
    seed: int | np.random.Generator | None = None,
) -> SceneClip:
    """Events of a general scene and its exact frames at ``frame_times_us``.

    ``background``: ``[h, w]`` image in [0, 1] (any size; it tiles by mirroring); ``objects``:
    ``(image, mask)`` pairs, both ``[h_i, w_i]`` in [0, 1]. Motion, contrast and the DVS
    parameters are drawn from ``config`` with ``seed`` (the same seed gives the same clip).
    The video is rendered every ``min(max_frame_dt_us, max_px_per_frame / speed)`` and fed to
    :func:`simulate` lazily; ``frame_times_us`` (default: every 10 ms, the end of each 10 ms
    bin) are rendered exactly.
    """
    cfg = config or SceneConfig()
    rng = _rng(seed)
    if duration_us <= 0:
        raise ValueError("duration_us must be positive")
    motion = _SceneMotion(background, list(objects or []), cfg, rng)
    c_on = _uniform(rng, cfg.threshold)
    ratio = math.exp(rng.uniform(-math.log(cfg.threshold_ratio), math.log(cfg.threshold_ratio)))
    dvs = DVSParams(
        threshold_on=c_on,
        threshold_off=c_on * ratio,
        threshold_sigma=_uniform(rng, cfg.threshold_sigma),
        refractory_us=_uniform(rng, cfg.refractory_us),
        eps=_uniform(rng, cfg.eps),
        lowpass_tau_us=_uniform(rng, cfg.lowpass_tau_us),
        noise_rate_hz=_log_uniform(rng, cfg.noise_rate_hz_log),
        noise_on_fraction=float(rng.uniform(0.3, 0.8)),
        leak_rate_hz=_log_uniform(rng, cfg.leak_rate_hz_log),
        hot_pixel_fraction=_uniform(rng, cfg.hot_pixel_fraction),
        hot_pixel_rate_hz=_uniform(rng, cfg.hot_pixel_rate_hz),
    )
    frame_dt = min(cfg.max_frame_dt_us, max(cfg.max_px_per_frame / max(motion.max_speed, 1e-6) * 1e6, 20.0))
    n = int(math.ceil(duration_us / frame_dt))
    t_sim = np.linspace(0.0, float(duration_us), n + 1)
    events = simulate((motion(t) for t in t_sim), t_sim, dvs, seed=rng)
    if frame_times_us is None:
        frame_times_us = np.arange(10_000, duration_us + 1, 10_000, dtype=np.int64)
    ft = np.asarray(frame_times_us, dtype=np.int64)
    frames = (
        np.stack([motion(float(t)) for t in ft]).astype(np.float32)
        if len(ft)
        else np.zeros((0, cfg.height, cfg.width), np.float32)
    )
    meta = {
        "simulator": "vdib events.simulate_scene",
        "duration_us": int(duration_us),
        "frame_dt_us": float(frame_dt),
        "max_speed_px_s": float(motion.max_speed),
        "n_objects": len(motion.objects),
        "intensity": {"lo": motion.lo, "span": motion.span, "gamma": motion.gamma},
        "dvs": asdict(dvs),
    }
    return SceneClip(events, cfg.width, cfg.height, frames, ft, meta)


# -- statistics used to compare simulated and real recordings ---------------------------------


def peak_rate(t: np.ndarray, window_us: int = 10_000) -> float:
    """Most events in any window ``[t0 + k*w, t0 + (k+1)*w)`` (``t0`` = earliest event), per second.

    Run lengths of the window index over sorted times: O(n) memory whatever the time span.
    """
    if len(t) == 0:
        return 0.0
    t = np.asarray(t, dtype=np.int64)
    if np.any(t[1:] < t[:-1]):
        t = np.sort(t)
    k = (t - t[0]) // window_us
    ends = np.flatnonzero(np.diff(k))
    runs = np.diff(np.concatenate(([-1], ends, [len(k) - 1])))
    return float(runs.max()) * 1e6 / window_us


def recording_stats(events: np.ndarray, width: int, height: int) -> dict[str, float]:
    """Events per second, ON fraction, spatial extent and per-pixel activity of a recording.

    ``extent_x/y_px``: 5th-95th percentile spread of x / y; ``active_pixels``: pixels with at
    least one event; ``events_per_active_pixel``; ``mnist_dvs_cells_per_bin``: mean number of
    set cells per 10 ms bin in the MNIST_DVS crop (what the encoder sees).
    """
    from .binning import MNIST_DVS

    n = len(events)
    if n == 0:
        return {"events": 0}
    t = events["t"]
    dur = max(int(t[-1] - t[0]), 1) * 1e-6
    x = events["x"].astype(np.int64)
    y = events["y"].astype(np.int64)
    per_pix = np.bincount(y * width + x, minlength=width * height)
    active = int(np.count_nonzero(per_pix))
    peak = peak_rate(t, 10_000)
    out = {
        "events": n,
        "duration_s": dur,
        "events_per_s": n / dur,
        "peak_events_per_s_10ms": float(peak),
        "on_fraction": float(events["p"].mean()),
        "extent_x_px": float(np.percentile(x, 95) - np.percentile(x, 5)),
        "extent_y_px": float(np.percentile(y, 95) - np.percentile(y, 5)),
        "centre_x": float(np.median(x)),
        "centre_y": float(np.median(y)),
        "active_pixels": active,
        "events_per_active_pixel": n / max(active, 1),
    }
    if width == 128 and height == 128:
        frames = MNIST_DVS.bin(events)
        out["mnist_dvs_cells_per_bin"] = float(frames.reshape(len(frames), -1).sum(1).mean())
    return out
