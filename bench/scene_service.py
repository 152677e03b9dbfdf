"""Benchmark of the general-scene model as served: the service's scene engine and a websocket
stream at the full sensor.

* engine: :class:`service.scene_engine.SizedSceneEngine` at 346x260 (DAVIS346), one encoder step
  per 10 ms bin (real bins of the DAVIS346 recording) at batch 1 and per stream at batch 4, and
  one decoder call (a frame); ms each, best of ``--repeats`` medians;
* stream: the DAVIS240 boxes recording (240x180, 2 s, 207 bins) sent at once over one websocket
  (TestClient, in process) with emit 3: wall time per bin from the first packet to the close
  (the service's throughput for one stream; real time needs <= 10 ms per bin);
* upload: the same recording through ``POST /v1/naturalize`` (json, emit 3).

Writes ``bench/results/scene_service.{json,md}``. Run:
``OMP_NUM_THREADS=1 .venv/bin/python bench/scene_service.py [--checkpoint checkpoints/scenes]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = ROOT.parent / "shared" / "data" / "events"


def _median_ms(fn, n: int) -> tuple[float, float]:
    """Median wall and CPU (this thread's) milliseconds of ``fn()`` over ``n`` calls."""
    ts, cs = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        cs.append((time.thread_time() - c) * 1e3)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), statistics.median(cs)


