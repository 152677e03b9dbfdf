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
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["DECODERS", "Decoder", "SparseWindowDecoder", "build_decoder", "register_decoder", "decoder_names"]

_CNN_MIN_ROWS = 11


class Decoder(nn.Module):
    """Base class: ``forward(window [B, tau_d, n_readout]) -> [B, out_features]``."""

    name: str = ""

    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image"):
        super().__init__()
        if output not in ("image", "logits"):
            raise ValueError(f"output must be 'image' or 'logits', got {output!r}")
        if n_readout < 1 or window < 1 or out_features < 1:
            raise ValueError(
                f"n_readout, window and out_features must be >= 1: {n_readout}, {window}, {out_features}"
            )
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

    def sparse_form(self) -> SparseWindowDecoder | None:
        """This decoder as a :class:`SparseWindowDecoder` (first layer as row sums over the
        window's non-zero entries), or None when it has no such form (convolutional and rate
        decoders)."""
        return None


class _SparseFirstLayer:
    """``linear(x)`` that, for a small batch of sparse binary windows and no autograd, multiplies
    only the active input columns (``x[:, active] @ W^T[active]``): the first layer of the
    ``linear``/``mlp`` decoders streams N_Y * tau_d * out weights per call otherwise, which makes
    batch-1 decoding memory-bound. Equal to ``F.linear`` up to float rounding. A traced graph
    (ONNX export) always gets the dense layer.
    """

    max_batch = 8
    max_density = 0.5

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._wt: Tensor | None = None

    def transposed(self, layer: nn.Linear) -> Tensor:
        """``W^T`` ``[in, out]``, contiguous, cached until the weight changes (a plain tensor,
        usable in any autograd mode)."""
        w = layer.weight
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._key != key or self._wt is None:
            with torch.inference_mode(False), torch.no_grad():
                self._wt = w.detach().t().contiguous()
            self._key = key
        return self._wt

    def __call__(self, layer: nn.Linear, x: Tensor) -> Tensor:
        w = layer.weight
        if (
            torch.jit.is_tracing()
            or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
            or x.shape[0] > self.max_batch
            or x.device.type != "cpu"
        ):
            return cast(Tensor, layer(x))
        active = x.any(0).nonzero().squeeze(1)
        if active.numel() > self.max_density * x.shape[1]:
            return cast(Tensor, layer(x))
        return torch.addmm(
            layer.bias, x.index_select(1, active), self.transposed(layer).index_select(0, active)
        )


