// A small CUDA execution emulator for the host, to run kernels/lsoftmax.cu under g++.
//
// Each block runs its threads as cooperative fibers (ucontext) on one OS thread: a thread
// runs until it reaches __syncthreads() or returns, then the next one runs; when every
// thread waits at the barrier, all are released.  The order in which threads run between
// barriers is a parameter (ascending, descending, or a seeded shuffle), so a missing
// barrier shows up as results that depend on the order.  A barrier reached by only part of
// the block (a non-uniform early return) is an error.  Blocks run one after another, so
// __shared__ (mapped to static) is per block as on the GPU, and atomics need no locking.
//
// Only what the kernels use is provided: threadIdx/blockIdx/blockDim/gridDim,
// __syncthreads, atomicMin/atomicMax on unsigned (long long) int, __threadfence_system.
// Launches come from Python through emu_launch() with cuLaunchKernel-style arguments (an
// array of pointers to the argument values), the same packing CuPy uses on the GPU.
#pragma once

#include <math.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x, y, z;
};
inline dim3 threadIdx{0, 0, 0}, blockIdx{0, 0, 0}, blockDim{1, 1, 1}, gridDim{1, 1, 1};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace emu {

enum State { RUNNABLE, AT_BARRIER, DONE };

struct Fiber {
  ucontext_t ctx;
  State state;
  std::vector<char> stack;
};

inline ucontext_t scheduler_ctx;
inline std::vector<Fiber> fibers;
inline int current = -1;
inline std::function<void()> body;
inline std::string error;
inline long long barriers = 0;

inline void trampoline() {
  body();
  fibers[current].state = DONE;
  swapcontext(&fibers[current].ctx, &scheduler_ctx);
}

inline void barrier() {
  fibers[current].state = AT_BARRIER;
  ++barriers;
  swapcontext(&fibers[current].ctx, &scheduler_ctx);
}

// Run one block of n threads; order 0 ascending, 1 descending, >= 2 shuffled (seeded).
inline bool run_block(unsigned n, int order) {
  const std::size_t stack_size = 256 * 1024;
  fibers.resize(n);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = fibers[t];
    f.stack.resize(stack_size);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = stack_size;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
    f.state = RUNNABLE;
  }
  std::vector<unsigned> perm(n);
  std::iota(perm.begin(), perm.end(), 0u);
  unsigned long long rng = 0x9E3779B97F4A7C15ull * (unsigned long long)(order + 1) + blockIdx.x * 131 + blockIdx.y;
  for (;;) {
    if (order == 1) {
      for (unsigned t = 0; t < n; ++t) perm[t] = n - 1 - t;
    } else if (order >= 2) {
      for (unsigned t = n - 1; t > 0; --t) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::swap(perm[t], perm[rng % (t + 1)]);
      }
    }
    for (unsigned t : perm) {
      if (fibers[t].state != RUNNABLE) continue;
      threadIdx = dim3{t, 0, 0};
      current = (int)t;
      swapcontext(&scheduler_ctx, &fibers[t].ctx);
    }
    bool waiting = false, done = false;
    for (const Fiber& f : fibers) {
      waiting |= f.state == AT_BARRIER;
      done |= f.state == DONE;
    }
    if (!waiting) return true;
    if (done) {
      error = "__syncthreads() reached by only part of block (" + std::to_string(blockIdx.x) + ", " +
              std::to_string(blockIdx.y) + ")";
      return false;
    }
    for (Fiber& f : fibers) f.state = RUNNABLE;
  }
}

struct Entry {
  std::string name;
  std::function<bool(dim3, unsigned, void**, int)> launch;
  std::vector<int> sizes;
};

template <typename... A, std::size_t... I>
bool launch_impl(void (*k)(A...), dim3 grid, unsigned block, void** p, int order, std::index_sequence<I...>) {
  std::tuple<A...> args(*static_cast<A*>(p[I])...);
  gridDim = grid;
  blockDim = dim3{block, 1, 1};
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      blockIdx = dim3{bx, by, 0};
      body = [&] { std::apply(k, args); };
      if (!run_block(block, order)) return false;
    }
  }
  return true;
}

template <typename... A>
Entry make_entry(const char* name, void (*k)(A...)) {
  Entry e;
  e.name = name;
  e.launch = [k](dim3 g, unsigned b, void** p, int o) {
    return launch_impl(k, g, b, p, o, std::index_sequence_for<A...>{});
  };
  e.sizes = {int(sizeof(A))...};
  return e;
}

std::vector<Entry> build_registry();  // defined by the generated translation unit

inline std::vector<Entry>& registry() {
  static std::vector<Entry> r = build_registry();
  return r;
}

}  // namespace emu

inline void __syncthreads() { emu::barrier(); }
inline void __threadfence_system() {}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v < old) *p = v;
  return old;
}
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
  const unsigned int old = *p;
  if (v > old) *p = v;
  return old;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v > old) *p = v;
  return old;
}

extern "C" {

int emu_kernel_count() { return (int)emu::registry().size(); }

const char* emu_kernel_name(int i) { return emu::registry()[i].name.c_str(); }

int emu_kernel_arg_sizes(int i, int* out, int cap) {
  const std::vector<int>& s = emu::registry()[i].sizes;
  for (int k = 0; k < (int)s.size() && k < cap; ++k) out[k] = s[k];
  return (int)s.size();
}

long long emu_barrier_count() { return emu::barriers; }

// 0 on success; otherwise a message in err.
int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned block, void** args, int nargs, int order,
               char* err, int errlen) {
  for (emu::Entry& e : emu::registry()) {
    if (e.name != name) continue;
    if ((int)e.sizes.size() != nargs) {
      std::snprintf(err, errlen, "%s takes %d arguments, got %d", name, (int)e.sizes.size(), nargs);
      return 1;
    }
    emu::error.clear();
    if (!e.launch(dim3{gx, gy, 1}, block, args, order)) {
      std::snprintf(err, errlen, "%s", emu::error.c_str());
      return 2;
    }
    return 0;
  }
  std::snprintf(err, errlen, "no kernel named %s", name);
  return 3;
}

}  // extern "C"
