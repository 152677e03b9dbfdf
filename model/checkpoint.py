"""Self-describing checkpoints (STYLE.md 5): ``weights.safetensors`` + ``config.json``; never pickles.

``config.json``::

    {
      "format_version": 1,
      "kind": "vdib-naturalizer",
      "model": NaturalizerConfig.to_dict(),
      "training": {...}, "metrics": {...}, "provenance": {...},
      "code_version": "git describe or package version",
      "created_utc": "...",
      "tensors": {"name": {"shape": [...], "dtype": "float32"}, ...},
      "weights_sha256": "hex digest of weights.safetensors",
      "quantization": {"name": {"scheme": "int4", "group": 64} | {"scheme": "int8"}, ...}  # optional
    }

Optional weight-only quantization (``save_checkpoint(..., quantize="int4")``) keeps large
checkpoints small: a tensor listed under ``quantization`` is stored as integer codes plus float16
scales and dequantized to its manifest dtype at load time (``int4``: two 4-bit codes per byte,
``w = (code - 8) * scale``, one scale per group of ``group`` consecutive values of a row;
``int8``: ``w = code * scale``, one scale per slice along the first dimension). The manifest keeps
the logical name, shape and dtype, so everything downstream sees an ordinary float model.

:func:`load_checkpoint` rebuilds the model from ``model``, then checks the weight file's digest,
the tensor names, shapes and dtypes against both the JSON manifest and the freshly built model.
Anything else raises :class:`CheckpointError` with what is wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

from .decoders import DECODERS
from .naturalizer import Naturalizer, NaturalizerConfig
from .scene import SceneNaturalizer, SceneNaturalizerConfig

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "QUANTIZE_SCHEMES",
    "save_checkpoint",
    "load_checkpoint",
    "code_version",
    "quantize_int4",
    "dequantize_int4",
    "quantize_int8",
    "dequantize_int8",
]

FORMAT_VERSION = 1
KIND = "vdib-naturalizer"
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
_MAX_CONFIG_BYTES = 16 << 20
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
QUANTIZE_SCHEMES = ("int4", "int8")
_INT4_GROUP = 64
_INT4_MIN_NUMEL = 1_000_000  # "int4": 2-D weights at least this large (the decoders' big layers) ...
_INT8_MIN_NUMEL = 65_536  # ... and every other float tensor of >= 2 dims this large goes to int8


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt, or does not describe a model this code can build."""


