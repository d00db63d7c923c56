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

# An int4 code c read by nibble_phase is x = c / CODE_UNIT + CODE_OFFSET, exact in fp16 and bf16.
CODE_UNIT = tl.constexpr(16.0)
CODE_OFFSET = tl.constexpr(1.5)


def phase_count(a: dict, op: str, dim: int, dim_pad: int) -> int:
    """Nibble phases of an int4 K or V read as words (0: the byte path of load_codes), a host heuristic.

    Taken for symmetric int4 with folded statistics (K: channel/block scales, V: row scales, no zero point), a
    power-of-two head dim, packed bytes contiguous along D and word-aligned, and at least 16 channels a phase.
    """
    phases = a["PHASES"]
    folded = a["K_MODE"] in (3, 4) and a["Q_PREC"] not in (2, 3) if op == "K" else a["V_MODE"] == 2
    if not phases or a[f"{op}_PREC"] != 2 or a[f"{op}_HAS_ZERO"] or not folded or dim != dim_pad:
        return 0
    if op == "V" and a["V_HAS_MEAN"]:
        return 0
    word = phases // 2
    p = op.lower()
    strides = (a[f"s{p}_b"], a[f"s{p}_h"], a[f"s{p}_s"])
    if a[f"s{p}_d"] != 1 or any(st % word for st in strides) or a[op].data_ptr() % word or dim_pad // phases < 16:
        return 0
    return phases


