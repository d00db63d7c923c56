"""LLM decode with a quantised KV cache: tokens/s and cache memory, side by side in one run.

A Llama-3-8B-shaped model with random bf16 weights (32 layers, 32 query / 8 KV heads, head dim 128;
`--layers` for fewer) decodes from a cache filled with `context` tokens of random keys and values,
for each batch and context, with:

  sdpa          DynamicCache (bf16) + SDPA attention (transformers' default)
  hf-quanto-4   transformers' QuantizedCache, quanto backend, int4 (optimum-quanto), SDPA attention
  hf-hqq-4      transformers' QuantizedCache, HQQ backend, int4 (hqq), SDPA attention
  quantattn-8   QuantizedKVCache kv-int8 + attn_implementation="quantattn" (read in place)
  quantattn-4   QuantizedKVCache kv-int4 + quantattn

Every row of one run uses the same model, inputs and timing; speedups are against `sdpa` in the same
row group. A cell that does not fit in memory says OOM.

    python scripts/bench_decode.py --json out/bench_decode.json --plot docs/bench_decode.png   # CUDA
    python scripts/bench_decode.py --tiny                                    # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import platform
import shlex
import sys
import time
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, QuantizedCache

import quantattn_hf
from quantattn_hf.backends import DEVICE_DEFAULTS, get_backend
from quantattn_hf.integrations.kv_cache import QuantizedKVCache
from quantattn_hf.integrations.transformers import configure, register

METHODS = ("sdpa", "hf-quanto-4", "hf-hqq-4", "quantattn-8", "quantattn-4")
LLAMA3_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
}
TINY = {**LLAMA3_8B, "vocab_size": 256, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def make_cache(method: str, model: LlamaForCausalLM) -> Any:
    """The cache of one method, with the model's attention set to what reads it."""
    if method.startswith("quantattn"):
        preset = "kv-int8" if method == "quantattn-8" else "kv-int4"
        configure(model, preset)
        return QuantizedKVCache(model, preset)
    model.set_attn_implementation("sdpa")
    if method == "sdpa":
        return DynamicCache(config=model.config)
    return QuantizedCache("quanto" if method == "hf-quanto-4" else "hqq", model.config, nbits=4)


