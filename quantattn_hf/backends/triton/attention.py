"""Prefill attention over held operands: one Triton kernel, online softmax, specialised per preset.

Paths (compile-time): K/V (and Q) dequantised in registers to fp16/bf16 for the two dots; or
Q·Kᵀ on int8 codes with int32 accumulation (scales applied to the scores, K's block means added as
a precomputed q·mean per key block); and P·V in fp8 (P' = fp8(P*448), V's per-channel scale applied
to the output).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import AttentionCall
from .fastlaunch import LaunchCache
from .intmath import cdiv, next_power_of_2
from .operands import KernelOperand
from .tiles import cast, dot_operand, load_codes, load_dequant, row_scale, to_fp8
from .tuning import attention_configs, prune_attention_configs


@triton.autotune(
    configs=attention_configs(), key=["TUNE_M", "TUNE_N", "D_PAD", "DV_PAD"], prune_configs_by=prune_attention_configs()
)
@triton.heuristics(
    {
        "K_ALIGNED": lambda a: a["K_T"] % a["BLOCK_N"] == 0,
        "V_ALIGNED": lambda a: a["V_T"] % a["BLOCK_N"] == 0,
        "QM_ALIGNED": lambda a: a["K_T"] % a["BLOCK_N"] == 0,
    }
)
@triton.jit
def _attn_fwd(
    Q, Qs, Qz, Qm, sq_b, sq_h, sq_s, sq_d, sqs_b, sqs_h, sqs_g, sqs_d, sqm_b, sqm_h, sqm_g, sqm_d, Q_T,
    K, Ks, Kz, Km, sk_b, sk_h, sk_s, sk_d, sks_b, sks_h, sks_g, sks_d, skm_b, skm_h, skm_g, skm_d, K_T,
    V, Vs, Vz, Vm, sv_b, sv_h, sv_s, sv_d, svs_b, svs_h, svs_g, svs_d, svm_b, svm_h, svm_g, svm_d, V_T,
    QM, sqm2_b, sqm2_h, sqm2_g,
    Mask, smk_b, smk_h, smk_q, smk_k,
    Out, so_b, so_h, so_s, so_d,
    Lse, sl_b, sl_h, sl_s,
    SQ, SK, HQ, GROUPS, D, DV, sm_scale, fill,
    TUNE_M, TUNE_N,
    Q_PREC: tl.constexpr, Q_MODE: tl.constexpr, Q_HAS_ZERO: tl.constexpr, Q_HAS_MEAN: tl.constexpr,
    K_PREC: tl.constexpr, K_MODE: tl.constexpr, K_HAS_ZERO: tl.constexpr, K_HAS_MEAN: tl.constexpr,
    V_PREC: tl.constexpr, V_MODE: tl.constexpr, V_HAS_ZERO: tl.constexpr, V_HAS_MEAN: tl.constexpr,
    QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, P_ROUND: tl.constexpr,
    QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, INTERPRET: tl.constexpr,
    D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_ALIGNED: tl.constexpr, V_ALIGNED: tl.constexpr, QM_ALIGNED: tl.constexpr, BH_FIRST: tl.constexpr,
):  # fmt: skip
    if BH_FIRST:
        pid_m = tl.program_id(1)
        pid_bh = tl.program_id(0).to(tl.int64)
    else:
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    m_valid = offs_m < SQ
    d_valid = offs_d < D
    dv_valid = offs_dv < DV
    k_base = b * sk_b + hk * sk_h
    ks_base = b * sks_b + hk * sks_h
    km_base = b * skm_b + hk * skm_h
    v_base = b * sv_b + hk * sv_h
    vs_base = b * svs_b + hk * svs_h
    vm_base = b * svm_b + hk * svm_h
    qk_scale = sm_scale * 1.4426950408889634
    if QK_INT8:
        q = load_codes(Q, b * sq_b + h * sq_h, offs_m, offs_d, m_valid, d_valid, sq_s, sq_d, Q_PREC)
        q_row = row_scale(Qs, b * sqs_b + h * sqs_h, offs_m, 0, m_valid, sqs_g, Q_T, Q_MODE, False) * qk_scale
    else:
        q = load_dequant(
            Q, Qs, Qz, Qm, b * sq_b + h * sq_h, b * sqs_b + h * sqs_h, b * sqm_b + h * sqm_h, offs_m, 0,
            offs_d, m_valid, d_valid, sq_s, sq_d, sqs_g, sqs_d, sqm_g, sqm_d, Q_T,
            Q_PREC, Q_MODE, Q_HAS_ZERO, Q_HAS_MEAN, False,
        )  # fmt: skip
        q = dot_operand(q, QK_DTYPE, INTERPRET)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    hi = SK
    full = (SK // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.maximum(tl.minimum(SK, (pid_m + 1) * BLOCK_M + SK - SQ), 0)
        full = tl.minimum(full, tl.maximum(pid_m * BLOCK_M + SK - SQ + 1, 0) // BLOCK_N * BLOCK_N)
    if MASK_KIND != 0:
        full = 0
    mask_row = Mask + b * smk_b + h * smk_h + offs_m.to(tl.int64)[:, None] * smk_q
    if QK_INT8:
        qm_base = QM + b * sqm2_b + h * sqm2_h
    else:
        qm_base = QM
        q_row = m_i
    for start_n in range(0, full, BLOCK_N):
        m_i, l_i, acc = _attn_tile(
            q, q_row, m_i, l_i, acc, start_n, offs_m, offs_d, offs_dv, m_valid, d_valid, dv_valid, qk_scale,
            K, Ks, Kz, Km, k_base, ks_base, km_base, sk_s, sk_d, sks_g, sks_d, skm_g, skm_d, K_T,
            V, Vs, Vz, Vm, v_base, vs_base, vm_base, sv_s, sv_d, svs_g, svs_d, svm_g, svm_d, V_T,
            qm_base, sqm2_g, mask_row, smk_k, SQ, SK,
            K_PREC, K_MODE, K_HAS_ZERO, K_HAS_MEAN, V_PREC, V_MODE, V_HAS_ZERO, V_HAS_MEAN,
            QK_INT8, PV_FP8, P_ROUND, QK_DTYPE, PV_DTYPE, False, MASK_KIND, INTERPRET, BLOCK_N,
            K_ALIGNED, V_ALIGNED, QM_ALIGNED, False,
        )  # fmt: skip
    for start_n in range(full, hi, BLOCK_N):
        m_i, l_i, acc = _attn_tile(
            q, q_row, m_i, l_i, acc, start_n, offs_m, offs_d, offs_dv, m_valid, d_valid, dv_valid, qk_scale,
            K, Ks, Kz, Km, k_base, ks_base, km_base, sk_s, sk_d, sks_g, sks_d, skm_g, skm_d, K_T,
            V, Vs, Vz, Vm, v_base, vs_base, vm_base, sv_s, sv_d, svs_g, svs_d, svm_g, svm_d, V_T,
            qm_base, sqm2_g, mask_row, smk_k, SQ, SK,
            K_PREC, K_MODE, K_HAS_ZERO, K_HAS_MEAN, V_PREC, V_MODE, V_HAS_ZERO, V_HAS_MEAN,
            QK_INT8, PV_FP8, P_ROUND, QK_DTYPE, PV_DTYPE, IS_CAUSAL, MASK_KIND, INTERPRET, BLOCK_N,
            K_ALIGNED, V_ALIGNED, QM_ALIGNED, True,
        )  # fmt: skip
    if PV_FP8:
        if V_MODE == 1:
            v_col = tl.load(Vs + vs_base)
        else:
            v_col = tl.load(Vs + vs_base + offs_dv * svs_d, mask=dv_valid, other=0.0)[None, :]
        acc = acc * (v_col * (1.0 / 448.0))
    elif P_ROUND == 3:
        acc = acc * (1.0 / 448.0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    out = tl.where(empty[:, None], fill, out)
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(empty, float("-inf"), (m_fin + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptr = Out + b * so_b + h * so_h + offs_m.to(tl.int64)[:, None] * so_s + offs_dv[None, :] * so_d
    tl.store(o_ptr, cast(out, Out.dtype.element_ty, INTERPRET), mask=m_valid[:, None] & dv_valid[None, :])
    tl.store(Lse + b * sl_b + h * sl_h + offs_m * sl_s, lse, mask=m_valid)


@triton.jit
def _attn_tile(
    q, q_row, m_i, l_i, acc, start_n, offs_m, offs_d, offs_dv, m_valid, d_valid, dv_valid, qk_scale,
    K, Ks, Kz, Km, k_base, ks_base, km_base, sk_s, sk_d, sks_g, sks_d, skm_g, skm_d, K_T,
    V, Vs, Vz, Vm, v_base, vs_base, vm_base, sv_s, sv_d, svs_g, svs_d, svm_g, svm_d, V_T,
    qm_base, sqm2_g, mask_row, smk_k, SQ, SK,
    K_PREC: tl.constexpr, K_MODE: tl.constexpr, K_HAS_ZERO: tl.constexpr, K_HAS_MEAN: tl.constexpr,
    V_PREC: tl.constexpr, V_MODE: tl.constexpr, V_HAS_ZERO: tl.constexpr, V_HAS_MEAN: tl.constexpr,
    QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, P_ROUND: tl.constexpr,
    QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_N: tl.constexpr,
    K_ALIGNED: tl.constexpr, V_ALIGNED: tl.constexpr, QM_ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax; MASKED tiles handle the sequence end, causal diagonal and masks."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        n_valid = offs_n < SK
    else:
        n_valid = tl.full([BLOCK_N], 1, tl.int1)
    if QK_INT8:
        k = load_codes(K, k_base, offs_n, offs_d, n_valid, d_valid, sk_s, sk_d, K_PREC)
        s_int = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        k_col = row_scale(Ks, ks_base, offs_n, start_n, n_valid, sks_g, K_T, K_MODE, K_ALIGNED)
        s = s_int.to(tl.float32) * q_row[:, None] * k_col[None, :]
        if K_HAS_MEAN:
            if QM_ALIGNED:
                qm = tl.load(qm_base + (start_n // K_T) * sqm2_g + offs_m, mask=m_valid, other=0.0)[:, None]
            else:
                qm_ptr = qm_base + (offs_n // K_T).to(tl.int64)[None, :] * sqm2_g + offs_m[:, None]
                qm = tl.load(qm_ptr, mask=m_valid[:, None] & n_valid[None, :], other=0.0)
            s = s + qm * qk_scale
    else:
        k = load_dequant(
            K, Ks, Kz, Km, k_base, ks_base, km_base, offs_n, start_n, offs_d, n_valid, d_valid,
            sk_s, sk_d, sks_g, sks_d, skm_g, skm_d, K_T, K_PREC, K_MODE, K_HAS_ZERO, K_HAS_MEAN, K_ALIGNED,
        )  # fmt: skip
        k = dot_operand(k, QK_DTYPE, INTERPRET)
        s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        keep = n_valid[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None] + (SK - SQ))
        if MASK_KIND == 1:
            mk = tl.load(mask_row + offs_n[None, :] * smk_k, mask=m_valid[:, None] & n_valid[None, :], other=0)
            keep = keep & (mk != 0)
        elif MASK_KIND == 2:
            mk = tl.load(mask_row + offs_n[None, :] * smk_k, mask=m_valid[:, None] & n_valid[None, :], other=0.0)
            s = s + mk.to(tl.float32) * 1.4426950408889634
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if PV_FP8:
        v = load_codes(V, v_base, offs_n, offs_dv, n_valid, dv_valid, sv_s, sv_d, V_PREC)
        p8 = dot_operand(to_fp8(p * 448.0, INTERPRET), tl.float8e4nv, INTERPRET)
        if INTERPRET:
            acc = tl.dot(p8, dot_operand(v, tl.float8e4nv, INTERPRET), acc)
        else:
            acc = tl.dot(p8, v, acc, max_num_imprecise_acc=BLOCK_N)
    else:
        v = load_dequant(
            V, Vs, Vz, Vm, v_base, vs_base, vm_base, offs_n, start_n, offs_dv, n_valid, dv_valid,
            sv_s, sv_d, svs_g, svs_d, svm_g, svm_d, V_T, V_PREC, V_MODE, V_HAS_ZERO, V_HAS_MEAN, V_ALIGNED,
        )  # fmt: skip
        v = dot_operand(v, PV_DTYPE, INTERPRET)
        if P_ROUND == 3:
            pr = dot_operand(to_fp8(p * 448.0, INTERPRET), PV_DTYPE, INTERPRET)
        else:
            pr = dot_operand(p, PV_DTYPE, INTERPRET)
        acc = tl.dot(pr, v, acc)
    return m_new, l_i, acc


@triton.jit
def _q_dot_mean(
    Q, Qs, sq_b, sq_h, sq_s, sq_d, sqs_b, sqs_h, sqs_g, Q_T,
    Km, skm_b, skm_h, skm_g, skm_d,
    QM, sqm2_b, sqm2_h, sqm2_g,
    SQ, NBK, HQ, GROUPS, D,
    Q_MODE: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):  # fmt: skip
    """QM[b, h, g, m] = q'_m · mean_g: the K block-mean term of the int8 Q·Kᵀ path."""
    pid_m = tl.program_id(2)
    pid_g = tl.program_id(1)
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D_PAD)
    m_valid = offs_m < SQ
    g_valid = offs_g < NBK
    d_valid = offs_d < D
    q = load_codes(Q, b * sq_b + h * sq_h, offs_m, offs_d, m_valid, d_valid, sq_s, sq_d, 1).to(tl.float32)
    qs = row_scale(Qs, b * sqs_b + h * sqs_h, offs_m, 0, m_valid, sqs_g, Q_T, Q_MODE, False)
    mean = load_codes(Km, b * skm_b + hk * skm_h, offs_g, offs_d, g_valid, d_valid, skm_g, skm_d, 0)
    qm = tl.dot(q, tl.trans(mean), input_precision="tf32x3") * qs[:, None]
    ptr = QM + b * sqm2_b + h * sqm2_h + offs_g.to(tl.int64)[None, :] * sqm2_g + offs_m[:, None]
    tl.store(ptr, qm, mask=m_valid[:, None] & g_valid[None, :])


Q_DOT_MEAN = LaunchCache(_q_dot_mean)


def q_dot_mean(q: KernelOperand, k: KernelOperand, call: AttentionCall) -> torch.Tensor:
    """[B, Hq, NBk, Sq] float32: each query's dot with each K block mean (dequantised Q)."""
    nbk = k.mean.shape[2]
    qm = torch.empty((call.batch, call.q_heads, nbk, call.q_len), device=q.data.device, dtype=torch.float32)
    block_m, block_g = 64, 32
    d_pad = max(16, next_power_of_2(call.head_dim))
    grid = (call.batch * call.q_heads, cdiv(nbk, block_g), cdiv(call.q_len, block_m))
    Q_DOT_MEAN(grid,
        q.data, q.scale, *q.data_strides, *q.scale_strides[:3], q.group,
        k.mean, *k.mean_strides,
        qm, *qm.stride()[:3],
        call.q_len, nbk, call.q_heads, call.groups, call.head_dim,
        Q_MODE=q.mode, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_G=block_g, num_warps=4,
    )  # fmt: skip
    return qm
