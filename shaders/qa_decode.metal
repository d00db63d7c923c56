// quantattn-hf Metal kernels: decode over a quantised K/V cache (few query rows, many keys).
//
// Split-K ("flash decoding"). qa_attn_decode: one threadgroup of 4 SIMD-groups per (batch, K/V head,
// split of the keys); its rows are the R = (query heads of the GQA group) x (query positions) <= 8
// queries that read this K/V head, so every K/V element is dequantised once for all of them. SIMD-group
// g takes keys g, g + 4, ... of the split; each lane owns channels lane, lane + 32, ... of Q, K, V and the
// output; a score is a simd_sum over the lanes, the softmax is online per key in registers. Each
// SIMD-group writes its partial (running max, sum, unnormalised output) to device memory; no threadgroup
// memory, no threadgroup barriers. qa_attn_combine: one SIMD-group per query row merges the partials
// into the output and the log-sum-exp.

#define QA_DECODE_MAX_ROWS 8

// head dims served by the decode kernel (every head dim of the forward kernel)
#define QA_DECODE_CONFIGS(X) X(32) X(40) X(64) X(80) X(96) X(128) X(160) X(256)

#define QA_DECODE_ARGS                                                                                          \
  device const uchar *q [[buffer(0)]], device const uchar *kc [[buffer(1)]], device const float *ks [[buffer(2)]], \
      device const float *kz [[buffer(3)]], device const float *km [[buffer(4)]],                              \
      device const uchar *vc [[buffer(5)]], device const float *vs [[buffer(6)]],                              \
      device const float *vz [[buffer(7)]], device const float *vm [[buffer(8)]],                              \
      device const uchar *mask [[buffer(9)]], device float *part_o [[buffer(10)]],                             \
      device float *part_ml [[buffer(11)]], constant QAAttnParams &p [[buffer(12)]], QA_THREAD_IDS

template <int D>
kernel void qa_attn_decode(QA_DECODE_ARGS) {
  constexpr int CPL = (D + 31) / 32;
  constexpr int NSG = 4;
  const int split = int(tg) % p.n_split;
  const int bhk = int(tg) / p.n_split;
  const int hk = bhk % p.kv_heads;
  const int b = bhk / p.kv_heads;
  const int groups = p.q_heads / p.kv_heads;
  const int rows = groups * p.q_len;

  float qv[QA_DECODE_MAX_ROWS][CPL];
  float ov[QA_DECODE_MAX_ROWS][CPL];
  float m[QA_DECODE_MAX_ROWS];
  float l[QA_DECODE_MAX_ROWS];
  for (int r = 0; r < QA_DECODE_MAX_ROWS; ++r) {
    const int hq = hk * groups + r / p.q_len;
    const int i = r % p.q_len;
    for (int cc = 0; cc < CPL; ++cc) {
      const int c = int(lane) + 32 * cc;
      const bool ok = r < rows && c < D;
      qv[r][cc] = ok ? qa_load(q, p.q_dtype, long(b) * p.q_sb + long(hq) * p.q_sh + long(i) * p.q_ss + c) : 0.0f;
      ov[r][cc] = 0.0f;
    }
    m[r] = -INFINITY;
    l[r] = 0.0f;
  }

  const int chunk = (p.kv_len + p.n_split - 1) / p.n_split;
  const int j_end = min(p.kv_len, (split + 1) * chunk);
  for (int j = split * chunk + int(sg); j < j_end; j += NSG) {
    float kv[CPL];
    float vv[CPL];
    for (int cc = 0; cc < CPL; ++cc) {
      const int c = int(lane) + 32 * cc;
      kv[cc] = c < D ? qa_dequant_k(kc, ks, kz, km, p, bhk, j, c) : 0.0f;
      vv[cc] = c < D ? qa_dequant_v(vc, vs, vz, vm, p, bhk, j, c) : 0.0f;
    }
    for (int r = 0; r < QA_DECODE_MAX_ROWS; ++r) {
      if (r >= rows) {
        break;
      }
      float dot = 0.0f;
      for (int cc = 0; cc < CPL; ++cc) {
        dot += qv[r][cc] * kv[cc];
      }
      const float s = qa_masked_score(simd_sum(dot) * p.scale, mask, p, b, hk * groups + r / p.q_len, r % p.q_len, j);
      if (qa_is_neg_inf(s)) {
        continue;
      }
      const float m_new = max(m[r], s);
      const float alpha = qa_is_neg_inf(m[r]) ? 0.0f : exp(m[r] - m_new);
      const float pe = exp(s - m_new);
      l[r] = l[r] * alpha + pe;
      m[r] = m_new;
      const float pr = qa_round_p(pe, p.p_round);
      for (int cc = 0; cc < CPL; ++cc) {
        ov[r][cc] = ov[r][cc] * alpha + pr * vv[cc];
      }
    }
  }

  const int n_parts = p.n_split * NSG;
  for (int r = 0; r < QA_DECODE_MAX_ROWS; ++r) {
    if (r >= rows) {
      break;
    }
    const long row = (long(b) * p.q_heads + hk * groups + r / p.q_len) * p.q_len + r % p.q_len;
    const long part = row * n_parts + split * NSG + int(sg);
    for (int cc = 0; cc < CPL; ++cc) {
      const int c = int(lane) + 32 * cc;
      if (c < D) {
        part_o[part * D + c] = ov[r][cc];
      }
    }
    if (lane == 0) {
      part_ml[2 * part] = m[r];
      part_ml[2 * part + 1] = l[r];
    }
  }
}

#define QA_DECODE_INSTANTIATE(D) \
  template QA_HOST_NAME("qa_attn_decode_d" #D) kernel void qa_attn_decode<D>(QA_DECODE_ARGS);
QA_DECODE_CONFIGS(QA_DECODE_INSTANTIATE)

kernel void qa_attn_combine(device const float* part_o [[buffer(0)]], device const float* part_ml [[buffer(1)]],
                            device uchar* out [[buffer(2)]], device float* lse [[buffer(3)]],
                            constant QAAttnParams& p [[buffer(4)]], QA_THREAD_IDS) {
  const long row = long(tg);
  const int n_parts = p.n_split * 4;
  const long first = row * n_parts;
  float m = -INFINITY;
  for (int k = 0; k < n_parts; ++k) {
    m = max(m, part_ml[2 * (first + k)]);
  }
  float l = 0.0f;
  for (int k = 0; k < n_parts; ++k) {
    const float mk = part_ml[2 * (first + k)];
    if (!qa_is_neg_inf(mk)) {
      l += exp(mk - m) * part_ml[2 * (first + k) + 1];
    }
  }
  for (int c = int(lane); c < p.head_dim; c += 32) {
    float acc = 0.0f;
    for (int k = 0; k < n_parts; ++k) {
      const float mk = part_ml[2 * (first + k)];
      if (!qa_is_neg_inf(mk)) {
        acc += exp(mk - m) * part_o[(first + k) * p.head_dim + c];
      }
    }
    qa_store(out, p.out_dtype, row * p.head_dim + c, l > 0.0f ? acc / l : p.empty_value);
  }
  if (lane == 0) {
    lse[row] = l > 0.0f ? m + log(l) : -INFINITY;
  }
}
