// CUDA nearest-codeword search: distance tile + running top-2 argmin in one kernel, no N x K buffer.
//
// One thread block owns 64 rows of z and sweeps its share of the codebook (all of it, or one split
// when few rows leave SMs idle) in tiles of 64 codewords x 16 features (4 or 8 when D is that small,
// so D = 4 does not do 16-wide work), through a two-stage pipeline with zero fill (features past D
// read as 0). The block's z rows, all features, stay resident in
// dynamic shared memory when three blocks still fit an SM, so only codebook tiles stream; otherwise
// z tiles stream alongside.
//   fp32 operands: cp.async, 16-byte copies when D % 4 == 0 and the bases are 16-byte aligned, else
//     4-byte copies. Exact mode: fp32 FMA; fast mode: TF32 mma.m16n8k8.
//   fp16 / bf16 operands, exact mode: loaded (8 in one 16-byte load when D % 8 == 0 and aligned) and
//     stored converted to fp32, which is exact, then fp32 FMA as above.
//   fp16 / bf16 operands, fast mode: kept 16-bit in shared memory (16-byte cp.async when aligned) and
//     multiplied natively by mma.m16n8k16 with fp32 accumulation.
// No fp32 copy of z or the codebook is ever made; any D and any alignment works. Four warps split the
// 64 x 64 dot-product tile 2 x 2; every thread owns the same 32 accumulators in every mode, laid out
// as the C fragments of mma.m16n8k8 / m16n8k16 (identical), so one epilogue serves all:
//   rows warp_m*32 + mi*16 + g + 8h, codes warp_n*32 + ni*8 + 2t + c  (g = lane/4, t = lane%4).
// The epilogue ranks r(i, k) = ||c_k||^2 - 2 <z_i, c_k> (||z_i||^2 is the same for the whole row, and
// leaving it out keeps the rounding bound small when the codebook is tiny next to z) and folds the
// tile into per-row (best, index, second best) held in registers; after the sweep the 4 lanes of a
// quad and the 2 warps sharing a row merge theirs, and (unsplit search) the block writes its rows'
// codewords and their directly computed distances.
//
// Shared rows are padded (16 fp32 features to 20, 8 to 12, 4 not at all; 16-bit rows to 24
// elements; resident rows to a stride of 4, 12 or 20 words mod 32, or 4 / 12 / 20 / 28 for 16-bit):
// the 8 rows (or the 4 code
// columns 2t) one warp instruction reads then fall in distinct banks, for the mma fragments and the
// FMA loads alike.
//
// Exact mode's proof and re-rank run here too, with no host sync (binding.cpp, top): the row-norm
// passes raise the largest codeword norm and the flagged op's extremes; mark_ambiguous_kernel lists the
// rows the bound cannot prove through an atomic counter; rerank_kernel, on a grid fixed at launch,
// loops over the list up to that counter and scans the codebook with direct distances (float64, or
// compensated float32 with a float64 fallback on GPUs with a slow float64 rate).
//
// tests/cuda/check_nearest_codeword.cu checks these kernels on a GPU and, through the host emulator
// in tests/cuda/emulation (VQFAST_CUDA_EMULATION), in the CPU test suite.
#include "nearest_codeword.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../tolerance.h"

