"""ONNX export of the one-step encoder and the decoder, and an onnxruntime engine.

``export_onnx(naturalizer, out_dir)`` writes

* ``encoder_step.onnx``: inputs ``x [B, n_inputs]``, the state tensors (names below), ``uniforms
  [B, n_readout]``; outputs ``y``, ``u`` (readout potentials), ``prob`` (``sigmoid(u)``) and the
  new state tensors ``next_<name>``. The uniform noise is an input, so a run is reproducible and
  equals :meth:`model.encoder.Encoder.step` given the same uniforms.
* ``decoder.onnx``: ``window [B, tau_d, n_readout] -> image [B, *image_shape]``.
* ``onnx.json``: state names and shapes per stream, the model config, the opset.

State tensor names: ``h{l}_q, h{l}_p, h{l}_r, h{l}_s`` per hidden layer, then ``ro_pending``,
``ro_fb_hist`` (the fields of :class:`~model.functional.LIFState` / ``SRMState``), batch first.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from .encoder import Encoder, EncoderState
from .functional import LIFState, SRMState
from .naturalizer import Naturalizer

__all__ = ["export_onnx", "OnnxEngine", "state_names", "state_to_list", "list_to_state"]

OPSET = 17


def state_names(encoder: Encoder) -> list[str]:
    """Names of the flattened state tensors, in order."""
    names = []
    for i in range(len(encoder.hidden)):
        names += [f"h{i}_{f}" for f in LIFState._fields]
    names += [f"ro_{f}" for f in SRMState._fields]
    return names


def state_to_list(state: EncoderState) -> list[Tensor]:
    out: list[Tensor] = []
    for h in state.hidden:
        out += list(h)
    out += list(state.readout)
    return out


def list_to_state(tensors: list[Tensor], n_hidden: int) -> EncoderState:
    hidden = tuple(LIFState(*tensors[4 * i : 4 * i + 4]) for i in range(n_hidden))
    return EncoderState(hidden, SRMState(*tensors[4 * n_hidden : 4 * n_hidden + 2]))


class _EncoderStep(nn.Module):
    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.n_hidden = len(encoder.hidden)

    def forward(self, x: Tensor, *args: Tensor) -> tuple[Tensor, ...]:
        *flat, uniforms = args
        state = list_to_state(list(flat), self.n_hidden)
        # a traced graph must be the dense one
        y, u, new = self.encoder.step_detailed(x, state, uniforms, event_driven="never")
        return (y, u, torch.sigmoid(u), *state_to_list(new))


class _Decode(nn.Module):
    def __init__(self, naturalizer: Naturalizer):
        super().__init__()
        self.naturalizer = naturalizer

    def forward(self, window: Tensor) -> Tensor:
        return self.naturalizer.decode(window)


def export_onnx(
    naturalizer: Naturalizer, out_dir: str | os.PathLike[str], *, opset: int = OPSET
) -> dict[str, Path]:
    """Export ``encoder_step.onnx``, ``decoder.onnx`` and ``onnx.json`` into ``out_dir`` (float32, CPU)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nat = naturalizer.eval()
    enc = nat.encoder
    cfg = nat.config
    names = state_names(enc)
    B = 2
    # the shape checks in the decoders are constant for a given model: the tracer may fold them
    with torch.no_grad():  # fill the derived-weight caches so the trace sees constants, not ops
        enc.lag_weight_t()
        for i in range(len(enc.layers)):
            enc.hidden_weight_t(i)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        state = state_to_list(enc.init_state(B, "cpu"))
        x = torch.zeros(B, cfg.encoder.n_inputs)
        uni = torch.rand(B, cfg.encoder.n_readout)
        in_names = ["x", *names, "uniforms"]
        out_names = ["y", "u", "prob", *[f"next_{n}" for n in names]]
        dyn = {n: {0: "batch"} for n in in_names + out_names}
        torch.onnx.export(
            _EncoderStep(enc),
            (x, *state, uni),
            str(out / "encoder_step.onnx"),
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
        )
        window = torch.zeros(B, cfg.tau_d, cfg.encoder.n_readout)
        torch.onnx.export(  # the decoders take their dense path while traced
            _Decode(nat),
            (window,),
            str(out / "decoder.onnx"),
            input_names=["window"],
            output_names=["image"],
            dynamic_axes={"window": {0: "batch"}, "image": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    single = enc.init_state(1, "cpu")
    meta = {
        "opset": opset,
        "state_names": names,
        "state_shapes": {n: list(t.shape[1:]) for n, t in zip(names, state_to_list(single), strict=True)},
        "model": cfg.to_dict(),
    }
    (out / "onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"encoder": out / "encoder_step.onnx", "decoder": out / "decoder.onnx", "meta": out / "onnx.json"}


class OnnxEngine:
    """Step and decode with onnxruntime on numpy arrays.

    ``OnnxEngine(out_dir, device="cpu"|"cuda", threads=1)`` loads what :func:`export_onnx` wrote.
    ``init_state(batch) -> list[np.ndarray]``; ``step(x [B, N], state, uniforms [B, N_Y]) ->
    (y, u, prob, new_state)``; ``decode(window [B, tau_d, N_Y]) -> [B, *image_shape]``. States are
    lists of float32 arrays in :func:`state_names` order (stack streams along axis 0).
    """

    def __init__(self, onnx_dir: str | os.PathLike[str], device: str = "cpu", threads: int = 1):
        import onnxruntime as ort

        d = Path(onnx_dir)
        self.meta: dict[str, Any] = json.loads((d / "onnx.json").read_text())
        self.state_names: list[str] = list(self.meta["state_names"])
        self.state_shapes = {k: tuple(v) for k, v in self.meta["state_shapes"].items()}
        model = self.meta["model"]
        self.n_inputs = int(model["encoder"]["n_inputs"])
        self.n_readout = int(model["encoder"]["n_readout"])
        self.tau_d = int(model["tau_d"])
        self.image_shape = tuple(model["image_shape"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if device == "cuda":
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.encoder = ort.InferenceSession(str(d / "encoder_step.onnx"), so, providers=providers)
        self.decoder = ort.InferenceSession(str(d / "decoder.onnx"), so, providers=providers)
        self.providers = self.encoder.get_providers()
        self._out_names = [o.name for o in self.encoder.get_outputs()]

    def init_state(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, *self.state_shapes[n]), dtype=np.float32) for n in self.state_names]

    def step(
        self, x: np.ndarray, state: list[np.ndarray], uniforms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
        feeds = {
            "x": np.ascontiguousarray(x, dtype=np.float32),
            "uniforms": np.ascontiguousarray(uniforms, dtype=np.float32),
        }
        feeds.update({n: s for n, s in zip(self.state_names, state, strict=True)})
        outs = self.encoder.run(self._out_names, feeds)
        return outs[0], outs[1], outs[2], list(outs[3:])

    def decode(self, window: np.ndarray) -> np.ndarray:
        (img,) = self.decoder.run(["image"], {"window": np.ascontiguousarray(window, dtype=np.float32)})
        return cast(np.ndarray, img)
