"""model.batching: per-stream draws, batched states, TorchStreams (rows step, sparse decode) and
decode_segments, the one function an upload, an evaluation and a live stream decode through."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from events import BinSegment
from model import OnlineNaturalizer
from model.batching import (
    TorchStreams,
    decode_segments,
    frame_steps,
    select_rows,
    stack_states,
    stream_uniforms,
    windows_at,
)
from model.testing import random_spike_frames, tiny_naturalizer


@pytest.fixture(scope="module")
def nat():
    return tiny_naturalizer(seed=3, readout_bias=-0.5)


def test_block_uniforms_equal_per_step_draws():
    g1 = torch.Generator().manual_seed(7)
    g2 = torch.Generator().manual_seed(7)
    bulk = stream_uniforms(g1, 50, 16)
    steps = np.concatenate([torch.rand((1, 16), generator=g2).numpy() for _ in range(50)])
    assert np.array_equal(bulk, steps)


def test_stacked_streams_equal_streams_alone():
    """Streams stepped as one batch (stacked states, each stream's draws from its own generator,
    rows mode) give the spikes and images of each stream alone at batch 1 (OnlineNaturalizer)."""
    nat = tiny_naturalizer(input_shape=(2, 6, 6), hidden=(16,), n_readout=8, tau_d=5)
    streams = TorchStreams(nat, event_driven="rows", sparse_decode=False)
    n_streams, steps = 4, 12
    frames = random_spike_frames(steps, (n_streams, 2, 6, 6), rate=0.2, seed=7).flatten(2).float()
    ref = []
    for s in range(n_streams):
        on = OnlineNaturalizer(nat, torch.Generator().manual_seed(100 + s))
        ys = torch.stack([on.push(frames[t, s]) for t in range(steps)])
        ref.append((ys.numpy().astype(np.uint8), on.decode().numpy()))
    gens = [torch.Generator().manual_seed(100 + s) for s in range(n_streams)]
    state = stack_states([streams.fresh_state() for _ in range(n_streams)])
    ys = []
    for t in range(steps):
        u = np.concatenate([stream_uniforms(g, 1, 8) for g in gens])
        y, state = streams.step(frames[t].numpy(), state, u)
        ys.append(y)
    y_all = np.stack(ys)  # [T, B, N]
    zeros = np.zeros(steps, np.int64)
    for s in range(n_streams):
        # the same spikes unless a potential lies within float rounding of a threshold
        assert (y_all[:, s] == ref[s][0]).mean() >= 0.99
        if np.array_equal(y_all[:, s], ref[s][0]):
            img = streams.decode(windows_at(y_all[:, s], zeros, np.array([steps - 1]), 5))[0]
            np.testing.assert_allclose(img, ref[s][1], atol=1e-5)
    sel = select_rows(state, [2, 0])
    assert torch.equal(sel.hidden[0].p[0], state.hidden[0].p[2])


def test_frame_steps_and_windows():
    assert frame_steps(7, 3).tolist() == [2, 5, 6] and frame_steps(6, 3).tolist() == [2, 5]
    assert frame_steps(5, None).tolist() == [4] and frame_steps(0, 2).tolist() == []
    spikes = np.arange(1, 7, dtype=np.float32)[:, None]  # step i has spike value i + 1
    seg = np.array([0, 0, 0, 3, 3, 3])  # a reset before step 3
    w = windows_at(spikes, seg, np.array([1, 4]), 3)
    assert w[:, :, 0].tolist() == [[0, 1, 2], [0, 4, 5]]


@pytest.mark.parametrize("decoder", ["linear", "mlp"])
def test_sparse_decoder_equals_dense_and_ignores_batch(decoder):
    nat = tiny_naturalizer(seed=1, n_readout=32, tau_d=12, decoder=decoder)
    streams = TorchStreams(nat)
    assert streams.sparse is not None and nat.decoder.sparse_form() is not None
    rng = np.random.default_rng(0)
    win = (rng.random((9, 12, 32)) < 0.07).astype(np.float32)
    win[3] = 0.0  # an empty window: only the bias
    sparse = streams.decode(win)
    with torch.inference_mode():
        dense = nat.decoder(torch.from_numpy(win)).clamp(0, 1).reshape(sparse.shape).numpy()
    np.testing.assert_allclose(sparse, dense, atol=1e-6)
    # a window's image does not depend on the windows batched with it (beyond float rounding)
    alone = np.stack([streams.decode(win[i : i + 1])[0] for i in range(len(win))])
    np.testing.assert_allclose(alone, sparse, atol=1e-6)
    # non-binary entries are weighted, dense windows take the dense path
    scaled = win * 0.5
    with torch.inference_mode():
        np.testing.assert_allclose(
            streams.decode(scaled),
            nat.decoder(torch.from_numpy(scaled)).reshape(sparse.shape).numpy(),
            atol=1e-6,
        )
        full = np.ones((2, 12, 32), np.float32)
        np.testing.assert_allclose(
            streams.decode(full), nat.decoder(torch.from_numpy(full)).reshape(2, 28, 28).numpy(), atol=1e-5
        )
    assert tiny_naturalizer(decoder="cnn", n_readout=16).decoder.sparse_form() is None


def test_rows_step_equals_dense_step_and_ignores_the_batch(nat):
    """``event_driven="rows"`` (a server's configuration): the dense step up to float rounding,
    and a stream's state does not depend on the other streams of its batch (bit for bit)."""
    enc = nat.encoder
    rng = np.random.default_rng(0)
    b, steps = 5, 25
    n_in, n_out = enc.config.n_inputs, enc.config.n_readout
    x = (rng.random((steps, b, n_in)) < 0.06).astype(np.float32)
    x[:, 1] *= 2.0  # count-mode inputs (weighted sums)
    x[:, 2] = 0.0  # a silent stream
    u = rng.random((steps, b, n_out)).astype(np.float32)
    with torch.inference_mode():
        s_model = s_row = enc.init_state(b)
        alone = [enc.init_state(1) for _ in range(b)]
        for t in range(steps):
            xt, ut = torch.from_numpy(x[t]), torch.from_numpy(u[t])
            y_m, s_model = enc.step(xt, s_model, uniforms=ut, event_driven="never")
            y_r, s_row = enc.step(xt, s_row, uniforms=ut, event_driven="rows")
            assert torch.equal(y_m, y_r)
            for i in range(b):
                y_i, alone[i] = enc.step(xt[i : i + 1], alone[i], uniforms=ut[i : i + 1], event_driven="rows")
                assert torch.equal(y_i[0], y_r[i])
        for a, m in zip(s_row.readout, s_model.readout, strict=True):
            torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-5)
        for i in range(b):
            for a, r in zip(alone[i].readout, s_row.readout, strict=True):
                assert torch.equal(a[0], r[i])
    assert 0 < float(y_r.mean()) < 1


