"""ONNX export: onnxruntime parity with torch (potentials, probabilities, spikes, images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from model.onnx_export import OnnxEngine, export_onnx, state_to_list  # noqa: E402
from model.testing import random_spike_frames, tiny_naturalizer  # noqa: E402


@pytest.mark.parametrize("hidden,decoder", [((24, 16), "linear"), ((), "cnn")])
def test_onnx_parity_over_a_sequence(tmp_path, hidden, decoder):
    opts = {"decoder_options": {"hidden": 16}} if decoder == "cnn" else {}
    nat = tiny_naturalizer(
        input_shape=(2, 6, 6), hidden=hidden, n_readout=12, tau_d=5, decoder=decoder, **opts
    )
    paths = export_onnx(nat, tmp_path)
    assert paths["encoder"].is_file() and paths["decoder"].is_file()
    eng = OnnxEngine(tmp_path)
    B, T = 3, 25
    frames = random_spike_frames(T, (B, 2, 6, 6), rate=0.2, seed=1).flatten(2).float()
    uni = torch.rand(T, B, 12, generator=torch.Generator().manual_seed(4))
    st_t = nat.encoder.init_state(B)
    st_o = eng.init_state(B)
    for a, b in zip(state_to_list(st_t), st_o):
        assert a.shape == b.shape
    window = np.zeros((B, 5, 12), np.float32)
    n_spikes = 0
    for t in range(T):
        with torch.no_grad():
            y_t, u_t, st_t = nat.encoder.step_detailed(frames[t], st_t, uni[t])
        y_o, u_o, p_o, st_o = eng.step(frames[t].numpy(), st_o, uni[t].numpy())
        assert np.abs(u_o - u_t.numpy()).max() <= 1e-4
        assert np.abs(p_o - torch.sigmoid(u_t).numpy()).max() <= 1e-4
        np.testing.assert_array_equal(y_o, y_t.numpy())
        n_spikes += int(y_o.sum())
        window = np.concatenate([window[:, 1:], y_o[:, None]], 1)
    assert 0 < n_spikes < T * B * 12
    img_o = eng.decode(window)
    with torch.no_grad():
        img_t = nat.decode(torch.from_numpy(window))
    assert img_o.shape == (B, 28, 28)
    assert np.abs(img_o - img_t.numpy()).max() <= 1e-4
    assert eng.providers[0] == "CPUExecutionProvider"


def test_onnx_engine_batch_one_and_bad_device(tmp_path):
    nat = tiny_naturalizer(input_shape=(1, 4, 4), hidden=(8,), n_readout=6, tau_d=3)
    export_onnx(nat, tmp_path)
    eng = OnnxEngine(tmp_path)
    st = eng.init_state(1)
    y, u, p, st = eng.step(np.ones((1, 16), np.float32), st, np.full((1, 6), 0.5, np.float32))
    assert y.shape == (1, 6) and set(np.unique(y)) <= {0.0, 1.0}
    assert eng.decode(np.zeros((1, 3, 6), np.float32)).shape == (1, 28, 28)
    with pytest.raises(ValueError):
        OnnxEngine(tmp_path, device="tpu")
