"""Dequantise held operands into 16-bit tensors in one pass: x' of docs/quantization.md, then one rounding.

The backward on CUDA hands cuDNN's attention backward K/V (and Q for the qk presets) as dense tensors; this
kernel writes them from the held codes with the same tile loader the attention kernels use
(`tiles.load_dequant`), one head range at a time so the dense copy never needs to exist for every head at once,
and K and V in one launch (host time per launch is a large part of a chunked backward's).
Compiled without FMA contraction, so `code * scale + mean` rounds as `QuantizedTensor.dequantize` does: the
result is that function's, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ...quant import QuantizedTensor
from .fastlaunch import LaunchCache
from .interpreter_compat import patch_interpreter
from .intmath import cdiv, next_power_of_2
from .launch import _empty
from .operands import MODE_BLOCK, MODE_CHANNEL, KernelOperand
from .tiles import cast, load_dequant
from .tuning import interpreting

BLOCK_S = 64
TL_OUT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _dequant_tile(
    X, Xs, Xz, Xm, sx_b, sx_h, sx_s, sx_d, sxs_b, sxs_h, sxs_g, sxs_d, sxm_b, sxm_h, sxm_g, sxm_d, X_T,
    OUT, so_b, so_h, so_s, so_d, pid, S, HEADS, H0, D, TILES,
    PREC: tl.constexpr, MODE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_MEAN: tl.constexpr,
    ALIGNED: tl.constexpr, INTERPRET: tl.constexpr, D_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """OUT[b, h] = x'[b, H0 + h] for program `pid`'s BLOCK-token tile of one (batch, head) pair."""
    pid_bh = pid // TILES
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    hx = H0 + h
    tok0 = (pid % TILES) * BLOCK
    tok = tok0 + tl.arange(0, BLOCK)
    cols = tl.arange(0, D_PAD)
    rmask = tok < S
    cmask = cols < D
    x = load_dequant(
        X, Xs, Xz, Xm, b * sx_b + hx * sx_h, b * sxs_b + hx * sxs_h, b * sxm_b + hx * sxm_h, tok, tok0, cols,
        rmask, cmask, sx_s, sx_d, sxs_g, sxs_d, sxm_g, sxm_d, X_T, PREC, MODE, HAS_ZERO, HAS_MEAN, ALIGNED,
    )  # fmt: skip
    ptr = OUT + b * so_b + h * so_h + tok.to(tl.int64)[:, None] * so_s + cols[None, :] * so_d
    tl.store(ptr, cast(x, OUT.dtype.element_ty, INTERPRET), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _dequant_heads(
    X, Xs, Xz, Xm, sx_b, sx_h, sx_s, sx_d, sxs_b, sxs_h, sxs_g, sxs_d, sxm_b, sxm_h, sxm_g, sxm_d, X_T,
    OX, sox_b, sox_h, sox_s, sox_d,
    Y, Ys, Yz, Ym, sy_b, sy_h, sy_s, sy_d, sys_b, sys_h, sys_g, sys_d, sym_b, sym_h, sym_g, sym_d, Y_T,
    OY, soy_b, soy_h, soy_s, soy_d,
    S, HEADS, H0, DX, DY, TILES, X_PROGRAMS,
    X_PREC: tl.constexpr, X_MODE: tl.constexpr, X_HAS_ZERO: tl.constexpr, X_HAS_MEAN: tl.constexpr,
    Y_PREC: tl.constexpr, Y_MODE: tl.constexpr, Y_HAS_ZERO: tl.constexpr, Y_HAS_MEAN: tl.constexpr,
    X_ALIGNED: tl.constexpr, Y_ALIGNED: tl.constexpr, INTERPRET: tl.constexpr,
    DX_PAD: tl.constexpr, DY_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Programs below X_PROGRAMS dequantise tiles of X into OX, the rest tiles of Y into OY."""
    pid = tl.program_id(0).to(tl.int64)
    if pid < X_PROGRAMS:
        _dequant_tile(
            X, Xs, Xz, Xm, sx_b, sx_h, sx_s, sx_d, sxs_b, sxs_h, sxs_g, sxs_d, sxm_b, sxm_h, sxm_g, sxm_d, X_T,
            OX, sox_b, sox_h, sox_s, sox_d, pid, S, HEADS, H0, DX, TILES,
            X_PREC, X_MODE, X_HAS_ZERO, X_HAS_MEAN, X_ALIGNED, INTERPRET, DX_PAD, BLOCK,
        )  # fmt: skip
    else:
        _dequant_tile(
            Y, Ys, Yz, Ym, sy_b, sy_h, sy_s, sy_d, sys_b, sys_h, sys_g, sys_d, sym_b, sym_h, sym_g, sym_d, Y_T,
            OY, soy_b, soy_h, soy_s, soy_d, pid - X_PROGRAMS, S, HEADS, H0, DY, TILES,
            Y_PREC, Y_MODE, Y_HAS_ZERO, Y_HAS_MEAN, Y_ALIGNED, INTERPRET, DY_PAD, BLOCK,
        )  # fmt: skip


