"""Training through attention: forward + backward time and memory of quantattn-hf presets against SDPA.

One Flux-sized attention layer (B=1, H=24, N=4608, D=128, bf16) and one Llama-sized layer (B=1, Hq=32,
Hkv=8 GQA, N=4096, D=128, causal), side by side in one run. Per method: forward ms (with autograd
recording), forward+backward ms, backward ms (timed alone, after an untimed forward) and the backward's GPU
kernel time (its kernels' durations summed by torch.profiler: the time it costs where the host keeps ahead, as
in a model whose other layers give the GPU work), each per layer of a chain of `--chain` layers (default 4;
each layer's output is the next one's query, so the host's work for one layer overlaps the GPU's for another;
the first layer's host time is not hidden), bytes saved for backward (tensors
autograd keeps after the forward; Q, K, V come from a projection stand-in so that nothing else holds
them) and, on CUDA, the peak memory of forward+backward above the inputs, of one layer and of the whole chain
(a model's peak: every layer's saved tensors, then one layer's backward). `--tiny` runs small shapes on the CPU as
a smoke test.

A preset may name its backward kernels after a slash: `kv-int8/triton` runs the Triton backward kernels,
`kv-int8/2` cuDNN's backward in 2 head chunks (`QUANTATTN_CUDNN_BACKWARD`, set for that row only),
`kv-int8/op` cuDNN's backward through torch's op instead of the cuDNN frontend (`QUANTATTN_CUDNN_GRAPH=0`: one
call over all heads where the held operands are released as they are dequantised), `kv-int8/retain` every
backward with retain_graph=True (the held operands then stay to the end); a bare preset takes the default (on
CUDA cuDNN's backward, through the cuDNN frontend where it is installed, in the head chunks that put the peak
below SDPA's without gradient copies).

    python scripts/bench_train.py --json out/bench_train.json
    python scripts/bench_train.py --plot out/bench_train.json docs/bench_train.png
    python scripts/bench_train.py --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from quantattn_hf import quantized_attention

LAYERS = {  # name: (B, Hq, Hkv, N, D, causal)
    "flux": (1, 24, 24, 4608, 128, False),
    "llama": (1, 32, 8, 4096, 128, True),
}
TINY_LAYERS = {"flux": (1, 2, 2, 96, 64, False), "llama": (1, 4, 2, 80, 64, True)}
DEFAULT_PRESETS = ("kv-int8", "kv-int4", "qk-int8-pv-fp8", "kv-int8/op", "kv-int8/triton", "kv-int8/retain")
MIB = 1 << 20
SDPA_KERNELS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of fn in ms (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timed_backward(
    forward, dout: torch.Tensor, device: torch.device, warmup: int, reps: int, retain: bool = False
) -> float:
    """Median wall time in ms of the backward alone, each after a fresh forward that is not timed."""
    times = []
    for i in range(warmup + reps):
        out = forward()
        _sync(device)
        start = time.perf_counter()
        out.backward(dout, retain_graph=retain)
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gpu_kernels(prof: torch.profiler.profile) -> list[tuple[str, float]]:
    """(name, µs) of each GPU kernel (and memset/copy) a torch.profiler run recorded, in order."""
    events = prof.events()
    return [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_backward_ms(forward, dout: torch.Tensor, device: torch.device, reps: int, retain: bool = False):
    """Median GPU kernel time in ms of the backward (after a fresh forward each time): the sum of its kernels'
    durations from torch.profiler, so without the gaps where the GPU waits for the host (None off CUDA)."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(reps):
        out = forward()
        _sync(device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out.backward(dout, retain_graph=retain)
            _sync(device)
        times.append(sum(us for _, us in gpu_kernels(prof)) / 1e3)
    return statistics.median(times)


def attention_fn(method: str, causal: bool, backend: str | None):
    """(q, k, v) -> out for SDPA (default choice, or one of its kernels) or one quantattn-hf preset."""
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    if method in SDPA_KERNELS:

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            with sdpa_kernel(SDPA_KERNELS[method]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        return sdpa
    preset = method.partition("/")[0]
    return lambda q, k, v: quantized_attention(
        q, k, v, config=preset, is_causal=causal, enable_gqa=True, backend=backend
    )


def backward_kernels(method: str) -> contextlib.AbstractContextManager:
    """For `preset/triton` or `preset/n`, QUANTATTN_CUDNN_BACKWARD set to 0 or n while the row runs; for
    `preset/op`, QUANTATTN_CUDNN_GRAPH=0."""
    choice = method.partition("/")[2]
    if choice in ("", "retain"):
        return contextlib.nullcontext()
    if choice == "op":
        return mock.patch.dict(os.environ, {"QUANTATTN_CUDNN_GRAPH": "0"})
    if choice != "triton" and not choice.isdigit():
        raise ValueError(f"{method}: the backward after '/' is 'triton', 'op', 'retain' or a chunk count")
    return mock.patch.dict(os.environ, {"QUANTATTN_CUDNN_BACKWARD": "0" if choice == "triton" else choice})


def run_layer(method: str, shape: tuple, dtype: torch.dtype, device: torch.device, args) -> dict:
    """Time and memory of one method on one layer shape."""
    with backward_kernels(method):
        return _run_layer(method, shape, dtype, device, args)


def _run_layer(method: str, shape: tuple, dtype: torch.dtype, device: torch.device, args) -> dict:
    b, hq, hkv, n, d, causal = shape
    gen = torch.Generator(device=device).manual_seed(0)
    leaves = [
        torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen).requires_grad_() for h in (hq, hkv, hkv)
    ]
    dout = torch.randn(b, hq, n, d, device=device, dtype=dtype, generator=gen)
    attn = attention_fn(method, causal, args.backend)
    retain = method.endswith("/retain")

    def forward() -> torch.Tensor:
        # `x * 1` stands in for the Q/K/V projections: non-leaf tensors only the attention can keep alive
        return attn(*(x * 1 for x in leaves))

    def chain() -> torch.Tensor:
        # `--chain` layers, each one's output the next one's query: the host's work for one layer then
        # overlaps the GPU's for another, as in a model, instead of every launch waiting on an idle GPU
        q = leaves[0]
        for _ in range(args.chain):
            q = attn(q * 1, leaves[1] * 1, leaves[2] * 1)
        return q

    def forward_backward() -> None:
        chain().backward(dout, retain_graph=retain)

    per_layer = 1.0 / args.chain
    fwd_ms = timed(chain, device, args.warmup, args.reps) * per_layer  # the training forward: records the graph
    train_ms = timed(forward_backward, device, args.warmup, args.reps) * per_layer
    bwd_ms = timed_backward(chain, dout, device, args.warmup, args.reps, retain) * per_layer
    gpu_ms = kernel_backward_ms(chain, dout, device, max(3, args.reps // 4), retain)
    for x in leaves:
        x.grad = None
    chain_peak = peak_mib(forward_backward, device)
    for x in leaves:
        x.grad = None

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaf_ptrs = {x.untyped_storage().data_ptr() for x in leaves}

    def layer_forward_backward() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        out.backward(dout, retain_graph=retain)

    peak = peak_mib(layer_forward_backward, device)
    saved_bytes = sum(nb for ptr, nb in saved.items() if ptr not in leaf_ptrs)
    return {
        "method": method,
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": train_ms,
        "bwd_ms": bwd_ms,
        "bwd_gpu_ms": None if gpu_ms is None else gpu_ms * per_layer,
        "saved_mib": saved_bytes / MIB,
        "peak_mib": peak,
        "chain_peak_mib": chain_peak,
    }


def peak_mib(fn, device: torch.device) -> float | None:
    """Runs fn; on CUDA its peak memory above what was allocated before it, in MiB (None elsewhere)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def _fmt(x: float | None, spec: str) -> str:
    """`x` formatted by `spec` (such as '>9.2f'), or 'n/a' right-aligned to the same width."""
    width = spec.lstrip(">").split(".")[0]
    return format("n/a", f">{width}") if x is None else format(x, spec)


def plot(json_path: str, png_path: str) -> None:
    """Each method's backward time against its peak memory, both as ratios to SDPA's, one panel per layer, with
    the target region (time within 1.2x, peak below SDPA's) shaded: filled markers the one layer's peak, hollow
    ones the chain's, crosses the backward's GPU kernel time (dotted to the wall time: what the GPU waits on the
    host), where the file has them; from a --json file, needs no GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r.get("peak_vs_sdpa") is not None]
    if not rows:
        raise SystemExit(f"{json_path}: no peak memory in this file (measured on CUDA only): nothing to plot")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 5), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        ax.fill_between([0, 1.2], 0, 1.0, color="tab:green", alpha=0.15, label="target: time <= 1.2x, peak <= 1.0x")
        markers = iter("osD^v<>phX*" * 3)
        colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3)
        for r in (r for r in rows if r["layer"] == layer):
            marker, color = next(markers), next(colors)
            ax.scatter(r["bwd_vs_sdpa"], r["peak_vs_sdpa"], s=50, marker=marker, color=color, label=r["method"])
            if r.get("chain_peak_vs_sdpa") is not None:
                ax.scatter(r["bwd_vs_sdpa"], r["chain_peak_vs_sdpa"], s=50, marker=marker, facecolors="none",
                           edgecolors=color)  # fmt: skip
            if r.get("bwd_gpu_vs_sdpa") is not None:  # the same peak at the backward's GPU kernel time
                ax.scatter(r["bwd_gpu_vs_sdpa"], r["peak_vs_sdpa"], s=18, marker="x", color=color)
                ax.plot([r["bwd_gpu_vs_sdpa"], r["bwd_vs_sdpa"]], [r["peak_vs_sdpa"]] * 2, color=color, lw=0.6, ls=":")
        shape = ",".join(str(x) for x in rows[[r["layer"] for r in rows].index(layer)]["shape"])
        ax.set_xscale("log")
        ticks = [1, 1.2, 1.5, 2, 3, 4, 6, 8]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlim(0.8, max(r["bwd_vs_sdpa"] for r in rows) * 1.4)
        ax.set_xlabel("backward time / SDPA's (log scale; x: GPU kernel time)")
        ax.set_ylim(0.4, max(r["peak_vs_sdpa"] for r in rows) * 1.1)
        ax.set_ylabel("peak memory of forward+backward / SDPA's (hollow: the chain's)")
        ax.set_title(f"{layer} (B,Hq,Hkv,N,D,causal = {shape})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Training attention layer vs SDPA, {data['device_name']}, {data['dtype']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    parser.add_argument("--backend", default=None, help="quantattn-hf backend (default: the device's)")
    parser.add_argument(
        "--sdpa-kernels",
        default=None,
        help="extra SDPA rows pinned to one kernel: sdpa-flash, sdpa-cudnn (default on CUDA: both; CPU: none)",
    )
    parser.add_argument(
        "--chain", type=int, default=4, help="times are per layer of a chain of this many layers; `chain peak` its peak"
    )
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="only plot a --json file (no GPU needed)")
    args = parser.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.reps = args.reps if args.reps is not None else (3 if args.tiny else 20)
    layers = TINY_LAYERS if args.tiny else LAYERS
    kernels = args.sdpa_kernels if args.sdpa_kernels is not None else ",".join(SDPA_KERNELS) * (device.type == "cuda")
    methods = ["sdpa", *[m for m in kernels.split(",") if m], *[p for p in args.presets.split(",") if p]]

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print("command:", " ".join(sys.argv))
    print(f"device: {device} ({device_name}); dtype {args.dtype}")
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))

    rows = []
    for layer, shape in layers.items():
        for method in methods:
            try:
                rows.append({"layer": layer, "shape": list(shape), **run_layer(method, shape, dtype, device, args)})
                print(f"  done {layer} {method}: fwd+bwd {rows[-1]['fwd_bwd_ms']:.2f} ms", flush=True)
            except RuntimeError as exc:  # an SDPA kernel that cannot serve this shape or device
                if method not in SDPA_KERNELS:
                    raise
                print(f"{layer} {method}: skipped ({str(exc).splitlines()[0][:100]})")
    sdpa = {r["layer"]: r for r in rows if r["method"] == "sdpa"}

    header = (
        f"{'layer':<6} {'B,Hq,Hkv,N,D,causal':<26} {'method':<15} {'fwd ms':>8} {'fwd+bwd':>9} {'bwd ms':>8} "
        f"{'bwd/SDPA':>9} {'bwd GPU':>8} {'/SDPA':>6} {'saved MiB':>10} {'saved/SDPA':>11} {'peak MiB':>9} "
        f"{'peak/SDPA':>10} {'chain peak':>11} {'/SDPA':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        base = sdpa[r["layer"]]
        r["bwd_vs_sdpa"] = r["bwd_ms"] / base["bwd_ms"] if base["bwd_ms"] > 0 else None
        r["bwd_gpu_vs_sdpa"] = r["bwd_gpu_ms"] / base["bwd_gpu_ms"] if r["bwd_gpu_ms"] and base["bwd_gpu_ms"] else None
        r["saved_vs_sdpa"] = r["saved_mib"] / base["saved_mib"] if base["saved_mib"] else None
        r["peak_vs_sdpa"] = r["peak_mib"] / base["peak_mib"] if r["peak_mib"] and base["peak_mib"] else None
        r["chain_peak_vs_sdpa"] = (
            r["chain_peak_mib"] / base["chain_peak_mib"] if r["chain_peak_mib"] and base["chain_peak_mib"] else None
        )
        shape = ",".join(str(x) for x in r["shape"])
        print(
            f"{r['layer']:<6} {shape:<26} {r['method']:<15} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>9.3f} "
            f"{r['bwd_ms']:>8.3f} {_fmt(r['bwd_vs_sdpa'], '>9.2f')} {_fmt(r['bwd_gpu_ms'], '>8.3f')} "
            f"{_fmt(r['bwd_gpu_vs_sdpa'], '>6.2f')} {r['saved_mib']:>10.2f} "
            f"{_fmt(r['saved_vs_sdpa'], '>11.2f')} {_fmt(r['peak_mib'], '>9.1f')} {_fmt(r['peak_vs_sdpa'], '>10.2f')} "
            f"{_fmt(r['chain_peak_mib'], '>11.1f')} {_fmt(r['chain_peak_vs_sdpa'], '>6.2f')}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"command": sys.argv, "device": str(device), "device_name": device_name, "dtype": args.dtype,
                 "versions": versions, "rows": rows},
                f,
                indent=2,
            )  # fmt: skip


if __name__ == "__main__":
    main()
