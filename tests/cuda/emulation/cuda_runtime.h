// A host emulator for the CUDA kernels of csrc/cuda, so that their logic runs (and is tested) on a
// machine with no GPU. It stands in for <cuda_runtime.h> when the kernel sources are compiled as
// C++ with -DVQFAST_CUDA_EMULATION and -I tests/cuda/emulation:
//
//   g++ -std=c++17 -O1 -x c++ -DVQFAST_CUDA_EMULATION -I tests/cuda/emulation -I csrc/cuda \
//       tests/cuda/check_nearest_codeword.cu csrc/cuda/nearest_codeword.cu -o check_emulated
//
// Model. Thread blocks run one after another. The threads of a block are cooperative fibers
// (own stacks, switched by _setjmp/_longjmp) switched only at __syncthreads, at warp-collective operations (shuffles, mma) and at
// cp.async waits, so a run is deterministic. __shared__ variables are function statics: one copy per
// kernel instantiation, which is one per block since blocks never overlap.
//   - mma.sync.m16n8k8 (tf32) gathers the 32 lanes' fragments with the layouts of the PTX ISA
//     ("Matrix Fragments for mma.m16n8k8", .tf32) and computes in double.
//   - cp.async copies are queued per thread and land only when cp.async.wait_group makes them due
//     (the latest moment the hardware may complete them), so a read of a stage that was never
//     waited for sees stale data. VQFAST_EMU_CP_ASYNC=eager lands them at issue instead.
//   - A __syncthreads or warp collective that not every thread reaches is reported as a deadlock.
// Global memory is host memory (cudaMalloc is aligned_alloc). What it cannot show: timing, the
// memory model between real concurrent threads, bank conflicts; compute-sanitizer covers races on
// a GPU.
#pragma once
#ifndef VQFAST_CUDA_EMULATION
#error "tests/cuda/emulation is the host emulator: compile with -DVQFAST_CUDA_EMULATION"
#endif

// Fibers start with makecontext/setcontext and then switch with _setjmp/_longjmp, which unlike
// swapcontext make no system call; glibc's fortified longjmp would reject the switch of stacks.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline long long __double_as_longlong(double f) {
  long long u;
  std::memcpy(&u, &f, 8);
  return u;
}
inline double __longlong_as_double(long long u) {
  double f;
  std::memcpy(&f, &u, 8);
  return f;
}
// Round-to-nearest operations that nvcc never contracts into an fma; the host computes them as they
// are (x86-64 SSE arithmetic, no contraction without -mfma).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// ---- runtime API (the subset the kernels' launchers and tests/cuda use) -----------------------

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrSingleToDoublePrecisionPerfRatio = 87,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct CUstream_st*;

