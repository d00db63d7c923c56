"""Fused Triton quantiser: block means, scales and INT8 / packed INT4 / FP8 codes in one pass over the tile.

Layouts are exactly those of `quant.quantize` (docs/quantization.md); specs it does not implement
(tensor mode, asymmetric strategy, very large groups with mean subtraction) go to `quant.quantize`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import OperandQuant
from ...quant import (
    STORAGE_DTYPES,
    SYMMETRIC_QMAX,
    TINY,
    QuantizedTensor,
    StaticQuant,
    effective_block,
    group_shape,
    num_blocks,
    quantize,
    static_stat,
)
from .fastlaunch import LaunchCache
from .intmath import cdiv, next_power_of_2
from .tiles import rint, to_fp8
from .tuning import interpreting

MODE_ROW, MODE_CHANNEL, MODE_BLOCK = 2, 3, 4
PREC_INT8, PREC_INT4, PREC_FP8 = 1, 2, 4
STAGE_FULL, STAGE_PARTIAL_AMAX, STAGE_APPLY = 0, 1, 2
TILE_ELEMENTS = 16384
TINY_C = tl.constexpr(TINY)
MAX_GRID_Y = 65535
MODE_CODES = {"row": MODE_ROW, "channel": MODE_CHANNEL, "block": MODE_BLOCK}
PREC_CODES = {"int8": PREC_INT8, "int4": PREC_INT4, "fp8_e4m3": PREC_FP8}


@triton.jit
def _quant_kernel(
    X,
    Data,
    Scale,
    Mean,
    Amax,
    S,
    D,
    H,
    T,
    CPG,
    sx_b,
    sx_h,
    sx_s,
    sx_d,
    so_b,
    so_h,
    so_s,
    so_d,
    ss_bh,
    ss_g,
    ss_d,
    sm_bh,
    sm_g,
    ROWS: tl.constexpr,
    D_PAD: tl.constexpr,
    MODE: tl.constexpr,
    PREC: tl.constexpr,
    SUB_MEAN: tl.constexpr,
    STAGE: tl.constexpr,
    FROM_AMAX: tl.constexpr,
    POISON: tl.constexpr,
    QMAX: tl.constexpr,
    BH_FIRST: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    if BH_FIRST:
        pid = tl.program_id(1)
        bh = tl.program_id(0).to(tl.int64)
    else:
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    if MODE == 2:
        start = pid * ROWS
        end = S
        g = pid
    else:
        g = pid // CPG
        start = g * T + (pid % CPG) * ROWS
        end = tl.minimum(g * T + T, S)
    rows = start + tl.arange(0, ROWS)
    cols = tl.arange(0, D_PAD)
    rmask = rows < end
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    x_ptrs = X + b * sx_b + h * sx_h + rows.to(tl.int64)[:, None] * sx_s + cols[None, :] * sx_d
    x = tl.load(x_ptrs, mask=m2, other=0.0).to(tl.float32)
    stat_base = bh * ss_bh + g.to(tl.int64) * ss_g
    if POISON:  # given scales: a group holding a non-finite input gets a NaN scale, as a measured one would
        hit = tl.where(m2 & ~((x == x) & (tl.abs(x) < float("inf"))), 1, 0)
    if SUB_MEAN:
        count = (end - start).to(tl.float32)
        mean = tl.sum(x, axis=0) / count
        tl.store(Mean + bh * sm_bh + g.to(tl.int64) * sm_g + cols, mean, mask=cmask)
        x = tl.where(m2, x - mean[None, :], 0.0)
    if STAGE == 2 and not FROM_AMAX:  # given scales
        if MODE == 3:
            scale = tl.load(Scale + stat_base + cols * ss_d, mask=cmask, other=1.0)[None, :]
            if POISON:
                scale = tl.where(tl.max(hit, axis=0)[None, :] > 0, float("nan"), scale)
                tl.store(Scale + stat_base + cols[None, :] * ss_d, scale, mask=cmask[None, :])
        else:
            scale = tl.load(Scale + stat_base)
            if POISON:
                scale = tl.where(tl.max(tl.max(hit, axis=1), axis=0) > 0, float("nan"), scale)
                tl.store(Scale + stat_base, scale)
    else:
        if FROM_AMAX:  # the group's amax from the partial pass
            if MODE == 3:
                amax = tl.load(Amax + stat_base + cols[None, :] * ss_d, mask=cmask[None, :], other=0.0)
            else:
                amax = tl.load(Amax + stat_base)
        else:
            mag = tl.where(x == x, tl.abs(x), float("inf"))
            mag = tl.where(m2, mag, 0.0)
            if MODE == 2:
                amax = tl.max(mag, axis=1)[:, None]
            elif MODE == 3:
                amax = tl.max(mag, axis=0)[None, :]
            else:
                amax = tl.max(tl.max(mag, axis=1), axis=0)
        if STAGE == 1:  # the group's amax, as a max over its tiles into Amax (zeros before, shaped as Scale)
            if MODE == 3:
                tl.atomic_max(Amax + stat_base + cols[None, :] * ss_d, amax, mask=cmask[None, :])
            else:
                tl.atomic_max(Amax + stat_base, amax)
        else:
            scale = tl.div_rn(tl.maximum(amax, TINY_C), QMAX)
            scale = tl.where(amax < float("inf"), scale, float("nan"))
            if MODE == 2:
                tl.store(Scale + bh * ss_bh + rows.to(tl.int64)[:, None], scale, mask=rmask[:, None])
            elif MODE == 3:
                tl.store(Scale + stat_base + cols[None, :] * ss_d, scale, mask=cmask[None, :])
            else:
                tl.store(Scale + stat_base, scale)
    if STAGE != 1:
        _store_codes(
            Data, b, h, rows, cols, rmask, m2, x, scale, so_b, so_h, so_s, so_d, D, ROWS, D_PAD, PREC, QMAX, INTERPRET
        )  # fmt: skip


@triton.jit
def _store_codes(Data, b, h, rows, cols, rmask, m2, x, scale, so_b, so_h, so_s, so_d, D, ROWS: tl.constexpr,
                 D_PAD: tl.constexpr, PREC: tl.constexpr, QMAX: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """clamp(rint(x / scale)) (or the fp8 cast) stored in the operand's storage format."""
    v = tl.div_rn(x, scale)
    bad = v != v
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    v = tl.where(bad, 0.0, v)
    out_base = Data + b * so_b + h * so_h + rows.to(tl.int64)[:, None] * so_s
    if PREC == 4:
        tl.store(out_base + cols[None, :] * so_d, to_fp8(v, INTERPRET), mask=m2)
    elif PREC == 1:
        tl.store(out_base + cols[None, :] * so_d, rint(v, INTERPRET).to(tl.int8), mask=m2)
    else:
        codes = rint(v, INTERPRET).to(tl.int32)
        lo, hi = tl.split(tl.reshape(codes, [ROWS, D_PAD // 2, 2]))
        packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
        half = tl.arange(0, D_PAD // 2)
        tl.store(out_base + half[None, :] * so_d, packed, mask=rmask[:, None] & (half < D // 2)[None, :])


def _grid(tiles: int, heads: int) -> tuple[int, int]:
    """(tiles, B*H), or swapped when B*H passes the grid's y limit."""
    return (heads, tiles) if heads > MAX_GRID_Y else (tiles, heads)


QUANT = LaunchCache(_quant_kernel)


def fused_supported(spec: OperandQuant, seq_len: int, head_dim: int) -> bool:
    """Whether the fused kernel implements this spec (else `quant.quantize` serves it)."""
    if spec.strategy != "symmetric" or spec.mode == "tensor" or spec.precision not in PREC_CODES:
        return False
    return not spec.subtract_mean or _fits_one_tile(spec, seq_len, head_dim)


def _fits_one_tile(spec: OperandQuant, seq_len: int, head_dim: int) -> bool:
    """Whether one statistic block of this spec fits one program's tile (else two passes, or no fused path)."""
    t = effective_block(seq_len, spec.block_size)
    return next_power_of_2(t) * max(next_power_of_2(head_dim), 2) <= TILE_ELEMENTS


def _codes_buffer(x: torch.Tensor, spec: OperandQuant) -> torch.Tensor:
    """Storage for the codes of x [B, H, S, D] (INT4 packed two a byte along D)."""
    b, h, s, d = x.shape
    if spec.precision == "fp8_e4m3" and spec.mode == "channel":
        # Token-contiguous storage (a transposed view, padded to 16 tokens): the FP8 P·V dot reads V K-major.
        s_pad = cdiv(s, 16) * 16
        return torch.empty((b, h, d, s_pad), device=x.device, dtype=torch.float8_e4m3fn)[..., :s].transpose(2, 3)
    data_d = d // 2 if spec.precision == "int4" else d
    return torch.empty((b, h, s, data_d), device=x.device, dtype=STORAGE_DTYPES[spec.precision])


def _launch_constants(x: torch.Tensor, spec: OperandQuant, poison: bool) -> dict:
    """The kernel's compile-time arguments shared by every launch for this operand."""
    b, h, _, d = x.shape
    return dict(
        POISON=poison,
        INTERPRET=interpreting(),
        BH_FIRST=b * h > MAX_GRID_Y,
        D_PAD=max(next_power_of_2(d), 2),
        MODE=MODE_CODES[spec.mode],
        PREC=PREC_CODES[spec.precision],
        QMAX=SYMMETRIC_QMAX[spec.precision],
        FROM_AMAX=False,
    )


def _block_pass(
    x: torch.Tensor,
    spec: OperandQuant,
    data: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor | None,
    stage: int,
    poison: bool,
) -> None:
    """One program per statistic block of each B·H: the block mean (with `subtract_mean`), then the codes, with the
    scale measured into `scale` (STAGE_FULL) or read from it (STAGE_APPLY, `poison` NaN-ing non-finite groups)."""
    b, h, s, d = x.shape
    nb, dg = scale.shape[2], scale.shape[3]
    t = effective_block(s, spec.block_size)
    t_pad = next_power_of_2(t)
    # 8 warps from 8192 elements a tile for a scale per block, 16384 for per-channel scales: at the Flux shape on the
    # H100 qk's Q (64x128 blocks) takes 25 us with 8 instead of 37 with 4, its K (block means too) 39 either way,
    # kv-int8's K (per-channel, 64x128) 60 with 8 instead of 41 (scripts/bench_attention.py --profile-quant)
    elements = t_pad * max(next_power_of_2(d), 2)
    warps = 8 if elements >= (8192 if spec.mode == "block" else 16384) else 4
    QUANT(
        _grid(nb, b * h),
        x, data, scale, mean if mean is not None else scale, scale, s, d, h, t, 1, *x.stride(), *data.stride(),
        nb * dg, dg, 1 if spec.mode == "channel" else 0, nb * d, d,
        ROWS=t_pad, SUB_MEAN=spec.subtract_mean, STAGE=stage, num_warps=warps, **_launch_constants(x, spec, poison),
    )  # fmt: skip


def quantize_static_fused(
    x: torch.Tensor, spec: OperandQuant, strategy_version: int, static: StaticQuant
) -> QuantizedTensor:
    """`quant.quantize(x, spec, static=...)` in one pass: each block's mean measured, the calibrated scales applied.

    Served: symmetric channel/block modes whose block fits one tile, with block means measured at run time (the
    calibration schema 3 form); others (a calibrated mean, zero points, row/tensor modes) go to `quant.quantize`.
    """
    b, h, s, d = x.shape
    served = spec.quantized and s > 0 and spec.mode != "row" and static.mean is None
    if not (served and fused_supported(spec, s, d) and _fits_one_tile(spec, s, d)):
        return quantize(x, spec, strategy_version, static)
    scale = static_stat(static.scale, "scale", group_shape(tuple(x.shape), spec), x)
    if scale.data_ptr() == static.scale.data_ptr():  # the kernel writes NaN into poisoned groups: never the caller's
        scale = scale.clone()
    data = _codes_buffer(x, spec)
    nb = scale.shape[2]
    mean = torch.empty((b, h, nb, d), device=x.device, dtype=torch.float32) if spec.subtract_mean else None
    _block_pass(x, spec, data, scale, mean, STAGE_APPLY, poison=True)
    return QuantizedTensor(data, scale, None, mean, spec, (b, h, s, d), x.dtype, strategy_version)


def quantize_fused(x: torch.Tensor, spec: OperandQuant, strategy_version: int = 1) -> QuantizedTensor:
    """`quant.quantize` through one Triton pass per tile (two for groups larger than a tile)."""
    b, h, s, d = x.shape
    if not spec.quantized or s == 0 or not fused_supported(spec, s, d):
        return quantize(x, spec, strategy_version)
    dev = x.device
    d_pad = max(next_power_of_2(d), 2)
    data = _codes_buffer(x, spec)
    common = _launch_constants(x, spec, poison=False)
    x_strides = x.stride()
    o_strides = data.stride()
    if spec.mode == "row":
        rows = max(1, min(64, TILE_ELEMENTS // 4 // d_pad))
        scale = torch.empty((b, h, s, 1), device=dev, dtype=torch.float32)
        grid = _grid(cdiv(s, rows), b * h)
        QUANT(grid,
            x, data, scale, scale, scale, s, d, h, 1, 1, *x_strides, *o_strides, s, 1, 0, 0, 0,
            ROWS=rows, SUB_MEAN=False, STAGE=STAGE_FULL, num_warps=4, **common,
        )  # fmt: skip
        return QuantizedTensor(data, scale, None, None, spec, (b, h, s, d), x.dtype, strategy_version)
    t = effective_block(s, spec.block_size)
    nb = num_blocks(s, spec.block_size)
    dg = d if spec.mode == "channel" else 1
    scale = torch.empty((b, h, nb, dg), device=dev, dtype=torch.float32)
    if _fits_one_tile(spec, s, d):
        mean = torch.empty((b, h, nb, d), device=dev, dtype=torch.float32) if spec.subtract_mean else None
        _block_pass(x, spec, data, scale, mean, STAGE_FULL, poison=False)
        return QuantizedTensor(data, scale, None, mean, spec, (b, h, s, d), x.dtype, strategy_version)
    s_strides = (nb * dg, dg, 1 if spec.mode == "channel" else 0)
    rows = max(1, min(256, TILE_ELEMENTS // 2 // d_pad))
    cpg = cdiv(t, rows)
    amax = torch.zeros_like(scale)  # each group's amax, maxed into by its tiles
    grid = _grid(nb * cpg, b * h)
    args = (s, d, h, t, cpg, *x_strides, *o_strides, *s_strides, 0, 0)
    QUANT(grid,
        x, data, scale, scale, amax, *args,
        ROWS=rows, SUB_MEAN=False, STAGE=STAGE_PARTIAL_AMAX, num_warps=8, **common,
    )  # fmt: skip
    QUANT(grid,
        x, data, scale, scale, amax, *args,
        ROWS=rows, SUB_MEAN=False, STAGE=STAGE_APPLY, num_warps=8, **{**common, "FROM_AMAX": True},
    )  # fmt: skip
    return QuantizedTensor(data, scale, None, None, spec, (b, h, s, d), x.dtype, strategy_version)
