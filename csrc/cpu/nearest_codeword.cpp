// CPU nearest-codeword search: one parallel pass over tiles of rows, no N x K buffer.
//
// This file is the driver, compiled for the baseline instruction set. Per call it reads the
// codebook once (||c||^2 of every codeword, max||c|| for the rounding bound, a zero-padded copy of
// the last partial step; the kernels read the codebook itself in place), then one parallel region
// hands tiles of rows to the threads. Per tile it converts z when needed (any float dtype, any
// strides; cosine normalisation), hands the tile to the search kernel of the instruction level
// chosen at run time (dispatch.cpp; kernels/search.h holds the kernel, compiled once per level),
// re-ranks the few candidates of ambiguous rows by the directly computed sum((z - c)^2) in double
// ("exact" precision, lowest index on ties), and writes each row's index, codeword and distance
// while the tile is in cache. The re-rank and the distances are computed here, once for every
// level, so every level returns the same indices and bit-identical distances.
//
// nearest_codeword_checked adds the checks of vqfast.nearest_codeword(check_finite=True) to the
// same pass (the kernels test each tile's values as they load them; the codebook is tested here):
// float32 inputs beyond magnitude_limit(D, float32) are searched again in float64, and NaN, Inf or
// float64 values beyond magnitude_limit(D, float64) raise a ValueError. A separate scan cost a
// parallel pass of its own, and the gather of the codewords another.
// Memory beyond inputs and outputs: ||c||^2 (K values) and one padded step of the codebook, plus
// per thread a tile and its transpose (kept between calls).
#include "nearest_codeword.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../tolerance.h"
#include "dispatch.h"
#include "kernels/kernel.h"

namespace vqfast {
namespace cpu {
namespace {

// A sum over D terms with four partial sums in one fixed order (the same at every instruction
// level): one serial chain of dependent adds costs ~4 cycles a term, a fifth of the whole search
// per row at K = 256, D = 16.
template <typename S, typename F>
inline S sum4(int64_t D, F&& term) {
  S s[4] = {0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 4 <= D; j += 4) {
    for (int q = 0; q < 4; ++q) s[q] += term(j + q);
  }
  for (; j < D; ++j) s[0] += term(j);
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Direct squared distance in double: the arbiter for near-ties (differences of fp32 values are
// exact in double, so only the products and the sum round).
template <typename T>
inline double direct_distance(const T* a, const T* b, int64_t D) {
  return sum4<double>(D, [&](int64_t j) {
    const double t = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    return t * t;
  });
}

template <typename T>
int64_t finish_row(const RowState<T>& s, const T* zr, const T* cb, int64_t K, int64_t D, bool exact) {
  if (!exact) return s.best_k;
  if (!s.overflow && s.n <= 1) return s.best_k;  // one candidate: the argmin is provably exact
  int64_t best_k = 0;
  double best = std::numeric_limits<double>::infinity();
  if (s.overflow) {
    for (int64_t k = 0; k < K; ++k) {
      const double d = direct_distance(zr, cb + k * D, D);
      if (d < best) {
        best = d;
        best_k = k;
      }
    }
    return best_k;
  }
  best_k = s.cand_k[0];
  for (int c = 0; c < s.n; ++c) {  // candidates in ascending k
    const double d = direct_distance(zr, cb + s.cand_k[c] * D, D);
    if (d < best) {
      best = d;
      best_k = s.cand_k[c];
    }
  }
  return best_k;
}

// vqfast/_validation.py's magnitude_limit(D, T), computed with the same double operations: the
// largest |value| for which every squared distance over D features stays finite in T.
template <typename T>
double magnitude_limit(int64_t D) {
  return std::sqrt(static_cast<double>(std::numeric_limits<T>::max()) / (8.0 * static_cast<double>(D)));
}

// The largest T not above `limit`, so that |x| <= it exactly when |x| <= limit.
template <typename T>
T limit_as(double limit) {
  T t = static_cast<T>(limit);
  return static_cast<double>(t) > limit ? std::nextafter(t, T(0)) : t;
}

// True when every one of the n values is finite and |x| <= limit (a NaN fails the comparison).
template <typename T>
bool within(const T* x, int64_t n, T limit) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::fabs(x[i]) <= limit);
  return bad == 0;
}

// True when every one of the n values is zero (-0 included).
template <typename T>
bool all_zero(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] != T(0)) return false;
  }
  return true;
}

