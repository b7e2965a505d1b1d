// Torch-free check of the CUDA kernels in csrc/cuda/nearest_codeword.cu, for nvcc alone and
// compute-sanitizer:
//
//   nvcc -std=c++17 -O2 -I csrc/cuda tests/cuda/check_nearest_codeword.cu csrc/cuda/nearest_codeword.cu -o check
//   ./check && compute-sanitizer --tool memcheck ./check --small && compute-sanitizer --tool racecheck ./check --small
//
// For odd shapes, fp32 / fp16 / bf16 elements and both modes it compares the kernels with a float64
// computation on the host:
//   row norms:  within the fp32 summation bound of the exact sum of squares.
//   exact mode: a row whose top-2 gap exceeds twice the fp32 expansion bound (the rows the binding
//               does not re-rank) must hold the true argmin; every row: best <= second.
//   fast mode:  the true distance of the pick is within twice the TF32 error bound of the minimum.
//   splits:     the codebook split over 2, 3, 7 and the automatic number of thread blocks gives
//               bit-identical outputs to the unsplit search.
//   16-bit:     in exact mode fp16 / bf16 inputs give bit-identical outputs to fp32 inputs holding the
//               same values (converted exactly, computed in fp32); fast mode multiplies them natively.
//   epilogue:   gathered codewords equal codebook[index] bit for bit; distances within gamma_{D+3}
//               relative of the float64 direct sum; the search's own (fused) epilogue writes the
//               same bits as the separate gather.
//   re-rank:    the exact pipeline on the device (norm passes with their fused maxima, search,
//               marking into the device list, re-rank in float64 and in compensated float32) gives
//               a float64 brute force's index on every row of inputs built to need it (near ties,
//               copies, NaN / Inf, float32 overflow, every row ambiguous); see run_exact_pipeline.
// Exits 0 when every check holds.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "nearest_codeword.h"
#include "../tolerance.h"

#define CHECK_CUDA(expr)                                                                          \
  do {                                                                                            \
    cudaError_t err_ = (expr);                                                                    \
    if (err_ != cudaSuccess) {                                                                    \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(err_)); \
      std::exit(2);                                                                               \
    }                                                                                             \
  } while (0)

namespace {

using vqfast::cuda::DType;
using vqfast::cuda::Mode;

struct Shape {
  int64_t n, k, d;
  // Codewords uniform in [-1/K, 1/K] (the classic initialisation), tiny next to z: the ranking bound
  // must still prove 90% of the rows (a bound with the ||z||^2 term proves 55 of 70 of the emulated
  // case), or the binding would re-rank most of them in float64.
  bool tiny_codebook = false;
};

// Host <-> element conversions; the test values are first rounded to the element type, so the
// float64 oracle sees exactly what the kernel sees.
template <typename T> T from_float(float x);
template <> float from_float<float>(float x) { return x; }
template <> __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
float as_float(float x) { return x; }
float as_float(__half x) { return __half2float(x); }
float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kFloat32; }
template <> DType dtype_of<__half>() { return DType::kFloat16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }
template <typename T> const char* name_of();
template <> const char* name_of<float>() { return "fp32"; }
template <> const char* name_of<__half>() { return "fp16"; }
template <> const char* name_of<__nv_bfloat16>() { return "bf16"; }

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, v.size() * sizeof(T) + 16));  // +16: never a zero-byte allocation
  CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