namespace vqfast {
namespace cuda {
namespace {

constexpr int kPad = 4;
constexpr int kStride = kBlockFeatures + kPad;
constexpr int kNoIndex = INT_MAX;

static_assert(kThreads == 128, "the 2 x 2 warp layout below assumes four warps");
static_assert(kBlockRows == 64 && kBlockCodes == 64, "each warp owns a 32 x 32 sub-tile");
static_assert((kBlockRows * kBlockFeatures) % kThreads == 0, "tile loads split evenly over the threads");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ double to_double(T x) {
  return static_cast<double>(to_float(x));  // float32 and 16-bit values convert exactly
}
__device__ __forceinline__ double to_double(double x) { return x; }

// The two 16-bit elements of a 32-bit word (the lower address in the low half), as fp32.
template <typename T>
__device__ __forceinline__ float4 unpack4(unsigned lo_word, unsigned hi_word) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {  // bf16 is the top half of an fp32
    return make_float4(__uint_as_float(lo_word << 16), __uint_as_float(lo_word & 0xffff0000u),
                       __uint_as_float(hi_word << 16), __uint_as_float(hi_word & 0xffff0000u));
  } else {
    return make_float4(__half2float(__ushort_as_half(static_cast<unsigned short>(lo_word & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(lo_word >> 16))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(hi_word & 0xffffu))),
                       __half2float(__ushort_as_half(static_cast<unsigned short>(hi_word >> 16))));
  }
}

#if defined(VQFAST_CUDA_EMULATION)
// Host emulation (tests/cuda/emulation/cuda_runtime.h): the same operations, carried out by the
// emulator, so the kernels' logic runs in the CPU test suite.
__device__ __forceinline__ void cp_async_f32(float* dst, const float* src, bool valid) {
  vqfast_emu::cp_async(dst, src, 4, valid ? 4 : 0);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  vqfast_emu::cp_async(dst, src, 16, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() { vqfast_emu::cp_async_commit(); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  vqfast_emu::cp_async_wait(kPending);
}
__device__ __forceinline__ unsigned to_tf32(float x) { return vqfast_emu::to_tf32(x); }
__device__ __forceinline__ unsigned char* dynamic_smem() { return vqfast_emu::dynamic_shared(); }
__device__ __forceinline__ void mma_tf32(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  vqfast_emu::mma_m16n8k8_tf32(c, a, b);
}
template <typename T>
__device__ __forceinline__ void mma_16bit(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  vqfast_emu::mma_m16n8k16<T>(c, a, b);
}
#else
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 4-byte asynchronous copy global -> shared; src_bytes = 0 writes a zero without reading.
__device__ __forceinline__ void cp_async_f32(float* dst, const float* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

// 16-byte asynchronous copy global -> shared (both 16-byte aligned); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ unsigned to_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// mma.m16n8k16 with fp16 or bf16 operands (two per register, the lower index in the low half) and
// fp32 accumulation: the products of 16-bit values are exact.
template <typename T>
__device__ __forceinline__ void mma_16bit(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// The block's dynamic shared memory (the launch's third <<<>>> argument).
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char vqfast_dynamic_smem[];
  return vqfast_dynamic_smem;
}

#define VQFAST_LAUNCH(kernel, grid, threads, smem, stream) kernel<<<grid, threads, smem, stream>>>
#endif  // VQFAST_CUDA_EMULATION

// Fold candidate (v, i, v2) into (best, index, second). Ties on value go to the lower index, and
// the loser's value becomes the second best, so an exact tie shows up as a zero top-2 gap.
__device__ __forceinline__ void merge_top2(float& best, int& index, float& second, float v, int i, float v2) {
  if (v < best || (v == best && i < index)) {
    second = fminf(best, v2);
    best = v;
    index = i;
  } else {
    second = fminf(second, v);
  }
}

// Fast mode with fp16 / bf16 operands keeps them 16-bit in shared memory for mma.m16n8k16.
constexpr int kStride16 = kBlockFeatures + 8;  // rows of 16 elements padded to 24 (48 bytes)

// Row stride (elements) of a shared fp32 tile kFeat features wide: 4, 12 or 20 words, so the 8 rows
// (or the 4 code columns 2t) one warp instruction reads fall in distinct banks, and every row starts
// 16-byte aligned.
template <int kFeat>
constexpr int feature_stride() {
  static_assert(kFeat == 4 || kFeat == 8 || kFeat == 16, "4, 8 or 16 features a stage");
  return kFeat == 4 ? 4 : kFeat + kPad;
}

// Stage one tile of a row-major [rows, d] matrix, rows [row0, row0 + 64) x features [feat0, feat0 + kFeat),
// into shared memory at dst (row stride `stride` elements), zero-filled past `rows` and `d`.
//   fp32 operands (S = float): cp.async, 16-byte copies when kVec (D % 4 == 0, 16-byte aligned
//     base; a 4-feature chunk then lies wholly inside or past D), else 4-byte copies.
//   fp16 / bf16 converted (S = float): plain loads, converted exactly and stored; one 16-byte load
//     of 8 elements per chunk when kVec (D % 8 == 0, aligned; kFeat >= 8). All loads are issued
//     before the first store.
//   fp16 / bf16 kept (S = unsigned short, the raw bits; kFeat = 16): 16-byte cp.async when kVec, else
//     2-byte loads and stores (cp.async copies 4 bytes at least).
// Every row stride is a multiple of 16 bytes, so vector destinations are aligned. Narrow tiles
// (kFeat = 4 or 8, for small D) leave some threads without a chunk.
template <typename T, typename S, bool kVec, int kFeat = kBlockFeatures>
__device__ __forceinline__ void load_tile(S* dst, int stride, const T* __restrict__ src, int64_t rows, int64_t d,
                                          int64_t row0, int64_t feat0) {
  constexpr int kPerThread = kBlockRows * kFeat / kThreads;
  static_assert(kPerThread * kThreads == kBlockRows * kFeat, "element loads split evenly over the threads");
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (kVec) {
      constexpr int kChunks = kFeat / 4;  // per row
      constexpr int kTotal = kBlockRows * kChunks;
#pragma unroll
      for (int j = 0; j < (kTotal + kThreads - 1) / kThreads; ++j) {
        const int e = threadIdx.x + j * kThreads;
        if (kTotal % kThreads == 0 || e < kTotal) {
          const int r = e / kChunks;
          const int f = (e % kChunks) * 4;
          const int64_t row = row0 + r, feat = feat0 + f;
          const bool valid = row < rows && feat < d;
          cp_async_16(dst + r * stride + f, valid ? src + row * d + feat : src, valid);
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int e = threadIdx.x + j * kThreads;
        const int r = e / kFeat;
        const int f = e % kFeat;
        const int64_t row = row0 + r, feat = feat0 + f;
        const bool valid = row < rows && feat < d;
        cp_async_f32(dst + r * stride + f, valid ? src + row * d + feat : src, valid);
      }
    }
  } else if constexpr (std::is_same_v<S, float>) {
    static_assert(sizeof(T) == 2, "16-bit inputs only");
    if constexpr (kVec) {
      static_assert(kFeat % 8 == 0, "16-byte loads hold 8 features");
      constexpr int kChunks = kFeat / 8;  // per row
      constexpr int kTotal = kBlockRows * kChunks;
      static_assert(kTotal <= kThreads, "one chunk per thread at most");
      const int e = threadIdx.x;
      if (kTotal == kThreads || e < kTotal) {
        const int r = e / kChunks;
        const int f = (e % kChunks) * 8;
        const int64_t row = row0 + r, feat = feat0 + f;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row < rows && feat < d) v = *reinterpret_cast<const uint4*>(src + row * d + feat);
        *reinterpret_cast<float4*>(dst + r * stride + f) = unpack4<T>(v.x, v.y);
        *reinterpret_cast<float4*>(dst + r * stride + f + 4) = unpack4<T>(v.z, v.w);
      }
    } else {
      float vals[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int e = threadIdx.x + j * kThreads;
        const int64_t row = row0 + e / kFeat, feat = feat0 + e % kFeat;
        vals[j] = row < rows && feat < d ? to_float(src[row * d + feat]) : 0.f;
      }
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int e = threadIdx.x + j * kThreads;
        dst[(e / kFeat) * stride + e % kFeat] = vals[j];
      }
    }
  } else {
    static_assert(sizeof(T) == 2 && sizeof(S) == 2 && kFeat == kBlockFeatures, "16-bit tiles are 16 features wide");
    const unsigned short* bits = reinterpret_cast<const unsigned short*>(src);
    if constexpr (kVec) {
      const int r = threadIdx.x / 2;
      const int f = (threadIdx.x % 2) * 8;
      const int64_t row = row0 + r, feat = feat0 + f;
      const bool valid = row < rows && feat < d;
      cp_async_16(dst + r * stride + f, valid ? bits + row * d + feat : bits, valid);
    } else {
      unsigned short vals[kPerThread];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int e = threadIdx.x + j * kThreads;
        const int64_t row = row0 + e / kFeat, feat = feat0 + e % kFeat;
        vals[j] = row < rows && feat < d ? bits[row * d + feat] : static_cast<unsigned short>(0);  // +0 in both formats
      }
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int e = threadIdx.x + j * kThreads;
        dst[(e / kFeat) * stride + e % kFeat] = vals[j];
      }
    }
  }
}

__device__ __forceinline__ unsigned load_pair(const unsigned short* p) { return *reinterpret_cast<const unsigned*>(p); }

// A shared-memory element of z back as fp32: fp32 as it is, 16-bit raw bits converted exactly.
template <typename T>
__device__ __forceinline__ float stored_to_float(float v) {
  return v;
}
template <typename T>
__device__ __forceinline__ float stored_to_float(unsigned short bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(static_cast<unsigned>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One warp, one row: copies codeword c [d] to out (skipped when out is nullptr) and returns, on every
// lane, sum_j (z_at(j) - c[j])^2 in fp32, computed directly. The search's fused epilogue and
// gather_distance_kernel both call it, so their distances are the same bits.
template <typename T, typename ZAt>
__device__ __forceinline__ float copy_and_distance(const T* __restrict__ c, T* __restrict__ out, int64_t d, int lane,
                                                   ZAt z_at) {
  float acc = 0.f;
  for (int64_t j = lane; j < d; j += 32) {
    const T cv = c[j];
    if (out != nullptr) out[j] = cv;
    const float diff = z_at(j) - to_float(cv);
    acc = fmaf(diff, diff, acc);
  }
  return warp_sum(acc);
}

// kResident: the block's 64 rows of z, all features, stay in dynamic shared memory (row stride
// z_stride elements) and only codebook tiles stream, halving the tile traffic; else z tiles stream
// alongside the codebook's.
// kFeat: features per pipeline stage, 16, or 4 / 8 for small D (z resident only), so that D = 4
// (diffusers' VQ) does not multiply 12 zero-filled features of every 16 (4x the work).
template <typename T, bool kTensor, bool kVec, bool kResident, int kFeat>
// At most 170 registers a thread: kResidentBlocks blocks of 128 threads fit one SM's 64K registers.
__global__ void __launch_bounds__(kThreads, kResidentBlocks) nearest_codeword_kernel(
    const T* __restrict__ z, const T* __restrict__ codebook, const float* __restrict__ code_sqnorm, int64_t n,
    int64_t k, int64_t d, int64_t* __restrict__ best_index, float* __restrict__ best_dist,
    float* __restrict__ second_dist, int64_t tiles_per_split, bool partial, int z_stride, T* __restrict__ codewords,
    float* __restrict__ distances) {
  // Native 16-bit tensor-core path: fast mode with fp16 / bf16 operands.
  constexpr bool kNative16 = kTensor && sizeof(T) == 2;
  using S = std::conditional_t<kNative16, unsigned short, float>;
  static_assert(kFeat == kBlockFeatures || (kResident && !kNative16), "narrow stages: fp32 tiles, z resident");
  static_assert(!kTensor || kFeat >= 8, "one m16n8k8 step needs 8 features");
  constexpr int kStrideS = kNative16 ? kStride16 : feature_stride<kFeat>();
  __shared__ __align__(16) S as[kResident ? 1 : 2][kResident ? 1 : kBlockRows][kStrideS];
  __shared__ __align__(16) S bs[2][kBlockCodes][kStrideS];
  S* const zres = kResident ? reinterpret_cast<S*>(dynamic_smem()) : nullptr;
  __shared__ float red_best[kBlockRows];
  __shared__ float red_second[kBlockRows];
  __shared__ int red_index[kBlockRows];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warp_m = warp / 2;
  const int warp_n = warp % 2;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;

  // Per owned row r = mi*2 + h (row warp_m*32 + mi*16 + g + 8h): its running top-2.
  float best[4], second[4];
  int index[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    best[r] = __int_as_float(0x7f800000);  // +inf
    second[r] = __int_as_float(0x7f800000);
    index[r] = kNoIndex;
  }

  float acc[2][4][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

  // This block's share of the codebook: code tiles [tile0, tile0 + code_tiles) of split blockIdx.y.
  const int64_t feat_tiles = (d + kFeat - 1) / kFeat;
  const int64_t tile0 = static_cast<int64_t>(blockIdx.y) * tiles_per_split;
  const int64_t code_tiles = min((k + kBlockCodes - 1) / kBlockCodes - tile0, tiles_per_split);
  const int64_t steps = feat_tiles * code_tiles;  // one flat pipeline over (code tile, feature tile)

  // The first 16 features of row r (block-local) of the z tile that stage `b`, feature tile ft, reads.
  const auto zrow = [&](int b, int64_t ft, int r) -> const S* {
    if constexpr (kResident) {
      return zres + r * z_stride + ft * kFeat;
    } else {
      return &as[b][r][0];
    }
  };
  if constexpr (kResident) {
    for (int64_t ft = 0; ft < feat_tiles; ++ft)
      load_tile<T, S, kVec, kFeat>(zres + ft * kFeat, z_stride, z, n, d, row0, ft * kFeat);
  } else {
    load_tile<T, S, kVec, kFeat>(&as[0][0][0], kStrideS, z, n, d, row0, 0);
  }
  load_tile<T, S, kVec, kFeat>(&bs[0][0][0], kStrideS, codebook, k, d, tile0 * kBlockCodes, 0);
  cp_async_commit();

  for (int64_t s = 0; s < steps; ++s) {
    const int buf = static_cast<int>(s & 1);
    if (s + 1 < steps) {
      const int64_t ct = tile0 + (s + 1) / feat_tiles, ft = (s + 1) % feat_tiles;
      if constexpr (!kResident) load_tile<T, S, kVec, kFeat>(&as[buf ^ 1][0][0], kStrideS, z, n, d, row0, ft * kFeat);
      load_tile<T, S, kVec, kFeat>(&bs[buf ^ 1][0][0], kStrideS, codebook, k, d, ct * kBlockCodes, ft * kFeat);
    }
    cp_async_commit();  // an empty group on the last step keeps wait_group<1> meaning "stage s landed"
    cp_async_wait<1>();
    __syncthreads();
    const int64_t ft_now = s % feat_tiles;

    if constexpr (kNative16) {
      // One m16n8k16 step covers the 16 features of the stage (PTX fragment layouts: A rows g / g+8,
      // columns 2t, 2t+1 and 2t+8, 2t+9; B columns k = 2t, 2t+1 and 2t+8, 2t+9 of code g).
      static_assert(kBlockFeatures == 16, "one k16 step per stage");
      unsigned a[2][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const int r = warp_m * 32 + mi * 16 + g;
        const S* z0 = zrow(buf, ft_now, r);
        const S* z8 = zrow(buf, ft_now, r + 8);
        a[mi][0] = load_pair(z0 + 2 * t);
        a[mi][1] = load_pair(z8 + 2 * t);
        a[mi][2] = load_pair(z0 + 2 * t + 8);
        a[mi][3] = load_pair(z8 + 2 * t + 8);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int c = warp_n * 32 + ni * 8 + g;
        b[ni][0] = load_pair(&bs[buf][c][2 * t]);
        b[ni][1] = load_pair(&bs[buf][c][2 * t + 8]);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16bit<T>(acc[mi][ni], a[mi], b[ni]);
    } else if constexpr (kTensor) {
#pragma unroll
      for (int kk = 0; kk < kFeat; kk += 8) {
        unsigned a[2][4], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int r = warp_m * 32 + mi * 16 + g;
          const S* z0 = zrow(buf, ft_now, r);
          const S* z8 = zrow(buf, ft_now, r + 8);
          a[mi][0] = to_tf32(z0[kk + t]);
          a[mi][1] = to_tf32(z8[kk + t]);
          a[mi][2] = to_tf32(z0[kk + t + 4]);
          a[mi][3] = to_tf32(z8[kk + t + 4]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int c = warp_n * 32 + ni * 8 + g;
          b[ni][0] = to_tf32(bs[buf][c][kk + t]);
          b[ni][1] = to_tf32(bs[buf][c][kk + t + 4]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_tf32(acc[mi][ni], a[mi], b[ni]);
      }
    } else {
      // Plain fp32 FMA in feature order: recursive summation, so the bound gamma_{D+3} of
      // vqfast/reference.py holds for the expanded distance. Unrolling all 16 features held
      // 208 registers on sm_80, unrolling by 4 holds 160 (168 on sm_90), no spills either way.
#pragma unroll 4
      for (int kk = 0; kk < kFeat; ++kk) {
        float a[2][2], b[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) a[mi][h] = zrow(buf, ft_now, warp_m * 32 + mi * 16 + g + 8 * h)[kk];
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int c = 0; c < 2; ++c) b[ni][c] = bs[buf][warp_n * 32 + ni * 8 + 2 * t + c][kk];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mi][ni][c] = fmaf(a[mi][c / 2], b[ni][c % 2], acc[mi][ni][c]);
      }
    }

    if (s % feat_tiles == feat_tiles - 1) {
      // Epilogue of one code tile: norms in, top-2 update, accumulators reset. Codes are visited
      // in ascending order per thread, so a strict '<' keeps the lowest index on ties.
      const int64_t code0 = (tile0 + s / feat_tiles) * kBlockCodes;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t code = code0 + warp_n * 32 + ni * 8 + 2 * t + c;
          if (code < k) {
            const float cn = code_sqnorm[code];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int r = mi * 2 + h;
                const float dist = cn - 2.f * acc[mi][ni][h * 2 + c];
                if (dist < best[r]) {
                  second[r] = best[r];
                  best[r] = dist;
                  index[r] = static_cast<int>(code);
                } else {
                  second[r] = fminf(second[r], dist);
                }
              }
            }
          }
        }
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;
    }
    __syncthreads();  // stage `buf` is refilled by the next iteration's prefetch
  }

  // Merge across the quad (lanes 4g..4g+3 share rows), then across the two warps sharing a row.
#pragma unroll
  for (int r = 0; r < 4; ++r) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best[r], off);
      const float os = __shfl_xor_sync(0xffffffffu, second[r], off);
      const int oi = __shfl_xor_sync(0xffffffffu, index[r], off);
      merge_top2(best[r], index[r], second[r], ob, oi, os);
    }
  }
  if (warp_n == 1 && t == 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int lr = warp_m * 32 + (r / 2) * 16 + g + 8 * (r % 2);
      red_best[lr] = best[r];
      red_second[lr] = second[r];
      red_index[lr] = index[r];
    }
  }
  __syncthreads();
  if (warp_n == 0 && t == 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int lr = warp_m * 32 + (r / 2) * 16 + g + 8 * (r % 2);
      merge_top2(best[r], index[r], second[r], red_best[lr], red_index[lr], red_second[lr]);
      const int64_t row = row0 + lr;
      if (row < n && partial) {
        // One split of several: the raw top-2 goes to the workspace [splits, N] for merge_splits_kernel.
        const int64_t at = static_cast<int64_t>(blockIdx.y) * n + row;
        best_index[at] = index[r];
        best_dist[at] = best[r];
        second_dist[at] = second[r];
      } else if (row < n) {
        // No finite or infinite value ever compared below +inf (all NaN): report code 0 with a NaN
        // distance, which the exact path re-ranks.
        best_index[row] = index[r] == kNoIndex ? 0 : index[r];
        best_dist[row] = index[r] == kNoIndex ? __int_as_float(0x7fc00000) : best[r];
        if (second_dist != nullptr) second_dist[row] = second[r];
      }
      red_index[lr] = index[r] == kNoIndex ? 0 : index[r];  // for the epilogue below
    }
  }
  if (partial || codewords == nullptr) return;  // uniform over the block

  // Fused epilogue (unsplit search): each warp copies the chosen codewords of its rows and computes
  // their distances as gather_distance_kernel does, reading z from shared memory when it is resident:
  // z is read from global memory once in all.
  __syncthreads();
  for (int lr = warp; lr < kBlockRows; lr += kThreads / 32) {
    const int64_t row = row0 + lr;
    if (row >= n) break;  // uniform over the warp
    const float dist = copy_and_distance(codebook + static_cast<int64_t>(red_index[lr]) * d, codewords + row * d, d,
                                         lane, [&](int64_t j) {
                                           if constexpr (kResident) {
                                             return stored_to_float<T>(zres[lr * z_stride + j]);
                                           } else {
                                             return to_float(z[row * d + j]);
                                           }
                                         });
    if (lane == 0) distances[row] = dist;
  }
}

