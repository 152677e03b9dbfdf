"""Checkpoint round trip and refusal of anything corrupt."""

from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from model.naturalizer import OnlineNaturalizer
from model.testing import random_spike_frames, tiny_naturalizer


@pytest.fixture()
def ckpt(tmp_path):
    nat = tiny_naturalizer(input_shape=(2, 6, 6), hidden=(12,), n_readout=8, tau_d=4, decoder="mlp",
                           decoder_options={"hidden": 20}, preprocessing={"roi": [1, 2, 6, 6]})
    d = save_checkpoint(tmp_path / "ck", nat, {"rule": "vdib", "lr": 1e-3}, {"judge_acc": 0.5},
                        {"data": "synthetic", "seed": 0})
    return nat, d


def test_roundtrip_identical_outputs(ckpt):
    nat, d = ckpt
    assert (d / "weights.safetensors").is_file() and (d / "config.json").is_file()
    loaded, meta = load_checkpoint(d)
    assert meta["format_version"] == 1 and meta["training"]["rule"] == "vdib"
    assert meta["metrics"]["judge_acc"] == 0.5 and meta["provenance"]["data"] == "synthetic"
    assert meta["code_version"] and meta["model"]["decoder"] == "mlp"
    assert loaded.config == nat.config
    for (k, a), (k2, b) in zip(nat.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    frames = random_spike_frames(10, (2, 6, 6), seed=3)
    o1 = OnlineNaturalizer(nat, torch.Generator().manual_seed(1))
    o2 = OnlineNaturalizer(loaded, torch.Generator().manual_seed(1))
    for f in frames:
        assert torch.equal(o1.push(f), o2.push(f))
    assert torch.equal(o1.decode(), o2.decode())
    assert not loaded.training


def _edit_json(d, fn):
    meta = json.loads((d / "config.json").read_text())
    fn(meta)
    (d / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: (d / "config.json").unlink(), "missing"),
        (lambda d: (d / "weights.safetensors").unlink(), "missing"),
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text("[1, 2]"), "JSON object"),
        (lambda d: _edit_json(d, lambda m: m.update(format_version=99)), "format_version"),
        (lambda d: _edit_json(d, lambda m: m["model"].update(decoder="transformer")), "unknown decoder"),
        (lambda d: _edit_json(d, lambda m: m["model"]["encoder"].update(hidden=[13])), "shape"),
        (lambda d: _edit_json(d, lambda m: m["model"].update(bogus=1)), "invalid model config"),
        (lambda d: _edit_json(d, lambda m: m["model"]["encoder"].update(n_inputs=5)), "invalid model config"),
        (lambda d: _edit_json(d, lambda m: m["tensors"]["encoder.readout_bias"].update(dtype="float16")), "dtype"),
    ],
)
def test_corrupt_checkpoint_raises_checkpoint_error(ckpt, corrupt, message):
    _, d = ckpt
    corrupt(d)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(d)


def test_truncated_weights_raise(ckpt):
    _, d = ckpt
    data = (d / "weights.safetensors").read_bytes()
    (d / "weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(d)
    # without the digest the parser itself must refuse the truncated file
    _edit_json(d, lambda m: m.pop("weights_sha256"))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(d)


def test_garbage_and_pickle_refused(ckpt, tmp_path):
    nat, d = ckpt
    _edit_json(d, lambda m: m.pop("weights_sha256"))
    torch.save(nat.state_dict(), d / "weights.safetensors")  # a pickle in disguise
    with pytest.raises(CheckpointError):
        load_checkpoint(d)
    (d / "weights.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(CheckpointError):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_wrong_tensor_set_and_nonfinite(ckpt, tmp_path):
    from safetensors.torch import save_file

    nat, d = ckpt
    _edit_json(d, lambda m: m.pop("weights_sha256"))
    sd = {k: v.clone() for k, v in nat.state_dict().items()}
    sd["extra"] = torch.zeros(1)
    save_file(sd, str(d / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="names differ"):
        load_checkpoint(d)
    sd.pop("extra")
    sd["encoder.readout_bias"][0] = float("nan")
    save_file(sd, str(d / "weights.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(d)


def test_read_meta_and_device(ckpt):
    _, d = ckpt
    assert read_meta(d)["tensors"]["encoder.readout_bias"]["shape"] == [8]
    model, _ = load_checkpoint(d, device="cpu")
    assert model.encoder.readout_bias.device.type == "cpu"


def _fuzz_ckpt_dir(tmp_path_factory):
    nat = tiny_naturalizer(input_shape=(1, 3, 3), hidden=(4,), n_readout=3, tau_d=2, image_shape=(2, 2))
    return nat, save_checkpoint(tmp_path_factory.mktemp("fuzz") / "ck", nat)


def _mutations(data: bytes, positions: list[int], values: list[int]) -> bytes:
    b = bytearray(data)
    for p, v in zip(positions, values):
        b[p % len(b)] = v
    return bytes(b)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.sampled_from(["config.json", "weights.safetensors"]),
    positions=st.lists(st.integers(0, 10**6), min_size=1, max_size=4),
    values=st.lists(st.integers(0, 255), min_size=4, max_size=4),
    truncate=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_fuzzed_checkpoint_loads_or_raises_checkpoint_error(tmp_path_factory, which, positions, values, truncate):
    _, d = _fuzz_ckpt_dir(tmp_path_factory)
    if which == "weights.safetensors":  # without the digest, so the parser and checks are exercised
        _edit_json(d, lambda m: m.pop("weights_sha256"))
    path = d / which
    data = _mutations(path.read_bytes(), positions, values)
    if truncate is not None:
        data = data[: truncate % (len(data) + 1)]
    path.write_bytes(data)
    try:
        model, _ = load_checkpoint(d)
    except CheckpointError:
        return
    # if it loaded, it must still be a usable model
    n_in = model.config.encoder.n_inputs
    y, img = model(torch.zeros(3, 1, n_in), torch.Generator().manual_seed(0))
    assert img.shape == (1, *model.config.image_shape)


def test_huge_model_config_is_refused_without_allocating(ckpt):
    _, d = ckpt
    _edit_json(d, lambda m: m["model"]["encoder"].update(hidden=[50_000_000]))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(d)  # built on the meta device first: no 3.6 G-value allocation
