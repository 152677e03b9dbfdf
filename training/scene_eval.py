"""General-scene evaluation: EVREAL's standard protocol on real DAVIS frames and simulated clips.

The protocol (``../shared/SCENES-REFERENCE.md``, EVREAL's ``std`` config):

* every method reconstructs from the test sequence's first event on (cold start, no warm-up);
* for each ground-truth frame inside the event span the method is asked for the reconstruction at
  the frame's timestamp; a reconstruction counts only when its own time lies within 1 ms of the
  frame's (:func:`match_within_tolerance`; methods that report their output times, such as
  between-frames voxel methods whose output time is the last event of the window, can miss);
* reconstructions are clipped to [0, 1], 8-bit ground truth is divided by 255;
* ``skimage.metrics.mean_squared_error`` and ``structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1.0)``, with no histogram processing ("raw"),
  and again after ``skimage.exposure.match_histograms(recon, gt)`` per frame ("hist"): an
  events-only method cannot know absolute brightness, and the matched score says how good the
  structure is. Matching a constant image makes it near-white, so "hist" punishes the mid-gray floor.
* LPIPS is left out: it needs pretrained AlexNet/VGG weights, which cannot be had offline here.

A *method* is any object with ``name``, ``reconstruct(events, width, height, timestamps_us) ->
float32 [K, H, W]`` in [0, 1] and ``info() -> dict`` (params, MACs per frame, ...). Events are in
:data:`events.EVENT_DTYPE` (``t`` int64 µs, ``x``/``y`` uint16, ``p`` uint8). A method may set
``output_times_us`` (int64 [K]) after ``reconstruct`` to say when each output really is.

scikit-image and dv-processing are dev/eval-only dependencies: imported inside functions, never
by the service.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from events import EVENT_DTYPE

#: EVREAL's ``ts_tol_ms``: a reconstruction counts for a GT frame only within this distance.
TOLERANCE_US = 1000
#: The SSIM settings of the protocol (skimage keyword arguments).
SSIM_KWARGS: dict[str, Any] = {
    "gaussian_weights": True,
    "sigma": 1.5,
    "use_sample_covariance": False,
    "data_range": 1.0,
}
REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` next to the repository (``VDIB_SHARED_DATA`` overrides)."""
    env = os.environ.get("VDIB_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


class SceneEvalError(ValueError):
    """A test set or a method's output that the protocol cannot score."""


class Method(Protocol):
    name: str

    def reconstruct(
        self, events: np.ndarray, width: int, height: int, timestamps_us: np.ndarray
    ) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...


@dataclass
class TestSequence:
    """Events plus ground-truth frames (float32 [N, H, W] in [0, 1]) at ``frame_times_us``."""

    name: str
    events: np.ndarray
    width: int
    height: int
    frames: np.ndarray
    frame_times_us: np.ndarray
    source: str = ""
    notes: str = ""
    #: frames of a set that lie outside the event span and were dropped
    dropped_frames: int = 0

    @property
    def span_us(self) -> tuple[int, int]:
        return int(self.events["t"][0]), int(self.events["t"][-1])


@dataclass
class TestSet:
    """One named test set: one or more sequences, scored frame by frame and averaged over all frames."""

    name: str
    sequences: list[TestSequence]
    description: str = ""


# ---------------------------------------------------------------------------------------------
# test sets
# ---------------------------------------------------------------------------------------------


def in_span(
    events: np.ndarray, frames: np.ndarray, times_us: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep the GT frames whose timestamps lie inside [first event, last event]."""
    if len(events) == 0:
        raise SceneEvalError("a test sequence without events cannot be scored")
    t0, t1 = int(events["t"][0]), int(events["t"][-1])
    keep = (times_us >= t0) & (times_us <= t1)
    return frames[keep], times_us[keep], int((~keep).sum())


def _check_sequence(seq: TestSequence) -> TestSequence:
    if seq.events.dtype != EVENT_DTYPE:
        raise SceneEvalError(f"{seq.name}: events must have EVENT_DTYPE, got {seq.events.dtype}")
    if seq.frames.ndim != 3 or seq.frames.shape[1:] != (seq.height, seq.width):
        raise SceneEvalError(f"{seq.name}: frames {seq.frames.shape} do not match {seq.height}x{seq.width}")
    if len(seq.frames) != len(seq.frame_times_us):
        raise SceneEvalError(f"{seq.name}: {len(seq.frames)} frames but {len(seq.frame_times_us)} timestamps")
    if np.any(np.diff(seq.events["t"]) < 0):
        raise SceneEvalError(f"{seq.name}: events are not sorted by time")
    return seq


def load_ecd_slider_depth(root: Path | None = None) -> TestSequence:
    """The ECD ``slider_depth`` excerpt (DAVIS240C): 50,000 events, GT frames 1-4 inside the span."""
    from PIL import Image

    import events as ev

    d = Path(root) if root is not None else shared_data_dir() / "events-gt" / "ecd_slider_depth"
    rec = ev.read(d / "events_chunk.txt", format="csv")
    frames: list[np.ndarray] = []
    times: list[int] = []
    for line in (d / "images.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        times.append(round(float(parts[0]) * 1e6))
        with Image.open(d / parts[1]) as im:
            frames.append(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)
    stack = np.stack(frames)
    height, width = stack.shape[1:]
    ts = np.asarray(times, dtype=np.int64)
    kept, kept_t, dropped = in_span(rec.events, stack, ts)
    return _check_sequence(
        TestSequence(
            name="ecd_slider_depth",
            events=rec.events,
            width=int(width),
            height=int(height),
            frames=kept,
            frame_times_us=kept_t,
            source=str(d),
            dropped_frames=dropped,
            notes="ECD slider_depth, first 50,000 events (IJRR 2017, CC BY-NC-SA 3.0)",
        )
    )


def load_davis346(path: Path | None = None) -> TestSequence:
    """The DAVIS346 evlib clip: events via ``events.read``, APS frames via dv-processing (eval-only)."""
    import dv_processing as dv

    import events as ev

    p = (
        Path(path)
        if path is not None
        else shared_data_dir() / "events" / "aedat4" / "evlib_davis346_trimmed.aedat4"
    )
    rec = ev.read(p)
    cam = dv.io.MonoCameraRecording(str(p))
    if not cam.isFrameStreamAvailable():
        raise SceneEvalError(f"{p}: no frame stream")
    frames: list[np.ndarray] = []
    times: list[int] = []
    while True:
        f = cam.getNextFrame()
        if f is None:
            break
        img = np.asarray(f.image)
        if img.ndim == 3:
            img = img[..., 0]
        frames.append(img.astype(np.float32) / 255.0)
        times.append(int(f.timestamp))
    if not frames:
        raise SceneEvalError(f"{p}: the frame stream holds no frames")
    stack = np.stack(frames)
    ts = np.asarray(times, dtype=np.int64)
    kept, kept_t, dropped = in_span(rec.events, stack, ts)
    return _check_sequence(
        TestSequence(
            name="davis346_evlib",
            events=rec.events,
            width=rec.width,
            height=rec.height,
            frames=kept,
            frame_times_us=kept_t,
            source=str(p),
            dropped_frames=dropped,
            notes="DAVIS346 evlib clip, APS frames (dv-processing frame timestamps, event clock)",
        )
    )


def load_simulated(n: int = 8, seed: int = 0) -> TestSet | None:
    """``training.scene_data.test_clips(n, seed)`` as a test set, or None while it does not exist."""
    try:
        from training import scene_data  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - absent or half-written by its owner: no simulated set then
        return None
    fn = getattr(scene_data, "test_clips", None)
    if fn is None:
        return None
    seqs = []
    for i, clip in enumerate(fn(n, seed)):
        frames = np.asarray(clip.frames, dtype=np.float32)
        times = np.asarray(clip.frame_times_us, dtype=np.int64)
        evs = np.asarray(clip.events)
        if len(evs) == 0:
            continue
        kept, kept_t, dropped = in_span(evs, frames, times)
        if len(kept) == 0:
            continue
        seqs.append(
            _check_sequence(
                TestSequence(
                    name=f"sim_{i:02d}",
                    events=evs,
                    width=int(clip.width),
                    height=int(clip.height),
                    frames=kept,
                    frame_times_us=kept_t,
                    source=f"training.scene_data.test_clips({n}, {seed})[{i}]",
                    dropped_frames=dropped,
                )
            )
        )
    if not seqs:
        return None
    return TestSet("simulated", seqs, f"training.scene_data.test_clips(n={n}, seed={seed}): held-out images")


def default_test_sets(
    names: Iterable[str] = ("ecd", "davis346", "simulated"),
    *,
    sim_n: int = 8,
    sim_seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[TestSet]:
    """The test sets that are available here; a missing one is skipped with a message to ``log``."""
    out: list[TestSet] = []
    for name in names:
        try:
            if name == "ecd":
                out.append(
                    TestSet(
                        "ecd_slider_depth",
                        [load_ecd_slider_depth()],
                        "ECD slider_depth excerpt, DAVIS240C, GT frames in the event span",
                    )
                )
            elif name == "davis346":
                out.append(
                    TestSet(
                        "davis346_evlib",
                        [load_davis346()],
                        "DAVIS346 evlib clip with its APS frames in the event span",
                    )
                )
            elif name == "simulated":
                s = load_simulated(sim_n, sim_seed)
                if s is None:
                    if log:
                        log("simulated test set skipped: training.scene_data.test_clips is not there yet")
                    continue
                out.append(s)
            else:
                raise SceneEvalError(f"unknown test set {name!r} (ecd, davis346, simulated)")
        except (FileNotFoundError, ImportError) as exc:
            if log:
                log(f"test set {name} skipped: {exc}")
    return out


# ---------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------


def match_within_tolerance(
    recon_times_us: np.ndarray, gt_times_us: np.ndarray, tol_us: int = TOLERANCE_US
) -> np.ndarray:
    """For each GT time, the index of the nearest reconstruction within ``tol_us``, else -1."""
    r = np.asarray(recon_times_us, dtype=np.int64)
    g = np.asarray(gt_times_us, dtype=np.int64)
    out = np.full(len(g), -1, dtype=np.int64)
    if len(r) == 0:
        return out
    order = np.argsort(r, kind="stable")
    rs = r[order]
    pos = np.searchsorted(rs, g)
    for i, (gt, j) in enumerate(zip(g, pos, strict=True)):
        best, best_d = -1, tol_us + 1
        for k in (j - 1, j):
            if 0 <= k < len(rs):
                d = abs(int(rs[k]) - int(gt))
                if d < best_d:
                    best, best_d = int(order[k]), d
        if best_d <= tol_us:
            out[i] = best
    return out


def score_frame(recon: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Raw and histogram-matched MSE and SSIM of one reconstruction (clipped to [0, 1]) against GT."""
    from skimage.exposure import match_histograms
    from skimage.metrics import mean_squared_error, structural_similarity

    r = np.clip(np.nan_to_num(np.asarray(recon, dtype=np.float64), nan=0.0), 0.0, 1.0)
    g = np.asarray(gt, dtype=np.float64)
    if r.shape != g.shape:
        raise SceneEvalError(f"reconstruction {r.shape} and GT {g.shape} differ in shape")
    h = np.clip(match_histograms(r, g), 0.0, 1.0)
    return {
        "mse_raw": float(mean_squared_error(g, r)),
        "ssim_raw": float(structural_similarity(g, r, **SSIM_KWARGS)),
        "mse_hist": float(mean_squared_error(g, h)),
        "ssim_hist": float(structural_similarity(g, h, **SSIM_KWARGS)),
    }


@dataclass
class SequenceResult:
    sequence: str
    frames_scored: int
    frames_missed: int
    per_frame: list[dict[str, float]]
    seconds: float
    recon: np.ndarray | None = field(default=None, repr=False)
    #: cost counted while the method ran (spikes, SynOps, MACs), when the method reports it
    counters: dict[str, float] = field(default_factory=dict)


def evaluate_on_sequence(method: Method, seq: TestSequence, *, keep_recon: bool = True) -> SequenceResult:
    """Run ``method`` from the first event, score every in-span GT frame it hits within 1 ms."""
    times = np.asarray(seq.frame_times_us, dtype=np.int64)
    if hasattr(method, "output_times_us"):
        method.output_times_us = None  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    recon = np.asarray(method.reconstruct(seq.events, seq.width, seq.height, times))
    seconds = time.perf_counter() - t0
    if recon.shape != (len(times), seq.height, seq.width):
        raise SceneEvalError(
            f"{method.name} returned {recon.shape} for {len(times)} frames of {seq.height}x{seq.width}"
        )
    out_times = getattr(method, "output_times_us", None)
    out_times = times if out_times is None else np.asarray(out_times, dtype=np.int64)
    idx = match_within_tolerance(out_times, times)
    per_frame = []
    for i, j in enumerate(idx):
        if j < 0:
            continue
        s = score_frame(recon[j], seq.frames[i])
        s["t_us"] = float(times[i])
        per_frame.append(s)
    counters = dict(getattr(method, "last_counters", None) or {})
    return SequenceResult(
        seq.name,
        len(per_frame),
        int((idx < 0).sum()),
        per_frame,
        seconds,
        recon.astype(np.float32) if keep_recon else None,
        counters,
    )


def summarize(results: Sequence[SequenceResult]) -> dict[str, Any]:
    """Mean over all scored frames of a test set (EVREAL averages per frame, weighted by count)."""
    rows = [f for r in results for f in r.per_frame]
    out: dict[str, Any] = {"frames": len(rows), "missed": sum(r.frames_missed for r in results)}
    for k in ("mse_raw", "ssim_raw", "mse_hist", "ssim_hist"):
        out[k] = float(np.mean([f[k] for f in rows])) if rows else float("nan")
    out["seconds"] = float(sum(r.seconds for r in results))
    return out


# ---------------------------------------------------------------------------------------------
# cost: parameters, MACs, spikes and synaptic operations of any torch module
# ---------------------------------------------------------------------------------------------


def _is_binary(t: Any) -> bool:
    import torch

    if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.is_complex():
        return False
    if t.dtype == torch.bool:
        return True
    return bool(((t == 0) | (t == 1)).all())


def _conv_dispatch_mode(counter: CostCounter) -> Any:
    """A TorchDispatchMode that sees every convolution and matrix product (modules or functional)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    # op -> index of its ``groups`` argument (conv2d reaches a python mode undecomposed under
    # inference_mode, convolution otherwise; a mode never sees both for one call)
    convs = {
        aten.convolution.default: 8,
        aten.conv1d.default: 6,
        aten.conv2d.default: 6,
        aten.conv3d.default: 6,
    }

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            try:
                conv_groups = convs.get(func)
                if conv_groups is not None and not (func is aten.convolution.default and args[6]):
                    x, w = args[0], args[1]
                    groups = int(args[conv_groups]) if len(args) > conv_groups else 1
                    fan_out = w.shape[0] // groups * math.prod(w.shape[2:])
                    dense = float(out.numel()) * math.prod(w.shape[1:])
                    counter._record(x, w, fan_out, dense)
                elif func is aten.linear.default:
                    x, w = args[0], args[1]
                    counter._record(x, w, int(w.shape[0]), float(out.numel()) * w.shape[1])
                elif func in (aten.mm.default, aten.addmm.default):
                    a, b = (args[0], args[1]) if func is aten.mm.default else (args[1], args[2])
                    counter._record(a, b, int(b.shape[1]), float(a.shape[0]) * a.shape[1] * b.shape[1])
            except (IndexError, AttributeError, TypeError):  # an op signature this counter does not know
                pass
            return out

    return _Mode()


class CostCounter:
    """Counts MACs, spikes and synaptic operations of everything torch runs inside ``with``.

    Works on any module and on functional code: convolutions and matrix products are seen at
    the dispatcher (``aten.convolution``, ``aten.mm``/``addmm``), so ``F.conv2d`` with derived
    weights counts like an ``nn.Conv2d``.

    * MACs: ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2: convolutions and matrix
      products, not element-wise ops) minus the dense MACs of the spike-driven products below.
    * SynOps: a product whose input is binary (0/1, not all zero) is spike-driven when ``spiking``
      is True: each nonzero input costs ``out_channels / groups * prod(kernel)`` accumulates
      (``out_features`` for a matrix product); borders are ignored (an upper bound at the edges).
      ``spiking=False`` counts MACs only (for ANNs, whose inputs can be all-zero at a cold start).
    * ``event_driven_macs``: for analog inputs that are mostly zero (density < 0.5, e.g. event
      counts), ``nnz * fan_out``: what an event-driven implementation would spend (MACs, not ACs);
      reported beside the dense count, never subtracted.
    * spikes: nonzeros of the outputs of ``spike_modules`` when given, plus whatever
      :meth:`add_spikes` is told; otherwise nonzeros of the distinct binary tensors read by
      spike-driven products (a tensor read by two layers counts once as spikes, twice as SynOps).
    * ``per_weight``: the same numbers per weight tensor (named after the module parameter when it
      is one, else by shape), for a per-layer breakdown.

    Usage::

        with CostCounter(net) as c:
            run(net)
        c.totals()  # {"macs": ..., "synops": ..., "spikes": ..., ...}
    """

    def __init__(
        self,
        module: Any,
        *,
        spiking: bool = True,
        spike_modules: Iterable[Any] = (),
        explicit_spikes: bool = False,
    ):
        self.module = module
        self.spiking = spiking
        self.spike_modules = list(spike_modules)
        self.synops = 0.0
        self.spikes = 0.0
        #: spikes come only from :meth:`add_spikes` (and ``spike_modules``), not from layer inputs
        self.explicit_spikes = explicit_spikes
        self.binary_dense_macs = 0.0
        self.event_driven_macs = 0.0
        self.flops = 0.0
        self.per_weight: dict[str, dict[str, float]] = {}
        self._names: dict[int, str] = {}
        self._seen: Any = None
        self._handles: list[Any] = []
        self._modes: list[Any] = []

    def add_spikes(self, n: float) -> None:
        """Spikes counted by the caller (e.g. a model's functional LIF or readout)."""
        self.explicit_spikes = True
        self.spikes += float(n)

    def _name(self, w: Any) -> str:
        name = self._names.get(w.data_ptr())
        return name if name is not None else "functional " + "x".join(str(d) for d in w.shape)

    def _record(self, x: Any, w: Any, fan_out: int, dense: float) -> None:
        import torch

        if not isinstance(x, torch.Tensor):
            return
        row = self.per_weight.setdefault(
            self._name(w),
            {"calls": 0.0, "dense_macs": 0.0, "input_nnz": 0.0, "synops": 0.0, "spike_driven_calls": 0.0},
        )
        row["calls"] += 1
        row["dense_macs"] += dense
        nnz = float((x != 0).sum().item())
        row["input_nnz"] += nnz
        if self.spiking and nnz > 0 and _is_binary(x):
            self.synops += nnz * fan_out
            self.binary_dense_macs += dense
            row["synops"] += nnz * fan_out
            row["spike_driven_calls"] += 1
            if not self.spike_modules and not self.explicit_spikes:
                # one spike map seen through views (flatten, reshape) counts once
                key = (x.untyped_storage().data_ptr(), x.storage_offset(), x.numel())
                ref = self._seen.get(key)
                if ref is None or ref() is None:  # new, or its memory was freed and reused
                    self._seen[key] = weakref.ref(x)
                    self.spikes += nnz
        elif nnz < 0.5 * x.numel():
            self.event_driven_macs += nnz * fan_out

    def _spike_hook(self, mod: Any, inputs: tuple[Any, ...], output: Any) -> None:
        import torch

        outs = output if isinstance(output, tuple | list) else (output,)
        for o in outs:
            if isinstance(o, torch.Tensor) and _is_binary(o):
                self.spikes += float((o != 0).sum().item())
                break

    def __enter__(self) -> CostCounter:
        from torch.utils.flop_counter import FlopCounterMode

        self._seen = {}
        self._names = {p.data_ptr(): n for n, p in self.module.named_parameters()}
        for m in self.spike_modules:
            self._handles.append(m.register_forward_hook(self._spike_hook))
        self._modes = [FlopCounterMode(display=False), _conv_dispatch_mode(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self.flops = float(self._modes[0].get_total_flops())
        self._modes = []
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def totals(self) -> dict[str, float]:
        macs_all = self.flops / 2.0
        return {
            "macs": max(macs_all - self.binary_dense_macs, 0.0),
            "macs_all_dense": macs_all,
            "binary_layer_dense_macs": self.binary_dense_macs,
            "event_driven_macs": self.event_driven_macs,
            "synops": self.synops,
            "spikes": self.spikes,
        }


def count_parameters(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


# ---------------------------------------------------------------------------------------------
# timing on one core
# ---------------------------------------------------------------------------------------------


def single_core() -> None:
    """One thread for torch and numba, so ms/frame is a one-core number."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    try:
        import numba

        numba.set_num_threads(1)
    except (ImportError, ValueError):  # pragma: no cover
        pass


def calibration(seconds: float = 0.5) -> dict[str, float]:
    """Same-run machine reference: single-thread fp32 GEMM rate (256^3) and the load average."""
    import torch

    single_core()
    a = torch.randn(256, 256)
    b = torch.randn(256, 256)
    for _ in range(3):
        a @ b
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    dt = time.perf_counter() - t0
    load1, load5, _ = os.getloadavg()
    return {
        "gemm_gflops_1core": 2 * 256**3 * n / dt / 1e9,
        "loadavg_1min": load1,
        "loadavg_5min": load5,
        "cpu_count": float(os.cpu_count() or 0),
    }


def time_method(method: Method, seq: TestSequence, *, repeats: int = 2) -> float:
    """Best-of-``repeats`` seconds for one full reconstruction of ``seq`` (after one warm-up run)."""
    single_core()
    times = np.asarray(seq.frame_times_us, dtype=np.int64)
    method.reconstruct(seq.events, seq.width, seq.height, times)  # warm-up (numba JIT, caches)
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        method.reconstruct(seq.events, seq.width, seq.height, times)
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------------------------
# "ours": the scene naturalizer (model/scene.py), when it exists
# ---------------------------------------------------------------------------------------------

DEFAULT_SCENE_CHECKPOINT = REPO / "checkpoints" / "scenes"


def vdib_available(checkpoint: Path | None = None) -> str | None:
    """None when the scene model can run, else why not."""
    ckpt = Path(checkpoint) if checkpoint is not None else DEFAULT_SCENE_CHECKPOINT
    try:
        import model.scene as scene  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as exc:
        return f"model.scene is not importable ({exc})"
    if not hasattr(scene, "reconstruct_events"):
        return "model.scene has no reconstruct_events"
    if not ckpt.is_dir() or not any(ckpt.glob("*.json")):
        return f"no checkpoint at {ckpt}"
    return None


class VdibScenes:
    """The VDIB scene naturalizer: spiking conv encoder + ANN decoder (``model.scene``)."""

    def __init__(
        self, checkpoint: Path | None = None, *, seed: int = 0, count_cost: bool = False, net: Any = None
    ):
        import torch

        import model
        import model.scene as scene  # type: ignore[import-not-found]

        self.checkpoint = Path(checkpoint) if checkpoint is not None else DEFAULT_SCENE_CHECKPOINT
        self._scene = scene
        if net is not None:  # an in-memory net (tests, a run in progress)
            self.net, self.meta = net, {}
            self.checkpoint = Path("<in memory>")
        else:
            loaded = model.load_checkpoint(self.checkpoint)
            self.net, self.meta = loaded if isinstance(loaded, tuple) else (loaded, {})
        self.net.eval()
        self.seed = seed
        self.name = "vdib"
        self.count_cost = count_cost
        self.last_counters: dict[str, float] | None = None
        self.output_times_us: np.ndarray | None = None
        self._torch = torch

    def _run(self, events: np.ndarray, width: int, height: int, timestamps_us: np.ndarray) -> Any:
        gen = self._torch.Generator().manual_seed(self.seed)
        return self._scene.reconstruct_events(self.net, events, width, height, timestamps_us, generator=gen)

    def reconstruct(
        self, events: np.ndarray, width: int, height: int, timestamps_us: np.ndarray
    ) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            if not self.count_cost:
                out = self._run(events, width, height, timestamps_us)
            else:
                # spikes emitted per bin: every hidden LIF layer's and the stochastic readout's
                counter = CostCounter(self.net, explicit_spikes=True)
                extra = {"spikes_hidden": 0.0, "spikes_readout": 0.0, "steps": 0.0}
                orig = self.net.step_detailed

                def counted(*args: Any, **kwargs: Any) -> Any:
                    y, u, st = orig(*args, **kwargs)
                    hid = sum(float((layer.s != 0).sum()) for layer in getattr(st, "hidden", ()))
                    ro = float((y != 0).sum())
                    extra["spikes_hidden"] += hid
                    extra["spikes_readout"] += ro
                    extra["steps"] += 1
                    counter.add_spikes(hid + ro)
                    return y, u, st

                self.net.step_detailed = counted
                try:
                    with counter:
                        out = self._run(events, width, height, timestamps_us)
                finally:
                    del self.net.step_detailed
                self.last_counters = {**counter.totals(), **extra}
        if isinstance(out, tuple):
            out, times = out
            self.output_times_us = np.asarray(times, dtype=np.int64)
        return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)

    def info(self) -> dict[str, Any]:
        meta = self.meta if isinstance(self.meta, dict) else {}
        found = meta.get("metrics")
        metrics: dict[str, Any] = found if isinstance(found, dict) else {}
        try:
            where = str(self.checkpoint.resolve().relative_to(REPO))
        except ValueError:
            where = str(self.checkpoint)
        return {
            "params": count_parameters(self.net),
            "checkpoint": where,
            "spiking": True,
            "kind": "spiking conv encoder (VDIB) + ANN decoder",
            "checkpoint_step": metrics.get("step"),
            "checkpoint_created_utc": meta.get("created_utc"),
            "weights_sha256": meta.get("weights_sha256"),
            "seed": self.seed,
        }


# ---------------------------------------------------------------------------------------------
# one run: every method on every test set, side by side
# ---------------------------------------------------------------------------------------------

METHOD_ORDER = ("vdib", "mid-gray", "direct", "hpf", "pienet", "pienet-lite")


def build_methods(
    names: Iterable[str] = METHOD_ORDER, *, checkpoint: Path | None = None, count_cost: bool = True
) -> tuple[list[Any], dict[str, str]]:
    """The methods that can run here, in order, and ``{name: why skipped}`` for the rest."""
    from . import scene_baselines as sb

    methods: list[Any] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == "vdib":
            why = vdib_available(checkpoint)
            if why is None:
                try:
                    methods.append(VdibScenes(checkpoint, count_cost=count_cost))
                except Exception as exc:  # noqa: BLE001 - a broken checkpoint must not stop the baselines
                    skipped[name] = f"could not load the scene model: {type(exc).__name__}: {exc}"
            else:
                skipped[name] = why
        elif name in ("pienet", "pienet-lite"):
            why = sb.pienet_available()
            if why is None:
                methods.append(sb.build_baseline(name, count_cost=count_cost))
            else:
                skipped[name] = why
        else:
            methods.append(sb.build_baseline(name, count_cost=count_cost))
    return methods, skipped


def _git_commit() -> str:
    import subprocess

    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_benchmark(
    methods: Sequence[Any],
    test_sets: Sequence[TestSet],
    *,
    timing: bool = True,
    repeats: int = 2,
    progress: bool = True,
    skipped: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, list[np.ndarray]]]]:
    """Score and time every method on every test set (one run). Returns (report, reconstructions).

    ``reconstructions[method][test_set]`` holds one [K, H, W] array per sequence, for montages.
    """
    from tqdm import tqdm

    single_core()
    calib = calibration()
    report: dict[str, Any] = {
        "protocol": {
            "name": "EVREAL standard (std)",
            "tolerance_ms": TOLERANCE_US / 1000,
            "ssim": SSIM_KWARGS,
            "mse": "skimage.metrics.mean_squared_error",
            "clip": [0, 1],
            "gt": "8-bit / 255",
            "raw": "no histogram processing",
            "hist": "skimage.exposure.match_histograms(recon, gt) per frame",
            "start": "cold, from each sequence's first event",
            "lpips": "left out: needs pretrained network "
            "weights (AlexNet/VGG) that cannot be had offline here",
            "timing": "best of runs after a warm-up, torch and numba on 1 thread, per requested GT frame",
            "macs": "torch.utils.flop_counter (conv/matmul only) / 2, per requested frame",
        },
        "calibration": calib,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": _git_commit(),
        "test_sets": [
            {
                "name": ts.name,
                "description": ts.description,
                "sequences": [
                    {
                        "name": s.name,
                        "width": s.width,
                        "height": s.height,
                        "events": int(len(s.events)),
                        "span_us": list(s.span_us),
                        "frames_in_span": int(len(s.frames)),
                        "frames_dropped_outside_span": s.dropped_frames,
                        "source": s.source,
                        "notes": s.notes,
                    }
                    for s in ts.sequences
                ],
            }
            for ts in test_sets
        ],
        "methods": {},
        "results": {},
        "skipped": dict(skipped or {}),
    }
    recons: dict[str, dict[str, list[np.ndarray]]] = {}
    jobs = [(m, ts) for m in methods for ts in test_sets]
    bar = tqdm(jobs, desc="scenes", disable=not progress, unit="run")
    for m, ts in bar:
        bar.set_postfix_str(f"{m.name} on {ts.name}")
        seq_results = []
        frames_requested = 0
        seconds = 0.0
        counters: dict[str, float] = {}
        for seq in ts.sequences:
            r = evaluate_on_sequence(m, seq)
            seq_results.append(r)
            frames_requested += len(seq.frame_times_us)
            for k, v in r.counters.items():
                counters[k] = counters.get(k, 0.0) + v
            if r.recon is not None:
                recons.setdefault(m.name, {}).setdefault(ts.name, []).append(r.recon)
            if timing:
                had = getattr(m, "count_cost", None)
                if had is not None:
                    m.count_cost = False
                try:
                    seconds += time_method(m, seq, repeats=repeats)
                finally:
                    if had is not None:
                        m.count_cost = had
        entry = summarize(seq_results)
        entry["frames_requested"] = frames_requested
        entry["ms_per_frame_1core"] = (
            1000.0 * seconds / frames_requested if timing and frames_requested else None
        )
        # compute time over the stream time it covered (first event to last GT frame): < 1 is real time
        covered = sum(
            float(q.frame_times_us[-1] - q.events["t"][0]) for q in ts.sequences if len(q.frame_times_us)
        )
        entry["realtime_factor_1core"] = seconds / (covered * 1e-6) if timing and covered > 0 else None
        spiking = bool(m.info().get("spiking"))
        for k in (
            "macs",
            "synops",
            "spikes",
            "macs_all_dense",
            "event_driven_macs",
            "spikes_hidden",
            "spikes_readout",
            "steps",
        ):
            if k in counters and (spiking or k in ("macs", "macs_all_dense")):
                entry[f"{k}_per_frame"] = counters[k] / max(frames_requested, 1)
        if not counters and getattr(m, "name", "") == "mid-gray":
            entry["macs_per_frame"] = 0.0
        entry["per_frame"] = [dict(f, sequence=r.sequence) for r in seq_results for f in r.per_frame]
        report["results"].setdefault(m.name, {})[ts.name] = entry
        report["methods"][m.name] = m.info()
    return report, recons


# ---------------------------------------------------------------------------------------------
# outputs: JSON, markdown table, montages
# ---------------------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _si(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g}"


def markdown(report: dict[str, Any]) -> str:
    """The side-by-side tables of one run."""
    methods = list(report["results"])
    lines = ["# General-scene reconstruction: one benchmark run", ""]
    lines.append(
        f"Run {report['created_utc']} at commit `{report.get('git', '')}`. Protocol: EVREAL standard "
        "(cold start at the first event; reconstruction within 1 ms of each GT frame inside the "
        "event span; clip to [0, 1]; GT / 255; skimage MSE and SSIM with gaussian_weights, sigma 1.5, "
        "population covariance, data_range 1). **raw** = no histogram processing (the published "
        "metric); **hist** = after `match_histograms(recon, gt)` per frame (structure only; a "
        "constant image becomes near-white). LPIPS left out (needs network weights not available "
        "offline)."
    )
    lines.append("")
    for ts in report["test_sets"]:
        seqs = ts["sequences"]
        n = sum(s["frames_in_span"] for s in seqs)
        ev = sum(s["events"] for s in seqs)
        lines.append(
            f"- **{ts['name']}**: {ts['description']}; {len(seqs)} sequence(s), {n} GT frames, {ev:,} events"
        )
    lines.append("")
    for ts in report["test_sets"]:
        s = ts["name"]
        n = sum(q["frames_in_span"] for q in ts["sequences"])
        lines.append(f"## {s} ({n} GT frames)")
        lines.append("")
        lines.append(
            "| method | SSIM raw | MSE raw | SSIM hist | MSE hist | ms/frame (1 core) | x real time "
            "| params | MACs/frame | spikes/frame | SynOps/frame |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for m in methods:
            e = report["results"][m].get(s)
            if e is None:
                continue
            params = report["methods"].get(m, {}).get("params")
            miss = f" ({e['missed']} missed)" if e.get("missed") else ""
            lines.append(
                f"| {m} | {_fmt(e['ssim_raw'])}{miss} | {_fmt(e['mse_raw'])} | {_fmt(e['ssim_hist'])} "
                f"| {_fmt(e['mse_hist'])} | {_fmt(e.get('ms_per_frame_1core'), '.1f')} "
                f"| {_fmt(e.get('realtime_factor_1core'), '.2f')} "
                f"| {_si(params) if params else '0'} | {_si(e.get('macs_per_frame'))} "
                f"| {_si(e.get('spikes_per_frame'))} | {_si(e.get('synops_per_frame'))} |"
            )
        lines.append("")
    spiking = [m for m in methods if report["methods"].get(m, {}).get("spiking")]
    for m in spiking:
        lines.append(
            f"### {m}: the spiking encoder's work per output frame (accumulates vs multiply-accumulates)"
        )
        lines.append("")
        lines.append(
            "| test set | bins stepped | hidden spikes | readout spikes | SynOps (ACs) | MACs (ANN parts, "
            "dense) | MACs if the analog input layer were event-driven |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for ts in report["test_sets"]:
            e = report["results"][m].get(ts["name"]) or {}
            lines.append(
                f"| {ts['name']} | {_fmt(e.get('steps_per_frame'), '.2f')} | {_si(e.get('spikes_hidden_per_frame'))} "
                f"| {_si(e.get('spikes_readout_per_frame'))} | {_si(e.get('synops_per_frame'))} "
                f"| {_si(e.get('macs_per_frame'))} | {_si(e.get('event_driven_macs_per_frame'))} |"
            )
        lines.append("")
    c = report["calibration"]
    lines.append(
        f"Same-run machine reference: {c['gemm_gflops_1core']:.1f} GFLOP/s single-thread fp32 GEMM "
        f"(256x256x256), load average {c['loadavg_1min']:.2f} (1 min) / {c['loadavg_5min']:.2f} "
        f"(5 min) on {int(c['cpu_count'])} cores. MACs count convolutions and matrix products "
        "(torch's flop counter), not element-wise ops; SynOps are accumulates of spike-driven "
        "layers (each input spike costs out_channels x k x k). Classical filters: O(events) "
        "numba loops, no MACs counted."
    )
    for m in methods:
        info = report["methods"].get(m, {})
        if info.get("checkpoint"):
            lines.append("")
            lines.append(
                f"{m}: checkpoint `{info['checkpoint']}` (training step {info.get('checkpoint_step')}, "
                f"created {info.get('checkpoint_created_utc')}, weights sha256 "
                f"{str(info.get('weights_sha256'))[:12]}), Bernoulli readout seed {info.get('seed')}."
            )
    if report.get("skipped"):
        lines.append("")
        for k, v in report["skipped"].items():
            lines.append(f"- skipped **{k}**: {v}")
    lines.append("")
    return "\n".join(lines)


def event_image(
    events: np.ndarray, width: int, height: int, t_us: int, window_us: int = 10_000
) -> np.ndarray:
    """The events of the ``window_us`` before ``t_us`` as a picture: gray 0.5, on white, off black."""
    img = np.full((height, width), 0.5, dtype=np.float32)
    t = events["t"]
    lo, hi = np.searchsorted(t, t_us - window_us, side="left"), np.searchsorted(t, t_us, side="right")
    w = events[lo:hi]
    img[w["y"].astype(np.int64), w["x"].astype(np.int64)] = np.where(w["p"] > 0, 1.0, 0.0)
    return img


def montage(
    gt: np.ndarray, columns: Sequence[tuple[str, np.ndarray]], *, title: str = "", gt_label: str = "GT"
) -> Any:
    """PIL image: one row per frame, GT then each (label, [K, H, W]) column, labelled on top."""
    from PIL import Image, ImageDraw, ImageFont

    k, h, w = gt.shape
    cols = [(gt_label, gt), *columns]
    pad, head = 4, 30 if title else 16
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    W = len(cols) * (w + pad) + pad
    H = head + k * (h + pad) + pad
    img = Image.new("L", (W, H), 255)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, 1), title, fill=0, font=font)
    for c, (label, arr) in enumerate(cols):
        x0 = pad + c * (w + pad)
        draw.text((x0 + 2, head - 14), label, fill=0, font=font)
        for r in range(k):
            tile = (np.clip(arr[r], 0, 1) * 255 + 0.5).astype(np.uint8)
            img.paste(Image.fromarray(tile), (x0, head + r * (h + pad)))
    return img


def write_montages(
    report: dict[str, Any],
    recons: dict[str, dict[str, list[np.ndarray]]],
    test_sets: Sequence[TestSet],
    out_dir: Path,
    *,
    max_rows: int = 4,
) -> list[Path]:
    """One PNG per test set: GT | events | ours | every baseline, set-mean scores in the labels.

    One sequence: its first ``max_rows`` frames; several (simulated clips): the last in-span frame
    of each of the first ``max_rows`` clips of the first clip's size.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ts in test_sets:
        picks: list[tuple[int, int]] = []
        if len(ts.sequences) == 1:
            picks = [(0, i) for i in range(min(max_rows, len(ts.sequences[0].frames)))]
        else:
            shape = (ts.sequences[0].height, ts.sequences[0].width)
            for si, seq in enumerate(ts.sequences):
                if (seq.height, seq.width) == shape and len(seq.frames) and len(picks) < max_rows:
                    picks.append((si, len(seq.frames) - 1))
        if not picks:
            continue
        gt = np.stack([ts.sequences[si].frames[fi] for si, fi in picks])
        evs = np.stack(
            [
                event_image(
                    ts.sequences[si].events,
                    ts.sequences[si].width,
                    ts.sequences[si].height,
                    int(ts.sequences[si].frame_times_us[fi]),
                )
                for si, fi in picks
            ]
        )
        cols = [("events (last 10 ms)", evs)]
        for m in recons:
            if ts.name not in recons[m]:
                continue
            e = report["results"][m][ts.name]
            arr = np.stack([recons[m][ts.name][si][fi] for si, fi in picks])
            cols.append((f"{m} {e['ssim_raw']:.2f} / {e['ssim_hist']:.2f}", arr))
        title = f"{ts.name}: labels give SSIM raw / SSIM hist-matched (mean over the set)"
        img = montage(gt, cols, title=title, gt_label="GT (APS frame)" if ts.name != "simulated" else "GT")
        p = out_dir / f"{ts.name}.png"
        img.save(p, optimize=True)
        paths.append(p)
    return paths


def write_report(report: dict[str, Any], out_json: Path, out_md: Path) -> None:
    import json

    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1, default=float) + "\n")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(markdown(report))
