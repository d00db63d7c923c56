// quantattn-hf Metal kernels: attention forward over INT8/INT4 K and V (docs/quantization.md).
//
// One threadgroup computes BQ = 8 * NSG query rows of one (batch, query head); SIMD-group g owns rows
// 8g..8g+7. Q is converted to float in threadgroup memory and loaded once into D/8 simdgroup matrices
// per SIMD-group. Keys are walked in tiles of BK: the threadgroup dequantises the K and V tile (codes,
// scales, zero points and block means) into threadgroup memory, each SIMD-group multiplies its Q rows by
// the transposed K tile (8x8 simdgroup multiply-accumulate, float), writes the scores to threadgroup
// memory, applies scale, causal rule and masks and the online softmax there (4 lanes per row, reduced
// with simd_shuffle_xor), rounds P to its held format, rescales its output accumulators by
// diag(exp(m_old - m_new)) and adds P.V (again 8x8 multiply-accumulate). Block means of K are part of
// the dequantised K; block means of V are part of the dequantised V, which is exactly P'V'.
//
// Threadgroup memory: stage (max(BQ * D, 2 * BK * D) floats: Q, then the K and V tiles), scores
// (BQ * BK), diag (NSG * 64), row max and row sum (BQ each); every configuration below stays within
// 32 KiB, which the harness checks.

// head dim, SIMD-groups per threadgroup, keys per tile
#define QA_FWD_CONFIGS(X) \
  X(32, 4, 32)            \
  X(40, 4, 32)            \
  X(64, 4, 32)            \
  X(80, 4, 16)            \
  X(96, 4, 16)            \
  X(128, 4, 16)           \
  X(160, 4, 16)           \
  X(256, 2, 8)

#define QA_ATTN_ARGS                                                                                            \
  device const uchar *q [[buffer(0)]], device const uchar *kc [[buffer(1)]], device const float *ks [[buffer(2)]], \
      device const float *kz [[buffer(3)]], device const float *km [[buffer(4)]],                              \
      device const uchar *vc [[buffer(5)]], device const float *vs [[buffer(6)]],                              \
      device const float *vz [[buffer(7)]], device const float *vm [[buffer(8)]],                              \
      device const uchar *mask [[buffer(9)]], device uchar *out [[buffer(10)]], device float *lse [[buffer(11)]], \
      constant QAAttnParams &p [[buffer(12)]], QA_THREAD_IDS

