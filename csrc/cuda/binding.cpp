// Torch side of the CUDA backend: input checks, the kernel launches on the current stream (row
// norms, then the search with its codeword + distance epilogue), and exact re-ranking of the rows
// the search cannot prove. fp32 / fp16 / bf16 operands of one dtype reach the kernels as they are; mixed dtypes and
// the cosine metric are staged once in fp32.
//
// Exact precision. The kernel ranks ||c||^2 - 2 z.c in fp32 FMA, off by at most gamma_{D+3} max||c||
// (2 ||z|| + max||c||) (vqfast/reference.py, ranking_tolerance), so a row whose second-best value
// exceeds the best by more than twice that, plus an underflow allowance, is provably right (the terms
// come from csrc/tolerance.h, checked against the Python definition). The few rows that are not
// (near ties, exact duplicates, non-finite values) are searched again here in float64: expansion,
// candidates within the float64 bound, direct sum((z - c)^2).
//
// Cosine and zero vectors (reference.cosine_zero_rows): a zero row of z takes the first zero codeword
// (distance 0), else codeword 0 with distance exactly 1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <limits>
#include <string>
#include <tuple>

#include "../tolerance.h"
#include "nearest_codeword.h"

namespace vqfast {
namespace cuda {
namespace {

// Rows x codewords of one float64 re-ranking block: 2^22 elements (32 MiB), as in reference.py.
constexpr int64_t kRerankElements = int64_t{1} << 22;

// metric="cosine": the all-zero rows of z, the codeword they take and its distance (see the top).
struct ZeroRows {
  at::Tensor rows;      // [N] bool
  at::Tensor index;     // [] int64: the first zero codeword, or 0
  at::Tensor distance;  // [] float32: 0 at a zero codeword, else 1
};

ZeroRows cosine_zero_rows(const at::Tensor& z, const at::Tensor& codebook) {
  const at::Tensor zero_codes = codebook.eq(0).all(1);
  const at::Tensor index = zero_codes.to(at::kInt).argmax();  // the first true; 0 when there is none
  const at::Tensor distance = zero_codes.index_select(0, index.reshape({1})).logical_not().to(at::kFloat).squeeze(0);
  return {z.eq(0).all(1), index, distance};
}

at::Tensor normalize_for_metric(const at::Tensor& x, bool cosine) {
  return cosine ? x / x.norm(2, {1}, /*keepdim=*/true).clamp_min(1e-12) : x;
}

// Float64 nearest codeword of every row of zs [M, D] in cb64 [K, D] (lowest index on exact ties).
at::Tensor search_fp64(const at::Tensor& zs, const at::Tensor& cb64) {
  const int64_t m = zs.size(0), k = cb64.size(0);
  const at::Tensor cb_sqnorm = (cb64 * cb64).sum(1);
  const at::Tensor cb_maxnorm = cb_sqnorm.max().sqrt();
  // The bound of the full distance (this expansion keeps ||z||^2): coef (||z|| + max||c||)^2.
  const double coef = ranking_tolerance_coef<double>(zs.size(1));
  at::Tensor out = at::empty({m}, zs.options().dtype(at::kLong));
  const int64_t step = std::max<int64_t>(1, kRerankElements / k);
  for (int64_t start = 0; start < m; start += step) {
    const int64_t end = std::min(m, start + step);
    const at::Tensor zc = zs.slice(0, start, end).to(at::kDouble);
    const int64_t rows_here = end - start;
    const at::Tensor z_sqnorm = (zc * zc).sum(1, /*keepdim=*/true);
    const at::Tensor dist = (z_sqnorm + cb_sqnorm) - 2.0 * at::matmul(zc, cb64.t());
    const at::Tensor best = dist.argmin(1);
    const at::Tensor limit = dist.gather(1, best.unsqueeze(1)) + coef * (z_sqnorm.sqrt() + cb_maxnorm).pow(2);
    // A non-finite bound (overflowing magnitudes) makes every codeword a candidate for that row.
    const at::Tensor cand = dist.le(limit).logical_or(limit.isfinite().logical_not());
    const at::Tensor nz = cand.nonzero();  // row-major: columns ascend within each row
    if (nz.size(0) == rows_here) {
      out.slice(0, start, end).copy_(best);
      continue;
    }
    const at::Tensor rows = nz.select(1, 0), cols = nz.select(1, 1);
    const at::Tensor exact = (zc.index_select(0, rows) - cb64.index_select(0, cols)).pow(2).sum(1);
    at::Tensor row_min = at::full({rows_here}, std::numeric_limits<double>::infinity(), zc.options());
    row_min.scatter_reduce_(0, rows, exact, "amin");
    const at::Tensor at_min = exact.eq(row_min.index_select(0, rows));
    at::Tensor first = at::full({rows_here}, k, out.options());
    first.scatter_reduce_(0, rows, at::where(at_min, cols, at::full_like(cols, k)), "amin");
    // A row with NaN distances has no minimum; it takes codeword 0, as the kernel does.
    out.slice(0, start, end).copy_(at::where(first.eq(k), at::zeros_like(first), first));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword(const at::Tensor& z, const at::Tensor& codebook,
                                                                c10::string_view metric,
                                                                c10::string_view precision) {
  TORCH_CHECK(z.dim() == 2, "vqfast::nearest_codeword: z must be 2-D [N, D], got ", z.dim(), "-D");
  TORCH_CHECK(codebook.dim() == 2, "vqfast::nearest_codeword: codebook must be 2-D [K, D], got ", codebook.dim(),
              "-D");
  TORCH_CHECK(z.size(1) == codebook.size(1), "vqfast::nearest_codeword: z has D=", z.size(1),
              " but codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) > 0, "vqfast::nearest_codeword: codebook is empty (K=0)");
  TORCH_CHECK(z.size(1) > 0, "vqfast::nearest_codeword: vectors have no features (D=0)");
  TORCH_CHECK(z.is_cuda() && codebook.is_cuda(), "vqfast::nearest_codeword (CUDA kernel): z and codebook must be CUDA tensors");
  TORCH_CHECK(z.device() == codebook.device(), "vqfast::nearest_codeword: z is on ", z.device(), " but codebook is on ",
              codebook.device());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && at::isFloatingType(codebook.scalar_type()),
              "vqfast::nearest_codeword: z and codebook must be floating point");
  TORCH_CHECK(metric == "l2" || metric == "cosine", "vqfast::nearest_codeword: metric must be 'l2' or 'cosine'");
  TORCH_CHECK(precision == "exact" || precision == "fast",
              "vqfast::nearest_codeword: precision must be 'exact' or 'fast'");
  // The kernel keeps codeword indices in int32 and pads K to a multiple of kBlockCodes.
  TORCH_CHECK(codebook.size(0) <= INT_MAX - kBlockCodes, "vqfast::nearest_codeword (CUDA kernel): K=",
              codebook.size(0), " exceeds ", INT_MAX - kBlockCodes, " codewords");

  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), k = codebook.size(0), d = z.size(1);
  const bool cosine = metric == "cosine";
  const bool exact = precision == "exact";
  const bool f64 = z.scalar_type() == at::kDouble || codebook.scalar_type() == at::kDouble;

  if (f64) {
    // float64 has no kernel here (GPUs run it at 1/2 to 1/64 of fp32): the float64 reference
    // algorithm in ATen ops, chunked, gives the same contract.
    const at::Tensor zf = normalize_for_metric(z.to(at::kDouble), cosine).contiguous();
    const at::Tensor cf = normalize_for_metric(codebook.to(at::kDouble), cosine).contiguous();
    at::Tensor indices = search_fp64(zf, cf);
    at::Tensor distances;
    if (cosine) {
      const ZeroRows zero = cosine_zero_rows(z, codebook);
      indices = at::where(zero.rows, zero.index, indices);
      distances = at::where(zero.rows, zero.distance, (zf - cf.index_select(0, indices)).pow(2).sum(1).to(at::kFloat));
    } else {
      distances = (zf - cf.index_select(0, indices)).pow(2).sum(1).to(at::kFloat);
    }
    at::Tensor codewords = codebook.index_select(0, indices).to(z.scalar_type());
    return {indices, codewords, distances};
  }

  // The kernels read fp32, fp16 and bf16 directly. Mixed dtypes, other float types and the cosine
  // metric (normalised vectors) go through one fp32 copy of each operand.
  const auto kernel_dtype = [](at::ScalarType t) -> int {
    switch (t) {
      case at::kFloat: return static_cast<int>(DType::kFloat32);
      case at::kHalf: return static_cast<int>(DType::kFloat16);
      case at::kBFloat16: return static_cast<int>(DType::kBFloat16);
      default: return -1;
    }
  };
  const bool direct = !cosine && z.scalar_type() == codebook.scalar_type() && kernel_dtype(z.scalar_type()) >= 0;
  const at::Tensor zs = direct ? z.contiguous() : normalize_for_metric(z.to(at::kFloat), cosine).contiguous();
  const at::Tensor cs = direct ? codebook.contiguous() : normalize_for_metric(codebook.to(at::kFloat), cosine).contiguous();
  const DType dtype = static_cast<DType>(kernel_dtype(zs.scalar_type()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  const auto check = [&](cudaError_t status, const char* what) {
    TORCH_CHECK(status == cudaSuccess, "vqfast::nearest_codeword: CUDA ", what, " kernel failed to launch (N=", n,
                ", K=", k, ", D=", d, "): ", cudaGetErrorString(status));
  };

  // Codeword norms enter the ranked value; the norms of z only the exact mode's tolerance, below.
  const at::Tensor code_sqnorm = at::empty({k}, z.options().dtype(at::kFloat));
  check(launch_row_sqnorms(cs.data_ptr(), dtype, k, d, code_sqnorm.data_ptr<float>(), stream), "row-norm");

  at::Tensor indices = at::empty({n}, z.options().dtype(at::kLong));
  const at::Tensor best_dist = at::empty({n}, z.options().dtype(at::kFloat));
  at::Tensor second_dist;
  if (exact) second_dist = at::empty({n}, z.options().dtype(at::kFloat));
  // Few rows (VAR's first scales, single queries): split the codebook over more thread blocks.
  const int splits = choose_code_splits(n, k);
  at::Tensor workspace;
  if (splits > 1) {
    workspace = at::empty({static_cast<int64_t>(split_workspace_bytes(n, splits))}, z.options().dtype(at::kByte));
  }
  // Operands taken as they are: the search also writes the chosen codewords and their distances,
  // computed directly (no cancellation), in its epilogue.
  const at::Tensor distances = at::empty({n}, z.options().dtype(at::kFloat));
  at::Tensor codewords = direct ? at::empty({n, d}, z.options()) : at::Tensor();
  check(launch_nearest_codeword(zs.data_ptr(), cs.data_ptr(), dtype, code_sqnorm.data_ptr<float>(), n, k, d,
                                exact ? Mode::kExactFma : Mode::kFastTensor, indices.data_ptr<int64_t>(),
                                best_dist.data_ptr<float>(), exact ? second_dist.data_ptr<float>() : nullptr,
                                direct ? codewords.data_ptr() : nullptr,
                                direct ? distances.data_ptr<float>() : nullptr, splits,
                                splits > 1 ? workspace.data_ptr() : nullptr, stream),
        "search");
  if (exact) {
    // The tolerance of reference.ranking_tolerance: no ||z||^2 term, so a codebook that is tiny next
    // to z (the classic uniform [-1/K, 1/K] initialisation) does not send every row to the re-rank.
    const at::Tensor z_sqnorm = at::empty({n}, z.options().dtype(at::kFloat));
    check(launch_row_sqnorms(zs.data_ptr(), dtype, n, d, z_sqnorm.data_ptr<float>(), stream), "row-norm");
    const double coef = ranking_tolerance_coef<float>(d);
    const double underflow = ranking_tolerance_floor<float>(d);
    const at::Tensor cmax = code_sqnorm.max().sqrt().to(at::kDouble);
    const at::Tensor tol = coef * cmax * (2.0 * z_sqnorm.to(at::kDouble).sqrt() + cmax) + underflow;
    // In float64, so that adding the tolerance rounds nothing away. NaN or infinite distances fail
    // the comparison and are re-ranked.
    const at::Tensor proven = second_dist.to(at::kDouble).gt(best_dist.to(at::kDouble) + tol);
    const at::Tensor rows = proven.logical_not().nonzero().squeeze(1);
    if (rows.numel() > 0) {
      const at::Tensor picked = search_fp64(zs.index_select(0, rows), cs.to(at::kDouble));
      indices.index_copy_(0, rows, picked);
      if (direct) {  // the epilogue wrote these rows for the kernel's pick: write them again
        const at::Tensor cw = cs.index_select(0, picked);
        codewords.index_copy_(0, rows, cw);
        distances.index_copy_(0, rows, (zs.index_select(0, rows).to(at::kFloat) - cw.to(at::kFloat)).pow(2).sum(1));
      }
    }
  }
  if (!direct) {
    ZeroRows zero;
    if (cosine) {
      zero = cosine_zero_rows(z, codebook);
      indices = at::where(zero.rows, zero.index, indices);
    }
    // Staged operands (mixed dtypes, cosine): distances from the searched (normalised) vectors, the
    // codewords from the codebook as given.
    check(launch_gather_distance(zs.data_ptr(), cs.data_ptr(), dtype, indices.data_ptr<int64_t>(), n, d, nullptr,
                                 distances.data_ptr<float>(), stream),
          "distance");
    codewords = codebook.index_select(0, indices).to(z.scalar_type());
    if (cosine) return {indices, codewords, at::where(zero.rows, zero.distance, distances)};
  }
  return {indices, codewords, distances};
}

}  // namespace
}  // namespace cuda
}  // namespace vqfast

// Only a library with CUDA kernels has this op; vqfast/_ext.py asks for it after cuda_built().
TORCH_LIBRARY_FRAGMENT(vqfast, m) {
  // The nvcc targets the kernels were compiled for, ':'-separated: "sm_80:sm_90:compute_90".
  m.def("cuda_archs() -> str", []() -> std::string { return vqfast::cuda::compiled_archs(); });
}

TORCH_LIBRARY_IMPL(vqfast, CUDA, m) {
  m.impl("nearest_codeword", &vqfast::cuda::nearest_codeword);
}
