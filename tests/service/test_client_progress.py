"""``vdib stream``'s progress bar redraws at most twice a second (issue 12): counted on a
simulated clock, so the test does not depend on how fast anything runs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from events import EVENT_DTYPE
from service.client import replay_events


class _Clock:
    """tqdm's clock, advanced by hand: ``step`` seconds per reading."""

    def __init__(self, step: float):
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class _Client:
    def __init__(self):
        self.summary = SimpleNamespace(error=None, frames=[])
        self.sent = 0

    def send_events(self, pk: np.ndarray) -> None:
        self.sent += len(pk)
        self.summary.frames.append(None)  # a frame back for every packet: the postfix changes each time

    def end(self) -> SimpleNamespace:
        return self.summary


def test_progress_redraws_at_most_twice_a_second(monkeypatch, capsys):
    tqdm_std = pytest.importorskip("tqdm.std")
    clock = _Clock(step=0.01)  # one or two readings per packet: several simulated seconds in all
    monkeypatch.setattr(tqdm_std, "time", clock)
    ev = np.zeros(20_000, EVENT_DTYPE)
    ev["t"] = np.arange(20_000) * 100  # 2 s of events, 200 packets of 10 ms
    client = _Client()
    start = clock.now
    replay_events(client, ev, realtime=False, progress=True)  # type: ignore[arg-type]
    simulated = clock.now - start
    draws = capsys.readouterr().err.count("\r")
    assert client.sent == len(ev)
    # the first draw, one per 0.5 s of simulated time, and the final one at close
    assert 2 <= draws <= 2 + simulated / 0.5 + 1, (draws, simulated)
