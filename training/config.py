"""Training configs: TOML files with defaults, ``--set key=value`` overrides, validation.

A config is a nested dict with the sections ``run``, ``data``, ``model``, ``rule``, ``train`` and
``eval``; :data:`DEFAULTS` lists every key. Values given on the command line are parsed as TOML
values (``--set train.examples=2000``, ``--set model.hidden=[256]``, ``--set rule.name="vdib"``);
a bare word that is not valid TOML is taken as a string (``--set rule.name=vdib``).
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {
        "dir": "runs/default",  # run directory: config, metrics.jsonl, plots, checkpoints
        "seed": 0,
        "device": "auto",  # "auto" = CUDA when present, else CPU
        "threads": 0,  # torch intra-op threads (0 = leave torch's default)
        "keep_checkpoints": 2,
        "save": "",  # export the final model to this checkpoint directory ("" = run_dir/final)
        "save_dtype": "float32",  # float16 / bfloat16 / int8 / int4 shrink the shipped checkpoint (metrics re-measured)
        "title": "",  # model card title
        "notes": "",  # model card introduction
        "command": "",  # how to reproduce (written into the model card)
    },
    "data": {
        "kind": "mnist",  # mnist | simulated-mnist-dvs | mnist-dvs | blobs
        "dir": "",  # MNIST idx folder ("" = ../shared/data/mnist) or MNIST-DVS recordings folder
        "mnist_dir": "",  # MNIST for DVS targets / simulation ("" = ../shared/data/mnist)
        "encoding": "ttfs",  # mnist: rate | ttfs
        "T": 30,  # time steps per example (mnist, blobs); DVS: duration_us // dt_us
        "train_limit": 0,  # 0 = all training items
        "test_limit": 0,  # 0 = all test items
        "target": "source",  # simulated MNIST-DVS: source | prototype
        "dt_us": 10_000,
        "duration_us": 2_000_000,
        "simulate": {},  # keyword arguments of events.simulate_mnist_dvs
        "lag": 0,  # blobs: target lag delta
        "T_test": 1000,  # blobs: test sequence length
        "cache_dir": "",
        "workers": 1,  # processes simulating MNIST-DVS (does not change the data)
        "crop_T": 0,  # event data: train on random windows of crop_T bins (0 = whole recordings)
    },
    "model": {
        "hidden": [600],
        "n_readout": 256,
        "tau_e": 10,
        "n_basis": 8,
        "fb_memory": 10,
        "prior_rate": 0.3,
        "decoder": "mlp",
        "tau_d": 30,
        "decoder_options": {},
        "hidden_init": "calibrated",  # zero (authors) | random | calibrated (pitfall 3)
        "hidden_init_scale": 1.0,
        "hidden_active": 0.15,  # calibrated: fraction of hidden neurons active at init
        "preprocessing": {},
    },
    "rule": {
        "name": "vdib",  # a name in model.RULES: vdib | vdib-bptt | ...
        "lr": 1e-3,
        "beta": 1e-3,
        "options": {},  # rule-specific keyword arguments
    },
    "train": {
        "examples": 200_000,  # training examples seen (global, all ranks)
        "batch_size": 32,  # global batch size (split across DDP ranks)
        "log_every": 20,  # steps between metrics.jsonl records
        "eval_every": 20_000,  # examples between evaluations
        "checkpoint_every": 20_000,  # examples between checkpoints
        "max_seconds": 0,  # stop (with a checkpoint) after this wall time; 0 = no limit
        "stop_after_steps": 0,  # stop (with a checkpoint) after this many steps of this invocation
    },
    "eval": {
        "limit": 1000,  # test items for periodic evaluations
        "final_limit": 0,  # test items for the final evaluation (0 = all)
        "judge": "",  # judge checkpoint ("" = checkpoints/judge)
        "batch_size": 500,
    },
}


class ConfigError(ValueError):
    """A config file or override is invalid."""


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        where = f"{path}{k}"
        if k not in out:
            raise ConfigError(f"unknown config key {where!r}")
        if isinstance(out[k], dict) and k not in ("options", "simulate", "decoder_options", "preprocessing"):
            if not isinstance(v, dict):
                raise ConfigError(f"{where!r} must be a table")
            out[k] = _merge(out[k], v, where + ".")
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``[600]``, ``"x"``, ``true``, ``{a = 1}``); else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(cfg: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` override in place (free-form tables accept new keys)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if p not in node or not isinstance(node[p], dict):
            raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r}")
        node = node[p]
    free = parts[-2] in ("options", "simulate", "decoder_options", "preprocessing") if len(parts) > 1 else False
    if parts[-1] not in node and not free:
        raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = parse_value(text.strip())


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """Read a TOML config (``None``: defaults only), merge onto :data:`DEFAULTS`, apply overrides."""
    user: dict = {}
    if path is not None:
        try:
            user = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    cfg = _merge(DEFAULTS, user)
    for item in overrides or []:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Reject values that cannot work before any data is loaded."""
    d, t = cfg["data"], cfg["train"]
    if d["kind"] not in ("mnist", "simulated-mnist-dvs", "mnist-dvs", "blobs"):
        raise ConfigError(f"data.kind {d['kind']!r} is not mnist, simulated-mnist-dvs, mnist-dvs or blobs")
    if d["kind"] == "mnist" and d["encoding"] not in ("rate", "ttfs"):
        raise ConfigError(f"data.encoding {d['encoding']!r} is not rate or ttfs")
    if t["batch_size"] < 1 or t["examples"] < 1:
        raise ConfigError("train.batch_size and train.examples must be >= 1")
    if cfg["model"]["tau_d"] < 1:
        raise ConfigError("model.tau_d must be >= 1")


def to_toml(cfg: dict) -> str:
    """Serialise a config dict back to TOML (tables of scalars, lists and inline tables)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {val(x)}" for k, x in v.items()) + "}"
        raise ConfigError(f"cannot write {v!r} as TOML")

    lines = []
    for section, table in cfg.items():
        lines.append(f"[{section}]")
        for k, v in table.items():
            lines.append(f"{k} = {val(v)}")
        lines.append("")
    return "\n".join(lines)
