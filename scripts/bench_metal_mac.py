"""For a Mac user to run and send back: the Metal kernels on MPS checked against the reference, then timed
against torch's scaled_dot_product_attention on MPS, side by side in one run.

    python scripts/bench_metal_mac.py                # check + benchmark on MPS (Apple Silicon, PyTorch >= 2.6)
    python scripts/bench_metal_mac.py --quick        # fewer, smaller shapes
    python scripts/bench_metal_mac.py --json out.json
    python scripts/bench_metal_mac.py --emulated     # tiny dry run through the CPU harness (times meaningless)

Nobody on this project has an Apple GPU: this script is how the first Apple numbers (and the first
sight of Apple's shader compiler on these sources) will arrive. Please paste its whole output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from quantattn_hf.attention import quantized_attention
from quantattn_hf.backends import get_backend
from quantattn_hf.config import QuantConfig

PRESETS = ("kv-int8", "kv-int4", "kv-int4-v8")
PREFILL = [  # (name, B, Hq, Hkv, N, D, causal)
    ("Flux 1024^2", 1, 24, 24, 4608, 128, False),
    ("SDXL 1024^2 (64^2 latents)", 2, 10, 10, 4096, 64, False),
    ("SD1.5 512^2", 2, 8, 8, 4096, 40, False),
    ("LLM prefill GQA 32/8", 1, 32, 8, 2048, 128, True),
]
DECODE = [  # (name, B, Hq, Hkv, L, D)
    ("decode GQA 32/8, 4k cache", 1, 32, 8, 4096, 128),
    ("decode GQA 32/8, 32k cache", 1, 32, 8, 32768, 128),
    ("decode MHA 32, 8k cache", 4, 32, 32, 8192, 128),
]
CHECKS = [  # (name, B, Hq, Hkv, Sq, Sk, D, causal, mask)
    ("forward", 2, 4, 4, 300, 300, 128, False, None),
    ("forward D=64 bool mask", 1, 8, 8, 200, 333, 64, False, "bool"),
    ("forward D=80 float mask", 1, 4, 4, 129, 200, 80, False, "float"),
    ("forward GQA causal D=256", 1, 8, 2, 70, 150, 256, True, None),
    ("forward D=40", 1, 2, 2, 65, 90, 40, False, None),
    ("forward D=96 causal", 1, 2, 2, 65, 90, 96, True, None),
    ("forward D=160", 1, 2, 2, 65, 90, 160, False, None),
    ("decode GQA 32/8", 2, 32, 8, 1, 1000, 128, False, None),
    ("decode causal 2 tokens + mask", 1, 8, 2, 2, 777, 64, True, "bool"),
]


def header(args: argparse.Namespace, device: str) -> dict:
    chip = ""
    if sys.platform == "darwin":
        chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True).stdout
    info = {
        "command": " ".join(sys.argv),
        "device": device,
        "chip": chip.strip() or platform.processor(),
        "macos": platform.mac_ver()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    for k, v in info.items():
        print(f"# {k}: {v}")
    return info


def sync(device: str) -> None:
    if device == "mps":
        torch.mps.synchronize()


def bench_ms(fn, device: str, reps: int) -> float:
    """Median wall time of fn in ms, synchronising the device around each call."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().sum() / b.abs().sum().clamp_min(1e-30)).item()


