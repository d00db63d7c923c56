"""cuDNN's backward over quantised operands, by head-chunk plan: GPU time, host time and peak memory.

The evidence for the chunk policy of `quantattn_hf/backends/cudnn_backward.py`, which serves backwards that keep
the held operands (retain_graph, traced graphs) and, through the cuDNN frontend where it is installed, every
backward (`QUANTATTN_CUDNN_GRAPH=0`: torch's op, whose eager training frees the held operands and runs one chunk).
Per layer (Flux- and Llama-sized, as in bench_train) and preset, each plan (the K/V heads of each chunk, e.g.
`10+7+7`) runs `backward_in_chunks` over held operands it keeps and is reported with:
- GPU ms: the plan's launches replayed from a CUDA graph, so without host time;
- eager ms: the plan launched as the library launches it, `--reps` calls back to back, per call;
- host ms: the Python time of those calls (launches are asynchronous, so this is what the host spends);
- peak MiB: bytes above what both methods share (output, lse, upstream gradient): the held operands plus the
  backward's peak, against the dense Q/K/V plus the backward's peak for SDPA.
The baseline row `sdpa` is SDPA's own backward kernel (cuDNN) over the dense operands. `policy` marks the plan
`backward_plan` picks; every plan dequantises K/V as the policy does (once for all chunks, or by chunk). Then
the host time of each step of one chunk and of the whole backward op, and, through
autograd over a chain of `--chain` layers as bench_train times it, the backward's host ms and wall ms per layer
for SDPA and the preset (the default backward, held operands released); with `--profile`, a
torch.profiler table of the preset's backward (host time by op and CUDA runtime call); with `--kernels`, each
plan's GPU kernels by name (cuDNN's launches: the dO·O dot, the main kernel, dQ's conversion, GQA's dK/dV
head reduction).

    python scripts/bench_backward_chunks.py --json out/chunks.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from bench_train import (
    LAYERS,
    MIB,
    attention_fn,
    gpu_kernels,
    peak_mib,
)  # this folder's script: layers, calls, peak, kernels

from quantattn_hf import QuantConfig, quantize, quantized_attention
from quantattn_hf.autograd import _attention_bwd_op, make_call
from quantattn_hf.backends import cudnn_backward, cudnn_graph
from quantattn_hf.backends.triton.dequantize import HeadDequantizer


def plan_text(bounds: list[int]) -> str:
    return "+".join(str(h1 - h0) for h0, h1 in zip(bounds[:-1], bounds[1:], strict=True))


def measure(fn, reps: int) -> dict:
    """GPU ms (CUDA graph replay), eager ms and host ms per call of fn, and its peak bytes above the start."""
    fn()
    peak = peak_mib(fn, torch.device("cuda")) * MIB
    host, eager = timed_calls(fn, reps)
    gpu = None
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        gpu = begin.elapsed_time(end) / reps
        del graph
    except RuntimeError as exc:  # a launch that cannot be captured: GPU time unknown
        print(f"    (no CUDA graph: {str(exc).splitlines()[0][:100]})")
    return {"gpu_ms": gpu, "eager_ms": eager, "host_ms": host, "peak_bytes": peak}


def kernel_table(fn, reps: int = 10) -> list[tuple[str, float, float]]:
    """(kernel name, GPU us per call, launches per call) of fn's kernels from torch.profiler, longest first."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for name, us in gpu_kernels(prof):
        entry = kernels.setdefault(name, [0.0, 0.0])
        entry[0] += us / reps
        entry[1] += 1 / reps
    return sorted(((name, us, n) for name, (us, n) in kernels.items()), key=lambda k: -k[1])