struct Norms {
  double cmax2;  // an upper bound of max_k ||c_k||^2
  bool within;   // every value finite and within the limit
};

// One pass over the codebook: csq[k] = ||c_k||^2 in T for the kernels (sum4's order), the bound of
// max ||c||^2, and within(cb, K D, limit). The bound comes from the computed norms rather than from
// a second sum in double, which cost as much as the search at N = 16, K = 4096, D = 32: a product
// rounds by one u relative plus, below the normal range, at most half the smallest subnormal; a sum
// of D nonnegative terms by gamma_{D-1} relative. So ||c||^2 <= csq (1 + 2 gamma_D) + D denorm_min,
// and the computation in double is rounded up by one more factor (1 + 2^-50).
template <typename T>
Norms codeword_norms(const T* cb, int64_t K, int64_t D, T limit, T* csq) {
  // Written with 4-lane vectors, lane q holding sum4's partial sum q (the same values as
  // sum4<T>), and four codewords at a time: one codeword's chain of dependent adds, 3 cycles each,
  // bounded the pass at D / 4 x 3 cycles a codeword (as long as the search at N = 16, D = 32).
  typedef T V __attribute__((vector_size(4 * sizeof(T))));
  typedef decltype(V{} < V{}) Mask;
  constexpr int C = 4;
  const V lim = limit - V{}, nlim = -limit - V{};
  Mask ok = ~Mask{};
  T top = 0;
  for (int64_t k0 = 0; k0 < K; k0 += C) {
    const int nc = static_cast<int>(std::min<int64_t>(C, K - k0));
    V s[C] = {};
    int64_t j = 0;
    for (; j + 4 <= D; j += 4) {
      for (int c = 0; c < nc; ++c) {
        V x;
        std::memcpy(&x, cb + (k0 + c) * D + j, sizeof(x));
        s[c] += x * x;
        ok &= (x <= lim) & (nlim <= x);  // false for NaN
      }
    }
    for (int c = 0; c < nc; ++c) {
      const T* row = cb + (k0 + c) * D;
      for (int64_t t = j; t < D; ++t) {
        s[c][0] += row[t] * row[t];
        ok[0] &= -static_cast<int>(std::fabs(row[t]) <= limit);
      }
      const T n = (s[c][0] + s[c][1]) + (s[c][2] + s[c][3]);
      csq[k0 + c] = n;
      top = n > top ? n : top;  // a NaN norm (NaN in c, check_finite=False) is skipped
    }
  }
  const double u = unit_roundoff<T>();
  const double gamma = static_cast<double>(D) * u / (1.0 - static_cast<double>(D) * u);
  const double denorm = static_cast<double>(std::numeric_limits<T>::denorm_min());
  return {(static_cast<double>(top) * (1.0 + 2.0 * gamma) + static_cast<double>(D) * denorm) * (1.0 + 0x1p-50),
          ok[0] != 0 && ok[1] != 0 && ok[2] != 0 && ok[3] != 0};
}

// A worker's buffers, kept between calls (allocating and zeroing them cost more than the search of
// a small tile): the converted tile, the kernels' scratch, the rows' states.
template <typename T>
struct TileBuffers {
  std::vector<T> z;
  std::vector<T> scratch;
  std::vector<RowState<T>> state;
};

template <typename T>
TileBuffers<T>& tile_buffers() {
  static thread_local TileBuffers<T> buffers;
  return buffers;
}

