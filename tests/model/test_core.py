"""Neurons, encoder, decoders, naturalizer, online stepping, cross-stream batching."""

from __future__ import annotations

import math

import pytest
import torch

from model import functional as F
from model.decoders import build_decoder, decoder_names
from model.encoder import Encoder, EncoderConfig
from model.naturalizer import NaturalizerConfig, OnlineNaturalizer, sliding_windows
from model.testing import drifting_blobs, random_spike_frames, tiny_naturalizer


def test_lif_step_golden_trace():
    """Hand-computed DECOLLE traces for one neuron with one input spiking at t=0 and t=2."""
    p = F.LIFParameters()
    w = torch.tensor([[30.0]])
    b = torch.tensor([-0.5])
    st = F.lif_init_state(1, 1)
    xs = [1.0, 0.0, 1.0, 0.0]
    q = pp = r = s = 0.0
    for x in xs:
        q = 0.85 * q + 0.15 * x
        pp = 0.9 * pp + 0.1 * q
        r = 0.65 * r - s
        u = 30.0 * pp + r - 0.5
        s = float(u > 0)
        out, st, u_t = F.lif_step(torch.tensor([[x]]), st, w, b, p)
        assert u_t.item() == pytest.approx(u, abs=1e-6)
        assert out.item() == s
        # the state keeps the traces after the synapse: W Q and W P
        assert st.q.item() == pytest.approx(30 * q, abs=1e-5) and st.p.item() == pytest.approx(
            30 * pp, abs=1e-5
        )


def test_surrogate_gradient_is_sigmoid_derivative():
    u = torch.linspace(-3, 3, 13, requires_grad=True)
    F.heaviside_surrogate(u, 2.0).sum().backward()
    sg = torch.sigmoid(2.0 * u.detach())
    torch.testing.assert_close(u.grad, 2.0 * sg * (1 - sg))


@pytest.mark.parametrize("k,length", [(8, 10), (3, 5), (1, 10), (2, 2)])
def test_raised_cosine_basis_shape_and_partition(k, length):
    basis = F.raised_cosine_basis(k, length)
    assert basis.shape == (length, k)
    assert (basis >= 0).all() and (basis <= 1).all()
    if k > 1:  # no empty basis, first/last bases peak at the first/last lag
        assert (basis.max(0).values > 0.1).all()
        assert basis[0, 0] == 1.0 and basis[-1, -1] == 1.0
        assert basis.sum(1).min() > 0.4  # every lag is seen by some basis
    else:
        assert basis[0, 0] == 1.0 and basis[-1, 0] > 0


