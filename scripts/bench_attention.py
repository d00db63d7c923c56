"""Attention kernels on a CUDA GPU: torch SDPA (cuDNN, flash), SageAttention 1.0.6, dequantise-then-SDPA and
every quantattn-hf preset through the Triton backend, side by side in one run; then split-KV decode over
bf16 / int8 / int4 caches, and the fused quantiser's share of the attention it feeds.

    python scripts/bench_attention.py --json out/bench_attention.json [--sweep]
    python scripts/bench_attention.py --plot out/bench_attention.json docs/bench_attention.png
    QUANTATTN_TRITON_AUTOTUNE=0 ncu --section SpeedOfLight --section Occupancy -k regex:_attn_fwd \
        python scripts/bench_attention.py --profile qk-int8-pv-fp8 kv-int8
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from quantattn_hf.attention import quantized_attention
from quantattn_hf.backends.base import AttentionCall
from quantattn_hf.backends.reference import ReferenceBackend
from quantattn_hf.backends.triton import TritonBackend
from quantattn_hf.backends.triton import launch as triton_launch
from quantattn_hf.backends.triton.fastlaunch import LaunchCache
from quantattn_hf.config import PRESETS, QuantConfig

PREFILL_SHAPES = [  # (B, H, N, D, causal)
    (1, 24, 4608, 128, False),
    (1, 24, 16384, 128, False),
    (2, 32, 4096, 64, False),
    (1, 32, 8192, 128, True),
]
SWEEP_NS = [1024, 2048, 4608, 8192, 16384]
DECODE_SHAPES = [(8, 8192), (32, 4096), (4, 32768)]  # (B, L), GQA 32/8, D=128
SUBSET_ROWS = 512
TRITON = TritonBackend()
REFERENCE = ReferenceBackend()


def bench_ms(fn) -> float:
    """Median GPU time of fn in ms: a CUDA graph of one call, replayed (CUDA events through do_bench).

    Graph replay takes the host's launch cost out, for every method alike (see eager_ms for that cost).
    """
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # a method that cannot be captured is timed eagerly, and says so
        print(f"# graph capture failed ({type(exc).__name__}: {exc}); timing eagerly")
        torch.cuda.synchronize()
        return eager_ms(fn)
    return triton.testing.do_bench(graph.replay, warmup=50, rep=200, return_mode="median")


def eager_ms(fn) -> float:
    """Median time of fn called from Python each time (launch overheads included)."""
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def make_call(q, k, v, config, causal) -> AttentionCall:
    b, hq, sq, d = q.shape
    return AttentionCall(
        config=config, batch=b, q_heads=hq, kv_heads=k.shape[1], q_len=sq, kv_len=k.shape[2], head_dim=d,
        head_dim_v=v.shape[3], dtype=q.dtype, device=q.device, scale=1 / math.sqrt(d), is_causal=causal,
        attn_mask=None,
    )  # fmt: skip


def errors(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(relative L1, cosine similarity) against the float64 result on the subset."""
    o, e = out.double().flatten(), exact.flatten()
    return ((o - e).abs().sum() / e.abs().sum()).item(), F.cosine_similarity(o, e, dim=0).item()


def subset(t: torch.Tensor) -> torch.Tensor:
    """The accuracy subset: batch 0, heads 0-1, the last SUBSET_ROWS query rows."""
    return t[:1, :2, -SUBSET_ROWS:]


def float64_subset(q, k, v, causal) -> torch.Tensor:
    qs = subset(q).double()
    ks, vs = k[:1, :2].double(), v[:1, :2].double()
    s = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n, m = qs.shape[2], ks.shape[2]
        keep = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ vs


def prefill_methods(q, k, v, causal):
    """name -> (callable computing the full output, callable giving the subset output for accuracy)."""
    methods = {}

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return fn

    methods["sdpa-cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    methods["sdpa-flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    try:
        from sageattention import sageattn

        methods["sage-1.0.6"] = lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=causal)
    except ImportError as exc:
        print(f"# SageAttention not importable: {exc}")
    cfg8 = QuantConfig.preset("kv-int8")
    kq, vq = TRITON.quantize(k, cfg8.k), TRITON.quantize(v, cfg8.v)

    def dequant_sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, kq.dequantize(q.dtype), vq.dequantize(q.dtype), is_causal=causal)

    methods["dequant(kv-int8)+cudnn"] = dequant_sdpa
    for name in PRESETS:
        methods[f"triton {name}"] = lambda name=name: quantized_attention(
            q, k, v, config=name, is_causal=causal, backend="triton"
        )
    return methods