namespace vqfast_emu {

// Four SMs: small shapes already take the codebook-split path of the search. Shared memory per SM
// and the float32 : float64 throughput ratio as on an H100 (228 KiB, 2).
constexpr int kEmulatedSms = 4;
constexpr int kSharedPerSm = 228 * 1024;
constexpr int kSingleToDoubleRatio = 2;
constexpr int kDefaultDynamicShared = 48 * 1024;
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

}  // namespace vqfast_emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = vqfast_emu::last_error();
  vqfast_emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
  }
  return "unknown error";
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = vqfast_emu::kEmulatedSms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = vqfast_emu::kSharedPerSm; return cudaSuccess;
    case cudaDevAttrSingleToDoublePrecisionPerfRatio: *value = vqfast_emu::kSingleToDoubleRatio; return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
  *p = static_cast<T*>(std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256));
  return *p ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memcpy(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

// ---- the fiber scheduler ----------------------------------------------------------------------

namespace vqfast_emu {

struct Copy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Fiber {
  ucontext_t ctx;  // the first entry only
  jmp_buf jump;
  bool started = false;
  dim3 tid;
  unsigned linear = 0;
  bool done = false;
  bool progressed = false;  // since the scheduler last resumed it: more than re-checking a closed barrier
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> groups;  // committed, not yet landed, oldest first
};

struct Barrier {
  unsigned arrived = 0, generation = 0;
};

struct Warp {
  Barrier barrier;
  uint64_t slot[32];
  unsigned a[32][4], b[32][2];
  float c[32][4];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier barrier;
  unsigned current = 0;
  jmp_buf scheduler;
  bool live = false, progress = false;
  void (*body)(void*) = nullptr;
  void* arg = nullptr;
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline dim3& block_idx() {
  static dim3 d;
  return d;
}
inline dim3& block_dim() {
  static dim3 d;
  return d;
}
inline dim3& grid_dim() {
  static dim3 d;
  return d;
}
inline Fiber& self() { return block()->fibers[block()->current]; }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s (block %u,%u thread %u)\n", what, block_idx().x, block_idx().y,
               self().linear);
  std::abort();
}

inline void yield() {
  if (_setjmp(self().jump) == 0) _longjmp(block()->scheduler, 1);
}

// Wait until `count` threads have arrived at `bar`.
inline void arrive_and_wait(Barrier& bar, unsigned count) {
  const unsigned generation = bar.generation;
  if (++bar.arrived == count) {
    bar.arrived = 0;
    ++bar.generation;
    return;
  }
  self().progressed = true;  // the arrival itself
  do {
    yield();
  } while (bar.generation == generation);
}

inline Warp& warp() { return block()->warps[self().linear / 32]; }
inline unsigned lane() { return self().linear % 32; }
inline void warp_sync(unsigned mask) {
  if (mask != 0xffffffffu) fail("only full-warp collectives are emulated");
  if (block_dim().x * block_dim().y * block_dim().z % 32 != 0) fail("warp collective in a partial warp");
  arrive_and_wait(warp().barrier, 32);
}

inline void fiber_entry() {
  Block* b = block();
  b->body(b->arg);
  self().done = true;
  // Pending cp.async groups at exit are dropped: nothing may read them any more.
  _longjmp(b->scheduler, 1);
}

// Fiber stacks, allocated once and reused by every block (fresh zeroed stacks per block would
// spend the run in page faults).
constexpr size_t kStackBytes = 128 * 1024;
inline char* fiber_stack(unsigned i) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= i) stacks.emplace_back(new char[kStackBytes]);
  return stacks[i].get();
}