@triton.autotune(
    configs=decode_configs(),
    key=[
        *("TUNE_N", "R_PAD", "D_PAD", "DV_PAD", "SPLITS", "K_PREC", "K_MODE", "V_PREC", "V_MODE"),
        *("PHASES", "CODES_BY_BITS"),
    ],
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
        "K_PHASES": lambda a: phase_count(a, "K", a["D"], a["D_PAD"]) if a["K_T"] % a["BLOCK_N"] == 0 else 0,
        "V_PHASES": lambda a: phase_count(a, "V", a["DV"], a["DV_PAD"]) if a["P_ROUND"] != 3 else 0,
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
    PHASES: tl.constexpr, CODES_BY_BITS: tl.constexpr, K_PHASES: tl.constexpr, V_PHASES: tl.constexpr,
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
    if K_PHASES > 0:
        # Q's channels split by nibble phase (Q_j = Q[:, j::PHASES]), for the word-loaded int4 K codes' phases.
        q_ph = ()
        offs_wk = tl.arange(0, D_PAD // K_PHASES)
        for j in tl.static_range(K_PHASES):
            q_ph = q_ph + (
                load_dequant(
                    Q, Qs, Qz, Qm, (b * sq_b + h * sq_h)[:, None], (b * sqs_b + h * sqs_h)[:, None],
                    (b * sqm_b + h * sqm_h)[:, None], qi, 0, offs_wk * K_PHASES + j, r_valid, offs_wk >= 0,
                    sq_s, sq_d, sqs_g, sqs_d, sqm_g, sqm_d, Q_T, Q_PREC, Q_MODE, Q_HAS_ZERO, Q_HAS_MEAN, False,
                ),
            )  # fmt: skip
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
    # Q times K's folded scales must fit the dot's fp16 (bf16 has float32's range): each row's bound over this
    # split (|q| max times K's largest scale, times CODE_UNIT for the word path) is taken to 2**14 by a power of
    # two that the scores take back
    NORM: tl.constexpr = QK_DTYPE == tl.float16 and (K_FOLD or K_PHASES > 0)
    norm = tl.full([R_PAD], 1.0, tl.float32)
    qk_rows = tl.full([R_PAD], qk_scale, tl.float32)
    if NORM:
        s_max = k_scale_max(Ks, ks_base, lo, hi, K_T, sks_g, sks_d, offs_d, d_valid, K_MODE)
        unit = CODE_UNIT if K_PHASES > 0 else 1.0
        norm, inv_norm = pow2_rows(tl.max(tl.abs(q_f), axis=1) * s_max * unit)
        qk_rows = qk_scale * inv_norm
    m_i = tl.full([R_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([R_PAD], tl.float32)
    acc = tl.zeros([R_PAD, DV_PAD], tl.float32)
    if V_PHASES > 0:
        # One accumulator per nibble phase of V's channels (acc_j = O[:, j::PHASES]), and the row sums of P that
        # carry the codes' offset, removed once after the loop.
        acc_ph = ()
        for _j in tl.static_range(V_PHASES):
            acc_ph = acc_ph + (tl.zeros([R_PAD, DV_PAD // V_PHASES], tl.float32),)
        p_off = tl.zeros([R_PAD], tl.float32)
    mask_row = Mask + b * smk_b + h[:, None] * smk_h + qi.to(tl.int64)[:, None] * smk_q
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        if K_PHASES > 0:
            g = (start_n // K_T).to(tl.int64)
            s, bias = phased_k_scores(
                K, Ks, Km, k_base, ks_base + g * sks_g, km_base + g * skm_g, offs_n, n_valid, sk_s, sks_d, skm_d,
                q_ph, norm, K_MODE, K_HAS_MEAN, QK_DTYPE, INTERPRET, D_PAD, K_PHASES, TRANSPOSED_QK, NORM,
            )  # fmt: skip
            s = fold_scores(s, bias, qk_rows, qk_scale, NORM)
        elif K_FOLD:
            g = (start_n // K_T).to(tl.int64)
            k_op, q_k, bias = fold_k_group(
                K, Ks, Km, k_base, ks_base + g * sks_g, km_base + g * skm_g, offs_n, offs_d, n_valid, d_valid,
                sk_s, sk_d, sks_d, skm_d, q_f, norm, K_PREC, K_MODE, K_HAS_MEAN, QK_DTYPE, INTERPRET, CODES_BY_BITS,
                NORM,
            )  # fmt: skip
            if TRANSPOSED_QK:
                s = tl.trans(tl.dot(k_op, tl.trans(q_k)))
            else:
                s = tl.dot(q_k, tl.trans(k_op))
            s = fold_scores(s, bias, qk_rows, qk_scale, NORM)
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
        if V_PHASES > 0:
            pr, v_max = fold_v_scales(p, Vs, vs_base, offs_n, n_valid, svs_g, PV_DTYPE, INTERPRET)
            words = load_words(V, v_base, offs_n, n_valid, sv_s, DV_PAD // V_PHASES, V_PHASES)
            # codes = CODE_UNIT * (x - CODE_OFFSET) for the exact 16-bit x of nibble_phase: P'·codes is
            # CODE_UNIT * (P'·x less CODE_OFFSET * rowsum(P')), the row sums kept in p_off (rescaled like acc).
            w_unit = v_max * CODE_UNIT
            p_off = p_off * alpha + tl.sum(pr.to(tl.float32), axis=1) * w_unit
            new_acc = ()
            for j in tl.static_range(V_PHASES):
                v_j = nibble_phase(words, j, V_PHASES, PV_DTYPE, INTERPRET)
                new_acc = new_acc + (acc_ph[j] * alpha[:, None] + tl.dot(pr, v_j) * w_unit,)
            acc_ph = new_acc
        elif V_FOLD:
            acc = acc * alpha[:, None]
            v = dot_operand(
                code_values(
                    load_codes(V, v_base, offs_n, offs_dv, n_valid, dv_valid, sv_s, sv_d, V_PREC), V_PREC, CODES_BY_BITS
                ),
                PV_DTYPE,
                INTERPRET,
            )
            pr, v_max = fold_v_scales(p, Vs, vs_base, offs_n, n_valid, svs_g, PV_DTYPE, INTERPRET)
            acc = acc + tl.dot(pr, v) * v_max
        else:
            acc = acc * alpha[:, None]
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
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse2 = tl.where(empty, float("-inf"), m_fin + tl.log2(tl.where(empty, 1.0, l_i)))
    row_id = (b * HQ + h) * SQ + qi
    part = row_id * SPLITS + split
    if V_PHASES > 0:
        offs_wv = tl.arange(0, DV_PAD // V_PHASES)
        for j in tl.static_range(V_PHASES):
            out_j = (acc_ph[j] - (p_off * CODE_OFFSET)[:, None]) * inv_l[:, None]
            tl.store(Op + part[:, None] * DV_PAD + (offs_wv * V_PHASES + j)[None, :], out_j, mask=r_valid[:, None])
    else:
        out = acc * inv_l[:, None]
        tl.store(Op + part[:, None] * DV_PAD + offs_dv[None, :], out, mask=r_valid[:, None])
    tl.store(Lp + part, lse2, mask=r_valid)


@triton.jit
def fold_k_group(
    K, Ks, Km, k_base, ks_off, km_off, offs_n, offs_d, n_valid, d_valid, sk_s, sk_d, sks_d, skm_d, q, norm,
    PREC: tl.constexpr, MODE: tl.constexpr, HAS_MEAN: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    CODES_BY_BITS: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """(K codes, Q times K's scales (times the rows' norm with NORM), Q·mean) of a key tile inside one statistic group.

    Q·K'ᵀ = (Q·diag(scale))·codesᵀ + Q·mean: the [R, D] query tile is scaled once per tile instead of the
    [BLOCK_N, D] key tile being dequantised, and the codes go to the dot with only a conversion (exact in 16 bits).
    The caller takes the rows' power-of-two norm back out of the scores (fold_scores).
    """
    codes = code_values(load_codes(K, k_base, offs_n, offs_d, n_valid, d_valid, sk_s, sk_d, PREC), PREC, CODES_BY_BITS)
    if MODE == 3:
        scale = tl.load(Ks + ks_off + offs_d * sks_d, mask=d_valid, other=0.0)[None, :]
    else:
        scale = tl.load(Ks + ks_off)
    bias = tl.zeros([q.shape[0]], tl.float32)
    if HAS_MEAN:
        mean = tl.load(Km + km_off + offs_d * skm_d, mask=d_valid, other=0.0)
        bias = tl.sum(q * mean[None, :], axis=1)
    q_k = q * scale
    if NORM:
        q_k = q_k * norm[:, None]
    return dot_operand(codes, DTYPE, INTERPRET), dot_operand(q_k, DTYPE, INTERPRET), bias


@triton.jit
def fold_scores(s, bias, qk_rows, qk_scale, NORM: tl.constexpr):
    """Scores in log2 units from a folded dot and its bias Q·mean: with NORM the dot's rows carry a power-of-two
    norm, which qk_rows (qk_scale over the norm) takes back."""
    if NORM:
        y = s * qk_rows[:, None] + (bias * qk_scale)[:, None]
    else:
        y = (s + bias[:, None]) * qk_scale
    return y


@triton.jit
def k_scale_max(Ks, ks_base, lo, hi, K_T, sks_g, sks_d, offs_d, d_valid, MODE: tl.constexpr):
    """The largest of K's scales (channel or block mode) over the statistic groups of keys [lo, hi), 0 if none."""
    GB: tl.constexpr = 16
    top = tl.zeros([offs_d.shape[0]], tl.float32)
    g_hi = tl.cdiv(hi, K_T)
    for g0 in range(lo // K_T, g_hi, GB):
        g = g0 + tl.arange(0, GB)
        if MODE == 3:
            ptr = Ks + ks_base + g.to(tl.int64)[:, None] * sks_g + offs_d[None, :] * sks_d
            top = tl.maximum(top, tl.max(tl.load(ptr, mask=(g < g_hi)[:, None] & d_valid[None, :], other=0.0), axis=0))
        else:
            top = tl.maximum(top, tl.max(tl.load(Ks + ks_base + g.to(tl.int64) * sks_g, mask=g < g_hi, other=0.0)))
    return tl.max(top, axis=0)


@triton.jit
def pow2_rows(bound):
    """(n, 1/n): per row the power of two that takes its bound into [2**13, 2**14), made from the exponent bits.

    Values up to the bound times n fit fp16 with room to spare (relative precision kept down to 2**-27 of the
    bound), and n and 1/n are exact, so the scores are the unnormalised ones to fp32 rounding.
    """
    e = (bound.to(tl.int32, bitcast=True) >> 23) & 0xFF
    k = tl.minimum(tl.maximum(140 - e, -126), 126)
    return ((k + 127) << 23).to(tl.float32, bitcast=True), ((127 - k) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fold_v_scales(p, Vs, vs_base, offs_n, n_valid, svs_g, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """(P·diag(scale) / max scale as a dot operand, max scale) for V's per-token scales of this key tile.

    P·V' = (P·diag(scale))·codes: the scales go onto P (over the tile's largest, so that the scaled P keeps P's
    range in fp16) instead of onto the [BLOCK_N, DV] value tile; the caller multiplies the dot by the max.
    """
    v_scale = tl.load(Vs + vs_base + offs_n.to(tl.int64) * svs_g, mask=n_valid, other=0.0)
    v_max = tl.max(v_scale, axis=0)
    v_max = tl.where(v_max > 0.0, v_max, 1.0)
    return dot_operand(p * (v_scale / v_max)[None, :], DTYPE, INTERPRET), v_max


@triton.jit
def code_values(codes, PREC: tl.constexpr, BY_BITS: tl.constexpr):
    """Codes as float32; int8 ones by their bits under a float's mantissa (2**23 + 128 + c, less 2**23 + 128)
    instead of an int-to-float conversion, a quarter-rate instruction on sm80/sm90."""
    if PREC == 1 and BY_BITS:
        x = ((codes.to(tl.int32) & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        x = codes.to(tl.float32)
    return x


@triton.jit
def load_words(ptr, base, tok, n_valid, s_tok, W: tl.constexpr, PHASES: tl.constexpr):
    """[N, W] words (int16 for 4 phases, int32 for 8) of a packed int4 tile, whole rows; 0 past the valid tokens."""
    if PHASES == 4:
        wptr = ptr.to(tl.pointer_type(tl.int16))
    else:
        wptr = ptr.to(tl.pointer_type(tl.int32))
    wb: tl.constexpr = PHASES // 2
    offs = base // wb + tok.to(tl.int64)[:, None] * (s_tok // wb) + tl.arange(0, W)[None, :]
    return tl.load(wptr + offs, mask=n_valid[:, None], other=0)


@triton.jit
def nibble_phase(words, J: tl.constexpr, PHASES: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """Nibble J of each word (the signed int4 code c of channel PHASES * w + J) as x = 1 + (c ^ 8) / 16, exact in DTYPE.

    The code's bits (sign bit flipped) go under the mantissa of 1.0 in one shift and one bitwise op, so there is no
    int-to-float conversion; 16-bit words give DTYPE directly, 32-bit words go through float32.
    """
    if PHASES == 4:
        low: tl.constexpr = 3 if DTYPE == tl.bfloat16 else 6
        one: tl.constexpr = 0x3F80 if DTYPE == tl.bfloat16 else 0x3C00
    else:
        low: tl.constexpr = 19
        one: tl.constexpr = 0x3F800000
    shift: tl.constexpr = 4 * J - low
    if shift >= 0:
        t = words >> shift
    else:
        t = words << -shift
    bits = (t & (0xF << low)) ^ (one | (8 << low))
    if PHASES == 4:
        x = bits.to(tl.int16).to(DTYPE, bitcast=True)
    else:
        x = bits.to(tl.float32, bitcast=True).to(DTYPE)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def phased_k_scores(
    K, Ks, Km, k_base, ks_off, km_off, offs_n, n_valid, sk_s, sks_d, skm_d, q_ph, norm,
    MODE: tl.constexpr, HAS_MEAN: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr,
    D_PAD: tl.constexpr, PHASES: tl.constexpr, TRANSPOSED: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """(S less its bias, times the rows' norm with NORM; bias Q·mean [R]) of an int4 key tile inside one statistic
    group, the codes read as words.

    S = sum_j (Q_j·diag(scale_j))·codes_jᵀ over the nibble phases j (one dot each, no interleave of the nibbles);
    with codes = CODE_UNIT * (x - CODE_OFFSET), CODE_UNIT goes onto Q's scaled tile (a power of two, exact) and
    the offset, times the rounded tile's row sums, is taken out of S.
    """
    w: tl.constexpr = D_PAD // PHASES
    offs_w = tl.arange(0, w)
    words = load_words(K, k_base, offs_n, n_valid, sk_s, w, PHASES)
    rows: tl.constexpr = q_ph[0].shape[0]
    if TRANSPOSED:
        acc = tl.zeros([offs_n.shape[0], rows], tl.float32)
    else:
        acc = tl.zeros([rows, offs_n.shape[0]], tl.float32)
    corr = tl.zeros([rows, w], tl.float32)
    bias = tl.zeros([rows, w], tl.float32)  # Q·mean, apart from corr where the rows carry a norm
    for j in tl.static_range(PHASES):
        ch = offs_w * PHASES + j
        if MODE == 3:
            scale = tl.load(Ks + ks_off + ch * sks_d)[None, :]
        else:
            scale = tl.load(Ks + ks_off)
        q_j = q_ph[j] * (scale * CODE_UNIT)
        if NORM:
            q_j = q_j * norm[:, None]
        qk = dot_operand(q_j, DTYPE, INTERPRET)
        k_j = nibble_phase(words, j, PHASES, DTYPE, INTERPRET)
        if TRANSPOSED:
            acc = tl.dot(k_j, tl.trans(qk), acc)
        else:
            acc = tl.dot(qk, tl.trans(k_j), acc)
        corr = corr - qk.to(tl.float32) * CODE_OFFSET
        if HAS_MEAN:
            q_mean = q_ph[j] * tl.load(Km + km_off + ch * skm_d)[None, :]
            if NORM:
                bias = bias + q_mean
            else:
                corr = corr + q_mean
    if TRANSPOSED:
        acc = tl.trans(acc)
    if NORM:
        acc = acc + tl.sum(corr, axis=1)[:, None]
        corr = bias
    return acc, tl.sum(corr, axis=1)


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
