"""Serving the general-scene naturalizer (``model/scene.py``): any sensor, at its full resolution.

A scene checkpoint (``config.json``'s ``model.family == "scene"``) is fully convolutional, so one
set of weights serves every sensor size; what depends on the size is the state of a stream
(spike maps of ``ceil(H/2) x ceil(W/2)``) and the image it decodes (``H x W``). Here:

* :class:`SceneEngine`: the model-level engine of a :class:`SceneEntry` (the model on its device,
  its per-lag readout kernels computed once). ``for_input((C, H, W))`` gives the
  :class:`SizedSceneEngine` of one input size, shared by every stream of that size while one
  lives, so the scheduler (which batches the streams of one engine) steps equal-sized streams in
  one call and never mixes sizes.
* :class:`SizedSceneEngine`: the :class:`service.engines.Engine` interface the scheduler,
  sessions and uploads use, with a stream's readout flattened: ``n_readout = K * h * w`` spike
  maps' neurons, ``x [B, C * H * W]`` raw event counts of one bin, ``uniforms [B, K * h * w]``
  (the stream's own draw: the numbers of ``torch.rand((1, K, h, w), generator)``, so a stream
  equals :func:`model.scene.reconstruct_events` with the same generator), windows ``[B, tau_d,
  K * h * w]`` -> images ``[B, H, W]``. The encoder step is batched (convolutions treat the
  batch rows independently: a stream's spikes never depend on its neighbours, tested bit for
  bit); on the CPU the decoder runs one stream at a time (no faster batched there, and a
  batched convolution may round differently in the last bit).
* :class:`SceneOnnxEngine` / :class:`SizedSceneOnnxEngine`: the same on onnxruntime
  (``VDIB_ENGINE=onnx``; :mod:`model.scene_onnx`'s graphs, dynamic batch and size).
* :class:`SceneEntry`: the registry entry (ROI policy: the whole sensor, or an explicit region,
  never pooled; sensor areas over ``max_sensor_pixels`` refused; the pixels of open scene
  streams bounded by ``max_scene_pixels``).
* :func:`run_scene`: an upload through the same engine (bins of :class:`events.Binner`, the
  rules of a live stream), or at the timestamps a caller names via
  :func:`model.scene.reconstruct_events`.
"""

from __future__ import annotations

import functools
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from events import EventLimitError

from .engines import Engine, EngineError, State, _group_rows, _resolve_torch_device, _Row
from .registry import MAX_COORD, ModelEntry, RoiError

if TYPE_CHECKING:
    from model.scene import SceneNaturalizer, SceneState

    from .pipeline import RunOptions, RunResult
    from .settings import Settings

#: the model family of the general-scene checkpoints (``config.json``: ``model.family``)
SCENE_FAMILY = "scene"
#: sensor size the engine is warmed up at when a scene model loads (small: load time, not shape)
WARMUP_SENSOR = (64, 48)


class CapacityError(RuntimeError):
    """The open scene streams already hold ``max_scene_pixels`` sensor pixels (close 1013)."""


