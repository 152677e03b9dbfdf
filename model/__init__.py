"""The VDIB model: encoder SNN, decoders, online stepping, checkpoints, learning rules, ONNX.

Torch only; knows nothing of HTTP or event files. Names are loaded lazily so that
``import model`` stays cheap (sub-modules import torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    # neurons / encoder
    "EncoderConfig": "model.encoder",
    "EncoderState": "model.encoder",
    "Encoder": "model.encoder",
    "LIFState": "model.functional",
    "SRMState": "model.functional",
    "LIFParameters": "model.functional",
    # decoders
    "Decoder": "model.decoders",
    "DECODERS": "model.decoders",
    "build_decoder": "model.decoders",
    "decoder_names": "model.decoders",
    # naturalizer / online
    "NaturalizerConfig": "model.naturalizer",
    "Naturalizer": "model.naturalizer",
    "OnlineNaturalizer": "model.naturalizer",
    "sliding_windows": "model.naturalizer",
    # the general-scene family (fully convolutional, any sensor size)
    "SceneNaturalizerConfig": "model.scene",
    "SceneNaturalizer": "model.scene",
    "OnlineSceneNaturalizer": "model.scene",
    "reconstruct_events": "model.scene",
    # cross-stream batching and the one recording decoder
    "stack_states": "model.batching",
    "select_rows": "model.batching",
    "stream_uniforms": "model.batching",
    "TorchStreams": "model.batching",
    "decode_segments": "model.batching",
    # checkpoints
    "CheckpointError": "model.checkpoint",
    "save_checkpoint": "model.checkpoint",
    "load_checkpoint": "model.checkpoint",
    "FORMAT_VERSION": "model.checkpoint",
    # loss / rules / export
    "vdib_loss": "model.loss",
    "build_rule": "model.rules",
    "RULES": "model.rules",
    "export_onnx": "model.onnx_export",
    "OnnxEngine": "model.onnx_export",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
