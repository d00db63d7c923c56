"""Block sizes for the attention kernels: autotuned per shape bucket, config lists for sm90 and sm80."""

from __future__ import annotations

import os

import torch
import triton

from .intmath import cdiv, next_power_of_2


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_arch() -> int:
    """Compute capability as 90, 80, ... of the current CUDA device (0 without one)."""
    if interpreting() or not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def autotuning() -> bool:
    """Autotune on a GPU unless QUANTATTN_TRITON_AUTOTUNE=0 (then the first candidate that fits is used)."""
    return os.environ.get("QUANTATTN_TRITON_AUTOTUNE", "1") != "0"


def attention_configs() -> list[triton.Config]:
    """Prefill candidates: (BLOCK_M, BLOCK_N, warps, stages) for the arch of the current device."""
    if interpreting():
        return [_cfg(32, 32, 4, 1)]
    if device_arch() >= 90:
        return [
            _cfg(128, 64, 4, 3),
            _cfg(128, 64, 8, 3),
            _cfg(128, 128, 8, 3),
            _cfg(128, 128, 8, 2),
            _cfg(64, 64, 4, 3),
        ]
    return [_cfg(128, 64, 4, 3), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 2)]


def _prune_attention(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles taller than the query length bucket; small tiles for head dim 256 (shared memory)."""
    args = {**named_args, **kwargs}
    if args["D_PAD"] >= 256 and not interpreting():
        return [_cfg(64, 64, 4, 2), _cfg(64, 32, 4, 2)][: 2 if autotuning() else 1]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(args["TUNE_M"], 64)]
    kept = kept or configs[-1:]
    return kept if autotuning() else kept[:1]


def prune_attention_configs() -> dict:
    """The `prune_configs_by` argument of the prefill autotuner."""
    return {"early_config_prune": _prune_attention}


def decode_configs() -> list[triton.Config]:
    """Split-KV decode candidates: keys per iteration (32 keeps an int4 tile inside one 32-token group), warps."""
    if interpreting():
        return [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if not autotuning():
        return [triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3)]
    return [
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=5),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
        # Higher occupancy: 128 registers a thread (4 CTAs of 4 warps an SM; no spills at BLOCK_N 32, sm90), 8 warps.
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3, maxnreg=128),
        triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=4, maxnreg=128),
        triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=3),
    ]


def bucket(n: int) -> int:
    """Shape bucket for the autotune key (next power of two, at least 16)."""
    return max(16, next_power_of_2(max(n, 1)))


# Programs per SM the split-KV decode grid aims at (the split count is derived from it).
DECODE_WAVES = 4


def decode_splits(programs: int, kv_len: int, block_n: int = 128) -> int:
    """KV splits so that about DECODE_WAVES programs per SM fill the device, each split at least two tiles long."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count if device_arch() else 4
    want = max(1, (DECODE_WAVES * sms) // max(programs, 1))
    return max(1, min(want, cdiv(kv_len, 2 * block_n), 64))