// Fold the per-split top-2 of every row (splits ascending, so ties keep the lowest index) and write
// the outputs as the single-split kernel does.
__global__ void __launch_bounds__(256) merge_splits_kernel(const int64_t* __restrict__ ws_index,
                                                           const float* __restrict__ ws_best,
                                                           const float* __restrict__ ws_second, int64_t n, int splits,
                                                           int64_t* __restrict__ best_index,
                                                           float* __restrict__ best_dist,
                                                           float* __restrict__ second_dist) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n) return;
  float best = __int_as_float(0x7f800000), second = __int_as_float(0x7f800000);
  int index = kNoIndex;
  for (int s = 0; s < splits; ++s) {
    const int64_t at = static_cast<int64_t>(s) * n + row;
    merge_top2(best, index, second, ws_best[at], static_cast<int>(ws_index[at]), ws_second[at]);
  }
  best_index[row] = index == kNoIndex ? 0 : index;
  best_dist[row] = index == kNoIndex ? __int_as_float(0x7fc00000) : best;
  if (second_dist != nullptr) second_dist[row] = second;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

namespace {

// The current device's SM count and shared memory per SM, read once per device (0 where the query
// fails: the callers then fall back to the plain launch). Devices past kMaxDevices are read each time.
struct DeviceShape {
  int sms = 0, shared_per_sm = 0;
};
constexpr int kMaxDevices = 64;

DeviceShape current_device_shape() {
  static std::atomic<int> cached_sms[kMaxDevices];
  static std::atomic<int> cached_shared[kMaxDevices];
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return {};
  }
  if (device >= 0 && device < kMaxDevices && cached_sms[device].load(std::memory_order_relaxed) > 0) {
    return {cached_sms[device].load(std::memory_order_relaxed), cached_shared[device].load(std::memory_order_relaxed)};
  }
  DeviceShape shape;
  if (cudaDeviceGetAttribute(&shape.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&shape.shared_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) !=
          cudaSuccess) {
    cudaGetLastError();  // a failed query is not the caller's error
    return {};
  }
  if (device >= 0 && device < kMaxDevices && shape.sms > 0) {
    cached_shared[device].store(shape.shared_per_sm, std::memory_order_relaxed);
    cached_sms[device].store(shape.sms, std::memory_order_relaxed);
  }
  return shape;
}

}  // namespace

