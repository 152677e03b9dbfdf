"""The drifting-blob task (model.blobs): classes, lag alignment, dynamics; model.testing draws the same frames."""

from __future__ import annotations

import numpy as np
import pytest

from model import blobs
from model import testing as model_testing


def test_blob_classes_enumerate_210_patterns():
    table = blobs.blob_class_table(20)
    assert table.max() == 209 and (table == table.T).all()
    assert len(np.unique(table)) == 210


@pytest.mark.parametrize("lag", [-3, 0, 2])
def test_drifting_blobs_lag_alignment(lag):
    rng = np.random.default_rng(0)
    x, y = blobs.drifting_blobs(50, 4, lag=lag, rng=rng)
    assert x.shape == (50, 4, 20) and y.shape == (50, 4)
    assert ((x.sum(-1) >= 1) & (x.sum(-1) <= 2)).all()  # two blobs OR-ed
    # the class of the input pattern at time s
    table = blobs.blob_class_table(20)

    def cls(frame):
        on = np.flatnonzero(frame)
        return table[on[0], on[-1]]

    for t in range(5, 40):
        assert y[t, 1] == cls(x[t + lag, 1].numpy())


def test_blob_dynamics_drift():
    pos = blobs.blob_positions(400, 8, rng=np.random.default_rng(1))
    assert pos.min() >= 0 and pos.max() <= 19
    # the blob moves: consecutive positions differ most of the time, but not uniformly at random
    assert (np.diff(pos, axis=0) != 0).mean() > 0.3


def test_class_patterns_invert_the_class_table():
    table = blobs.blob_class_table(20)
    pats = blobs.class_patterns(20)
    assert pats.shape == (210, 20)
    for i, j in [(0, 0), (3, 17), (19, 19), (5, 6)]:
        assert pats[table[i, j]].nonzero().flatten().tolist() == sorted({i, j})


def test_testing_frames_are_the_generators_frames():
    """model.testing.drifting_blobs is the task's input as uint8, not a second generator."""
    pos = blobs.blob_positions(60, 3, 20, np.random.default_rng(7))
    want = blobs.blob_frames(pos, 20).astype(np.uint8)
    got = model_testing.drifting_blobs(60, batch=3, seed=7)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    x, _ = blobs.drifting_blobs(60, 3, rng=np.random.default_rng(7))
    assert np.array_equal(x.numpy().astype(np.uint8), want)


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError):
        blobs.blob_positions(-1, 2)
    with pytest.raises(ValueError):
        blobs.blob_positions(5, 2, n_inputs=0)
