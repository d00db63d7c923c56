// quantattn-hf Metal kernels: the shared prelude, placed before every other shader source.
//
// The sources are concatenated in this order: qa_common, qa_quantize, qa_attention, qa_decode. On Apple
// they are compiled with torch.mps.compile_shader; on Linux the same text is compiled as C++ against
// native/shim/metal_stdlib (which predefines QA_TG_ARRAY and QA_HOST_NAME for the fiber runner).
// Host-side layouts of the parameter structs are read from this file by quantattn_hf/backends/metal:
// keep one `int name;` or `float name;` per line.
#include <metal_stdlib>
using namespace metal;

// A threadgroup-memory array; the harness allocates it from a checked, poisoned 32 KiB arena.
#ifndef QA_TG_ARRAY
#define QA_TG_ARRAY(T, name, n) threadgroup T name[n]
#endif

// The host name of an explicit kernel instantiation.
#ifndef QA_HOST_NAME
#define QA_HOST_NAME(name) [[host_name(name)]]
#endif

// Element types of float buffers (Q input, outputs, quantiser input), chosen at run time.
enum QADtype { QA_F32 = 0, QA_F16 = 1, QA_BF16 = 2 };

// Rounding of the softmax numerator P before P.V (docs/quantization.md, round_P).
enum QAPRound { QA_P_F32 = 0, QA_P_F16 = 1, QA_P_BF16 = 2 };

// Mask kinds: none, bool (one byte per element) or float (added to the scores).
enum QAMaskKind { QA_MASK_NONE = 0, QA_MASK_BOOL = 1, QA_MASK_FLOAT = 2 };

struct QAAttnParams {
  int batch;
  int q_heads;
  int kv_heads;
  int q_len;
  int kv_len;
  int head_dim;
  int q_dtype;
  int out_dtype;
  int q_sb;
  int q_sh;
  int q_ss;
  int k_bits;
  int k_unsigned;
  int k_has_zero;
  int k_has_mean;
  int k_scale_sbh;
  int k_scale_tdiv;
  int k_scale_st;
  int k_scale_sc;
  int k_mean_sbh;
  int k_mean_tdiv;
  int v_bits;
  int v_unsigned;
  int v_has_zero;
  int v_has_mean;
  int v_scale_sbh;
  int v_scale_tdiv;
  int v_scale_st;
  int v_scale_sc;
  int v_mean_sbh;
  int v_mean_tdiv;
  int causal;
  int mask_kind;
  int mask_sb;
  int mask_sh;
  int mask_sq;
  int mask_sk;
  int p_round;
  int n_split;
  float scale;
  float empty_value;
};

struct QAQuantParams {
  int batch;
  int heads;
  int seq_len;
  int head_dim;
  int x_dtype;
  int x_sb;
  int x_sh;
  int x_ss;
  int bits;
  int block;
  int n_blocks;
  int subtract_mean;
};

// Finite test on the bits: stays exact when the compiler assumes finite math (Metal's fast-math default).
inline bool qa_is_finite(float x) {
  return (as_type<uint>(x) & 0x7F800000u) != 0x7F800000u;
}

// -inf test on the bits (masked scores and empty running maxima are -inf; see qa_is_finite).
inline bool qa_is_neg_inf(float x) {
  return as_type<uint>(x) == 0xFF800000u;
}

// One element of a float buffer of run-time type `dtype` (bfloat read as its upper 16 bits).
inline float qa_load(device const uchar* base, int dtype, long i) {
  if (dtype == QA_F16) {
    return float(((device const half*)base)[i]);
  }
  if (dtype == QA_BF16) {
    return as_type<float>(uint(((device const ushort*)base)[i]) << 16);
  }
  return ((device const float*)base)[i];
}

// float -> bfloat bits, rounding to nearest even (NaN stays NaN).
inline ushort qa_to_bf16_bits(float x) {
  uint u = as_type<uint>(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return ushort((u >> 16) | 0x40u);
  }
  u += 0x7FFFu + ((u >> 16) & 1u);
  return ushort(u >> 16);
}

