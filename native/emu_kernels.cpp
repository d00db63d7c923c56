// The .metal sources compiled as C++ against the metal_stdlib shim, and the table of their kernels.
//
// Built by quantattn_hf/backends/metal/build.py with -I native/shim -I <shader dir>; the shader files are
// included in the order the Metal backend concatenates them for torch.mps.compile_shader.
#include "emu_kernels.h"

#include "qa_common.metal"
#include "qa_quantize.metal"
#include "qa_attention.metal"
#include "qa_decode.metal"

// Test-only kernels: a shader folder may add qa_test_extra.metal defining QA_TEST_KERNELS(X) as X(name)
// entries of kernels taking (device float*, device float*, device atomic_int*, QA_THREAD_IDS), run with
// 64-thread threadgroups (tests/test_metal_harness.py uses it to check the shim's primitives).
#if __has_include("qa_test_extra.metal")
#include "qa_test_extra.metal"
#define QA_HAVE_TEST_EXTRA 1
#endif

namespace {

using metal::uchar;

template <int D, int NSG, int BK>
void run_fwd(void* const* a, const QaEmuIds* t) {
  qa_attn_fwd<D, NSG, BK>(
      static_cast<const uchar*>(a[0]), static_cast<const uchar*>(a[1]), static_cast<const float*>(a[2]),
      static_cast<const float*>(a[3]), static_cast<const float*>(a[4]), static_cast<const uchar*>(a[5]),
      static_cast<const float*>(a[6]), static_cast<const float*>(a[7]), static_cast<const float*>(a[8]),
      static_cast<const uchar*>(a[9]), static_cast<uchar*>(a[10]), static_cast<float*>(a[11]),
      *static_cast<const QAAttnParams*>(a[12]), t->tg, t->tid, t->sg, t->lane);
}

template <int D>
void run_decode(void* const* a, const QaEmuIds* t) {
  qa_attn_decode<D>(static_cast<const uchar*>(a[0]), static_cast<const uchar*>(a[1]),
                    static_cast<const float*>(a[2]), static_cast<const float*>(a[3]),
                    static_cast<const float*>(a[4]), static_cast<const uchar*>(a[5]),
                    static_cast<const float*>(a[6]), static_cast<const float*>(a[7]),
                    static_cast<const float*>(a[8]), static_cast<const uchar*>(a[9]), static_cast<float*>(a[10]),
                    static_cast<float*>(a[11]), *static_cast<const QAAttnParams*>(a[12]), t->tg, t->tid, t->sg,
                    t->lane);
}

void run_combine(void* const* a, const QaEmuIds* t) {
  qa_attn_combine(static_cast<const float*>(a[0]), static_cast<const float*>(a[1]), static_cast<uchar*>(a[2]),
                  static_cast<float*>(a[3]), *static_cast<const QAAttnParams*>(a[4]), t->tg, t->tid, t->sg,
                  t->lane);
}

template <void (*K)(const uchar*, uchar*, float*, float*, const QAQuantParams&, uint, uint, uint, uint)>
void run_quant(void* const* a, const QaEmuIds* t) {
  K(static_cast<const uchar*>(a[0]), static_cast<uchar*>(a[1]), static_cast<float*>(a[2]),
    static_cast<float*>(a[3]), *static_cast<const QAQuantParams*>(a[4]), t->tg, t->tid, t->sg, t->lane);
}

#ifdef QA_HAVE_TEST_EXTRA
template <void (*K)(float*, float*, metal::atomic_int*, uint, uint, uint, uint)>
void run_test(void* const* a, const QaEmuIds* t) {
  K(static_cast<float*>(a[0]), static_cast<float*>(a[1]), static_cast<metal::atomic_int*>(a[2]), t->tg, t->tid, t->sg,
    t->lane);
}
#define QA_TEST_ENTRY(name) {#name, run_test<name>, 3, 64},
#endif

#define QA_FWD_ENTRY(D, NSG, BK) {"qa_attn_fwd_d" #D, run_fwd<D, NSG, BK>, 13, 32 * NSG},
#define QA_DECODE_ENTRY(D) {"qa_attn_decode_d" #D, run_decode<D>, 13, 128},

const QaEmuKernel kKernels[] = {
    {"qa_quant_channel", run_quant<qa_quant_channel>, 5, 64},
    {"qa_quant_row", run_quant<qa_quant_row>, 5, 128},
    {"qa_attn_combine", run_combine, 5, 32},
    QA_FWD_CONFIGS(QA_FWD_ENTRY) QA_DECODE_CONFIGS(QA_DECODE_ENTRY)
#ifdef QA_HAVE_TEST_EXTRA
        QA_TEST_KERNELS(QA_TEST_ENTRY)
#endif
};

}  // namespace

extern "C" const QaEmuKernel* qa_emu_kernels(int* count) {
  *count = static_cast<int>(sizeof(kKernels) / sizeof(kKernels[0]));
  return kKernels;
}