def float64_attention(q, k, v, mask, causal) -> torch.Tensor:
    """Attention of the unquantised inputs in float64 (the accuracy yardstick of docs/accuracy.md)."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    s = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        sq, sk = s.shape[-2:]
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def make_mask(kind, b, hq, sq, sk, gen):
    if kind == "bool":
        mask = torch.rand(b, 1, sq, sk, generator=gen) > 0.3
        mask[..., 0, :] = False  # one fully masked query row
        return mask
    if kind == "float":
        keep = torch.rand(b, hq, sq, sk, generator=gen) > 0.2
        return torch.where(keep, torch.randn(b, hq, sq, sk, generator=gen), -torch.inf)
    return None


def run_checks(device: str, backend: str, quick: bool) -> list[dict]:
    """Kernels on the device vs the reference backend on CPU, for the same inputs."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    print("\n## correctness: kernels on", device, "vs the reference backend on CPU (same inputs)")
    print(
        "# rel L1 of the output: kernel vs reference backend, and each vs float64 attention of the unquantised inputs"
    )
    head = f"{'case':32} {'preset':11} {'dtype':9} {'vs ref':>9} {'|lse diff|':>10} {'kern/f64':>9} {'ref/f64':>9}"
    print(head + f" {'verdict':>8}")
    checks = CHECKS[:3] + CHECKS[-2:-1] if quick else CHECKS
    if backend == "metal-emulated" and quick:
        checks = [(n, b, hq, hkv, min(sq, 40), min(sk, 60), d, c, m) for n, b, hq, hkv, sq, sk, d, c, m in checks[:3]]
    for name, b, hq, hkv, sq, sk, d, causal, mask_kind in checks:
        for preset in PRESETS:
            for dtype in (torch.float16, torch.bfloat16):
                q = torch.randn(b, hq, sq, d, generator=gen).to(dtype)
                k = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
                v = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
                mask = make_mask(mask_kind, b, hq, sq, sk, gen)
                kw = dict(config=preset, is_causal=causal, enable_gqa=hq != hkv, return_lse=True)
                ref_out, ref_lse = quantized_attention(q, k, v, attn_mask=mask, backend="reference", **kw)
                dev = [t.to(device) for t in (q, k, v)]
                dev_mask = None if mask is None else mask.to(device)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out, lse = quantized_attention(*dev, attn_mask=dev_mask, backend=backend, **kw)
                fell_back = [str(w.message) for w in caught if "reference backend" in str(w.message)]
                err = rel_l1(out, ref_out)
                exact = float64_attention(q, k, v, mask, causal)
                kern64, ref64 = rel_l1(out, exact), rel_l1(ref_out, exact)
                fin = torch.isfinite(ref_lse)
                lse = lse.cpu()
                same_inf = torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
                lse_err = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
                # the CPU harness measures <= 6e-4 (fp16) / 4e-3 (bf16); fast math on Apple may add some
                bound = 2e-3 if dtype == torch.float16 else 1e-2
                ok = err <= bound and lse_err <= 1e-3 and same_inf and not fell_back and torch.isfinite(out).all()
                verdict = "ok" if ok else ("FALLBACK" if fell_back else "FAIL")
                rows.append(
                    dict(case=name, preset=preset, dtype=str(dtype), rel_l1=err, lse=lse_err, kernel_vs_f64=kern64,
                         reference_vs_f64=ref64, verdict=verdict)
                )  # fmt: skip
                print(
                    f"{name:32} {preset:11} {str(dtype)[6:]:9} {err:9.2e} {lse_err:10.2e} {kern64:9.4f} {ref64:9.4f}"
                    f" {verdict:>8}"
                )
                for msg in fell_back:
                    print("   ", msg)
    x = torch.randn(1, 2, 100, 64, generator=gen)
    x[0, 0, 3, 5] = float("nan")
    impl = get_backend(backend)
    for spec in (QuantConfig.preset("kv-int8").k, QuantConfig.preset("kv-int4").v):
        got = impl.quantize(x.to(device), spec)
        want = impl.quantize(x, spec) if backend == "metal-emulated" else get_backend("reference").quantize(x, spec)
        same_nan = torch.equal(got.scale.isnan().cpu(), want.scale.isnan())
        codes_equal = (got.data.cpu() == want.data).float().mean().item()
        print(f"quantiser with a NaN input ({spec.mode}): NaN groups match: {same_nan}, codes equal: {codes_equal:.5f}")
        rows.append(dict(case=f"quantiser NaN {spec.mode}", same_nan=same_nan, codes_equal=codes_equal))
    return rows


