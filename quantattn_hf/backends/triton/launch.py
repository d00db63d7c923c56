"""Host side of the attention kernels: path choice, output allocation and the launches."""

from __future__ import annotations

import os

import torch
import triton.language as tl

from ...quant import QuantizedTensor
from ..base import AttentionCall
from .attention import _attn_fwd, q_dot_mean
from .decode import _decode_merge, _decode_split
from .fastlaunch import LaunchCache
from .intmath import cdiv, next_power_of_2
from .operands import MODE_BLOCK, KernelOperand, qkv_launch_parts
from .tuning import bucket, decode_splits, interpreting

MAX_GRID_Y = 65535
# Decode computes Sᵀ = K'·Qᵀ so the dequantised K tile is the register (A) operand of the MMA, not staged in
# shared memory; False gives S = Q·K'ᵀ (kept switchable for the benchmark's comparison).
DECODE_TRANSPOSED_QK = True
# Decode reads symmetric int4 K/V codes as words of this many nibbles (4: int16, 8: int32), one dot per nibble
# phase, with no int-to-float conversion; 0 gives the byte loads and nibble interleave of tiles.load_codes.
DECODE_INT4_PHASES = 4
# Decode turns int8 codes into floats by their bits under a float's mantissa (False: int-to-float conversions).
DECODE_CODES_BY_BITS = True
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
ATTN_FWD = LaunchCache(_attn_fwd)
# A decode cache grows by a token a step: its length and the strides over batch and heads (of its codes, scales,
# means and mask) change; the codes' strides are checked for word alignment by the int4 path's heuristic.
DECODE_SPLIT = LaunchCache(
    _decode_split,
    varying=(
        *("SK", "sks_b", "sks_h", "skm_b", "skm_h", "svs_b", "svs_h", "svm_b", "svm_h"),
        *("smk_b", "smk_h", "smk_q"),
    ),
    varying_mod16=("sk_b", "sk_h", "sv_b", "sv_h"),
)
DECODE_MERGE = LaunchCache(_decode_merge)


def poisoning() -> bool:
    """Fill outputs with NaN before the kernels write them (interpreter runs, or QUANTATTN_POISON=1)."""
    return interpreting() or os.environ.get("QUANTATTN_POISON") == "1"


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if poisoning():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def compute_dtypes(call: AttentionCall) -> tuple[torch.dtype, torch.dtype]:
    """(Q·Kᵀ dtype, P·V dtype): the input's 16-bit format (fp32 inputs: Q's spec format, else fp16) and P's."""
    if call.dtype in TL_DTYPES:
        qk = call.dtype
    else:
        qk = call.config.q.float_dtype if call.config.q.float_dtype in TL_DTYPES else torch.float16
    p = call.config.p.float_dtype
    return qk, p if p in TL_DTYPES else qk


def _mask_args(call: AttentionCall, dummy: torch.Tensor) -> tuple[int, tuple]:
    """(MASK_KIND, (mask, strides)): 0 none, 1 bool, 2 additive; size-1 dims broadcast with stride 0."""
    mask = call.attn_mask
    if mask is None:
        return 0, (dummy, 0, 0, 0, 0)
    strides = tuple(0 if n == 1 else s for n, s in zip(mask.shape, mask.stride(), strict=True))
    return (1 if mask.dtype == torch.bool else 2), (mask, *strides)


def run_attention(
    q: QuantizedTensor, k: QuantizedTensor, v: QuantizedTensor, call: AttentionCall, fill: float, decode: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of docs/quantization.md: (out in the query dtype, lse float32)."""
    qo, ko, vo = (KernelOperand.from_held(t) for t in (q, k, v))
    device = q.data.device
    b, hq, sq, sk, dv = call.batch, call.q_heads, call.q_len, call.kv_len, call.head_dim_v
    out = _empty((b, hq, sq, dv), call.dtype, device)
    lse = _empty((b, hq, sq), torch.float32, device)
    if sq == 0:
        return out, lse
    qk_dtype, pv_dtype = compute_dtypes(call)
    mask_kind, mask_args = _mask_args(call, q.data)
    d_pad = max(16, next_power_of_2(call.head_dim))
    dv_pad = max(16, next_power_of_2(dv))
    operands, qkv_consts = qkv_launch_parts(qo, ko, vo)
    consts = dict(
        **qkv_consts,
        P_ROUND=3 if call.config.p.precision == "fp8_e4m3" else 0,
        QK_DTYPE=TL_DTYPES[qk_dtype],
        PV_DTYPE=TL_DTYPES[pv_dtype],
        IS_CAUSAL=call.is_causal,
        MASK_KIND=mask_kind,
        INTERPRET=interpreting(),
        D_PAD=d_pad,
        DV_PAD=dv_pad,
    )
    if decode:
        _run_decode(operands, mask_args, out, lse, call, fill, consts)
        return out, lse
    qk_int8 = qo.int8_rows and ko.int8_rows and not qo.has_mean and (not ko.has_mean or ko.mode == MODE_BLOCK)
    pv_fp8 = vo.fp8_channels and call.config.p.precision == "fp8_e4m3"
    qm = q_dot_mean(qo, ko, call) if qk_int8 and ko.has_mean else out
    qm_strides = qm.stride()[:3] if qm is not out else (0, 0, 0)
    bh_first = b * hq > MAX_GRID_Y

    def grid(meta):
        tiles = cdiv(sq, meta["BLOCK_M"])
        return (b * hq, tiles) if bh_first else (tiles, b * hq)

    ATTN_FWD(grid,
        *operands, qm, *qm_strides, *mask_args, out, *out.stride(), lse, *lse.stride(),
        sq, sk, hq, call.groups, call.head_dim, dv, call.scale, fill, bucket(sq), bucket(sk),
        QK_INT8=qk_int8, PV_FP8=pv_fp8, BH_FIRST=bh_first, **consts,
    )  # fmt: skip
    return out, lse


def _run_decode(operands: tuple, mask_args: tuple, out: torch.Tensor, lse: torch.Tensor, call, fill, consts) -> None:
    """Split-KV pass then merge by log-sum-exp."""
    b, hq, hkv, sq, sk = call.batch, call.q_heads, call.kv_heads, call.q_len, call.kv_len
    splits = decode_splits(b * hkv, sk)
    dv_pad = consts["DV_PAD"]
    rows = b * hq * sq
    part_out = _empty((rows * splits, dv_pad), torch.float32, out.device)
    part_lse = _empty((rows * splits,), torch.float32, out.device)
    r_pad = max(16, next_power_of_2(call.groups * sq))
    DECODE_SPLIT((b * hkv, splits),
        *operands, *mask_args, part_out, part_lse,
        sq, sk, hq, hkv, call.groups, call.head_dim, call.head_dim_v, call.scale, splits, bucket(sk),
        R_PAD=r_pad, TRANSPOSED_QK=DECODE_TRANSPOSED_QK, PHASES=DECODE_INT4_PHASES, CODES_BY_BITS=DECODE_CODES_BY_BITS,
        **consts,
    )  # fmt: skip
    DECODE_MERGE((rows,),
        part_out, part_lse, out, *out.stride(), lse, *lse.stride(), sq, hq, call.head_dim_v, splits, fill,
        S_PAD=max(2, next_power_of_2(splits)), DV_PAD=dv_pad, INTERPRET=interpreting(), num_warps=4,
    )  # fmt: skip