class SceneEngine(Engine):
    """The model-level engine of a scene checkpoint (module docstring); steps nothing itself:
    :meth:`for_input` gives the engine of one input size."""

    name = "torch"
    family = SCENE_FAMILY

    def __init__(self, net: SceneNaturalizer, device: str = "auto") -> None:
        self.device = _resolve_torch_device(device)
        self.net = net.to(self.device).eval()
        cfg = net.config
        self.config = cfg
        with torch.inference_mode():
            self.lag_weight = net.lag_weight()  # the per-lag readout kernels, once (weights never change)
        self.n_inputs = 0  # any size: see for_input
        self.n_readout = int(cfg.n_readout)  # readout maps K
        self.tau_d = int(cfg.tau_d)
        self.image_shape = (0, 0)
        self._sized: weakref.WeakValueDictionary[tuple[int, int, int], SizedSceneEngine] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()  # sessions are made on the event loop, uploads in worker threads
        self.live_pixels = 0  # sensor pixels of the open scene streams (admission)

    def _sized_engine(self, height: int, width: int) -> SizedSceneEngine:
        """A new engine of one sensor size (the ONNX engine makes ONNX ones)."""
        return SizedSceneEngine(self, height, width)

    def for_input(self, shape: tuple[int, ...]) -> SizedSceneEngine:
        """The engine of ``(C, H, W)`` inputs, the same object while any stream uses it."""
        c, h, w = (int(v) for v in shape)
        if c != self.config.in_channels or h < 1 or w < 1:
            raise EngineError(
                f"input {c}x{h}x{w} cannot feed a scene model of {self.config.in_channels} channels"
            )
        with self._lock:
            eng = self._sized.get((c, h, w))
            if eng is None:
                eng = self._sized_engine(h, w)
                self._sized[(c, h, w)] = eng
            return eng

    def admit(self, pixels: int, limit: int) -> None:
        """Count ``pixels`` more sensor pixels of open streams; :class:`CapacityError` past ``limit``."""
        with self._lock:
            if self.live_pixels + pixels > limit:
                raise CapacityError(
                    f"open scene streams hold {self.live_pixels} sensor pixels; {pixels} more would pass the "
                    f"limit of {limit} (max_scene_pixels); try again later"
                )
            self.live_pixels += pixels

    def leave(self, pixels: int) -> None:
        with self._lock:
            self.live_pixels -= pixels

    # the Engine interface needs a size
    def _sizeless(self) -> EngineError:
        return EngineError("a scene engine steps at one input size: use for_input((C, H, W))")

    def init_state(self) -> State:
        raise self._sizeless()

    def stack(self, states: list[State]) -> State:
        raise self._sizeless()

    def unstack(self, state: State, n: int) -> list[State]:
        raise self._sizeless()

    def step(self, x: np.ndarray, state: State, uniforms: np.ndarray) -> tuple[np.ndarray, State]:
        raise self._sizeless()

    def decode(self, windows: np.ndarray) -> np.ndarray:
        raise self._sizeless()

    def warmup(self, batches: tuple[int, ...] = (1, 2)) -> None:
        self.for_input((self.config.in_channels, WARMUP_SENSOR[1], WARMUP_SENSOR[0])).warmup(batches)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "device": self.device}