def code_version() -> str:
    """``git describe --always --dirty`` of this source tree, else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        if out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return "vdib " + version("vdib")
    except Exception:  # noqa: BLE001 - metadata may be absent in a bare checkout
        return "unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, allow_nan=True, default=str))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} is not JSON-serialisable: {exc}") from exc


def quantize_int4(w: torch.Tensor, group: int = _INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit codes of a 2-D tensor, one float16 scale per ``group`` values of a row.

    Returns ``(packed uint8 [rows, cols // 2], scales float16 [rows, cols // group])``; codes are
    ``round(w / scale) + 8`` in 1..15 with ``scale = max|w| / 7`` over the group (even columns in
    the low nibble). Re-quantizing :func:`dequantize_int4`'s output gives the same codes and scales.
    """
    if w.ndim != 2 or w.shape[1] % group or group % 2:
        raise ValueError(
            f"int4 needs a 2-D tensor whose row length is a multiple of an even group, got {tuple(w.shape)}"
        )
    g = w.detach().float().reshape(w.shape[0], -1, group)
    scale = (g.abs().amax(-1, keepdim=True) / 7).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (torch.round(g / safe).clamp(-7, 7) + 8).to(torch.uint8).reshape(w.shape[0], -1)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale.squeeze(-1).half().contiguous()


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` (float32)."""
    rows, half = packed.shape
    q = torch.empty((rows, 2 * half), dtype=torch.float32)
    q[:, 0::2] = (packed & 0x0F).float()
    q[:, 1::2] = (packed >> 4).float()
    group = 2 * half // scale.shape[1]
    return ((q - 8).reshape(rows, -1, group) * scale.float().unsqueeze(-1)).reshape(rows, 2 * half)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes (int8, same shape), one float16 scale per slice along dim 0."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = (flat.abs().amax(-1) / 127).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(flat / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape).contiguous(), scale.half().contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int8` (float32)."""
    return (q.float().reshape(q.shape[0], -1) * scale.float()[:, None]).reshape(q.shape)


def _quantization_plan(tensors: dict[str, torch.Tensor], scheme: str) -> dict[str, dict[str, Any]]:
    plan: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not t.is_floating_point() or t.ndim < 2:
            continue
        if (
            scheme == "int4"
            and t.ndim == 2
            and t.numel() >= _INT4_MIN_NUMEL
            and t.shape[1] % _INT4_GROUP == 0
        ):
            plan[name] = {"scheme": "int4", "group": _INT4_GROUP}
        elif t.numel() >= _INT8_MIN_NUMEL:
            plan[name] = {"scheme": "int8"}
    return plan


def save_checkpoint(
    directory: str | os.PathLike[str],
    naturalizer: Naturalizer | SceneNaturalizer,
    training_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    quantize: str | None = None,
) -> Path:
    """Write ``directory/weights.safetensors`` and ``directory/config.json`` (atomically each).

    Returns the directory path. The extra dicts must be JSON-serialisable (non-JSON leaves are
    stored as strings). ``quantize="int4"`` stores 2-D weights of >= 1M values with 4-bit codes
    (groups of 64) and other weights of >= 64k values with 8-bit codes; ``"int8"`` stores every
    weight of >= 64k values with 8-bit codes. Metrics measured before quantizing must be
    re-measured on the saved model.
    """
    from safetensors.torch import save_file

    if quantize is not None and quantize not in QUANTIZE_SCHEMES:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_SCHEMES}, got {quantize!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in naturalizer.state_dict().items()}
    plan = _quantization_plan(tensors, quantize) if quantize else {}
    stored = {k: v for k, v in tensors.items() if k not in plan}
    for name, how in plan.items():
        if how["scheme"] == "int4":
            stored[name + ".q4"], stored[name + ".q4scale"] = quantize_int4(tensors[name], how["group"])
        else:
            stored[name + ".q8"], stored[name + ".q8scale"] = quantize_int8(tensors[name])
    tmp_w = out / (WEIGHTS + ".tmp")
    save_file(stored, str(tmp_w), metadata={"format_version": str(FORMAT_VERSION), "kind": KIND})
    os.replace(tmp_w, out / WEIGHTS)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "model": naturalizer.config.to_dict(),
        "training": _jsonable(training_config or {}, "training_config"),
        "metrics": _jsonable(metrics or {}, "metrics"),
        "provenance": _jsonable(provenance or {}, "provenance"),
        "code_version": code_version(),
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "tensors": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)} for k, v in tensors.items()},
        "weights_sha256": _sha256(out / WEIGHTS),
    }
    if plan:
        meta["quantization"] = plan
    tmp_c = out / (CONFIG + ".tmp")
    tmp_c.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(tmp_c, out / CONFIG)
    return out


def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check ``config.json`` without touching the weights."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist or is not a directory")
    cfg_path = d / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing (a checkpoint needs {CONFIG} and {WEIGHTS})")
    if cfg_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise CheckpointError(f"{cfg_path}: larger than {_MAX_CONFIG_BYTES} bytes")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{cfg_path}: top level must be a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path}: format_version {version!r} is not supported (this code reads {FORMAT_VERSION})"
        )
    if meta.get("kind", KIND) != KIND:
        raise CheckpointError(f"{cfg_path}: kind {meta.get('kind')!r} is not {KIND!r}")
    for key in ("model", "tensors"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{cfg_path}: missing or invalid {key!r} object")
    return meta


def _dequantize_all(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], manifest: dict[str, Any], w_path: Path
) -> dict[str, torch.Tensor]:
    """Replace the stored codes + scales of every tensor under ``meta["quantization"]`` by floats."""
    plan = meta.get("quantization", {})
    if not isinstance(plan, dict):
        raise CheckpointError(f"{w_path.parent / CONFIG}: 'quantization' must be an object")
    out = dict(tensors)
    for name, how in plan.items():
        spec = manifest.get(name)
        if not isinstance(spec, dict) or not isinstance(how, dict):
            raise CheckpointError(f"{w_path.parent / CONFIG}: quantized tensor {name!r} not in the manifest")
        shape = [int(v) for v in spec.get("shape", [])] if isinstance(spec.get("shape"), list) else []
        dtype = _DTYPES.get(str(spec.get("dtype")))
        if dtype is None or not shape:
            raise CheckpointError(
                f"{w_path.parent / CONFIG}: quantized tensor {name!r} needs a float dtype and a shape"
            )
        scheme = how.get("scheme")
        if scheme == "int4":
            group = how.get("group")
            codes, scale = out.pop(name + ".q4", None), out.pop(name + ".q4scale", None)
            if codes is None or scale is None:
                raise CheckpointError(f"{w_path}: int4 tensor {name!r}: codes or scales missing")
            ok = (
                isinstance(group, int)
                and group > 0
                and group % 2 == 0
                and len(shape) == 2
                and shape[1] % group == 0
                and codes.dtype == torch.uint8
                and scale.dtype == torch.float16
                and tuple(codes.shape) == (shape[0], shape[1] // 2)
                and tuple(scale.shape) == (shape[0], shape[1] // group)
            )
            if not ok:
                raise CheckpointError(
                    f"{w_path}: int4 tensor {name!r} is inconsistent with its shape {shape}"
                )
            value = dequantize_int4(codes, scale)
        elif scheme == "int8":
            codes, scale = out.pop(name + ".q8", None), out.pop(name + ".q8scale", None)
            if codes is None or scale is None:
                raise CheckpointError(f"{w_path}: int8 tensor {name!r}: codes or scales missing")
            if not (
                codes.dtype == torch.int8
                and scale.dtype == torch.float16
                and list(codes.shape) == shape
                and tuple(scale.shape) == (shape[0],)
            ):
                raise CheckpointError(
                    f"{w_path}: int8 tensor {name!r} is inconsistent with its shape {shape}"
                )
            value = dequantize_int8(codes, scale)
        else:
            raise CheckpointError(
                f"{w_path.parent / CONFIG}: tensor {name!r}: unknown quantization scheme {scheme!r}"
            )
        out[name] = value.to(dtype)
    return out


def load_checkpoint(
    directory: str | os.PathLike[str], device: torch.device | str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`: returns ``(naturalizer, meta)``.

    ``naturalizer`` is a :class:`Naturalizer` (the digit family) or, when ``model.family`` is
    ``"scene"``, a :class:`model.scene.SceneNaturalizer`.

    The model is in eval mode on ``device`` (default CPU). Raises :class:`CheckpointError` for a
    missing file, bad JSON, unsupported version, unknown decoder, a weight file that does not
    match its digest or cannot be parsed, and any tensor name, shape or dtype mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    meta = read_meta(d)
    model_cfg = meta["model"]
    config: NaturalizerConfig | SceneNaturalizerConfig
    build: Any
    if model_cfg.get("family") == "scene":  # the general-scene model (model/scene.py)
        build = SceneNaturalizer
        try:
            config = SceneNaturalizerConfig.from_dict(model_cfg)
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{d / CONFIG}: invalid scene model config: {exc}") from exc
    else:
        build = Naturalizer
        dec = model_cfg.get("decoder")
        if dec not in DECODERS:
            raise CheckpointError(f"{d / CONFIG}: unknown decoder {dec!r}; known: {sorted(DECODERS)}")
        try:
            config = NaturalizerConfig.from_dict(model_cfg)
        except (TypeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{d / CONFIG}: invalid model config: {exc}") from exc
    # refuse absurd sizes before allocating (a hostile config could ask for terabytes)
    manifest = meta["tensors"]
    try:
        n_values = sum(math.prod(int(s) for s in spec["shape"]) for spec in manifest.values())
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{d / CONFIG}: invalid tensor manifest: {exc}") from exc
    if n_values > 4_000_000_000:
        raise CheckpointError(f"{d / CONFIG}: manifest declares {n_values} values, refusing")

    w_path = d / WEIGHTS
    if not w_path.is_file():
        raise CheckpointError(f"{w_path}: missing")
    digest = meta.get("weights_sha256")
    if digest is not None and digest != _sha256(w_path):
        raise CheckpointError(f"{w_path}: sha256 does not match config.json (corrupt or replaced file)")
    try:
        tensors = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{w_path}: not a readable safetensors file: {exc}") from exc
    tensors = _dequantize_all(tensors, meta, manifest, w_path)

    # shapes first on the meta device: a hostile config must not make us allocate its model
    try:
        with torch.device("meta"):
            expected = build(config).state_dict()
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{d / CONFIG}: cannot build the model: {exc}") from exc
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{w_path}: tensor names differ from the model: missing {missing}, unexpected {extra}"
        )
    for name, ref in expected.items():
        t = tensors[name]
        spec = manifest.get(name)
        if not isinstance(spec, dict):
            raise CheckpointError(f"{d / CONFIG}: tensor {name!r} not in the manifest")
        if tuple(t.shape) != tuple(ref.shape) or list(t.shape) != list(spec.get("shape", [])):
            raise CheckpointError(
                f"{w_path}: tensor {name!r} has shape {tuple(t.shape)}, model expects {tuple(ref.shape)}"
                f" (manifest {spec.get('shape')})"
            )
        if _dtype_name(t.dtype) != spec.get("dtype") or t.dtype not in _DTYPES.values():
            raise CheckpointError(
                f"{w_path}: tensor {name!r} has dtype {t.dtype}, manifest says {spec.get('dtype')}"
            )
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{w_path}: tensor {name!r} holds NaN or infinite values")
    try:
        model = build(config)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{d / CONFIG}: cannot build the model: {exc}") from exc
    expected = model.state_dict()
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    model.eval()
    if device is not None:
        model.to(device)
    return model, meta