int choose_code_splits(int64_t n, int64_t k) {
  const int sms = current_device_shape().sms;
  if (n <= 0 || k <= 0 || sms <= 0) return 1;  // nothing to split, or the device could not be read
  const int64_t row_blocks = ceil_div(n, kBlockRows);
  const int64_t target_blocks = int64_t{kResidentBlocks} * sms;
  if (row_blocks >= target_blocks) return 1;
  int64_t splits = ceil_div(target_blocks, row_blocks);
  splits = std::min(splits, ceil_div(ceil_div(k, kBlockCodes), kMinTilesPerSplit));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(splits, kMaxSplits)));
}

size_t split_workspace_bytes(int64_t n, int splits) {
  if (splits <= 1 || n <= 0) return 0;
  return static_cast<size_t>(splits) * static_cast<size_t>(n) * (sizeof(int64_t) + 2 * sizeof(float));
}

namespace {

// The resident-z variant only where kResidentBlocks blocks still fit one SM's shared memory (1 KiB a
// block is reserved by the system), so it never lowers the occupancy the registers allow.
size_t max_resident_bytes(size_t elem) {
  const int per_sm = current_device_shape().shared_per_sm;
  if (per_sm <= 0) return 0;  // unknown: stream z
  const size_t static_bytes = 2 * kBlockCodes * (elem == 2 ? kStride16 : kStride) * elem + kBlockRows * 12;
  const size_t per_block = static_cast<size_t>(per_sm) / kResidentBlocks;
  return per_block > static_bytes + 1024 ? per_block - static_bytes - 1024 : 0;
}

template <typename T>
auto pick_kernel(bool tf32, bool vec, bool resident) {
  using Kernel = decltype(&nearest_codeword_kernel<T, true, true, true, kBlockFeatures>);
  static const Kernel table[2][2][2] = {
      {{nearest_codeword_kernel<T, false, false, false, 16>, nearest_codeword_kernel<T, false, false, true, 16>},
       {nearest_codeword_kernel<T, false, true, false, 16>, nearest_codeword_kernel<T, false, true, true, 16>}},
      {{nearest_codeword_kernel<T, true, false, false, 16>, nearest_codeword_kernel<T, true, false, true, 16>},
       {nearest_codeword_kernel<T, true, true, false, 16>, nearest_codeword_kernel<T, true, true, true, 16>}}};
  return table[tf32][vec][resident];
}

// Stage width for D features: 4 or 8 when D fits (fp32 tiles with z resident: exact mode any dtype,
// fast mode fp32, whose TF32 mma takes 8 features a step), else 16.
template <typename T>
int stage_features(int64_t d, bool tf32, bool resident) {
  if (!resident || (tf32 && sizeof(T) == 2)) return kBlockFeatures;
  if (d <= 4 && !tf32) return 4;
  return d <= 8 ? 8 : kBlockFeatures;
}

// The resident kernels with narrow stages; 16-byte loads hold 4 fp32 or 8 16-bit features, so a
// 4-feature stage of 16-bit elements loads them one by one.
template <typename T>
auto pick_narrow_kernel(bool tf32, bool vec, int feat) {
  using Kernel = decltype(&nearest_codeword_kernel<T, true, true, true, kBlockFeatures>);
  constexpr bool kVec4 = sizeof(T) == 4;
  constexpr int kTensorFeat = sizeof(T) == 4 ? 8 : kBlockFeatures;  // 16-bit fast mode: never narrow
  static const Kernel four[2] = {nearest_codeword_kernel<T, false, false, true, 4>,
                                 nearest_codeword_kernel<T, false, kVec4, true, 4>};
  static const Kernel eight[2][2] = {
      {nearest_codeword_kernel<T, false, false, true, 8>, nearest_codeword_kernel<T, false, true, true, 8>},
      {nearest_codeword_kernel<T, true, false, true, kTensorFeat>, nearest_codeword_kernel<T, true, true, true, kTensorFeat>}};
  return feat == 4 ? four[vec] : eight[tf32][vec];
}

// Resident-z launches above the default 48 KiB of dynamic shared memory need the kernel's opt-in.
// It is a driver call, made once per kernel and device, for the largest allotment any resident launch
// there can ask (max_resident_bytes), not at every launch. Devices past kMaxDevices opt in each time.
template <typename T>
cudaError_t allow_resident_smem(bool tf32, bool vec, size_t elem) {
  static std::atomic<bool> opted[2][2][kMaxDevices];  // [tf32][vec][device], resident variants only
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) return cudaGetLastError();
  std::atomic<bool>* done = device >= 0 && device < kMaxDevices ? &opted[tf32][vec][device] : nullptr;
  if (done != nullptr && done->load(std::memory_order_acquire)) return cudaSuccess;
  const cudaError_t status = cudaFuncSetAttribute(pick_kernel<T>(tf32, vec, true),
                                                  cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  static_cast<int>(max_resident_bytes(elem)));
  if (status == cudaSuccess && done != nullptr) done->store(true, std::memory_order_release);
  return status;
}