class SparseWindowDecoder:
    """A ``linear``/``mlp`` decoder whose first layer is a sum of weight rows over the non-zero
    window entries: with :math:`a_b = \\{i : w_{b,i} \\neq 0\\}` the non-zero entries of window
    :math:`b` (flattened, ``tau_d * n_readout``),

    .. math:: h_b = c_1 + \\sum_{i \\in a_b} w_{b,i} \\, W_1^T[i, :]

    in one ``embedding_bag`` call for the whole batch, whatever its size (a server decodes the
    windows of many streams at once). Spike windows are sparse (a few hundred of 7680 entries for
    the default model): this reads those weight rows instead of the whole first-layer matrix
    (15.7 MB in float32) per call: 1.7 instead of 4.1 ms for 33 windows, 0.5 instead of 2.0 ms
    for 9, at 7 % active entries. Equal to :meth:`Decoder.forward` up to float rounding; a row's
    result does not depend on the other rows. Built by :meth:`Decoder.sparse_form`.
    """

    def __init__(
        self, decoder: Decoder, first: nn.Linear, first_t: _SparseFirstLayer, rest: Callable[[Tensor], Tensor]
    ):
        self.decoder, self.first, self._first_t, self.rest = decoder, first, first_t, rest

    def decode_nonzero(self, idx: np.ndarray, values: np.ndarray | None, batch: int) -> Tensor:
        """Outputs ``[batch, out_features]`` of the windows ``[batch, tau_d, n_readout]`` whose
        non-zero entries are at the flat positions ``idx`` (int64, ascending: ``np.flatnonzero``
        of the ``[batch, tau_d * n_readout]`` windows) with ``values`` there (None: all 1, spikes).
        Inference only (no autograd graph is built); index arithmetic in numpy (cheaper than
        torch's for these sizes)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.decode_nonzero(idx, values, batch)
        n = self.decoder.window * self.decoder.n_readout
        offsets = torch.from_numpy(np.searchsorted(idx, np.arange(batch, dtype=np.int64) * n))
        weights = None if values is None else torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        h = F.embedding_bag(
            torch.from_numpy(idx % n),
            self._first_t.transposed(self.first),
            offsets,
            mode="sum",
            per_sample_weights=weights,
        )
        if self.first.bias is not None:
            h += self.first.bias
        out = self.rest(h)
        return out.sigmoid_() if self.decoder.output == "image" else out


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

    def sparse_form(self) -> SparseWindowDecoder | None:
        return SparseWindowDecoder(self, self.fc, self._sparse, lambda h: h)


@register_decoder("mlp")
class MLPDecoder(Decoder):
    def __init__(
        self, n_readout: int, window: int, out_features: int, output: str = "image", hidden: int | None = None
    ):
        super().__init__(n_readout, window, out_features, output)
        self.hidden_size = int(hidden) if hidden is not None else 128 * window
        self.fc1 = nn.Linear(n_readout * window, self.hidden_size)
        self.fc2 = nn.Linear(self.hidden_size, out_features)
        self._sparse = _SparseFirstLayer()

    def features(self, window: Tensor) -> Tensor:
        return cast(Tensor, self.fc2(torch.relu(self._sparse(self.fc1, window.flatten(1)))))

    def sparse_form(self) -> SparseWindowDecoder | None:
        return SparseWindowDecoder(self, self.fc1, self._sparse, lambda h: self.fc2(torch.relu_(h)))


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
        return cast(Tensor, self.fc2(torch.relu(self.fc1(h.flatten(1)))))


@register_decoder("cnn")
class CNNDecoder(Decoder):
    def __init__(
        self, n_readout: int, window: int, out_features: int, output: str = "image", hidden: int = 2048
    ):
        super().__init__(n_readout, window, out_features, output)
        self.net = _CNNStack(window, n_readout, out_features, hidden)

    def features(self, window: Tensor) -> Tensor:
        return cast(Tensor, self.net(window))


@register_decoder("rate-linear")
class RateLinearDecoder(Decoder):
    def __init__(self, n_readout: int, window: int, out_features: int, output: str = "image"):
        super().__init__(n_readout, window, out_features, output)
        self.fc = nn.Linear(n_readout, out_features)

    def features(self, window: Tensor) -> Tensor:
        return cast(Tensor, self.fc(window.sum(1)))


@register_decoder("rate-mlp")
class RateMLPDecoder(Decoder):
    def __init__(
        self, n_readout: int, window: int, out_features: int, output: str = "image", hidden: int | None = None
    ):
        super().__init__(n_readout, window, out_features, output)
        self.hidden_size = int(hidden) if hidden is not None else 128 * window
        self.fc1 = nn.Linear(n_readout, self.hidden_size)
        self.fc2 = nn.Linear(self.hidden_size, out_features)

    def features(self, window: Tensor) -> Tensor:
        return cast(Tensor, self.fc2(torch.relu(self.fc1(window.sum(1)))))


@register_decoder("rate-cnn")
class RateCNNDecoder(Decoder):
    def __init__(
        self, n_readout: int, window: int, out_features: int, output: str = "image", hidden: int = 2048
    ):
        super().__init__(n_readout, window, out_features, output)
        self.net = _CNNStack(window, n_readout, out_features, hidden)

    def features(self, window: Tensor) -> Tensor:
        counts = window.sum(1, keepdim=True)
        return cast(Tensor, self.net(counts.expand(-1, window.shape[1], -1)))
