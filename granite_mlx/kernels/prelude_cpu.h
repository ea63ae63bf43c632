// C++20 prelude that runs the shared kernel bodies (*_body.h) on the CPU, so
// the exact text the GPUs compile is executed and tested without a GPU.
// emulate.py pastes it in front of a generated kernel function and main().
//
// Model: threadgroups run one after another. Each thread of a group is a
// fiber (ucontext) on one OS thread; GK_BARRIER and GK_SIMD_SUM switch back to
// a scheduler that runs every other thread up to its own barrier, then
// releases the group (or one simdgroup) once all of it has arrived. So
// barriers, threadgroup memory and simd reductions behave as on a GPU, runs
// are deterministic, and a thread that skips a barrier some other thread waits
// at is reported as a deadlock at once.
// To make mistakes visible rather than lucky: threadgroup memory and outputs
// start as NaN; threads run in forward order in even threadgroups and reverse
// order in odd ones, so reading another thread's shared write without a
// barrier in between sees NaN in one of the two; threadgroup memory is capped
// at Metal's 32 KiB.

// macOS only exposes the (deprecated, working) ucontext calls under X/Open.
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 600
#endif
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

// C headers only: this is compiled once per kernel variant in the tests, and
// the C++ library headers would triple the compile time.
namespace gk_emu {

constexpr int kSimd = 32;
constexpr std::size_t kSharedBytes = 32 * 1024;
constexpr std::size_t kStackBytes = 256 * 1024;

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "gk_emu: %s\n", what);
  std::exit(2);
}

// bfloat16 storage: the top 16 bits of a float32.
struct bf16 {
  std::uint16_t bits;
};

enum class Wait { none, group, simd, done };

struct Thread {
  int tid = 0;
  int gx = 0, gy = 0, gz = 0;
  std::size_t shared_used = 0;
  Wait wait = Wait::none;
  ucontext_t context;
  char* stack = nullptr;
};

struct Scheduler {
  ucontext_t main;
  Thread* threads = nullptr;
  int n_threads = 0;
  float* slots = nullptr;  // one per thread, for simd reductions
  int current = 0;
  void (*call)(void*) = nullptr;  // the kernel launch, type-erased
  void* arg = nullptr;
  alignas(16) unsigned char shared[kSharedBytes];
};

inline Scheduler* sched = nullptr;  // the emulation runs on one OS thread

inline Thread& ctx() { return sched->threads[sched->current]; }

inline void yield(Wait why) {
  Thread& t = ctx();
  t.wait = why;
  swapcontext(&t.context, &sched->main);
}

// Every thread of a group declares the same arrays in the same order, so the
// same offsets hand every thread the same memory.
template <typename T>
T* shared_alloc(int count) {
  Thread& t = ctx();
  const std::size_t offset = (t.shared_used + 15) & ~std::size_t(15);
  const std::size_t end = offset + sizeof(T) * std::size_t(count);
  if (end > kSharedBytes) {
    fail("threadgroup memory over 32 KiB");
  }
  t.shared_used = end;
  return reinterpret_cast<T*>(sched->shared + offset);
}

inline void barrier() { yield(Wait::group); }

inline float simd_sum(float v) {
  const int first = (ctx().tid / kSimd) * kSimd;
  sched->slots[ctx().tid] = v;
  yield(Wait::simd);
  float total = 0.0f;
  for (int i = 0; i < kSimd; ++i) {
    total += sched->slots[first + i];
  }
  yield(Wait::simd);  // nobody overwrites a slot still being read
  return total;
}

inline void fiber_main() {
  sched->call(sched->arg);
  ctx().wait = Wait::done;
}  // returns to uc_link, the scheduler

// Run every thread until it blocks or ends, then release whatever barrier all
// its participants have reached; fail if none can be released.
inline void run_group(bool reverse) {
  const int n = sched->n_threads;
  Thread* threads = sched->threads;
  for (;;) {
    for (int k = 0; k < n; ++k) {
      const int i = reverse ? n - 1 - k : k;
      while (threads[i].wait == Wait::none) {
        sched->current = i;
        swapcontext(&sched->main, &threads[i].context);
      }
    }
    int done = 0, at_group = 0;
    for (int i = 0; i < n; ++i) {
      done += threads[i].wait == Wait::done;
      at_group += threads[i].wait == Wait::group;
    }
    if (done == n) {
      return;
    }
    if (at_group == n) {
      for (int i = 0; i < n; ++i) {
        threads[i].wait = Wait::none;
      }
      continue;
    }
    bool released = false;
    for (int first = 0; first < n; first += kSimd) {
      int at_simd = 0;
      for (int i = first; i < first + kSimd; ++i) {
        at_simd += threads[i].wait == Wait::simd;
      }
      if (at_simd == kSimd) {
        for (int i = first; i < first + kSimd; ++i) {
          threads[i].wait = Wait::none;
        }
        released = true;
      }
    }
    if (!released) {
      std::fprintf(stderr, "gk_emu: deadlock: %d of %d threads ended, %d wait at a "
                   "threadgroup barrier, the rest at a simd reduction\n", done, n, at_group);
      std::exit(3);
    }
  }
}

