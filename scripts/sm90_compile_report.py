"""Compile Triton launches (decode, or the fused quantiser) for sm90 on a machine without a GPU and report what
ptxas made of them.

A development tool for kernel work between device sessions: the launch path runs as on CUDA (same arguments,
heuristics and constexprs), but Triton compiles for an H100 target with its bundled ptxas and nothing is
launched. Per kernel: registers a thread, spilled bytes, shared memory, the CTAs an SM that registers and shared
memory allow, the loads the pipeliner turned into asynchronous copies (TTGIR `async_copy_global_to_local`), the
SASS instruction count, and for the longest loop its instructions, barriers, MMAs and shared-memory loads and
stores an iteration. `--dump DIR` writes each kernel's TTGIR, PTX and SASS. Predictions only: timings need the
GPU, and fewer instructions did not make these kernels faster (docs/triton_notes.md, versions 12 and 14).

    python scripts/sm90_compile_report.py --presets kv-int8 kv-int4 --block-n 32 64 --warps 4 --stages 3
    python scripts/sm90_compile_report.py --kernel quantize --presets qk-int8-pv-fp8 --dump out/sass
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from quantattn_hf.backends.base import AttentionCall  # noqa: E402
from quantattn_hf.config import QuantConfig  # noqa: E402
from quantattn_hf.quant import quantize  # noqa: E402

H100_REGS, H100_SMEM, H100_THREADS = 65536, 227 * 1024, 2048
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


class CompileOnlyDriver:
    """The slice of Triton's CUDA driver that compiling needs: an sm90 target, device 0, stream 0."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_only(compiled: list) -> None:
    """Make every JIT launch compile (warmup) instead of run, appending the compiled kernels to `compiled`."""
    run = JITFunction.run

    def warm(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = warm


def resources(kernel) -> dict:
    """The report's columns for a compiled kernel: ptxas' own report on its PTX, its TTGIR and its SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        rep = subprocess.run(
            [str(BIN / "ptxas"), "-v", "--gpu-name", "sm_90a", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = int(re.search(r"Used (\d+) registers", rep).group(1))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", rep))
    warps = kernel.metadata.num_warps
    smem = kernel.metadata.shared
    by_regs = H100_REGS // (regs * 32 * warps)
    by_smem = H100_SMEM // smem if smem else by_regs
    ttgir = kernel.asm["ttgir"]
    sass = sass_of(kernel)
    return {
        "regs": regs,
        "spill_bytes": spill,
        "smem": smem,
        "ctas_per_sm": min(by_regs, by_smem, H100_THREADS // (32 * warps)),
        "async_copies": ttgir.count("async_copy_global_to_local"),
        "instrs": len(re.findall(r"/\*[0-9a-f]{4,}\*/\s+[@A-Z]", sass)),
        **main_loop(sass),
    }


def main_loop(sass: str) -> dict:
    """Instruction mix of the longest loop in the SASS (a backward branch to its head): per-iteration cost."""
    instrs = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)
    addr = [int(a, 16) for a, _, _, _ in instrs]
    best = (0, 0)
    for i, (_, _, op, rest) in enumerate(instrs):
        target = re.match(r"\s*(0x[0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr[i]:
            head = addr.index(int(target.group(1), 16))
            best = max(best, (i - head + 1, head), key=lambda b: b[0])
    body = [op.split(".")[0] for _, _, op, _ in instrs[best[1] : best[1] + best[0]]]
    return {
        "loop_instrs": best[0],
        "loop_bars": body.count("BAR"),
        "loop_mma": body.count("HMMA") + body.count("HGMMA") + body.count("IMMA"),
        "loop_lds": body.count("LDS") + body.count("LDSM"),
        "loop_sts": body.count("STS"),
    }


def sass_of(kernel) -> str:
    """The kernel's SASS, disassembled from its cubin by Triton's bundled cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        return subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout


def dump(kernel, name: str, out: Path) -> None:
    """Write the kernel's TTGIR, PTX and SASS as out/name.*."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.ttgir").write_text(kernel.asm["ttgir"])
    (out / f"{name}.ptx").write_text(kernel.asm["ptx"])
    (out / f"{name}.sass").write_text(sass_of(kernel))


def decode_launch(preset: str, dtype: torch.dtype, b: int, hq: int, hkv: int, length: int, d: int, sq: int) -> None:
    """One decode call of `preset` over CPU operands quantised by the reference, through the Triton launch path."""
    from quantattn_hf.backends.triton.launch import run_attention

    cfg = QuantConfig.preset(preset)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, sq, d, generator=gen, dtype=dtype)
    k, v = (torch.randn(b, hkv, length, d, generator=gen, dtype=dtype) for _ in range(2))
    call = AttentionCall(
        config=cfg, batch=b, q_heads=hq, kv_heads=hkv, q_len=sq, kv_len=length, head_dim=d, head_dim_v=d,
        dtype=q.dtype, device=q.device, scale=1 / math.sqrt(d), is_causal=False, attn_mask=None,
    )  # fmt: skip
    run_attention(quantize(q, cfg.q), quantize(k, cfg.k), quantize(v, cfg.v), call, 0.0, decode=True)


def quantize_launch(preset: str, dtype: torch.dtype, b: int, h: int, s: int, d: int) -> None:
    """The fused quantiser's launches for the preset's quantised operands of a [B, H, S, D] input."""
    from quantattn_hf.backends.triton.quantize import quantize_fused

    cfg = QuantConfig.preset(preset)
    x = torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for spec in (cfg.q, cfg.k, cfg.v):
        if spec.quantized:
            quantize_fused(x, spec)


COLUMNS = (
    ("regs", 5), ("spill_bytes", 8), ("smem", 6), ("ctas_per_sm", 6), ("async_copies", 5), ("instrs", 6),
    ("loop_instrs", 11), ("loop_bars", 9), ("loop_mma", 8), ("loop_lds", 8), ("loop_sts", 8),
)  # fmt: skip


def report(label: str, compiled: list, out: Path | None) -> None:
    """One line per compiled kernel (COLUMNS), and its TTGIR/PTX/SASS under `out`."""
    for i, (name, kernel) in enumerate(compiled):
        r = resources(kernel)
        print(f"{label:<22} {name:<16} " + " ".join(f"{r[c]:>{w}}" for c, w in COLUMNS))
        if out:
            dump(kernel, f"{label.replace('/', '_')}_{i}{name}", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="decode", choices=("decode", "quantize"))
    parser.add_argument("--presets", nargs="+", default=["kv-int8", "kv-int4"])
    parser.add_argument(
        "--shape", default=None, help="decode: B,HQ,HKV,L,D,SQ (8,32,8,8192,128,1); quantize: B,H,S,D (1,24,4608,128)"
    )
    parser.add_argument("--block-n", type=int, nargs="+", default=[64], help="decode key tiles")
    parser.add_argument("--warps", type=int, default=4, help="decode warps")
    parser.add_argument("--stages", type=int, default=3, help="decode pipeline stages")
    parser.add_argument("--maxnreg", type=int, default=None, help="decode register cap")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    parser.add_argument("--dump", type=Path, default=None, help="write TTGIR, PTX and SASS of each kernel here")
    args = parser.parse_args()
    from quantattn_hf.backends.triton import decode
    from quantattn_hf.backends.triton.fastlaunch import LaunchCache

    LaunchCache.enabled = False
    driver.set_active(CompileOnlyDriver())
    compiled: list = []
    compile_only(compiled)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    default = "8,32,8,8192,128,1" if args.kernel == "decode" else "1,24,4608,128"
    shape = tuple(int(x) for x in (args.shape or default).split(","))
    print(f"sm90 compile report: {args.kernel} of shape {shape}, {args.dtype}")
    print(f"{'launch':<22} {'kernel':<16} " + " ".join(f"{c:>{w}}" for c, w in COLUMNS))
    for preset in args.presets:
        if args.kernel == "quantize":
            compiled.clear()
            quantize_launch(preset, dtype, *shape)
            report(preset, compiled, args.dump)
            continue
        for block_n in args.block_n:
            config = triton.Config({"BLOCK_N": block_n}, num_warps=args.warps, num_stages=args.stages)
            config.maxnreg = args.maxnreg
            decode._decode_split.configs = [config]
            decode._decode_split.cache.clear()
            compiled.clear()
            decode_launch(preset, dtype, *shape)
            report(f"{preset}/N{block_n}/w{args.warps}", compiled, args.dump)


if __name__ == "__main__":
    main()
