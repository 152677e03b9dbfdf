"""ONNX export of the general-scene naturalizer and an onnxruntime engine for it.

Two graphs with dynamic batch, height and width (one file serves every sensor size):

* ``scene_step.onnx``: ``(x [B, C_in, H, W] counts, *state, uniforms [B, K, h, w]) ->
  (y, u, *next_state)`` -- one bin, the same maths as :meth:`SceneNaturalizer.step_detailed`
  (float32 state; spike buffers as float 0/1);
* ``scene_decoder.onnx``: ``(window [B, tau_d, K, h, w]) -> image [B, H', W']`` (``H' = stride
  * h``; crop to the sensor).

``scene_onnx.json`` lists the state names and the model config.
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

from .functional import LIFState
from .scene import SceneNaturalizer, SceneState

__all__ = ["SceneOnnxEngine", "export_scene_onnx", "scene_state_names"]


def scene_state_names(net: SceneNaturalizer) -> list[str]:
    names = []
    for i in range(len(net.config.hidden)):
        names += [f"h{i}_{f}" for f in LIFState._fields]
    return [*names, "pending", "fb_hist", "window"]


def _to_list(state: SceneState) -> list[Tensor]:
    out = [t for s in state.hidden for t in s]
    return [*out, state.pending, state.fb_hist, state.window]


def _from_list(ts: list[Tensor] | tuple[Tensor, ...], n_hidden: int) -> SceneState:
    hidden = tuple(LIFState(*ts[4 * i : 4 * i + 4]) for i in range(n_hidden))
    return SceneState(hidden, ts[4 * n_hidden], ts[4 * n_hidden + 1], ts[4 * n_hidden + 2])


class _Step(nn.Module):
    def __init__(self, net: SceneNaturalizer):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, *args: Tensor) -> tuple[Tensor, ...]:
        *state, uniforms = args
        st = _from_list(state, len(self.net.config.hidden))
        y, u, nxt = self.net.step_detailed(self.net.prepare(x), st, uniforms)
        return (y, u, *_to_list(nxt))


class _Decode(nn.Module):
    def __init__(self, net: SceneNaturalizer):
        super().__init__()
        self.net = net

    def forward(self, window: Tensor) -> Tensor:
        return self.net.decode(window)


def export_scene_onnx(
    net: SceneNaturalizer, out_dir: str | os.PathLike[str], *, opset: int = 17
) -> dict[str, Path]:
    """Write the two graphs and ``scene_onnx.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    names = scene_state_names(net)
    B, H, W = 2, 24, 36
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        state = _to_list(net.init_state(B, H, W))
        x = torch.zeros(B, net.config.in_channels, H, W)
        uni = torch.rand(state[-1][:, 0].shape)
        in_names = ["x", *names, "uniforms"]
        out_names = ["y", "u", *[f"next_{n}" for n in names]]
        dyn: dict[str, dict[int, str]] = {"x": {0: "batch", 2: "height", 3: "width"}}
        for n in [*names, "uniforms", "y", "u", *[f"next_{n}" for n in names]]:
            rank = 5 if n.split("next_")[-1] in ("pending", "fb_hist", "window") else 4
            dyn[n] = {0: "batch", rank - 2: "h", rank - 1: "w"}
        torch.onnx.export(
            _Step(net),
            (x, *state, uni),
            str(out / "scene_step.onnx"),
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dyn,
            opset_version=opset,
            dynamo=False,
        )
        window = torch.zeros(B, net.config.tau_d, net.config.n_readout, *net.config.spike_shape(H, W))
        torch.onnx.export(
            _Decode(net),
            (window,),
            str(out / "scene_decoder.onnx"),
            input_names=["window"],
            output_names=["image"],
            dynamic_axes={"window": {0: "batch", 3: "h", 4: "w"}, "image": {0: "batch", 1: "H", 2: "W"}},
            opset_version=opset,
            dynamo=False,
        )
    meta = {"opset": opset, "state_names": names, "model": net.config.to_dict()}
    (out / "scene_onnx.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {
        "step": out / "scene_step.onnx",
        "decoder": out / "scene_decoder.onnx",
        "meta": out / "scene_onnx.json",
    }


class SceneOnnxEngine:
    """Step and decode the exported scene model with onnxruntime on numpy float32 arrays.

    ``init_state(batch, height, width) -> list[np.ndarray]`` (in :func:`scene_state_names`
    order), ``step(x, state, uniforms) -> (y, u, state)``, ``decode(window, height, width)``.
    """

    def __init__(self, onnx_dir: str | os.PathLike[str], device: str = "cpu", threads: int = 1):
        import onnxruntime as ort

        from .scene import SceneNaturalizerConfig

        d = Path(onnx_dir)
        self.meta: dict[str, Any] = json.loads((d / "scene_onnx.json").read_text())
        self.config = SceneNaturalizerConfig.from_dict(self.meta["model"])
        self.state_names: list[str] = list(self.meta["state_names"])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        )
        self.step_session = ort.InferenceSession(str(d / "scene_step.onnx"), so, providers=providers)
        self.decode_session = ort.InferenceSession(str(d / "scene_decoder.onnx"), so, providers=providers)
        self._out_names = [o.name for o in self.step_session.get_outputs()]

    def init_state(self, batch: int, height: int, width: int) -> list[np.ndarray]:
        cfg = self.config
        h, w = cfg.spike_shape(height, width)
        shapes: list[tuple[int, ...]] = []
        for c in cfg.hidden:
            shapes += [(batch, c, h, w)] * 4
        shapes += [
            (batch, cfg.tau_e, cfg.n_readout, h, w),
            (batch, cfg.fb_memory, cfg.n_readout, h, w),
            (batch, cfg.tau_d, cfg.n_readout, h, w),
        ]
        return [np.zeros(s, np.float32) for s in shapes]

    def step(
        self, x: np.ndarray, state: list[np.ndarray], uniforms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        feeds = {
            "x": np.ascontiguousarray(x, np.float32),
            "uniforms": np.ascontiguousarray(uniforms, np.float32),
        }
        feeds.update(dict(zip(self.state_names, state, strict=True)))
        outs = self.step_session.run(self._out_names, feeds)
        return outs[0], outs[1], list(outs[2:])

    def decode(self, window: np.ndarray, height: int, width: int) -> np.ndarray:
        (img,) = self.decode_session.run(["image"], {"window": np.ascontiguousarray(window, np.float32)})
        return cast(np.ndarray, img[:, :height, :width])