def timed_calls(fn, reps: int) -> tuple[float, float]:
    """(host ms, wall ms) per call of fn over `reps` calls back to back after a warm one: the host's is its Python
    time (launches are asynchronous, the GPU catches up after), the wall one ends when the GPU does."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host * 1e3 / reps, (time.perf_counter() - start) * 1e3 / reps


def run_layer(layer: str, preset: str, plans: list[str], reps: int, args) -> list[dict]:
    b, hq, hkv, n, d, causal = LAYERS[layer]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv))
    dout = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    cfg = QuantConfig.preset(preset)
    held = [quantize(t, spec) for t, spec in ((q, cfg.q), (k, cfg.k), (v, cfg.v))]
    out, lse = quantized_attention(
        q, k, v, config=cfg, is_causal=causal, enable_gqa=True, backend="triton", return_lse=True
    )
    call = make_call(q, q.shape, v.shape, None, causal, d**-0.5, cfg)
    held_bytes = sum(t.nbytes() for t in held)
    policy, kv_once = cudnn_backward.backward_plan(*held, call, in_place=cudnn_graph.available())
    dense = [t.dequantize(torch.bfloat16) for t in held]
    dense_bytes = sum(t.nbytes for t in (q, k, v))

    def sdpa() -> None:
        cudnn_backward.dense_backward(dout, *dense, out, lse, causal, call.scale)

    rows = [{"layer": layer, "preset": preset, "plan": "sdpa", **measure(sdpa, reps), "resident": dense_bytes}]
    if args.kernels:
        rows[0]["kernels"] = kernel_table(sdpa)
    named = {plan_text(policy): policy}
    for text in plans:
        if "+" in text:
            bounds = [0]
            for width in text.split("+"):
                bounds.append(bounds[-1] + int(width))
        else:
            bounds = [hkv * i // int(text) for i in range(int(text) + 1)]
        if bounds[-1] == hkv and int(text.split("+")[0]) <= hkv:
            named.setdefault(plan_text(bounds), bounds)
    for text, bounds in named.items():

        def chunked(bounds=bounds) -> None:
            cudnn_backward.backward_in_chunks(*held, out, lse, dout, call, bounds, kv_once=kv_once)

        row = {"layer": layer, "preset": preset, "plan": text, **measure(chunked, reps), "resident": held_bytes}
        if args.kernels:
            row["kernels"] = kernel_table(chunked)
        row["policy"] = bounds == policy
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["peak_mib"] = (row["resident"] + row["peak_bytes"]) / MIB
        row["gpu_vs_sdpa"] = row["gpu_ms"] / base["gpu_ms"] if row["gpu_ms"] and base["gpu_ms"] else None
        row["eager_vs_sdpa"] = row["eager_ms"] / base["eager_ms"]
        row["peak_vs_sdpa"] = row["peak_mib"] / rows[0]["peak_mib"]

    # host time of the steps of one chunk of the policy's plan, and of the whole op
    h1 = policy[1]
    qs, ks = slice(0, h1 * call.groups), slice(0, h1)
    deq_q, deq_kv = HeadDequantizer([held[0]], torch.bfloat16), HeadDequantizer(held[1:], torch.bfloat16)
    (qd,), (kd, vd) = deq_q(qs), deq_kv(ks)
    part = cudnn_backward.dense_backward(dout[:, qs], qd, kd, vd, out[:, qs], lse[:, qs], causal, call.scale)
    whole = [torch.empty_like(t) for t in (q, k, v)]
    parts = [x for t in held for x in (t.data, t.scale, t.zero_point, t.mean)]
    steps = {
        "HeadDequantizer(K, V) made": lambda: HeadDequantizer(held[1:], torch.bfloat16),
        "K/V dequantised (a launch)": lambda: deq_kv(ks),
        "cuDNN backward (a call)": lambda: cudnn_backward.dense_backward(
            dout[:, qs], qd, kd, vd, out[:, qs], lse[:, qs], causal, call.scale
        ),
        "3 gradient copies": lambda: (
            whole[0][:, qs].copy_(part[0]),
            whole[1][:, ks].copy_(part[1]),
            whole[2][:, ks].copy_(part[2]),
        ),
        "backward_in_chunks (policy)": lambda: cudnn_backward.backward_in_chunks(
            *held, out, lse, dout, call, policy, kv_once=kv_once
        ),
        "attention_bwd op (policy)": lambda: _attention_bwd_op(
            dout, None, out, lse, *parts, None, causal, call.scale, cfg.to_json(), "triton", [None] * 3, True
        ),
    }
    host = {name: timed_calls(fn, reps)[0] for name, fn in steps.items()}
    rows.append({"layer": layer, "preset": preset, "plan": "host steps", "host_steps_ms": host, "kv_once": kv_once})
    rows.append({"layer": layer, "preset": preset, "plan": "autograd", **autograd_host(layer, preset, args)})
    return rows


def autograd_host(layer: str, preset: str, args) -> dict:
    """Per layer of a `--chain`: the host ms of `backward()` (it returns once every launch is queued) and its wall
    ms to the GPU's end, for SDPA and the preset; with `--profile`, torch.profiler's table of the preset's
    backward, by host time."""
    b, hq, hkv, n, d, causal = LAYERS[layer]
    gen = torch.Generator(device="cuda").manual_seed(1)
    leaves = [
        torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        for h in (hq, hkv, hkv)
    ]
    dout = torch.randn(b, hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    result: dict = {}
    for name in ("sdpa", preset):
        attn = attention_fn(name, causal, "triton")

        def chain(attn=attn) -> torch.Tensor:
            q = leaves[0]
            for _ in range(args.chain):
                q = attn(q * 1, leaves[1] * 1, leaves[2] * 1)
            return q

        host, wall = [], []
        for i in range(args.reps + 3):
            out = chain()
            torch.cuda.synchronize()
            start = time.perf_counter()
            out.backward(dout)
            queued = time.perf_counter()
            torch.cuda.synchronize()
            if i >= 3:
                host.append((queued - start) * 1e3 / args.chain)
                wall.append((time.perf_counter() - start) * 1e3 / args.chain)
        result[f"{name}_host_ms"] = sorted(host)[len(host) // 2]
        result[f"{name}_wall_ms"] = sorted(wall)[len(wall) // 2]
        if args.profile and name == preset:
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(args.reps):
                    out = chain()
                    torch.cuda.synchronize()
                    with torch.profiler.record_function("backward"):
                        out.backward(dout)
                    torch.cuda.synchronize()
            result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", default="flux,llama")
    parser.add_argument("--presets", default="kv-int8")
    parser.add_argument(
        "--plans",
        default="1,2,3,4,6,8,7+7+7+3,10+10+4,11+11+2",
        help="even chunk counts, or K/V head widths joined by '+' (skipped where they do not sum to the heads)",
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--chain", type=int, default=4, help="layers in the autograd chain (as bench_train's)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table of the preset's backward")
    parser.add_argument("--kernels", action="store_true", help="print each plan's GPU kernels (torch.profiler)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_backward_chunks: needs CUDA (cuDNN's backward)")
    print("command:", " ".join(sys.argv))
    print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    rows = []
    for layer in args.layers.split(","):
        for preset in args.presets.split(","):
            rows += run_layer(layer, preset, args.plans.split(","), args.reps, args)
    header = (
        f"{'layer':<6} {'preset':<15} {'plan':<12} {'GPU ms':>7} {'/SDPA':>6} {'eager ms':>9} {'/SDPA':>6} "
        f"{'host ms':>8} {'peak MiB':>9} {'/SDPA':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "plan" in r and r["plan"] in ("host steps", "autograd"):
            continue
        gpu = "n/a" if r["gpu_ms"] is None else f"{r['gpu_ms']:.3f}"
        gpu_r = "n/a" if r["gpu_vs_sdpa"] is None else f"{r['gpu_vs_sdpa']:.2f}"
        plan = r["plan"] + (" *" if r.get("policy") else "")
        print(
            f"{r['layer']:<6} {r['preset']:<15} {plan:<12} {gpu:>7} {gpu_r:>6} {r['eager_ms']:>9.3f} "
            f"{r['eager_vs_sdpa']:>6.2f} {r['host_ms']:>8.3f} {r['peak_mib']:>9.1f} {r['peak_vs_sdpa']:>6.2f}"
        )
    print("* the plan backward_plan picks")
    for r in rows:
        if "kernels" in r:
            print(f"kernels of {r['layer']} {r['preset']} {r['plan']} (GPU us per call, launches per call):")
            for name, us, n in r["kernels"]:
                print(f"  {us:9.1f} {n:4.1f}  {name[:100]}")
    for r in rows:
        if "host_steps_ms" in r:
            print(
                f"host ms per call, {r['layer']} {r['preset']} "
                f"(K/V dequantised {'once' if r['kv_once'] else 'by chunk'}): "
                + "; ".join(f"{k} {v:.3f}" for k, v in r["host_steps_ms"].items())
            )
    for r in rows:
        if r["plan"] == "autograd":
            p = r["preset"]
            print(
                f"autograd backward per layer, {r['layer']}: SDPA host {r['sdpa_host_ms']:.3f} ms, wall "
                f"{r['sdpa_wall_ms']:.3f} ms; {p} host {r[p + '_host_ms']:.3f} ms, wall {r[p + '_wall_ms']:.3f} ms"
            )
            if "profile" in r:
                print(r["profile"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "device_name": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
