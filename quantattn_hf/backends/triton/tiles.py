"""Triton device helpers: load a tile of a held operand (codes, scales, zero points, block means).

Precision codes: 0 float (unquantised), 1 int8, 2 int4 signed, 3 int4 unsigned, 4 fp8-e4m3.
Mode codes: 0 none, 1 tensor, 2 row, 3 channel, 4 block (group index = token // T).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def rint(x, INTERPRET: tl.constexpr):
    """Round half to even: libdevice on the GPU; in the interpreter (no libdevice) by adding 1.5 * 2**23."""
    if INTERPRET:
        y = (x + 12582912.0) - 12582912.0
    else:
        y = libdevice.rint(x)
    return y


@triton.jit
def fp8_grid(v):
    """Round |v| <= 448 to the nearest FP8-E4M3 value (ties to even) in float32 (for the interpreter's casts)."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    quantum = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return rint(v / quantum, True) * quantum


@triton.jit
def to_fp8(v, EXACT: tl.constexpr):
    """float32 (|v| <= 448) to fp8-e4m3, nearest even; EXACT rounds in float32 first (the interpreter truncates)."""
    if EXACT:
        v = fp8_grid(v)
    return v.to(tl.float8e4nv)


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 to DTYPE, nearest even; the interpreter truncates to bf16, so it gets the rounding done in fp32 first."""
    if INTERPRET and DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def dot_operand(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast to the dot's input type; the interpreter (whose bf16 dot is wrong) gets the rounded value in fp32."""
    if INTERPRET:
        y = cast(x.to(tl.float32), DTYPE, INTERPRET).to(tl.float32)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def load_codes(ptr, base, tok, cols, rmask, cmask, s_tok, s_col, PREC: tl.constexpr):
    """Raw tile [R, C]: float or int8/fp8 codes as stored; int4 unpacked to int32 codes."""
    mask = rmask[:, None] & cmask[None, :]
    row = base + tok.to(tl.int64)[:, None] * s_tok
    if PREC == 2 or PREC == 3:
        half = tl.arange(0, cols.shape[0] // 2)
        even_mask, _ = tl.split(tl.reshape(cmask, [cols.shape[0] // 2, 2]))
        hmask = rmask[:, None] & even_mask[None, :]
        byte = tl.load(ptr + row + half[None, :] * s_col, mask=hmask, other=0).to(tl.int32)
        codes = tl.reshape(tl.join(byte & 0xF, (byte >> 4) & 0xF), [tok.shape[0], cols.shape[0]])
        if PREC == 2:
            codes = codes - ((codes & 8) << 1)
    elif PREC == 4:
        raw = tl.load(ptr.to(tl.pointer_type(tl.uint8)) + row + cols[None, :] * s_col, mask=mask, other=0)
        codes = raw.to(tl.float8e4nv, bitcast=True)
    else:
        codes = tl.load(ptr + row + cols[None, :] * s_col, mask=mask, other=0)
    return codes


@triton.jit
def load_group_stat(ptr, base, tok, tok0, cols, rmask, cmask, s_g, s_d, T, MODE: tl.constexpr, ALIGNED: tl.constexpr):
    """Per-group statistic (scale, zero point or mean) broadcastable to the [R, C] tile; 0 where masked."""
    if MODE == 1:
        stat = tl.load(ptr + base)
    elif MODE == 2:
        stat = tl.load(ptr + base + tok.to(tl.int64)[:, None] * s_g, mask=rmask[:, None], other=0.0)
    elif ALIGNED:
        g = (tok0 // T).to(tl.int64)
        if MODE == 3:
            stat = tl.load(ptr + base + g * s_g + cols[None, :] * s_d, mask=cmask[None, :], other=0.0)
        else:
            stat = tl.load(ptr + base + g * s_g)
    else:
        g = (tok // T).to(tl.int64)[:, None]
        if MODE == 3:
            stat = tl.load(ptr + base + g * s_g + cols[None, :] * s_d, mask=rmask[:, None] & cmask[None, :], other=0.0)
        else:
            stat = tl.load(ptr + base + g * s_g, mask=rmask[:, None], other=0.0)
    return stat


@triton.jit
def load_mean(ptr, base, tok, tok0, cols, rmask, cmask, s_g, s_d, T, ALIGNED: tl.constexpr):
    """Block means [NB, D] of a channel/block-mode operand, broadcast to the [R, C] tile."""
    return load_group_stat(ptr, base, tok, tok0, cols, rmask, cmask, s_g, s_d, T, 3, ALIGNED)


@triton.jit
def load_dequant(
    ptr,
    s_ptr,
    z_ptr,
    m_ptr,
    base,
    s_base,
    m_base,
    tok,
    tok0,
    cols,
    rmask,
    cmask,
    s_tok,
    s_col,
    ss_g,
    ss_d,
    sm_g,
    sm_d,
    T,
    PREC: tl.constexpr,
    MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """x' of docs/quantization.md for a [R, C] tile, float32 (0 outside the masks)."""
    x = load_codes(ptr, base, tok, cols, rmask, cmask, s_tok, s_col, PREC).to(tl.float32)
    if PREC != 0:
        scale = load_group_stat(s_ptr, s_base, tok, tok0, cols, rmask, cmask, ss_g, ss_d, T, MODE, ALIGNED)
        if HAS_ZERO:
            zero = load_group_stat(z_ptr, s_base, tok, tok0, cols, rmask, cmask, ss_g, ss_d, T, MODE, ALIGNED)
            x = x - zero
        x = x * scale
        if HAS_MEAN:
            x = x + load_mean(m_ptr, m_base, tok, tok0, cols, rmask, cmask, sm_g, sm_d, T, ALIGNED)
        x = tl.where(rmask[:, None] & cmask[None, :], x, 0.0)
    return x


@triton.jit
def row_scale(s_ptr, s_base, tok, tok0, rmask, ss_g, T, MODE: tl.constexpr, ALIGNED: tl.constexpr):
    """Scale per row [R] for tensor/row/block modes (the int8 Q·Kᵀ path)."""
    if MODE == 1:
        scale = tl.load(s_ptr + s_base) + tl.zeros(tok.shape, tl.float32)
    elif MODE == 2:
        scale = tl.load(s_ptr + s_base + tok.to(tl.int64) * ss_g, mask=rmask, other=0.0)
    elif ALIGNED:
        scale = tl.load(s_ptr + s_base + (tok0 // T).to(tl.int64) * ss_g) + tl.zeros(tok.shape, tl.float32)
    else:
        scale = tl.load(s_ptr + s_base + (tok // T).to(tl.int64) * ss_g, mask=rmask, other=0.0)
    return scale


def tile_groups(mode: int, group: int, block_n: int) -> int:
    """Whole statistic groups in a key tile when a channel/block-mode tile spans several (else 0): host heuristic."""
    if mode in (3, 4) and group < block_n and block_n % group == 0:
        return block_n // group
    return 0


@triton.jit
def load_dequant_groups(
    ptr,
    s_ptr,
    z_ptr,
    m_ptr,
    base,
    s_base,
    m_base,
    tok,
    tok0,
    cols,
    rmask,
    cmask,
    s_tok,
    s_col,
    ss_g,
    ss_d,
    sm_g,
    sm_d,
    end,
    PREC: tl.constexpr,
    MODE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """load_dequant for a [R, C] tile of GROUPS whole groups from tok0 (a group edge): statistics loaded once per group.

    The per-token gather of load_dequant's unaligned path reads R x C statistics per tile (8x the int4 codes'
    bytes); here each group's [C] (or scalar) statistics are loaded once and broadcast over its R // GROUPS tokens.
    """
    x = load_codes(ptr, base, tok, cols, rmask, cmask, s_tok, s_col, PREC).to(tl.float32)
    n_tok: tl.constexpr = tok.shape[0]
    n_col: tl.constexpr = cols.shape[0]
    per: tl.constexpr = n_tok // GROUPS
    gi = tl.arange(0, GROUPS)
    g = (gi + tok0 // per).to(tl.int64)[:, None]
    gmask = (gi * per + tok0 < end)[:, None]
    if MODE == 3:
        s_off = s_base + g * ss_g + cols[None, :] * ss_d
        s_mask = gmask & cmask[None, :]
    else:
        s_off = s_base + g * ss_g
        s_mask = gmask
    x3 = tl.reshape(x, [GROUPS, per, n_col])
    if HAS_ZERO:
        x3 = x3 - tl.load(z_ptr + s_off, mask=s_mask, other=0.0)[:, None, :]
    x3 = x3 * tl.load(s_ptr + s_off, mask=s_mask, other=0.0)[:, None, :]
    if HAS_MEAN:
        mean = tl.load(m_ptr + m_base + g * sm_g + cols[None, :] * sm_d, mask=gmask & cmask[None, :], other=0.0)
        x3 = x3 + mean[:, None, :]
    x = tl.reshape(x3, [n_tok, n_col])
    return tl.where(rmask[:, None] & cmask[None, :], x, 0.0)
