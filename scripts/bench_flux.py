"""Benchmark: one denoising step of a Flux-dev-sized transformer with SDPA vs each quantised-attention preset.

The transformer has Flux-dev's shape (19 double blocks, 38 single blocks, 24 heads of 128) with
random weights, in bf16 on CUDA. At 1024x1024 it sees 4096 image tokens and 512 text tokens. For
SDPA (diffusers' own processors) and each preset (applied with `quantattn_hf` processors) it
times the transformer forward (median of --iters after --warmup, CUDA events) and its peak memory
(torch.cuda.max_memory_allocated), and times the attention op alone at the model's shape (x57
layers). Per-layer attention error: the Q/K/V of every layer are captured once, then each
preset's output (and bf16 SDPA's) is compared with float32 SDPA on the same inputs (relative L1).

    python scripts/bench_flux.py --json flux.json          # on the GPU
    python scripts/bench_flux.py --tiny --json tiny.json   # CPU smoke test, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import quantattn_hf  # noqa: E402
from quantattn_hf.integrations.diffusers import apply, remove  # noqa: E402
from quantattn_hf.integrations.diffusers_processors import FluxQuantAttnProcessor  # noqa: E402

FLUX_DEV = {
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "axes_dims_rope": (16, 56, 56),
}
TINY = {
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (8, 12, 12),
}
DEFAULT_PRESETS = "fp16,kv-int8,kv-int4,qk-int8-pv-fp8"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny transformer and image (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default 1024; --tiny 64)")
    parser.add_argument("--text-len", type=int, default=None, help="text tokens (default 512; --tiny 16)")
    parser.add_argument("--presets", default=DEFAULT_PRESETS)
    parser.add_argument("--backend", default=None, help="quantattn backend (default: chosen by device)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 3; --tiny 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed forwards (default 10; --tiny 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (each variant)")
    parser.add_argument("--no-errors", action="store_true", help="skip the per-layer attention error")
    parser.add_argument("--json", default=None, help="write all results here")
    parser.add_argument(
        "--profile", action="store_true", help="also a torch.profiler breakdown of one step per variant (GPU time)"
    )
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    defaults = (64, 16, 1, 2) if args.tiny else (1024, 512, 3, 10)
    for name, value in zip(("size", "text_len", "warmup", "iters"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.size % 16:
        parser.error("--size must be a multiple of 16 (VAE factor 8, 2x2 packing)")
    return args


def versions(device: torch.device) -> dict[str, str]:
    import diffusers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "quantattn_hf": quantattn_hf.__version__,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    if device.type == "cuda":
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(device)
    else:
        out["cpu"] = platform.machine()
    return out


def build_transformer(config: dict, device: torch.device, dtype: torch.dtype):
    """A FluxTransformer2DModel with random weights, created directly on the device in the dtype."""
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True, **config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_inputs(config: dict, size: int, text_len: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One denoising step's inputs at `size` x `size` pixels: (size/16)^2 image tokens, `text_len` text tokens."""
    side = size // 16
    gen = torch.Generator().manual_seed(0)
    img_ids = torch.stack(
        [torch.zeros(side * side), torch.arange(side * side) // side, torch.arange(side * side) % side], dim=1
    )

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return {
        "hidden_states": rand(1, side * side, 64),
        "encoder_hidden_states": rand(1, text_len, config["joint_attention_dim"]),
        "pooled_projections": rand(1, config["pooled_projection_dim"]),
        "timestep": torch.tensor([0.5], device=device, dtype=dtype),
        "img_ids": img_ids.to(device),
        "txt_ids": torch.zeros(text_len, 3, device=device),
        "guidance": torch.tensor([3.5], device=device, dtype=dtype),
        "return_dict": False,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls after `warmup` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def measure_step(model, inputs: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Median ms per transformer forward, peak memory, and whether the output is finite."""
    run = torch.compile(model) if args.compile else model
    out = {}

    def forward():
        with torch.inference_mode():
            out["sample"] = run(**inputs)[0]

    times = time_calls(forward, device, args.warmup, args.iters)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        peak_extra = peak - before
    result = {
        "ms_median": statistics.median(times),
        "ms_min": min(times),
        "ms_all": times,
        "finite": bool(torch.isfinite(out["sample"]).all()),
    }
    if peak is not None:
        result.update(peak_mib=peak / 2**20, peak_above_start_mib=peak_extra / 2**20)
    return result


class SdpaFusedPrologueProcessor(FluxQuantAttnProcessor):
    """Baseline: quantattn's Flux processor (fused norm + RoPE kernel) with unquantised torch SDPA attention.

    Separates what the fused prologue gains from what quantised attention gains or costs.
    """

    def attend(self, query, key, value, attn_mask=None, layout="BSHD", **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return out.transpose(1, 2)


KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "_attn_fwd", "attention")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_")),
    ("quantiser", ("_quant_kernel", "_q_dot_mean")),
    ("norm+rope (fused)", ("_rms_norm_rope",)),
    ("copy/cat", ("cat", "copy", "fill")),
    ("reduce", ("reduce",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
)


def kernel_kind(name: str) -> str:
    """Category of a CUDA kernel by its name (first match in KERNEL_KINDS, else 'other')."""
    lower = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(n in lower for n in needles):
            return kind
    return "other"


def profile_step(model, inputs: dict) -> dict[str, float]:
    """GPU milliseconds of one transformer forward by kernel category (torch.profiler), plus the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(**inputs)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        ms = event.device_time_total / 1000.0
        if ms <= 0:
            continue
        kinds[kernel_kind(event.key)] = kinds.get(kernel_kind(event.key), 0.0) + ms
        kernels[event.key] = ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {"kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1])), "top": top}


def attention_op_ms(config: dict, inputs: dict, preset: str | None, args, device) -> float:
    """Median ms of one attention call at the model's shape (joint text + image tokens)."""
    heads, dim = config["num_attention_heads"], config["attention_head_dim"]
    tokens = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(1, tokens, heads, dim, generator=gen).to(device, inputs["pooled_projections"].dtype) for _ in "qkv"
    )
    if preset is None:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def fn():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
    else:

        def fn():
            return quantattn_hf.quantized_attention(q, k, v, config=preset, layout="BSHD", backend=args.backend)

    with torch.inference_mode():
        return statistics.median(time_calls(fn, device, args.warmup, max(args.iters, 5)))


def capture_layers(model, inputs: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every attention layer's Q, K, V ([B, S, H, D]) from one forward (fp16 preset on the reference backend)."""
    captured = {}

    def observer(processor, q, k, v, layout):
        captured[processor.layer_name] = (q.clone(), k.clone(), v.clone())

    for processor in apply(model, "fp16", backend="reference").values():
        processor.observer = observer
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        remove(model)
    return captured


def rel_l1(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().sum() / ref.abs().sum())


def layer_errors(captured: dict, presets: list[str], args) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """{variant: {layer: relative L1 vs float32 SDPA}} for SDPA and each preset on the captured inputs, and failures."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    errors: dict[str, dict[str, float]] = {"sdpa": {}, **{p: {} for p in presets}}
    failures: dict[str, str] = {}
    with torch.inference_mode():
        for name, (q, k, v) in captured.items():
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            ref = sdpa(qt.float(), kt.float(), vt.float())
            errors["sdpa"][name] = rel_l1(sdpa(qt, kt, vt), ref)
            for preset in presets:
                if preset in failures:
                    continue
                try:
                    out = quantattn_hf.quantized_attention(qt, kt, vt, config=preset, backend=args.backend)
                    errors[preset][name] = rel_l1(out, ref)
                except Exception as exc:  # reported in the table; the other presets still run
                    failures[preset] = f"error check failed: {type(exc).__name__}: {exc}"
    return errors, failures


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    config = TINY if args.tiny else FLUX_DEV
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    info = versions(device)
    print("command:", " ".join(["python", *sys.argv]) if argv is None else " ".join(["bench_flux.py", *argv]))
    print("device:", device, "|", ", ".join(f"{k} {v}" for k, v in info.items()))
    side = args.size // 16
    print(
        f"model: Flux-{'tiny' if args.tiny else 'dev'}-sized transformer, random weights, {args.dtype}: "
        f"{config['num_layers']} double + {config['num_single_layers']} single blocks, "
        f"{config['num_attention_heads']} heads x {config['attention_head_dim']}; {args.size}x{args.size} -> "
        f"{side * side} image + {args.text_len} text tokens; warmup {args.warmup}, iters {args.iters}, "
        f"compile {args.compile}"
    )
    t0 = time.perf_counter()
    model = build_transformer(config, device, dtype)
    inputs = make_inputs(config, args.size, args.text_len, device, dtype)
    layers = config["num_layers"] + config["num_single_layers"]
    print(f"built in {time.perf_counter() - t0:.1f} s; {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params")

    rows: dict[str, dict] = {}
    extra = ["sdpa+fused-prologue"] if device.type == "cuda" and not args.tiny else []
    for variant in ["sdpa", *extra, *presets]:
        row: dict = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if variant == "sdpa+fused-prologue":
                    model.set_attn_processor(SdpaFusedPrologueProcessor())
                elif variant != "sdpa":
                    apply(model, variant, backend=args.backend)
                row.update(measure_step(model, inputs, args, device))
                op_preset = None if variant.startswith("sdpa") else variant
                row["attn_op_ms"] = attention_op_ms(config, inputs, op_preset, args, device)
                if args.profile and device.type == "cuda":
                    row["profile"] = profile_step(model, inputs)
            except Exception as exc:  # a failing variant is reported in the table, the others still run
                row["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                remove(model)
                torch._dynamo.reset()
        row["warnings"] = sorted({str(w.message) for w in caught if "quantattn" in str(w.message)})
        rows[variant] = row
        print(f"  {variant}: {row.get('ms_median', float('nan')):.2f} ms/step", flush=True)

    errors: dict = {}
    if not args.no_errors:
        try:
            errors, failures = layer_errors(capture_layers(model, inputs), presets, args)
            for preset, message in failures.items():
                rows[preset]["error"] = "; ".join(filter(None, [rows[preset].get("error"), message]))
        except Exception as exc:  # the timings above still get printed
            errors = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()

    base = rows["sdpa"].get("ms_median")
    base_peak = rows["sdpa"].get("peak_mib")
    header = (
        f"{'attention':<16} {'ms/step':>9} {'vs SDPA':>8} {'peak MiB':>10} {'vs SDPA':>8} "
        f"{f'attn ms x{layers}':>14} {'rel L1 mean':>12} {'rel L1 max':>11}  note"
    )
    print()
    print(header)
    print("-" * len(header))
    for variant, row in rows.items():
        ms = row.get("ms_median")
        peak = row.get("peak_mib")
        errs = errors.get(variant) if isinstance(errors.get(variant), dict) else None
        cells = [
            f"{variant:<16}",
            f"{ms:>9.2f}" if ms else f"{'-':>9}",
            f"{ms / base:>8.3f}" if ms and base else f"{'-':>8}",
            f"{peak:>10.0f}" if peak else f"{'-':>10}",
            f"{peak / base_peak:>8.3f}" if peak and base_peak else f"{'-':>8}",
            f"{row['attn_op_ms'] * layers:>14.2f}" if "attn_op_ms" in row else f"{'-':>14}",
            f"{statistics.mean(errs.values()):>12.2e}" if errs else f"{'-':>12}",
            f"{max(errs.values()):>11.2e}" if errs else f"{'-':>11}",
        ]
        note = row.get("error", "" if row.get("finite", True) else "non-finite output")
        note = "; ".join([note, *row.get("warnings", [])]).strip("; ")
        print(" ".join(cells) + "  " + note)
    print(
        "\nms/step: median transformer forward; peak MiB: torch.cuda.max_memory_allocated during one forward "
        "(weights included); attn ms: one attention call at the model's shape (random inputs) times the layer "
        "count; rel L1: per-layer attention output vs float32 SDPA on the layer's captured Q/K/V (sdpa row: SDPA "
        "in the run's dtype)."
    )
    profiled = {variant: row["profile"] for variant, row in rows.items() if "profile" in row}
    if profiled:
        kinds = sorted({kind for p in profiled.values() for kind in p["kinds"]})
        print("\nGPU ms of one step by kernel kind (torch.profiler)")
        print(f"{'kind':<20}" + "".join(f"{v:>16}" for v in profiled))
        for kind in kinds:
            print(f"{kind:<20}" + "".join(f"{p['kinds'].get(kind, 0.0):>16.2f}" for p in profiled.values()))
        for variant, p in profiled.items():
            print(f"\ntop kernels, {variant}:")
            for name, ms in p["top"]:
                print(f"  {ms:9.2f} ms  {name[:110]}")
    target = rows.get("qk-int8-pv-fp8", {})
    if base and target.get("ms_median"):
        peak_ratio = target["peak_mib"] / base_peak if target.get("peak_mib") and base_peak else float("nan")
        print(
            f"target (issue 5): qk-int8-pv-fp8 step x{target['ms_median'] / base:.3f} of SDPA (wanted <= 0.95), "
            f"peak memory x{peak_ratio:.3f} (wanted <= 1.0)"
        )
    result = {
        "command": sys.argv if argv is None else ["bench_flux.py", *argv],
        "device": str(device),
        "versions": info,
        "config": {**config, "size": args.size, "text_len": args.text_len, "dtype": args.dtype},
        "settings": {k: getattr(args, k) for k in ("warmup", "iters", "compile", "backend")},
        "rows": rows,
        "layer_errors": errors,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
