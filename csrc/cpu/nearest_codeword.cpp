// CPU nearest-codeword search: parallel over tiles of rows, no N x K buffer.
//
// Per tile of TILE_ROWS rows (converted to the compute type and, for cosine, normalised in a
// thread-local buffer when they are not already contiguous fp32), the codebook is walked in
// blocks of codewords, with the values
//     v_k = ||c_k||^2 - 2 z.c_k        (the distance less the row constant ||z||^2)
//   D > 32 (and fp64): an MKL sgemm / dgemm into a thread-local [TILE_ROWS, 512] buffer
//     (256 KiB in fp32), then one fused pass adds ||c||^2, takes the minimum and, only when the
//     block can matter, collects the codewords within the rounding bound;
//   D <= 32 (fp32): a register-blocked SIMD micro-kernel, 4 rows x 32 codewords per step, that
//     never writes the block: each lane keeps its minimum, argmin and second minimum.
// Per row the argmin and the few codewords within the rigorous rounding bound of it are kept
// (see vqfast/reference.py); rows with more than one such candidate are re-ranked by the directly
// computed sum((z - c)^2) in double ("exact" precision), lowest index on ties. Distances are
// recomputed directly for the chosen codeword.
// Memory beyond inputs and outputs: an fp32 copy of the codebook (K x D, transposed for small D)
// plus O(threads x tile).
#include "nearest_codeword.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace vqfast {
namespace cpu {
namespace {

// Rows per tile: 128 rows x 512 codewords = 256 KiB of fp32 values, inside a 2 MiB L2 with room
// for the codebook block (512 x 256 x 4 B = 512 KiB at D = 256).
constexpr int64_t TILE_ROWS = 128;
// Codewords per block of the GEMM path.
constexpr int64_t BLOCK_CODES = 512;
// Small-D path: D up to this many features runs the register-blocked micro-kernel.
constexpr int64_t SMALL_D = 32;
// Candidates kept per row before falling back to a full re-rank of the row (duplicated codewords
// or a tolerance that covers the whole codebook).
constexpr int CAND_CAP = 8;

template <typename T>
struct RowState {
  T best;
  int64_t best_k;
  T tol;  // 2 * gamma_{D+3} * max||c|| (2 ||z|| + max||c||), or 0 in "fast" precision
  int n;
  bool overflow;
  int64_t cand_k[CAND_CAP];
  T cand_v[CAND_CAP];

  void reset(T tolerance) {
    best = std::numeric_limits<T>::infinity();
    best_k = 0;
    tol = tolerance;
    n = 0;
    overflow = !std::isfinite(tolerance);
  }

  void hit(T x, int64_t k) {
    if (x < best) {  // strict: blocks and lanes arrive in ascending k, so ties keep the lowest index
      best = x;
      best_k = k;
    }
    if (x <= best + tol) {
      if (n < CAND_CAP) {
        cand_k[n] = k;
        cand_v[n] = x;
        ++n;
      } else {
        overflow = true;
      }
    }
  }

  void prune() {
    const T thr = best + tol;
    int w = 0;
    for (int c = 0; c < n; ++c) {
      if (cand_v[c] <= thr) {
        cand_k[w] = cand_k[c];
        cand_v[w] = cand_v[c];
        ++w;
      }
    }
    n = w;
  }
};

// Visits every j < n with v[j] <= thr, in ascending j. thr may be stale (too large) while f
// lowers the row minimum: f re-checks, so the stale bound only costs a comparison.
template <typename T, typename F>
inline void for_each_at_most(const T* v, int64_t n, T thr, F&& f) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    const __m512 t = _mm512_set1_ps(thr);
    for (; j + 16 <= n; j += 16) {
      __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + j), t, _CMP_LE_OQ);
      while (m) {
        const int b = __builtin_ctz(m);
        f(j + b);
        m &= m - 1;
      }
    }
  }
#endif
  for (; j < n; ++j) {
    if (v[j] <= thr) f(j);
  }
}

// Folds one block of values v[0, n) (codewords k0 .. k0 + n - 1) with minimum m into the row.
template <typename T>
inline void consider_block(RowState<T>& s, const T* v, int64_t k0, int64_t n, T m) {
  if (!(m <= s.best + s.tol)) return;  // the usual case once the row has a good minimum
  const T thr = std::min(s.best, m) + s.tol;
  for_each_at_most(v, n, thr, [&](int64_t j) { s.hit(v[j], k0 + j); });
  s.prune();
}