def test_decode_segments_equals_online_stepping_with_runs_and_resets(nat):
    """Segments (frames, a run of empty bins, a reset) decoded in one call equal an
    OnlineNaturalizer pushed the same frames, with a fresh one after the reset."""
    streams = TorchStreams(nat)
    frames = random_spike_frames(20, (2, 26, 26), rate=0.08, seed=2).numpy()
    segs = [
        BinSegment(frames[:6], np.arange(1, 7) * 10, False),
        BinSegment(frames[:0], np.array([70]), False, 5),
        BinSegment(frames[6:9], np.arange(12, 15) * 10, False),
        BinSegment(frames[9:], np.arange(100, 111) * 10, True),
    ]
    out = decode_segments(streams, segs, torch.Generator().manual_seed(4), 4, dt_us=10, step_chunk=3)
    assert len(out.spikes) == 6 + 5 + 3 + 11 and out.frame_steps.tolist() == [3, 7, 11, 15, 19, 23, 24]
    assert out.bin_end_us[6:11].tolist() == [70, 80, 90, 100, 110] and out.seg_start[13:15].tolist() == [
        0,
        14,
    ]
    g = torch.Generator().manual_seed(4)
    on = OnlineNaturalizer(nat, g)
    seq = [*frames[:6], *np.zeros((5, 2, 26, 26), np.uint8), *frames[6:9]]
    want, images = [], []
    for i, f in enumerate([*seq, *frames[9:]]):
        if i == len(seq):
            on.reset()  # the reset: fresh state and window, the generator goes on
        want.append(on.push(torch.from_numpy(np.asarray(f)).float()).numpy())
        if i in out.frame_steps:
            images.append(on.decode().numpy())
    assert np.array_equal(out.spikes, np.stack(want).astype(np.uint8))
    np.testing.assert_allclose(out.images, np.stack(images), atol=1e-5)


def test_torch_streams_configuration_leaves_the_model_alone(nat):
    before = copy.deepcopy(nat.state_dict())
    TorchStreams(nat, event_driven="rows", decoder_dtype=torch.bfloat16)
    assert not hasattr(nat.encoder, "event_driven")  # no switch on the shared module
    assert all(torch.equal(before[k], v) for k, v in nat.state_dict().items())
    assert all(p.dtype == torch.float32 for p in nat.parameters())


def test_state_helpers_take_any_nesting_of_named_tuples():
    nat = tiny_naturalizer(input_shape=(1, 4, 4), hidden=(), n_readout=4)  # no hidden layer: hidden = ()
    a, b = nat.encoder.init_state(2), nat.encoder.init_state(1)
    ab = stack_states([a, b])
    assert ab.hidden == () and ab.readout.pending.shape[0] == 3 and type(ab.readout) is type(a.readout)
    sel = select_rows(ab, [2, 0])
    assert sel.readout.fb_hist.shape[0] == 2
    nested = (torch.zeros(2, 3), (torch.ones(2, 1),))
    both = stack_states([nested, nested])
    assert both[0].shape == (4, 3) and both[1][0].shape == (4, 1)
    assert select_rows(both, [3])[1][0].shape == (1, 1)
