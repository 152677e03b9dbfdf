"""Engines: the compute behind a served model, batched over streams.

An engine owns one immutable model and offers four batched operations on numpy arrays
(state is opaque and per stream; the scheduler stacks the states of the streams due in a tick):

* ``init_state()`` - the state of one fresh stream (batch 1);
* ``stack(states)`` / ``unstack(state, n)`` - batch and un-batch per-stream states;
* ``step(x [B, n_inputs], state, uniforms [B, n_readout]) -> (y [B, n_readout] uint8, state)``:
  one encoder step, :math:`y_{t,b,j} = [U_{t,b,j} < \\sigma(u_{t,b,j})]` with the stream's own
  uniforms :math:`U` (drawn by the session from its seeded ``torch.Generator``, so a stream's
  spikes do not depend on which other streams share its batch);
* ``decode(windows [B, tau_d, n_readout]) -> images [B, H, W]`` in [0, 1].

Two implementations: :class:`TorchEngine` (CUDA when present, else CPU) and
:class:`OnnxEngine` (onnxruntime; CUDAExecutionProvider when present, else CPU).
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from typing import Any, NamedTuple

import numpy as np

State = Any


class EngineError(RuntimeError):
    """An engine could not be built for a model (missing runtime, failed export...)."""


class Engine(ABC):
    """Batched encoder steps and decoder calls for one model (see the module docstring)."""

    name: str
    device: str
    n_inputs: int
    n_readout: int
    tau_d: int
    image_shape: tuple[int, int]

    @abstractmethod
    def init_state(self) -> State: ...

    @abstractmethod
    def stack(self, states: list[State]) -> State: ...

    @abstractmethod
    def unstack(self, state: State, n: int) -> list[State]: ...

    @abstractmethod
    def step(self, x: np.ndarray, state: State, uniforms: np.ndarray) -> tuple[np.ndarray, State]: ...

    @abstractmethod
    def decode(self, windows: np.ndarray) -> np.ndarray: ...

    def warmup(self, batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> None:
        """Run steps and decodes at a few batch sizes once, so that lazy kernel selection and JIT
        (oneDNN primitives for bf16, allocator growth) happen at load time, not in a live tick."""
        for b in batches:
            state = self.stack([self.init_state()] * b)
            x = np.zeros((b, self.n_inputs), np.float32)
            x[:, :: max(1, self.n_inputs // 40)] = 1.0  # a few active inputs (event-driven paths)
            self.step(x, state, np.full((b, self.n_readout), 0.5, np.float32))
            self.decode(np.zeros((b, self.tau_d, self.n_readout), np.float32))

    def order_key(self, state: State) -> Any:
        """Sort key that lets :meth:`stack` gather rows cheaply (the scheduler orders a tick's
        streams by it; the order of streams within a tick does not change any result)."""
        return 0

    def run_chunk(self, x: np.ndarray, uniforms: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """One stream over ``x [T, n_inputs]`` from a batch-1 ``state`` (from :meth:`stack`):
        spikes ``[T, n_readout]`` and the final state. Equal to ``T`` calls of :meth:`step`
        (engines override it to skip the per-step conversions)."""
        out = np.zeros((x.shape[0], self.n_readout), dtype=np.uint8)
        for t in range(x.shape[0]):
            y, state = self.step(x[t : t + 1], state, uniforms[t : t + 1])
            out[t] = y[0]
        return out, state

    def run_sequence(self, x: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Spikes ``[T, n_readout]`` of one stream over ``x [T, n_inputs]`` from a fresh state."""
        return self.run_chunk(x, uniforms, self.stack([self.init_state()]))[0]

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "device": self.device}


def _resolve_torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _select(idx: Any) -> Any:
    return lambda t: t.index_select(0, idx)


class _Row(NamedTuple):
    """One stream's state: row ``i`` of a batched state (no copy is made when a tick splits its
    result; states are never written in place, so the batch stays valid)."""

    batch: Any
    i: int


#: Largest fraction of non-zero window entries for which :class:`_SparseDecoder` is used.
SPARSE_DECODE_DENSITY = 0.25


