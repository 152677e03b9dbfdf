"""Dockerfile and docker-compose.yml: the image installs exactly as the README does, and
`docker compose config` accepts the file (when a docker client with compose is present)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _pip_install_line(text: str) -> str:
    m = re.search(r"-m pip install -q -c constraints\.txt -e \"\.[^\"]*\"", text)
    assert m, "no `pip install -c constraints.txt -e .` line"
    return m.group(0).split('-e "')[0]


def test_image_installs_like_the_readme():
    setup = (REPO / "scripts" / "setup").read_text()
    docker = (REPO / "Dockerfile").read_text()
    assert _pip_install_line(docker) == _pip_install_line(setup)
    assert "python3 -m venv .venv" in setup and "python3 -m venv .venv" in docker
    assert "--upgrade pip" in setup and "--upgrade pip" in docker
    assert 'CMD ["vdib", "serve", "--host", "0.0.0.0"' in docker
    assert "ARG EXTRAS" in docker and "HEALTHCHECK" in docker and "/readyz" in docker


def _compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy and subprocess.run([legacy, "version"], capture_output=True).returncode == 0:
        return [legacy]
    return None


def test_docker_compose_config():
    cmd = _compose()
    if cmd is None:
        pytest.skip("no docker compose client")
    prof = ["--profile", "gpu", "--profile", "train"]
    r = subprocess.run([*cmd, *prof, "config", "--services"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {"vdib", "vdib-gpu", "train"}
    r = subprocess.run([*cmd, *prof, "config", "--format", "json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    try:
        svc = json.loads(r.stdout)["services"] if r.returncode == 0 else None
    except json.JSONDecodeError:
        svc = None
    if svc is not None:  # compose v2
        assert "readyz" in " ".join(svc["vdib"]["healthcheck"]["test"])
        assert any(v["target"] == "/app/checkpoints" for v in svc["vdib"]["volumes"])
        dev = svc["vdib-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
        assert svc["train"]["profiles"] == ["train"]
        return
    # compose v1 (Debian's docker-compose): YAML only; check the resolved text
    r = subprocess.run([*cmd, *prof, "config"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("/readyz", ":/app/checkpoints:ro", "driver: nvidia", "- gpu", "profiles:", "- train",
                   "vdib:cuda", "EXTRAS: gpu"):
        assert needle in out, needle
