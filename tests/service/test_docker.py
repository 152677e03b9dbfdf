"""Dockerfile, docker-compose.yml and scripts/setup.

Static checks (always): the image installs with the README's script in two layers (dependencies
before the source), runs as a non-root user, fails a CPU image that got a CUDA torch, takes its
port from ``VDIB_PORT``; the compose file parses and means the same to Compose v1 and v2.

For real (where a Docker engine answers; skipped with the reason otherwise): the image is built
and ``docker compose up`` (v2) or ``docker-compose up`` (v1) runs it on a free port, then
``/readyz``, one upload and one websocket stream are checked against it. Build inputs from the
environment: ``VDIB_DOCKER_BASE`` (a base image; where the default cannot be pulled and
``debootstrap`` is installed, the test builds a Debian stand-in with python3 itself),
``VDIB_DOCKER_TORCH_INDEX`` (the index for torch's build; where the CPU wheel index cannot be
reached but the host's pip finds the pinned CPU wheel in a local directory, the test serves that
directory to the build as an index).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
TORCH_PIN = "torch==2.13.0"


def _dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _index(lines: list[str], pred: str) -> int:
    hits = [i for i, ln in enumerate(lines) if re.search(pred, ln)]
    assert len(hits) == 1, (pred, hits)
    return hits[0]


# ---------------------------------------------------------------------------- static
def test_constraints_pin_torch():
    pins = [ln.split("#")[0].strip() for ln in (REPO / "constraints.txt").read_text().splitlines()]
    assert TORCH_PIN in pins


def test_dockerfile_layers_user_torch_check_port():
    lines = _dockerfile_lines()
    froms = [i for i, ln in enumerate(lines) if ln.startswith("FROM ")]
    assert froms == [_index(lines, r"^FROM \$\{BASE\}$")]
    copy_meta = _index(lines, r"^COPY pyproject\.toml constraints\.txt \./$")
    copy_setup = _index(lines, r"^COPY scripts/setup scripts/setup$")
    deps = _index(lines, r"^RUN .*bash scripts/setup --deps-only")
    check = _index(lines, r"torch\.version\.cuda is None")
    copy_all = _index(lines, r"^COPY \. \.$")
    project = _index(lines, r"^RUN bash scripts/setup --no-deps")
    user = _index(lines, r"^USER ")
    cmd = _index(lines, r"^CMD ")
    # dependencies before the source: an edit of the code reuses the dependency layer
    assert froms[0] < copy_meta < copy_setup < deps < check < copy_all < project < user < cmd
    # every COPY before the source copy names only the install's inputs
    for ln in lines[:copy_all]:
        if ln.startswith(("COPY", "ADD")):
            assert ln in ("COPY pyproject.toml constraints.txt ./", "COPY scripts/setup scripts/setup"), ln
    # the CUDA check applies to CPU images and fails the RUN (sys.exit with a message)
    assert re.search(r'if \[ "\$\{TORCH\}" = cpu \]', lines[check]) and "sys.exit(" in lines[check]
    # non-root, created in the image with a fixed uid
    assert lines[user] == "USER vdib"
    assert any(re.match(r"^RUN useradd .*--uid 10001 .*vdib$", ln) for ln in lines[:user])
    # the port: from VDIB_PORT (vdib serve's --port default), never hard-coded in CMD
    assert lines[cmd] == 'CMD ["vdib", "serve", "--host", "0.0.0.0"]'
    assert "ARG PORT=8000" in lines and any("VDIB_PORT=${PORT}" in ln for ln in lines)
    assert "EXPOSE ${PORT}" in lines
    health = lines[_index(lines, r"^HEALTHCHECK ")]
    assert "/readyz" in health and "VDIB_PORT" in health and ":8000/" not in health
    # only classic-builder features (Debian's docker.io, docker-compose 1.29)
    assert not any("--mount=" in ln or ln.startswith("# syntax") for ln in lines)


def test_setup_script():
    setup = (REPO / "scripts" / "setup").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "setup")]).returncode == 0
    assert "-c constraints.txt" in setup and 'python3}" -m venv .venv' in setup
    # the CPU index is an extra index, only after a short probe (no retry storm when unreachable)
    assert "https://download.pytorch.org/whl/cpu" in setup and "--extra-index-url" in setup
    assert "VDIB_TORCH_INDEX_TIMEOUT:-5" in setup
    assert "--no-deps --no-build-isolation -e" in setup


def test_setup_rejects_an_unknown_torch_kind(tmp_path):
    # a copy of the script in an empty project: the venv is made there, then the kind is refused
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup", tmp_path / "scripts" / "setup")
    fake = tmp_path / "bin"
    fake.mkdir()
    # a python3 whose venv's python answers pip without installing anything
    (fake / "python3").write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; '
        'printf \'#!/usr/bin/env bash\\nexit 0\\n\' > "$3/bin/python"; chmod +x "$3/bin/python"; fi\n'
    )
    (fake / "python3").chmod(0o755)
    r = subprocess.run(
        ["bash", "scripts/setup"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", VDIB_TORCH="rocm"),
    )
    assert r.returncode == 2 and "VDIB_TORCH must be cpu or cuda" in r.stderr


def _compose_doc() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_file_static():
    doc = _compose_doc()
    assert "version" not in doc  # the Compose Specification: v2 and v1.27+ read it alike
    svc = doc["services"]
    assert set(svc) == {"vdib", "vdib-gpu", "train"}
    for name in ("vdib", "vdib-gpu"):
        s = svc[name]
        assert s["ports"] == ["${VDIB_PORT:-8000}:${VDIB_PORT:-8000}"]  # same port inside and out
        assert s["environment"]["VDIB_PORT"] == "${VDIB_PORT:-8000}"
        assert "readyz" in " ".join(s["healthcheck"]["test"]) and "VDIB_PORT" in " ".join(
            s["healthcheck"]["test"]
        )
        assert "./checkpoints:/app/checkpoints:ro" in s["volumes"]
    assert svc["vdib"]["build"]["args"]["TORCH"] == "cpu"
    gpu = svc["vdib-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["args"]["TORCH"] == "cuda"
    assert gpu["build"]["args"]["EXTRAS"] == "gpu" and gpu["image"] == "vdib:cuda"
    dev = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert svc["train"]["profiles"] == ["train"] and svc["train"]["user"] == "${VDIB_USER:-10001:10001}"
    # the README names both clients for every compose command it gives
    readme = (REPO / "README.md").read_text()
    assert "docker compose up" in readme and "docker-compose up" in readme


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
        pytest.skip("no docker compose (v2) or docker-compose (v1) client")
    prof = ["--profile", "gpu", "--profile", "train"]
    env = dict(os.environ, VDIB_PORT="9123")
    r = subprocess.run(
        [*cmd, *prof, "config", "--services"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr
    assert set(r.stdout.split()) == {"vdib", "vdib-gpu", "train"}
    r = subprocess.run([*cmd, *prof, "config"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    svc = yaml.safe_load(r.stdout)["services"]
    ports = svc["vdib"]["ports"][0]  # v1: "9123:9123"; v2: {target: 9123, published: "9123"}
    if isinstance(ports, dict):
        assert int(ports["target"]) == 9123 and int(ports["published"]) == 9123
    else:
        assert ports == "9123:9123"
    assert str(svc["vdib"]["environment"]["VDIB_PORT"]) == "9123"
    assert svc["vdib-gpu"]["build"]["args"]["TORCH"] == "cuda"
    assert svc["train"]["profiles"] == ["train"]


# ---------------------------------------------------------------------------- for real
def _engine_reason() -> str | None:
    """None when a Docker engine answers, else why not."""
    docker = shutil.which("docker")
    if docker is None:
        return "no docker client"
    r = subprocess.run(
        [docker, "info", "--format", "{{json .ServerVersion}}"], capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0:
        return (
            "no Docker engine answers (`docker info`: " + (r.stderr.strip().splitlines() or ["?"])[-1] + ")"
        )
    return None


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def _base_image(tmp: Path) -> str:
    """VDIB_DOCKER_BASE, else the Dockerfile's default when it can be pulled, else a Debian
    stand-in built with debootstrap (python3, venv; the host's CA bundle, so pip trusts what the
    host trusts)."""
    if os.environ.get("VDIB_DOCKER_BASE"):
        return os.environ["VDIB_DOCKER_BASE"]
    default = "python:3.11-slim-bookworm"
    if (
        _run(["docker", "image", "inspect", default], 60).returncode == 0
        or _run(["docker", "pull", default], 600).returncode == 0
    ):
        return default
    standin = "vdib-test-base:bookworm"
    if _run(["docker", "image", "inspect", standin], 60).returncode == 0:
        return standin
    if not shutil.which("debootstrap") or os.geteuid() != 0:
        pytest.skip(f"{default} cannot be pulled and no stand-in can be built (needs debootstrap, root)")
    root = tmp / "rootfs"
    r = _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            "bookworm",
            str(root),
        ],
        1800,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_ca.is_file():
        shutil.copy(host_ca, root / "etc/ssl/certs/ca-certificates.crt")
        (root / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    r = subprocess.run(
        ["docker", "import", "-c", "ENV LANG=C.UTF-8", "-", standin],
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tar.wait()
    assert r.returncode == 0, r.stderr
    return standin


def _local_torch_wheels() -> Path | None:
    """A find-links directory of the host's pip configuration holding the pinned CPU wheel."""
    r = _run([str(REPO / ".venv" / "bin" / "python"), "-m", "pip", "config", "list"], 60)
    for m in re.finditer(r"find-links='([^']+)'", r.stdout):
        for d in m.group(1).split():
            d = d.removeprefix("file://")
            if list(Path(d).glob("torch-2.13.0+cpu-*.whl")):
                return Path(d)
    return None


