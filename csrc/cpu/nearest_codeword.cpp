// CPU nearest-codeword search: parallel over tiles of rows, no N x K buffer.
//
// This file is the driver, compiled for the baseline instruction set: it converts z (any float
// dtype, any strides; cosine normalisation) tile by tile, sets each row's rounding bound, hands the
// tile to the search kernel of the instruction level chosen at run time (dispatch.cpp;
// kernels/search.h holds the kernel, compiled once per level), and re-ranks the few candidates of
// ambiguous rows by the directly computed sum((z - c)^2) in double ("exact" precision, lowest index
// on ties). Distances are recomputed directly for the chosen codeword. The re-rank and the
// distances are computed here, once for every level, so every level returns the same indices and
// bit-identical distances.
// Memory beyond inputs and outputs: a copy of the codebook scaled by -2 (K x D in the compute
// type) plus O(threads x tile).
#include "nearest_codeword.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "dispatch.h"
#include "kernels/kernel.h"

namespace vqfast {
namespace cpu {
namespace {

// A sum in double over D terms with four partial sums: one serial chain of dependent adds costs ~4
// cycles a term, a fifth of the whole search per row at K = 256, D = 16 (one fixed order, the same
// at every instruction level).
template <typename T, typename F>
inline double sum4(int64_t D, F&& term) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
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
  return sum4<T>(D, [&](int64_t j) {
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

template <typename T>
double unit_roundoff() {
  return std::is_same<T, double>::value ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
}

// z_src: the caller's z (any float dtype, any strides); cb: [K, D] contiguous, already normalised
// for cosine. Writes indices and fp32 distances.
template <typename T, typename src_t>
void search(const at::Tensor& z_src, const T* cb, int64_t K, int64_t D, bool cosine, bool exact, int64_t* out_idx,
            float* out_dist) {
  const Kernels& kernels = isa_kernels();
  const int64_t N = z_src.size(0);
  const int64_t zs0 = z_src.stride(0), zs1 = z_src.stride(1);
  const src_t* zp = z_src.const_data_ptr<src_t>();
  // z used in place when it already is contiguous T and needs no normalisation.
  const bool direct = std::is_same<T, src_t>::value && !cosine && (zs1 == 1 || D == 1) && (zs0 == D || N == 1);

  // The kernels' codebook: -2 c (exact) and ||c||^2, padded to whole steps with codewords that
  // never win. max||c|| in double for the bound.
  const int64_t Kp = (K + CODE_PAD - 1) / CODE_PAD * CODE_PAD;
  std::vector<T> cb_m2(static_cast<size_t>(Kp * D), T(0));
  std::vector<T> csq(static_cast<size_t>(Kp), std::numeric_limits<T>::infinity());
  double cmax2 = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    double s = 0.0;
    T st = 0;
    for (int64_t j = 0; j < D; ++j) {
      const T c = cb[k * D + j];
      s += static_cast<double>(c) * c;
      st += c * c;
      cb_m2[k * D + j] = T(-2) * c;
    }
    csq[k] = st;
    cmax2 = std::max(cmax2, s);
  }
  // Each computed v_k = ||c_k||^2 - 2 z.c_k is within gamma_{D+3} max||c|| (2 ||z|| + max||c||) of its
  // true value (products, sums and the final add, in any order, with or without FMA); two of them
  // compare safely beyond twice that. The kernels set each row's bound from this coefficient and
  // ||z|| (kernels/search.h: init_states). There is no ||z||^2 term: dropping the reference's
  // matters when the codebook is tiny next to z (the classic uniform [-1/K, 1/K] initialisation),
  // where the looser bound made every row ambiguous.
  const double n_terms = static_cast<double>(D + 3);
  const double u = unit_roundoff<T>();
  const double gamma = n_terms * u / (1.0 - n_terms * u);
  const T tol_coef = exact ? static_cast<T>(2.0 * gamma * (1.0 + 4.0 * u)) : T(0);
  // Products and squares below the smallest normal number lose up to half a subnormal spacing each,
  // which the relative bound does not cover (float32: |z_j|, |c_j| < 1e-19; at 2^-75 half the rows
  // of a Gaussian sample were ranked wrongly without it). The same term as reference.ranking_tolerance;
  // (D + 3) 2^-146 in float32 is itself a representable (subnormal) number.
  const T tol_floor = exact ? static_cast<T>(8.0 * static_cast<double>(D + 3) *
                                             static_cast<double>(std::numeric_limits<T>::min()) *
                                             static_cast<double>(std::numeric_limits<T>::epsilon()))
                            : T(0);
  // Rounded up past the double computation and the conversion to T.
  const T cmax_up = static_cast<T>(std::sqrt(cmax2) * (1.0 + static_cast<double>(D + 2) * 0x1p-50)) *
                    (T(1) + T(4) * static_cast<T>(u));

  const int64_t n_tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
  // Tiles are handed out one at a time from a shared counter rather than in fixed halves: on a
  // shared machine a descheduled thread would otherwise leave the other idle at the end.
  std::atomic<int64_t> next_tile{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<T> zbuf(direct ? 0 : TILE_ROWS * D);
    std::vector<RowState<T>> state(TILE_ROWS);
    std::vector<T> scratch(static_cast<size_t>(D * TILE_ROWS + BLOCK_ELEMS));
    for (int64_t tile = next_tile.fetch_add(1); tile < n_tiles; tile = next_tile.fetch_add(1)) {
      const int64_t r0 = tile * TILE_ROWS;
      const int64_t mt = std::min(TILE_ROWS, N - r0);
      const T* zt;
      if (direct) {
        zt = reinterpret_cast<const T*>(zp) + r0 * D;
      } else {
        for (int64_t r = 0; r < mt; ++r) {
          const src_t* src = zp + (r0 + r) * zs0;
          T* dst = zbuf.data() + r * D;
          for (int64_t j = 0; j < D; ++j) dst[j] = static_cast<T>(src[j * zs1]);
          if (cosine) {  // x / max(||x||, 1e-12), as torch.nn.functional.normalize
            double s = 0.0;
            for (int64_t j = 0; j < D; ++j) s += static_cast<double>(dst[j]) * dst[j];
            const T inv = static_cast<T>(1.0 / std::max(std::sqrt(s), 1e-12));
            for (int64_t j = 0; j < D; ++j) dst[j] *= inv;
          }
        }
        zt = zbuf.data();
      }
      const TileArgs<T> args{zt, mt, D, cb_m2.data(), csq.data(), K, Kp, tol_coef, cmax_up, tol_floor, state.data(),
                                 scratch.data()};
      if constexpr (std::is_same<T, float>::value) {
        kernels.search_f32(args);
      } else {
        kernels.search_f64(args);
      }
      for (int64_t r = 0; r < mt; ++r) {
        const T* zr = zt + r * D;
        const int64_t k = finish_row(state[r], zr, cb, K, D, exact);
        out_idx[r0 + r] = k;
        out_dist[r0 + r] = static_cast<float>(direct_distance(zr, cb + k * D, D));
      }
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
  // The kernels keep codeword indices in int32 lanes (fp32) next to the values they compare.
  TORCH_CHECK(codebook.size(0) <= std::numeric_limits<int32_t>::max() - CODE_PAD,
              "vqfast::nearest_codeword (CPU kernel): at most 2^31 - 25 codewords, got K=", codebook.size(0));

  const int64_t N = z.size(0), K = codebook.size(0), D = z.size(1);
  const bool f64 = z.scalar_type() == at::kDouble || codebook.scalar_type() == at::kDouble;
  const bool cosine = metric == "cosine";
  const bool exact = precision == "exact";
  const auto acc = f64 ? at::kDouble : at::kFloat;
  // The codebook is small (K x D) next to z: convert and normalise it once with ATen.
  at::Tensor cf = codebook.to(acc).contiguous();
  if (cosine) {
    cf = (cf / cf.norm(2, {1}, true).clamp_min(1e-12)).contiguous();
  }
  at::Tensor indices = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (N > 0 && D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "vqfast_nearest_codeword_cpu", [&] {
      if (f64) {
        search<double, scalar_t>(z, cf.const_data_ptr<double>(), K, D, cosine, exact, indices.data_ptr<int64_t>(),
                                 distances.data_ptr<float>());
      } else {
        search<float, scalar_t>(z, cf.const_data_ptr<float>(), K, D, cosine, exact, indices.data_ptr<int64_t>(),
                                distances.data_ptr<float>());
      }
    });
  } else if (N > 0) {  // D = 0: every codeword is at distance 0, the lowest index wins
    indices.zero_();
    distances.zero_();
  }
  at::Tensor codewords = codebook.index_select(0, indices).to(z.scalar_type());
  return {indices, codewords, distances};
}

}  // namespace cpu
}  // namespace vqfast