class SizedSceneEngine(Engine):
    """A :class:`SceneEngine` at one input size ``C x H x W`` (module docstring)."""

    name = "torch"

    def __init__(self, model: SceneEngine, height: int, width: int) -> None:
        cfg = model.config
        self.model, self.net, self.device = model, model.net, model.device
        self.height, self.width = int(height), int(width)
        h, w = cfg.spike_shape(self.height, self.width)
        self.spike_shape = (int(cfg.n_readout), int(h), int(w))
        self.in_channels = int(cfg.in_channels)
        self.n_inputs = self.in_channels * self.height * self.width
        self.n_readout = int(cfg.n_readout) * int(h) * int(w)
        self.tau_d = int(cfg.tau_d)
        self.image_shape = (self.height, self.width)
        self._fresh: SceneState | None = None
        # on the CPU one stream per decoder call (exact and as fast); on a GPU the batch at once
        self.decode_batch = 1 if self.device == "cpu" else 1 << 30

    def fresh_batch(self) -> SceneState:
        """The all-zero batch-1 state (made once per engine; states are never written in place)."""
        if self._fresh is None:
            with torch.inference_mode():
                self._fresh = self.net.init_state(
                    1, self.height, self.width, self.device, spike_dtype=torch.uint8
                )
        return self._fresh

    def init_state(self) -> State:
        return _Row(self.fresh_batch(), 0)

    def order_key(self, state: State) -> Any:
        return (id(state.batch), state.i)

    def stack(self, states: list[State]) -> State:
        """Rows of batched states, gathered like :meth:`service.engines.TorchEngine.stack`."""
        from model.scene import map_state, stack_states

        parts = []
        for batch, rows in _group_rows(states):
            if rows == list(range(batch.window.shape[0])):
                parts.append(batch)
            else:
                idx = torch.tensor(rows, dtype=torch.long, device=self.device)
                parts.append(map_state(batch, functools.partial(torch.index_select, dim=0, index=idx)))
        return parts[0] if len(parts) == 1 else stack_states(parts)

    def unstack(self, state: State, n: int) -> list[State]:
        return [_Row(state, i) for i in range(n)]

    def step(self, x: np.ndarray, state: State, uniforms: np.ndarray) -> tuple[np.ndarray, State]:
        b = x.shape[0]
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            ut = torch.from_numpy(np.ascontiguousarray(uniforms, dtype=np.float32)).to(self.device)
            xt = xt.view(b, self.in_channels, self.height, self.width)
            y, _, nxt = self.net.step_detailed(
                self.net.prepare(xt), state, ut.view(b, *self.spike_shape), self.model.lag_weight
            )
            return y.to("cpu", torch.uint8).reshape(b, -1).numpy(), nxt

    def decode(self, windows: np.ndarray) -> np.ndarray:
        """``windows [B, tau_d, K*h*w]`` (0/1, any dtype) -> images ``[B, H, W]`` float32 in [0, 1]."""
        b = windows.shape[0]
        with torch.inference_mode():
            wt = torch.from_numpy(np.ascontiguousarray(windows)).to(self.device)
            wt = wt.view(b, self.tau_d, *self.spike_shape)
            return self._decode(wt)

    def decode_state(self, state: SceneState) -> np.ndarray:
        """The images of a batched state's windows ``[B, H, W]`` (what :meth:`decode` gives for
        the same spikes kept in a ring buffer)."""
        with torch.inference_mode():
            return self._decode(state.window)

    def _decode(self, wt: torch.Tensor) -> np.ndarray:
        outs = [
            self.net.decode(wt[a : a + self.decode_batch], self.height, self.width)
            for a in range(0, wt.shape[0], self.decode_batch)
        ]
        img = outs[0] if len(outs) == 1 else torch.cat(outs)
        return img.float().clamp_(0.0, 1.0).cpu().numpy()

    def warmup(self, batches: tuple[int, ...] = (1, 2)) -> None:
        for b in batches:
            state = self.stack([self.init_state()] * b)
            x = np.zeros((b, self.n_inputs), np.float32)
            x[:, :: max(1, self.n_inputs // 40)] = 1.0
            _, state = self.step(x, state, np.full((b, self.n_readout), 0.5, np.float32))
            self.decode(np.zeros((b, self.tau_d, self.n_readout), np.uint8))

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": self.device,
            "input": [self.in_channels, self.height, self.width],
        }


class SceneOnnxEngine(SceneEngine):
    """A :class:`SceneEngine` whose steps and decodes run in onnxruntime (``VDIB_ENGINE=onnx``):
    the two graphs of :func:`model.scene_onnx.export_scene_onnx` (dynamic batch, height and
    width), exported to a temporary directory at load time. The torch model stays for
    ``timestamps`` (:func:`model.scene.reconstruct_events`)."""

    name = "onnx"

    def __init__(self, net: SceneNaturalizer, device: str = "auto", threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
            raise EngineError(f"onnxruntime is not installed: {exc}") from exc
        from model.scene_onnx import SceneOnnxEngine as Runner
        from model.scene_onnx import export_scene_onnx

        super().__init__(net, "cpu")
        want_cuda = device in ("auto", "cuda") or device.startswith("cuda")
        use_cuda = want_cuda and "CUDAExecutionProvider" in ort.get_available_providers()
        if device.startswith("cuda") and not use_cuda:
            raise EngineError("device 'cuda' asked for but onnxruntime has no CUDAExecutionProvider")
        self._tmp = tempfile.TemporaryDirectory(prefix="vdib-scene-onnx-")
        export_scene_onnx(self.net, self._tmp.name)
        self.runner = Runner(self._tmp.name, device="cuda" if use_cuda else "cpu", threads=threads)
        self.onnx_device = "cuda" if use_cuda else "cpu"

    def _sized_engine(self, height: int, width: int) -> SizedSceneEngine:
        return SizedSceneOnnxEngine(self, height, width)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": self.onnx_device,
            "providers": list(self.runner.step_session.get_providers()),
        }


class SizedSceneOnnxEngine(SizedSceneEngine):
    """:class:`SizedSceneEngine` on onnxruntime: states are lists of float32 arrays (the
    runner's ``state_names`` order, the window last), rows gathered with numpy."""

    name = "onnx"

    def __init__(self, model: SceneOnnxEngine, height: int, width: int) -> None:
        super().__init__(model, height, width)
        self.runner = model.runner
        self.device = model.onnx_device
        self.decode_batch = 1 if self.device == "cpu" else 1 << 30
        self._fresh_list: list[np.ndarray] | None = None

    def fresh_batch(self) -> Any:
        if self._fresh_list is None:
            self._fresh_list = self.runner.init_state(1, self.height, self.width)
        return self._fresh_list

    def stack(self, states: list[State]) -> State:
        parts = []
        for batch, rows in _group_rows(states):
            n = batch[0].shape[0]
            if rows == list(range(n)):
                parts.append(batch)
            else:
                idx = np.asarray(rows)
                parts.append([a[idx] for a in batch])
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(arrays, axis=0) for arrays in zip(*parts, strict=True)]

    def step(self, x: np.ndarray, state: State, uniforms: np.ndarray) -> tuple[np.ndarray, State]:
        b = x.shape[0]
        xs = np.ascontiguousarray(x, dtype=np.float32).reshape(b, self.in_channels, self.height, self.width)
        un = np.ascontiguousarray(uniforms, dtype=np.float32).reshape(b, *self.spike_shape)
        y, _, nxt = self.runner.step(xs, state, un)
        return np.asarray(y).astype(np.uint8).reshape(b, -1), nxt

    def decode(self, windows: np.ndarray) -> np.ndarray:
        b = windows.shape[0]
        return self._decode_np(
            np.asarray(windows, dtype=np.float32).reshape(b, self.tau_d, *self.spike_shape)
        )

    def decode_state(self, state: Any) -> np.ndarray:
        return self._decode_np(state[-1])

    def _decode_np(self, w: np.ndarray) -> np.ndarray:
        outs = [
            self.runner.decode(w[a : a + self.decode_batch], self.height, self.width)
            for a in range(0, w.shape[0], self.decode_batch)
        ]
        img = outs[0] if len(outs) == 1 else np.concatenate(outs)
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)