@pytest.fixture
def torch_index(tmp_path: Path) -> Iterator[str]:
    """VDIB_DOCKER_TORCH_INDEX, else '' (the CPU wheel index) when it answers, else the host's
    local CPU wheel served as a simple index on the docker bridge's gateway."""
    if "VDIB_DOCKER_TORCH_INDEX" in os.environ:
        yield os.environ["VDIB_DOCKER_TORCH_INDEX"]
        return
    import urllib.request

    try:
        urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=5)
        yield ""
        return
    except OSError:
        pass
    wheels = _local_torch_wheels()
    gw = _run(
        ["docker", "network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"], 60
    )
    if wheels is None or gw.returncode != 0:
        pytest.skip(
            "the CPU wheel index is unreachable and no local CPU wheel of torch 2.13.0 is known: "
            "the image would get the CUDA build (which its build refuses)"
        )
    idx = tmp_path / "torch-index" / "torch"
    idx.mkdir(parents=True)
    for whl in wheels.glob("torch-2.13.0+cpu-*.whl"):
        (idx / whl.name).symlink_to(whl)
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(idx.parent))
    httpd = http.server.ThreadingHTTPServer((gw.stdout.strip(), 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://{gw.stdout.strip()}:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_compose_up_for_real(tmp_path, torch_index, mnist_dvs_path, mnist_dvs_bytes):
    reason = _engine_reason()
    if reason:
        pytest.skip(reason)
    cmd = _compose()
    if cmd is None:
        pytest.skip("a Docker engine answers but there is no compose client (v2 plugin or docker-compose v1)")
    import httpx

    from service.client import StreamOptions, replay_file

    port = _free_port()
    project = f"vdibtest{os.getpid()}"
    env = dict(
        os.environ,
        VDIB_PORT=str(port),
        VDIB_BASE=_base_image(tmp_path),
        VDIB_TORCH_INDEX=torch_index,
        VDIB_WORKERS="2",
        DOCKER_BUILDKIT="0",
        COMPOSE_DOCKER_CLI_BUILD="0",
    )
    compose = [*cmd, "-p", project]
    r = _run([*compose, "build", "vdib"], 3000, cwd=REPO, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    # the image: torch's CPU build, a non-root user
    r = _run(
        [
            "docker",
            "run",
            "--rm",
            "vdib:latest",
            "sh",
            "-c",
            "id -u; python -c 'import torch; print(torch.__version__, torch.version.cuda)'",
        ],
        600,
    )
    assert r.returncode == 0, r.stderr
    uid, torch_line = r.stdout.split("\n")[:2]
    assert uid.strip() == "10001" and torch_line.split()[1] == "None", r.stdout
    # the Dockerfile's CUDA check, run in the image: passes its torch, fails a torch reporting CUDA
    lines = _dockerfile_lines()
    check = lines[_index(lines, r"torch\.version\.cuda is None")].removeprefix("RUN ")
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("class version:\n    cuda = '12.6'\n")
    for d in (fake, fake.parent, tmp_path):
        d.chmod(0o755)
    (fake / "__init__.py").chmod(0o644)
    r = _run(["docker", "run", "--rm", "-e", "TORCH=cpu", "vdib:latest", "sh", "-c", check], 600)
    assert r.returncode == 0, r.stderr
    r = _run(
        [
            "docker",
            "run",
            "--rm",
            "-e",
            "TORCH=cpu",
            "-e",
            "PYTHONPATH=/fake",
            "-v",
            f"{fake.parent}:/fake:ro",
            "vdib:latest",
            "sh",
            "-c",
            check,
        ],
        600,
    )
    assert r.returncode != 0 and "CUDA torch build 12.6" in r.stderr
    try:
        r = _run([*compose, "up", "-d", "vdib"], 600, cwd=REPO, env=env)
        assert r.returncode == 0, r.stderr
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600  # bounds a hung start only: the test waits on /readyz
        ready = None
        while time.monotonic() < deadline:
            try:
                ready = httpx.get(base + "/readyz", timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        logs = _run([*compose, "logs", "vdib"], 120, cwd=REPO, env=env).stdout
        assert ready is not None and ready.status_code == 200, logs[-4000:]
        assert f"viewer at http://127.0.0.1:{port}/" in logs and "workers 2" in logs  # the port it serves
        up = httpx.post(
            base + "/v1/naturalize?seed=9&emit=3&model=mnist-dvs", content=mnist_dvs_bytes, timeout=600
        )
        assert up.status_code == 200, up.text
        frames = up.json()["frames"]
        s = replay_file(
            f"ws://127.0.0.1:{port}/v1/stream",
            str(mnist_dvs_path),
            StreamOptions(seed=9, emit=3, model="mnist-dvs"),
            packet_us=7_000,
        )
        assert s.ok and s.close_code == 1000, s.describe()
        assert [f.bin for f in s.frames] == [f["bin"] for f in frames]
        health = json.loads(
            _run(
                [
                    "docker",
                    "inspect",
                    "--format",
                    "{{json .State.Health.Status}}",
                    f"{project}_vdib_1" if cmd[-1].endswith("docker-compose") else f"{project}-vdib-1",
                ],
                60,
            ).stdout
            or "null"
        )
        assert health in ("healthy", "starting")
    finally:
        _run([*compose, "down", "-v"], 600, cwd=REPO, env=env)
