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

    def fresh_state(self) -> State:
        """A fresh state as :meth:`run_chunk` takes it (batch 1, stacked)."""
        return self.stack([self.init_state()])

    def run_sequence(self, x: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """Spikes ``[T, n_readout]`` of one stream over ``x [T, n_inputs]`` from a fresh state."""
        return self.run_chunk(x, uniforms, self.fresh_state())[0]

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "device": self.device}


def _resolve_torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class _Row(NamedTuple):
    """One stream's state: row ``i`` of a batched state (no copy is made when a tick splits its
    result; states are never written in place, so the batch stays valid)."""

    batch: Any
    i: int


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
    """PyTorch eager engine: a :class:`model.batching.TorchStreams` over the model (its step and
    decode, configured for a server) plus the batching of stream states as rows."""

    name = "torch"

    def __init__(self, naturalizer: Any, device: str = "auto", decoder_dtype: str = "float32") -> None:
        import torch

        from model.batching import TorchStreams, select_rows, stack_states

        cfg = naturalizer.config
        if getattr(cfg, "output", "image") != "image":
            raise EngineError(f"model output {cfg.output!r} is not an image; the service serves image models")
        self.device = _resolve_torch_device(device)
        # On the CPU the input currents are per-stream sums of each stream's own active weight
        # rows (event_driven="rows"): streams see different events (~3 % of the 1352 inputs and
        # ~10 % of the hidden spikes active per stream, but the union over 100 streams is most
        # columns), so a union gather costs nearly a dense GEMM while the row sums read only each
        # stream's rows (1.5 instead of 2.7 ms per step at batch 100), and a stream's result does
        # not depend on the other streams of its batch. GPUs take the GEMM.
        self.streams = TorchStreams(
            naturalizer,
            device=self.device,
            event_driven="rows" if self.device == "cpu" else "auto",
            decoder_dtype=getattr(torch, decoder_dtype),
        )
        self.model = self.streams.model
        self.n_inputs = self.streams.n_inputs
        self.n_readout = self.streams.n_readout
        self.tau_d = self.streams.tau_d
        self.image_shape = (int(cfg.image_shape[0]), int(cfg.image_shape[1]))
        self._torch = torch
        self._stack, self._select = stack_states, select_rows

    def init_state(self) -> State:
        # States are never mutated in place (pure step functions), so sharing one is safe.
        return _Row(self.streams.fresh_state(), 0)

    def order_key(self, state: State) -> Any:
        return (id(state.batch), state.i)

    def stack(self, states: list[State]) -> State:
        """Gather rows: one ``index_select`` per state tensor and source batch, none at all when
        the rows are exactly the previous tick's batch (the steady state of a busy server)."""
        groups = _group_rows(states)
        parts = []
        for batch, rows in groups:
            n = batch.readout.fb_hist.shape[0]
            if rows == list(range(n)):
                parts.append(batch)
            else:
                parts.append(
                    self._select(batch, self._torch.tensor(rows, dtype=self._torch.long, device=self.device))
                )
        return parts[0] if len(parts) == 1 else self._stack(parts)

    def unstack(self, state: State, n: int) -> list[State]:
        return [_Row(state, i) for i in range(n)]

    def step(self, x: np.ndarray, state: State, uniforms: np.ndarray) -> tuple[np.ndarray, State]:
        return self.streams.step(x, state, uniforms)

    def run_chunk(self, x: np.ndarray, uniforms: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        return self.streams.run_chunk(x, uniforms, state)

    def decode(self, windows: np.ndarray) -> np.ndarray:
        return self.streams.decode(windows)

    def describe(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": self.device,
            "decoder_dtype": str(self.streams.decoder_dtype).split(".")[-1],
        }


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
            raise EngineError(
                "device 'cuda' asked for but onnxruntime has no CUDAExecutionProvider (install the gpu extra)"
            )
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
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0).reshape(
            windows.shape[0], *self.image_shape
        )

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "device": self.device, "providers": list(self.runner.providers)}


def build_engine(kind: str, naturalizer: Any, device: str = "auto", decoder_dtype: str = "float32") -> Engine:
    """The engine called ``kind`` ("torch" or "onnx") over ``naturalizer``."""
    if kind == "torch":
        return TorchEngine(naturalizer, device, decoder_dtype)
    if kind == "onnx":
        return OnnxEngine(naturalizer, device)
    raise EngineError(f"unknown engine {kind!r} (expected 'torch' or 'onnx')")