// Run `body(arg)` as every thread of one block.
inline void run_block(void (*body)(void*), void* arg) {
  const dim3 bd = block_dim();
  const unsigned threads = bd.x * bd.y * bd.z;
  Block b;
  b.body = body;
  b.arg = arg;
  b.fibers.resize(threads);
  b.warps.resize((threads + 31) / 32);
  block() = &b;
  for (unsigned i = 0; i < threads; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = fiber_stack(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  // The loop state lives in `b`, not in locals: _setjmp returns twice here.
  for (;;) {
    b.live = false;
    b.progress = false;
    for (b.current = 0; b.current < threads; ++b.current) {
      Fiber& f = b.fibers[b.current];
      if (f.done) continue;
      b.live = true;
      f.progressed = false;
      if (_setjmp(b.scheduler) == 0) {
        if (f.started) _longjmp(f.jump, 1);
        f.started = true;
        setcontext(&f.ctx);
      }
      Fiber& g = b.fibers[b.current];
      b.progress = b.progress || g.done || g.progressed;
    }
    if (!b.live) break;
    if (!b.progress) {
      b.current = 0;
      while (b.fibers[b.current].done) ++b.current;
      fail("deadlock: a barrier or warp collective that not every thread reaches");
    }
  }
  block() = nullptr;
}

template <typename F>
void trampoline(void* f) {
  (*static_cast<F*>(f))();
}

// Dynamic shared memory of the running launch, and the opt-in limit set per kernel.
inline std::vector<unsigned char>& dynamic_buffer() {
  static std::vector<unsigned char> b;
  return b;
}
inline unsigned char* dynamic_shared() {
  const uintptr_t p = reinterpret_cast<uintptr_t>(dynamic_buffer().data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t{15});
}
inline std::vector<std::pair<const void*, int>>& dynamic_limits() {
  static std::vector<std::pair<const void*, int>> limits;
  return limits;
}
inline int dynamic_limit(const void* kernel) {
  for (const auto& kv : dynamic_limits())
    if (kv.first == kernel) return kv.second;
  return kDefaultDynamicShared;
}

struct Launch {
  dim3 grid, threads;
  size_t shared = 0;
  template <typename... KArgs, typename... Args>
  void operator()(void (*kernel)(KArgs...), Args&&... args) const {
    if (threads.x * threads.y * threads.z == 0 || threads.x * threads.y * threads.z > 1024 || grid.x == 0 ||
        grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 ||
        shared > static_cast<size_t>(dynamic_limit(reinterpret_cast<const void*>(kernel)))) {
      last_error() = cudaErrorInvalidConfiguration;
      return;
    }
    // 16-byte aligned, as the hardware's; poisoned (0xff: NaN floats) before every block, so a read
    // of memory the block never wrote shows up in the results.
    dynamic_buffer().assign(shared + 16, 0xff);
    grid_dim() = grid;
    block_dim() = threads;
    auto body = [&] { kernel(static_cast<KArgs>(args)...); };
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          block_idx() = dim3(x, y, z);
          std::memset(dynamic_buffer().data(), 0xff, dynamic_buffer().size());
          run_block(trampoline<decltype(body)>, &body);
        }
  }
};

// ---- warp collectives and asynchronous copies -------------------------------------------------

template <typename T>
T shfl_xor(unsigned mask, T value, int offset) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "32- and 64-bit shuffles only");
  Warp& w = warp();
  std::memcpy(&w.slot[lane()], &value, sizeof(T));
  warp_sync(mask);
  T out;
  std::memcpy(&out, &w.slot[(lane() ^ offset) & 31], sizeof(T));
  warp_sync(mask);
  return out;
}

// One warp-wide mma.sync of shape m16n8kK: every lane deposits its fragments, `decode` rebuilds the
// A [16, K] and B [K, 8] operands from all 32 lanes' registers, and each lane computes its four C/D
// elements (c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t), c3 (g + 8, 2t + 1), g = lane >> 2,
// t = lane % 4, the same for both shapes) in double.
template <int K, typename Decode>
inline void warp_mma(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2], Decode decode) {
  Warp& w = warp();
  const unsigned me = lane();
  for (int i = 0; i < 4; ++i) w.a[me][i] = a[i], w.c[me][i] = c[i];
  for (int i = 0; i < 2; ++i) w.b[me][i] = b[i];
  warp_sync(0xffffffffu);
  double A[16][K], B[K][8];
  for (unsigned l = 0; l < 32; ++l) decode(w.a[l], w.b[l], l >> 2, l % 4, A, B);
  const unsigned g = me >> 2, t = me % 4;
  for (int i = 0; i < 4; ++i) {
    const unsigned row = g + 8 * (i / 2), col = 2 * t + (i & 1);
    double acc = w.c[me][i];
    for (int kk = 0; kk < K; ++kk) acc += A[row][kk] * B[kk][col];
    c[i] = static_cast<float>(acc);
  }
  warp_sync(0xffffffffu);
}

// PTX ISA, mma.m16n8k8 with .tf32: A: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4);
// B: b0 (k = t, n = g), b1 (t + 4, g).
inline void mma_m16n8k8_tf32(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  warp_mma<8>(c, a, b, [](const unsigned* ra, const unsigned* rb, unsigned g, unsigned t, double (&A)[16][8],
                          double (&B)[8][8]) {
    A[g][t] = __uint_as_float(ra[0]);
    A[g + 8][t] = __uint_as_float(ra[1]);
    A[g][t + 4] = __uint_as_float(ra[2]);
    A[g + 8][t + 4] = __uint_as_float(ra[3]);
    B[t][g] = __uint_as_float(rb[0]);
    B[t + 4][g] = __uint_as_float(rb[1]);
  });
}

