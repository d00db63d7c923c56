"""Split-KV decode code paths side by side on a CUDA GPU: bf16 SDPA decode against the Triton kernel over kv-int8 /
kv-int4 caches with the old code reads (int4 bytes + nibble interleave, int8 int-to-float conversions) and the new
ones (`launch.DECODE_INT4_PHASES` nibble phases read as words, `launch.DECODE_CODES_BY_BITS`), one table.

    PYTHONPATH=$PWD python scripts/bench_decode_variants.py [--phases 4 8]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from quantattn_hf.backends.triton import TritonBackend, decode, launch
from quantattn_hf.config import QuantConfig
from scripts.bench_attention import DECODE_SHAPES, bench_ms, make_call

TRITON = TritonBackend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, nargs="+", default=[4], help="new-path nibble phases to time (4, 8)")
    parser.add_argument("--presets", nargs="+", default=["kv-int8", "kv-int4"])
    args = parser.parse_args()
    print(f"# device: {torch.cuda.get_device_name(0)}")
    variants = [("old", 0, False)] + [(f"words{p}", p, True) for p in args.phases]
    hq, hkv, d = 32, 8, 128
    for b, length in DECODE_SHAPES:
        torch.manual_seed(0)
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        base_ms = bench_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        shape = f"B{b} L{length} GQA{hq}/{hkv} D{d}"
        gbs = 2 * k.numel() * 2 / base_ms / 1e6
        print(f"{shape:24s} sdpa bf16        {base_ms * 1e3:7.1f} us {gbs:6.0f} GB/s")
        for name in args.presets:
            cfg = QuantConfig.preset(name)
            qq, kq, vq = TRITON.quantize(q, cfg.q), TRITON.quantize(k, cfg.k), TRITON.quantize(v, cfg.v)
            call = make_call(q, k, v, cfg, False)
            nbytes = kq.nbytes() + vq.nbytes()
            first = None
            for label, phases, by_bits in variants:
                launch.DECODE_INT4_PHASES, launch.DECODE_CODES_BY_BITS = phases, by_bits
                run = lambda qq=qq, kq=kq, vq=vq, call=call: TRITON.attention(qq, kq, vq, call)  # noqa: E731
                out = run()[0].float()
                first = out if first is None else first
                diff = ((out - first).abs().sum() / first.abs().sum()).item()
                ms = bench_ms(run)
                best = decode._decode_split.best_config
                print(
                    f"{shape:24s} {name:8s} {label:7s} {ms * 1e3:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s "
                    f"x{base_ms / ms:.2f} rel-L1 vs old {diff:.1e}  best {best}",
                    flush=True,
                )
        launch.DECODE_INT4_PHASES, launch.DECODE_CODES_BY_BITS = 4, True
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
