"""What the studies share: where they write, and their cells recorded as JSON data.

A *cell* is one training run of a study grid. Its identity (study, encoding, decoding, rule,
seed, variant, overrides, ...) is written as ``cell.json`` into its run directory before it
trains, and every finished cell is appended as one JSON line (identity + results) to the study's
``cells.jsonl``; tables are built from those records, never from run-directory names or logs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

__all__ = [
    "CELL_FILE",
    "REPO",
    "RESULTS",
    "RUNS",
    "CellError",
    "GridCell",
    "append_jsonl",
    "read_cell",
    "read_jsonl",
    "write_cell",
    "write_json",
]

REPO = Path(__file__).resolve().parents[2]
#: Where studies write by default: run directories and their tables and plots.
RUNS = REPO / "runs"
#: The committed results (``docs/results``): refreshed only when a study is given ``--out docs/results``.
RESULTS = REPO / "docs" / "results"
CELL_FILE = "cell.json"

Encoding = Literal["rate", "ttfs"]
Decoding = Literal["time", "rate"]


class CellError(ValueError):
    """A cell record that is missing fields or has wrong ones."""


@dataclass(frozen=True)
class GridCell:
    """One cell of the Table 1 grid (and of the grids built from it: the τ_d sweep, variants).

    ``variant`` names a rule run with other settings (e.g. ``"vdib-lr"``: the ``vdib`` rule with a
    10x lower encoder learning rate); tables group by :attr:`label` = variant or rule.
    ``overrides``: the extra ``--set`` items the cell was trained with.
    """

    encoding: Encoding
    decoding: Decoding
    rule: str
    seed: int
    variant: str = ""
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return self.variant or self.rule

    @property
    def name(self) -> str:
        """The run directory's name (for people; nothing parses it)."""
        return f"{self.encoding}-{self.decoding}-{self.label}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = list(self.overrides)
        return {"study": "table1", "cell": self.name, **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GridCell:
        """The cell of a record (extra keys, such as results, are ignored)."""
        try:
            enc, dec, rule, seed = d["encoding"], d["decoding"], d["rule"], d["seed"]
        except KeyError as exc:
            raise CellError(f"cell record without {exc.args[0]!r}: {dict(d)!r}") from None
        if enc not in ("rate", "ttfs") or dec not in ("time", "rate"):
            raise CellError(f"cell record with encoding {enc!r} / decoding {dec!r}")
        if not isinstance(rule, str) or not isinstance(seed, int) or isinstance(seed, bool):
            raise CellError(f"cell record with rule {rule!r} / seed {seed!r}")
        return cls(
            cast(Encoding, enc),
            cast(Decoding, dec),
            rule,
            seed,
            str(d.get("variant", "")),
            tuple(str(o) for o in d.get("overrides", ())),
        )


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path


def write_cell(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Record a cell's identity in its run directory (``cell.json``)."""
    write_json(run_dir / CELL_FILE, dict(record))


def read_cell(run_dir: Path) -> dict[str, Any] | None:
    """A run directory's ``cell.json`` (``None`` when it has none)."""
    p = run_dir / CELL_FILE
    if not p.is_file():
        return None
    rec = json.loads(p.read_text())
    if not isinstance(rec, dict):
        raise CellError(f"{p}: not a JSON object")
    return rec


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(dict(record)) + "\n")


def read_jsonl(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every record of one or more JSON-lines files (blank lines skipped)."""
    out: list[dict[str, Any]] = []
    for p in paths:
        for i, ln in enumerate(p.read_text().splitlines(), 1):
            if not ln.strip():
                continue
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise CellError(f"{p}:{i}: not a JSON object")
            out.append(rec)
    return out