def test_srm_readout_matches_explicit_convolution():
    torch.manual_seed(0)
    n_in, n_out, tau, fb_mem, k = 5, 3, 6, 4, 3
    ffb = F.raised_cosine_basis(k, tau)
    fbb = F.raised_cosine_basis(1, fb_mem)[:, 0]
    w = torch.randn(n_out, n_in, k)
    wfb = torch.randn(n_out)
    bias = torch.randn(n_out)
    st = F.srm_init_state(1, n_out, tau, fb_mem)
    z_hist, y_hist = [], []
    for t in range(12):
        z = (torch.rand(1, n_in) < 0.5).float()
        uni = torch.rand(1, n_out)
        y, st, u = F.srm_readout_step(
            z,
            st,
            F.lag_weights(w, ffb),
            wfb,
            bias,
            F.history_kernel(fbb[:, None])[:, 0],
            uni,
            event_driven=bool(t % 2),
        )
        z_hist.append(z[0])
        # explicit: u_t = sum_{d=0}^{tau-1} sum_k W_k phi_k(d) z_{t-d} + w_fb sum_{d=1}^{fb} psi(d-1) y_{t-d} + b
        ref = bias.clone()
        for d in range(tau):
            if t - d >= 0:
                ref += torch.einsum("onk,n,k->o", w, z_hist[t - d], ffb[d])
        for d in range(1, fb_mem + 1):
            if t - d >= 0:
                ref += wfb * y_hist[t - d] * fbb[d - 1]
        torch.testing.assert_close(u[0], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(y[0], (uni[0] < torch.sigmoid(u[0])).float())
        y_hist.append(y[0])


def test_encoder_forward_equals_repeated_step_bit_for_bit():
    nat = tiny_naturalizer(input_shape=(2, 6, 6), hidden=(20, 12), n_readout=9)
    enc = nat.encoder
    x = random_spike_frames(30, (2, 6, 6), rate=0.2, seed=1).flatten(1).float()[:, None].repeat(1, 3, 1)
    y_fwd = enc(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    st = enc.init_state(3)
    ys = []
    for t in range(x.shape[0]):
        y, st = enc.step(x[t], st, g)
        ys.append(y)
    assert torch.equal(y_fwd, torch.stack(ys))
    assert 0 < y_fwd.mean() < 1  # the tiny model spikes but not always


def test_step_draws_exactly_one_rand_per_step():
    nat = tiny_naturalizer(input_shape=(1, 4, 4), hidden=(8,), n_readout=5)
    g = torch.Generator().manual_seed(3)
    st = nat.encoder.init_state(2)
    x = torch.ones(2, 16)
    _, st = nat.encoder.step(x, st, g)
    _, st = nat.encoder.step(x, st, g)
    g2 = torch.Generator().manual_seed(3)
    torch.rand((2, 5), generator=g2)
    torch.rand((2, 5), generator=g2)
    assert torch.equal(torch.rand(7, generator=g), torch.rand(7, generator=g2))


def test_uniforms_override_and_state_dtype_device():
    nat = tiny_naturalizer(input_shape=(1, 4, 4), hidden=(), n_readout=5)
    st = nat.encoder.init_state(2)
    assert st.readout.pending.dtype == torch.float32 and st.readout.pending.device.type == "cpu"
    x = torch.ones(2, 16)
    y0, _ = nat.encoder.step(x, st, uniforms=torch.zeros(2, 5))
    y1, _ = nat.encoder.step(x, st, uniforms=torch.ones(2, 5))
    assert y0.eq(1).all() and y1.eq(0).all()


def test_encoder_config_roundtrip_and_validation():
    c = EncoderConfig(n_inputs=10, hidden=[4, 3], n_readout=2)
    assert c.hidden == (4, 3)
    assert EncoderConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        EncoderConfig(n_inputs=10, prior_rate=1.5)
    with pytest.raises(ValueError):
        EncoderConfig.from_dict({"n_inputs": 3, "bogus": 1})


def test_authors_init_zero_hidden():
    enc = Encoder(EncoderConfig(n_inputs=12, hidden=(7,), n_readout=3))
    assert enc.hidden[0].weight.abs().max() == 0
    assert enc.hidden[0].bias.abs().max() <= 1e-3


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn", "rate-linear", "rate-mlp", "rate-cnn"])
@pytest.mark.parametrize("window", [1, 5, 30])
def test_decoders_shapes_and_range(name, window):
    opts = {"hidden": 16} if "mlp" in name else {}
    if "cnn" in name:
        opts = {"hidden": 32}
    dec = build_decoder(name, 16, window, 28 * 28, **opts)
    out = dec((torch.rand(4, window, 16) < 0.3).float())
    assert out.shape == (4, 784)
    assert (out >= 0).all() and (out <= 1).all()
    logits = build_decoder(name, 16, window, 10, output="logits", **opts)(
        (torch.rand(2, window, 16) < 0.3).float()
    )
    assert logits.shape == (2, 10)


def test_decoder_architectures_match_reference():
    mlp = build_decoder("mlp", 8, 5, 784)
    assert mlp.fc1.in_features == 40 and mlp.fc1.out_features == 128 * 5 and mlp.fc2.out_features == 784
    lin = build_decoder("linear", 8, 5, 784)
    assert lin.fc.in_features == 40
    cnn = build_decoder("cnn", 256, 30, 784)
    h = ((30 - 3) // 2 + 1 - 2 - 3) // 2 + 1
    w = ((256 - 3) // 2 + 1 - 2 - 3) // 2 + 1
    assert cnn.net.fc1.in_features == 8 * h * w and cnn.net.fc1.out_features == 2048
    rate = build_decoder("rate-linear", 8, 5, 784)
    win = (torch.rand(3, 5, 8) < 0.5).float()
    # rate decoders see only the counts: permuting time leaves the output unchanged
    torch.testing.assert_close(rate(win), rate(win.flip(1)))
    rcnn = build_decoder("rate-cnn", 16, 12, 10, hidden=8)
    w2 = (torch.rand(3, 12, 16) < 0.5).float()
    torch.testing.assert_close(rcnn(w2), rcnn(w2[:, torch.randperm(12)]))
    assert set(decoder_names()) >= {"linear", "mlp", "cnn", "rate-linear", "rate-mlp", "rate-cnn"}
    with pytest.raises(KeyError):
        build_decoder("nope", 8, 5, 784)


def test_sliding_windows():
    y = torch.arange(5.0).reshape(5, 1, 1)
    w = sliding_windows(y, 3)
    assert w.shape == (5, 1, 3, 1)
    assert w[0, 0, :, 0].tolist() == [0, 0, 0]
    assert w[4, 0, :, 0].tolist() == [2, 3, 4]


@pytest.mark.parametrize("decoder", ["linear", "cnn"])
def test_online_equals_batched_forward(decoder):
    opts = {"decoder_options": {"hidden": 16}} if decoder == "cnn" else {}
    nat = tiny_naturalizer(
        input_shape=(2, 8, 8), hidden=(24,), n_readout=12, tau_d=6, decoder=decoder, **opts
    )
    frames = random_spike_frames(20, (2, 8, 8), rate=0.15, seed=2)
    y_b, img_b = nat(frames[:, None], torch.Generator().manual_seed(11))
    online = OnlineNaturalizer(nat, torch.Generator().manual_seed(11))
    ys = torch.stack([online.push(f) for f in frames])
    assert torch.equal(ys, y_b[:, 0])
    img = online.decode()
    assert img.shape == (28, 28)
    assert torch.equal(img, img_b[0])
    # also mid-stream: the window after 4 frames equals the padded sliding window
    online = OnlineNaturalizer(nat, torch.Generator().manual_seed(11))
    for f in frames[:4]:
        online.push(f)
    assert torch.equal(online.window()[0], sliding_windows(y_b, 6)[3, 0])


def test_online_batch_and_reset():
    nat = tiny_naturalizer(input_shape=(1, 5, 5), hidden=(10,), n_readout=6, tau_d=4)
    frames = random_spike_frames(9, (3, 1, 5, 5), rate=0.3, seed=4)
    online = OnlineNaturalizer(nat, torch.Generator().manual_seed(0), batch=3)
    ys = online.push_many(frames)
    assert ys.shape == (9, 3, 6)
    assert online.decode().shape == (3, 28, 28)
    online.reset()
    assert online.window().abs().sum() == 0 and online.steps == 0


def test_naturalizer_config_validation_and_roundtrip():
    enc = EncoderConfig(n_inputs=2 * 26 * 26)
    cfg = NaturalizerConfig(encoder=enc, decoder="cnn", tau_d=40, preprocessing={"roi": [48, 48, 26, 26]})
    assert NaturalizerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        NaturalizerConfig(encoder=enc, input_shape=(2, 28, 28))
    with pytest.raises(ValueError):
        NaturalizerConfig.from_dict({**cfg.to_dict(), "surprise": 1})


def test_flatten_input_accepts_uint8_frames():
    nat = tiny_naturalizer(input_shape=(2, 4, 4), hidden=(), n_readout=4, tau_d=3)
    x = torch.ones(5, 1, 2, 4, 4, dtype=torch.uint8)
    y, img = nat(x, torch.Generator().manual_seed(0))
    assert y.shape == (5, 1, 4) and img.shape == (1, 28, 28)
    with pytest.raises(ValueError):
        nat(torch.ones(5, 1, 3, 4, 4))


def test_drifting_blobs_statistics():
    x = drifting_blobs(300, batch=4, seed=1)
    assert x.shape == (300, 4, 20) and x.dtype.name == "uint8"
    per_step = x.sum(-1)
    assert per_step.max() <= 2
    assert 0.3 < per_step[:50].mean() < 2.0  # A_0 = 0.5 per blob; A decays towards 0 later
    # blobs drift: the active position changes over time
    assert len({int(i) for i in x[:, 0].argmax(-1)}) > 5
    assert math.isfinite(float(x.mean()))


@pytest.mark.parametrize("weighted", [False, True])
def test_input_current_modes_agree_and_rows_ignore_the_batch(weighted):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(6, 40, generator=g) < 0.1).float()
    x[2] = 0.0  # a silent row
    if weighted:
        x = x * torch.randint(1, 4, x.shape, generator=g)  # count-mode inputs
    wt = torch.randn(40, 7, generator=g)
    dense = F.input_current(x, wt)
    for mode in (True, "rows"):
        torch.testing.assert_close(F.input_current(x, wt, event_driven=mode), dense, atol=1e-5, rtol=1e-5)
    rows = F.input_current(x, wt, event_driven="rows")
    assert torch.equal(rows[2], torch.zeros(7))
    for i in range(6):  # bit for bit the same row whatever else is in the batch
        assert torch.equal(F.input_current(x[i : i + 1], wt, event_driven="rows")[0], rows[i])


@pytest.mark.parametrize("batch", [1, 3])
def test_event_driven_step_equals_dense_step(batch):
    nat = tiny_naturalizer(input_shape=(2, 6, 6), hidden=(20,), n_readout=9)
    enc = nat.encoder
    x = random_spike_frames(15, (batch, 72), rate=0.05, seed=3).float()
    uni = torch.rand(15, batch, 9, generator=torch.Generator().manual_seed(0))
    out = {}
    for mode in ("always", "rows", "never"):
        st = enc.init_state(batch)
        us = []
        for t in range(15):
            with torch.no_grad():
                _, u, st = enc.step_detailed(x[t], st, uni[t], event_driven=mode)
            us.append(u)
        out[mode] = torch.stack(us)
    assert not hasattr(enc, "event_driven")  # an argument, not a switch on the shared module
    with pytest.raises(ValueError, match="event_driven"):
        enc.step(x[0], enc.init_state(batch), uniforms=uni[0], event_driven="sometimes")  # type: ignore[arg-type]
    torch.testing.assert_close(out["always"], out["never"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["rows"], out["never"], atol=1e-5, rtol=1e-5)
    sparse = torch.zeros(batch, 72)
    sparse[:, 3] = 1
    with torch.no_grad():
        assert enc._use_events(sparse) == (batch <= enc.event_max_batch)
        assert not enc._use_events(torch.ones(batch, 72))  # dense input: GEMM
    assert not enc._use_events(sparse)  # autograd on: always the dense, differentiable path


def test_derived_weight_cache_follows_in_place_updates():
    nat = tiny_naturalizer(input_shape=(1, 4, 4), hidden=(8,), n_readout=5)
    enc = nat.encoder
    with torch.no_grad():
        a = enc.lag_weight_t().clone()
        enc.readout_ff_weight.mul_(2.0)
        torch.testing.assert_close(enc.lag_weight_t(), 2 * a)
        h = enc.hidden_weight_t(0).clone()
        enc.hidden[0].weight.add_(1.0)
        torch.testing.assert_close(enc.hidden_weight_t(0), h + 1.0)


def test_reconstruct_fast_path_matches_forward_given_spikes():
    nat = tiny_naturalizer(input_shape=(2, 5, 5), hidden=(16,), n_readout=8, tau_d=4)
    x = random_spike_frames(10, (3, 2, 5, 5), rate=0.2, seed=0)
    y, img = nat.reconstruct(x, torch.Generator().manual_seed(0))
    assert y.shape == (10, 3, 8) and img.shape == (3, 28, 28)
    torch.testing.assert_close(img, nat.decode(sliding_windows(y, 4)[-1]))
    y2, imgs = nat.reconstruct(x, torch.Generator().manual_seed(0), every_step=True)
    assert torch.equal(y, y2) and imgs.shape == (10, 3, 28, 28)
    torch.testing.assert_close(imgs[-1], img)


def _dense_decoder(dec, w):
    """The decoder's output written out with plain ``F.linear`` (no sparse path)."""
    first = dec.fc1 if dec.name == "mlp" else dec.fc
    h = torch.nn.functional.linear(w.flatten(1), first.weight, first.bias)
    if dec.name == "mlp":
        h = dec.fc2(torch.relu(h))
    return torch.sigmoid(h)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_sparse_first_layer_equals_dense(name):
    dec = build_decoder(name, 16, 6, 20, **({"hidden": 12} if name == "mlp" else {}))
    w = (torch.rand(2, 6, 16, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    with torch.no_grad():
        fast = dec(w)  # no autograd, small sparse batch: the active-column path
        torch.testing.assert_close(fast, _dense_decoder(dec, w), atol=1e-6, rtol=1e-5)
        dense_before = _dense_decoder(dec, w)
        (dec.fc1 if name == "mlp" else dec.fc).weight.mul_(2.0)
        # the cached transpose follows the in-place update: still the dense result
        torch.testing.assert_close(dec(w), _dense_decoder(dec, w), atol=1e-6, rtol=1e-5)
        assert not torch.allclose(dec(w), dense_before)


def test_caches_filled_under_inference_mode_work_in_autograd_code():
    nat = tiny_naturalizer(input_shape=(1, 4, 4), hidden=(8,), n_readout=5, tau_d=3, image_shape=(2, 2))
    x = (torch.rand(1, 16) < 0.2).float()
    win = (torch.rand(1, 3, 5) < 0.2).float()
    with torch.inference_mode():
        nat.encoder.step(x, nat.encoder.init_state(1), uniforms=torch.rand(1, 5))
        nat.decoder(win)
    for p in nat.parameters():
        p.requires_grad_(False)
    xg = x.clone().requires_grad_(True)
    y, st = nat.encoder.step(xg, nat.encoder.init_state(1), uniforms=torch.rand(1, 5))
    wg = win.clone().requires_grad_(True)
    nat.decoder(wg).sum().backward()  # frozen decoder, gradient into the window
    assert wg.grad is not None and torch.isfinite(wg.grad).all()
