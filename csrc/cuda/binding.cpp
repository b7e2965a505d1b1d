// Torch side of the CUDA backend: input checks, the kernel launches on the current stream (row
// norms, then the search with its codeword + distance epilogue), and the exact mode's proof and
// re-rank, all on the device. fp32 / fp16 / bf16 operands of one dtype reach the kernels as they are;
// mixed dtypes and the cosine metric are staged once in fp32.
//
// No host synchronisation anywhere here (tests/test_cuda_kernels.py scans this file and the kernels'
// launch code for the primitives that would make one): every output stays on the device, and the
// exact mode's data-dependent work is sized on the device, so the search can be captured in a CUDA
// graph.
//
// Exact precision. The kernel ranks ||c||^2 - 2 z.c in fp32 FMA, off by at most gamma_{D+3} max||c||
// (2 ||z|| + max||c||) (vqfast/reference.py, ranking_tolerance), so a row whose second-best value
// exceeds the best by more than twice that, plus an underflow allowance, is provably right (the terms
// come from csrc/tolerance.h, checked against the Python definition). The row-norm passes also leave
// the largest codeword norm on the device; a marking kernel then appends every row it cannot prove
// (near ties, exact duplicates, non-finite values) to a device list of capacity N through an atomic
// counter, so even a batch whose every row is ambiguous fits. A re-rank kernel launched on a fixed
// grid loops over the entries up to that counter, scanning the whole codebook with direct distances
// sum((z - c)^2) (lowest index on exact ties, a NaN distance ranking as +inf, so a NaN row takes
// codeword 0) and rewriting index, codeword and distance of those rows. The distances are float64,
// or, on GPUs whose float64 rate is 1/32 of float32 or less (cudaDevAttrSingleToDoublePrecisionPerfRatio
// >= 32: consumer and L40-class cards, 1/64), compensated float32 (double-float), which decides a row
// only when its own error bound separates the best two codewords and hands the rest (ties, copies,
// non-finite, beyond float32) to the float64 scan; VQFAST_CUDA_RERANK=float64 / compensated forces one.
// float64 operands: the float64 scan over every row, no expansion and no candidate list.
//
// nearest_codeword_flagged: the same search, plus extremes float64 [2] = max |z|, max |codebook|
// (NaN if a NaN was read, +inf if an Inf was), raised by the row-norm passes over the operands as the
// kernels read them; cosine and float64 operands, which the kernels read normalised or not at all, take
// one max-|x| pass over the inputs instead. The caller reads extremes back once (vqfast/ops.py).
//
// Cosine and zero vectors (reference.cosine_zero_rows): a zero row of z takes the first zero codeword
// (distance 0), else codeword 0 with distance exactly 1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <string>
#include <tuple>

#include "nearest_codeword.h"

namespace vqfast {
namespace cuda {
namespace {

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

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "vqfast::nearest_codeword: no CUDA kernel reads ", t);
  }
  return DType::kFloat32;  // not reached
}

