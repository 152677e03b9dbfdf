"""Images and spikes out: the hand-written PNG encoder decodes to the exact pixels with PIL;
spike bit-packing round-trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.render import event_rgb, gif, pack_spikes, png_encode, png_gray, png_rgb, to_uint8, unpack_spikes


@pytest.mark.parametrize("shape", [(28, 28), (1, 1), (7, 13), (26, 26, 3), (3, 40, 3)])
def test_png_roundtrip(shape):
    px = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    im = Image.open(io.BytesIO(png_encode(px)))
    im.load()  # checks CRCs and the zlib stream
    assert im.mode == ("L" if len(shape) == 2 else "RGB")
    assert np.array_equal(np.asarray(im), px)


def test_png_gray_rounds_and_clips():
    img = np.array([[-0.2, 0.0, 0.5], [0.999, 1.0, 1.7]])
    got = np.asarray(Image.open(io.BytesIO(png_gray(img))))
    assert got.tolist() == [[0, 0, 128], [255, 255, 255]]
    assert np.array_equal(got, to_uint8(img))


def test_event_rgb_colours():
    f = np.zeros((2, 2, 3, 3), np.uint8)
    f[0, 0, 0, 0] = 1  # off in bin 0
    f[1, 1, 2, 2] = 1  # on in bin 1
    rgb = event_rgb(f)
    assert rgb[0, 0].tolist() == [255, 0, 0] and rgb[2, 2].tolist() == [0, 255, 0]
    assert rgb.sum() == 2 * 255
    merged = event_rgb(np.ones((1, 1, 2, 2), np.uint8))
    assert (merged == 255).all()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_rgb(rgb)))), rgb)


def test_spike_packing_roundtrip():
    rng = np.random.default_rng(1)
    for n in (1, 8, 16, 13, 256):
        s = (rng.random((5, n)) < 0.4).astype(np.uint8)
        data = pack_spikes(s)
        assert len(data) == 5 * ((n + 7) // 8)
        assert np.array_equal(unpack_spikes(data, 5, n), s)
    # bit order: neuron j is bit j % 8 of byte j // 8
    one = np.zeros((1, 16), np.uint8)
    one[0, 9] = 1
    assert pack_spikes(one) == bytes([0, 2])


def test_gif_frames():
    frames = [np.full((4, 4), v) for v in (0.0, 0.5, 1.0)]
    im = Image.open(io.BytesIO(gif(frames, 30.0)))
    assert im.n_frames == 3 and im.size == (4, 4)
