"""Training configs: typed sections, TOML files, ``--set key=value`` overrides.

A config has the sections ``run``, ``data``, ``model``, ``rule``, ``train`` and ``eval``, one
pydantic model each (:class:`TrainingConfig` holds them); every key, its type and its default is
below. Choices are ``Literal`` types, so a misspelt value fails when the config is loaded, before
any data is read. Values given on the command line are parsed as TOML values
(``--set train.examples=2000``, ``--set model.hidden=[256]``, ``--set rule.name="vdib"``); a bare
word that is not valid TOML is taken as a string (``--set rule.name=vdib``). The free-form tables
(``data.simulate``, ``model.decoder_options``, ``model.preprocessing``, ``rule.options``) accept
any key: their consumers (``events.simulate_mnist_dvs``, the decoder, the rule) check them.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULTS",
    "ConfigError",
    "DataConfig",
    "DataKind",
    "EvalConfig",
    "ModelConfig",
    "RuleConfig",
    "RunConfig",
    "TrainConfig",
    "TrainingConfig",
    "apply_override",
    "load_config",
    "parse_value",
    "to_toml",
]

DataKind = Literal["mnist", "simulated-mnist-dvs", "mnist-dvs", "blobs"]
WeightsDtype = Literal["float32", "float16", "bfloat16", "int8", "int4"]
#: Tables whose keys are not checked here (their consumers check them).
FREE_FORM = frozenset({"options", "simulate", "decoder_options", "preprocessing"})


class ConfigError(ValueError):
    """A config file or override is invalid."""


class _Section(BaseModel):
    # strict: no silent str -> int coercion (ints are still accepted where floats are expected)
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class RunConfig(_Section):
    dir: str = "runs/default"  # run directory: config, metrics.jsonl, plots, checkpoints
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when present, else CPU; or a torch device ("cpu", "cuda:1")
    threads: int = Field(default=0, ge=0)  # torch intra-op threads (0 = leave torch's default)
    keep_checkpoints: int = Field(default=2, ge=1)
    save: str = ""  # export the final model to this checkpoint directory ("" = run_dir/final)
    save_dtype: WeightsDtype = "float32"  # smaller stored weights; the final metrics are re-measured on them
    title: str = ""  # model card title
    notes: str = ""  # model card introduction
    command: str = ""  # how to reproduce (written into the model card)


class DataConfig(_Section):
    kind: DataKind = "mnist"
    dir: str = ""  # MNIST idx folder ("" = ../shared/data/mnist) or MNIST-DVS recordings folder
    mnist_dir: str = ""  # MNIST for DVS targets / simulation ("" = ../shared/data/mnist)
    encoding: Literal["rate", "ttfs"] = "ttfs"  # mnist only
    T: int = Field(default=30, ge=1)  # time steps per example (mnist, blobs); DVS: duration_us // dt_us
    train_limit: int = Field(default=0, ge=0)  # 0 = all training items
    test_limit: int = Field(default=0, ge=0)  # 0 = all test items
    target: Literal["source", "prototype"] = "source"  # simulated MNIST-DVS targets
    dt_us: int = Field(default=10_000, ge=1)
    duration_us: int = Field(default=2_000_000, ge=1)
    simulate: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of events.simulate_mnist_dvs
    lag: int = 0  # blobs: target lag delta
    T_test: int = Field(default=1000, ge=1)  # blobs: test sequence length
    cache_dir: str = ""
    workers: int = Field(default=1, ge=1)  # processes simulating MNIST-DVS (does not change the data)
    crop_T: int = Field(
        default=0, ge=0
    )  # event data: train on random windows of crop_T bins (0 = whole recordings)


class ModelConfig(_Section):
    hidden: list[int] = Field(default_factory=lambda: [600])
    n_readout: int = Field(default=256, ge=1)
    tau_e: int = Field(default=10, ge=1)
    n_basis: int = Field(default=8, ge=1)
    fb_memory: int = Field(default=10, ge=1)
    prior_rate: float = Field(default=0.3, gt=0.0, lt=1.0)
    decoder: str = "mlp"  # a name in model.DECODERS (checked when the model is built)
    tau_d: int = Field(default=30, ge=1)
    decoder_options: dict[str, Any] = Field(default_factory=dict)
    hidden_init: Literal["zero", "random", "calibrated"] = "calibrated"  # zero = the authors'; pitfall 3
    hidden_init_scale: float = 1.0
    hidden_active: float = Field(
        default=0.15, gt=0.0, lt=1.0
    )  # calibrated: fraction of hidden neurons active at init
    preprocessing: dict[str, Any] = Field(default_factory=dict)


class RuleConfig(_Section):
    name: Literal["vdib", "vdib-bptt"] = "vdib"  # a name in model.RULES
    lr: float = Field(default=1e-3, gt=0.0)
    beta: float = Field(default=1e-3, ge=0.0)
    options: dict[str, Any] = Field(default_factory=dict)  # rule-specific keyword arguments


class TrainConfig(_Section):
    examples: int = Field(default=200_000, ge=1)  # training examples seen (global, all ranks)
    batch_size: int = Field(default=32, ge=1)  # global batch size (split across DDP ranks)
    log_every: int = Field(default=20, ge=1)  # steps between metrics.jsonl records
    eval_every: int = Field(default=20_000, ge=1)  # examples between evaluations
    checkpoint_every: int = Field(default=20_000, ge=1)  # examples between checkpoints
    max_seconds: float = Field(default=0, ge=0)  # stop (with a checkpoint) after this wall time; 0 = no limit
    stop_after_steps: int = Field(
        default=0, ge=0
    )  # stop (with a checkpoint) after this many steps of this invocation


class EvalConfig(_Section):
    limit: int = Field(default=1000, ge=0)  # test items for periodic evaluations (0 = all)
    final_limit: int = Field(default=0, ge=0)  # test items for the final evaluation (0 = all)
    judge: str = ""  # judge checkpoint ("" = checkpoints/judge)
    batch_size: int = Field(default=500, ge=1)


class TrainingConfig(_Section):
    """A whole training config; ``TrainingConfig()`` is the defaults."""

    run: RunConfig = Field(default_factory=lambda: RunConfig())
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    rule: RuleConfig = Field(default_factory=lambda: RuleConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig())

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        if self.data.kind in ("simulated-mnist-dvs", "mnist-dvs") and self.data.crop_T:
            if self.data.crop_T * self.data.dt_us > self.data.duration_us:
                raise ValueError("data.crop_T bins are longer than data.duration_us")
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (JSON/TOML-ready): what checkpoints store as their ``training`` section."""
        return self.model_dump()

    def copy_with(self, overrides: list[str]) -> TrainingConfig:
        """A validated copy with ``dotted.key=value`` overrides applied."""
        d = self.to_dict()
        for item in overrides:
            apply_override(d, item)
        return _validate(d)


