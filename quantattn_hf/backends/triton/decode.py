"""Split-KV (flash-decoding) attention for short queries over a held (quantised) KV cache.

One program takes one K/V head of one batch element and one slice of the cache; the query rows
of all query heads sharing that K/V head (GQA) and all query tokens are packed into its tile.
Partial results carry their log-sum-exp and are merged by a second kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import cast, dot_operand, load_codes, load_dequant, load_dequant_groups, tile_groups, to_fp8
from .tuning import decode_configs


@triton.autotune(
    configs=decode_configs(),
    key=["TUNE_N", "R_PAD", "D_PAD", "DV_PAD", "SPLITS", "K_PREC", "K_MODE", "V_PREC", "V_MODE"],
)
@triton.heuristics(
    {
        "K_ALIGNED": lambda a: a["K_T"] % a["BLOCK_N"] == 0,
        "V_ALIGNED": lambda a: a["V_T"] % a["BLOCK_N"] == 0,
        "K_GROUPS": lambda a: tile_groups(a["K_MODE"], a["K_T"], a["BLOCK_N"]),
        "V_GROUPS": lambda a: tile_groups(a["V_MODE"], a["V_T"], a["BLOCK_N"]),
        "K_FOLD": lambda a: (
            a["K_PREC"] in (1, 2, 3) and a["K_MODE"] in (3, 4) and not a["K_HAS_ZERO"] and a["K_T"] % a["BLOCK_N"] == 0
        ),
        "V_FOLD": lambda a: (
            a["V_PREC"] in (1, 2, 3)
            and a["V_MODE"] == 2
            and not a["V_HAS_ZERO"]
            and not a["V_HAS_MEAN"]
            and a["P_ROUND"] != 3
        ),
    }
)
@triton.jit
def _decode_split(
    Q, Qs, Qz, Qm, sq_b, sq_h, sq_s, sq_d, sqs_b, sqs_h, sqs_g, sqs_d, sqm_b, sqm_h, sqm_g, sqm_d, Q_T,
    K, Ks, Kz, Km, sk_b, sk_h, sk_s, sk_d, sks_b, sks_h, sks_g, sks_d, skm_b, skm_h, skm_g, skm_d, K_T,
    V, Vs, Vz, Vm, sv_b, sv_h, sv_s, sv_d, svs_b, svs_h, svs_g, svs_d, svm_b, svm_h, svm_g, svm_d, V_T,
    Mask, smk_b, smk_h, smk_q, smk_k,
    Op, Lp,
    SQ, SK, HQ, HKV, GROUPS, D, DV, sm_scale, SPLITS,
    TUNE_N,
    Q_PREC: tl.constexpr, Q_MODE: tl.constexpr, Q_HAS_ZERO: tl.constexpr, Q_HAS_MEAN: tl.constexpr,
    K_PREC: tl.constexpr, K_MODE: tl.constexpr, K_HAS_ZERO: tl.constexpr, K_HAS_MEAN: tl.constexpr,
    V_PREC: tl.constexpr, V_MODE: tl.constexpr, V_HAS_ZERO: tl.constexpr, V_HAS_MEAN: tl.constexpr,
    P_ROUND: tl.constexpr, QK_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, INTERPRET: tl.constexpr,
    R_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    K_ALIGNED: tl.constexpr, V_ALIGNED: tl.constexpr, K_GROUPS: tl.constexpr, V_GROUPS: tl.constexpr,
    K_FOLD: tl.constexpr, V_FOLD: tl.constexpr, TRANSPOSED_QK: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    rows = tl.arange(0, R_PAD)
    r_valid = rows < GROUPS * SQ
    qi = rows % SQ
    h = hk * GROUPS + rows // SQ
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    d_valid = offs_d < D
    dv_valid = offs_dv < DV
    q = load_dequant(
        Q, Qs, Qz, Qm, (b * sq_b + h * sq_h)[:, None], (b * sqs_b + h * sqs_h)[:, None],
        (b * sqm_b + h * sqm_h)[:, None], qi, 0, offs_d, r_valid, d_valid, sq_s, sq_d, sqs_g, sqs_d,
        sqm_g, sqm_d, Q_T, Q_PREC, Q_MODE, Q_HAS_ZERO, Q_HAS_MEAN, False,
    )  # fmt: skip
    q_f = q
    q = dot_operand(q, QK_DTYPE, INTERPRET)
    q_t = tl.trans(q)
    k_base = b * sk_b + hk * sk_h
    ks_base = b * sks_b + hk * sks_h
    km_base = b * skm_b + hk * skm_h
    v_base = b * sv_b + hk * sv_h
    vs_base = b * svs_b + hk * svs_h
    vm_base = b * svm_b + hk * svm_h
    qk_scale = sm_scale * 1.4426950408889634
    chunk = tl.cdiv(tl.cdiv(SK, SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, SK)
    m_i = tl.full([R_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, DV_PAD], tl.float32)
    mask_row = Mask + b * smk_b + h[:, None] * smk_h + qi.to(tl.int64)[:, None] * smk_q
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        if K_FOLD:
            g = (start_n // K_T).to(tl.int64)
            k_op, q_k, bias = fold_k_group(
                K, Ks, Km, k_base, ks_base + g * sks_g, km_base + g * skm_g, offs_n, offs_d, n_valid, d_valid,
                sk_s, sk_d, sks_d, skm_d, q_f, K_PREC, K_MODE, K_HAS_MEAN, QK_DTYPE, INTERPRET,
            )  # fmt: skip
            if TRANSPOSED_QK:
                s = tl.trans(tl.dot(k_op, tl.trans(q_k)))
            else:
                s = tl.dot(q_k, tl.trans(k_op))
            s = (s + bias[:, None]) * qk_scale
        else:
            if K_GROUPS > 1:
                k = load_dequant_groups(
                    K, Ks, Kz, Km, k_base, ks_base, km_base, offs_n, start_n, offs_d, n_valid, d_valid,
                    sk_s, sk_d, sks_g, sks_d, skm_g, skm_d, hi, K_PREC, K_MODE, K_HAS_ZERO, K_HAS_MEAN, K_GROUPS,
                )  # fmt: skip
            else:
                k = load_dequant(
                    K, Ks, Kz, Km, k_base, ks_base, km_base, offs_n, start_n, offs_d, n_valid, d_valid,
                    sk_s, sk_d, sks_g, sks_d, skm_g, skm_d, K_T, K_PREC, K_MODE, K_HAS_ZERO, K_HAS_MEAN, K_ALIGNED,
                )  # fmt: skip
            k = dot_operand(k, QK_DTYPE, INTERPRET)
            if TRANSPOSED_QK:
                s = tl.trans(tl.dot(k, q_t)) * qk_scale
            else:
                s = tl.dot(q, tl.trans(k)) * qk_scale
        keep = n_valid[None, :]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= qi[:, None] + (SK - SQ))
        if MASK_KIND == 1:
            mk = tl.load(mask_row + offs_n[None, :] * smk_k, mask=r_valid[:, None] & n_valid[None, :], other=0)
            keep = keep & (mk != 0)
        elif MASK_KIND == 2:
            mk = tl.load(mask_row + offs_n[None, :] * smk_k, mask=r_valid[:, None] & n_valid[None, :], other=0.0)
            s = s + mk.to(tl.float32) * 1.4426950408889634
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if V_FOLD:
            v = dot_operand(
                load_codes(V, v_base, offs_n, offs_dv, n_valid, dv_valid, sv_s, sv_d, V_PREC).to(tl.float32),
                PV_DTYPE,
                INTERPRET,
            )
            # P·V' = (P·diag(scale))·codes: V's per-token scales go onto P (over the tile's largest, so that the
            # scaled P keeps P's range in fp16) instead of onto the [BLOCK_N, DV] value tile.
            v_scale = tl.load(Vs + vs_base + offs_n.to(tl.int64) * svs_g, mask=n_valid, other=0.0)
            v_max = tl.max(v_scale, axis=0)
            v_max = tl.where(v_max > 0.0, v_max, 1.0)
            pr = dot_operand(p * (v_scale / v_max)[None, :], PV_DTYPE, INTERPRET)
            acc = acc + tl.dot(pr, v) * v_max
        else:
            if V_GROUPS > 1:
                v = load_dequant_groups(
                    V, Vs, Vz, Vm, v_base, vs_base, vm_base, offs_n, start_n, offs_dv, n_valid, dv_valid,
                    sv_s, sv_d, svs_g, svs_d, svm_g, svm_d, hi, V_PREC, V_MODE, V_HAS_ZERO, V_HAS_MEAN, V_GROUPS,
                )  # fmt: skip
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
        m_i = m_new
    if P_ROUND == 3:
        acc = acc * (1.0 / 448.0)
    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse2 = tl.where(empty, float("-inf"), m_fin + tl.log2(tl.where(empty, 1.0, l_i)))
    row_id = (b * HQ + h) * SQ + qi
    part = row_id * SPLITS + split
    tl.store(Op + part[:, None] * DV_PAD + offs_dv[None, :], out, mask=r_valid[:, None])
    tl.store(Lp + part, lse2, mask=r_valid)


@triton.jit
def fold_k_group(
    K, Ks, Km, k_base, ks_off, km_off, offs_n, offs_d, n_valid, d_valid, sk_s, sk_d, sks_d, skm_d, q,
    PREC: tl.constexpr, MODE: tl.constexpr, HAS_MEAN: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """(K codes, Q times K's scales, Q·mean) of a key tile inside one statistic group, as dot operands.

    Q·K'ᵀ = (Q·diag(scale))·codesᵀ + Q·mean: the [R, D] query tile is scaled once per tile instead of the
    [BLOCK_N, D] key tile being dequantised, and the codes go to the dot with only a conversion (exact in 16 bits).
    """
    codes = load_codes(K, k_base, offs_n, offs_d, n_valid, d_valid, sk_s, sk_d, PREC).to(tl.float32)
    if MODE == 3:
        scale = tl.load(Ks + ks_off + offs_d * sks_d, mask=d_valid, other=0.0)[None, :]
    else:
        scale = tl.load(Ks + ks_off)
    bias = tl.zeros([q.shape[0]], tl.float32)
    if HAS_MEAN:
        mean = tl.load(Km + km_off + offs_d * skm_d, mask=d_valid, other=0.0)
        bias = tl.sum(q * mean[None, :], axis=1)
    return dot_operand(codes, DTYPE, INTERPRET), dot_operand(q * scale, DTYPE, INTERPRET), bias


@triton.jit
def _decode_merge(
    Op, Lp, Out, so_b, so_h, so_s, so_d, Lse, sl_b, sl_h, sl_s,
    SQ, HQ, DV, SPLITS, fill,
    S_PAD: tl.constexpr, DV_PAD: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Combine the splits of one query row by their log-sum-exp (base 2)."""
    row = tl.program_id(0).to(tl.int64)
    b = row // (HQ * SQ)
    h = (row // SQ) % HQ
    i = row % SQ
    offs_s = tl.arange(0, S_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    s_valid = offs_s < SPLITS
    lse = tl.load(Lp + row * SPLITS + offs_s, mask=s_valid, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    total = tl.sum(w, axis=0)
    parts = tl.load(Op + (row * SPLITS + offs_s)[:, None] * DV_PAD + offs_dv[None, :], mask=s_valid[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    out = tl.where(total == 0.0, fill, out)
    lse_out = tl.where(
        total == 0.0, float("-inf"), (m_safe + tl.log2(tl.where(total == 0.0, 1.0, total))) * 0.6931471805599453
    )
    o_ptr = Out + b * so_b + h * so_h + i * so_s + offs_dv * so_d
    tl.store(o_ptr, cast(out, Out.dtype.element_ty, INTERPRET), mask=offs_dv < DV)
    tl.store(Lse + b * sl_b + h * sl_h + i * sl_s, lse_out)