class _SparseDecoder:
    """The ``linear``/``mlp`` decoders' first layer as a sum of weight rows over the active
    window entries: with :math:`a_b = \\{i : w_{b,i} \\neq 0\\}` the non-zero entries of window
    :math:`b` (flattened, ``tau_d * n_readout``),

    .. math:: h_b = c_1 + \\sum_{i \\in a_b} w_{b,i} \\, W_1^T[i, :]

    in one ``embedding_bag`` call for the whole batch. Spike windows are sparse (a few hundred of
    7680 entries here): this reads a few hundred weight rows per window instead of the whole
    first-layer matrix (15.7 MB in float32 for the default model) per call: 1.7 instead of
    4.1 ms for 33 windows, 0.5 instead of 2.0 ms for 9, at 7 % active entries. Equal to the
    dense layer up to float rounding.
    """

    def __init__(self, w1_t: Any, b1: Any, fc2: Any, sigmoid: bool) -> None:
        self.w1_t, self.b1, self.fc2, self.sigmoid = w1_t, b1, fc2, sigmoid

    @classmethod
    def build(cls, decoder: Any, device: str) -> _SparseDecoder | None:
        """The sparse form of ``decoder`` when it is a float32 ``linear``/``mlp`` image decoder on
        the CPU, else None (the dense decoder is used)."""
        import torch

        if device != "cpu" or getattr(decoder, "output", None) not in ("image", "logits"):
            return None
        name = getattr(decoder, "name", None)
        first = getattr(decoder, "fc1" if name == "mlp" else "fc", None) if name in ("mlp", "linear") else None
        second = getattr(decoder, "fc2", None) if name == "mlp" else None
        if not isinstance(first, torch.nn.Linear) or first.weight.dtype != torch.float32:
            return None
        if name == "mlp" and not isinstance(second, torch.nn.Linear):
            return None
        with torch.no_grad():
            w1_t = first.weight.detach().t().contiguous()
            b1 = first.bias.detach().clone() if first.bias is not None else torch.zeros(w1_t.shape[1])
        return cls(w1_t, b1, second, decoder.output == "image")

    def decode(self, flat: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Images ``[B, out]`` of the windows ``flat [B, tau_d * n_readout]`` whose non-zero
        entries are at the flat positions ``idx`` (``np.flatnonzero(flat)``, ascending)."""
        import torch
        import torch.nn.functional as F

        b, n = flat.shape
        vals = flat.reshape(-1)[idx]
        weights = None if np.all(vals == 1) else torch.from_numpy(vals.astype(np.float32))
        offsets = torch.from_numpy(np.searchsorted(idx, np.arange(b, dtype=np.int64) * n))
        cols = torch.from_numpy(idx % n)
        with torch.inference_mode():
            h = F.embedding_bag(cols, self.w1_t, offsets, mode="sum", per_sample_weights=weights)
            h += self.b1
            if self.fc2 is not None:
                h = self.fc2(h.relu_())
            if self.sigmoid:
                h = h.sigmoid_().clamp_(0.0, 1.0)
            return h.numpy()


def _group_rows(states: list[Any]) -> list[tuple[Any, list[int]]]:
    """Runs of consecutive states from the same source batch: ``[(batch, [row, ...]), ...]``."""
    groups: list[tuple[Any, list[int]]] = []
    for st in states:
        if groups and groups[-1][0] is st.batch:
            groups[-1][1].append(st.i)
        else:
            groups.append((st.batch, [st.i]))
    return groups


class TorchEngine(Engine):
    """PyTorch eager engine over a :class:`model.Naturalizer`."""

    name = "torch"

    def __init__(self, naturalizer: Any, device: str = "auto", decoder_dtype: str = "float32") -> None:
        import copy

        import torch

        self.device = _resolve_torch_device(device)
        self.model = naturalizer.to(self.device).eval()
        # bfloat16 halves the decoder's weight traffic and uses the bf16 GEMM kernels (an MLP
        # decoder over tau_d = 30 windows: ~1.2 ms instead of ~4.8 ms at batch 25 here). The
        # window holds 0/1 spikes, exact in bf16; only the weights and sums are rounded.
        self.decoder_dtype = getattr(torch, decoder_dtype)
        self._decoder = self.model.decoder
        if self.decoder_dtype != torch.float32:
            self._decoder = copy.deepcopy(self.model.decoder).to(self.decoder_dtype)
        self.encoder = self.model.encoder
        self.decoder = self.model.decoder
        cfg = self.model.config
        c, h, w = cfg.input_shape
        self.n_inputs = int(c * h * w)
        self.n_readout = int(self.encoder.config.n_readout)
        self.tau_d = int(cfg.tau_d)
        self.image_shape = (int(cfg.image_shape[0]), int(cfg.image_shape[1]))
        self._torch = torch
        if getattr(cfg, "output", "image") != "image":
            raise EngineError(f"model output {cfg.output!r} is not an image; the service serves image models")
        from model import stack_states
        from model.batching import map_state

        self._stack, self._map = stack_states, map_state
        self._sparse = _SparseDecoder.build(self._decoder, self.device)
        if self.device == "cpu" and hasattr(self.encoder, "event_driven"):
            # Input currents as per-stream sums of each stream's own active weight rows
            # (model.functional.input_current, event_driven="rows"): streams see different
            # events (~3 % of the 1352 inputs and ~10 % of the hidden spikes active per stream,
            # but the union over 100 streams is most columns), so the model's union gather costs
            # nearly a dense GEMM while the row sums read only each stream's rows (1.5 instead of
            # 2.7 ms per step at batch 100), and a stream's result does not depend on the other
            # streams of its batch. Equal to the dense step up to float rounding.
            self.encoder.event_driven = "rows"
        with torch.inference_mode():
            self._fresh = self.encoder.init_state(1, device=self.device)

    def _model_step(self, x: Any, state: Any, uniforms: Any) -> tuple[Any, Any]:
        return self.encoder.step(x, state, uniforms=uniforms)  # type: ignore[no-any-return]

    def init_state(self) -> State:
        # States are never mutated in place (pure step functions), so sharing one is safe.
        return _Row(self._fresh, 0)

    def order_key(self, state: State) -> Any:
        return (id(state.batch), state.i)

    def stack(self, states: list[State]) -> State:
        """Gather rows: one ``index_select`` per state tensor and source batch, none at all when
        the rows are exactly the previous tick's batch (the steady state of a busy server)."""
        torch = self._torch
        groups = _group_rows(states)
        parts = []
        for batch, rows in groups:
            n = batch.readout.fb_hist.shape[0]
            if rows == list(range(n)):
                parts.append(batch)
            else:
                idx = torch.tensor(rows, dtype=torch.long, device=self.device)
                parts.append(self._map(batch, _select(idx)))
        return parts[0] if len(parts) == 1 else self._stack(parts)

    def unstack(self, state: State, n: int) -> list[State]:
        return [_Row(state, i) for i in range(n)]

    def step(self, x: np.ndarray, state: State, uniforms: np.ndarray) -> tuple[np.ndarray, State]:
        torch = self._torch
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            ut = torch.from_numpy(np.ascontiguousarray(uniforms, dtype=np.float32)).to(self.device)
            y, state = self._model_step(xt, state, ut)
            return y.to("cpu", torch.uint8).numpy(), state

    def run_chunk(self, x: np.ndarray, uniforms: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        torch = self._torch
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)
            ut = torch.from_numpy(np.ascontiguousarray(uniforms, dtype=np.float32)).to(self.device)
            ys = []
            for x_t, u_t in zip(xt.split(1), ut.split(1), strict=True):
                y, state = self._model_step(x_t, state, u_t)
                ys.append(y)
            out = torch.cat(ys) if ys else torch.zeros((0, self.n_readout), device=self.device)
            return out.to("cpu", torch.uint8).numpy(), state

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "device": self.device, "decoder_dtype": str(self.decoder_dtype).split(".")[-1]}

    def decode(self, windows: np.ndarray) -> np.ndarray:
        torch = self._torch
        if self._sparse is not None:
            flat = windows.reshape(windows.shape[0], -1)
            # a bool view of 0/1 bytes: np.flatnonzero is ~3x faster than nonzero on uint8 2-D
            idx = np.flatnonzero(flat.view(bool) if flat.dtype == np.uint8 else flat)
            if len(idx) <= SPARSE_DECODE_DENSITY * flat.size:
                return self._sparse.decode(flat, idx).reshape(windows.shape[0], *self.image_shape)
        with torch.inference_mode():
            wt = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).to(self.device, self.decoder_dtype)
            img = self._decoder(wt).float().clamp_(0.0, 1.0)
            return img.reshape(windows.shape[0], *self.image_shape).cpu().numpy()