template <int D, int NSG, int BK>
kernel void qa_attn_fwd(QA_ATTN_ARGS) {
  constexpr int BQ = 8 * NSG;
  constexpr int NT = 32 * NSG;
  constexpr int STAGE = BQ * D > 2 * BK * D ? BQ * D : 2 * BK * D;
  QA_TG_ARRAY(float, stage, STAGE);
  QA_TG_ARRAY(float, scores, BQ * BK);
  QA_TG_ARRAY(float, diag, NSG * 64);
  QA_TG_ARRAY(float, row_max, BQ);
  QA_TG_ARRAY(float, row_sum, BQ);

  const int n_qt = (p.q_len + BQ - 1) / BQ;
  const int q0 = (int(tg) % n_qt) * BQ;
  const int bhq = int(tg) / n_qt;
  const int hq = bhq % p.q_heads;
  const int b = bhq / p.q_heads;
  const long bhk = long(b) * p.kv_heads + hq / (p.q_heads / p.kv_heads);
  const long qbase = long(b) * p.q_sb + long(hq) * p.q_sh;

  for (int e = int(tid); e < BQ * D; e += NT) {
    const int i = q0 + e / D;
    stage[e] = i < p.q_len ? qa_load(q, p.q_dtype, qbase + long(i) * p.q_ss + e % D) : 0.0f;
  }
  if (tid < uint(BQ)) {
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_float8x8 qm[D / 8];
  simdgroup_float8x8 om[D / 8];
  for (int kk = 0; kk < D / 8; ++kk) {
    simdgroup_load(qm[kk], stage + sg * 8 * D + kk * 8, D);
    om[kk] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  int kend = p.kv_len;
  if (p.causal != 0) {
    kend = max(0, min(kend, q0 + BQ + p.kv_len - p.q_len));
  }
  threadgroup float* kt = stage;
  threadgroup float* vt = stage + BK * D;
  threadgroup float* srow = scores + sg * 8 * BK;
  const int r = int(lane) / 4;
  const int sub = int(lane) % 4;
  const int row = int(sg) * 8 + r;
  for (int j0 = 0; j0 < kend; j0 += BK) {
    for (int e = int(tid); e < BK * D; e += NT) {
      const int j = j0 + e / D;
      const int c = e % D;
      const bool ok = j < p.kv_len;
      kt[e] = ok ? qa_dequant_k(kc, ks, kz, km, p, bhk, j, c) : 0.0f;
      vt[e] = ok ? qa_dequant_v(vc, vs, vz, vm, p, bhk, j, c) : 0.0f;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (int jj = 0; jj < BK / 8; ++jj) {
      simdgroup_float8x8 acc = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (int kk = 0; kk < D / 8; ++kk) {
        simdgroup_float8x8 kmat;
        simdgroup_load(kmat, kt + jj * 8 * D + kk * 8, D, ulong2(0), true);
        simdgroup_multiply_accumulate(acc, qm[kk], kmat, acc);
      }
      simdgroup_store(acc, srow + jj * 8, BK);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    float tile_max = -INFINITY;
    for (int t = sub; t < BK; t += 4) {
      const float s = qa_masked_score(srow[r * BK + t] * p.scale, mask, p, b, hq, q0 + row, j0 + t);
      srow[r * BK + t] = s;
      tile_max = max(tile_max, s);
    }
    tile_max = max(tile_max, simd_shuffle_xor(tile_max, 1));
    tile_max = max(tile_max, simd_shuffle_xor(tile_max, 2));
    const float m_old = row_max[row];
    const float m_new = max(m_old, tile_max);
    const float m_use = qa_is_neg_inf(m_new) ? 0.0f : m_new;
    const float alpha = qa_is_neg_inf(m_old) ? 0.0f : exp(m_old - m_use);
    float tile_sum = 0.0f;
    for (int t = sub; t < BK; t += 4) {
      const float st = srow[r * BK + t];
      const float pe = qa_is_neg_inf(st) ? 0.0f : exp(st - m_use);
      tile_sum += pe;
      srow[r * BK + t] = qa_round_p(pe, p.p_round);
    }
    tile_sum += simd_shuffle_xor(tile_sum, 1);
    tile_sum += simd_shuffle_xor(tile_sum, 2);
    if (sub == 0) {
      row_max[row] = m_new;
      row_sum[row] = row_sum[row] * alpha + tile_sum;
    }
    diag[sg * 64 + r * 8 + 2 * sub] = 2 * sub == r ? alpha : 0.0f;
    diag[sg * 64 + r * 8 + 2 * sub + 1] = 2 * sub + 1 == r ? alpha : 0.0f;
    simdgroup_barrier(mem_flags::mem_threadgroup);

    simdgroup_float8x8 dmat;
    simdgroup_load(dmat, diag + sg * 64, 8);
    simdgroup_float8x8 pm[BK / 8];
    for (int kk = 0; kk < BK / 8; ++kk) {
      simdgroup_load(pm[kk], srow + kk * 8, BK);
    }
    for (int cc = 0; cc < D / 8; ++cc) {
      simdgroup_multiply(om[cc], dmat, om[cc]);
      for (int kk = 0; kk < BK / 8; ++kk) {
        simdgroup_float8x8 vmat;
        simdgroup_load(vmat, vt + kk * 8 * D + cc * 8, D);
        simdgroup_multiply_accumulate(om[cc], pm[kk], vmat, om[cc]);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  threadgroup float* orow = stage + sg * 8 * D;
  for (int cc = 0; cc < D / 8; ++cc) {
    simdgroup_store(om[cc], orow + cc * 8, D);
  }
  simdgroup_barrier(mem_flags::mem_threadgroup);
  for (int e = int(lane); e < 8 * D; e += 32) {
    const int i = q0 + int(sg) * 8 + e / D;
    if (i < p.q_len) {
      const float l = row_sum[sg * 8 + e / D];
      const float o = l > 0.0f ? orow[e] / l : p.empty_value;
      qa_store(out, p.out_dtype, ((long(bhq) * p.q_len) + i) * D + e % D, o);
    }
  }
  if (lane < 8) {
    const int i = q0 + int(sg) * 8 + int(lane);
    if (i < p.q_len) {
      const float l = row_sum[sg * 8 + lane];
      lse[long(bhq) * p.q_len + i] = l > 0.0f ? row_max[sg * 8 + lane] + log(l) : -INFINITY;
    }
  }
}

#define QA_FWD_INSTANTIATE(D, NSG, BK) \
  template QA_HOST_NAME("qa_attn_fwd_d" #D) kernel void qa_attn_fwd<D, NSG, BK>(QA_ATTN_ARGS);
QA_FWD_CONFIGS(QA_FWD_INSTANTIATE)