template <typename T>
cudaError_t launch_search(const T* z, const T* codebook, const float* code_sqnorm, int64_t n, int64_t k, int64_t d,
                          Mode mode, int64_t* best_index, float* best_dist, float* second_dist, T* codewords,
                          float* distances, int splits, void* workspace, cudaStream_t stream, bool* fused) {
  *fused = false;
  const int64_t blocks = ceil_div(n, kBlockRows);
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  // Even shares of whole code tiles; rounding can leave fewer splits than asked (never an empty one).
  const int64_t code_tiles = ceil_div(k, kBlockCodes);
  const int64_t tiles_per_split = ceil_div(code_tiles, splits);
  const int used = static_cast<int>(ceil_div(code_tiles, tiles_per_split));
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(used));
  // Vector loads: 16 bytes = 16 / sizeof(T) features must divide D, and both bases be 16-byte aligned.
  const bool vec = d % (16 / sizeof(T)) == 0 && reinterpret_cast<uintptr_t>(z) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(codebook) % 16 == 0;
  const bool tf32 = mode == Mode::kFastTensor;
  // Resident z: the block's rows, all features, padded so fragment loads stay conflict-free (row
  // strides of 4 or 20 words mod 32 for fp32, 4/12/20/28 for 16-bit elements).
  const bool native16 = tf32 && sizeof(T) == 2;
  const size_t elem = native16 ? 2 : 4;
  const int64_t wide_stride = ceil_div(d, kBlockFeatures) * kBlockFeatures + (native16 ? 8 : 4);
  const bool resident = static_cast<size_t>(kBlockRows) * static_cast<size_t>(wide_stride) * elem <=
                        max_resident_bytes(elem);
  // Small D: stages of 4 or 8 features (then z's resident stride is 4 or 12 words).
  const int feat = stage_features<T>(d, tf32, resident);
  const int64_t z_stride = feat == 4 ? 4 : feat == 8 ? 12 : wide_stride;
  const size_t smem = resident ? static_cast<size_t>(kBlockRows) * static_cast<size_t>(z_stride) * elem : 0;
  auto kernel = feat == kBlockFeatures ? pick_kernel<T>(tf32, vec, resident) : pick_narrow_kernel<T>(tf32, vec, feat);
  if (smem > 48 * 1024) {  // beyond the default dynamic shared memory limit: opt in (once; 16-feature stages only)
    const cudaError_t status = allow_resident_smem<T>(tf32, vec, elem);
    if (status != cudaSuccess) return status;
  }
  const int zs = static_cast<int>(z_stride);
  if (used == 1) {
    VQFAST_LAUNCH(kernel, grid, kThreads, smem, stream)(z, codebook, code_sqnorm, n, k, d, best_index, best_dist,
                                                        second_dist, tiles_per_split, false, zs, codewords,
                                                        distances);
    *fused = codewords != nullptr;
    return cudaGetLastError();
  }
  // Workspace [used, N] of indices, best and second distances (split_workspace_bytes(n, splits)).
  int64_t* ws_index = static_cast<int64_t*>(workspace);
  float* ws_best = reinterpret_cast<float*>(ws_index + static_cast<int64_t>(used) * n);
  float* ws_second = ws_best + static_cast<int64_t>(used) * n;
  VQFAST_LAUNCH(kernel, grid, kThreads, smem, stream)(z, codebook, code_sqnorm, n, k, d, ws_index, ws_best,
                                                      ws_second, tiles_per_split, true, zs, nullptr, nullptr);
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  constexpr int kMergeThreads = 256;
  VQFAST_LAUNCH(merge_splits_kernel, static_cast<unsigned>(ceil_div(n, kMergeThreads)), kMergeThreads, 0, stream)(
      ws_index, ws_best, ws_second, n, used, best_index, best_dist, second_dist);
  return cudaGetLastError();
}

