// The fiber runner of the Metal-on-CPU harness, exposed to Python through pybind11.
//
// A launch runs a 1-D grid of threadgroups. Threadgroups are spread over a few OS threads; within one
// threadgroup every Metal thread is a fiber (ucontext stack, switched with _setjmp/_longjmp). A fiber
// runs until it reaches a threadgroup barrier, a SIMD-group function or its end; then the scheduler
// picks another runnable fiber (seeded random order, biased towards the SIMD-group released last, so
// SIMD-groups run ahead of each other). A barrier releases only when every thread of the threadgroup
// (SIMD-group functions: every lane of the SIMD-group, all at the same operation) has reached it;
// nothing left to run before every thread has finished is a divergent barrier and fails the launch. Threadgroup memory comes from a
// 32 KiB arena per threadgroup, filled with 0xFF bytes (NaN as float) before each threadgroup, so a
// read that a missing barrier lets run early sees poison or stale data, never the right value.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "emu_kernels.h"

namespace {

constexpr size_t kTgMemory = 32 * 1024;  // Metal's threadgroup memory limit on Apple GPUs
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kSimdWidth = 32;

enum State { RUNNABLE, AT_TG_BARRIER, AT_SIMD, DONE, FAILED };

struct Fiber {
  jmp_buf ctx;
  ucontext_t uc;
  std::unique_ptr<char[]> stack;
  State state = RUNNABLE;
  int simd_op = 0;
  unsigned simd_gen = 0;
  size_t tg_offset = 0;
  QaEmuIds ids{};
};

struct Scheduler {
  jmp_buf ctx;
  ucontext_t uc_main;
  std::vector<Fiber> fibers;
  QaEmuKernelFn fn = nullptr;
  void* const* buffers = nullptr;
  alignas(64) unsigned char arena[kTgMemory];
  // SIMD-group exchange slots: [simdgroup][generation parity][lane][16 bytes]
  std::vector<unsigned char> slots;
  size_t tg_peak = 0;
  uint64_t rng = 0;
  std::string error;
};

thread_local Scheduler* g_sched = nullptr;
thread_local Fiber* g_fiber = nullptr;

void yield_to_scheduler() {
  if (_setjmp(g_fiber->ctx) == 0) _longjmp(g_sched->ctx, 1);
}

[[noreturn]] void fail_in_fiber(const std::string& msg) {
  if (g_sched->error.empty()) g_sched->error = msg;
  g_fiber->state = FAILED;
  _longjmp(g_sched->ctx, 1);
}

void fiber_entry() {
  if (_setjmp(g_fiber->ctx) == 0) setcontext(&g_sched->uc_main);
  for (;;) {
    Fiber* f = g_fiber;
    g_sched->fn(g_sched->buffers, &f->ids);
    f->state = DONE;
    yield_to_scheduler();
  }
}

void resume(Scheduler& s, Fiber& f) {
  g_fiber = &f;
  if (_setjmp(s.ctx) == 0) _longjmp(f.ctx, 1);
}

uint64_t next_random(uint64_t& x) {
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return x;
}

// Run one threadgroup to completion; returns false (with s.error set) on a failure.
// Each step resumes one runnable fiber until it blocks: a random one, or (half the time) the most
// recently released, so one SIMD-group often runs ahead of the others between threadgroup barriers.
bool run_threadgroup(Scheduler& s, unsigned tg) {
  const int n = static_cast<int>(s.fibers.size());
  std::memset(s.arena, 0xFF, sizeof(s.arena));
  std::vector<int> runnable(n);
  std::vector<int> at_simd(n / kSimdWidth, 0);
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    f.state = RUNNABLE;
    f.simd_gen = 0;
    f.tg_offset = 0;
    f.ids = QaEmuIds{tg, static_cast<unsigned>(i), static_cast<unsigned>(i / kSimdWidth),
                     static_cast<unsigned>(i % kSimdWidth)};
    runnable[i] = i;
  }
  for (int i = n - 1; i > 0; --i) std::swap(runnable[i], runnable[next_random(s.rng) % (i + 1)]);
  int done = 0, at_tg = 0;
  while (!runnable.empty()) {
    const uint64_t r = next_random(s.rng);
    const size_t pick = (r & 1) ? runnable.size() - 1 : (r >> 1) % runnable.size();
    const int i = runnable[pick];
    runnable[pick] = runnable.back();
    runnable.pop_back();
    resume(s, s.fibers[i]);
    if (!s.error.empty()) return false;
    Fiber& f = s.fibers[i];
    if (f.state == DONE) {
      ++done;
    } else if (f.state == AT_TG_BARRIER) {
      if (++at_tg == n) {
        at_tg = 0;
        for (int k = 0; k < n; ++k) {
          s.fibers[k].state = RUNNABLE;
          runnable.push_back(k);
        }
      }
    } else if (f.state == AT_SIMD) {
      const int g = i / kSimdWidth;
      if (++at_simd[g] == kSimdWidth) {
        at_simd[g] = 0;
        for (int l = 0; l < kSimdWidth; ++l) {
          Fiber& lane = s.fibers[g * kSimdWidth + l];
          if (lane.simd_op != f.simd_op) {
            s.error = "SIMD-group " + std::to_string(g) + " of threadgroup " + std::to_string(tg) +
                      ": lanes reached different SIMD-group operations";
            return false;
          }
          lane.state = RUNNABLE;
          runnable.push_back(g * kSimdWidth + l);
        }
      }
    }
  }
  if (done == n) return true;
  int waiting_simd = 0;
  for (int c : at_simd) waiting_simd += c;
  s.error = "divergent barrier in threadgroup " + std::to_string(tg) + ": " + std::to_string(at_tg) +
            " threads wait at threadgroup_barrier, " + std::to_string(waiting_simd) +
            " at a SIMD-group operation, " + std::to_string(done) + " have finished";
  return false;
}

