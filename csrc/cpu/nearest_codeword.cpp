// CPU nearest-codeword search: parallel over rows, exact fp32 (fp64 for fp64 inputs) distances
// computed directly as sum((z - c)^2), so there is no cancellation error and no N x K buffer.
#include "nearest_codeword.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <limits>

namespace vqfast {
namespace cpu {
namespace {

template <typename acc_t>
void search_rows(const acc_t* z, const acc_t* cb, int64_t N, int64_t K, int64_t D, int64_t* out_idx, float* out_dist) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* zi = z + i * D;
      acc_t best = std::numeric_limits<acc_t>::infinity();
      int64_t best_k = 0;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t* ck = cb + k * D;
        acc_t d = 0;
        for (int64_t j = 0; j < D; ++j) {
          const acc_t t = zi[j] - ck[j];
          d += t * t;
        }
        if (d < best) {  // strict: the lowest index wins ties, as torch.argmin does
          best = d;
          best_k = k;
        }
      }
      out_idx[i] = best_k;
      out_dist[i] = static_cast<float>(best);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword(
    const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric, c10::string_view precision) {
  TORCH_CHECK(z.dim() == 2, "vqfast::nearest_codeword: z must be 2-D [N, D], got ", z.dim(), "-D");
  TORCH_CHECK(codebook.dim() == 2, "vqfast::nearest_codeword: codebook must be 2-D [K, D], got ", codebook.dim(), "-D");
  TORCH_CHECK(z.size(1) == codebook.size(1), "vqfast::nearest_codeword: z has D=", z.size(1), " but codebook has D=",
              codebook.size(1));
  TORCH_CHECK(codebook.size(0) > 0, "vqfast::nearest_codeword: codebook is empty (K=0)");
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), "vqfast::nearest_codeword (CPU kernel): tensors must be on the CPU");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && at::isFloatingType(codebook.scalar_type()),
              "vqfast::nearest_codeword: z and codebook must be floating point");
  TORCH_CHECK(metric == "l2" || metric == "cosine", "vqfast::nearest_codeword: metric must be 'l2' or 'cosine'");
  TORCH_CHECK(precision == "exact" || precision == "fast", "vqfast::nearest_codeword: precision must be 'exact' or 'fast'");

  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const bool f64 = z.scalar_type() == at::kDouble || codebook.scalar_type() == at::kDouble;
  const auto acc = f64 ? at::kDouble : at::kFloat;
  at::Tensor zf = z.to(acc).contiguous();
  at::Tensor cf = codebook.to(acc).contiguous();
  if (metric == "cosine") {
    zf = zf / zf.norm(2, {1}, true).clamp_min(1e-12);
    cf = cf / cf.norm(2, {1}, true).clamp_min(1e-12);
  }
  at::Tensor indices = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (N > 0) {
    if (f64) {
      search_rows<double>(zf.data_ptr<double>(), cf.data_ptr<double>(), N, K, D, indices.data_ptr<int64_t>(),
                          distances.data_ptr<float>());
    } else {
      search_rows<float>(zf.data_ptr<float>(), cf.data_ptr<float>(), N, K, D, indices.data_ptr<int64_t>(),
                         distances.data_ptr<float>());
    }
  }
  at::Tensor codewords = codebook.index_select(0, indices).to(z.scalar_type());
  return {indices, codewords, distances};
}

}  // namespace cpu
}  // namespace vqfast
