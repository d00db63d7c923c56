// The interface between the compiled shader kernels (emu_kernels.cpp) and the fiber runner (emu_runtime.cpp).
#pragma once

extern "C" {

// The built-in thread ids a kernel receives, in the order every quantattn-hf kernel declares them last.
struct QaEmuIds {
  unsigned tg;    // threadgroup_position_in_grid (1-D grids)
  unsigned tid;   // thread_position_in_threadgroup
  unsigned sg;    // simdgroup_index_in_threadgroup
  unsigned lane;  // thread_index_in_simdgroup
};

typedef void (*QaEmuKernelFn)(void* const* buffers, const QaEmuIds* ids);

// One shader kernel the module can launch: its host name, entry, buffer count and threadgroup size.
struct QaEmuKernel {
  const char* name;
  QaEmuKernelFn fn;
  int n_buffers;
  int group_size;
};

const QaEmuKernel* qa_emu_kernels(int* count);
}