template <typename T>
inline T block_min_add(T* v, const T* csq, int64_t n) {
  T m = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : m)
  for (int64_t j = 0; j < n; ++j) {
    const T x = csq[j] - T(2) * v[j];
    v[j] = x;
    m = std::min(m, x);
  }
  return m;
}

// Direct squared distance in double: the arbiter for near-ties (differences of fp32 values are
// exact in double, so only the final sum rounds).
template <typename T>
inline double direct_distance(const T* a, const T* b, int64_t D) {
  double d = 0.0;
  for (int64_t j = 0; j < D; ++j) {
    const double t = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    d += t * t;
  }
  return d;
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

// ---- small-D micro-kernel (float): 4 rows x 32 codewords per step, in registers ----------------
// Each step computes 4 x 32 values v_k = ||c_k||^2 - 2 z.c_k with D broadcast-FMAs per vector.
// Nothing is stored: every lane keeps its running minimum, the codeword index of that minimum
// (strict <, so the lowest index of the lane) and its second-smallest value. At the end of a
// block the 32 lanes give the block's minimum and whether any other value lies within the
// rounding bound of it; only such ambiguous rows recompute the block to collect candidates.
// A branch per step instead (compare with the row threshold) cost ~140 ns per row in
// mispredicted new minima at K = 512, D = 8: half of the run time.
typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t ivec16 __attribute__((vector_size(64)));

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Values of one row for codewords [k0, k1) (k1 - k0 a multiple of 16), in the same operation
// order as the micro-kernel, into v.
inline void recompute_row(const float* zr, int64_t D, const float* cbt, const float* csq, int64_t Kp, int64_t k0,
                          int64_t k1, float* v) {
  for (int64_t k = k0; k < k1; k += 16) {
    vec16 acc = load16(csq + k);
    const float* col = cbt + k;
    for (int64_t j = 0; j < D; ++j, col += Kp) acc += zr[j] * load16(col);
    std::memcpy(v + (k - k0), &acc, sizeof(acc));
  }
}

// cbt: [D, Kp] holding -2 c (zero padded), csq: [Kp] (+inf padded), Kp a multiple of 32.
// Rows zt[0, mt) of the tile against codewords [k0, k1). DC > 0: D known at compile time.
// scratch: at least k1 - k0 floats.
template <int DC>
void small_d_rows(const float* zt, int64_t mt, int64_t Dr, const float* cbt, const float* csq, int64_t K, int64_t Kp,
                  int64_t k0, int64_t k1, RowState<float>* state, float* scratch) {
  const int64_t D = DC > 0 ? DC : Dr;
  const float inf = std::numeric_limits<float>::infinity();
  ivec16 lane;
  for (int l = 0; l < 16; ++l) lane[l] = l;
  for (int64_t r = 0; r < mt; r += 4) {
    const int rows = static_cast<int>(std::min<int64_t>(4, mt - r));
    const float* zr[4];
    for (int i = 0; i < 4; ++i) zr[i] = zt + (r + std::min(i, rows - 1)) * D;  // a short group repeats its last row
    vec16 mn[4][2], sec[4][2];
    ivec16 id[4][2];
    for (int i = 0; i < 4; ++i) {
      for (int h = 0; h < 2; ++h) {
        mn[i][h] = vec16{} + inf;
        sec[i][h] = vec16{} + inf;
        id[i][h] = ivec16{};
      }
    }
    for (int64_t k = k0; k < k1; k += 32) {
      vec16 acc[4][2];
      const vec16 c0 = load16(csq + k), c1 = load16(csq + k + 16);
      for (int i = 0; i < 4; ++i) {
        acc[i][0] = c0;
        acc[i][1] = c1;
      }
      const float* col = cbt + k;
      for (int64_t j = 0; j < D; ++j, col += Kp) {
        const vec16 b0 = load16(col), b1 = load16(col + 16);
        for (int i = 0; i < 4; ++i) {
          const float zj = zr[i][j];
          acc[i][0] += zj * b0;
          acc[i][1] += zj * b1;
        }
      }
      const ivec16 k_lo = lane + static_cast<int32_t>(k), k_hi = k_lo + 16;
      for (int i = 0; i < 4; ++i) {
        for (int h = 0; h < 2; ++h) {
          const vec16 a = acc[i][h];
          const ivec16 lt = a < mn[i][h];
          id[i][h] = lt ? (h ? k_hi : k_lo) : id[i][h];
          const vec16 hi = a < mn[i][h] ? mn[i][h] : a;  // max(mn, a): the loser joins the second-min
          sec[i][h] = hi < sec[i][h] ? hi : sec[i][h];
          mn[i][h] = a < mn[i][h] ? a : mn[i][h];
        }
      }
    }
    for (int i = 0; i < rows; ++i) {
      RowState<float>& s = state[r + i];
#if defined(__AVX512F__)
      // 32-lane reductions in a few instructions: this runs once per row and block (at K = 32,
      // D = 8 the scalar version took most of the time).
      const __m512 m0 = reinterpret_cast<__m512>(mn[i][0]), m1 = reinterpret_cast<__m512>(mn[i][1]);
      const float m = _mm512_reduce_min_ps(_mm512_min_ps(m0, m1));
      const __m512 mv = _mm512_set1_ps(m);
      const int32_t b0 = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(m0, mv, _CMP_EQ_OQ),
                                                      reinterpret_cast<__m512i>(id[i][0]));
      const int32_t b1 = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(m1, mv, _CMP_EQ_OQ),
                                                      reinterpret_cast<__m512i>(id[i][1]));
      const int64_t best_k = std::min(b0, b1);  // an empty mask reduces to INT32_MAX
      if (!(m <= s.best + s.tol)) continue;  // nothing in this block can matter (also all-NaN)
      const float t = std::min(s.best, m) + s.tol;
      const __m512 tv = _mm512_set1_ps(t);
      const int within = __builtin_popcount(_mm512_cmp_ps_mask(m0, tv, _CMP_LE_OQ)) +
                         __builtin_popcount(_mm512_cmp_ps_mask(m1, tv, _CMP_LE_OQ)) +
                         __builtin_popcount(_mm512_cmp_ps_mask(reinterpret_cast<__m512>(sec[i][0]), tv, _CMP_LE_OQ)) +
                         __builtin_popcount(_mm512_cmp_ps_mask(reinterpret_cast<__m512>(sec[i][1]), tv, _CMP_LE_OQ));
#else
      float m = inf;
      int64_t best_k = std::numeric_limits<int64_t>::max();
      for (int h = 0; h < 2; ++h) {
        for (int l = 0; l < 16; ++l) {
          const float x = mn[i][h][l];
          const int64_t kk = id[i][h][l];
          if (x < m || (x == m && kk < best_k)) {
            m = x;
            best_k = kk;
          }
        }
      }
      if (!(m <= s.best + s.tol)) continue;  // nothing in this block can matter (also all-NaN)
      const float t = std::min(s.best, m) + s.tol;
      int within = 0;
      for (int h = 0; h < 2; ++h) {
        for (int l = 0; l < 16; ++l) within += (mn[i][h][l] <= t) + (sec[i][h][l] <= t);
      }
#endif
      if (within == 1 && best_k < K) {  // only the block minimum itself
        s.hit(m, best_k);
        if (s.n > 1) s.prune();
      } else {  // ambiguous (near-ties, duplicates, an infinite bound): collect exactly
        recompute_row(zr[i], D, cbt, csq, Kp, k0, k1, scratch);
        const int64_t n = std::min(k1, K) - k0;
        float mm = inf;
        for (int64_t j = 0; j < n; ++j) mm = std::min(mm, scratch[j]);
        consider_block(s, scratch, k0, n, mm);
      }
    }
  }
}

using SmallDFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, int64_t, int64_t, int64_t,
                          int64_t, RowState<float>*, float*);

template <int... Ds>
SmallDFn pick_small_d(int64_t D, std::integer_sequence<int, Ds...>) {
  SmallDFn fn = &small_d_rows<0>;
  ((D == Ds + 1 ? (fn = &small_d_rows<Ds + 1>, 0) : 0), ...);
  return fn;
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
  const int64_t N = z_src.size(0);
  const int64_t zs0 = z_src.stride(0), zs1 = z_src.stride(1);
  const src_t* zp = z_src.const_data_ptr<src_t>();
  // z used in place when it already is contiguous T and needs no normalisation.
  const bool direct = std::is_same<T, src_t>::value && !cosine && (zs1 == 1 || D == 1) && (zs0 == D || N == 1);

  std::vector<T> csq(K);
  double cmax2 = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    double s = 0.0;
    T st = 0;
    for (int64_t j = 0; j < D; ++j) {
      const T c = cb[k * D + j];
      s += static_cast<double>(c) * c;
      st += c * c;
    }
    csq[k] = st;
    cmax2 = std::max(cmax2, s);
  }
  const double cmax = std::sqrt(cmax2);
  const double n_terms = static_cast<double>(D + 3);
  const double u = unit_roundoff<T>();
  const double gamma = n_terms * u / (1.0 - n_terms * u);
  // Products and squares below the smallest normal number lose up to half a subnormal spacing each,
  // which the relative bound does not cover (float32: |z_j|, |c_j| < 1e-19; at 2^-75 half the rows
  // of a Gaussian sample were ranked wrongly without it). The same term as reference.ranking_tolerance.
  const double underflow = 8.0 * static_cast<double>(D + 3) * static_cast<double>(std::numeric_limits<T>::min()) *
                           static_cast<double>(std::numeric_limits<T>::epsilon());

  const bool small_d = std::is_same<T, float>::value && D <= SMALL_D;
  // Small-D layout: -2 c transposed to [D, Kp], Kp a multiple of 32, padding never wins (+inf).
  const int64_t Kp = (K + 31) / 32 * 32;
  std::vector<float> cbt, csq_pad;
  if (small_d) {
    cbt.assign(static_cast<size_t>(D * Kp), 0.0f);
    csq_pad.assign(static_cast<size_t>(Kp), std::numeric_limits<float>::infinity());
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t j = 0; j < D; ++j) cbt[j * Kp + k] = -2.0f * static_cast<float>(cb[k * D + j]);
      csq_pad[k] = static_cast<float>(csq[k]);
    }
  }

  // GEMM path: the codebook blocks as transposed [D, nb] views, made once.
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  std::vector<at::Tensor> cb_blocks;
  if (!small_d) {
    at::Tensor cbt_all = at::from_blob(const_cast<T*>(cb), {K, D}, opts);
    for (int64_t k0 = 0; k0 < K; k0 += BLOCK_CODES) cb_blocks.push_back(cbt_all.narrow(0, k0, std::min(BLOCK_CODES, K - k0)).t());
  }

  // Small-D codeword block: 16384 floats of cbt (64 KiB, L1 + L2) while a tile's rows pass.
  const int64_t small_block = std::max<int64_t>(32, 16384 / std::max<int64_t>(D, 1) / 32 * 32);
  const SmallDFn small_fn = pick_small_d(D, std::make_integer_sequence<int, SMALL_D>{});

  const int64_t n_tiles = (N + TILE_ROWS - 1) / TILE_ROWS;
  // Tiles are handed out one at a time from a shared counter rather than in fixed halves: on a
  // shared machine a descheduled thread would otherwise leave the other idle at the end.
  std::atomic<int64_t> next_tile{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<T> zbuf(direct ? 0 : TILE_ROWS * D);
    std::vector<T> block(small_d ? 0 : TILE_ROWS * BLOCK_CODES);
    std::vector<RowState<T>> state(TILE_ROWS);
    std::vector<float> scratch(small_d ? small_block : 0);
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
      for (int64_t r = 0; r < mt; ++r) {
        double s = 0.0;
        for (int64_t j = 0; j < D; ++j) s += static_cast<double>(zt[r * D + j]) * zt[r * D + j];
        // v_k = ||c_k||^2 - 2 z.c_k carries no ||z||^2 term, so each computed v_k is within
        // gamma_{D+3} (max||c||^2 + 2 ||z|| max||c||) of its true value (products, sums and the final
        // add); two of them compare safely beyond twice that. Dropping the ||z||^2 term of the
        // reference's bound matters when the codebook is tiny next to z (the classic uniform
        // [-1/K, 1/K] initialisation): there the looser bound made every row ambiguous.
        const double a = cmax * (2.0 * std::sqrt(s) + cmax);
        state[r].reset(exact ? static_cast<T>(2.0 * gamma * a + underflow) : T(0));
      }

      at::Tensor z_tile;
      if (!small_d) z_tile = at::from_blob(const_cast<T*>(zt), {mt, D}, opts);
      if (small_d) {
        if constexpr (std::is_same<T, float>::value) {
          for (int64_t k0 = 0; k0 < Kp; k0 += small_block) {
            small_fn(zt, mt, D, cbt.data(), csq_pad.data(), K, Kp, k0, std::min(Kp, k0 + small_block), state.data(),
                     scratch.data());
          }
        }
      } else {
        for (int64_t k0 = 0; k0 < K; k0 += BLOCK_CODES) {
          const int64_t nb = std::min(BLOCK_CODES, K - k0);
          // dots [mt, nb] = z_tile [mt, D] @ cb_block^T: MKL sgemm (single-threaded inside this
          // parallel region) into the thread's buffer.
          at::Tensor out = at::from_blob(block.data(), {mt, nb}, opts);
          at::mm_out(out, z_tile.narrow(0, 0, mt), cb_blocks[k0 / BLOCK_CODES]);
          for (int64_t r = 0; r < mt; ++r) {
            T* v = block.data() + r * nb;
            const T m = block_min_add(v, csq.data() + k0, nb);
            consider_block(state[r], v, k0, nb, m);
          }
        }
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