template <typename T>
std::vector<T> to_host(const T* p, size_t count) {
  std::vector<T> v(count);
  CHECK_CUDA(cudaMemcpy(v.data(), p, count * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

struct Result {
  std::vector<int64_t> index;
  std::vector<float> best, second, znorm, cnorm;
};

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

// Element-type T inputs holding the float values zf / cbf (already representable in T).
template <typename T>
Result search(const Shape& s, Mode mode, const std::vector<float>& zf, const std::vector<float>& cbf, int splits,
              bool fused, int& failures) {
  std::vector<T> zt(zf.size()), ct(cbf.size());
  for (size_t i = 0; i < zf.size(); ++i) zt[i] = from_float<T>(zf[i]);
  for (size_t i = 0; i < cbf.size(); ++i) ct[i] = from_float<T>(cbf[i]);
  T* dz = to_device(zt);
  T* dcb = to_device(ct);
  float *dzn, *dcn, *dbest, *dsecond, *ddist;
  int64_t* didx;
  void* dworkspace = nullptr;
  CHECK_CUDA(cudaMalloc(&dzn, s.n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dcn, s.k * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dbest, s.n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dsecond, s.n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&ddist, s.n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&didx, s.n * sizeof(int64_t)));
  T *dcw, *dcw_fused;
  float* ddist_fused;
  CHECK_CUDA(cudaMalloc(&dcw, s.n * s.d * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dcw_fused, s.n * s.d * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&ddist_fused, s.n * sizeof(float)));
  if (splits > 1) CHECK_CUDA(cudaMalloc(&dworkspace, vqfast::cuda::split_workspace_bytes(s.n, splits)));
  CHECK_CUDA(cudaMemset(didx, 0xff, s.n * sizeof(int64_t)));  // stale outputs must not pass

  const DType dt = dtype_of<T>();
  CHECK_CUDA(vqfast::cuda::launch_row_sqnorms(dz, dt, s.n, s.d, dzn, nullptr, nullptr, 0));
  CHECK_CUDA(vqfast::cuda::launch_row_sqnorms(dcb, dt, s.k, s.d, dcn, nullptr, nullptr, 0));
  CHECK_CUDA(vqfast::cuda::launch_nearest_codeword(dz, dcb, dt, dcn, s.n, s.k, s.d, mode, didx, dbest, dsecond,
                                                   fused ? dcw_fused : nullptr, fused ? ddist_fused : nullptr,
                                                   splits, dworkspace, 0));
  CHECK_CUDA(vqfast::cuda::launch_gather_distance(dz, dcb, dt, didx, s.n, s.d, dcw, ddist, 0));
  CHECK_CUDA(cudaDeviceSynchronize());

  Result r{to_host(didx, s.n), to_host(dbest, s.n), to_host(dsecond, s.n), to_host(dzn, s.n), to_host(dcn, s.k)};
  const std::vector<T> cw = to_host(dcw, s.n * s.d);
  const std::vector<float> dist = to_host(ddist, s.n);
  if (fused) {
    // The search's own epilogue writes what the separate gather writes, bit for bit.
    const std::vector<T> cw_fused = to_host(dcw_fused, s.n * s.d);
    const std::vector<float> dist_fused = to_host(ddist_fused, s.n);
    for (int64_t i = 0; i < s.n; ++i) {
      const bool same = std::memcmp(&cw_fused[i * s.d], &cw[i * s.d], s.d * sizeof(T)) == 0 &&
                        same_bits(dist_fused[i], dist[i]);
      if (!same && failures++ < 5) {
        std::fprintf(stderr, "  fused epilogue row %lld (splits=%d): distance %.9g vs gather %.9g%s\n",
                     static_cast<long long>(i), splits, dist_fused[i], dist[i],
                     std::memcmp(&cw_fused[i * s.d], &cw[i * s.d], s.d * sizeof(T)) ? ", codewords differ" : "");
      }
    }
  }
  // Epilogue: exact gather, direct distance.
  for (int64_t i = 0; i < s.n; ++i) {
    const int64_t c = r.index[i];
    if (c < 0 || c >= s.k) continue;  // reported by the search checks
    double exact = 0.0;
    bool same = true;
    for (int64_t j = 0; j < s.d; ++j) {
      same = same && std::memcmp(&cw[i * s.d + j], &ct[c * s.d + j], sizeof(T)) == 0;
      const double t = static_cast<double>(zf[i * s.d + j]) - cbf[c * s.d + j];
      exact += t * t;
    }
    // d + 2 roundings per term at most (difference, square, sum): gamma_{D+3} relative.
    const bool close = std::fabs(dist[i] - exact) <= (s.d + 3) * 0x1p-24 * exact * 1.01;
    if ((!same || !close) && failures++ < 5) {
      std::fprintf(stderr, "  epilogue row %lld: codeword %s, distance %.9g vs %.9g\n", static_cast<long long>(i),
                   same ? "ok" : "differs", dist[i], exact);
    }
  }
  for (void* p : {static_cast<void*>(dz), static_cast<void*>(dcb), static_cast<void*>(dzn), static_cast<void*>(dcn),
                  static_cast<void*>(dbest), static_cast<void*>(dsecond), static_cast<void*>(ddist),
                  static_cast<void*>(didx), static_cast<void*>(dcw), static_cast<void*>(dcw_fused),
                  static_cast<void*>(ddist_fused), dworkspace})
    CHECK_CUDA(cudaFree(p));
  return r;
}

int compare_bits(const Result& a, const Result& b, const char* what) {
  int mismatches = 0;
  for (size_t i = 0; i < a.index.size(); ++i) {
    if (a.index[i] == b.index[i] && same_bits(a.best[i], b.best[i]) && same_bits(a.second[i], b.second[i])) continue;
    if (mismatches++ < 5) {
      std::fprintf(stderr, "  %s row %zu: %lld (%.9g, %.9g) vs %lld (%.9g, %.9g)\n", what, i,
                   static_cast<long long>(a.index[i]), a.best[i], a.second[i], static_cast<long long>(b.index[i]),
                   b.best[i], b.second[i]);
    }
  }
  return mismatches;
}

template <typename T>
int run_case(const Shape& s, Mode mode, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> z(s.n * s.d), cb(s.k * s.d);
  for (auto& v : z) v = as_float(from_float<T>(normal(rng)));
  std::uniform_real_distribution<float> uniform(-1.f / s.k, 1.f / s.k);
  for (auto& v : cb) v = as_float(from_float<T>(s.tiny_codebook ? uniform(rng) : normal(rng)));
  if (s.k > 3) {  // an exact duplicate: the lower index must win when it is the nearest
    for (int64_t j = 0; j < s.d; ++j) cb[(s.k - 1) * s.d + j] = cb[1 * s.d + j];
    for (int64_t j = 0; j < s.d; ++j) z[j] = cb[1 * s.d + j];
  }

  int failures = 0;
  const Result r = search<T>(s, mode, z, cb, 1, true, failures);
  // Exact mode converts 16-bit elements to fp32 and computes as for fp32; fast mode multiplies them
  // natively (mma.m16n8k16), in another order than TF32's k8 steps, so only exact mode is bitwise.
  if (!std::is_same_v<T, float> && mode == Mode::kExactFma)
    failures += compare_bits(search<float>(s, mode, z, cb, 1, true, failures), r, "fp32 vs 16-bit");
  for (int splits : {2, 3, 7, vqfast::cuda::choose_code_splits(s.n, s.k)}) {
    // Split searches gather after the merge; splits = 2 also runs without the codeword outputs.
    if (splits > 1) failures += compare_bits(search<T>(s, mode, z, cb, splits, splits != 2, failures), r, "split vs unsplit");
  }

  const bool exact = mode == Mode::kExactFma;
  const double dim = static_cast<double>(s.d + 3);
  const double gamma = exact ? dim * 0x1p-24 / (1.0 - dim * 0x1p-24) : 2 * 0x1p-11 + dim * 0x1p-24;
  double cmax = 0.0;
  for (int64_t c = 0; c < s.k; ++c) {
    double acc = 0.0;
    for (int64_t j = 0; j < s.d; ++j) acc += static_cast<double>(cb[c * s.d + j]) * cb[c * s.d + j];
    cmax = std::fmax(cmax, acc);
    if (std::fabs(r.cnorm[c] - acc) > dim * 0x1p-24 * acc * 1.01 && failures++ < 5) {
      std::fprintf(stderr, "  code %lld: norm %.9g vs %.9g\n", static_cast<long long>(c), r.cnorm[c], acc);
    }
  }
  int proven = 0;
  for (int64_t i = 0; i < s.n; ++i) {
    double dmin = INFINITY, zn = 0.0;
    int64_t arg = 0;
    for (int64_t j = 0; j < s.d; ++j) zn += static_cast<double>(z[i * s.d + j]) * z[i * s.d + j];
    for (int64_t c = 0; c < s.k; ++c) {
      double acc = 0.0;
      for (int64_t j = 0; j < s.d; ++j) {
        const double t = static_cast<double>(z[i * s.d + j]) - cb[c * s.d + j];
        acc += t * t;
      }
      if (acc < dmin) dmin = acc, arg = c;
    }
    // The ranked value ||c||^2 - 2 z.c: gamma max||c|| (2 ||z|| + max||c||) per value, twice for a gap.
    const double bound = 2.0 * gamma * std::sqrt(cmax) * (2.0 * std::sqrt(zn) + std::sqrt(cmax));
    bool ok = r.index[i] >= 0 && r.index[i] < s.k && r.best[i] <= r.second[i] &&
              std::fabs(r.znorm[i] - zn) <= dim * 0x1p-24 * zn * 1.01;
    if (ok && exact) {
      if (r.second[i] > r.best[i] + bound) {
        ++proven;
        ok = r.index[i] == arg;
      }
    } else if (ok) {
      double picked = 0.0;
      for (int64_t j = 0; j < s.d; ++j) {
        const double t = static_cast<double>(z[i * s.d + j]) - cb[r.index[i] * s.d + j];
        picked += t * t;
      }
      ok = picked - dmin <= 2.0 * bound;
    }
    if (!ok && failures++ < 5) {
      std::fprintf(stderr, "  row %lld: kernel %lld (best %.9g, second %.9g, norm %.9g), true argmin %lld (%.9g)\n",
                   static_cast<long long>(i), static_cast<long long>(r.index[i]), r.best[i], r.second[i], r.znorm[i],
                   static_cast<long long>(arg), dmin);
    }
  }
  if (exact && s.tiny_codebook && 10 * proven < 9 * s.n && failures++ == 0) {
    std::fprintf(stderr, "  tiny codebook: only %d of %lld rows proven\n", proven, static_cast<long long>(s.n));
  }
  std::printf("%s %-5s N=%-5lld K=%-6lld D=%-4lld%s %s (%d of %lld rows proven without re-rank)\n", name_of<T>(),
              exact ? "exact" : "fast", static_cast<long long>(s.n), static_cast<long long>(s.k),
              static_cast<long long>(s.d), s.tiny_codebook ? " tiny" : "", failures ? "FAIL" : "ok", proven,
              static_cast<long long>(s.n));
  return failures;
}


// ---- exact mode with no host sync: maxima, marking, re-rank -------------------------------------
//
// The whole exact pipeline as binding.cpp runs it (row norms with their fused maxima, search, marking
// on the device, re-rank over the device list), on inputs built to need the re-rank: near ties,
// copies, NaN / Inf rows and codewords, float32 overflow, underflow, and every row ambiguous (more
// rows than the re-rank grid has warps). Checked against a float64 brute force (the oracle's sums:
// features in order, a NaN distance ranking as +inf, lowest index on equal values):
//   maxima:  max |z|, max |codebook| (NaN / Inf rules) and the largest codeword norm, exactly;
//   marking: the listed rows are exactly those whose gap is not beyond the tolerance of tolerance.h;
//   answer:  every row's index equals the brute force, for both re-rank variants;
//   outputs: re-ranked rows' codewords and distances are what the gather writes, bit for bit.

using vqfast::cuda::Rerank;

struct Inputs {
  const char* what;
  int64_t n, k, d;
  std::vector<float> z, cb;  // values representable in the element type
};

double magnitude_max(const std::vector<float>& v) {
  double m = 0.0;
  for (float x : v) {
    if (std::isnan(x)) return NAN;
    m = std::fmax(m, std::fabs(static_cast<double>(x)));
  }
  return m;
}

bool same_double(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// The lowest index at the float64 minimum of sum_j (z_j - c_j)^2, NaN as +inf (codeword 0 when none is finite).
std::vector<int64_t> brute_force(const Inputs& in) {
  std::vector<int64_t> out(in.n);
  for (int64_t i = 0; i < in.n; ++i) {
    double best = INFINITY;
    int64_t at = 0;
    for (int64_t c = 0; c < in.k; ++c) {
      double acc = 0.0;
      for (int64_t j = 0; j < in.d; ++j) {
        const double t = static_cast<double>(in.z[i * in.d + j]) - static_cast<double>(in.cb[c * in.d + j]);
        acc += t * t;
      }
      if (acc < best) best = acc, at = c;
    }
    out[i] = at;
  }
  return out;
}

template <typename T>
int run_exact_pipeline(const Inputs& in, Rerank kind) {
  const int64_t n = in.n, k = in.k, d = in.d;
  std::vector<T> zt(in.z.size()), ct(in.cb.size());
  for (size_t i = 0; i < in.z.size(); ++i) zt[i] = from_float<T>(in.z[i]);
  for (size_t i = 0; i < in.cb.size(); ++i) ct[i] = from_float<T>(in.cb[i]);
  T* dz = to_device(zt);
  T* dcb = to_device(ct);
  float *dzn, *dcn, *dbest, *dsecond, *ddist, *ddist2;
  int64_t *didx, *dlist;
  T *dcw, *dcw2;
  double* dmax;  // [max |z|, max |codebook|, max ||c||^2]
  unsigned long long* dcount;
  CHECK_CUDA(cudaMalloc(&dzn, n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dcn, k * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dbest, n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&dsecond, n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&ddist, n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&ddist2, n * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&didx, n * sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&dlist, n * sizeof(int64_t)));
  CHECK_CUDA(cudaMalloc(&dcw, n * d * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dcw2, n * d * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&dmax, 3 * sizeof(double)));
  CHECK_CUDA(cudaMalloc(&dcount, sizeof(unsigned long long)));
  CHECK_CUDA(cudaMemset(dmax, 0, 3 * sizeof(double)));
  CHECK_CUDA(cudaMemset(dcount, 0, sizeof(unsigned long long)));
  CHECK_CUDA(cudaMemset(dlist, 0xff, n * sizeof(int64_t)));
  const int splits = vqfast::cuda::choose_code_splits(n, k);
  void* dworkspace = nullptr;
  if (splits > 1) CHECK_CUDA(cudaMalloc(&dworkspace, vqfast::cuda::split_workspace_bytes(n, splits)));

  const DType dt = dtype_of<T>();
  CHECK_CUDA(vqfast::cuda::launch_row_sqnorms(dcb, dt, k, d, dcn, dmax + 1, dmax + 2, 0));
  CHECK_CUDA(vqfast::cuda::launch_row_sqnorms(dz, dt, n, d, dzn, dmax, nullptr, 0));
  CHECK_CUDA(vqfast::cuda::launch_nearest_codeword(dz, dcb, dt, dcn, n, k, d, Mode::kExactFma, didx, dbest, dsecond, dcw,
                                                   ddist, splits, dworkspace, 0));
  CHECK_CUDA(vqfast::cuda::launch_mark_ambiguous(dbest, dsecond, dzn, dmax + 2, n, d, dlist, dcount, 0));
  CHECK_CUDA(vqfast::cuda::launch_rerank(dz, dcb, dt, n, k, d, dlist, dcount, kind, didx, dcw, ddist, 0));
  CHECK_CUDA(vqfast::cuda::launch_gather_distance(dz, dcb, dt, didx, n, d, dcw2, ddist2, 0));
  CHECK_CUDA(cudaDeviceSynchronize());

  const std::vector<int64_t> index = to_host(didx, n), list = to_host(dlist, n);
  const std::vector<float> best = to_host(dbest, n), second = to_host(dsecond, n), zn = to_host(dzn, n),
                           cn = to_host(dcn, k), dist = to_host(ddist, n), dist2 = to_host(ddist2, n);
  const std::vector<double> maxima = to_host(dmax, 3);
  const unsigned long long count = to_host(dcount, 1)[0];
  const std::vector<T> cw = to_host(dcw, n * d), cw2 = to_host(dcw2, n * d);
  int failures = 0;
  const auto fail = [&](const char* fmt, auto... args) {
    if (failures++ < 5) {
      std::fprintf(stderr, "  %s %s: ", in.what, name_of<T>());
      std::fprintf(stderr, fmt, args...);
      std::fprintf(stderr, "\n");
    }
  };

  // Maxima fused into the norm passes.
  double cn_max = 0.0;
  for (float v : cn) cn_max = std::isnan(v) || std::isnan(cn_max) ? NAN : std::fmax(cn_max, v);
  if (!same_double(maxima[0], magnitude_max(in.z))) fail("max |z| %.9g, expected %.9g", maxima[0], magnitude_max(in.z));
  if (!same_double(maxima[1], magnitude_max(in.cb)))
    fail("max |codebook| %.9g, expected %.9g", maxima[1], magnitude_max(in.cb));
  if (!same_double(maxima[2], cn_max)) fail("max ||c||^2 %.9g, expected %.9g", maxima[2], cn_max);

  // The list: exactly the rows the tolerance cannot prove, each once.
  const double coef = vqfast::ranking_tolerance_coef<float>(d), floor_term = vqfast::ranking_tolerance_floor<float>(d);
  const double cmax = static_cast<double>(std::sqrt(static_cast<float>(maxima[2])));
  std::vector<int> listed(n, 0);
  int64_t expected = 0;
  if (count > static_cast<unsigned long long>(n)) fail("count %llu above n", count);
  for (unsigned long long e = 0; e < count && e < static_cast<unsigned long long>(n); ++e) {
    if (list[e] < 0 || list[e] >= n || listed[list[e]]++) fail("list entry %llu is %lld", e, static_cast<long long>(list[e]));
  }
  for (int64_t i = 0; i < n; ++i) {
    const double tol = coef * cmax * (2.0 * std::sqrt(static_cast<double>(zn[i])) + cmax) + floor_term;
    const bool proven = static_cast<double>(second[i]) > static_cast<double>(best[i]) + tol;
    expected += !proven;
    if (proven == (listed[i] != 0)) fail("row %lld %s listed (gap %.9g)", static_cast<long long>(i), proven ? "" : "not",
                                         static_cast<double>(second[i]) - best[i]);
  }

  // The answer and the rewritten outputs.
  const std::vector<int64_t> truth = brute_force(in);
  for (int64_t i = 0; i < n; ++i) {
    if (index[i] != truth[i]) fail("row %lld: %lld, brute force %lld", static_cast<long long>(i),
                                   static_cast<long long>(index[i]), static_cast<long long>(truth[i]));
    if (!same_bits(dist[i], dist2[i]) || std::memcmp(&cw[i * d], &cw2[i * d], d * sizeof(T)) != 0)
      fail("row %lld: codeword / distance differ from the gather", static_cast<long long>(i));
  }
  // The float64 path: the re-rank over every row of float64 operands holding the same values.
  std::vector<double> z64(in.z.begin(), in.z.end()), cb64(in.cb.begin(), in.cb.end());
  for (size_t i = 0; i < z64.size(); ++i) z64[i] = as_float(zt[i]);
  for (size_t i = 0; i < cb64.size(); ++i) cb64[i] = as_float(ct[i]);
  double* dz64 = to_device(z64);
  double* dcb64 = to_device(cb64);
  double* dmax64;
  CHECK_CUDA(cudaMalloc(&dmax64, 2 * sizeof(double)));
  CHECK_CUDA(cudaMemset(dmax64, 0, 2 * sizeof(double)));
  CHECK_CUDA(cudaMemset(didx, 0xff, n * sizeof(int64_t)));
  CHECK_CUDA(vqfast::cuda::launch_rerank(dz64, dcb64, DType::kFloat64, n, k, d, nullptr, nullptr, Rerank::kFloat64, didx,
                                         nullptr, nullptr, 0));
  CHECK_CUDA(vqfast::cuda::launch_max_abs(dz64, DType::kFloat64, n * d, dmax64, 0));
  CHECK_CUDA(vqfast::cuda::launch_max_abs(dcb, dt, k * d, dmax64 + 1, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<int64_t> index64 = to_host(didx, n);
  const std::vector<double> max64 = to_host(dmax64, 2);
  for (int64_t i = 0; i < n; ++i)
    if (index64[i] != truth[i]) fail("float64 operands, row %lld: %lld, brute force %lld", static_cast<long long>(i),
                                     static_cast<long long>(index64[i]), static_cast<long long>(truth[i]));
  if (!same_double(max64[0], magnitude_max(in.z)) || !same_double(max64[1], magnitude_max(in.cb)))
    fail("launch_max_abs %.9g / %.9g", max64[0], max64[1]);

  for (void* p : {static_cast<void*>(dz), static_cast<void*>(dcb), static_cast<void*>(dzn), static_cast<void*>(dcn),
                  static_cast<void*>(dbest), static_cast<void*>(dsecond), static_cast<void*>(ddist),
                  static_cast<void*>(ddist2), static_cast<void*>(didx), static_cast<void*>(dlist),
                  static_cast<void*>(dcw), static_cast<void*>(dcw2), static_cast<void*>(dmax),
                  static_cast<void*>(dcount), static_cast<void*>(dz64), static_cast<void*>(dcb64),
                  static_cast<void*>(dmax64), dworkspace})
    CHECK_CUDA(cudaFree(p));
  std::printf("rerank %-12s %s %-11s N=%-4lld K=%-4lld D=%-3lld %s (%lld rows re-ranked)\n", in.what, name_of<T>(),
              kind == Rerank::kFloat64 ? "float64" : "compensated", static_cast<long long>(n),
              static_cast<long long>(k), static_cast<long long>(d), failures ? "FAIL" : "pass",
              static_cast<long long>(expected));
  return failures;
}

// Inputs for the re-rank checks, rounded to T (16-bit grids are coarser: the near ties scale with them).
template <typename T>
std::vector<Inputs> rerank_inputs(std::mt19937& rng) {
  const auto round = [](std::vector<float>& v) {
    for (auto& x : v) x = as_float(from_float<T>(x));
  };
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  const bool fp32 = std::is_same_v<T, float>;
  std::vector<Inputs> out;
  {  // near ties: a common offset far above the gaps (the float32 expansion cannot order them)
    Inputs in{"near-ties", 150, 70, 24, {}, {}};
    const float base = fp32 ? 1000.f : 8.f, step = fp32 ? 0x1p-6f : (std::is_same_v<T, __half> ? 0x1p-6f : 0x1p-4f);
    in.cb.assign(in.k * in.d, base);
    in.z.assign(in.n * in.d, base);
    for (int64_t c = 0; c < in.k; ++c) in.cb[c * in.d + c % in.d] += step * static_cast<float>(1 + pick(rng) % 3);
    for (int64_t i = 0; i < in.n; ++i) in.z[i * in.d + pick(rng) % in.d] += step * static_cast<float>(pick(rng) % 4);
    round(in.cb);
    round(in.z);
    out.push_back(std::move(in));
  }
  {  // copies: codewords repeated across code tiles, rows on them and between them
    Inputs in{"copies", 100, 130, 9, {}, {}};
    in.cb.resize(in.k * in.d);
    for (int64_t c = 0; c < in.k; ++c)
      for (int64_t j = 0; j < in.d; ++j) in.cb[c * in.d + j] = c < 10 ? normal(rng) : in.cb[(c % 10) * in.d + j];
    round(in.cb);
    in.z.resize(in.n * in.d);
    for (int64_t i = 0; i < in.n; ++i)
      for (int64_t j = 0; j < in.d; ++j)
        in.z[i * in.d + j] = i % 2 ? in.cb[((i * 7) % in.k) * in.d + j]
                                   : 0.5f * (in.cb[(i % 10) * in.d + j] + in.cb[((i + 1) % 10) * in.d + j]);
    round(in.z);
    out.push_back(std::move(in));
  }
  {  // every row ambiguous, more rows than the re-rank grid has warps: z = 0 between +-e_0
    Inputs in{"all-tied", 300, 5, 4, std::vector<float>(300 * 4, 0.f), std::vector<float>(5 * 4, 0.f)};
    in.cb[0] = 1.f, in.cb[4] = -1.f, in.cb[8] = 1.f, in.cb[13] = 2.f, in.cb[16] = 1.f;
    out.push_back(std::move(in));
  }
  {  // NaN / Inf: a NaN row, an Inf row, a NaN codeword (never chosen), an Inf codeword
    Inputs in{"non-finite", 20, 70, 6, {}, {}};
    in.z.resize(in.n * in.d);
    in.cb.resize(in.k * in.d);
    for (auto& v : in.z) v = normal(rng);
    for (auto& v : in.cb) v = normal(rng);
    round(in.z);
    round(in.cb);
    in.z[3 * in.d + 2] = NAN;
    in.z[5 * in.d + 1] = INFINITY;
    in.cb[0 * in.d + 4] = NAN;
    in.cb[9 * in.d + 0] = -INFINITY;
    for (int64_t j = 0; j < in.d; ++j) in.z[7 * in.d + j] = in.cb[j];  // the NaN codeword's own values
    out.push_back(std::move(in));
  }
  {  // magnitudes: distances beyond float32 (the compensated scan hands them to float64) and below
     // its smallest normal (underflowing squares)
    Inputs in{"magnitudes", 40, 65, 5, {}, {}};
    const float big = fp32 ? 1e19f : (std::is_same_v<T, __half> ? 6e4f : 1e37f);
    in.z.resize(in.n * in.d);
    in.cb.resize(in.k * in.d);
    for (int64_t i = 0; i < in.n; ++i)
      for (int64_t j = 0; j < in.d; ++j) in.z[i * in.d + j] = normal(rng) * (i < 20 ? big : 1e-25f);
    for (int64_t c = 0; c < in.k; ++c)
      for (int64_t j = 0; j < in.d; ++j) in.cb[c * in.d + j] = normal(rng) * (c % 2 ? big : 1e-25f);
    round(in.z);
    round(in.cb);
    out.push_back(std::move(in));
  }
  {  // random rows, a third of them halfway between two codewords: proven rows keep the search's pick
    Inputs in{"mixed", 90, 200, 12, {}, {}};
    in.z.resize(in.n * in.d);
    in.cb.resize(in.k * in.d);
    for (auto& v : in.cb) v = normal(rng);
    round(in.cb);
    for (int64_t i = 0; i < in.n; ++i)
      for (int64_t j = 0; j < in.d; ++j)
        in.z[i * in.d + j] = i % 3 ? normal(rng) : 0.5f * (in.cb[(i % 50) * in.d + j] + in.cb[(i % 50 + 70) * in.d + j]);
    round(in.z);
    out.push_back(std::move(in));
  }
  if (!std::is_same_v<T, __half>) {  // a float64-level near tie (fp16 cannot hold 2^50): z = -2^50 (1, ..., 1)
    // against 0 and -e_0, 2^51 apart in 4 2^100: beyond the compensated bound, so float64 decides.
    Inputs in{"float64-tie", 8, 4, 4, std::vector<float>(8 * 4, -0x1p50f), std::vector<float>(4 * 4, 0.f)};
    in.cb[1 * 4 + 0] = -1.f;
    in.cb[2 * 4 + 1] = -1.f;
    in.cb[3 * 4 + 0] = -1.f;  // a copy of codeword 1
    for (int64_t j = 0; j < 4; ++j) in.z[7 * 4 + j] = 0.f;  // a row on codeword 0
    out.push_back(std::move(in));
  }
  {  // one codeword
    Inputs in{"one-code", 9, 1, 3, {}, {}};
    in.z.resize(in.n * in.d);
    in.cb.resize(in.d);
    for (auto& v : in.z) v = normal(rng);
    for (auto& v : in.cb) v = normal(rng);
    round(in.z);
    round(in.cb);
    out.push_back(std::move(in));
  }
  return out;
}

template <typename T>
int run_rerank_checks(std::mt19937& rng, bool fail_fast) {
  int failures = 0;
  for (const Inputs& in : rerank_inputs<T>(rng)) {
    for (Rerank kind : {Rerank::kFloat64, Rerank::kCompensated}) {
      failures += run_exact_pipeline<T>(in, kind);
      if (fail_fast && failures) return failures;
    }
  }
  return failures;
}

}  // namespace

int main(int argc, char** argv) {
  std::mt19937 rng(0);
  // D = 8, 16 and 64 take the 16-byte loads for every element type, D = 4 and 100 only for fp32.
  // Smaller D keep the block's z resident in shared memory; D = 520 streams z tiles except in fast
  // mode with 16-bit elements (resident, above the default 48 KiB), D = 600 streams them always.
  // D = 1, 3, 4 take 4-feature stages (z resident), D = 5 and 8 take 8-feature stages.
  // The small set: the host emulator (which runs a block's threads one at a time) and GPU runs under
  // compute-sanitizer (`--small`); still partial row and code tiles, every load path, the split
  // search (4 emulated SMs; on a GPU through N = 3, K = 1500) and both z paths.
  const std::vector<Shape> small = {{1, 1, 1},     {1, 5, 3},    {7, 130, 17},  {100, 65, 100},
                                    {65, 64, 16},  {129, 200, 4}, {3, 1500, 8},  {70, 300, 24},
                                    {1, 777, 64},  {70, 1024, 64, true}, {3, 70, 520}, {2, 70, 600},
                                    {40, 100, 5}};
  const std::vector<Shape> full = {{1, 1, 1},     {1, 5, 3},       {7, 130, 17},    {100, 65, 100},
                                   {257, 1000, 64}, {65, 64, 16},  {300, 4099, 33}, {3, 70000, 8},
                                   {1, 100003, 64}, {129, 200, 4}, {1024, 1024, 64, true}, {100, 3000, 256},
                                   {33, 300, 600}, {500, 2000, 5}};
#if defined(VQFAST_CUDA_EMULATION)
  const bool use_small = true;
#else
  const bool use_small = argc > 1 && std::strcmp(argv[1], "--small") == 0;
#endif
  (void)argc;
  (void)argv;
  const std::vector<Shape>& shapes = use_small ? small : full;
  // VQFAST_CHECK_FAIL_FAST=1 stops at the first failing case (the planted-bug tests).
  const char* fail_fast_env = std::getenv("VQFAST_CHECK_FAIL_FAST");
  const bool fail_fast = fail_fast_env != nullptr && std::strcmp(fail_fast_env, "1") == 0;
  int failures = 0;
  for (const Shape& s : shapes) {
    for (Mode mode : {Mode::kExactFma, Mode::kFastTensor}) {
      failures += run_case<float>(s, mode, rng);
      failures += run_case<__half>(s, mode, rng);
      failures += run_case<__nv_bfloat16>(s, mode, rng);
      if (fail_fast && failures) {
        std::printf("FAILED\n");
        return 1;
      }
    }
  }
  for (auto run : {run_rerank_checks<float>, run_rerank_checks<__half>, run_rerank_checks<__nv_bfloat16>}) {
    failures += run(rng, fail_fast);
    if (fail_fast && failures) {
      std::printf("FAILED\n");
      return 1;
    }
  }
#if defined(VQFAST_CUDA_EMULATION)
  // The launcher opts a kernel in to large dynamic shared memory once per device, not per launch:
  // the emulator records every cudaFuncSetAttribute call (D = 520 in 16-bit fast mode launches its
  // resident kernels several times: unsplit and split).
  const auto& limits = vqfast_emu::dynamic_limits();
  for (size_t i = 0; i < limits.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      if (limits[i].first == limits[j].first) {
        std::printf("FAIL cudaFuncSetAttribute called again for a kernel already opted in (call %zu)\n", i + 1);
        ++failures;
      }
  if (limits.empty()) {
    std::printf("FAIL no kernel was opted in to large dynamic shared memory (the D = 520 cases need it)\n");
    ++failures;
  }
#endif
  std::printf(failures ? "FAILED\n" : "all checks passed\n");
  return failures ? 1 : 0;
}