def preset_parts(q, k, v, name, causal):
    """(quantise-all callable, kernel-only callable, reference-backend subset output) for one preset."""
    cfg = QuantConfig.preset(name)
    held = [TRITON.quantize(t, spec) for t, spec in ((q, cfg.q), (k, cfg.k), (v, cfg.v))]
    call = make_call(q, k, v, cfg, causal)
    quant = lambda: [TRITON.quantize(t, spec) for t, spec in ((q, cfg.q), (k, cfg.k), (v, cfg.v))]  # noqa: E731
    kernel = lambda: TRITON.attention(*held, call)  # noqa: E731
    ref = quantized_attention(subset(q), k[:1, :2], v[:1, :2], config=name, is_causal=causal, backend="reference")
    return quant, kernel, ref


def run_prefill(shapes, rows, accuracy=True):
    for shape in shapes:
        prefill_one(*shape, rows, accuracy)
        torch.cuda.empty_cache()


def prefill_one(b: int, h: int, n: int, d: int, causal: bool, rows: list, accuracy: bool) -> None:
    """Every prefill method at one shape."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k = k + 0.5 * torch.randn(1, 1, 1, d, device="cuda", dtype=torch.bfloat16)
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
    exact = float64_subset(q, k, v, causal) if accuracy else None
    shape = f"B{b} H{h} N{n} D{d}{' causal' if causal else ''}"
    base_ms = None
    for name, fn in prefill_methods(q, k, v, causal).items():
        try:
            out = fn()
            torch.cuda.synchronize()
            ms = bench_ms(fn)
        except Exception as exc:  # a baseline that cannot run this shape is reported, not fatal
            print(f"# {shape} {name}: failed ({type(exc).__name__}: {exc})")
            continue
        base_ms = base_ms or ms
        row = dict(kind="prefill", shape=shape, n=n, d=d, causal=causal, method=name, ms=ms,
                   tflops=flops / ms / 1e9, ratio=base_ms / ms, eager_ms=eager_ms(fn))  # fmt: skip
        if accuracy:
            row["rel_l1"], row["cos"] = errors(subset(out), exact)
        if name.startswith("triton "):
            preset = name.split(" ", 1)[1]
            quant, kernel, ref = preset_parts(q, k, v, preset, causal)
            kernel()
            row["kernel_ms"] = bench_ms(kernel)
            row["kernel_tflops"] = flops / row["kernel_ms"] / 1e9
            row["kernel_ratio"] = base_ms / row["kernel_ms"]
            row["quant_ms"] = bench_ms(quant)
            row["quant_frac"] = row["quant_ms"] / row["kernel_ms"]
            if accuracy:
                row["ref_rel_l1"] = errors(ref, exact)[0]
        rows.append(row)
        print_row(row)
        sys.stdout.flush()


def run_decode(rows):
    for b, length in DECODE_SHAPES:
        decode_one(b, length, rows)
        torch.cuda.empty_cache()


def decode_one(b: int, length: int, rows: list) -> None:
    """bf16 SDPA decode against the Triton split-KV kernel over int8 / int4 caches, one shape."""
    hq, hkv, d = 32, 8, 128
    torch.manual_seed(0)
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    shape = f"decode B{b} L{length} GQA{hq}/{hkv} D{d}"
    qs, ks, vs = q[:1, :8].double(), k[:1, :2].double(), v[:1, :2].double()
    ks, vs = ks.repeat_interleave(4, 1), vs.repeat_interleave(4, 1)
    exact = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(d), -1) @ vs
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    out = sdpa()
    base_ms = bench_ms(sdpa)
    nbytes = 2 * k.numel() * k.element_size()
    row = dict(kind="decode", shape=shape, method="sdpa bf16", ms=base_ms, gbs=nbytes / base_ms / 1e6, ratio=1.0,
               op_ms=eager_ms(sdpa), op_ratio=1.0)  # fmt: skip
    row["rel_l1"], row["cos"] = errors(out[:1, :8], exact)
    rows.append(row)
    print_row(row)
    for transposed, name in itertools.product((True, False), ("kv-int8", "kv-int4", "kv-int4-v8")):
        if not transposed and name == "kv-int4-v8":
            continue
        triton_launch.DECODE_TRANSPOSED_QK = transposed
        cfg = QuantConfig.preset(name)
        kq, vq = TRITON.quantize(k, cfg.k), TRITON.quantize(v, cfg.v)
        qq = TRITON.quantize(q, cfg.q)
        call = make_call(q, k, v, cfg, False)
        kernel = lambda qq=qq, kq=kq, vq=vq, call=call: TRITON.attention(qq, kq, vq, call)  # noqa: E731
        op = lambda kq=kq, vq=vq, cfg=cfg: quantized_attention(  # noqa: E731
            q, kq, vq, config=cfg, enable_gqa=True, backend="triton"
        )
        out = op()
        ms, op_ms = bench_ms(kernel), eager_ms(op)
        nbytes = kq.nbytes() + vq.nbytes()
        method = f"triton {name}" + ("" if transposed else " S=QK^T")
        row = dict(kind="decode", shape=shape, method=method, ms=ms, gbs=nbytes / ms / 1e6,
                   ratio=base_ms / ms, op_ms=op_ms, op_ratio=base_ms / op_ms)  # fmt: skip
        row["rel_l1"], row["cos"] = errors(out[:1, :8], exact)
        rows.append(row)
        print_row(row)
    triton_launch.DECODE_TRANSPOSED_QK = True


def print_row(r: dict) -> None:
    if r["kind"] == "prefill":
        extra = ""
        if "kernel_ms" in r:
            extra = (f" | kernel {r['kernel_ms']:.3f} ms {r['kernel_tflops']:.0f} TF/s x{r['kernel_ratio']:.2f}"
                     f" | quant {r['quant_ms']:.3f} ms ({100 * r['quant_frac']:.1f}%)")  # fmt: skip
        acc = f" relL1 {r['rel_l1']:.2e} cos {r['cos']:.6f}" if "rel_l1" in r else ""
        acc += f" eager {r['eager_ms']:.3f} ms"
        ref = f" (ref {r['ref_rel_l1']:.2e})" if "ref_rel_l1" in r else ""
        print(f"{r['shape']:26s} {r['method']:24s} {r['ms']:8.3f} ms {r['tflops']:6.0f} TF/s x{r['ratio']:.2f}"
              f"{acc}{ref}{extra}")  # fmt: skip
    else:
        extra = f" | eager op {r['op_ms'] * 1e3:.0f} us x{r['op_ratio']:.2f}" if "op_ms" in r else ""
        print(f"{r['shape']:32s} {r['method']:24s} {r['ms'] * 1e3:8.1f} us {r['gbs']:6.0f} GB/s x{r['ratio']:.2f}"
              f" relL1 {r['rel_l1']:.2e} cos {r['cos']:.6f}{extra}")  # fmt: skip


def plot(json_path: str, png_path: str) -> None:
    """Throughput against sequence length (B=1, H=24, D=128, non-causal) from a --json file; needs no GPU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(json_path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r["kind"] == "prefill" and r["shape"].startswith("B1 H24 ") and r["d"] == 128]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["n"], r["tflops"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        if method.startswith("triton ") and method != "triton fp16":
            pts = sorted((r["n"], r["kernel_tflops"]) for r in rows if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), marker="x", linestyle=":", label=f"{method} (kernel only)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length N (B=1, H=24, D=128, non-causal, bf16)")
    ax.set_ylabel("TFLOP/s (CUDA-graph replay)")
    ax.set_title(f"Attention throughput, {data['header']['device']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def flux_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 Q, K, V of the Flux shape (B=1, H=24, N=4608, D=128) for the profiling modes."""
    torch.manual_seed(0)
    return tuple(torch.randn(1, 24, 4608, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))


def profile_once(presets: list[str]) -> None:
    """One Triton call per preset at the Flux shape, for `ncu -k regex:_attn_fwd` (QUANTATTN_TRITON_AUTOTUNE=0)."""
    q, k, v = flux_inputs()
    for preset in presets:
        quantized_attention(q, k, v, config=preset, backend="triton")
    torch.cuda.synchronize()


def profile_host(presets: list[str]) -> None:
    """Host time of eager `quantized_attention` calls at the Flux shape, launch plans off and on side by side, and
    cProfile's top functions (launch plans on) per preset."""
    import cProfile
    import pstats

    q, k, v = flux_inputs()
    for preset in presets:

        def calls(n: int, preset: str = preset) -> None:
            for _ in range(n):
                quantized_attention(q, k, v, config=preset, backend="triton", layout="BSHD")

        host_ms = {}
        for plans in (False, True):
            LaunchCache.enabled = plans
            calls(3)
            torch.cuda.synchronize()
            start = time.perf_counter()
            calls(20)
            host_ms[plans] = (time.perf_counter() - start) / 20 * 1000
            torch.cuda.synchronize()
        print(
            f"\n{preset}: ms of host time per call (no sync): launch plans off {host_ms[False]:.3f}, "
            f"on {host_ms[True]:.3f}"
        )
        profiler = cProfile.Profile()
        profiler.enable()
        calls(20)
        profiler.disable()
        torch.cuda.synchronize()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


def profile_quant(presets: list[str]) -> None:
    """The fused quantisers at the Flux shape, per preset and operand: CUDA-graph ms each (as the table's `quant`
    column) and torch.profiler's table of the GPU kernels of ten calls of all three, by GPU time."""
    q, k, v = flux_inputs()
    for preset in presets:
        cfg = QuantConfig.preset(preset)
        parts = {"Q": (q, cfg.q), "K": (k, cfg.k), "V": (v, cfg.v)}
        times = {name: bench_ms(lambda t=t, spec=spec: TRITON.quantize(t, spec)) for name, (t, spec) in parts.items()}
        print(f"\n{preset} quantisers (ms): " + ", ".join(f"{n} {ms:.4f}" for n, ms in times.items()))
        activities = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(10):
                for t, spec in parts.values():
                    TRITON.quantize(t, spec)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def profile_decode(presets: list[str]) -> None:
    """One Triton decode per preset over a held cache (B=8, L=8192, GQA 32/8), for `ncu -k regex:_decode`."""
    q = torch.randn(8, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(8, 8, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for preset in presets:
        cfg = QuantConfig.preset(preset)
        kq, vq = TRITON.quantize(k, cfg.k), TRITON.quantize(v, cfg.v)
        quantized_attention(q, kq, vq, config=cfg, enable_gqa=True, backend="triton")
    torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"), help="only plot a --json file (no GPU needed)")
    parser.add_argument("--profile", nargs="+", metavar="PRESET", help="only run each preset once at the Flux shape")
    parser.add_argument("--profile-host", nargs="+", metavar="PRESET", help="only cProfile eager calls (Flux shape)")
    parser.add_argument("--profile-quant", nargs="+", metavar="PRESET", help="only time the quantisers (Flux shape)")
    parser.add_argument("--profile-decode", nargs="+", metavar="PRESET", help="only one decode per preset (B8 L8192)")
    parser.add_argument("--sweep", action="store_true", help="also B=1 H=24 D=128 over N (for the plot)")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    if args.profile:
        profile_once(args.profile)
        return
    if args.profile_host:
        profile_host(args.profile_host)
        return
    if args.profile_decode:
        profile_decode(args.profile_decode)
        return
    if args.profile_quant:
        profile_quant(args.profile_quant)
        return
    props = torch.cuda.get_device_properties(0)
    header = dict(
        command="python " + " ".join(sys.argv), device=props.name, sms=props.multi_processor_count,
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )  # fmt: skip
    for key, value in header.items():
        print(f"# {key}: {value}")
    rows: list[dict] = []
    if not args.skip_prefill:
        run_prefill(PREFILL_SHAPES, rows)
    if not args.skip_decode:
        run_decode(rows)
    if args.sweep:
        sweep = [(1, 24, n, 128, False) for n in SWEEP_NS if n not in (4608, 16384)]
        run_prefill(sweep, rows, accuracy=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
