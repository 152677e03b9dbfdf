"""The MNIST idx reader: round trip, gzip, the shared files, and typed errors for bad files."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from events import EventFormatError
from events.mnist_idx import load_mnist, read_idx


def _idx(arr: np.ndarray, code: int) -> bytes:
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", n) for n in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip_uint8_and_int32(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(-3, 10, 5).astype(np.int32)
    for name, arr, code in (("i", imgs, 0x08), ("l", labels, 0x0C)):
        data = _idx(arr, code)
        (tmp_path / name).write_bytes(gzip.compress(data) if gz else data)
    np.testing.assert_array_equal(read_idx(tmp_path / "i"), imgs)
    np.testing.assert_array_equal(read_idx(tmp_path / "l"), labels)


def test_shared_test_set_matches_its_documented_md5(shared_mnist: Path) -> None:
    x, y = load_mnist(shared_mnist / "t10k-images-idx3-ubyte.gz", shared_mnist / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    raw = gzip.decompress((shared_mnist / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(raw).hexdigest() == "2646ac647ad5339dbf082846283269ea"
    assert x.tobytes() == raw[16:]


@pytest.mark.parametrize(
    "data, what",
    [
        (b"", "bad magic"),
        (b"\x01\x00\x08\x01" + b"\x00" * 8, "bad magic"),
        (b"\x00\x00\x42\x01\x00\x00\x00\x01\x00", "unsupported idx type"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated idx header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x10" + b"\x00" * 3, "truncated idx data"),
        (b"\x1f\x8b\x08\x00garbage", "cannot read idx file"),
    ],
)
def test_bad_files_raise_event_format_error(tmp_path: Path, data: bytes, what: str) -> None:
    p = tmp_path / "bad"
    p.write_bytes(data)
    with pytest.raises(EventFormatError, match=what):
        read_idx(p)


def test_mismatched_counts_are_refused(tmp_path: Path) -> None:
    (tmp_path / "i").write_bytes(_idx(np.zeros((3, 2, 2), np.uint8), 0x08))
    (tmp_path / "l").write_bytes(_idx(np.zeros(4, np.uint8), 0x08))
    with pytest.raises(EventFormatError, match="disagree"):
        load_mnist(tmp_path / "i", tmp_path / "l")
