"""Resumable training state without pickle: nested dicts of tensors -> safetensors + JSON.

A training checkpoint is a directory ``<run>/checkpoints/step-<n>/`` holding the model as
``model.save_checkpoint`` writes it (``weights.safetensors`` + ``config.json``) and the rest of
the training state (rule and optimizer state, RNG states, counters) as ``train_state.safetensors``
+ ``train_state.json``. It is written into a hidden temporary directory and renamed into place
(``os.replace``), then ``<run>/checkpoints/latest`` (a one-line text file, also replaced
atomically) names it, so a crash leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def flatten_state(
    obj: Any, tensors: dict[str, torch.Tensor] | None = None, prefix: str = "s"
) -> tuple[Any, dict]:
    """Split a nested structure into a JSON skeleton and a flat ``{name: tensor}`` dict.

    Tensors become ``{"__tensor__": name}``; dict keys are kept with their Python type recorded
    (int keys, as in ``optimizer.state_dict()``, survive the round trip).
    """
    tensors = {} if tensors is None else tensors
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {_TENSOR: name}, tensors
    if isinstance(obj, dict):
        items = []
        for i, (k, v) in enumerate(obj.items()):
            sk, _ = flatten_state(v, tensors, f"{prefix}.{i}")
            items.append([k if isinstance(k, str) else {"int": k} if isinstance(k, int) else str(k), sk])
        return {"__dict__": items}, tensors
    if isinstance(obj, list | tuple):
        out = [flatten_state(v, tensors, f"{prefix}.{i}")[0] for i, v in enumerate(obj)]
        return ({_TUPLE: out} if isinstance(obj, tuple) else out), tensors
    if isinstance(obj, np.generic):
        return obj.item(), tensors
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj, tensors
    raise TypeError(f"cannot store {type(obj).__name__} in a training state")


def unflatten_state(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skel, dict):
        if _TENSOR in skel:
            return tensors[skel[_TENSOR]]
        if _TUPLE in skel:
            return tuple(unflatten_state(v, tensors) for v in skel[_TUPLE])
        if "__dict__" in skel:
            out = {}
            for k, v in skel["__dict__"]:
                key = k["int"] if isinstance(k, dict) else k
                out[key] = unflatten_state(v, tensors)
            return out
        raise ValueError(f"bad state skeleton {skel!r}")
    if isinstance(skel, list):
        return [unflatten_state(v, tensors) for v in skel]
    return skel


def rng_state(np_rng: np.random.Generator | None, generators: dict[str, torch.Generator]) -> dict:
    """Every RNG that affects training, as a structure :func:`flatten_state` accepts."""
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    if np_rng is not None:
        st["numpy"] = json.dumps(np_rng.bit_generator.state)
    return st


def set_rng_state(
    st: dict, np_rng: np.random.Generator | None, generators: dict[str, torch.Generator]
) -> None:
    torch.set_rng_state(st["torch"])
    for k, g in generators.items():
        g.set_state(st["generators"][k])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(st["cuda"]))
    if np_rng is not None and "numpy" in st:
        np_rng.bit_generator.state = json.loads(st["numpy"])


def save_train_state(directory: Path, state: dict) -> None:
    """Write ``train_state.safetensors`` + ``train_state.json`` into ``directory``."""
    skel, tensors = flatten_state(state)
    # safetensors refuses tensors that share memory and empty names; clone() above avoids sharing
    save_file(tensors, str(directory / "train_state.safetensors"))
    (directory / "train_state.json").write_text(json.dumps(skel) + "\n")


def load_train_state(directory: Path) -> dict:
    tensors = load_file(str(directory / "train_state.safetensors"))
    skel = json.loads((directory / "train_state.json").read_text())
    return unflatten_state(skel, tensors)


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_training_checkpoint(run_dir: Path, step: int, write: Any, keep: int = 2) -> Path:
    """Create ``run_dir/checkpoints/step-<step>`` atomically; ``write(tmp_dir)`` fills it.

    Older checkpoints beyond the newest ``keep`` are deleted after ``latest`` points at the new one.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:09d}-", dir=root))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)
        if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic_text(root / "latest", final.name + "\n")
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete ``step-*`` directory, else None."""
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        p = root / pointer.read_text().strip()
        if (p / "train_state.json").is_file():
            return p
    done = sorted(p for p in root.glob("step-*") if (p / "train_state.json").is_file())
    return done[-1] if done else None
