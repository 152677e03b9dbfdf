"""Reader for the idx files MNIST ships in (``*-idx3-ubyte``, ``*-idx1-ubyte``, optionally gzipped).

numpy only, bounded, and typed errors: the files a user points at are input like any other.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ._types import EventFormatError

_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_BYTES = 1 << 30


def read_idx(path: str | Path) -> np.ndarray:
    """Read one idx file (gzip detected by magic) into an array of its declared shape."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as g:
                    data = g.read(_MAX_BYTES + 1)
            else:
                data = f.read(_MAX_BYTES + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise EventFormatError(f"{path}: cannot read idx file: {exc}") from exc
    if len(data) > _MAX_BYTES:
        raise EventFormatError(f"{path}: idx file larger than {_MAX_BYTES} bytes")
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise EventFormatError(f"{path}: not an idx file (bad magic)", offset=0)
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise EventFormatError(f"{path}: unsupported idx type 0x{code:02x} / {ndim} dims", offset=2)
    if len(data) < 4 + 4 * ndim:
        raise EventFormatError(f"{path}: truncated idx header", offset=4)
    shape = tuple(int(v) for v in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    start = 4 + 4 * ndim
    if len(data) - start < need:
        raise EventFormatError(
            f"{path}: truncated idx data: {len(data) - start} bytes, header says {need}", offset=start
        )
    return np.frombuffer(data, dtype, count=need // dtype.itemsize, offset=start).reshape(shape).copy()


def load_mnist(images: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 [N, 28, 28] and labels as int64 [N]; checks that the counts agree."""
    x = read_idx(images)
    y = read_idx(labels).astype(np.int64)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise EventFormatError(f"MNIST files disagree: images {x.shape}, labels {y.shape}")
    return x, y
