"""Optional compiled loops (numba) for the readers and the binner, with numpy fallbacks.

``numba`` is a dependency, but everything in ``events`` also runs without it: each caller
asks :func:`kernel` for the compiled function and takes its pure-numpy path when it gets
``None``: numba not importable, ``VDIB_NUMBA=0`` in the environment, or (by default) an input
smaller than :data:`MIN_SIZE`, because importing numba and loading a cached kernel costs about
0.5-1 s once per process, more than numpy spends on a million events. ``VDIB_NUMBA=1`` uses
the kernels for any size (the tests run both paths and compare them). Kernels are compiled
lazily on first use, so importing ``events`` does not import numba, and cached on disk
(``cache=True``) so a later process skips the compile.

Why compiled loops at all: the checks a reader must make (every coordinate on the sensor, time
order) and the binning scatter are a few integer operations per event on strided structured
fields, where numpy needs one full pass and one temporary per operation; one fused loop does
them in a single pass while the data is in cache (see docs/events-formats.md for the numbers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

_COMPILED: dict[str, Any] = {}
_DEFS: dict[str, Callable[..., Any]] = {}


#: inputs (events or words) below this size take the numpy path unless ``VDIB_NUMBA=1``
MIN_SIZE = 1 << 20


def _mode() -> str:
    v = os.environ.get("VDIB_NUMBA", "auto").strip().lower()
    if v in ("0", "false", "no", "off"):
        return "off"
    return "on" if v in ("1", "true", "yes", "on") else "auto"


def enabled() -> bool:
    """Whether compiled kernels can be used: numba importable and ``VDIB_NUMBA`` not ``0``."""
    if _mode() == "off":
        return False
    try:
        import numba  # noqa: F401
    except ImportError:  # pragma: no cover - numba is a dependency, but stay usable without it
        return False
    return True


def register(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: make ``fn`` (plain Python on numpy arrays) available as a lazy kernel."""
    _DEFS[f"{fn.__module__}.{fn.__qualname__}"] = fn
    fn.__jit_key__ = f"{fn.__module__}.{fn.__qualname__}"  # type: ignore[attr-defined]
    return fn


def kernel(fn: Callable[..., Any], size: int | None = None) -> Callable[..., Any] | None:
    """The numba-compiled version of the registered ``fn``, or None when kernels are off or
    (``VDIB_NUMBA`` unset) ``size`` is below :data:`MIN_SIZE`; ``size=None`` for long-lived
    users (the streaming binner)."""
    if size is not None and size < MIN_SIZE and _mode() == "auto":
        return None
    if not enabled():
        return None
    key = fn.__jit_key__  # type: ignore[attr-defined]
    k = _COMPILED.get(key)
    if k is None:
        import numba

        k = numba.njit(cache=True, nogil=True, boundscheck=False)(_DEFS[key])
        _COMPILED[key] = k
    return k