#: Every key and its default, as a plain dict.
DEFAULTS: dict[str, dict[str, Any]] = TrainingConfig().to_dict()


def _merge(base: dict[str, Any], over: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        where = f"{path}{k}"
        if k not in out:
            raise ConfigError(f"unknown config key {where!r}")
        if isinstance(out[k], dict) and k not in FREE_FORM:
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


def apply_override(cfg: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override to a config dict in place (free-form tables accept new keys)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not KEY=VALUE")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if p not in node or not isinstance(node[p], dict):
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r}")
        node = node[p]
    free = parts[-2] in FREE_FORM if len(parts) > 1 else False
    if parts[-1] not in node and not free:
        raise ConfigError(f"unknown config key {key!r}")
    node[parts[-1]] = parse_value(text.strip())


def _validate(d: dict[str, Any]) -> TrainingConfig:
    try:
        return TrainingConfig.model_validate(d)
    except ValidationError as exc:
        msgs = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e["loc"]) or "config"
            msgs.append(f"{where}: {e['msg']} (got {e.get('input')!r})" if where != "config" else e["msg"])
        raise ConfigError("; ".join(msgs)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainingConfig:
    """Read a TOML config (``None``: defaults only), merge onto the defaults, apply overrides, validate."""
    user: dict[str, Any] = {}
    if path is not None:
        try:
            user = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    d = _merge(DEFAULTS, user)
    for item in overrides or []:
        apply_override(d, item)
    return _validate(d)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise ConfigError(f"cannot write {v!r} as TOML")


def to_toml(cfg: TrainingConfig | dict[str, dict[str, Any]]) -> str:
    """Serialise a config back to TOML (tables of scalars, lists and inline tables)."""
    d = cfg.to_dict() if isinstance(cfg, TrainingConfig) else cfg
    lines = []
    for section, table in d.items():
        lines.append(f"[{section}]")
        for k, v in table.items():
            lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
