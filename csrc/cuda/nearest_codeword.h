// Launcher API of the CUDA nearest-codeword kernels (csrc/cuda/nearest_codeword.cu).
//
// Plain C++: no torch headers, so the .cu file compiles with nvcc alone and binding.cpp does the
// torch side (checks, dtype conversion, cosine normalisation, exact re-ranking, outputs).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace vqfast {
namespace cuda {

// Rows of z and codewords per thread block, and features per pipeline stage.
constexpr int kBlockRows = 64;
constexpr int kBlockCodes = 64;
constexpr int kBlockFeatures = 16;
constexpr int kThreads = 128;

// Small N: when the row blocks cannot fill the GPU the codebook is split across blockIdx.y, up to
// kSplitBlocksPerSm blocks per SM in all, each split sweeping at least kMinTilesPerSplit code tiles;
// a second kernel merges the per-split top-2 of every row.
constexpr int kSplitBlocksPerSm = 2;
constexpr int kMinTilesPerSplit = 4;
constexpr int kMaxSplits = 4096;

enum class Mode : int {
  // fp32 FMA on the CUDA cores: each distance has the rigorous error bound of vqfast/reference.py,
  // so the binding can prove most rows exact from the top-2 gap and re-rank the rest.
  kExactFma = 0,
  // TF32 mma.sync (m16n8k8) with fp32 accumulation, no re-ranking: A100 peaks at 156 TFLOP/s in
  // TF32 against 19.5 in fp32 FMA.
  kFastTf32 = 1,
};

// For every row i of z [N, D] (fp32, row-major, contiguous) against codebook [K, D] (same layout):
//   d(i, k)       = z_sqnorm[i] + code_sqnorm[k] - 2 * <z_i, c_k>   (computed, fp32)
//   best_index[i] = argmin_k d(i, k), the lowest k on equal computed values
//   best_dist[i]  = d(i, best_index[i])
//   second_dist[i]= min over k != best_index[i] of d(i, k)  (+inf when K == 1; may be nullptr)
// Every split computes each distance exactly as the unsplit kernel does, so the outputs do not depend
// on `splits` (1 to kMaxSplits; `workspace` holds split_workspace_bytes(n, splits) device bytes when
// splits > 1, else may be nullptr).
// Launched on `stream`; returns the launch status (cudaGetLastError right after each launch).
cudaError_t launch_nearest_codeword(const float* z, const float* codebook, const float* z_sqnorm,
                                    const float* code_sqnorm, int64_t n, int64_t k, int64_t d, Mode mode,
                                    int64_t* best_index, float* best_dist, float* second_dist, int splits,
                                    void* workspace, cudaStream_t stream);

// The number of codebook splits for n rows and k codewords on the current device (1 when the row
// blocks alone fill it, or when the device cannot be queried).
int choose_code_splits(int64_t n, int64_t k);

// Device bytes of the workspace launch_nearest_codeword needs for `splits` (0 when splits <= 1).
size_t split_workspace_bytes(int64_t n, int splits);

}  // namespace cuda
}  // namespace vqfast
