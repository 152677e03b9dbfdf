"""The ``vdib`` command line: one entry point, sub-commands owned by each package.

Each package exposes ``<package>.cli.register(subparsers)``, which adds its sub-commands and sets
``func`` on each parser; heavy imports stay inside the command functions so ``vdib --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Order sets the order in ``vdib --help``.
_PACKAGES = ("events", "model", "training", "service")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vdib",
        description="Event-camera streams to images with a VDIB-trained spiking encoder.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _PACKAGES:
        try:
            module = importlib.import_module(f"{name}.cli")
        except ModuleNotFoundError as exc:  # a package without a CLI yet
            if exc.name != f"{name}.cli":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Spin-waiting OpenMP threads cost 10-50x on small GEMMs on this class of machine (DESIGN.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        rc = func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
