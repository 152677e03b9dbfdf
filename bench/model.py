"""Benchmark of model/: GEMM roofline, vdib training throughput, streaming step latency.

Writes bench/results/model.json and bench/results/model.md. One thread (torch and onnxruntime)
unless --threads says otherwise. Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/model.py``
(about 3-5 minutes on the 2-core dev machine; ``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.encoder import EncoderConfig  # noqa: E402
from model.naturalizer import Naturalizer, NaturalizerConfig, sliding_windows  # noqa: E402
from model.onnx_export import OnnxEngine, _EncoderStep, export_onnx, state_to_list  # noqa: E402
from model.reference_rule import reference_encoder_gradients  # noqa: E402
from model.rules import build_rule  # noqa: E402
from model.testing import random_spike_frames  # noqa: E402


def timeit(fn, min_time: float = 0.5, min_iter: int = 3, max_iter: int = 10_000) -> float:
    """Seconds per call: the best of a few timing rounds (the machine is shared; the minimum is the
    least contaminated by other processes)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while n < min_iter or (time.perf_counter() - t0 < min_time and n < max_iter):
        fn()
        n += 1
    per = (time.perf_counter() - t0) / n
    # a few rounds of ~n/3 calls for a median
    rounds = []
    k = max(1, n // 3)
    for _ in range(3):
        t1 = time.perf_counter()
        for _ in range(k):
            fn()
        rounds.append((time.perf_counter() - t1) / k)
    return min(per, *rounds)


def gemm_gflops(m: int, k: int, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    s = timeit(lambda: a @ b, min_time=0.5)
    return 2 * m * k * n / s / 1e9


def make_model(
    n_in: int, hidden: tuple[int, ...], n_readout: int, tau_d: int, decoder: str, dec_hidden: int | None
):
    side = int(round(n_in**0.5))
    cfg = NaturalizerConfig(
        encoder=EncoderConfig(n_inputs=n_in, hidden=hidden, n_readout=n_readout, prior_rate=0.1),
        decoder=decoder,
        tau_d=tau_d,
        image_shape=(28, 28),
        input_shape=(1, side, side),
        decoder_options={"hidden": dec_hidden} if dec_hidden else {},
    )
    torch.manual_seed(0)
    return Naturalizer(cfg, hidden_init="random", hidden_init_scale=0.5)


def bench_training(args, results: dict) -> None:
    T, B = args.T, args.batch
    x = random_spike_frames(T, (B, 676), rate=0.05, seed=0).float()
    target = torch.rand(B, 28, 28)
    configs = [
        ("vectorised, moving-average baseline, K=1, fp32", {"baseline": "moving-average", "n_samples": 1}),
        (
            "vectorised, moving-average baseline, K=1, bf16 GEMMs",
            {"baseline": "moving-average", "n_samples": 1, "matmul_dtype": "bfloat16"},
        ),
        ("vectorised, loo baseline, K=2, fp32", {"baseline": "loo", "n_samples": 2}),
        (
            "vectorised, per-parameter baseline (authors'), K=1, fp32",
            {"baseline": "per-parameter", "n_samples": 1},
        ),
    ]
    if args.quick:
        configs = configs[:1]
    # rules and the reference are timed round-robin so that load from other processes on the
    # shared machine hits them alike; each keeps its best round
    rules = []
    for _label, opts in configs:
        nat = make_model(676, (800,), 256, args.tau_d, "mlp", 512)
        rule = build_rule("vdib", nat, lr=1e-4, **opts)
        g = torch.Generator().manual_seed(0)
        rule.train_step(x, target, g)  # warm-up
        rules.append((rule, g))

    # straightforward per-sample, per-step implementation of the same rule (moving-average baseline)
    ref_nat = make_model(676, (800,), 256, args.tau_d, "mlp", 512)
    enc = ref_nat.encoder
    dfa = [torch.randn(800, 256) / 16]
    dec_opt = torch.optim.Adam(ref_nat.decoder.parameters(), lr=1e-4)
    uni = torch.rand(T, B, 256)

    def ref_sample(b: int) -> float:
        t0 = time.perf_counter()
        grads, y, _ = reference_encoder_gradients(enc, x[:, b : b + 1], uni[:, b : b + 1], torch.ones(1), dfa)
        window = sliding_windows(y[-args.tau_d :], args.tau_d)[-1]
        logits = ref_nat.decoder.logits(window)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, target[b : b + 1].reshape(1, -1), reduction="sum"
        )
        dec_opt.zero_grad()
        loss.backward()
        dec_opt.step()
        with torch.no_grad():
            for n, p in enc.named_parameters():
                p -= 1e-4 * grads[n]
        return time.perf_counter() - t0

    times: list[list[float]] = [[] for _ in configs]
    ref_times: list[float] = []
    for it in range(max(args.train_iters, args.ref_samples)):
        if it < args.ref_samples:
            ref_times.append(ref_sample(it))
        if it < args.train_iters:
            for i, (rule, g) in enumerate(rules):
                t0 = time.perf_counter()
                rule.train_step(x, target, g)
                times[i].append(time.perf_counter() - t0)
    rows = []
    for (label, _), ts in zip(configs, times, strict=True):
        s = min(ts)
        rows.append(
            {
                "implementation": label,
                "seconds_per_batch": s,
                "samples_per_s": B / s,
                "measured_batches": len(ts),
            }
        )
        print(f"  {label}: {B / s:.1f} samples/s", flush=True)
    per_sample = min(ref_times)
    rows.append(
        {
            "implementation": f"per-sample per-step reference (best of {len(ref_times)} samples, extrapolated)",
            "seconds_per_batch": per_sample * B,
            "samples_per_s": 1 / per_sample,
            "measured_batches": 0,
        }
    )
    print(f"  reference: {1 / per_sample:.2f} samples/s", flush=True)
    base = rows[-1]["samples_per_s"]
    for r in rows:
        r["speedup_vs_reference"] = r["samples_per_s"] / base
    # encoder GEMM work per sample: hidden fwd + e-prop grad, readout fwd + score-function grad
    # (the readout GEMMs use per-lag weights: tau_e = 10 lags x 256 outputs)
    flops = 2 * T * (2 * 676 * 800 + 2 * 800 * 10 * 256)
    for r in rows:
        r["encoder_gemm_gflops_per_s"] = flops * r["samples_per_s"] / 1e9
    results["training"] = {
        "model": f"676 inputs -> 800 LIF -> 256 SRM readouts (K=8, tau_e=10), mlp decoder hidden 512, tau_d={args.tau_d}",
        "T": T,
        "batch": B,
        "rule": "vdib",
        "encoder_gemm_flop_per_sample": flops,
        "rows": rows,
    }


def bench_streaming(args, results: dict) -> None:
    out = []
    models = {
        "readout only (676 -> 256, K=8)": make_model(676, (), 256, 30, "linear", None),
        "full encoder (676 -> 800 -> 256)": make_model(676, (800,), 256, 30, "linear", None),
    }
    for mname, nat in models.items():
        nat.eval()
        enc = nat.encoder
        # dense work per stream-step: hidden GEMMs + the readout's per-lag GEMM (tau_e * N_Y outputs)
        flops = 2 * (
            sum(layer.in_features * layer.out_features for layer in enc.layers) + enc.lag_weight_t().numel()
        )
        tmp = tempfile.mkdtemp()
        export_onnx(nat, tmp)
        eng = OnnxEngine(tmp, threads=args.threads)
        for B in (1, 32):
            x = random_spike_frames(1, (B, 676), rate=0.05, seed=1)[0].float()
            uni = torch.rand(B, 256)
            st = enc.init_state(B)
            # eager: a realistic state (after a few steps)
            with torch.no_grad():
                for _ in range(5):
                    _, st = enc.step(x, st, uniforms=uni)

                def eager(st=st, x=x, uni=uni, enc=enc, mode="auto"):
                    with torch.no_grad():
                        enc.step(x, st, uniforms=uni, event_driven=mode)

                s_dense = timeit(lambda eager=eager: eager(mode="never"), args.min_time)
                s_event = timeit(lambda eager=eager: eager(mode="always"), args.min_time)
                flat = state_to_list(st)
                traced = torch.jit.trace(_EncoderStep(enc), (x, *flat, uni), check_trace=False)

                def ts(traced=traced, x=x, flat=flat, uni=uni):
                    with torch.no_grad():
                        traced(x, *flat, uni)

                s_ts = timeit(ts, args.min_time)
            st_o = [s.numpy() for s in flat]
            xn, un = x.numpy(), uni.numpy()
            s_ort = timeit(lambda st_o=st_o, xn=xn, un=un, eng=eng: eng.step(xn, st_o, un), args.min_time)
            timings = (
                ("torch eager, dense GEMM", s_dense),
                ("torch eager, event-driven gather", s_event),
                ("torchscript (jit.trace, dense)", s_ts),
                ("onnxruntime (dense)", s_ort),
            )
            for engine, s in timings:
                out.append(
                    {
                        "model": mname,
                        "engine": engine,
                        "batch": B,
                        "us_per_step": s * 1e6,
                        "us_per_stream_step": s * 1e6 / B,
                        "gflops": flops * B / s / 1e9,
                    }
                )
                print(f"  {mname} {engine} B={B}: {s * 1e6 / B:.1f} us/stream-step", flush=True)
    # decoders at batch 1 and 32 (tau_d = 30, 256 readouts)
    dec_rows = []
    for dname, hidden in (("linear", None), ("mlp", 512), ("cnn", None)):
        nat = make_model(676, (), 256, 30, dname, hidden).eval()
        for B in (1, 32):
            w = (torch.rand(B, 30, 256) < 0.1).float()

            def dec(w=w, nat=nat):
                with torch.no_grad():
                    nat.decode(w)

            s = timeit(dec, args.min_time)
            dec_rows.append(
                {
                    "decoder": dname if hidden is None else f"{dname} (hidden {hidden})",
                    "tau_d": 30,
                    "batch": B,
                    "us_per_call": s * 1e6,
                    "us_per_stream": s * 1e6 / B,
                }
            )
            print(f"  decoder {dname} B={B}: {s * 1e6:.0f} us", flush=True)
    results["streaming"] = out
    results["decoders"] = dec_rows


def write_md(results: dict, path: Path) -> None:
    g = results["gemm"]
    lines = [
        "# model/ benchmark",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}, onnxruntime {results['onnxruntime']}; "
        f"threads: {results['threads']}; load average at start {results['load_average_at_start']} "
        "(the machine is shared, so absolute numbers move with its load; the GEMM rows give the ceiling of the same run). "
        f"Command: `{results['command']}`.",
        "",
        "## GEMM roofline (same run)",
        "",
        "| GEMM | GFLOP/s |",
        "|---|---|",
    ]
    for k, v in g.items():
        lines.append(f"| {k} | {v:.1f} |")
    tr = results.get("training")
    if tr:
        lines += [
            "",
            f"## Training throughput, rule `vdib` ({tr['model']}, T = {tr['T']}, batch {tr['batch']})",
            "",
            "| implementation | samples/s | s/batch | speed-up vs reference | encoder GEMM GFLOP/s |",
            "|---|---|---|---|---|",
        ]
        for r in tr["rows"]:
            lines.append(
                f"| {r['implementation']} | {r['samples_per_s']:.2f} | {r['seconds_per_batch']:.2f} | "
                f"{r['speedup_vs_reference']:.1f}x | {r['encoder_gemm_gflops_per_s']:.1f} |"
            )
        lines.append("")
        lines.append(
            "The reference is a per-sample, per-time-step implementation of the same rule (eligibility "
            "outer products every step, decoder Adam per sample), as the authors' code runs; it was "
            "timed on a few samples and extrapolated linearly to the batch (it has no batch effects)."
        )
    lines += [
        "",
        "## Streaming step latency (one encoder step, uniforms given)",
        "",
        "Inputs: 5 % of the 676 inputs active per step (MNIST-DVS: ~34). GFLOP/s counts the dense work, so "
        "the event-driven rows (which skip inactive inputs) show an equivalent rate. `Encoder.step(..., event_driven="
        '"auto")` (the default) takes the gather at batch <= 8 when <= 10 % of inputs are active.',
        "",
        "| model | engine | batch | µs/step | µs per stream-step | GFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["streaming"]:
        lines.append(
            f"| {r['model']} | {r['engine']} | {r['batch']} | {r['us_per_step']:.1f} | {r['us_per_stream_step']:.1f} | {r['gflops']:.1f} |"
        )
    lines += [
        "",
        "## Decoders (τ_d = 30, 256 readouts, eager torch)",
        "",
        "| decoder | batch | µs/call | µs per stream |",
        "|---|---|---|---|",
    ]
    for r in results["decoders"]:
        lines.append(f"| {r['decoder']} | {r['batch']} | {r['us_per_call']:.0f} | {r['us_per_stream']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--T", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tau-d", type=int, default=30)
    ap.add_argument("--train-iters", type=int, default=3)
    ap.add_argument("--ref-samples", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="smoke run: small T, one training config")
    ap.add_argument("--out", type=Path, default=None, help="default bench/results (a temp dir with --quick)")
    args = ap.parse_args()
    if args.quick:
        args.T, args.train_iters, args.ref_samples, args.min_time = 20, 1, 1, 0.05
    torch.set_num_threads(args.threads)
    import onnxruntime

    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "load_average_at_start": list(os.getloadavg()),
        "command": f"OMP_NUM_THREADS={args.threads} .venv/bin/python bench/model.py"
        + (" --quick" if args.quick else ""),
    }
    print("GEMM roofline", flush=True)
    results["gemm"] = {
        "fp32 12800x676 @ 676x800 (hidden input GEMM)": gemm_gflops(12800, 676, 800, torch.float32),
        "fp32 64x676 @ 676x256": gemm_gflops(64, 676, 256, torch.float32),
        "bf16 12800x676 @ 676x800": gemm_gflops(12800, 676, 800, torch.bfloat16),
    }
    print(results["gemm"], flush=True)
    print("training", flush=True)
    bench_training(args, results)
    print("streaming", flush=True)
    bench_streaming(args, results)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp()) if args.quick else ROOT / "bench" / "results"
    args.out.mkdir(parents=True, exist_ok=True)
    name = "model"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    write_md(results, args.out / f"{name}.md")
    print(f"wrote {args.out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