@dataclass
class SceneEntry(ModelEntry):
    """A scene checkpoint in the registry: any sensor, at its full resolution (module docstring)."""

    family = SCENE_FAMILY
    max_pixels: int = 1280 * 720  # settings.max_sensor_pixels
    max_live_pixels: int = 1 << 23  # settings.max_scene_pixels

    @property
    def scenes(self) -> SceneEngine:
        return cast(SceneEngine, self.engine)

    def engine_for(self, input_shape: tuple[int, ...]) -> Engine:
        return self.scenes.for_input(input_shape)

    def warmup_sensor(self) -> tuple[int, int]:
        return WARMUP_SENSOR

    def describe(self) -> dict[str, Any]:
        cfg = self.scenes.config
        return {
            "name": self.name,
            "family": self.family,
            "input_shape": [int(cfg.in_channels), None, None],  # any sensor: [C, H, W] of the stream
            "image_shape": None,  # the sensor's (or the ROI's) H x W
            "spike_maps": {"n_readout": int(cfg.n_readout), "stride": int(cfg.stride)},
            "n_readout": int(cfg.n_readout),
            "tau_d": int(cfg.tau_d),
            "dt_us": self.dt_us,
            "polarity": self.polarity,
            "mode": self.mode,
            "preprocessing": {"roi": "full", "pool": 1, "max_sensor_pixels": self.max_pixels},
            "metrics": self.meta.get("metrics", {}),
            **self.engine.describe(),
        }

    def resolve_roi(self, sensor_w: int, sensor_h: int, roi: Any = None) -> tuple[Any, int]:
        """The whole sensor (``roi`` absent, ``default``, ``full`` or ``centre``: the model's
        input is the sensor), or the region ``x, y, w, h`` inside it; never pooled. A region (or
        sensor) over ``max_pixels`` pixels is refused (:class:`RoiError`)."""
        from events import ROI

        if not (0 < sensor_w <= MAX_COORD and 0 < sensor_h <= MAX_COORD):
            raise RoiError(f"sensor size must be 1 .. {MAX_COORD} per side, got {sensor_w}x{sensor_h}")
        if roi is None or roi in ("default", "full", "centre", "center"):
            region = ROI.full(sensor_w, sensor_h)
        elif isinstance(roi, str):
            raise RoiError(f"roi must be 'x,y,w,h', 'full' or 'default', got {roi!r}")
        else:
            try:
                x, y, rw, rh = (int(v) for v in roi)
            except (TypeError, ValueError) as exc:
                raise RoiError(f"roi must be four integers x,y,w,h, got {roi!r}") from exc
            if x < 0 or y < 0 or rw <= 0 or rh <= 0 or x + rw > sensor_w or y + rh > sensor_h:
                raise RoiError(
                    f"roi {(x, y, rw, rh)} must lie inside the {sensor_w}x{sensor_h} sensor "
                    "with a positive size"
                )
            region = ROI(x, y, rw, rh)
        if region.width * region.height > self.max_pixels:
            raise RoiError(
                f"{region.width}x{region.height} = {region.width * region.height} pixels is over the "
                f"limit of {self.max_pixels} (max_sensor_pixels) for the scene model; send a region "
                "(roi=x,y,w,h)"
            )
        return region, 1

    def admit(self, session: Any) -> None:
        """Count a new stream's sensor pixels against ``max_live_pixels`` until the session is
        gone (:class:`CapacityError` when they do not fit)."""
        _, h, w = session.spec.shape
        px = int(h) * int(w)
        self.scenes.admit(px, self.max_live_pixels)
        weakref.finalize(session, self.scenes.leave, px)


