// quantattn-hf Metal kernels: the quantiser (docs/quantization.md, strategy_version 1, symmetric INT8/INT4).
//
// qa_quant_channel: K-style groups, one scale per channel over a block of tokens, with optional block
//   means (bias restoration). One threadgroup per (batch, head, block); each thread owns a pair of
//   channels (the two nibbles of one INT4 byte) and walks the block's tokens three times: mean, absmax,
//   codes. No threadgroup memory, no barriers.
// qa_quant_row: V-style groups, one scale per token. One SIMD-group per token; each lane owns channel
//   pairs, the absmax is a simd_max across the 32 lanes.

constant float QA_TINY = 8.673617379884035e-19f;  // 2**-60

// One code: rint(clamp(v / scale, -qmax, qmax)), or 0 where the group is not finite (NaN scale).
inline int qa_quant_code(float v, float scale, float qmax, bool bad) {
  return bad ? 0 : int(rint(clamp(v / scale, -qmax, qmax)));
}

kernel void qa_quant_channel(device const uchar* x [[buffer(0)]], device uchar* codes [[buffer(1)]],
                             device float* scales [[buffer(2)]], device float* means [[buffer(3)]],
                             constant QAQuantParams& p [[buffer(4)]], QA_THREAD_IDS) {
  const int blk = int(tg) % p.n_blocks;
  const int bh = int(tg) / p.n_blocks;
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int t0 = blk * p.block;
  const int t1 = min(t0 + p.block, p.seq_len);
  const float qmax = p.bits == 8 ? 127.0f : 7.0f;
  const long xbase = long(b) * p.x_sb + long(h) * p.x_sh;
  const long stat_base = (long(bh) * p.n_blocks + blk) * p.head_dim;
  for (int cp = int(tid); 2 * cp < p.head_dim; cp += 64) {
    float mean[2] = {0.0f, 0.0f};
    float scale[2] = {0.0f, 0.0f};
    bool bad[2] = {false, false};
    for (int k = 0; k < 2; ++k) {
      const int c = 2 * cp + k;
      if (c >= p.head_dim) {
        continue;
      }
      if (p.subtract_mean != 0) {
        float sum = 0.0f;
        for (int t = t0; t < t1; ++t) {
          sum += qa_load(x, p.x_dtype, xbase + long(t) * p.x_ss + c);
        }
        mean[k] = sum / float(t1 - t0);
        means[stat_base + c] = mean[k];
      }
      float amax = 0.0f;
      for (int t = t0; t < t1; ++t) {
        const float v = qa_load(x, p.x_dtype, xbase + long(t) * p.x_ss + c) - mean[k];
        bad[k] = bad[k] || !qa_is_finite(v);
        amax = max(amax, fabs(v));
      }
      scale[k] = bad[k] ? NAN : max(amax, QA_TINY) / qmax;
      scales[stat_base + c] = scale[k];
    }
    for (int t = t0; t < t1; ++t) {
      const long xi = xbase + long(t) * p.x_ss + 2 * cp;
      const int q0 = qa_quant_code(qa_load(x, p.x_dtype, xi) - mean[0], scale[0], qmax, bad[0]);
      if (p.bits == 8) {
        const long oi = (long(bh) * p.seq_len + t) * p.head_dim + 2 * cp;
        codes[oi] = uchar(q0 & 0xFF);
        if (2 * cp + 1 < p.head_dim) {
          const int q1 = qa_quant_code(qa_load(x, p.x_dtype, xi + 1) - mean[1], scale[1], qmax, bad[1]);
          codes[oi + 1] = uchar(q1 & 0xFF);
        }
      } else {
        const int q1 = qa_quant_code(qa_load(x, p.x_dtype, xi + 1) - mean[1], scale[1], qmax, bad[1]);
        codes[(long(bh) * p.seq_len + t) * (p.head_dim / 2) + cp] = uchar((q0 & 0xF) | ((q1 & 0xF) << 4));
      }
    }
  }
}

kernel void qa_quant_row(device const uchar* x [[buffer(0)]], device uchar* codes [[buffer(1)]],
                         device float* scales [[buffer(2)]], device float* means [[buffer(3)]],
                         constant QAQuantParams& p [[buffer(4)]], QA_THREAD_IDS) {
  const long row = long(tg) * 4 + sg;
  if (row >= long(p.batch) * p.heads * p.seq_len) {
    return;
  }
  const long bh = row / p.seq_len;
  const int t = int(row % p.seq_len);
  const long xbase = (bh / p.heads) * p.x_sb + (bh % p.heads) * p.x_sh + long(t) * p.x_ss;
  const float qmax = p.bits == 8 ? 127.0f : 7.0f;
  float amax = 0.0f;
  int bad = 0;
  for (int c = int(lane); c < p.head_dim; c += 32) {
    const float v = qa_load(x, p.x_dtype, xbase + c);
    bad = bad | (qa_is_finite(v) ? 0 : 1);
    amax = max(amax, fabs(v));
  }
  amax = simd_max(amax);
  bad = simd_max(bad);
  const float scale = bad != 0 ? NAN : max(amax, QA_TINY) / qmax;
  if (lane == 0) {
    scales[row] = scale;
  }
  for (int cp = int(lane); 2 * cp < p.head_dim; cp += 32) {
    const int q0 = qa_quant_code(qa_load(x, p.x_dtype, xbase + 2 * cp), scale, qmax, bad != 0);
    if (p.bits == 8) {
      codes[row * p.head_dim + 2 * cp] = uchar(q0 & 0xFF);
      if (2 * cp + 1 < p.head_dim) {
        codes[row * p.head_dim + 2 * cp + 1] =
            uchar(qa_quant_code(qa_load(x, p.x_dtype, xbase + 2 * cp + 1), scale, qmax, bad != 0) & 0xFF);
      }
    } else {
      const int q1 = qa_quant_code(qa_load(x, p.x_dtype, xbase + 2 * cp + 1), scale, qmax, bad != 0);
      codes[row * (p.head_dim / 2) + cp] = uchar((q0 & 0xF) | ((q1 & 0xF) << 4));
    }
  }
}
