"""Triton backward of quantised attention: FlashAttention-2 style recompute over held operands.

Three kernels: a preprocess (`delta = rowsum(dO * O) - dlse`, and the lse in base 2 with +inf for
fully masked rows), a dK/dV kernel (one program per key tile of one K/V head, iterating over the
query tiles of every query head of its GQA group, so the group sum needs no atomics) and a dQ
kernel (one program per query tile, iterating over key tiles). Q, K and V are dequantised in
registers by the forward backend's tile loaders; quantisation, P's rounding included, is a
straight-through estimator, as in `reference_backward`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import QuantizedTensor
from .base import AttentionCall
from .triton.interpreter_compat import patch_interpreter
from .triton.intmath import cdiv, next_power_of_2
from .triton.launch import _empty, _mask_args
from .triton.operands import KernelOperand, qkv_launch_parts
from .triton.tiles import cast, dot_operand, load_dequant
from .triton.tuning import autotuning, bucket, interpreting

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
MAX_HEAD_DIM = 256
TUNE_KEY = ["TUNE_M", "TUNE_N", "D_PAD", "DV_PAD", "Q_PREC", "K_PREC", "V_PREC", "DTYPE", "IS_CAUSAL"]


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _dkdv_configs() -> list[triton.Config]:
    """dK/dV candidates: key tiles held by the program, narrow query tiles streamed past them.

    Compiled offline for sm90 at D=128 (bf16, kv-int8, causal), 216-255 registers a thread and stack
    spills of: (16, 64, 8 warps) none, (32, 64, 8) 8 bytes, (16, 128, 8) none, (32, 128, 8) 56;
    4-warp and BLOCK_M=64 variants spilled 0.7-3.7 KiB (measured before D became a constexpr).
    """
    if interpreting():
        return [_cfg(16, 32, 4, 1)]
    return [_cfg(16, 64, 8, 3), _cfg(32, 64, 8, 3), _cfg(16, 128, 8, 3), _cfg(32, 128, 8, 3), _cfg(16, 64, 8, 2)]


def _dq_configs() -> list[triton.Config]:
    """dQ candidates: query tiles held by the program, narrow key tiles streamed past them.

    Offline sm90 compile at D=128 (bf16, kv-int8, causal): (128, 32, 8 warps) spills 24 bytes,
    (64, 32, 8) 24, (64, 64, 8) 232; 4-warp variants spilled more.
    """
    if interpreting():
        return [_cfg(32, 16, 4, 1)]
    return [_cfg(128, 32, 8, 3), _cfg(64, 32, 8, 3), _cfg(64, 64, 8, 3), _cfg(128, 32, 8, 2)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Small tiles for head dim 256 (shared memory); only the first candidate without autotuning."""
    d_pad = kwargs.get("D_PAD", named_args.get("D_PAD"))  # a keyword constexpr arrives in kwargs on the GPU
    if d_pad >= 256 and not interpreting():
        configs = [_cfg(32, 64, 4, 2), _cfg(16, 64, 4, 2)]
    return configs if autotuning() else configs[:1]