// Rows per block of the row kernels below: one warp per row.
constexpr int kRowWarps = 8;

// |v| as the bits of a float64: in unsigned order NaN > +inf > every finite magnitude (fabs clears
// the sign, NaN's included), so an integer atomicMax over them is a float max that keeps NaN and Inf.
__device__ __forceinline__ unsigned long long magnitude_bits(double v) {
  return static_cast<unsigned long long>(__double_as_longlong(fabs(v)));
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Raise *target (float64 bits) to the block's largest v; every thread of the block calls it. One
// atomic a block at most, and none once the target already holds as much (read first): a pass over
// N rows does not queue N atomics on one address.
template <int kWarps>
__device__ __forceinline__ void block_max_into(unsigned long long v, double* target) {
  __shared__ unsigned long long part[kWarps];
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) v = part[w] > v ? part[w] : v;
    unsigned long long* bits = reinterpret_cast<unsigned long long*>(target);
    if (v > *static_cast<volatile unsigned long long*>(bits)) atomicMax(bits, v);
  }
}

// out[i] = sum_j x[i, j]^2 in fp32. Any summation order keeps the error within the gamma_{D+3}
// budget of the ranking bound. The same pass raises *max_abs to the largest |x| (the flagged op's
// value test) and *max_out to the largest norm (cmax of the exact mode's tolerance) when given.
// Launch bounds of 8 blocks an SM (32 registers a thread, no spills on sm_80 / sm_90): with the fused
// maxima fp32 took 36 on sm_80 without them, which cut it from 64 resident warps to 48.
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32, 8) row_sqnorms_kernel(const T* __restrict__ x, int64_t rows, int64_t d,
                                                                     float* __restrict__ out, double* max_abs,
                                                                     double* max_out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  float acc = 0.f;
  unsigned top = 0;  // float32 magnitude bits: the same order (NaN > +inf > finite), half the registers
  if (row < rows) {  // no early return: the block-wide maxima below need every thread
    const T* xr = x + row * d;
    for (int64_t j = lane; j < d; j += 32) {
      const float v = to_float(xr[j]);
      acc = fmaf(v, v, acc);
      if (max_abs != nullptr) top = max(top, __float_as_uint(fabsf(v)));
    }
    acc = warp_sum(acc);
    if (lane == 0) out[row] = acc;
  }
  if (max_abs != nullptr) block_max_into<kRowWarps>(magnitude_bits(__uint_as_float(top)), max_abs);  // uniform
  if (max_out != nullptr) {
    __syncthreads();  // the shared partials are reused
    block_max_into<kRowWarps>(row < rows && lane == 0 ? magnitude_bits(acc) : 0ull, max_out);
  }
}

// *max_abs raised to max |x| over count values, for the operands the search does not read as given.
constexpr int kMaxAbsThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kMaxAbsThreads) max_abs_kernel(const T* __restrict__ x, int64_t count,
                                                                 double* max_abs) {
  unsigned long long top = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kMaxAbsThreads + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * kMaxAbsThreads) {
    const unsigned long long b = magnitude_bits(to_double(x[i]));
    top = b > top ? b : top;
  }
  block_max_into<kMaxAbsThreads / 32>(top, max_abs);
}

// Exact mode's proof, on the device: rows whose top-2 gap is not beyond the ranking tolerance (the
// float64 arithmetic of vqfast/reference.py's rerank_unproven, operation by operation, no fma) go to
// the list; NaN and infinite values fail the comparison.
constexpr int kMarkThreads = 256;
__global__ void __launch_bounds__(kMarkThreads) mark_ambiguous_kernel(
    const float* __restrict__ best_dist, const float* __restrict__ second_dist, const float* __restrict__ z_sqnorm,
    const double* __restrict__ code_sqnorm_max, int64_t n, double coef, double floor_term, int64_t* __restrict__ list,
    unsigned long long* count) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kMarkThreads + threadIdx.x;
  if (row >= n) return;
  // cmax = sqrt of the largest float32 norm, in float32 (reference.py: codebook.float().norm(dim=1).max()).
  const double cmax = static_cast<double>(sqrtf(static_cast<float>(*code_sqnorm_max)));
  const double znorm = sqrt(static_cast<double>(z_sqnorm[row]));
  const double tol = __dadd_rn(__dmul_rn(__dmul_rn(coef, cmax), __dadd_rn(__dmul_rn(2.0, znorm), cmax)), floor_term);
  const bool proven = static_cast<double>(second_dist[row]) > __dadd_rn(static_cast<double>(best_dist[row]), tol);
  if (!proven) {
    const unsigned long long slot = atomicAdd(count, 1ull);
    if (slot < static_cast<unsigned long long>(n)) list[slot] = row;  // each row once: never past n
  }
}

// ---- the exact re-rank -------------------------------------------------------------------------

// One warp, one row: the lowest index at the minimum over all K codewords of sum_j (z_j - c_j)^2 in
// float64, features in order, each product and sum rounded on its own (no fma: the oracle's sums
// bit for bit). Lanes take codewords lane, lane + 32, ... in ascending order; a NaN distance is never
// below the running best, so it ranks as +inf, and a row with nothing below +inf takes codeword 0.
template <typename T>
__device__ int64_t scan_float64(const T* __restrict__ zr, const T* __restrict__ codebook, int64_t k, int64_t d,
                                int lane) {
  double best = __longlong_as_double(0x7ff0000000000000ll);  // +inf
  int64_t index = 0;
  for (int64_t c = lane; c < k; c += 32) {
    const T* cr = codebook + c * d;
    double acc = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const double t = to_double(zr[j]) - to_double(cr[j]);
      acc = __dadd_rn(acc, __dmul_rn(t, t));
    }
    if (acc < best) best = acc, index = c;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const double ob = __shfl_xor_sync(0xffffffffu, best, off);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, index, off);
    if (ob < best || (ob == best && oi < index)) best = ob, index = oi;
  }
  return index;
}

// Double-float arithmetic: a value hi + lo with |lo| <= ulp(hi) / 2. The _rn intrinsics keep nvcc
// from contracting a product and a sum into one fma, which would break the error-free transforms.
struct DoubleFloat {
  float hi, lo;
};