inline void qa_store(device uchar* base, int dtype, long i, float x) {
  if (dtype == QA_F16) {
    ((device half*)base)[i] = half(x);
  } else if (dtype == QA_BF16) {
    ((device ushort*)base)[i] = qa_to_bf16_bits(x);
  } else {
    ((device float*)base)[i] = x;
  }
}

// P rounded to its held format, back in float (docs/quantization.md, round_P).
inline float qa_round_p(float p, int mode) {
  if (mode == QA_P_F16) {
    return float(half(p));
  }
  if (mode == QA_P_BF16) {
    return as_type<float>(uint(qa_to_bf16_bits(p)) << 16);
  }
  return p;
}

// The integer code of channel c of one held row (int8 bytes, or int4 nibbles low first).
inline float qa_code(device const uchar* row, int c, int bits, int is_unsigned) {
  if (bits == 8) {
    int u = int(row[c]);
    return float(u - ((u & 0x80) << 1));
  }
  int nib = (int(row[c >> 1]) >> ((c & 1) * 4)) & 0xF;
  return float(is_unsigned != 0 ? nib : nib - ((nib & 8) << 1));
}

// x' of docs/quantization.md for token j, channel c of K or V head (b, h): (q - zero) * scale + mean.
inline float qa_dequant(device const uchar* codes, device const float* scale, device const float* zero,
                        device const float* mean, int bits, int is_unsigned, int has_zero, int has_mean,
                        int s_sbh, int s_tdiv, int s_st, int s_sc, int m_sbh, int m_tdiv, long bh, int j, int c,
                        int seq_len, int head_dim) {
  const int row_bytes = bits == 8 ? head_dim : head_dim / 2;
  const float q = qa_code(codes + (bh * seq_len + j) * long(row_bytes), c, bits, is_unsigned);
  const long si = bh * s_sbh + long(j / s_tdiv) * s_st + long(c) * s_sc;
  float x = has_zero != 0 ? (q - zero[si]) * scale[si] : q * scale[si];
  if (has_mean != 0) {
    x = x + mean[bh * m_sbh + long(j / m_tdiv) * head_dim + c];
  }
  return x;
}

inline float qa_dequant_k(device const uchar* kc, device const float* ks, device const float* kz,
                          device const float* km, constant QAAttnParams& p, long bh, int j, int c) {
  return qa_dequant(kc, ks, kz, km, p.k_bits, p.k_unsigned, p.k_has_zero, p.k_has_mean, p.k_scale_sbh,
                    p.k_scale_tdiv, p.k_scale_st, p.k_scale_sc, p.k_mean_sbh, p.k_mean_tdiv, bh, j, c, p.kv_len,
                    p.head_dim);
}

inline float qa_dequant_v(device const uchar* vc, device const float* vs, device const float* vz,
                          device const float* vm, constant QAAttnParams& p, long bh, int j, int c) {
  return qa_dequant(vc, vs, vz, vm, p.v_bits, p.v_unsigned, p.v_has_zero, p.v_has_mean, p.v_scale_sbh,
                    p.v_scale_tdiv, p.v_scale_st, p.v_scale_sc, p.v_mean_sbh, p.v_mean_tdiv, bh, j, c, p.kv_len,
                    p.head_dim);
}

// A scaled score with the causal rule, the key range and the mask applied (-inf where dropped).
inline float qa_masked_score(float s, device const uchar* mask, constant QAAttnParams& p, int b, int hq, int i,
                             int j) {
  if (j >= p.kv_len || i >= p.q_len) {
    return -INFINITY;
  }
  if (p.causal != 0 && j > i + (p.kv_len - p.q_len)) {
    return -INFINITY;
  }
  if (p.mask_kind != QA_MASK_NONE) {
    const long mi = long(b) * p.mask_sb + long(hq) * p.mask_sh + long(i) * p.mask_sq + long(j) * p.mask_sk;
    if (p.mask_kind == QA_MASK_BOOL) {
      return mask[mi] != 0 ? s : -INFINITY;
    }
    const float mv = ((device const float*)mask)[mi];
    return qa_is_neg_inf(mv) ? -INFINITY : s + mv;
  }
  return s;
}

// The ids every quantattn-hf kernel receives, declared last in this order.
#define QA_THREAD_IDS                                                                        \
  uint tg [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]],    \
      uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]
