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
    nat = tiny_naturalizer(
        input_shape=(2, 6, 6),
        hidden=(12,),
        n_readout=8,
        tau_d=4,
        decoder="mlp",
        decoder_options={"hidden": 20},
        preprocessing={"roi": [1, 2, 6, 6]},
    )
    d = save_checkpoint(
        tmp_path / "ck",
        nat,
        {"rule": "vdib", "lr": 1e-3},
        {"judge_acc": 0.5},
        {"data": "synthetic", "seed": 0},
    )
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
        (
            lambda d: _edit_json(d, lambda m: m["tensors"]["encoder.readout_bias"].update(dtype="float16")),
            "dtype",
        ),
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
def test_fuzzed_checkpoint_loads_or_raises_checkpoint_error(
    tmp_path_factory, which, positions, values, truncate
):
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


# --- weight-only quantization -------------------------------------------------------------


def test_int4_codes_bound_error_and_requantize_identically():
    from model.checkpoint import dequantize_int4, quantize_int4

    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 256)
    w[3, :64] = 0.0  # an all-zero group keeps scale 0 and decodes to zeros
    codes, scale = quantize_int4(w, 64)
    assert codes.dtype == torch.uint8 and codes.shape == (48, 128)
    assert scale.dtype == torch.float16 and scale.shape == (48, 4)
    back = dequantize_int4(codes, scale)
    err = (back - w).abs().reshape(48, 4, 64).amax(-1)
    # half a step, plus the float16 rounding of the scale (relative 2^-11 of max|w| = 7 * scale)
    assert torch.all(err <= scale.float() * (0.5 + 7 * 2.0**-10) + 1e-7)
    assert torch.equal(back[3, :64], torch.zeros(64))
    codes2, scale2 = quantize_int4(back, 64)
    assert torch.equal(codes, codes2) and torch.equal(scale, scale2)
    with pytest.raises(ValueError, match="multiple"):
        quantize_int4(torch.zeros(4, 100), 64)


def test_int8_roundtrip_error():
    from model.checkpoint import dequantize_int8, quantize_int8

    w = torch.randn(16, 30, 8, generator=torch.Generator().manual_seed(1))
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.shape == w.shape and scale.shape == (16,)
    back = dequantize_int8(codes, scale)
    assert torch.all((back - w).abs().reshape(16, -1).amax(-1) <= scale.float() * 0.51 + 1e-7)


@pytest.fixture()
def qckpt(tmp_path):
    # mlp decoder over 16 frames x 64 readouts: fc1 is [2048, 1024] (>= 1M values: int4),
    # the readout weights [64, 160, 8] and fc2 [36, 2048] (>= 64k values) to int8, the rest stays float
    nat = tiny_naturalizer(input_shape=(1, 6, 6), hidden=(160,), n_readout=64, tau_d=16, decoder="mlp")
    d = save_checkpoint(tmp_path / "q", nat, quantize="int4")
    return nat, d


def test_quantized_checkpoint_is_small_and_loads_close(qckpt, tmp_path):
    from safetensors.torch import load_file

    from model.checkpoint import dequantize_int4, quantize_int4

    nat, d = qckpt
    meta = read_meta(d)
    plan = meta["quantization"]
    assert plan["decoder.fc1.weight"] == {"scheme": "int4", "group": 64}
    assert plan["encoder.readout_ff_weight"] == {"scheme": "int8"}
    assert meta["tensors"]["decoder.fc1.weight"] == {"shape": [2048, 1024], "dtype": "float32"}
    full = save_checkpoint(tmp_path / "full", nat)
    assert (d / "weights.safetensors").stat().st_size < 0.2 * (full / "weights.safetensors").stat().st_size
    stored = load_file(str(d / "weights.safetensors"))
    assert "decoder.fc1.weight" not in stored and "decoder.fc1.weight.q4" in stored
    loaded, _ = load_checkpoint(d)
    ref = dequantize_int4(*quantize_int4(nat.state_dict()["decoder.fc1.weight"]))
    assert torch.equal(loaded.state_dict()["decoder.fc1.weight"], ref)
    for k, v in nat.state_dict().items():
        if k not in plan:
            assert torch.equal(loaded.state_dict()[k], v)
    frames = random_spike_frames(20, (1, 6, 6), seed=5)
    o1 = OnlineNaturalizer(nat, torch.Generator().manual_seed(2))
    o2 = OnlineNaturalizer(loaded, torch.Generator().manual_seed(2))
    for f in frames:
        o1.push(f), o2.push(f)
    assert (o1.decode() - o2.decode()).abs().max() < 0.1
    # saving the loaded (dequantized) model again reproduces the same file contents
    again = save_checkpoint(tmp_path / "again", loaded, quantize="int4")
    s2 = load_file(str(again / "weights.safetensors"))
    assert set(s2) == set(stored) and all(torch.equal(s2[k], stored[k]) for k in stored)


def _rewrite_weights(d, fn):
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "weights.safetensors"))
    fn(t)
    save_file(t, str(d / "weights.safetensors"))
    _edit_json(d, lambda m: m.pop("weights_sha256"))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda d: _rewrite_weights(d, lambda t: t.pop("decoder.fc1.weight.q4scale")), "missing"),
        (
            lambda d: _rewrite_weights(
                d, lambda t: t.update({"decoder.fc1.weight.q4": t["decoder.fc1.weight.q4"].to(torch.int16)})
            ),
            "inconsistent",
        ),
        (
            lambda d: _rewrite_weights(
                d,
                lambda t: t.update(
                    {"decoder.fc1.weight.q4scale": t["decoder.fc1.weight.q4scale"][:, :3].contiguous()}
                ),
            ),
            "inconsistent",
        ),
        (
            lambda d: _rewrite_weights(
                d,
                lambda t: t.update(
                    {"encoder.readout_ff_weight.q8": t["encoder.readout_ff_weight.q8"][:10].contiguous()}
                ),
            ),
            "inconsistent",
        ),
        (
            lambda d: _rewrite_weights(
                d,
                lambda t: t.update(
                    {
                        "decoder.fc1.weight.q4scale": torch.full_like(
                            t["decoder.fc1.weight.q4scale"], float("inf")
                        )
                    }
                ),
            ),
            "NaN or infinite",
        ),
        (
            lambda d: _edit_json(d, lambda m: m["quantization"]["decoder.fc1.weight"].update(scheme="int3")),
            "unknown quantization",
        ),
        (
            lambda d: _edit_json(d, lambda m: m["quantization"]["decoder.fc1.weight"].update(group=7)),
            "inconsistent",
        ),
        (
            lambda d: _edit_json(d, lambda m: m["quantization"].update({"nope": {"scheme": "int8"}})),
            "not in the manifest",
        ),
        (lambda d: _edit_json(d, lambda m: m.update(quantization=[1])), "must be an object"),
        (
            lambda d: _edit_json(d, lambda m: m["quantization"].pop("decoder.fc1.weight")),
            "tensor names differ",
        ),
    ],
)
def test_corrupt_quantized_checkpoint_raises(qckpt, corrupt, message):
    _, d = qckpt
    corrupt(d)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(d)


def test_unknown_quantize_scheme_refused(tmp_path):
    nat = tiny_naturalizer(input_shape=(1, 4, 4), hidden=(8,), n_readout=4, tau_d=2)
    with pytest.raises(ValueError, match="quantize"):
        save_checkpoint(tmp_path / "x", nat, quantize="fp8")