// mma.sync.m16n8k16 with fp16 / bf16 operands, two per 32-bit register (lower index in the low half):
// PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type":
// A: a0,a1 (g, 2t + {0,1}), a2,a3 (g + 8, 2t + {0,1}), a4,a5 (g, 2t + 8 + {0,1}), a6,a7 (g + 8, 2t + 8 + {0,1});
// B: b0,b1 (k = 2t + {0,1}, n = g), b2,b3 (k = 2t + 8 + {0,1}, n = g); C/D as for m16n8k8.
// T is __half or __nv_bfloat16 (declared in this folder's cuda_fp16.h / cuda_bf16.h).
template <typename T>
inline void mma_m16n8k16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  warp_mma<16>(c, a, b, [](const unsigned* ra, const unsigned* rb, unsigned g, unsigned t, double (&A)[16][16],
                           double (&B)[16][8]) {
    // emu_float: __half2float / __bfloat162float, found by argument-dependent lookup at instantiation.
    const auto lo = [](unsigned word) { return emu_float(T{static_cast<unsigned short>(word & 0xffffu)}); };
    const auto hi = [](unsigned word) { return emu_float(T{static_cast<unsigned short>(word >> 16)}); };
    for (unsigned half = 0; half < 2; ++half) {  // registers {0, 1} hold columns 2t.., {2, 3} columns 2t + 8..
      const unsigned col = 2 * t + 8 * half;
      A[g][col] = lo(ra[2 * half]), A[g][col + 1] = hi(ra[2 * half]);
      A[g + 8][col] = lo(ra[2 * half + 1]), A[g + 8][col + 1] = hi(ra[2 * half + 1]);
      B[col][g] = lo(rb[half]), B[col + 1][g] = hi(rb[half]);
    }
  });
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 explicit mantissa bits.
inline unsigned to_tf32(float x) {
  unsigned u = __float_as_uint(x);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  return u;
}

inline bool eager_copies() {
  static const bool eager = [] {
    const char* v = std::getenv("VQFAST_EMU_CP_ASYNC");
    return v != nullptr && std::strcmp(v, "eager") == 0;
  }();
  return eager;
}

inline void land(const Copy& c) {
  std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
  std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
}

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0))
    fail("misaligned cp.async");
  const Copy c{dst, src, bytes, src_bytes};
  if (eager_copies()) {
    land(c);
  } else {
    self().open_group.push_back(c);
  }
}

inline void cp_async_commit() {
  Fiber& f = self();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

inline void cp_async_wait(int pending) {
  Fiber& f = self();
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const Copy& c : f.groups.front()) land(c);
    f.groups.erase(f.groups.begin());
  }
}

}  // namespace vqfast_emu

#define threadIdx (::vqfast_emu::self().tid)
#define blockIdx (::vqfast_emu::block_idx())
#define blockDim (::vqfast_emu::block_dim())
#define gridDim (::vqfast_emu::grid_dim())

inline void __syncthreads() {
  const dim3 bd = vqfast_emu::block_dim();
  vqfast_emu::arrive_and_wait(vqfast_emu::block()->barrier, bd.x * bd.y * bd.z);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int offset) {
  return vqfast_emu::shfl_xor(mask, value, offset);
}

// Atomics: the threads of a block only switch at barriers, collectives and cp.async waits, and blocks
// run one after another, so a plain read-modify-write is atomic here.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v > old) *p = v;
  return old;
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > vqfast_emu::kSharedPerSm - 1024)
    return cudaErrorInvalidValue;
  vqfast_emu::dynamic_limits().emplace_back(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}

// kernel<<<grid, threads, smem, stream>>>(args...) is written
// VQFAST_LAUNCH(kernel, grid, threads, smem, stream)(args...).
#define VQFAST_LAUNCH(kernel, grid, threads, smem, stream)                                          \
  [&](auto&&... launch_args) {                                                                     \
    ::vqfast_emu::Launch{dim3(grid), dim3(threads), static_cast<size_t>(smem)}(kernel, launch_args...); \
  }
