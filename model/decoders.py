"""Decoders by name (STYLE.md 6): ANNs that map the last ``tau_d`` readout spike vectors to an output.

Input ``window [B, tau_d, n_readout]`` (oldest step first), output ``[B, out_features]``:
sigmoid outputs in [0, 1] for images (``output="image"``) or raw logits (``output="logits"``).

Architectures follow VDIB-REFERENCE.md "Decoders":

* ``linear``: Linear(N_Y·τ_d → out).
* ``mlp``: Linear(N_Y·τ_d → 128·τ_d), ReLU, Linear(→ out). ``hidden=`` overrides the width
  (128·τ_d grows quadratically with τ_d: at τ_d = 200, N_Y = 256 it would be 1.3 G weights).
* ``cnn``: the window is a 1-channel [τ_d, N_Y] image; Conv(1→64, 3, s2), Conv(64→32, 3), ReLU,
  Conv(32→8, 3, s2), ReLU, Linear(→ 2048), ReLU, Linear(→ out). Windows shorter than 11 steps
  are zero-padded at the old end to 11 rows (the smallest the stack accepts), so any τ_d works.
* ``rate-linear``, ``rate-mlp``: the window is summed over time (spike counts ``[B, N_Y]``)
  before Linear(N_Y → out) / Linear(N_Y → hidden), ReLU, Linear(→ out); hidden defaults to 128·τ_d
  like ``mlp``.
* ``rate-cnn``: the same ``cnn`` stack applied to a window whose every row is the count vector,
  so it sees rates only with the same capacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["DECODERS", "Decoder", "build_decoder", "register_decoder", "decoder_names"]

_CNN_MIN_ROWS = 11


class Decoder(nn.Module):
    """Base class: ``forward(window [B, tau_d, n_readout]) -> [B, out_features]``."""

    name: str = ""

    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image"):
        super().__init__()
        if output not in ("image", "logits"):
            raise ValueError(f"output must be 'image' or 'logits', got {output!r}")
        if n_readout < 1 or window < 1 or out_features < 1:
            raise ValueError(f"n_readout, window and out_features must be >= 1: {n_readout}, {window}, {out_features}")
        self.n_readout = n_readout
        self.window = window
        self.out_features = out_features
        self.output = output

    def features(self, window: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, window: Tensor) -> Tensor:
        if window.dim() != 3 or window.shape[1] != self.window or window.shape[2] != self.n_readout:
            raise ValueError(
                f"{self.name} decoder expects [B, {self.window}, {self.n_readout}], got {tuple(window.shape)}"
            )
        out = self.features(window)
        return torch.sigmoid(out) if self.output == "image" else out

    def logits(self, window: Tensor) -> Tensor:
        """Pre-sigmoid outputs (for a numerically stable BCE-with-logits loss)."""
        return self.features(window)


class _SparseFirstLayer:
    """``linear(x)`` that, for a small batch of sparse binary windows and no autograd, multiplies
    only the active input columns (``x[:, active] @ W^T[active]``): the first layer of the
    ``linear``/``mlp`` decoders streams N_Y * tau_d * out weights per call otherwise, which makes
    batch-1 decoding memory-bound. Equal to ``F.linear`` up to float rounding.
    """

    max_batch = 8
    max_density = 0.5
    enabled = True  # export_onnx turns it off: a traced graph must be the dense one

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._wt: Tensor | None = None

    def __call__(self, layer: nn.Linear, x: Tensor) -> Tensor:
        w = layer.weight
        if (
            not _SparseFirstLayer.enabled
            or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            or x.shape[0] > self.max_batch
            or x.device.type != "cpu"
        ):
            return layer(x)
        active = x.any(0).nonzero().squeeze(1)
        if active.numel() > self.max_density * x.shape[1]:
            return layer(x)
        key = (w._version, w.data_ptr(), w.dtype)
        if self._key != key or self._wt is None:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in any mode
                self._wt = w.detach().t().contiguous()
            self._key = key
        return torch.addmm(layer.bias, x.index_select(1, active), self._wt.index_select(0, active))


DECODERS: dict[str, Callable[..., Decoder]] = {}


def register_decoder(name: str) -> Callable[[type[Decoder]], type[Decoder]]:
    def deco(cls: type[Decoder]) -> type[Decoder]:
        cls.name = name
        DECODERS[name] = cls
        return cls

    return deco


def decoder_names() -> list[str]:
    return sorted(DECODERS)


def build_decoder(
    name: str, n_readout: int, window: int, out_features: int, output: str = "image", **options: Any
) -> Decoder:
    """Build a decoder by registry name (``linear``, ``mlp``, ``cnn``, ``rate-linear``, ``rate-mlp``, ``rate-cnn``)."""
    cls = DECODERS.get(name)
    if cls is None:
        raise KeyError(f"unknown decoder {name!r}; known: {decoder_names()}")
    return cls(n_readout, window, out_features, output=output, **options)


@register_decoder("linear")
class LinearDecoder(Decoder):
    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image"):
        super().__init__(n_readout, window, out_features, output)
        self.fc = nn.Linear(n_readout * window, out_features)
        self._sparse = _SparseFirstLayer()

    def features(self, window: Tensor) -> Tensor:
        return self._sparse(self.fc, window.flatten(1))


@register_decoder("mlp")
class MLPDecoder(Decoder):
    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image", hidden: int | None = None):
        super().__init__(n_readout, window, out_features, output)
        self.hidden_size = int(hidden) if hidden is not None else 128 * window
        self.fc1 = nn.Linear(n_readout * window, self.hidden_size)
        self.fc2 = nn.Linear(self.hidden_size, out_features)
        self._sparse = _SparseFirstLayer()

    def features(self, window: Tensor) -> Tensor:
        return self.fc2(torch.relu(self._sparse(self.fc1, window.flatten(1))))


class _CNNStack(nn.Module):
    def __init__(self, rows: int, cols: int, out_features: int, hidden: int = 2048):
        super().__init__()
        self.rows = max(rows, _CNN_MIN_ROWS)
        if cols < _CNN_MIN_ROWS:
            raise ValueError(f"cnn decoders need n_readout >= {_CNN_MIN_ROWS}, got {cols}")
        self.conv1 = nn.Conv2d(1, 64, 3, stride=2)
        self.conv2 = nn.Conv2d(64, 32, 3)
        self.conv3 = nn.Conv2d(32, 8, 3, stride=2)
        h = ((self.rows - 3) // 2 + 1 - 2 - 3) // 2 + 1
        w = ((cols - 3) // 2 + 1 - 2 - 3) // 2 + 1
        self.fc1 = nn.Linear(8 * h * w, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, img: Tensor) -> Tensor:
        if img.shape[1] < self.rows:  # zero-pad the old end so short windows fit the stack
            img = torch.nn.functional.pad(img, (0, 0, self.rows - img.shape[1], 0))
        h = self.conv1(img.unsqueeze(1))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


@register_decoder("cnn")
class CNNDecoder(Decoder):
    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image", hidden: int = 2048):
        super().__init__(n_readout, window, out_features, output)
        self.net = _CNNStack(window, n_readout, out_features, hidden)

    def features(self, window: Tensor) -> Tensor:
        return self.net(window)


@register_decoder("rate-linear")
class RateLinearDecoder(Decoder):
    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image"):
        super().__init__(n_readout, window, out_features, output)
        self.fc = nn.Linear(n_readout, out_features)

    def features(self, window: Tensor) -> Tensor:
        return self.fc(window.sum(1))


@register_decoder("rate-mlp")
class RateMLPDecoder(Decoder):
    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image", hidden: int | None = None):
        super().__init__(n_readout, window, out_features, output)
        self.hidden_size = int(hidden) if hidden is not None else 128 * window
        self.fc1 = nn.Linear(n_readout, self.hidden_size)
        self.fc2 = nn.Linear(self.hidden_size, out_features)

    def features(self, window: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(window.sum(1))))


@register_decoder("rate-cnn")
class RateCNNDecoder(Decoder):
    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image", hidden: int = 2048):
        super().__init__(n_readout, window, out_features, output)
        self.net = _CNNStack(window, n_readout, out_features, hidden)

    def features(self, window: Tensor) -> Tensor:
        counts = window.sum(1, keepdim=True)
        return self.net(counts.expand(-1, window.shape[1], -1))