// a + b = s + e exactly (Knuth's TwoSum; exact under underflow too).
__device__ __forceinline__ DoubleFloat two_sum(float a, float b) {
  const float s = __fadd_rn(a, b);
  const float bb = __fsub_rn(s, a);
  return {s, __fadd_rn(__fsub_rn(a, __fsub_rn(s, bb)), __fsub_rn(b, bb))};
}

// a + b = s + e exactly when |a| >= |b| (Dekker's FastTwoSum).
__device__ __forceinline__ DoubleFloat fast_two_sum(float a, float b) {
  const float s = __fadd_rn(a, b);
  return {s, __fsub_rn(b, __fsub_rn(s, a))};
}

// (x - y)^2 as a double-float, x and y float32: x - y = s + e exactly (TwoSum), s^2 = p + q exactly
// (fma), then p + fl(2 s e + q); the error, with e^2 left out, is at most 4 u^2 (x - y)^2, u = 2^-24.
__device__ __forceinline__ DoubleFloat square_difference(float x, float y) {
  const DoubleFloat diff = two_sum(x, -y);
  const float p = __fmul_rn(diff.hi, diff.hi);
  const float q = fmaf(diff.hi, diff.hi, -p);
  return fast_two_sum(p, fmaf(2.f * diff.hi, diff.lo, q));
}

// a + b with relative error at most 3 u^2 (Joldes, Muller, Popescu 2017, AccurateDWPlusDW).
__device__ __forceinline__ DoubleFloat add(DoubleFloat a, DoubleFloat b) {
  const DoubleFloat s = two_sum(a.hi, b.hi);
  const DoubleFloat t = two_sum(a.lo, b.lo);
  const DoubleFloat v = fast_two_sum(s.hi, __fadd_rn(s.lo, t.hi));
  return fast_two_sum(v.hi, __fadd_rn(t.lo, v.lo));
}

__device__ __forceinline__ bool less(DoubleFloat a, DoubleFloat b) {
  return a.hi < b.hi || (a.hi == b.hi && a.lo < b.lo);
}

// One warp, one row, float32 / 16-bit operands: the best and second-best codewords by the
// double-float distance. Each distance v of true value t is within E(t) = (3D + 8) u^2 t + (D + 1) 2^-140
// (each term 4 u^2, each of the D additions 3 u^2, underflowed products a few 2^-150 each), so when
// second - best > E(second) + E(best) (slack 1.01 for the bound taken at computed values and this test's
// own float64 rounding) the best is the unique true minimum and *index is written. Otherwise (exact
// ties, copies, NaN, Inf or a float32 overflow anywhere) it returns false and the caller scans in float64.
template <typename T>
__device__ bool scan_compensated(const T* __restrict__ zr, const T* __restrict__ codebook, int64_t k, int64_t d,
                                 int lane, int64_t* index) {
  const float inf = __int_as_float(0x7f800000);
  DoubleFloat best{inf, 0.f}, second{inf, 0.f};
  int64_t at = 0;
  int bad = 0;
  for (int64_t c = lane; c < k; c += 32) {
    const T* cr = codebook + c * d;
    DoubleFloat acc{0.f, 0.f};
    for (int64_t j = 0; j < d; ++j) acc = add(acc, square_difference(to_float(zr[j]), to_float(cr[j])));
    if (!(fabsf(acc.hi) <= 3.402823466e38f)) bad = 1;
    if (less(acc, best)) {
      second = best;
      best = acc;
      at = c;
    } else if (less(acc, second)) {
      second = acc;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const DoubleFloat ob{__shfl_xor_sync(0xffffffffu, best.hi, off), __shfl_xor_sync(0xffffffffu, best.lo, off)};
    const DoubleFloat os{__shfl_xor_sync(0xffffffffu, second.hi, off), __shfl_xor_sync(0xffffffffu, second.lo, off)};
    const int64_t oat = __shfl_xor_sync(0xffffffffu, at, off);
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
    if (less(ob, best) || (!less(best, ob) && oat < at)) {
      second = less(best, os) ? best : os;
      best = ob;
      at = oat;
    } else if (less(ob, second)) {
      second = ob;
    }
  }
  const double dims = static_cast<double>(d);
  const double rel = 1.01 * (3.0 * dims + 8.0) * 0x1p-48;
  const double abs_room = 1.01 * (dims + 1.0) * 0x1p-140;
  const double b = static_cast<double>(best.hi) + static_cast<double>(best.lo);
  const double s = static_cast<double>(second.hi) + static_cast<double>(second.lo);
  // second = +inf only when no second codeword exists (K = 1): computed infinities set `bad`.
  const bool decided = !bad && (second.hi == inf || (s - b) > rel * (s + b) + 2.0 * abs_room + 0x1p-50 * (s + b));
  if (decided) *index = at;
  return decided;  // uniform over the warp: every lane holds the merged values
}

// The re-rank: a grid fixed at launch, each warp looping over the entries the device counter holds.
constexpr int kRerankBlocksPerSm = 8;
template <typename T, bool kCompensated>
__global__ void __launch_bounds__(kRowWarps * 32) rerank_kernel(
    const T* __restrict__ z, const T* __restrict__ codebook, int64_t n, int64_t k, int64_t d,
    const int64_t* __restrict__ list, const unsigned long long* __restrict__ count, int64_t* __restrict__ best_index,
    T* __restrict__ codewords, float* __restrict__ distances) {
  const int lane = threadIdx.x % 32;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kRowWarps;
  const int64_t entries = list == nullptr ? n : static_cast<int64_t>(min(*count, static_cast<unsigned long long>(n)));
  for (int64_t e = first; e < entries; e += stride) {
    const int64_t row = list == nullptr ? e : list[e];
    const T* zr = z + row * d;
    int64_t index = 0;
    bool decided = false;
    if constexpr (kCompensated) decided = scan_compensated(zr, codebook, k, d, lane, &index);
    if (!decided) index = scan_float64(zr, codebook, k, d, lane);
    if (lane == 0) best_index[row] = index;
    if constexpr (!std::is_same_v<T, double>) {
      if (codewords != nullptr) {
        const float dist = copy_and_distance(codebook + index * d, codewords + row * d, d, lane,
                                             [&](int64_t j) { return to_float(zr[j]); });
        if (lane == 0) distances[row] = dist;
      }
    }
  }
}

// codewords[i, :] = codebook[indices[i], :] (when codewords != nullptr) and
// distances[i] = sum_j (z[i, j] - codebook[indices[i], j])^2 in fp32, computed directly.
template <typename T>
__global__ void __launch_bounds__(kRowWarps * 32) gather_distance_kernel(
    const T* __restrict__ z, const T* __restrict__ codebook, const int64_t* __restrict__ indices, int64_t n,
    int64_t d, T* __restrict__ codewords, float* __restrict__ distances) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / 32;
  if (row >= n) return;
  const int lane = threadIdx.x % 32;
  const T* zr = z + row * d;
  const float dist = copy_and_distance(codebook + indices[row] * d, codewords == nullptr ? nullptr : codewords + row * d,
                                       d, lane, [&](int64_t j) { return to_float(zr[j]); });
  if (lane == 0) distances[row] = dist;
}

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(ceil_div(rows, kRowWarps)); }

}  // namespace