DEQUANT = LaunchCache(_dequant_heads)


class HeadDequantizer:
    """x' of head ranges of one or two held operands with the same batch, head and token counts (K and V),
    the quantised ones in one launch; kernel arguments are prepared once, and a call costs a launch.

    `HeadDequantizer(held, dtype)(heads)` gives, for a step-1 slice of heads, one [B, len(heads), S, D]
    contiguous tensor in `dtype` per operand; an unquantised operand comes back as a view of its data (cast
    only if its dtype differs).
    """

    def __init__(self, held: Sequence[QuantizedTensor], dtype: torch.dtype) -> None:
        if dtype not in TL_OUT:
            raise TypeError(f"HeadDequantizer: output dtype {dtype} (fp16, bf16 or fp32)")
        if not 1 <= len(held) <= 2 or len({t.shape[:3] for t in held}) != 1:
            raise ValueError(f"HeadDequantizer: one or two operands of one [B, H, S], got {[t.shape for t in held]}")
        self.held, self.dtype = list(held), dtype
        b, self.heads, s, _ = held[0].shape
        work = [t for t in held if t.spec.quantized]
        self.n_quantized = len(work) if b * s else 0  # operands the one launch dequantises
        if not self.n_quantized:
            return
        x, y = work[0], work[-1]
        ops = [KernelOperand.from_held(t) for t in (x, y)]
        # tiles no longer than a statistic group that is shorter than BLOCK_S (kv-int4's 32-token K blocks): a tile
        # inside one group loads its scales and means once, not once per element
        grouped = (MODE_CHANNEL, MODE_BLOCK)
        short = [op.group for op in ops if op.mode in grouped and op.group < BLOCK_S and op.group & (op.group - 1) == 0]
        block = min([BLOCK_S, *short])
        self.tiles = cdiv(s, block)
        self.x_args, self.y_args = ops[0].args(), ops[1].args()
        self.sizes = (s, x.shape[3], y.shape[3])
        self.consts = dict(
            **ops[0].constexprs("X"), **ops[1].constexprs("Y"), INTERPRET=interpreting(),
            X_ALIGNED=ops[0].group % block == 0, Y_ALIGNED=ops[1].group % block == 0,
            DX_PAD=max(16, next_power_of_2(x.shape[3])), DY_PAD=max(16, next_power_of_2(y.shape[3])),
            BLOCK=block, enable_fp_fusion=False,
        )  # fmt: skip

    def __call__(self, heads: slice) -> list[torch.Tensor]:
        start, stop, step = heads.indices(self.heads)
        if step != 1:
            raise ValueError(f"HeadDequantizer: heads must be a step-1 slice, got {heads}")
        b, _, s, _ = self.held[0].shape
        outs = [
            _empty((b, stop - start, s, t.shape[3]), self.dtype, t.data.device)
            if t.spec.quantized
            else t.data[:, start:stop].to(self.dtype)
            for t in self.held
        ]
        if not self.n_quantized or stop == start:
            return outs
        if interpreting():
            patch_interpreter()
        quantized = [out for t, out in zip(self.held, outs, strict=True) if t.spec.quantized]
        ox, oy = quantized[0], quantized[-1]
        programs = b * (stop - start) * self.tiles
        s, dx, dy = self.sizes
        DEQUANT(
            (programs * self.n_quantized,), *self.x_args, ox, *ox.stride(), *self.y_args, oy, *oy.stride(),
            s, stop - start, start, dx, dy, self.tiles, programs, **self.consts,
        )  # fmt: skip
        return outs