void make_fibers(Scheduler& s, int group_size) {
  s.fibers = std::vector<Fiber>(group_size);
  s.slots.assign(static_cast<size_t>(group_size / kSimdWidth) * 2 * kSimdWidth * 16, 0);
  for (Fiber& f : s.fibers) {
    f.stack.reset(new char[kStackBytes]);
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack.get();
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_entry, 0);
    g_fiber = &f;
    swapcontext(&s.uc_main, &f.uc);
  }
}

struct Launch {
  const QaEmuKernel* kernel;
  std::vector<void*> buffers;
  unsigned n_groups;
  uint64_t seed;
};

// Run threadgroups first, first + stride, ... on this OS thread; returns the error text or "".
std::string run_slice(const Launch& launch, unsigned first, unsigned stride, size_t* peak) {
  auto sched = std::make_unique<Scheduler>();
  g_sched = sched.get();
  sched->fn = launch.kernel->fn;
  sched->buffers = launch.buffers.data();
  make_fibers(*sched, launch.kernel->group_size);
  for (unsigned tg = first; tg < launch.n_groups; tg += stride) {
    sched->rng = (launch.seed + 0x9E3779B97F4A7C15ull * (tg + 1)) | 1;
    if (!run_threadgroup(*sched, tg)) break;
  }
  *peak = sched->tg_peak;
  g_sched = nullptr;
  g_fiber = nullptr;
  return sched->error;
}

const std::unordered_map<std::string, const QaEmuKernel*>& kernel_table() {
  static const auto table = [] {
    std::unordered_map<std::string, const QaEmuKernel*> t;
    int count = 0;
    const QaEmuKernel* ks = qa_emu_kernels(&count);
    for (int i = 0; i < count; ++i) t[ks[i].name] = &ks[i];
    return t;
  }();
  return table;
}