@triton.jit
def _bwd_preprocess(
    Out, so_b, so_h, so_s, so_d,
    DO, sdo_b, sdo_h, sdo_s, sdo_d,
    Lse, sl_b, sl_h, sl_s,
    DLse, sdl_b, sdl_h, sdl_s,
    Lse2, Delta,
    SQ, HQ, DV,
    HAS_DLSE: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Delta = rowsum(dO * O) - dlse (0 for empty rows) and lse * log2(e) (+inf for empty rows), [B*Hq*Sq]."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, DV_PAD)
    m_valid = offs_m < SQ
    tile = m_valid[:, None] & (offs_d < DV)[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + b * so_b + h * so_h + rows * so_s + offs_d[None, :] * so_d, mask=tile, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + rows * sdo_s + offs_d[None, :] * sdo_d, mask=tile, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if HAS_DLSE:
        delta -= tl.load(DLse + b * sdl_b + h * sdl_h + offs_m * sdl_s, mask=m_valid, other=0.0)
    lse = tl.load(Lse + b * sl_b + h * sl_h + offs_m * sl_s, mask=m_valid, other=float("-inf"))
    live = lse > float("-inf")
    out = pid_bh * SQ + offs_m
    tl.store(Lse2 + out, tl.where(live, lse * 1.4426950408889634, float("inf")), mask=m_valid)
    tl.store(Delta + out, tl.where(live, delta, 0.0), mask=m_valid)


@triton.jit
def _valid(offs, bound, SIZE: tl.constexpr, EVEN: tl.constexpr):
    """`offs < bound`; a compile-time all-true mask where EVEN says every offset is in range (no predicates)."""
    if EVEN:
        return tl.full([SIZE], 1, tl.int1)
    return offs < bound


@triton.jit
def _keep_and_bias(
    Mask, mask_base, offs_r, offs_c, r_valid, c_valid, s_r, s_c, SQ, SK,
    KEY_ROWS: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
):  # fmt: skip
    """Keep mask (bounds, causal, bool mask) and additive bias in base 2 of a score tile.

    Rows are queries and columns keys, or the other way round with KEY_ROWS (the dK/dV kernel's
    transposed tile); `s_r`/`s_c` are the mask strides along rows/columns.
    """
    keep = r_valid[:, None] & c_valid[None, :]
    if IS_CAUSAL:
        if KEY_ROWS:
            keep = keep & (offs_r[:, None] <= offs_c[None, :] + (SK - SQ))
        else:
            keep = keep & (offs_c[None, :] <= offs_r[:, None] + (SK - SQ))
    bias = 0.0
    if MASK_KIND != 0:
        ptr = Mask + mask_base + offs_r.to(tl.int64)[:, None] * s_r + offs_c.to(tl.int64)[None, :] * s_c
        mk = tl.load(ptr, mask=r_valid[:, None] & c_valid[None, :], other=0)
        if MASK_KIND == 1:
            keep = keep & (mk != 0)
        else:
            bias = mk.to(tl.float32) * 1.4426950408889634
    return keep, bias


@triton.autotune(
    configs=_dkdv_configs(),
    key=TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune},
)
@triton.heuristics(
    {
        "Q_ALIGNED": lambda a: a["Q_T"] % a["BLOCK_M"] == 0,
        "K_ALIGNED": lambda a: a["K_T"] % a["BLOCK_N"] == 0,
        "V_ALIGNED": lambda a: a["V_T"] % a["BLOCK_N"] == 0,
        "EVEN_M": lambda a: a["SQ"] % a["BLOCK_M"] == 0,
        "EVEN_N": lambda a: a["SK"] % a["BLOCK_N"] == 0,
    }
)
@triton.jit
def _bwd_dkdv(
    Q, Qs, Qz, Qm, sq_b, sq_h, sq_s, sq_d, sqs_b, sqs_h, sqs_g, sqs_d, sqm_b, sqm_h, sqm_g, sqm_d, Q_T,
    K, Ks, Kz, Km, sk_b, sk_h, sk_s, sk_d, sks_b, sks_h, sks_g, sks_d, skm_b, skm_h, skm_g, skm_d, K_T,
    V, Vs, Vz, Vm, sv_b, sv_h, sv_s, sv_d, svs_b, svs_h, svs_g, svs_d, svm_b, svm_h, svm_g, svm_d, V_T,
    Mask, smk_b, smk_h, smk_q, smk_k,
    DO, sdo_b, sdo_h, sdo_s, sdo_d,
    Lse2, Delta,
    DK, sdk_b, sdk_h, sdk_s, sdk_d,
    DV, sdv_b, sdv_h, sdv_s, sdv_d,
    SQ, SK, HKV, GROUPS, D: tl.constexpr, DVD: tl.constexpr, sm_scale,
    TUNE_M, TUNE_N,
    Q_PREC: tl.constexpr, Q_MODE: tl.constexpr, Q_HAS_ZERO: tl.constexpr, Q_HAS_MEAN: tl.constexpr,
    K_PREC: tl.constexpr, K_MODE: tl.constexpr, K_HAS_ZERO: tl.constexpr, K_HAS_MEAN: tl.constexpr,
    V_PREC: tl.constexpr, V_MODE: tl.constexpr, V_HAS_ZERO: tl.constexpr, V_HAS_MEAN: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    INTERPRET: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_ALIGNED: tl.constexpr, K_ALIGNED: tl.constexpr, V_ALIGNED: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile of one K/V head: sums over the query tiles of all query heads of its group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    n_valid = _valid(offs_n, SK, BLOCK_N, EVEN_N)
    d_valid = _valid(offs_d, D, D_PAD, D == D_PAD)
    dv_valid = _valid(offs_dv, DVD, DV_PAD, DVD == DV_PAD)
    k = load_dequant(
        K, Ks, Kz, Km, b * sk_b + hk * sk_h, b * sks_b + hk * sks_h, b * skm_b + hk * skm_h, offs_n, start_n,
        offs_d, n_valid, d_valid, sk_s, sk_d, sks_g, sks_d, skm_g, skm_d, K_T,
        K_PREC, K_MODE, K_HAS_ZERO, K_HAS_MEAN, K_ALIGNED,
    )  # fmt: skip
    k = dot_operand(k, DTYPE, INTERPRET)
    v = load_dequant(
        V, Vs, Vz, Vm, b * sv_b + hk * sv_h, b * svs_b + hk * svs_h, b * svm_b + hk * svm_h, offs_n, start_n,
        offs_dv, n_valid, dv_valid, sv_s, sv_d, svs_g, svs_d, svm_g, svm_d, V_T,
        V_PREC, V_MODE, V_HAS_ZERO, V_HAS_MEAN, V_ALIGNED,
    )  # fmt: skip
    v = dot_operand(v, DTYPE, INTERPRET)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (tl.maximum(start_n - (SK - SQ), 0) // BLOCK_M) * BLOCK_M
    qk_scale = sm_scale * 1.4426950408889634
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        row0 = (b * HKV * GROUPS + h) * SQ
        mask_base = b * smk_b + h * smk_h
        for start_m in range(lo, SQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = _valid(offs_m, SQ, BLOCK_M, EVEN_M)
            q = load_dequant(
                Q, Qs, Qz, Qm, b * sq_b + h * sq_h, b * sqs_b + h * sqs_h, b * sqm_b + h * sqm_h, offs_m, start_m,
                offs_d, m_valid, d_valid, sq_s, sq_d, sqs_g, sqs_d, sqm_g, sqm_d, Q_T,
                Q_PREC, Q_MODE, Q_HAS_ZERO, Q_HAS_MEAN, Q_ALIGNED,
            )  # fmt: skip
            q = dot_operand(q, DTYPE, INTERPRET)
            do_ptr = DO + b * sdo_b + h * sdo_h + offs_m.to(tl.int64)[:, None] * sdo_s + offs_dv[None, :] * sdo_d
            do = tl.load(do_ptr, mask=m_valid[:, None] & dv_valid[None, :], other=0.0)
            do = dot_operand(do, DTYPE, INTERPRET)
            lse2 = tl.load(Lse2 + row0 + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(Delta + row0 + offs_m, mask=m_valid, other=0.0)
            keep, bias = _keep_and_bias(
                Mask, mask_base, offs_n, offs_m, n_valid, m_valid, smk_k, smk_q, SQ, SK, True, IS_CAUSAL, MASK_KIND
            )
            st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale + bias
            pt = tl.where(keep, tl.exp2(st - lse2[None, :]), 0.0)
            dv += tl.dot(dot_operand(pt, DTYPE, INTERPRET), do, input_precision=DOT_PREC)
            dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dot_operand(dst, DTYPE, INTERPRET), q, input_precision=DOT_PREC)
    dk = dk * sm_scale
    rows = offs_n.to(tl.int64)[:, None]
    dk_ptr = DK + b * sdk_b + hk * sdk_h + rows * sdk_s + offs_d[None, :] * sdk_d
    tl.store(dk_ptr, cast(dk, DK.dtype.element_ty, INTERPRET), mask=n_valid[:, None] & d_valid[None, :])
    dv_ptr = DV + b * sdv_b + hk * sdv_h + rows * sdv_s + offs_dv[None, :] * sdv_d
    tl.store(dv_ptr, cast(dv, DV.dtype.element_ty, INTERPRET), mask=n_valid[:, None] & dv_valid[None, :])


@triton.autotune(configs=_dq_configs(), key=TUNE_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.heuristics(
    {
        "Q_ALIGNED": lambda a: a["Q_T"] % a["BLOCK_M"] == 0,
        "K_ALIGNED": lambda a: a["K_T"] % a["BLOCK_N"] == 0,
        "V_ALIGNED": lambda a: a["V_T"] % a["BLOCK_N"] == 0,
        "EVEN_M": lambda a: a["SQ"] % a["BLOCK_M"] == 0,
        "EVEN_N": lambda a: a["SK"] % a["BLOCK_N"] == 0,
    }
)
@triton.jit
def _bwd_dq(
    Q, Qs, Qz, Qm, sq_b, sq_h, sq_s, sq_d, sqs_b, sqs_h, sqs_g, sqs_d, sqm_b, sqm_h, sqm_g, sqm_d, Q_T,
    K, Ks, Kz, Km, sk_b, sk_h, sk_s, sk_d, sks_b, sks_h, sks_g, sks_d, skm_b, skm_h, skm_g, skm_d, K_T,
    V, Vs, Vz, Vm, sv_b, sv_h, sv_s, sv_d, svs_b, svs_h, svs_g, svs_d, svm_b, svm_h, svm_g, svm_d, V_T,
    Mask, smk_b, smk_h, smk_q, smk_k,
    DO, sdo_b, sdo_h, sdo_s, sdo_d,
    Lse2, Delta,
    DQ, sdq_b, sdq_h, sdq_s, sdq_d,
    SQ, SK, HQ, GROUPS, D: tl.constexpr, DVD: tl.constexpr, sm_scale,
    TUNE_M, TUNE_N,
    Q_PREC: tl.constexpr, Q_MODE: tl.constexpr, Q_HAS_ZERO: tl.constexpr, Q_HAS_MEAN: tl.constexpr,
    K_PREC: tl.constexpr, K_MODE: tl.constexpr, K_HAS_ZERO: tl.constexpr, K_HAS_MEAN: tl.constexpr,
    V_PREC: tl.constexpr, V_MODE: tl.constexpr, V_HAS_ZERO: tl.constexpr, V_HAS_MEAN: tl.constexpr,
    DTYPE: tl.constexpr, DOT_PREC: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    INTERPRET: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    Q_ALIGNED: tl.constexpr, K_ALIGNED: tl.constexpr, V_ALIGNED: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile of one query head, iterating over the key tiles it sees."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUPS
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_valid = _valid(offs_m, SQ, BLOCK_M, EVEN_M)
    d_valid = _valid(offs_d, D, D_PAD, D == D_PAD)
    dv_valid = _valid(offs_dv, DVD, DV_PAD, DVD == DV_PAD)
    q = load_dequant(
        Q, Qs, Qz, Qm, b * sq_b + h * sq_h, b * sqs_b + h * sqs_h, b * sqm_b + h * sqm_h, offs_m, start_m,
        offs_d, m_valid, d_valid, sq_s, sq_d, sqs_g, sqs_d, sqm_g, sqm_d, Q_T,
        Q_PREC, Q_MODE, Q_HAS_ZERO, Q_HAS_MEAN, Q_ALIGNED,
    )  # fmt: skip
    q = dot_operand(q, DTYPE, INTERPRET)
    do_ptr = DO + b * sdo_b + h * sdo_h + offs_m.to(tl.int64)[:, None] * sdo_s + offs_dv[None, :] * sdo_d
    do = dot_operand(tl.load(do_ptr, mask=m_valid[:, None] & dv_valid[None, :], other=0.0), DTYPE, INTERPRET)
    lse2 = tl.load(Lse2 + pid_bh * SQ + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(Delta + pid_bh * SQ + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    hi = SK
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(SK, start_m + BLOCK_M + SK - SQ), 0)
    qk_scale = sm_scale * 1.4426950408889634
    mask_base = b * smk_b + h * smk_h
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = _valid(offs_n, SK, BLOCK_N, EVEN_N)
        k = load_dequant(
            K, Ks, Kz, Km, b * sk_b + hk * sk_h, b * sks_b + hk * sks_h, b * skm_b + hk * skm_h, offs_n, start_n,
            offs_d, n_valid, d_valid, sk_s, sk_d, sks_g, sks_d, skm_g, skm_d, K_T,
            K_PREC, K_MODE, K_HAS_ZERO, K_HAS_MEAN, K_ALIGNED,
        )  # fmt: skip
        k = dot_operand(k, DTYPE, INTERPRET)
        v = load_dequant(
            V, Vs, Vz, Vm, b * sv_b + hk * sv_h, b * svs_b + hk * svs_h, b * svm_b + hk * svm_h, offs_n, start_n,
            offs_dv, n_valid, dv_valid, sv_s, sv_d, svs_g, svs_d, svm_g, svm_d, V_T,
            V_PREC, V_MODE, V_HAS_ZERO, V_HAS_MEAN, V_ALIGNED,
        )  # fmt: skip
        v = dot_operand(v, DTYPE, INTERPRET)
        keep, bias = _keep_and_bias(
            Mask, mask_base, offs_m, offs_n, m_valid, n_valid, smk_q, smk_k, SQ, SK, False, IS_CAUSAL, MASK_KIND
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale + bias
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(dot_operand(ds, DTYPE, INTERPRET), k, input_precision=DOT_PREC)
    dq = dq * sm_scale
    dq_ptr = DQ + b * sdq_b + h * sdq_h + offs_m.to(tl.int64)[:, None] * sdq_s + offs_d[None, :] * sdq_d
    tl.store(dq_ptr, cast(dq, DQ.dtype.element_ty, INTERPRET), mask=m_valid[:, None] & d_valid[None, :])


def unsupported_reason(call: AttentionCall) -> str | None:
    """None when these kernels serve `call`, else why not (the reference backward then runs)."""
    if call.dtype not in TL_DTYPES:
        return f"dtype {call.dtype} (fp16, bf16 and fp32 are served)"
    if max(call.head_dim, call.head_dim_v) > MAX_HEAD_DIM:
        return f"head dim {call.head_dim}/{call.head_dim_v} (at most {MAX_HEAD_DIM})"
    device = torch.device(call.device)
    if device.type != "cuda" and not interpreting():
        return f"tensors on {device.type} (CUDA, or any device under TRITON_INTERPRET=1)"
    return None


def dot_precision(dtype: torch.dtype) -> str | None:
    """float32 dots as torch's matmuls run them: TF32 only where torch allows it; None for 16-bit inputs."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def attention_backward(
    q: QuantizedTensor,
    k: QuantizedTensor,
    v: QuantizedTensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    call: AttentionCall,
    need_dkv: bool = True,
    release_held: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in the call's dtype; dK and dV are empty (0,) tensors without `need_dkv`. `release_held` (the
    held operands may be freed once read, as `cudnn_backward` does) frees nothing here: every kernel reads them."""
    if interpreting():
        patch_interpreter()
    qo, ko, vo = (KernelOperand.from_held(t) for t in (q, k, v))
    device = grad_out.device
    b, hq, hkv, sq, sk = call.batch, call.q_heads, call.kv_heads, call.q_len, call.kv_len
    d, dv = call.head_dim, call.head_dim_v
    dq = _empty((b, hq, sq, d), call.dtype, device)
    dk = _empty((b, hkv, sk, d) if need_dkv else (0,), call.dtype, device)
    dvv = _empty((b, hkv, sk, dv) if need_dkv else (0,), call.dtype, device)
    if sq == 0 or sk == 0:
        return dq.zero_(), dk.zero_(), dvv.zero_()
    d_pad = max(16, next_power_of_2(d))
    dv_pad = max(16, next_power_of_2(dv))
    lse2 = _empty((b, hq, sq), torch.float32, device)
    delta = _empty((b, hq, sq), torch.float32, device)
    dlse = grad_lse if grad_lse is not None else lse
    block = 32 if interpreting() else 64
    _bwd_preprocess[(cdiv(sq, block), b * hq)](
        out, *out.stride(), grad_out, *grad_out.stride(), lse, *lse.stride(), dlse, *dlse.stride(), lse2, delta,
        sq, hq, dv, HAS_DLSE=grad_lse is not None, DV_PAD=dv_pad, BLOCK_M=block, num_warps=4,
    )  # fmt: skip
    mask_kind, mask_args = _mask_args(call, lse2)
    operands, qkv_consts = qkv_launch_parts(qo, ko, vo)
    consts = dict(
        **qkv_consts,
        DTYPE=TL_DTYPES[call.dtype],
        DOT_PREC=dot_precision(call.dtype),
        IS_CAUSAL=call.is_causal,
        MASK_KIND=mask_kind,
        INTERPRET=interpreting(),
        D_PAD=d_pad,
        DV_PAD=dv_pad,
    )
    sizes = (call.groups, d, dv, call.scale, bucket(sq), bucket(sk))
    dq_grid = lambda meta: (cdiv(sq, meta["BLOCK_M"]), b * hq)  # noqa: E731
    _bwd_dq[dq_grid](
        *operands, *mask_args, grad_out, *grad_out.stride(), lse2, delta, dq, *dq.stride(),
        sq, sk, hq, *sizes, **consts,
    )  # fmt: skip
    if need_dkv:
        dkdv_grid = lambda meta: (cdiv(sk, meta["BLOCK_N"]), b * hkv)  # noqa: E731
        _bwd_dkdv[dkdv_grid](
            *operands, *mask_args, grad_out, *grad_out.stride(), lse2, delta, dk, *dk.stride(), dvv, *dvv.stride(),
            sq, sk, hkv, *sizes, **consts,
        )  # fmt: skip
    return dq, dk, dvv
