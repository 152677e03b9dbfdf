"""Bad input (issue 2, section 6): every failure is an EventFormatError saying what and where;
nothing else escapes a reader. Hypothesis fuzzes every reader with random bytes and with
mutations and truncations of the real recordings."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events import EVENT_DTYPE, EventFormatError, Recording, read, write_aedat4
from events.formats import aedat4 as aedat4_mod
from events.readers import FORMATS
from tests.conftest import SHARED_DATA

EVENTS_DIR = SHARED_DATA / "events"
SAMPLES = sorted(p for p in EVENTS_DIR.glob("*/*") if p.is_file()) if EVENTS_DIR.exists() else []
#: the first 64 kB of each real recording (keeps every fuzz example fast)
HEADS = {p.name: p.read_bytes()[: 1 << 16] for p in SAMPLES}

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_FILES = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_outcome(data: bytes, fmt: str | None) -> None:
    """Only two outcomes are allowed: a valid Recording or an EventFormatError."""
    try:
        rec = read(data, format=fmt)
    except EventFormatError as exc:
        assert str(exc)
        return
    assert isinstance(rec, Recording)
    assert rec.events.dtype == EVENT_DTYPE
    assert rec.width > 0 and rec.height > 0
    if len(rec):
        assert np.all(np.diff(rec.events["t"]) >= 0)
        assert int(rec.events["x"].max()) < rec.width and int(rec.events["y"].max()) < rec.height


@FUZZ
@given(data=st.binary(max_size=4096), fmt=st.sampled_from([None, *FORMATS]))
def test_random_bytes(data: bytes, fmt: str | None):
    _check_outcome(data, fmt)


@FUZZ
@given(
    prefix=st.sampled_from(
        [
            b"#!AER-DAT2.0\r\n",
            b"#!AER-DAT3.1\r\n#!END-HEADER\r\n",
            b"#!AER-DAT4.0\r\n",
            b"% evt 3.0\n",
            b"% evt 2.0\n",
            b"% Version 2\n",
            b"\x93NUMPY",
            b"PK\x03\x04",
            b"Event Stream\x02\x00\x00\x01\x40\x00\x30\x00",
            b"Event Stream\x02\x00\x00\x02\x40\x00\x30\x00",
            b"Event Stream\x02\x00\x00\x04\x40\x00\x30\x00",
            b"Event Stream\x02\x00\x00\x00",
        ]
    ),
    body=st.binary(max_size=2048),
)
def test_random_bytes_behind_each_magic(prefix: bytes, body: bytes):
    _check_outcome(prefix + body, None)


@pytest.mark.skipif(not SAMPLES, reason="shared data absent")
@FUZZ_FILES
@given(
    name=st.sampled_from(sorted(HEADS) or ["-"]),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
    cut=st.floats(0.0, 1.0),
    as_format=st.booleans(),
)
def test_mutated_and_truncated_real_files(name: str, edits, cut: float, as_format: bool):
    data = bytearray(HEADS[name])
    for pos, value in edits:
        data[int(pos * len(data))] = value
    data = data[: max(0, int(cut * len(data)))] if cut < 1.0 else data
    fmt = read_format_of(name) if as_format else None
    _check_outcome(bytes(data), fmt)


def read_format_of(name: str) -> str:
    return {".aedat4": "aedat4", ".raw": "evt2", ".dat": "dat", ".bin": "nmnist"}.get(
        Path(name).suffix, "aedat31" if "aedat31" in name else "aedat2"
    )


# ---- specific bad inputs: what is wrong, and where --------------------------------------------


def _aedat2(words, header=b"#!AER-DAT2.0\r\n"):
    return header + b"".join(struct.pack(">II", a, t) for a, t in words)


def test_truncated_aedat2_word_says_where():
    data = _aedat2([(0, 1), (0, 2)])[:-3]
    with pytest.raises(EventFormatError, match="truncated") as err:
        read(data)
    assert err.value.offset == len(b"#!AER-DAT2.0\r\n") + 8


def test_wrong_magic():
    with pytest.raises(EventFormatError, match="unknown AEDAT version"):
        read(b"#!AER-DAT9.9\r\n" + bytes(16))
    with pytest.raises(EventFormatError, match="magic"):
        read(b"#!AER-DAT4.1\r\n" + bytes(64), format="aedat4")


def test_time_going_backwards_raises_beyond_tolerance_and_sorts_within():
    a = (1 << 8) | (1 << 1)
    with pytest.raises(EventFormatError, match="backwards") as err:
        read(_aedat2([(a, 5_000_000), (a, 6_000_000), (a, 100)]))
    assert err.value.offset == len(b"#!AER-DAT2.0\r\n") + 16
    rec = read(_aedat2([(a, 1000), (a, 995), (a, 1010)]))
    np.testing.assert_array_equal(rec.events["t"], [995, 1000, 1010])
    assert rec.metadata["time_backsteps"] == 1


def test_coordinates_outside_the_sensor():
    header = b"#!AER-DAT2.0\r\n# AEChip: eu.seebetter.ini.chips.davis.DAVIS240C\r\n"
    with pytest.raises(EventFormatError, match="outside the 240x180 sensor"):
        read(_aedat2([((10 << 22) | (300 << 12), 1)], header))
    evt2 = b"% evt 2.0\n% geometry 640x480\n" + struct.pack("<2I", 0x8000_0000, (1 << 28) | (700 << 11) | 5)
    with pytest.raises(EventFormatError, match="outside the 640x480") as err:
        read(evt2)
    assert err.value.offset == len(b"% evt 2.0\n% geometry 640x480\n") + 4


def test_absurd_headers():
    with pytest.raises(EventFormatError, match="absurd"):
        read(b"% evt 2.0\n% geometry 100000x100000\n" + struct.pack("<I", 0x8000_0000))
    pkt = struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 1 << 30, 1 << 30, 1 << 30)
    with pytest.raises(EventFormatError, match="runs past the end") as err:
        read(b"#!AER-DAT3.1\r\n#!END-HEADER\r\n" + pkt)
    assert err.value.packet == 0
    bad = struct.pack("<hhiiiiii", 1, 1, -8, 4, 0, 1, 1, 1)
    with pytest.raises(EventFormatError, match="absurd packet header"):
        read(b"#!AER-DAT3.1\r\n#!END-HEADER\r\n" + bad)
    with pytest.raises(EventFormatError, match="not supported"):
        read(b"% Version 2\n" + bytes([0x55, 8]) + bytes(8))
    with pytest.raises(EventFormatError, match="runs past the end"):
        read(b"#!AER-DAT4.0\r\n" + struct.pack("<I", 1 << 31) + bytes(32))


def _aedat4_with_packet(payload: bytes, compression: int) -> bytes:
    """A valid AEDAT 4 header (taken from our writer) followed by one hand-made packet."""
    from events.writers import _DESCRIPTION, _ioheader

    desc = _DESCRIPTION.format(compression="X", width=64, height=64, source="t")
    head = _ioheader(compression, desc)
    return (
        b"#!AER-DAT4.0\r\n"
        + struct.pack("<I", len(head))
        + head
        + struct.pack("<iI", 0, len(payload))
        + payload
    )


def test_corrupt_compressed_packet_names_the_packet(tmp_path: Path):
    ev = np.zeros(5000, EVENT_DTYPE)
    ev["t"] = np.arange(5000)
    path = tmp_path / "a.aedat4"
    write_aedat4(path, ev, 64, 64, packet_events=1000)
    data = bytearray(path.read_bytes())
    # overwrite the middle of the 3rd packet's LZ4 blocks
    pos = data.index(b"#!AER-DAT4.0\r\n") + 14
    pos += 4 + struct.unpack_from("<I", data, pos)[0]
    for _ in range(2):
        pos += 8 + struct.unpack_from("<iI", data, pos)[1]
    size = struct.unpack_from("<iI", data, pos)[1]
    data[pos + 8 + size // 2 : pos + 8 + size // 2 + 16] = b"\xff" * 16
    with pytest.raises(EventFormatError, match="AEDAT4") as err:
        read(bytes(data))
    assert err.value.packet == 2


def test_decompression_bomb_is_stopped_before_inflating(monkeypatch):
    zstandard = pytest.importorskip("zstandard")
    lz4_frame = pytest.importorskip("lz4.frame")
    monkeypatch.setattr(aedat4_mod, "MAX_PACKET_BYTES", 8 << 20)
    zeros = bytes(64 << 20)
    declared = zstandard.ZstdCompressor(level=1).compress(zeros)  # frame says 64 MiB
    hidden = zstandard.ZstdCompressor(level=1, write_content_size=False).compress(zeros)
    lz4_bomb = lz4_frame.compress(zeros, store_size=True)
    for payload, comp in ((declared, 3), (hidden, 3), (lz4_bomb, 1)):
        assert len(payload) < (1 << 20)
        with pytest.raises(EventFormatError, match="decompression bomb") as err:
            read(_aedat4_with_packet(payload, comp))
        assert err.value.packet == 0
    # and the total cap holds across packets
    with pytest.raises(EventFormatError, match="max_decompressed"):
        read(
            _aedat4_with_packet(zstandard.ZstdCompressor().compress(bytes(1 << 20)), 3), max_decompressed=1000
        )


def test_npz_bomb_and_truncated_npy():
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("events.npy", bytes(96 << 20))  # > 64 x the archive
    with pytest.raises(EventFormatError, match="bomb"):
        read(buf.getvalue())
    good = io.BytesIO()
    np.save(good, np.zeros(100, EVENT_DTYPE))
    with pytest.raises(EventFormatError, match="truncated"):
        read(good.getvalue()[:-50])


def test_truncations_that_must_fail_say_where(tmp_path: Path):
    ev = np.zeros(3000, EVENT_DTYPE)
    ev["t"] = np.arange(3000)
    path = tmp_path / "a.aedat4"
    write_aedat4(path, ev, 64, 64, packet_events=1000)
    a4 = path.read_bytes()
    with pytest.raises(EventFormatError, match="runs past the end") as err:
        read(a4[:-10])
    assert err.value.packet == 2
    with pytest.raises(EventFormatError, match="IOHeader"):
        read(a4[:30])
    pkt = struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 2, 2, 2) + bytes(16)
    with pytest.raises(EventFormatError, match="runs past the end"):
        read(b"#!AER-DAT3.1\r\n#!END-HEADER\r\n" + pkt[:-1])
    with pytest.raises(EventFormatError, match="16-bit words") as err:
        read(b"% evt 3.0\n" + bytes(7))
    assert err.value.offset == len(b"% evt 3.0\n") + 6
    with pytest.raises(EventFormatError, match="5-byte"):
        read(bytes(11), format="nmnist")
    with pytest.raises(EventFormatError, match="8-byte"):
        read(b"% Version 2\n" + bytes([0, 8]) + bytes(12))


def test_aedat31_coordinates_outside_a_dvs128():
    header = b"#!AER-DAT3.1\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"
    data = (200 << 17) | (5 << 2) | 1  # x = 200 on a 128-wide sensor, valid mark set
    pkt = struct.pack("<hhiiiiii", 1, 1, 8, 4, 0, 1, 1, 1) + struct.pack("<Ii", data, 10)
    with pytest.raises(EventFormatError, match="outside the 128x128") as err:
        read(header + pkt)
    assert err.value.offset == len(header) + 28


def test_unsupported_variants_are_named():
    with pytest.raises(EventFormatError, match="EVT 2.1"):
        read(b"% evt 2.1\n% format EVT21;height=720;width=1280\n" + bytes(16))
    with pytest.raises(EventFormatError, match="compressed"):
        read(b"#!AER-DAT3.1\r\n#Format: SerializedTS\r\n#!END-HEADER\r\n")


def test_aedat4_ioheader_pointing_outside_itself():
    head = struct.pack("<I", 1 << 20) + b"IOHE" + bytes(16)
    with pytest.raises(EventFormatError, match="IOHeader"):
        read(b"#!AER-DAT4.0\r\n" + struct.pack("<I", len(head)) + head)


@pytest.mark.skipif(not SAMPLES, reason="shared data absent")
def test_total_cap_counts_real_sizes_of_dv_lz4_packets():
    """DV stores no LZ4 content sizes: the 255:1 bound guards each packet, but the total is
    what the packets really inflate to (a legitimate 1 MB file must not be refused as 240 MB)."""
    path = EVENTS_DIR / "aedat4" / "tonic_sample.aedat4"
    rec = read(path, max_decompressed=20 << 20)
    assert len(rec) == 111_954
    with pytest.raises(EventFormatError, match="max_decompressed"):
        read(path, max_decompressed=100_000)


# ---- Event Stream (.es): no shared .es recordings, so the seeds come from our encoder -------


def _es_seed(kind: str) -> bytes:
    from events.formats import es

    rng = np.random.default_rng({"dvs": 0, "atis": 1, "color": 2, "generic": 3}[kind])
    if kind == "generic":
        return es.encode(
            "generic",
            [
                (int(t), bytes(int(k)))
                for t, k in zip(np.cumsum(rng.integers(0, 600, 40)), rng.integers(0, 200, 40), strict=True)
            ],
        )
    dtype = {"dvs": es.DVS_RAW, "atis": es.ATIS_RAW, "color": es.COLOR_RAW}[kind]
    raw = np.zeros(300, dtype)
    raw["t"] = np.cumsum(rng.choice([0, 5, 63, 127, 254, 400, 5000], 300))
    raw["x"] = rng.integers(0, 64, 300)
    raw["y"] = rng.integers(0, 48, 300)
    for name in dtype.names[3:]:
        raw[name] = rng.integers(0, 2, 300)
    return es.encode(kind, raw, 64, 48)


ES_SEEDS = {kind: _es_seed(kind) for kind in ("dvs", "atis", "color", "generic")}


def _es_outcome(data: bytes) -> tuple[object, object]:
    """(decode's raw events or None, read's events or None): None for an EventFormatError."""
    from events.formats import es

    out: list[object] = []
    for fn in (lambda: es.decode(data)[1], lambda: read(data, format="es").events):
        try:
            out.append(fn())
        except EventFormatError as exc:
            assert str(exc)
            out.append(None)
    return out[0], out[1]


@FUZZ_FILES
@given(
    kind=st.sampled_from(sorted(ES_SEEDS)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=12),
    cut=st.floats(0.0, 1.0),
    as_format=st.booleans(),
)
def test_mutated_and_truncated_event_stream(kind: str, edits, cut: float, as_format: bool):
    """read() and the raw decode() give a result or an EventFormatError, and the compiled scan
    and the numpy scan agree on every mutated file (same events or both an error)."""
    import os

    data = bytearray(ES_SEEDS[kind])
    for pos, value in edits:
        data[int(pos * len(data))] = value
    data = data[: max(0, int(cut * len(data)))] if cut < 1.0 else data
    _check_outcome(bytes(data), "es" if as_format else None)
    old = os.environ.get("VDIB_NUMBA")
    try:
        os.environ["VDIB_NUMBA"] = "0"
        slow = _es_outcome(bytes(data))
        os.environ["VDIB_NUMBA"] = "1"
        fast = _es_outcome(bytes(data))
    finally:
        if old is None:
            os.environ.pop("VDIB_NUMBA", None)
        else:
            os.environ["VDIB_NUMBA"] = old
    for a, b in zip(slow, fast, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)