def bench_engine(ckpt: Path, repeats: int, n: int, kind: str = "torch") -> dict:
    import numpy as np
    import torch

    import events
    from model import load_checkpoint
    from model.batching import stream_uniforms
    from service.scene_engine import SceneEngine, SceneOnnxEngine

    net, _ = load_checkpoint(ckpt)
    eng = (SceneOnnxEngine(net, "cpu") if kind == "onnx" else SceneEngine(net, "cpu")).for_input(
        (2, 260, 346)
    )
    rec = events.read(DATA / "aedat4" / "evlib_davis346_trimmed.aedat4")
    x = (
        events.bin_events(
            rec.events,
            events.ROI.full(346, 260),
            10_000,
            int(rec.events["t"][0]),
            None,
            polarity="split",
            mode="count",
        )
        .reshape(-1, eng.n_inputs)
        .astype(np.float32)
    )
    gen = torch.Generator().manual_seed(0)
    out: dict = {"sensor": [346, 260], "n_readout": eng.n_readout, "bins_in_clip": len(x)}
    for b in (1, 4):
        state = eng.stack([eng.init_state()] * b)
        u = np.concatenate([stream_uniforms(gen, 1, eng.n_readout) for _ in range(b)])
        meds, cpus = [], []
        for _ in range(repeats):
            ts, cs = [], []
            for k in range(n):  # the clip's bins in order, the state carried on
                xb = np.repeat(x[k % len(x) : k % len(x) + 1], b, 0)
                t, c = time.perf_counter(), time.thread_time()
                _, state = eng.step(xb, state, u)
                cs.append((time.thread_time() - c) * 1e3)
                ts.append((time.perf_counter() - t) * 1e3)
            meds.append(statistics.median(ts))
            cpus.append(statistics.median(cs))
        out[f"step_ms_batch{b}"] = min(meds)
        out[f"step_ms_per_stream_batch{b}"] = min(meds) / b
        out[f"step_cpu_ms_per_stream_batch{b}"] = min(cpus) / b
    w = np.random.default_rng(0).random((1, eng.tau_d, eng.n_readout)) < 0.2
    eng.decode(w)
    runs = [_median_ms(lambda: eng.decode(w), max(3, n // 4)) for _ in range(repeats)]
    out["decode_ms"] = min(r[0] for r in runs)
    out["decode_cpu_ms"] = min(r[1] for r in runs)
    out["ms_per_bin_emit3"] = out["step_ms_batch1"] + out["decode_ms"] / 3
    out["cpu_ms_per_bin_emit3"] = out["step_cpu_ms_per_stream_batch1"] + out["decode_cpu_ms"] / 3
    return out


def bench_service(ckpt: Path) -> dict:
    import shutil

    from fastapi.testclient import TestClient

    import events
    from service.app import create_app
    from service.protocol import decode_frame, encode_events
    from service.settings import Settings

    path = DATA / "aedat2" / "pyaedattools_IMU_translBoxes.aedat"
    rec = events.read(path)
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(ckpt, Path(d) / "scenes")
        s = Settings(checkpoints_dir=Path(d), idle_timeout_s=600, _env_file=None)
        with TestClient(create_app(s)) as c:
            t_ev = rec.events["t"]
            cuts = list(range(0, len(t_ev), 4096)) + [len(t_ev)]
            packets = [encode_events(rec.events[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
            with c.websocket_connect("/v1/stream") as ws:
                ws.send_text(
                    json.dumps(
                        {"type": "start", "sensor": {"width": rec.width, "height": rec.height}, "emit": 3}
                    )
                )
                ready = json.loads(ws.receive_text())
                t = time.perf_counter()
                for p in packets:
                    ws.send_bytes(p)
                ws.send_text(json.dumps({"type": "end"}))
                frames, end = 0, {}
                while True:
                    m = ws.receive()
                    if m["type"] == "websocket.close":
                        break
                    if m.get("bytes") is not None:
                        img = decode_frame(m["bytes"]).image()
                        frames += 1
                    elif json.loads(m["text"])["type"] == "end":
                        end = json.loads(m["text"])
                wall = time.perf_counter() - t
            t = time.perf_counter()
            r = c.post("/v1/naturalize?emit=3", content=path.read_bytes())
            t_up = time.perf_counter() - t
    return {
        "recording": path.name,
        "sensor": [rec.width, rec.height],
        "model": ready["model"],
        "model_reason": ready["model_reason"],
        "bins": end.get("bins"),
        "frames": frames,
        "frame_shape": list(img.shape),
        "stream_ms_per_bin": wall * 1e3 / max(1, end.get("bins") or 1),
        "stream_frames_per_s": frames / wall,
        "upload_s": t_up,
        "upload_status": r.status_code,
        "upload_ms_per_bin": t_up * 1e3 / max(1, r.json()["stats"]["bins"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "scenes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scene_service")
    args = ap.parse_args(argv)
    import torch

    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)
    res = {
        "checkpoint": str(
            args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT) else args.checkpoint
        ),
        "threads": threads,
        "load_average_before": os.getloadavg(),
        "engine": bench_engine(args.checkpoint, args.repeats, args.steps),
        "engine_onnx": bench_engine(args.checkpoint, args.repeats, args.steps, "onnx"),
    }
    res["service"] = bench_service(args.checkpoint)
    res["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    e, s, o = res["engine"], res["service"], res["engine_onnx"]
    md = [
        "# Scene model as served (bench/scene_service.py)",
        "",
        f"Checkpoint `{res['checkpoint']}`, {threads} torch thread(s), load average "
        f"{res['load_average_before'][0]:.1f} before / {res['load_average_after'][0]:.1f} after (2-core machine "
        "shared with other jobs: pessimistic).",
        "",
        "| what | value |",
        "|---|---|",
        f"| encoder step, 346x260, batch 1 | {e['step_ms_batch1']:.1f} ms wall, {e['step_cpu_ms_per_stream_batch1']:.1f} ms CPU |",
        f"| encoder step, 346x260, batch 4 (per stream) | {e['step_ms_per_stream_batch4']:.1f} ms wall, "
        f"{e['step_cpu_ms_per_stream_batch4']:.1f} ms CPU |",
        f"| decoder (one frame), 346x260 | {e['decode_ms']:.1f} ms wall, {e['decode_cpu_ms']:.1f} ms CPU |",
        f"| onnx engine: step / decode, 346x260, batch 1 | {o['step_ms_batch1']:.1f} / {o['decode_ms']:.1f} ms wall, "
        f"{o['step_cpu_ms_per_stream_batch1']:.1f} / {o['decode_cpu_ms']:.1f} ms CPU |",
        f"| per 10 ms bin at emit 3 (one stream) | {e['ms_per_bin_emit3']:.1f} ms wall, {e['cpu_ms_per_bin_emit3']:.1f} ms "
        "CPU (real time on one core: <= 10) |",
        f"| websocket stream, {s['sensor'][0]}x{s['sensor'][1]} ({s['recording']}), all sent at once | "
        f"{s['stream_ms_per_bin']:.1f} ms per bin, {s['stream_frames_per_s']:.1f} frames/s out, "
        f"frames {s['frame_shape'][1]}x{s['frame_shape'][0]} |",
        f"| upload of the same recording (json, emit 3) | {s['upload_s']:.2f} s, {s['upload_ms_per_bin']:.1f} ms per bin |",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
