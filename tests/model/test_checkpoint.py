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