// grid and threadgroup in threads, as mx.fast.*_kernel take them.
template <class Body>
void launch(const int grid[3], const int threadgroup[3], Body body) {
  const int tx = threadgroup[0];
  if (threadgroup[1] != 1 || threadgroup[2] != 1) {
    fail("only 1-D threadgroups are emulated");
  }
  if (tx <= 0 || tx % kSimd != 0) {
    fail("threadgroup size must be a multiple of 32");
  }
  if (grid[0] % tx != 0) {
    fail("grid.x must be a multiple of the threadgroup size");
  }
  Scheduler* s = new Scheduler;
  s->threads = new Thread[tx];
  s->n_threads = tx;
  s->slots = new float[tx];
  s->call = [](void* b) { (*static_cast<Body*>(b))(); };
  s->arg = &body;
  for (int tid = 0; tid < tx; ++tid) {
    s->threads[tid].stack = new char[kStackBytes];
  }
  sched = s;
  int index = 0;
  for (int z = 0; z < grid[2]; ++z) {
    for (int y = 0; y < grid[1]; ++y) {
      for (int x = 0; x < grid[0] / tx; ++x, ++index) {
        std::memset(s->shared, 0xff, kSharedBytes);  // NaN
        for (int tid = 0; tid < tx; ++tid) {
          Thread& t = s->threads[tid];
          t.tid = tid;
          t.gx = x, t.gy = y, t.gz = z;
          t.shared_used = 0;
          t.wait = Wait::none;
          getcontext(&t.context);
          t.context.uc_stack.ss_sp = t.stack;
          t.context.uc_stack.ss_size = kStackBytes;
          t.context.uc_link = &s->main;
          makecontext(&t.context, fiber_main, 0);
        }
        run_group(index % 2 == 1);
      }
    }
  }
  sched = nullptr;
  for (int tid = 0; tid < tx; ++tid) {
    delete[] s->threads[tid].stack;
  }
  delete[] s->threads;
  delete[] s->slots;
  delete s;
}

// main()'s buffers: <dir>/<kind><i>.bin read whole; outputs written back to
// <dir>/out<i>.bin.
struct Buffer {
  unsigned char* data;
  std::size_t bytes;
};

inline Buffer read_buffer(const char* dir, const char* kind, int i) {
  char path[4096];
  std::snprintf(path, sizeof(path), "%s/%s%d.bin", dir, kind, i);
  std::FILE* f = std::fopen(path, "rb");
  if (!f) {
    fail("cannot open a buffer file");
  }
  std::fseek(f, 0, SEEK_END);
  const long size = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  Buffer b{static_cast<unsigned char*>(std::malloc(size > 0 ? size : 1)), std::size_t(size)};
  if (std::fread(b.data, 1, b.bytes, f) != b.bytes) {
    fail("short read on a buffer file");
  }
  std::fclose(f);
  return b;
}

inline void write_buffer(const char* dir, int i, const Buffer& b) {
  char path[4096];
  std::snprintf(path, sizeof(path), "%s/out%d.bin", dir, i);
  std::FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(b.data, 1, b.bytes, f) != b.bytes || std::fclose(f) != 0) {
    fail("cannot write an output file");
  }
}

}  // namespace gk_emu

using gk_bf16 = gk_emu::bf16;

#define GK_SIMD 32
#define GK_SHARED(type, name, count) type* name = gk_emu::shared_alloc<type>(count)
#define GK_BARRIER() gk_emu::barrier()
#define GK_SIMD_SUM(v) gk_emu::simd_sum(v)

inline float gk_f(float v) { return v; }
inline float gk_f(_Float16 v) { return static_cast<float>(v); }
inline float gk_f(gk_bf16 v) {
  const std::uint32_t bits = std::uint32_t(v.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline float gk_exp(float v) { return std::exp(v); }
inline float gk_log1p(float v) { return std::log1p(v); }
inline float gk_fmin(float a, float b) { return std::fmin(a, b); }
inline float gk_fmax(float a, float b) { return std::fmax(a, b); }

// gk-entry-begin
const int gk_tid = gk_emu::ctx().tid;
const int gk_group_x = gk_emu::ctx().gx;
const int gk_group_y = gk_emu::ctx().gy;
const int gk_group_z = gk_emu::ctx().gz;
// gk-entry-end