def run_timings(device: str, backend: str, quick: bool, reps: int) -> list[dict]:
    """SDPA (fp16) vs quantattn on the same inputs: full op (quantises K/V), and attention over a held cache."""
    rows = []
    print(f"\n## timings on {device}, median of {reps} (ms); ratio = SDPA time / this time (> 1: faster than SDPA)")
    print(f"{'shape':32} {'method':34} {'ms':>9} {'ratio':>7} {'K/V MiB':>8}")
    prefill = PREFILL[:2] if quick else PREFILL
    decode = DECODE[:1] if quick else DECODE
    if backend == "metal-emulated":
        prefill = [("tiny (emulated)", 1, 2, 2, 64, 64, False)]
        decode = [("tiny decode (emulated)", 1, 4, 2, 128, 64)]
    shapes = [(n, b, hq, hkv, s, s, d, c) for n, b, hq, hkv, s, d, c in prefill]
    shapes += [(n, b, hq, hkv, 1, length, d, False) for n, b, hq, hkv, length, d in decode]
    for name, b, hq, hkv, sq, sk, d, causal in shapes:
        q = torch.randn(b, hq, sq, d, device=device, dtype=torch.float16)
        k = torch.randn(b, hkv, sk, d, device=device, dtype=torch.float16)
        v = torch.randn(b, hkv, sk, d, device=device, dtype=torch.float16)
        gqa = hq != hkv

        def sdpa(q=q, k=k, v=v, causal=causal, gqa=gqa):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

        base = bench_ms(sdpa, device, reps)
        kv_mib = 2 * k.numel() * 2 / 2**20
        rows.append(dict(shape=name, method="sdpa fp16", ms=base, ratio=1.0, kv_mib=kv_mib))
        print(f"{name:32} {'torch SDPA fp16':34} {base:9.3f} {1.0:7.2f} {kv_mib:8.1f}")
        impl = get_backend(backend)
        for preset in PRESETS:
            cfg = QuantConfig.preset(preset)
            kq, vq = impl.quantize(k, cfg.k), impl.quantize(v, cfg.v)
            held_mib = (kq.nbytes() + vq.nbytes()) / 2**20
            kw = dict(config=preset, is_causal=causal, enable_gqa=gqa, backend=backend)
            methods = {
                f"{preset} (quantise K/V + attn)": lambda q=q, k=k, v=v, kw=kw: quantized_attention(q, k, v, **kw),
                f"{preset} (held K/V)": lambda q=q, kq=kq, vq=vq, kw=kw: quantized_attention(q, kq, vq, **kw),
            }
            for label, fn in methods.items():
                ms = bench_ms(fn, device, reps)
                rows.append(dict(shape=name, method=label, ms=ms, ratio=base / ms, kv_mib=held_mib))
                print(f"{name:32} {label:34} {ms:9.3f} {base / ms:7.2f} {held_mib:8.1f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller shapes")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--emulated", action="store_true", help="dry run on CPU through the harness")
    args = parser.parse_args()
    if args.emulated:
        device, backend = "cpu", "metal-emulated"
    else:
        device, backend = "mps", "metal"
        if not get_backend("metal").available():
            sys.exit("needs macOS with an MPS device and PyTorch >= 2.6 (torch.mps.compile_shader); see --emulated")
    info = header(args, device)
    if backend == "metal":
        t0 = time.perf_counter()
        get_backend("metal").library  # noqa: B018 - compile once, timed
        print(f"# shader compile (torch.mps.compile_shader): {(time.perf_counter() - t0) * 1e3:.0f} ms")
    checks = run_checks(device, backend, args.quick)
    timings = run_timings(device, backend, args.quick, 3 if args.emulated else args.reps)
    if args.emulated:
        print("\n(emulated: the timings above measure the CPU fiber harness, not a GPU; they mean nothing)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=info, checks=checks, timings=timings), f, indent=1)
    failed = [r for r in checks if r.get("verdict") not in (None, "ok")]
    print(f"\n{len(failed)} failed check(s)" if failed else "\nall checks ok")


if __name__ == "__main__":
    main()