// Which input stopped a checked search, or nullptr when it ran to the end.
using Failed = const char*;

// One search in compute type T. z: the caller's z (any float dtype src_t, any strides); codebook:
// any float dtype and strides. Writes indices, codewords (codebook rows in src_t) and fp32
// distances. With check, stops at the first value of the codebook or of a tile of z that is NaN,
// infinite or beyond magnitude_limit(D, T), and names the input (the outputs are then partial).
template <typename T, typename src_t>
Failed search(const at::Tensor& z, const at::Tensor& codebook, bool cosine, bool exact, bool check, int64_t* out_idx,
              src_t* out_cw, float* out_dist) {
  const Kernels& kernels = isa_kernels();
  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const T limit = limit_as<T>(magnitude_limit<T>(D));

  // The codebook in T (no copy when it already is contiguous T), tested before any normalisation
  // (the limit is about the caller's values): here for cosine, else with the norms below.
  const at::Tensor raw = codebook.to(c10::CppTypeToScalarType<T>::value).contiguous();
  if (check && cosine && !within(raw.const_data_ptr<T>(), K * D, limit)) return "codebook";
  // The codebook is small (K x D) next to z: normalise it once with ATen.
  const at::Tensor searched = cosine ? (raw / raw.norm(2, {1}, true).clamp_min(1e-12)).contiguous() : raw;
  const T* cb = searched.const_data_ptr<T>();
  const T* cb_out = raw.const_data_ptr<T>();  // the codewords returned: the caller's, not normalised
  // Cosine and zero vectors (vqfast/reference.py, cosine_zero_rows): a zero row of z has no direction;
  // it takes the first zero codeword (distance 0), else codeword 0 with distance exactly 1, whatever
  // the normalised codewords' lengths round to.
  int64_t zero_k = 0;
  float zero_dist = 1.0f;
  if (cosine) {
    for (int64_t k = 0; k < K; ++k) {
      if (all_zero(cb_out + k * D, D)) {
        zero_k = k;
        zero_dist = 0.0f;
        break;
      }
    }
  }

  // ||c||^2 for the kernels, padded to whole steps with codewords that never win (+inf); the last
  // partial step's codewords copied next to zero rows, so a step never reads past the codebook.
  const int64_t Kp = (K + CODE_PAD - 1) / CODE_PAD * CODE_PAD;
  const int64_t Kfull = K / CODE_PAD * CODE_PAD;
  std::vector<T> csq(static_cast<size_t>(Kp), std::numeric_limits<T>::infinity());
  std::vector<T> tail(static_cast<size_t>(CODE_PAD * D), T(0));
  std::copy(cb + Kfull * D, cb + K * D, tail.begin());
  const Norms norms = codeword_norms(cb, K, D, limit, csq.data());
  if (check && !cosine && !norms.within) return "codebook";
  const double cmax2 = norms.cmax2;
  // Each computed v_k = ||c_k||^2 - 2 z.c_k is within gamma_{D+3} max||c|| (2 ||z|| + max||c||) of its
  // true value (products, sums and the final add, in any order, with or without FMA); two of them
  // compare safely beyond twice that. The kernels set each row's bound from this coefficient and
  // ||z|| (kernels/search.h: init_states). There is no ||z||^2 term: dropping the reference's
  // matters when the codebook is tiny next to z (the classic uniform [-1/K, 1/K] initialisation),
  // where the looser bound made every row ambiguous. The coefficient and the floor are
  // reference.ranking_tolerance's (csrc/tolerance.h); the coefficient gains (1 + 4u) for its
  // conversion to T and the kernels' rounding of the product.
  const double u = unit_roundoff<T>();
  const T tol_coef = exact ? static_cast<T>(ranking_tolerance_coef<T>(D) * (1.0 + 4.0 * u)) : T(0);
  // Products and squares below the smallest normal number lose up to half a subnormal spacing each,
  // which the relative bound does not cover (float32: |z_j|, |c_j| < 1e-19; at 2^-75 half the rows
  // of a Gaussian sample were ranked wrongly without it). (D + 3) 2^-146 in float32 is itself a
  // representable (subnormal) number.
  const T tol_floor = exact ? static_cast<T>(ranking_tolerance_floor<T>(D)) : T(0);
  // Rounded up past the double computation and the conversion to T.
  const T cmax_up = static_cast<T>(std::sqrt(cmax2) * (1.0 + static_cast<double>(D + 2) * 0x1p-50)) *
                    (T(1) + T(4) * static_cast<T>(u));

  const int64_t zs0 = z.stride(0), zs1 = z.stride(1);
  const src_t* zp = z.const_data_ptr<src_t>();
  // z used in place when it already is contiguous T and needs no normalisation.
  const bool direct = std::is_same<T, src_t>::value && !cosine && (zs1 == 1 || D == 1) && (zs0 == D || N == 1);
  const int64_t n_tiles = (N + TILE_ROWS - 1) / TILE_ROWS;

  // From D = 128 the runtime-D kernels read the codebook faster step by step (kernel.h:
  // TileArgs::cb_steps): 0.90x the time at N = 8192, K = 8192, D = 256, the same at D = 64 and
  // 128 (AVX2, one thread, CPU time). The copy costs about one tile's search: made from 16 tiles on.
  std::vector<T> steps;
  if (D >= 128 && n_tiles >= 16) {
    const int64_t S = kernels.step;
    steps.assign(static_cast<size_t>(Kp * D), T(0));
    for (int64_t k = 0; k < K; ++k) {
      T* dst = steps.data() + (k - k % S) * D + k % S;
      for (int64_t j = 0; j < D; ++j) dst[j * S] = cb[k * D + j];
    }
  }
  // Tiles are handed out one at a time from a shared counter rather than in fixed halves: on a
  // shared machine a descheduled thread would otherwise leave the other idle at the end.
  std::atomic<int64_t> next_tile{0};
  std::atomic<Failed> failed{nullptr};
  // A second thread only for enough work: waking it costs more than ~2^20 multiply-adds (~40 us of
  // one core) on a quiet machine, and milliseconds on a loaded one.
  const double work = static_cast<double>(N) * static_cast<double>(Kp) * static_cast<double>(D);
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), n_tiles, static_cast<int64_t>(std::min(work / 0x1p20, 1e6))});
  const int64_t workers = std::max<int64_t>(1, threads);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    TileBuffers<T>& buf = tile_buffers<T>();
    if (!direct && buf.z.size() < static_cast<size_t>(TILE_ROWS * D)) buf.z.resize(TILE_ROWS * D);
    if (buf.scratch.size() < static_cast<size_t>(VQFAST_SCRATCH(D))) buf.scratch.resize(VQFAST_SCRATCH(D));
    buf.state.resize(TILE_ROWS);
    for (int64_t tile = next_tile.fetch_add(1); tile < n_tiles; tile = next_tile.fetch_add(1)) {
      if (failed.load(std::memory_order_relaxed) != nullptr) return;
      const int64_t r0 = tile * TILE_ROWS;
      const int64_t mt = std::min(TILE_ROWS, N - r0);
      const T* zt;
      if (direct) {
        zt = reinterpret_cast<const T*>(zp) + r0 * D;
      } else {
        for (int64_t r = 0; r < mt; ++r) {
          const src_t* src = zp + (r0 + r) * zs0;
          T* dst = buf.z.data() + r * D;
          for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<T>(src[j * zs1]);
          if (cosine) {  // x / max(||x||, 1e-12), as torch.nn.functional.normalize
            if (check && !within(dst, D, limit)) {  // the caller's values, before normalisation
              failed.store("z");
              return;
            }
            double s = 0.0;
            for (int64_t j = 0; j < D; ++j) s += static_cast<double>(dst[j]) * dst[j];
            const T inv = static_cast<T>(1.0 / std::max(std::sqrt(s), 1e-12));
            for (int64_t j = 0; j < D; ++j) dst[j] *= inv;
          }
        }
        zt = buf.z.data();
      }
      const TileArgs<T> args{zt,       mt,      D,     cb,    tail.data(),      csq.data(),
                             steps.empty() ? nullptr : steps.data(),   K,     Kfull, Kp,
                             tol_coef, cmax_up, tol_floor, check, limit, buf.state.data(), buf.scratch.data()};
      bool searched_tile;
      if constexpr (std::is_same<T, float>::value) {
        searched_tile = kernels.search_f32(args);
      } else {
        searched_tile = kernels.search_f64(args);
      }
      if (!searched_tile) {
        failed.store("z");
        return;
      }
      for (int64_t r = 0; r < mt; ++r) {
        const T* zr = zt + r * D;
        // A zero row stays zero when normalised (and a nonzero one nonzero): test the searched row.
        const bool zero_row = cosine && all_zero(zr, D);
        const int64_t k = zero_row ? zero_k : finish_row(buf.state[r], zr, cb, K, D, exact);
        out_idx[r0 + r] = k;
        out_dist[r0 + r] = zero_row ? zero_dist : static_cast<float>(direct_distance(zr, cb + k * D, D));
        src_t* cw = out_cw + (r0 + r) * D;
        if constexpr (std::is_same<T, src_t>::value) {
          std::memcpy(cw, cb_out + k * D, static_cast<size_t>(D) * sizeof(T));
        } else {
          for (int64_t j = 0; j < D; ++j) cw[j] = static_cast<src_t>(cb_out[k * D + j]);
        }
      }
    }
  });
  return failed.load();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run(const at::Tensor& z, const at::Tensor& codebook,
                                                   c10::string_view metric, c10::string_view precision, bool check) {
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
  // The kernels keep codeword indices in int32 lanes (fp32) next to the values they compare.
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max() - CODE_PAD,
              "vqfast::nearest_codeword (CPU kernel): at most 2^31 - 25 codewords, got K=", codebook.size(0));

  const int64_t N = z.size(0), D = z.size(1);
  const bool f64 = z.scalar_type() == at::kDouble || codebook.scalar_type() == at::kDouble;
  const bool cosine = metric == "cosine";
  const bool exact = precision == "exact";
  at::Tensor indices = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor codewords = at::empty({N, D}, z.options());
  at::Tensor distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (D == 0) {  // every codeword is at distance 0, the lowest index wins
    indices.zero_();
    distances.zero_();
    return {indices, codewords, distances};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vqfast_nearest_codeword_cpu", [&] {
    int64_t* idx = indices.data_ptr<int64_t>();
    scalar_t* cw = codewords.data_ptr<scalar_t>();
    float* dist = distances.data_ptr<float>();
    Failed failed = nullptr;
    if (!f64) failed = search<float, scalar_t>(z, codebook, cosine, exact, check, idx, cw, dist);
    // Float32 values beyond float32's range (or NaN/Inf, which float64 reports below): float64.
    if (f64 || failed != nullptr) failed = search<double, scalar_t>(z, codebook, cosine, exact, check, idx, cw, dist);
    TORCH_CHECK_VALUE(failed == nullptr, "vqfast::nearest_codeword_checked: ", failed, " holds NaN, Inf or values beyond ",
                      magnitude_limit<double>(D), ", where squared distances over D=", D,
                      " features overflow float64 (vqfast.nearest_codeword says where)");
  });
  return {indices, codewords, distances};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword(
    const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric, c10::string_view precision) {
  return run(z, codebook, metric, precision, /*check=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword_checked(
    const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric, c10::string_view precision) {
  return run(z, codebook, metric, precision, /*check=*/true);
}

}  // namespace cpu
}  // namespace vqfast