def load_scene_entry(
    path: Path, settings: Settings, net: SceneNaturalizer, meta: dict[str, Any]
) -> SceneEntry:
    """The registry entry of a loaded scene checkpoint, on the ``settings.engine`` engine."""
    cfg = net.config
    if not 0 < int(cfg.dt_us) <= 10_000_000:
        raise ValueError(f"dt_us {cfg.dt_us} must be in 1 .. 10000000")
    engine = (
        SceneOnnxEngine(net, settings.device)
        if settings.engine == "onnx"
        else SceneEngine(net, settings.device)
    )
    if settings.warmup:
        engine.warmup()
    return SceneEntry(
        name=path.name,
        path=path,
        engine=engine,
        meta=meta,
        input_shape=(int(cfg.in_channels), 0, 0),  # any H x W
        dt_us=int(cfg.dt_us),
        polarity=str(cfg.polarity),
        mode=str(cfg.mode),
        preprocessing={},
        max_pixels=int(settings.max_sensor_pixels),
        max_live_pixels=int(settings.max_scene_pixels),
    )


# ---------------------------------------------------------------------------- uploads
class _CheckedNet:
    """The model as :func:`model.scene.reconstruct_events` uses it, calling ``check`` before
    every step (an upload's CPU budget and cancellation hold inside that loop too)."""

    def __init__(self, net: SceneNaturalizer, check: Any) -> None:
        self._net, self._check = net, check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._net, name)

    def step_detailed(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._net.step_detailed(*args, **kwargs)


def _frame_budget(n_frames: int, pixels: int, opts: RunOptions) -> None:
    if opts.max_frames is not None and n_frames > opts.max_frames:
        raise EventLimitError(
            f"about {n_frames} frames, over the limit of {opts.max_frames}: use a larger emit, "
            "emit=last or fewer timestamps"
        )
    if opts.max_output_pixels is not None and n_frames * pixels > opts.max_output_pixels:
        raise EventLimitError(
            f"about {n_frames} frames of {pixels} pixels, over the limit of {opts.max_output_pixels} output "
            "pixels (max_output_pixels): use a larger emit, emit=last, timestamps or a smaller roi"
        )


def run_scene(entry: SceneEntry, events: np.ndarray, opts: RunOptions) -> RunResult:
    """One recording (sorted by ``t``) through a scene model, as one live stream with the same
    seed would give it (bins of :class:`events.Binner` from the first event, gaps longer than
    ``max_gap_us`` reset the state, a frame after every ``emit``-th bin and the last); with
    ``opts.timestamps`` the images at exactly those times instead (:func:`_at_times`)."""
    from events import Binner, BinSpec
    from model.batching import stream_uniforms

    from .pipeline import RunResult

    roi = opts.roi
    eng = cast(SizedSceneEngine, entry.engine_for((entry.input_shape[0], roi.height, roi.width)))
    if opts.timestamps is not None:
        return _at_times(entry, eng, events, opts)
    n_ev = len(events)
    if n_ev:  # before any binning or stepping
        n_bins = (int(events["t"][-1]) - int(events["t"][0])) // opts.dt_us + 1
        _frame_budget(1 if opts.emit is None else n_bins // opts.emit + 1, roi.width * roi.height, opts)
    spec = BinSpec(roi, opts.dt_us, entry.polarity, entry.mode, 1)
    max_gap = opts.max_gap_us if opts.max_gap_us is None else max(opts.max_gap_us, opts.dt_us)
    binner = Binner(spec, t0=None, max_gap_us=max_gap)
    gen = torch.Generator().manual_seed(opts.seed)
    check = opts.check or (lambda: None)
    state: Any = eng.fresh_batch()
    zero = np.zeros((1, eng.n_inputs), np.float32)
    images: list[np.ndarray] = []
    frame_bins: list[int] = []
    frame_end: list[int] = []
    bin_end: list[np.ndarray] = []
    inputs: list[np.ndarray] = []
    acc: np.ndarray | None = None
    steps = spikes = 0
    t_bin = t_enc = t_dec = 0.0
    for a in [*range(0, n_ev, 1 << 20), -1]:  # -1: the flush
        check()
        t = time.perf_counter()
        segs = binner.push(events[a : a + (1 << 20)]) if a >= 0 else binner.flush()
        t_bin += time.perf_counter() - t
        for seg in segs:
            if seg.reset:
                state = eng.fresh_batch()
            k = seg.n_bins
            ends = np.asarray(seg.bin_end_us, np.int64)
            if seg.empty:
                ends = int(ends[0]) + np.arange(k, dtype=np.int64) * opts.dt_us
            bin_end.append(ends)
            for j in range(k):
                check()
                t = time.perf_counter()
                x = zero if seg.empty else seg.frames[j].reshape(1, -1)
                y, state = eng.step(x, state, stream_uniforms(gen, 1, eng.n_readout))
                t_enc += time.perf_counter() - t
                steps += 1
                spikes += int(y.sum())
                if opts.inputs:
                    f = np.zeros(spec.shape, bool) if seg.empty else seg.frames[j].astype(bool)
                    acc = f if acc is None else acc | f
                due = opts.emit is not None and steps % opts.emit == 0
                if due:
                    t = time.perf_counter()
                    images.append(eng.decode_state(state)[0])
                    t_dec += time.perf_counter() - t
                    frame_bins.append(steps - 1)
                    frame_end.append(int(ends[j]))
                    if opts.inputs and acc is not None:
                        inputs.append(acc)
                        acc = None
    if steps and (not frame_bins or frame_bins[-1] != steps - 1):  # the last bin's frame
        t = time.perf_counter()
        images.append(eng.decode_state(state)[0])
        t_dec += time.perf_counter() - t
        frame_bins.append(steps - 1)
        frame_end.append(int(bin_end[-1][-1]))
        if opts.inputs:
            inputs.append(acc if acc is not None else np.zeros(spec.shape, bool))
    h, w = eng.image_shape
    return RunResult(
        images=np.stack(images) if images else np.zeros((0, h, w), np.float32),
        frame_bins=np.asarray(frame_bins, np.int64),
        frame_end_us=np.asarray(frame_end, np.int64),
        spikes=None,  # scene spike maps are not returned (see docs/service.md)
        bin_end_us=np.concatenate(bin_end) if bin_end else np.zeros(0, np.int64),
        inputs=inputs,
        stats={
            "events": int(n_ev),
            "bins": int(steps),
            "frames": len(images),
            "gaps": int(binner.gaps),
            "late_events": int(binner.late_events),
            "spike_rate": spikes / max(1, steps * eng.n_readout),
            "seconds": {"bin": t_bin, "encode": t_enc, "decode": t_dec},
        },
    )


def _at_times(entry: SceneEntry, eng: SizedSceneEngine, events: np.ndarray, opts: RunOptions) -> RunResult:
    """The images at ``opts.timestamps`` (µs on the recording's clock) by
    :func:`model.scene.reconstruct_events` with a generator seeded with ``opts.seed``: each
    image has seen exactly the events before its time (bins from the first event; a partial
    bin is stepped on a copy of the state). Returned in the order asked; ``frame_end_us`` holds
    the times, ``frame_bins`` the bin each time falls in (-1 before the first event)."""
    from model.scene import reconstruct_events

    from .pipeline import RunResult

    roi = opts.roi
    times = np.asarray(opts.timestamps, dtype=np.int64)
    _frame_budget(len(times), roi.width * roi.height, opts)
    ev = events
    if (
        roi.x or roi.y
    ):  # the region's events in its own coordinates (events past its far sides are not binned)
        ev = ev[(ev["x"] >= roi.x) & (ev["y"] >= roi.y)].copy()
        ev["x"] -= roi.x
        ev["y"] -= roi.y
    dt = opts.dt_us
    t0 = int(events["t"][0]) if len(events) else 0
    steps = int(max(0, (int(times.max()) - t0) // dt + 1)) if len(times) else 0
    if opts.max_bins is not None and steps > opts.max_bins:
        raise EventLimitError(
            f"the latest timestamp is {steps} bins of {dt} us after the first event, over the "
            f"limit of {opts.max_bins} bins (max_upload_bins)"
        )
    t = time.perf_counter()
    net = cast("SceneNaturalizer", _CheckedNet(eng.net, opts.check or (lambda: None)))
    images, _ = reconstruct_events(
        net, ev, roi.width, roi.height, times, generator=torch.Generator().manual_seed(opts.seed), t0_us=t0
    )
    seconds = time.perf_counter() - t
    bins = np.where(times < t0, -1, (times - t0) // dt).astype(np.int64)
    return RunResult(
        images=np.clip(images, 0.0, 1.0).astype(np.float32),
        frame_bins=bins,
        frame_end_us=times,
        spikes=None,
        bin_end_us=t0 + dt * np.arange(1, steps + 1, dtype=np.int64),
        inputs=[],
        stats={
            "events": int(len(events)),
            "bins": steps,
            "frames": len(times),
            "gaps": 0,
            "late_events": 0,
            "spike_rate": None,
            "timestamps": len(times),
            "seconds": {"reconstruct": seconds},
        },
    )
