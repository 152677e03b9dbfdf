"""`vdib time-vs-rate`: seeds averaged, gaps per budget and per tau_d, files written."""

from __future__ import annotations

import json


def _line(cell, acc, examples, **extra):
    """A cell record as `vdib table1` appends it: identity fields, then results (the name is for people)."""
    enc, dec, rest = cell.split("-", 2)
    rule, seed = rest.rsplit("-s", 1)
    return (
        json.dumps(
            {
                "cell": cell,
                "encoding": enc,
                "decoding": dec,
                "rule": rule,
                "seed": int(seed),
                "examples": examples,
                "judge_accuracy": acc,
                **extra,
            }
        )
        + "\n"
    )


def test_time_vs_rate_averages_seeds_and_pairs_cells(tmp_path):
    from training.studies.time_vs_rate import time_vs_rate

    cells = tmp_path / "cells.jsonl"
    cells.write_text(
        _line("ttfs-time-vdib-s0", 0.90, 200000)
        + _line("ttfs-time-vdib-s1", 0.92, 200000)
        + _line("ttfs-rate-vdib-s0", 0.95, 200000)
        + _line("ttfs-rate-vdib-s1", 0.93, 200000)
        + _line("rate-time-vdib-bptt-s0", 0.80, 8000)  # no rate partner: gap unknown
    )
    tau = tmp_path / "tau.jsonl"
    tau.write_text(
        _line("ttfs-time-vdib-bptt-s0", 0.96, 80000, tau_d=5)
        + _line("ttfs-rate-vdib-bptt-s0", 0.97, 80000, tau_d=5)
        + _line("ttfs-rate-vdib-bptt-s0", 0.970, 80000, tau_d=30)
        + _line("ttfs-time-vdib-bptt-s0", 0.975, 80000, tau_d=30, parameter_matched=True)
    )
    res = time_vs_rate(cells, tmp_path / "out", tau)
    by = {(r["encoding"], r["rule"], r["key"][0]): r for r in res["budget"]}
    r = by[("ttfs", "vdib", 200000)]
    assert r["seeds"] == 2 and abs(r["time"] - 91.0) < 1e-9 and abs(r["rate"] - 94.0) < 1e-9
    assert abs(r["time_minus_rate"] + 3.0) < 1e-9 and abs(r["time_std"] - 1.0) < 1e-9
    assert by[("rate", "vdib-bptt", 8000)]["time_minus_rate"] is None
    gaps = {(r["key"][0], r["key"][1]): r["time_minus_rate"] for r in res["tau_d"]}
    assert abs(gaps[(5, False)] + 1.0) < 1e-9
    # the parameter-matched time decoder is compared with the rate decoder of the same tau_d and budget
    assert abs(gaps[(30, True)] - 0.5) < 1e-9
    md = (tmp_path / "out" / "time_vs_rate.md").read_text()
    assert "| ttfs | `vdib` | 200000 | 2 | 91.00 ± 1.00 % | 94.00 ± 1.00 % | -3.00 |" in md
    assert "parameter-matched" in md
    assert (tmp_path / "out" / "time_vs_rate.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "time_vs_rate.json").read_text())["budget"]


def test_time_vs_rate_groups_by_variant_and_needs_cell_fields(tmp_path):
    import pytest

    from training.studies.common import CellError
    from training.studies.time_vs_rate import time_vs_rate

    cells = tmp_path / "cells.jsonl"
    rec = {"encoding": "rate", "rule": "vdib", "seed": 0, "examples": 10}
    cells.write_text(
        "".join(
            json.dumps({**rec, "decoding": d, "variant": "vdib-lr", "judge_accuracy": a}) + "\n"
            for d, a in (("time", 0.5), ("rate", 0.4))
        )
    )
    res = time_vs_rate(cells, tmp_path / "out")
    assert [(r["rule"], round(r["time_minus_rate"], 6)) for r in res["budget"]] == [("vdib-lr", 10.0)]
    cells.write_text(json.dumps({"cell": "rate-time-vdib-s0", "examples": 10, "judge_accuracy": 0.5}) + "\n")
    with pytest.raises(CellError):  # a record without its fields is an error, not parsed out of the name
        time_vs_rate(cells, tmp_path / "out")