cudaError_t launch_nearest_codeword(const void* z, const void* codebook, DType dtype, const float* code_sqnorm,
                                    int64_t n, int64_t k, int64_t d, Mode mode, int64_t* best_index,
                                    float* best_dist, float* second_dist, void* codewords, float* distances,
                                    int splits, void* workspace, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (k <= 0 || k > INT_MAX - kBlockCodes || d <= 0 || splits < 1 || splits > kMaxSplits) return cudaErrorInvalidValue;
  if ((splits > 1 && workspace == nullptr) || ((codewords == nullptr) != (distances == nullptr)))
    return cudaErrorInvalidValue;
  bool fused = false;
  const cudaError_t status = dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_search<T>(static_cast<const T*>(z), static_cast<const T*>(codebook), code_sqnorm, n, k, d, mode,
                            best_index, best_dist, second_dist, static_cast<T*>(codewords), distances, splits,
                            workspace, stream, &fused);
  });
  if (status != cudaSuccess || codewords == nullptr || fused) return status;
  // A split search merged its indices in a separate kernel: gather after it.
  return launch_gather_distance(z, codebook, dtype, best_index, n, d, codewords, distances, stream);
}

cudaError_t launch_row_sqnorms(const void* x, DType dtype, int64_t rows, int64_t d, float* out, double* max_abs,
                               double* max_out, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (d <= 0 || ceil_div(rows, kRowWarps) > INT_MAX) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    VQFAST_LAUNCH(row_sqnorms_kernel<T>, row_blocks(rows), kRowWarps * 32, 0, stream)(static_cast<const T*>(x), rows, d,
                                                                                  out, max_abs, max_out);
    return cudaGetLastError();
  });
}

cudaError_t launch_max_abs(const void* x, DType dtype, int64_t count, double* max_abs, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  // Each thread folds 8 values or more: a few thousand blocks at most, one atomic each at most.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(count, kMaxAbsThreads * 8), 4096));
  const auto run = [&](auto tag) {
    using T = decltype(tag);
    VQFAST_LAUNCH(max_abs_kernel<T>, blocks, kMaxAbsThreads, 0, stream)(static_cast<const T*>(x), count, max_abs);
    return cudaGetLastError();
  };
  if (dtype == DType::kFloat64) return run(double{});
  return dispatch_dtype(dtype, run);
}

cudaError_t launch_mark_ambiguous(const float* best_dist, const float* second_dist, const float* z_sqnorm,
                                  const double* code_sqnorm_max, int64_t n, int64_t d, int64_t* list,
                                  unsigned long long* count, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (d <= 0 || ceil_div(n, kMarkThreads) > INT_MAX) return cudaErrorInvalidValue;
  VQFAST_LAUNCH(mark_ambiguous_kernel, static_cast<unsigned>(ceil_div(n, kMarkThreads)), kMarkThreads, 0, stream)(
      best_dist, second_dist, z_sqnorm, code_sqnorm_max, n, ranking_tolerance_coef<float>(d),
      ranking_tolerance_floor<float>(d), list, count);
  return cudaGetLastError();
}

cudaError_t launch_rerank(const void* z, const void* codebook, DType dtype, int64_t n, int64_t k, int64_t d,
                          const int64_t* list, const unsigned long long* count, Rerank kind, int64_t* best_index,
                          void* codewords, float* distances, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (k <= 0 || d <= 0 || (list == nullptr) != (count == nullptr) || ((codewords == nullptr) != (distances == nullptr)))
    return cudaErrorInvalidValue;
  // A fixed grid: enough warps to fill the GPU (or one per row when fewer), whatever the count turns
  // out to be on the device; the warps loop over the entries.
  const int sms = current_device_shape().sms;
  const int64_t cap = sms > 0 ? int64_t{kRerankBlocksPerSm} * sms : 65535;
  const unsigned blocks = static_cast<unsigned>(std::min(ceil_div(n, kRowWarps), cap));
  const bool compensated = kind == Rerank::kCompensated;
  const auto run = [&](auto tag, auto comp) {
    using T = decltype(tag);
    const auto kernel = rerank_kernel<T, decltype(comp)::value>;
    VQFAST_LAUNCH(kernel, blocks, kRowWarps * 32, 0, stream)(
        static_cast<const T*>(z), static_cast<const T*>(codebook), n, k, d, list, count, best_index,
        static_cast<T*>(codewords), distances);
    return cudaGetLastError();
  };
  if (dtype == DType::kFloat64) {  // float64 operands: the float64 scan (nothing to compensate)
    if (codewords != nullptr) return cudaErrorInvalidValue;
    return run(double{}, std::false_type{});
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    return compensated ? run(tag, std::true_type{}) : run(tag, std::false_type{});
  });
}

Rerank choose_rerank() {
  const char* forced = std::getenv("VQFAST_CUDA_RERANK");
  if (forced != nullptr && std::strcmp(forced, "float64") == 0) return Rerank::kFloat64;
  if (forced != nullptr && std::strcmp(forced, "compensated") == 0) return Rerank::kCompensated;
  static std::atomic<int> cached[kMaxDevices];  // ratio + 1; 0: not read yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return Rerank::kFloat64;
  }
  int ratio = device >= 0 && device < kMaxDevices ? cached[device].load(std::memory_order_relaxed) - 1 : -1;
  if (ratio < 0) {
    if (cudaDeviceGetAttribute(&ratio, cudaDevAttrSingleToDoublePrecisionPerfRatio, device) != cudaSuccess) {
      cudaGetLastError();  // unknown: float64, which is right on every GPU, only slower on some
      return Rerank::kFloat64;
    }
    if (device >= 0 && device < kMaxDevices) cached[device].store(ratio + 1, std::memory_order_relaxed);
  }
  return ratio >= kCompensatedRatio ? Rerank::kCompensated : Rerank::kFloat64;
}

cudaError_t launch_gather_distance(const void* z, const void* codebook, DType dtype, const int64_t* indices,
                                   int64_t n, int64_t d, void* codewords, float* distances, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  if (d <= 0 || ceil_div(n, kRowWarps) > INT_MAX) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    VQFAST_LAUNCH(gather_distance_kernel<T>, row_blocks(n), kRowWarps * 32, 0, stream)(
        static_cast<const T*>(z), static_cast<const T*>(codebook), indices, n, d, static_cast<T*>(codewords),
        distances);
    return cudaGetLastError();
  });
}

// setup.py passes the list as bare tokens (-DVQFAST_CUDA_ARCHS=sm_80:sm_90:compute_90): a quoted
// string would not survive the shell that ninja runs nvcc from, so it is stringified here.
#define VQFAST_STRINGIFY_(x) #x
#define VQFAST_STRINGIFY(x) VQFAST_STRINGIFY_(x)
const char* compiled_archs() {
#ifdef VQFAST_CUDA_ARCHS
  return VQFAST_STRINGIFY(VQFAST_CUDA_ARCHS);
#else
  return "";
#endif
}

}  // namespace cuda
}  // namespace vqfast
