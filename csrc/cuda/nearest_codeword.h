// Launcher API of the CUDA nearest-codeword kernels (csrc/cuda/nearest_codeword.cu).
//
// Plain C++: no torch headers, so the .cu file compiles with nvcc alone and binding.cpp does the
// torch side (checks, allocation, mixed-dtype staging and cosine normalisation). Every launcher only
// enqueues work on `stream`: none of them waits for the device or copies anything to the host.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace vqfast {
namespace cuda {

// Rows of z and codewords per thread block, and features per pipeline stage (4 or 8 instead when D is
// that small and z is resident: nearest_codeword.cu, stage_features).
constexpr int kBlockRows = 64;
constexpr int kBlockCodes = 64;
constexpr int kBlockFeatures = 16;
constexpr int kThreads = 128;

// Thread blocks of the search kernel resident on one SM (its launch bounds).
constexpr int kResidentBlocks = 3;

// Small N: when the row blocks cannot fill the GPU the codebook is split across blockIdx.y, up to
// kResidentBlocks blocks per SM in all, each split sweeping at least kMinTilesPerSplit code tiles;
// a second kernel merges the per-split top-2 of every row.
constexpr int kMinTilesPerSplit = 4;
constexpr int kMaxSplits = 4096;

enum class Mode : int {
  // fp32 FMA on the CUDA cores: each distance has the rigorous error bound of vqfast/reference.py,
  // so the binding can prove most rows exact from the top-2 gap and re-rank the rest.
  kExactFma = 0,
  // Tensor cores with fp32 accumulation, no re-ranking: TF32 mma.sync (m16n8k8) for fp32 operands,
  // native mma.sync m16n8k16 for fp16 / bf16 (exact products). H100 SXM peaks at about 495 TFLOP/s
  // in TF32 and 990 in bf16 (dense) against 67 in fp32 FMA.
  kFastTensor = 1,
};

// Element type of z and the codebook (both the same). Every kernel accumulates in fp32; fp16 / bf16
// elements are converted exactly as they are loaded, except in fast mode, where the tensor cores
// take them as they are. kFloat64 only reaches launch_rerank and launch_max_abs.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// How launch_rerank computes its direct distances sum_j (z_j - c_j)^2.
enum class Rerank : int {
  // In float64, features in order (as vqfast/testing/oracle.py sums them).
  kFloat64 = 0,
  // In compensated float32 (double-float: TwoSum / TwoProd with fma, an accurate double-float sum),
  // within (3D + 8) 2^-48 of each distance; a row whose best two codewords that bound cannot order
  // (ties, duplicates, non-finite values, distances beyond float32) is scanned again in float64. For
  // GPUs whose float64 rate is 1/32 of float32 or less (consumer and L40-class cards: 1/64).
  kCompensated = 1,
};

// For every row i of z [N, D] against codebook [K, D] (dtype `dtype`, row-major, contiguous):
//   r(i, k)       = code_sqnorm[k] - 2 * <z_i, c_k>   (computed, fp32; the distance less ||z_i||^2)
//   best_index[i] = argmin_k r(i, k), the lowest k on equal computed values
//   best_dist[i]  = r(i, best_index[i])
//   second_dist[i]= min over k != best_index[i] of r(i, k)  (+inf when K == 1; may be nullptr)
// In exact mode (fp32 FMA in feature order) each r is within gamma_{D+3} max||c|| (2 ||z_i|| +
// max||c||) of its exact value, so a top-2 gap above twice that proves the row (vqfast/reference.py).
// With codewords [N, D] (dtype `dtype`) and distances [N] (both or neither): codewords[i] =
// codebook[best_index[i]] and distances[i] = sum_j (z[i, j] - codewords[i, j])^2 in fp32, computed
// directly, exactly as launch_gather_distance computes them (the same bits); the unsplit search does
// it in its own epilogue, reading z from shared memory when resident.
// Every split computes each distance exactly as the unsplit kernel does, so the outputs do not depend
// on `splits` (1 to kMaxSplits; `workspace` holds split_workspace_bytes(n, splits) device bytes when
// splits > 1, else may be nullptr).
// Launched on `stream`; returns the launch status (cudaGetLastError right after each launch).
cudaError_t launch_nearest_codeword(const void* z, const void* codebook, DType dtype, const float* code_sqnorm,
                                    int64_t n, int64_t k, int64_t d, Mode mode, int64_t* best_index,
                                    float* best_dist, float* second_dist, void* codewords, float* distances,
                                    int splits, void* workspace, cudaStream_t stream);

// out[i] = sum_j x[i, j]^2 in fp32 for x [rows, d] (contiguous). In the same pass, when not nullptr
// (each a float64 the caller set to +0 before):
//   max_abs: raised to max_ij |x[i, j]| (NaN when a NaN was read, else +inf when an Inf was);
//   max_out: raised to max_i out[i] (NaN when one is NaN).
cudaError_t launch_row_sqnorms(const void* x, DType dtype, int64_t rows, int64_t d, float* out, double* max_abs,
                               double* max_out, cudaStream_t stream);

// *max_abs raised to max |x| over `count` values (rules of launch_row_sqnorms' max_abs), any DType:
// for operands the search does not read as given (cosine, float64).
cudaError_t launch_max_abs(const void* x, DType dtype, int64_t count, double* max_abs, cudaStream_t stream);

// Exact mode without the host: appends to list (capacity n; *count set to 0 before) every row i whose
// search result the ranking bound cannot prove (vqfast/reference.py, rerank_unproven):
//   !(second_dist[i] > best_dist[i] + tol_i) in float64,  tol_i = coef cmax (2 ||z_i|| + cmax) + floor,
// coef and floor from csrc/tolerance.h for float32 and D = d, cmax = sqrt(*code_sqnorm_max) rounded to
// float32 (launch_row_sqnorms' max_out over the codebook), ||z_i|| = sqrt(z_sqnorm[i]) in float64. NaN
// and infinite values fail the comparison and are listed. Order of the entries: unspecified.
cudaError_t launch_mark_ambiguous(const float* best_dist, const float* second_dist, const float* z_sqnorm,
                                  const double* code_sqnorm_max, int64_t n, int64_t d, int64_t* list,
                                  unsigned long long* count, cudaStream_t stream);

// The exact re-rank of the rows list[0 .. min(*count, n)) (every row 0 .. n when list is nullptr), on a
// grid fixed at launch whose warps loop over the entries the device counter holds (no host read):
// best_index[row] = the lowest index at the minimum over all K codewords of the direct distance
// sum_j (z_j - c_j)^2, a NaN distance counting as +inf (vqfast/reference.py), so a row with NaN takes
// codeword 0. With codewords and distances (both or neither; dtype float32 / 16-bit only) the row's
// codeword and fp32 distance are written again as launch_gather_distance writes them.
cudaError_t launch_rerank(const void* z, const void* codebook, DType dtype, int64_t n, int64_t k, int64_t d,
                          const int64_t* list, const unsigned long long* count, Rerank kind, int64_t* best_index,
                          void* codewords, float* distances, cudaStream_t stream);

// The re-rank variant for the current device: kCompensated when its float32 : float64 throughput ratio
// (cudaDevAttrSingleToDoublePrecisionPerfRatio) is kCompensatedRatio or more, else kFloat64; read once
// per device. VQFAST_CUDA_RERANK=float64 / compensated forces one (GPU validation of both).
constexpr int kCompensatedRatio = 32;
Rerank choose_rerank();

// A gather after the search, one pass over z: codewords[i, :] = codebook[indices[i], :] (skipped
// when codewords is nullptr) and distances[i] = sum_j (z[i, j] - codebook[indices[i], j])^2 in fp32,
// computed directly (no cancellation). indices must lie in [0, K).
cudaError_t launch_gather_distance(const void* z, const void* codebook, DType dtype, const int64_t* indices,
                                   int64_t n, int64_t d, void* codewords, float* distances, cudaStream_t stream);

// The number of codebook splits for n rows and k codewords on the current device (1 when the row
// blocks alone fill it, or when the device cannot be queried).
int choose_code_splits(int64_t n, int64_t k);

// Device bytes of the workspace launch_nearest_codeword needs for `splits` (0 when splits <= 1).
size_t split_workspace_bytes(int64_t n, int splits);

// The nvcc targets this library was compiled for, as setup.py listed them, separated by ':'
// ("sm_80:sm_90:compute_90"); empty when the build did not say (a bare nvcc compile).
const char* compiled_archs();

}  // namespace cuda
}  // namespace vqfast
