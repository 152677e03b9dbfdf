"""App factory, registry, operations endpoints, settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.settings import Settings
from tests.service.conftest import make_client


def test_healthz_readyz_models(client):
    assert client.get("/healthz").json() == {"status": "ok", "pid": os.getpid()}
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] is True and body["default_model"] == "tiny"
    models = client.get("/v1/models").json()
    assert models["default"] == "tiny"
    (m,) = models["models"]
    assert m["input_shape"] == [2, 26, 26] and m["image_shape"] == [28, 28]
    assert m["engine"] == "torch" and m["device"] == "cpu"
    assert m["n_readout"] == 16 and m["tau_d"] == 8 and m["dt_us"] == 10_000


def test_readyz_not_ready_with_reason(tmp_path: Path):
    with make_client(Settings(checkpoints_dir=tmp_path, _env_file=None)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["ready"] is False
        assert "no checkpoint" in r.json()["reason"]
        # uploads say why instead of failing obscurely
        r = c.post("/v1/naturalize", content=b"x")
        assert r.status_code == 503 and "no model loaded" in r.json()["detail"]


def test_broken_checkpoint_is_reported_others_load(tmp_path: Path, checkpoints_dir: Path):
    import shutil

    shutil.copytree(checkpoints_dir / "tiny", tmp_path / "good")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with make_client(Settings(checkpoints_dir=tmp_path, _env_file=None)) as c:
        body = c.get("/readyz").json()
        assert body["ready"] is True and body["models"] == ["good"]
        assert body["failed"] == ["bad"] and "errors" not in body  # unauthenticated: names only
        errors = c.get("/v1/models").json()["errors"]
        assert "JSON" in errors["bad"] and str(tmp_path) not in errors["bad"]  # no file-system paths


def test_unknown_default_model_not_ready(checkpoints_dir: Path):
    with make_client(Settings(checkpoints_dir=checkpoints_dir, default_model="nope", _env_file=None)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "nope" in r.json()["reason"]


def test_settings_from_env_and_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    env = tmp_path / ".env"
    env.write_text("VDIB_MAX_SESSIONS=7\nVDIB_ENGINE=onnx\n")
    monkeypatch.setenv("VDIB_API_KEYS", "a, b ,")
    s = Settings(_env_file=env)
    assert s.max_sessions == 7 and s.engine == "onnx"
    assert s.api_key_set == frozenset({"a", "b"})
    assert Settings(_env_file=None).checkpoints_dir.name == "checkpoints"


def test_metrics_and_openapi(client, mnist_dvs_bytes):
    client.post("/v1/naturalize?emit=last", content=mnist_dvs_bytes)
    text = client.get("/metrics").text
    for name in (
        "vdib_http_requests_total",
        "vdib_http_request_seconds",
        "vdib_active_streams",
        "vdib_steps_per_second",
        "vdib_batch_size",
        "vdib_dropped_frames_total",
        "vdib_late_events_total",
        "vdib_frame_latency_seconds",
    ):
        assert name in text
    assert 'vdib_http_requests_total{method="POST",route="/v1/naturalize",status="200"}' in text
    assert "vdib_upload_events_total 15744.0" in text
    spec = client.get("/openapi.json").json()
    assert {"/v1/naturalize", "/v1/models", "/healthz", "/readyz", "/metrics", "/v1/events"} <= set(
        spec["paths"]
    )
    assert client.get("/docs").status_code == 200


def test_viewer_page_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "/v1/stream" in r.text or "viewer.js" in r.text
    assert client.get("/static/viewer.js").status_code == 200


def test_api_keys_http(checkpoints_dir: Path, mnist_dvs_bytes):
    s = Settings(checkpoints_dir=checkpoints_dir, api_keys="k1,k2", _env_file=None)
    with make_client(s) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
        r = c.post("/v1/naturalize?emit=last", content=mnist_dvs_bytes)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = c.post(
            "/v1/naturalize?emit=last", content=mnist_dvs_bytes, headers={"Authorization": "Bearer k1"}
        )
        assert r.status_code == 200
        # operations stay open for probes
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_service_never_imports_training():
    import subprocess
    import sys

    code = (
        "import sys, service.app, service.cli, service.client, service.pipeline; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'training')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert json.loads(out.stdout) == []


def test_other_checkpoint_kinds_are_skipped(tmp_path: Path, checkpoints_dir: Path):
    import shutil

    shutil.copytree(checkpoints_dir / "tiny", tmp_path / "mnist-dvs")
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text(json.dumps({"kind": "vdib-judge", "format_version": 1}))
    with make_client(Settings(checkpoints_dir=tmp_path, _env_file=None)) as c:
        body = c.get("/readyz").json()
        assert body["ready"] and body["default_model"] == "mnist-dvs"  # preferred default name
        assert body["models"] == ["mnist-dvs"] and body["failed"] == []


def test_shipped_checkpoints_load():
    """The repository's checkpoints/: the default model loads, the judge is skipped (skips until
    the default checkpoint exists)."""
    root = Path(__file__).resolve().parents[2] / "checkpoints"
    if not (root / "mnist-dvs" / "config.json").is_file():
        pytest.skip("no shipped default checkpoint")
    with make_client(Settings(_env_file=None)) as c:
        body = c.get("/readyz").json()
        assert body["ready"] and body["default_model"] == "mnist-dvs" and body["failed"] == []
        m = c.get("/v1/models").json()["models"][0]
        assert m["input_shape"] == [2, 26, 26] and m["image_shape"] == [28, 28]
