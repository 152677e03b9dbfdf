"""Fixtures for the service tests: a checkpoints dir with a tiny random model, apps, clients.

Until the trained default checkpoint lands, the service runs on ``model.testing.tiny_naturalizer``
saved as a real checkpoint (so the registry's loading path is exercised too).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.conftest import shared_data_path

MNIST_DVS_FILE = ("events", "aedat2", "mnist_0_scale04_0001.aedat")


def make_checkpoints(root: Path, names: tuple[str, ...] = ("tiny",)) -> Path:
    from model import save_checkpoint
    from model.testing import tiny_naturalizer

    for i, name in enumerate(names):
        nat = tiny_naturalizer(seed=i, hidden_init_scale=3.0, readout_bias=-0.5,
                               preprocessing={"roi": [48, 54, 26, 26], "sensor": [128, 128]})
        save_checkpoint(root / name, nat, {"note": "random test model"}, {}, {"source": "model.testing"})
    return root


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def settings(checkpoints_dir: Path) -> Settings:
    return Settings(checkpoints_dir=checkpoints_dir, idle_timeout_s=10, stats_interval_s=0.2, _env_file=None)


def make_client(settings: Settings) -> TestClient:
    from service.app import create_app

    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    with make_client(settings) as c:
        yield c


@pytest.fixture(scope="session")
def mnist_dvs_path() -> Path:
    return shared_data_path(*MNIST_DVS_FILE)


@pytest.fixture(scope="session")
def mnist_dvs_bytes(mnist_dvs_path: Path) -> bytes:
    return mnist_dvs_path.read_bytes()


@pytest.fixture(scope="session")
def mnist_dvs_events(mnist_dvs_path: Path) -> np.ndarray:
    import events

    return events.read(mnist_dvs_path).events
