"""Typed training configs: TOML files, --set overrides, validation errors, round trips."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from training import config as C

REPO = Path(__file__).resolve().parents[2]


def test_overrides_and_errors():
    cfg = C.load_config(
        None, ["train.examples=10", "rule.name=vdib-bptt", "model.hidden=[8, 4]", "rule.options.n_samples=3"]
    )
    assert isinstance(cfg, C.TrainingConfig)
    assert cfg.train.examples == 10 and cfg.rule.name == "vdib-bptt"
    assert cfg.model.hidden == [8, 4] and cfg.rule.options == {"n_samples": 3}
    with pytest.raises(C.ConfigError, match="unknown config key 'train.nope'"):
        C.load_config(None, ["train.nope=1"])
    with pytest.raises(C.ConfigError, match="data.kind"):
        C.load_config(None, ['data.kind="video"'])
    with pytest.raises(C.ConfigError, match="KEY=VALUE"):
        C.load_config(None, ["train.examples"])


@pytest.mark.parametrize(
    "item",
    [
        "data.encoding=poisson",  # not a Literal choice
        "rule.name=sgd",  # not a rule
        "run.save_dtype=int3",
        "model.hidden_init=ones",
        "train.examples=0",  # bounds
        "train.batch_size=-1",
        "model.tau_d=0",
        "model.prior_rate=1.5",
        'train.examples="10"',  # strict: no str -> int coercion
        "train.examples=1.5",
        'model.hidden=["a"]',
        "model=3",  # a section is a table
    ],
)
def test_bad_values_are_config_errors_before_any_data(item):
    with pytest.raises(C.ConfigError):
        C.load_config(None, [item])


def test_free_form_tables_take_new_keys_and_sections_do_not():
    cfg = C.load_config(
        None, ["model.decoder_options.hidden=64", "data.simulate.noise_hz=0.5", "model.preprocessing.note=x"]
    )
    assert cfg.model.decoder_options == {"hidden": 64} and cfg.data.simulate == {"noise_hz": 0.5}
    with pytest.raises(C.ConfigError):
        C.load_config(None, ["run.nothing.deeper=1"])


def test_toml_file_errors_are_config_errors(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nexamples = [\n")
    with pytest.raises(C.ConfigError):
        C.load_config(p)
    p.write_text("[training]\nexamples = 3\n")
    with pytest.raises(C.ConfigError, match="unknown config key 'training'"):
        C.load_config(p)
    with pytest.raises(C.ConfigError):
        C.load_config(tmp_path / "missing.toml")


def test_defaults_round_trip_through_toml():
    back = C.load_config(None, [])
    assert back == C.TrainingConfig()
    assert C._merge(C.DEFAULTS, tomllib.loads(C.to_toml(back))) == back.to_dict()
    again = C.load_config(
        None, [f"{s}.{k}={C._toml_value(v)}" for s, t in back.to_dict().items() for k, v in t.items()]
    )
    assert again == back


def test_assignment_is_validated_and_copy_with_applies_overrides():
    cfg = C.load_config(None)
    cfg.run.dir = "runs/x"
    with pytest.raises(ValueError):
        cfg.data.kind = "video"  # type: ignore[assignment]
    other = cfg.copy_with(["run.seed=4", "model.hidden=[]"])
    assert other.run.seed == 4 and other.model.hidden == [] and other.run.dir == "runs/x"
    assert cfg.run.seed == 0  # the original is untouched
    with pytest.raises(C.ConfigError):
        cfg.copy_with(['run.seed="4"'])


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = C.load_config(path)
    assert cfg.train.examples >= 1


def test_vdib_train_reports_a_bad_config_without_a_traceback(tmp_path):
    import vdib_cli

    with pytest.raises(SystemExit, match=r"vdib train: data.encoding: .*'poisson'"):
        vdib_cli.main(
            [
                "train",
                str(REPO / "configs" / "table1" / "base.toml"),
                "--set",
                "data.encoding=poisson",
                "--run-dir",
                str(tmp_path / "run"),
            ]
        )
    assert not (tmp_path / "run").exists()
