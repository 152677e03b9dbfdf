"""The model registry: every checkpoint directory under ``settings.checkpoints_dir`` is a model.

Loaded once in the app's lifespan (never at import time). A sub-directory counts as a model when
it holds a ``config.json``; its name is the directory name. Models that fail to load are kept
with their error so ``/readyz`` and ``/v1/models`` can say why.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .engines import Engine, build_engine
from .settings import Settings

log = logging.getLogger("vdib.service")


#: Event coordinates are uint16: an ROI ends at or before this column/row.
MAX_COORD = 1 << 16


class UnknownModelError(KeyError):
    """No model of that name is loaded (HTTP 404 / close code 1003); ``args[0]`` says which are."""


class NoDefaultModelError(UnknownModelError):
    """A request names no model and none is loaded for its sensor (HTTP 422 / close code 1003)."""


class RoiError(ValueError):
    """A requested ROI cannot feed the model (maps to HTTP 422 / close code 1003)."""


@dataclass
class ModelEntry:
    """One loaded model: its engine and what the service needs to bin events for it."""

    name: str
    path: Path
    engine: Engine
    meta: dict[str, Any]
    input_shape: tuple[int, int, int]  # (C, H, W) of one spike frame
    dt_us: int
    polarity: str
    mode: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    #: "digits" (a fixed input region, e.g. mnist-dvs) or "scene" (any sensor: service/scene_engine.py)
    family: ClassVar[str] = "digits"

    def engine_for(self, input_shape: tuple[int, ...]) -> Engine:
        """The engine that steps ``input_shape`` frames (a digit model has one input shape)."""
        return self.engine

    def warmup_sensor(self) -> tuple[int, int]:
        """A sensor ``(width, height)`` to warm the model up with."""
        return self.input_shape[2], self.input_shape[1]

    def declares_sensor(self, width: int, height: int) -> bool:
        """Whether the checkpoint declares this sensor (``preprocessing.sensor``, e.g. 128x128 for
        mnist-dvs): the default-model rule gives it such recordings."""
        sensor = self.preprocessing.get("sensor")
        return isinstance(sensor, list | tuple) and list(sensor) == [width, height]

    def describe(self) -> dict[str, Any]:
        """JSON description for ``/v1/models``."""
        return {
            "name": self.name,
            "family": self.family,
            "input_shape": list(self.input_shape),
            "image_shape": list(self.engine.image_shape),
            "n_readout": self.engine.n_readout,
            "tau_d": self.engine.tau_d,
            "dt_us": self.dt_us,
            "polarity": self.polarity,
            "mode": self.mode,
            "preprocessing": self.preprocessing,
            "metrics": self.meta.get("metrics", {}),
            **self.engine.describe(),
        }

    def resolve_roi(self, sensor_w: int, sensor_h: int, roi: Any = None) -> tuple[Any, int]:
        """The ROI and integer pooling that turn a ``sensor_w x sensor_h`` sensor into the input.

        Policy (documented in docs/service.md):

        1. ``roi`` given as ``(x, y, w, h)``: ``w`` and ``h`` must be the same integer multiple
           ``p`` of the model's input width/height; the region is pooled by ``p``.
        2. ``roi`` is ``None`` or ``"default"``: the checkpoint's own ``preprocessing.roi`` when
           its ``preprocessing.sensor`` equals this sensor (e.g. the MNIST-DVS crop for a DVS128),
           else ``"centre"``.
        3. ``"centre"``: the centred ``W x H`` crop at pool 1 (the sensor must be at least that
           large; a smaller sensor gets the region at the origin, padded with silence).
        4. ``"full"``: the whole sensor pooled down: ``p = max(1, min(sensor_w // W, sensor_h // H))``
           and the centred ``p*W x p*H`` region (the few rows/columns that do not divide are cut).
        """
        from events import ROI

        c, h, w = self.input_shape
        if not (0 < sensor_w <= MAX_COORD and 0 < sensor_h <= MAX_COORD):
            raise RoiError(f"sensor size must be 1 .. {MAX_COORD} per side, got {sensor_w}x{sensor_h}")
        if roi is None or roi == "default":
            pre_roi = self.preprocessing.get("roi")
            pre_sensor = self.preprocessing.get("sensor")
            if pre_roi is not None and pre_sensor is not None and tuple(pre_sensor) == (sensor_w, sensor_h):
                return self._check(ROI(*map(int, pre_roi)), sensor_w, sensor_h)
            roi = "centre"
        if roi == "centre" or roi == "center":
            x0 = max(0, (sensor_w - w) // 2)
            y0 = max(0, (sensor_h - h) // 2)
            return ROI(x0, y0, w, h), 1
        if roi == "full":
            p = max(1, min(sensor_w // w, sensor_h // h))
            return ROI(max(0, (sensor_w - p * w) // 2), max(0, (sensor_h - p * h) // 2), p * w, p * h), p
        if isinstance(roi, str):
            raise RoiError(f"roi must be 'x,y,w,h', 'centre', 'full' or 'default', got {roi!r}")
        try:
            x, y, rw, rh = (int(v) for v in roi)
        except (TypeError, ValueError) as exc:
            raise RoiError(f"roi must be four integers x,y,w,h, got {roi!r}") from exc
        return self._check(ROI(x, y, rw, rh), sensor_w, sensor_h)

    def _check(self, roi: Any, sensor_w: int, sensor_h: int) -> tuple[Any, int]:
        c, h, w = self.input_shape
        if roi.x < 0 or roi.y < 0 or roi.width <= 0 or roi.height <= 0:
            raise RoiError(f"roi {tuple(roi)} must have x, y >= 0 and a positive size")
        if roi.x + roi.width > MAX_COORD or roi.y + roi.height > MAX_COORD:
            raise RoiError(f"roi {tuple(roi)} reaches past the largest event coordinate {MAX_COORD - 1}")
        if roi.x >= sensor_w or roi.y >= sensor_h:
            raise RoiError(f"roi {tuple(roi)} starts outside the {sensor_w}x{sensor_h} sensor")
        if roi.width % w or roi.height % h or roi.width // w != roi.height // h:
            raise RoiError(
                f"roi size {roi.width}x{roi.height} must be the same integer multiple of the model input {w}x{h}"
            )
        return roi, roi.width // w


class ModelRegistry:
    """Name -> :class:`ModelEntry`, plus the errors of checkpoints that did not load."""

    def __init__(self) -> None:
        self.models: dict[str, ModelEntry] = {}
        self.errors: dict[str, str] = {}
        self.skipped: list[str] = []  # checkpoints of another kind (e.g. the LeNet judge)
        self.default: str | None = None
        self.override: str | None = None  # settings.default_model: every request naming no model
        self.checkpoints_dir: Path | None = None

    @classmethod
    def load(cls, settings: Settings) -> ModelRegistry:
        reg = cls()
        root = Path(settings.checkpoints_dir)
        reg.checkpoints_dir = root
        if not root.is_dir():
            reg.errors["*"] = "the checkpoints directory does not exist"
            log.warning("checkpoints directory %s does not exist", root)
            return reg
        try:
            subs = sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())
        except OSError as exc:
            reg.errors["*"] = f"checkpoints directory cannot be listed: {type(exc).__name__}"
            return reg
        for sub in subs:
            if not _is_naturalizer(sub):
                reg.skipped.append(sub.name)
                continue
            try:
                reg.models[sub.name] = load_entry(sub, settings)
            except (Exception, RecursionError) as exc:  # noqa: BLE001 - a broken checkpoint must not stop the others
                reg.fail(sub.name, exc)
        if not reg.models and not reg.errors:
            reg.errors["*"] = "no checkpoint (a sub-directory with config.json) in the checkpoints directory"
        if settings.default_model is not None:
            reg.override = settings.default_model
            if settings.default_model in reg.models:
                reg.default = settings.default_model
            else:
                reg.errors["default"] = f"default model {settings.default_model!r} is not loaded"
        elif "mnist-dvs" in reg.models:
            reg.default = "mnist-dvs"
        elif reg.models:
            reg.default = sorted(reg.models)[0]
        return reg

    def fail(self, name: str, exc: BaseException) -> None:
        """Record that model ``name`` failed to load (or to warm up) and drop it: the error goes
        to the log in full and to ``errors`` without file-system paths."""
        log.warning("model %s failed to load: %s: %s", name, type(exc).__name__, exc)
        self.models.pop(name, None)
        msg = f"{type(exc).__name__}: {exc}"
        if self.checkpoints_dir is not None:
            for prefix in (str(self.checkpoints_dir.resolve()), str(self.checkpoints_dir)):
                msg = msg.replace(prefix + "/", "").replace(prefix, "<checkpoints>")
        self.errors[name] = re.sub(r"(?<![\w.])/[^\s'\":]+", "<path>", msg)[:500]
        if self.default == name:
            self.default = None
            self.errors["default"] = f"default model {name!r} failed"

    @property
    def public_reason(self) -> str:
        """:attr:`ready`'s reason for unauthenticated callers: service-level errors, and only
        the names of the models that failed (their errors are at ``/v1/models``)."""
        ok, reason = self.ready
        if ok:
            return reason
        parts = [f"{k}: {v}" for k, v in self.errors.items() if k in ("*", "default")]
        failed = sorted(k for k in self.errors if k not in ("*", "default"))
        if failed:
            parts.append(f"checkpoints that failed to load: {', '.join(failed)} (details at /v1/models)")
        return "; ".join(parts) or "no model loaded"

    @property
    def ready(self) -> tuple[bool, str]:
        """Whether the service can serve requests, and why not."""
        if self.default is None:
            reasons = "; ".join(f"{k}: {v}" for k, v in self.errors.items()) or "no model loaded"
            return False, reasons
        return True, "ok"

    def pick(self, name: str | None, width: int, height: int) -> tuple[ModelEntry, str]:
        """The model for a request with a ``width x height`` sensor, and why (README, "Which model"):

        1. the model the request names;
        2. else ``settings.default_model`` when set;
        3. else the model whose checkpoint declares this sensor (``mnist-dvs``: the 128x128 DVS128
           of MNIST-DVS; ``mnist-dvs`` first when several do);
        4. else the general-scene model ``scenes`` (else the first scene-family model by name);
        5. else none: :class:`NoDefaultModelError` (a digit model never gets another sensor's
           recording by default).
        """
        if name:
            return self.get(name), "named in the request"
        if self.override is not None:
            return self.get(self.override), "the service's default_model setting"
        w, h = int(width), int(height)
        declared = sorted(n for n, e in self.models.items() if e.declares_sensor(w, h))
        if declared:
            n = "mnist-dvs" if "mnist-dvs" in declared else declared[0]
            return self.models[n], f"default for a {w}x{h} sensor: the model whose checkpoint declares it"
        scenes = sorted(n for n, e in self.models.items() if e.family == "scene")
        if scenes:
            n = "scenes" if "scenes" in scenes else scenes[0]
            return self.models[n], f"default for a {w}x{h} sensor: the general-scene model (any sensor)"
        known = ", ".join(sorted(self.models)) or "none"
        raise NoDefaultModelError(
            f"no model is loaded for a {w}x{h} sensor by default (loaded: {known}; none declares this sensor "
            "and no general-scene model is loaded): name one with model="
        )

    def get(self, name: str | None) -> ModelEntry:
        """The named model (or the default); :class:`UnknownModelError` with a message when absent."""
        key = name or self.default
        if key is None or key not in self.models:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModelError(f"unknown model {name!r} (loaded: {known})")
        return self.models[key]


def _is_naturalizer(path: Path) -> bool:
    """False for checkpoints of another kind (the LeNet judge has no ``kind: vdib-naturalizer``);
    unreadable ones count as naturalizers so that their load error is reported."""
    import json

    from model.checkpoint import KIND

    try:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON, nested too deep
        return True
    return not isinstance(meta, dict) or meta.get("kind") == KIND


def load_entry(path: Path, settings: Settings) -> ModelEntry:
    """Load one checkpoint directory and build its engine."""
    import torch

    from model import load_checkpoint

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    naturalizer, meta = load_checkpoint(path)
    cfg = naturalizer.config
    if getattr(cfg, "family", None) == "scene":  # the general-scene model: any sensor
        from .scene_engine import load_scene_entry

        return load_scene_entry(path, settings, naturalizer, meta)
    shape = tuple(int(v) for v in cfg.input_shape)
    if len(shape) != 3 or min(shape) <= 0 or max(shape) > MAX_COORD:
        raise ValueError(f"input_shape {list(cfg.input_shape)} must be three positive sizes (C, H, W)")
    if not 0 < int(cfg.dt_us) <= 10_000_000:
        raise ValueError(f"dt_us {cfg.dt_us} must be in 1 .. 10000000")
    engine = build_engine(settings.engine, naturalizer, settings.device, settings.decoder_dtype)
    if settings.warmup:
        engine.warmup()
    return ModelEntry(
        name=path.name,
        path=path,
        engine=engine,
        meta=meta,
        input_shape=tuple(int(v) for v in cfg.input_shape),  # type: ignore[arg-type]
        dt_us=int(cfg.dt_us),
        polarity=str(cfg.polarity),
        mode=str(cfg.mode),
        preprocessing=dict(getattr(cfg, "preprocessing", {}) or {}),
    )