bool read_directly(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// The search; `extremes` (float64 [2], zeros) is raised to max |z|, max |codebook| when defined.
Outputs search(const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric, c10::string_view precision,
               bool flagged) {
  const char* op = flagged ? "vqfast::nearest_codeword_flagged" : "vqfast::nearest_codeword";
  TORCH_CHECK(z.dim() == 2, op, ": z must be 2-D [N, D], got ", z.dim(), "-D");
  TORCH_CHECK(codebook.dim() == 2, op, ": codebook must be 2-D [K, D], got ", codebook.dim(), "-D");
  TORCH_CHECK(z.size(1) == codebook.size(1), op, ": z has D=", z.size(1), " but codebook has D=", codebook.size(1));
  TORCH_CHECK(codebook.size(0) > 0, op, ": codebook is empty (K=0)");
  TORCH_CHECK(z.size(1) > 0, op, ": vectors have no features (D=0)");
  TORCH_CHECK(z.is_cuda() && codebook.is_cuda(), op, " (CUDA kernel): z and codebook must be CUDA tensors");
  TORCH_CHECK(z.device() == codebook.device(), op, ": z is on ", z.device(), " but codebook is on ", codebook.device());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && at::isFloatingType(codebook.scalar_type()), op,
              ": z and codebook must be floating point");
  TORCH_CHECK(metric == "l2" || metric == "cosine", op, ": metric must be 'l2' or 'cosine'");
  TORCH_CHECK(precision == "exact" || precision == "fast", op, ": precision must be 'exact' or 'fast'");
  // The kernel keeps codeword indices in int32 and pads K to a multiple of kBlockCodes.
  TORCH_CHECK(codebook.size(0) <= INT_MAX - kBlockCodes, op, " (CUDA kernel): K=", codebook.size(0), " exceeds ",
              INT_MAX - kBlockCodes, " codewords");

  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0), k = codebook.size(0), d = z.size(1);
  const bool cosine = metric == "cosine";
  const bool exact = precision == "exact";
  const bool f64 = z.scalar_type() == at::kDouble || codebook.scalar_type() == at::kDouble;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.device().index()).stream();
  const auto check = [&](cudaError_t status, const char* what) {
    TORCH_CHECK(status == cudaSuccess, op, ": CUDA ", what, " kernel failed to launch (N=", n, ", K=", k, ", D=", d,
                "): ", cudaGetErrorString(status));
  };
  // +0.0 bits: the kernels raise them with integer atomicMax (nearest_codeword.h).
  const at::Tensor extremes = flagged ? at::zeros({2}, z.options().dtype(at::kDouble)) : at::Tensor();
  double* const max_z = flagged ? extremes.data_ptr<double>() : nullptr;
  double* const max_c = flagged ? max_z + 1 : nullptr;
  // One pass over an operand the kernels do not read as given (float64, cosine): its largest magnitude.
  const auto max_abs_pass = [&](const at::Tensor& x, double* out) {
    if (out == nullptr) return;
    // Float types no kernel reads (float8) through an fp32 copy: the same values, NaN and Inf included.
    const bool readable = read_directly(x.scalar_type()) || x.scalar_type() == at::kDouble;
    const at::Tensor xc = (readable ? x : x.to(at::kFloat)).contiguous();
    check(launch_max_abs(xc.data_ptr(), kernel_dtype(xc.scalar_type()), xc.numel(), out, stream), "max-abs");
  };

  if (f64) {
    // float64 has no search kernel here (GPUs run it at 1/2 to 1/64 of fp32): the re-rank kernel's
    // float64 direct scan over every row (the exact contract by construction, no host sync).
    const at::Tensor zf = normalize_for_metric(z.to(at::kDouble), cosine).contiguous();
    const at::Tensor cf = normalize_for_metric(codebook.to(at::kDouble), cosine).contiguous();
    max_abs_pass(z, max_z);
    max_abs_pass(codebook, max_c);
    at::Tensor indices = at::empty({n}, z.options().dtype(at::kLong));
    check(launch_rerank(zf.data_ptr(), cf.data_ptr(), DType::kFloat64, n, k, d, nullptr, nullptr, Rerank::kFloat64,
                        indices.data_ptr<int64_t>(), nullptr, nullptr, stream),
          "re-rank");
    at::Tensor distances;
    if (cosine) {
      const ZeroRows zero = cosine_zero_rows(z, codebook);
      indices = at::where(zero.rows, zero.index, indices);
      distances = at::where(zero.rows, zero.distance, (zf - cf.index_select(0, indices)).pow(2).sum(1).to(at::kFloat));
    } else {
      distances = (zf - cf.index_select(0, indices)).pow(2).sum(1).to(at::kFloat);
    }
    at::Tensor codewords = codebook.index_select(0, indices).to(z.scalar_type());
    return {indices, codewords, distances, extremes};
  }

  // The kernels read fp32, fp16 and bf16 directly. Mixed dtypes, other float types and the cosine
  // metric (normalised vectors) go through one fp32 copy of each operand.
  const bool direct = !cosine && z.scalar_type() == codebook.scalar_type() && read_directly(z.scalar_type());
  const at::Tensor zs = direct ? z.contiguous() : normalize_for_metric(z.to(at::kFloat), cosine).contiguous();
  const at::Tensor cs = direct ? codebook.contiguous() : normalize_for_metric(codebook.to(at::kFloat), cosine).contiguous();
  const DType dtype = kernel_dtype(zs.scalar_type());
  // The row-norm passes read the operands' values as given except under cosine (normalised copies);
  // l2 with mixed dtypes reads fp32 copies that hold the same values.
  if (cosine) {
    max_abs_pass(z, max_z);
    max_abs_pass(codebook, max_c);
  }
  double* const norm_max_z = cosine ? nullptr : max_z;
  double* const norm_max_c = cosine ? nullptr : max_c;

  // Exact mode's device scratch: [0] the list's entry count, [1] the largest codeword norm (as float64
  // bits, raised by the codebook's row-norm pass); both start at zero.
  const at::Tensor scratch = exact ? at::zeros({2}, z.options().dtype(at::kLong)) : at::Tensor();
  unsigned long long* const count = exact ? reinterpret_cast<unsigned long long*>(scratch.data_ptr<int64_t>()) : nullptr;
  double* const code_sqnorm_max = exact ? reinterpret_cast<double*>(scratch.data_ptr<int64_t>() + 1) : nullptr;

  // Codeword norms enter the ranked value; the norms of z only the exact mode's tolerance.
  const at::Tensor code_sqnorm = at::empty({k}, z.options().dtype(at::kFloat));
  check(launch_row_sqnorms(cs.data_ptr(), dtype, k, d, code_sqnorm.data_ptr<float>(), norm_max_c, code_sqnorm_max,
                           stream),
        "row-norm");
  at::Tensor z_sqnorm;
  if (exact || norm_max_z != nullptr) {
    z_sqnorm = at::empty({n}, z.options().dtype(at::kFloat));
    check(launch_row_sqnorms(zs.data_ptr(), dtype, n, d, z_sqnorm.data_ptr<float>(), norm_max_z, nullptr, stream),
          "row-norm");
  }

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
    // The rows the bound cannot prove, listed on the device, then re-ranked there (see the top); the
    // epilogue's codewords and distances of those rows are written again for the new pick.
    const at::Tensor list = at::empty({n}, z.options().dtype(at::kLong));
    check(launch_mark_ambiguous(best_dist.data_ptr<float>(), second_dist.data_ptr<float>(), z_sqnorm.data_ptr<float>(),
                                code_sqnorm_max, n, d, list.data_ptr<int64_t>(), count, stream),
          "marking");
    check(launch_rerank(zs.data_ptr(), cs.data_ptr(), dtype, n, k, d, list.data_ptr<int64_t>(), count, choose_rerank(),
                        indices.data_ptr<int64_t>(), direct ? codewords.data_ptr() : nullptr,
                        direct ? distances.data_ptr<float>() : nullptr, stream),
          "re-rank");
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
    if (cosine) return {indices, codewords, at::where(zero.rows, zero.distance, distances), extremes};
  }
  return {indices, codewords, distances, extremes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword(const at::Tensor& z, const at::Tensor& codebook,
                                                                c10::string_view metric,
                                                                c10::string_view precision) {
  auto [indices, codewords, distances, extremes] = search(z, codebook, metric, precision, /*flagged=*/false);
  return {indices, codewords, distances};
}

Outputs nearest_codeword_flagged(const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric,
                                 c10::string_view precision) {
  return search(z, codebook, metric, precision, /*flagged=*/true);
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
  m.impl("nearest_codeword_flagged", &vqfast::cuda::nearest_codeword_flagged);
}