def tensor_bytes(t: Any) -> int:
    """Bytes of a tensor, of a tensor subclass's inner tensors (quanto) or of tensors in tuples and dicts (HQQ)."""
    if isinstance(t, (tuple, list)):
        return sum(tensor_bytes(x) for x in t)
    if isinstance(t, dict):
        return sum(tensor_bytes(x) for x in t.values())
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def cache_bytes(cache: Any) -> int:
    """Bytes a cache holds: ours counts itself; others by their tensors (16-bit window included)."""
    if isinstance(cache, QuantizedKVCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += tensor_bytes(getattr(layer, name, None))
    return total


def fill(cache: Any, config: LlamaConfig, batch: int, context: int, device: torch.device, seed: int) -> None:
    """Fill every layer with `context` tokens of random keys (a few outlier channels, as real keys have) and values."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, config.num_key_value_heads, context, config.head_dim)
    chan_scale = torch.ones(config.head_dim, device=device, dtype=torch.bfloat16)
    chan_scale[:4] = 8.0
    for idx in range(config.num_hidden_layers):
        k = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).mul_(chan_scale)
        v = torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16)
        cache.update(k, v, idx)
        del k, v


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_one(
    model: LlamaForCausalLM, method: str, batch: int, context: int, steps: int, warmup: int, device: torch.device
) -> dict[str, Any]:
    """Fill a cache of `method` and time `steps` single-token decode steps after `warmup` ones."""
    row: dict[str, Any] = {"method": method, "batch": batch, "context": context}
    cache = None
    try:
        cache = make_cache(method, model)
        fill(cache, model.config, batch, context, device, seed=batch * 100003 + context)
        row["cache_mib"] = cache_bytes(cache) / 2**20
        gen = torch.Generator(device=device).manual_seed(0)
        tokens = torch.randint(0, model.config.vocab_size, (batch, warmup + steps), generator=gen, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            for i in range(warmup + steps):
                if i == warmup:
                    sync(device)
                    start = time.perf_counter()
                pos = torch.full((batch, 1), context + i, device=device, dtype=torch.long)
                model(input_ids=tokens[:, i : i + 1], position_ids=pos, past_key_values=cache, logits_to_keep=1)
            sync(device)
        elapsed = time.perf_counter() - start
        row["ms_per_step"] = 1e3 * elapsed / steps
        row["tokens_per_s"] = batch * steps / elapsed
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as exc:  # one failing cell (a missing package, a kernel error) is reported, not fatal
        row["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"
    finally:
        del cache
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    base = {(r["batch"], r["context"]): r for r in rows if r["method"] == "sdpa" and "error" not in r}
    header = f"{'batch':>5} {'context':>7} {'method':<12} {'tok/s':>9} {'ms/step':>8} {'speedup':>7} "
    header += f"{'cache MiB':>10} {'vs bf16':>7} {'peak GiB':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ref = base.get((r["batch"], r["context"]))
        lead = f"{r['batch']:>5} {r['context']:>7} {r['method']:<12} "
        if "error" in r:
            print(lead + r["error"])
            continue
        speed = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        ratio = f"{r['cache_mib'] / ref['cache_mib']:.3f}" if ref else "-"
        peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
        print(
            lead + f"{r['tokens_per_s']:>9.1f} {r['ms_per_step']:>8.2f} {speed:>7} "
            f"{r['cache_mib']:>10.1f} {ratio:>7} {peak:>8}"
        )


def print_summary(rows: list[dict[str, Any]]) -> None:
    """The issue's two targets, read off the table: speedup at 32k / batch 8, and cells only a quantised cache fits."""
    by = {(r["method"], r["batch"], r["context"]): r for r in rows}
    ref, ours = by.get(("sdpa", 8, 32768)), by.get(("quantattn-8", 8, 32768))
    if ref and ours and "error" not in ref and "error" not in ours:
        speed = ours["tokens_per_s"] / ref["tokens_per_s"]
        print(f"target 1: batch 8, 32k context: quantattn-8 {speed:.2f}x the tokens/s of sdpa (target >= 1.3x)")
    only = [
        f"batch {b} / {c} ({', '.join(m for m in METHODS if (m, b, c) in by and 'error' not in by[(m, b, c)])})"
        for (m, b, c), r in by.items()
        if m == "sdpa"
        and r.get("error") == "OOM"
        and any("error" not in by.get((q, b, c), {"error": 1}) for q in ("quantattn-8", "quantattn-4"))
    ]
    print("target 2: fits only quantised (sdpa OOM): " + ("; ".join(only) if only else "none in this run"))


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Tokens/s against context, one panel per batch size, one line per method (OOM cells left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.6), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for method in METHODS:
            pts = [
                (r["context"], r["tokens_per_s"])
                for r in rows
                if r["batch"] == batch and r["method"] == method and "error" not in r
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer narrow model, small contexts, CPU: a smoke test")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; 2 with --tiny)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32)")
    parser.add_argument("--contexts", default=None, help="comma-separated context lengths (default 4k,8k,16k,32k)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 16; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    parser.add_argument("--json", default=None, help="write the rows and the run's settings here")
    parser.add_argument("--plot", default=None, help="write a PNG of tokens/s against context here")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    shape = dict(TINY if args.tiny else LLAMA3_8B)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    batches = [int(x) for x in (args.batches or ("1,4" if args.tiny else "1,8,32")).split(",")]
    contexts = [int(x) for x in (args.contexts or ("256,512" if args.tiny else "4096,8192,16384,32768")).split(",")]
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}")
    steps = args.steps or (3 if args.tiny else 16)

    register()
    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the weights in bf16 directly (no 32 GB float32 copy)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(default_dtype)
    backend = DEVICE_DEFAULTS.get(device.type, "reference")
    backend_ok = get_backend(backend).available()

    command = [sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    print("command:", " ".join(shlex.quote(a) for a in command))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({dev_name}); quantattn backend: {backend} ({'available' if backend_ok else 'missing'})")
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "triton": version("triton"),
        "optimum-quanto": version("optimum-quanto"),
        "hqq": version("hqq"),
        "quantattn-hf": quantattn_hf.__version__,
    }
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))
    n_layers, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    kind = "tiny (hidden 256, vocab 256)" if args.tiny else "Llama-3-8B-shaped"
    heads = config.num_attention_heads
    print(f"model: {kind}, {n_layers} layers, {heads}/{kv} heads, head dim {hd}, random bf16 weights")
    print(f"timing: {steps} decode steps after {args.warmup} warm-up steps, cache pre-filled with random K/V")
    print()

    rows = []
    for context in contexts:
        for batch in batches:
            for method in methods:
                row = run_one(model, method, batch, context, steps, args.warmup, device)
                rows.append(row)
                print(f"  done {method} b={batch} ctx={context}: {row.get('error') or round(row['tokens_per_s'], 1)}")
    print()
    print_table(rows)
    print()
    print_summary(rows)
    if args.json:
        meta = {"command": command, "device": str(device), "device_name": dev_name, "versions": versions}
        meta.update({"model": shape, "steps": steps, "warmup": args.warmup, "backend": backend})
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