class OnnxEngine(Engine):
    """ONNX Runtime engine: the model exported by ``model.export_onnx``, run by ``model.OnnxEngine``.

    The export goes to a temporary directory at load time (checkpoints hold only safetensors +
    JSON). The uniform noise is an input of the exported step, so streams stay reproducible.
    """

    name = "onnx"

    def __init__(self, naturalizer: Any, device: str = "auto", threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
            raise EngineError(f"onnxruntime is not installed: {exc}") from exc
        from model import OnnxEngine as Runner
        from model import export_onnx

        cfg = naturalizer.config
        if getattr(cfg, "output", "image") != "image":
            raise EngineError(f"model output {cfg.output!r} is not an image; the service serves image models")
        want_cuda = device in ("auto", "cuda") or device.startswith("cuda")
        use_cuda = want_cuda and "CUDAExecutionProvider" in ort.get_available_providers()
        if device.startswith("cuda") and not use_cuda:
            raise EngineError("device 'cuda' asked for but onnxruntime has no CUDAExecutionProvider (install the gpu extra)")
        self._tmp = tempfile.TemporaryDirectory(prefix="vdib-onnx-")
        export_onnx(naturalizer.cpu().eval(), self._tmp.name)
        self.runner = Runner(self._tmp.name, device="cuda" if use_cuda else "cpu", threads=threads)
        self.device = "cuda" if use_cuda else "cpu"
        c, h, w = cfg.input_shape
        self.n_inputs = int(c * h * w)
        self.n_readout = int(naturalizer.encoder.config.n_readout)
        self.tau_d = int(cfg.tau_d)
        self.image_shape = (int(cfg.image_shape[0]), int(cfg.image_shape[1]))
        self._fresh = self.runner.init_state(1)

    def init_state(self) -> State:
        return _Row(self._fresh, 0)  # never written in place: step returns new arrays

    def order_key(self, state: State) -> Any:
        return (id(state.batch), state.i)

    def stack(self, states: list[State]) -> State:
        """Like :meth:`TorchEngine.stack`: the previous tick's batch as it is when its rows come
        back in order (a busy server's steady state), a slice for a run of consecutive rows,
        else a gather; ``np.concatenate`` only across source batches."""
        groups = _group_rows(states)
        parts = []
        for batch, rows in groups:
            n = batch[0].shape[0]
            if len(rows) == n and rows == list(range(n)):
                parts.append(batch)
            elif rows == list(range(rows[0], rows[0] + len(rows))):
                parts.append([a[rows[0] : rows[0] + len(rows)] for a in batch])
            else:
                idx = np.asarray(rows)
                parts.append([a[idx] for a in batch])
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(arrays, axis=0) for arrays in zip(*parts, strict=True)]

    def unstack(self, state: State, n: int) -> list[State]:
        return [_Row(state, i) for i in range(n)]

    def step(self, x: np.ndarray, state: State, uniforms: np.ndarray) -> tuple[np.ndarray, State]:
        y, _, _, state = self.runner.step(x, state, uniforms)
        return np.asarray(y).astype(np.uint8), state

    def decode(self, windows: np.ndarray) -> np.ndarray:
        img = self.runner.decode(windows)
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0).reshape(windows.shape[0], *self.image_shape)

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "device": self.device, "providers": list(self.runner.providers)}


def build_engine(kind: str, naturalizer: Any, device: str = "auto", decoder_dtype: str = "float32") -> Engine:
    """The engine called ``kind`` ("torch" or "onnx") over ``naturalizer``."""
    if kind == "torch":
        return TorchEngine(naturalizer, device, decoder_dtype)
    if kind == "onnx":
        return OnnxEngine(naturalizer, device)
    raise EngineError(f"unknown engine {kind!r} (expected 'torch' or 'onnx')")