// Launch `name` over n_groups threadgroups; returns the peak threadgroup memory (bytes) it used.
size_t launch(const std::string& name, const std::vector<uintptr_t>& buffers, unsigned n_groups, int group_size,
              int n_threads, uint64_t seed) {
  const auto& table = kernel_table();
  auto it = table.find(name);
  if (it == table.end()) throw std::invalid_argument("metal-emulated: no kernel named " + name);
  const QaEmuKernel* k = it->second;
  if (static_cast<int>(buffers.size()) != k->n_buffers)
    throw std::invalid_argument(name + ": expected " + std::to_string(k->n_buffers) + " buffers, got " +
                                std::to_string(buffers.size()));
  if (group_size != k->group_size)
    throw std::invalid_argument(name + ": threadgroup size must be " + std::to_string(k->group_size) + ", got " +
                                std::to_string(group_size));
  Launch l{k, {}, n_groups, seed};
  for (uintptr_t b : buffers) l.buffers.push_back(reinterpret_cast<void*>(b));
  const unsigned workers = std::max(1u, std::min<unsigned>(static_cast<unsigned>(std::max(n_threads, 1)), n_groups));
  std::vector<std::string> errors(workers);
  std::vector<size_t> peaks(workers, 0);
  {
    pybind11::gil_scoped_release release;
    std::vector<std::thread> pool;
    for (unsigned w = 1; w < workers; ++w)
      pool.emplace_back([&, w] { errors[w] = run_slice(l, w, workers, &peaks[w]); });
    errors[0] = run_slice(l, 0, workers, &peaks[0]);
    for (auto& t : pool) t.join();
  }
  for (const auto& e : errors)
    if (!e.empty()) throw std::runtime_error("metal-emulated: " + name + ": " + e);
  size_t peak = 0;
  for (size_t p : peaks) peak = std::max(peak, p);
  return peak;
}

}  // namespace

extern "C" {

void metal_emu_threadgroup_barrier(void) {
  g_fiber->state = AT_TG_BARRIER;
  yield_to_scheduler();
}

void metal_emu_simd_sync(int op) {
  g_fiber->state = AT_SIMD;
  g_fiber->simd_op = op;
  g_fiber->simd_gen++;
  yield_to_scheduler();
}

// Post this lane's value, wait for the SIMD-group, return the 32 slots (16 bytes apart) of this round.
// Rounds alternate between two slot sets: a lane can run ahead by at most one round, since the next
// round waits for every lane, so the set it writes is never the one a slower lane still reads.
const void* metal_emu_simd_exchange(const void* value, int size, int op) {
  Fiber* f = g_fiber;
  const size_t base = ((static_cast<size_t>(f->ids.sg) * 2 + (f->simd_gen & 1)) * kSimdWidth) * 16;
  unsigned char* set = g_sched->slots.data() + base;
  std::memcpy(set + 16 * f->ids.lane, value, size);
  metal_emu_simd_sync(op);
  return set;
}

unsigned metal_emu_lane(void) { return g_fiber->ids.lane; }

void* metal_emu_tg_alloc(unsigned long bytes, const char* name) {
  Fiber* f = g_fiber;
  const size_t start = (f->tg_offset + 63) & ~static_cast<size_t>(63);
  if (start + bytes > kTgMemory)
    fail_in_fiber("threadgroup memory: '" + std::string(name) + "' needs " + std::to_string(bytes) +
                  " bytes past offset " + std::to_string(start) + ", over the 32 KiB limit");
  f->tg_offset = start + bytes;
  if (f->tg_offset > g_sched->tg_peak) g_sched->tg_peak = f->tg_offset;
  return g_sched->arena + start;
}
}

PYBIND11_MODULE(QA_EMU_MODULE_NAME, m) {
  m.doc() = "quantattn-hf: the .metal kernels compiled as C++, run on CPU fibers (tests and metal-emulated)";
  m.def("launch", &launch, pybind11::arg("name"), pybind11::arg("buffers"), pybind11::arg("n_groups"),
        pybind11::arg("group_size"), pybind11::arg("n_threads") = 1, pybind11::arg("seed") = 0,
        "Run kernel `name` over n_groups threadgroups; returns the peak threadgroup memory in bytes.");
  m.def("kernels", [] {
    std::vector<std::pair<std::string, int>> out;
    for (const auto& kv : kernel_table()) out.emplace_back(kv.first, kv.second->group_size);
    return out;
  });
  m.attr("THREADGROUP_MEMORY_LIMIT") = kTgMemory;
}
