"""Split-KV decode grid sweep on a CUDA GPU: bf16 SDPA decode against the Triton kernel over kv-int8 / kv-int4
caches for several programs-per-SM targets (`tuning.DECODE_WAVES`, which sets the split count), one table.

    PYTHONPATH=$PWD python scripts/bench_decode_splits.py [--waves 2 4 8 16]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from quantattn_hf.backends.triton import TritonBackend, decode, tuning
from quantattn_hf.config import QuantConfig
from scripts.bench_attention import DECODE_SHAPES, bench_ms, make_call

TRITON = TritonBackend()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--presets", nargs="+", default=["kv-int8", "kv-int4"])
    args = parser.parse_args()
    print(f"# device: {torch.cuda.get_device_name(0)}")
    hq, hkv, d = 32, 8, 128
    for b, length in DECODE_SHAPES:
        torch.manual_seed(0)
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        base_ms = bench_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        shape = f"B{b} L{length} GQA{hq}/{hkv} D{d}"
        print(f"{shape:24s} sdpa bf16      {base_ms * 1e3:7.1f} us {2 * k.numel() * 2 / base_ms / 1e6:6.0f} GB/s x1.00")
        for name in args.presets:
            cfg = QuantConfig.preset(name)
            qq, kq, vq = TRITON.quantize(q, cfg.q), TRITON.quantize(k, cfg.k), TRITON.quantize(v, cfg.v)
            call = make_call(q, k, v, cfg, False)
            nbytes = kq.nbytes() + vq.nbytes()
            for waves in args.waves:
                tuning.DECODE_WAVES = waves
                splits = tuning.decode_splits(b * hkv, length)
                ms = bench_ms(lambda qq=qq, kq=kq, vq=vq, call=call: TRITON.attention(qq, kq, vq, call))
                best = decode._decode_split.best_config
                print(
                    f"{shape:24s} {name:14s} {ms * 1e3:7.1f} us {nbytes / ms / 1e6:6.0f} GB/s x{base_ms / ms:.2f}"
                    f"  waves {waves} splits {splits} best {best}"
                )
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
