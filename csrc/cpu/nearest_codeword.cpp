// CPU nearest-codeword search.
//
// z is walked in tiles of TILE_ROWS rows. For each tile and each block of BLOCK_CODES codewords,
// an optimised sgemm (at::mm_out, MKL / oneDNN, multi-threaded) writes the dot products into one
// reused buffer of TILE_ROWS x BLOCK_CODES floats (16 MiB), and a fused AVX-512 scan turns them into
// e_k = ||c_k||^2 - 2 z.c_k (||z||^2 is constant per row) while keeping per row, per SIMD lane, the
// best value, its index and the second-best value. Memory beyond inputs and outputs is that buffer
// plus O(TILE_ROWS) state: never N x K. These block sizes are the ones faiss uses for IndexFlatL2
// (4096 x 1024). For D <= SMALL_D a register-blocked kernel replaces sgemm + scan (below).
//
// Exactness ("exact" precision): the computed e_k differs from the true value by at most
// gamma_{D+3} (||z|| + max ||c||)^2 (see vqfast/reference.py). A row whose second-best value lies
// within twice that bound of its best is re-ranked by directly computed sum((z - c)^2) in double
// over the whole codebook, lowest index first; every other row's argmin is provably exact.
// "fast" precision skips the re-rank. float64 inputs take a direct double-precision path.
#include "nearest_codeword.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace vqfast {
namespace cpu {
namespace {

constexpr int64_t TILE_ROWS = 4096;
constexpr int64_t BLOCK_CODES = 1024;
constexpr int LANES = 16;  // one AVX-512 register of floats; the scalar path uses the same layout
// At D <= SMALL_D the register-blocked kernel is used: at D = 8, K = 512 it takes 18 ms where
// sgemm + scan takes 31 ms (N = 262144, 2 threads); at D = 24..32 the two are within noise.
constexpr int64_t SMALL_D = 32;
constexpr float INF = std::numeric_limits<float>::infinity();

// Per-row running state: for each lane, best value, its index and the second-best value.
struct RowState {
  float v1[LANES];
  float v2[LANES];
  int32_t i1[LANES];
  void reset() {
    for (int l = 0; l < LANES; ++l) {
      v1[l] = INF;
      v2[l] = INF;
      i1[l] = std::numeric_limits<int32_t>::max();
    }
  }
};

// Scan one row of dot products against codewords [k0, k0 + n): e = cbn - 2 dot.
inline void scan_row(const float* dots, const float* cbn, int64_t k0, int64_t n, RowState& st, bool track_second) {
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 v1 = _mm512_loadu_ps(st.v1);
  __m512 v2 = _mm512_loadu_ps(st.v2);
  __m512i i1 = _mm512_loadu_si512(st.i1);
  __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(k0)),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512i step = _mm512_set1_epi32(LANES);
  const __m512 minus_two = _mm512_set1_ps(-2.0f);
  for (; j + LANES <= n; j += LANES) {
    const __m512 e = _mm512_fmadd_ps(minus_two, _mm512_loadu_ps(dots + j), _mm512_loadu_ps(cbn + k0 + j));
    const __mmask16 lt = _mm512_cmp_ps_mask(e, v1, _CMP_LT_OQ);  // strict: earlier index wins ties
    if (track_second) v2 = _mm512_min_ps(v2, _mm512_max_ps(v1, e));
    v1 = _mm512_mask_blend_ps(lt, v1, e);
    i1 = _mm512_mask_blend_epi32(lt, i1, idx);
    idx = _mm512_add_epi32(idx, step);
  }
  _mm512_storeu_ps(st.v1, v1);
  _mm512_storeu_ps(st.v2, v2);
  _mm512_storeu_si512(st.i1, i1);
#endif
  for (; j < n; ++j) {
    // Tail (and the whole row without AVX-512): lane j % LANES, same update rule.
    const int l = static_cast<int>((k0 + j) % LANES);
    const float e = std::fma(-2.0f, dots[j], cbn[k0 + j]);
    if (track_second) st.v2[l] = std::min(st.v2[l], std::max(st.v1[l], e));
    if (e < st.v1[l]) {
      st.v1[l] = e;
      st.i1[l] = static_cast<int32_t>(k0 + j);
    }
  }
}

// Combine the lanes: best value, lowest index achieving it, and the second-best value.
inline void finish_row(const RowState& st, float& best, int64_t& best_k, float& second) {
  best = INF;
  best_k = std::numeric_limits<int32_t>::max();
  int best_lane = -1;
  for (int l = 0; l < LANES; ++l) {
    if (st.v1[l] < best || (st.v1[l] == best && st.i1[l] < best_k)) {
      best = st.v1[l];
      best_k = st.i1[l];
      best_lane = l;
    }
  }
  second = INF;
  for (int l = 0; l < LANES; ++l) {
    second = std::min(second, st.v2[l]);
    if (l != best_lane) second = std::min(second, st.v1[l]);
  }
}

inline double direct_sqdist(const float* a, const float* b, int64_t D) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= D; j += 4) {
    const double t0 = double(a[j]) - double(b[j]);
    const double t1 = double(a[j + 1]) - double(b[j + 1]);
    const double t2 = double(a[j + 2]) - double(b[j + 2]);
    const double t3 = double(a[j + 3]) - double(b[j + 3]);
    s0 += t0 * t0;
    s1 += t1 * t1;
    s2 += t2 * t2;
    s3 += t3 * t3;
  }
  for (; j < D; ++j) {
    const double t = double(a[j]) - double(b[j]);
    s0 += t * t;
  }
  return (s0 + s1) + (s2 + s3);
}

// Exact re-rank of one row over the whole codebook: the lowest index of the minimal direct distance.
inline int64_t rerank_row(const float* zi, const float* cb, int64_t K, int64_t D) {
  double best = std::numeric_limits<double>::infinity();
  int64_t best_k = 0;
  bool found = false;
  for (int64_t k = 0; k < K; ++k) {
    const double d = direct_sqdist(zi, cb + k * D, D);
    if (!found || d < best) {  // NaN distances never win, as in the reference
      if (!std::isnan(d)) {
        best = d;
        best_k = k;
        found = true;
      }
    }
  }
  return best_k;
}

#if defined(__AVX512F__)
// Small D: a register-blocked kernel that never writes a distance block. ROWS rows share each load of
// 16 codewords from the transposed, padded codebook cbT [D, Kp]; each row keeps its running
// (best, index, second) lanes in registers across the whole codebook.
// DD > 0 fixes D at compile time (fully unrolled inner loop); DD = 0 reads it at run time.
template <int ROWS, int DD>
inline void small_d_block(const float* zrows, int64_t D_rt, const float* cbT, const float* cbn_pad, int64_t Kp,
                          bool track_second, RowState* st) {
  __m512 v1[ROWS], v2[ROWS];
  __m512i i1[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    v1[r] = _mm512_set1_ps(INF);
    v2[r] = _mm512_set1_ps(INF);
    i1[r] = _mm512_set1_epi32(std::numeric_limits<int32_t>::max());
  }
  const int64_t D = DD > 0 ? DD : D_rt;
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(LANES);
  // zrows holds -2 z (scaling by 2 is exact), so e = ||c||^2 + sum_d (-2 z_d) c_d accumulates directly.
  for (int64_t k = 0; k < Kp; k += LANES) {
    const __m512 n = _mm512_loadu_ps(cbn_pad + k);
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; ++r) acc[r] = n;
    for (int64_t d = 0; d < D; ++d) {
      const __m512 c = _mm512_loadu_ps(cbT + d * Kp + k);
      for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(zrows[r * D + d]), c, acc[r]);
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512 e = acc[r];
      const __mmask16 lt = _mm512_cmp_ps_mask(e, v1[r], _CMP_LT_OQ);
      if (track_second) v2[r] = _mm512_min_ps(v2[r], _mm512_max_ps(v1[r], e));
      v1[r] = _mm512_mask_blend_ps(lt, v1[r], e);
      i1[r] = _mm512_mask_blend_epi32(lt, i1[r], idx);
    }
    idx = _mm512_add_epi32(idx, step);
  }
  for (int r = 0; r < ROWS; ++r) {
    _mm512_storeu_ps(st[r].v1, v1[r]);
    _mm512_storeu_ps(st[r].v2, v2[r]);
    _mm512_storeu_si512(st[r].i1, i1[r]);
  }
}

template <int ROWS>
inline void small_d_dispatch(const float* zrows, int64_t D, const float* cbT, const float* cbn_pad, int64_t Kp,
                             bool track_second, RowState* st) {
  switch (D) {
#define VQFAST_SMALL_D_CASE(n) \
  case n:                      \
    return small_d_block<ROWS, n>(zrows, D, cbT, cbn_pad, Kp, track_second, st);
    VQFAST_SMALL_D_CASE(1) VQFAST_SMALL_D_CASE(2) VQFAST_SMALL_D_CASE(3) VQFAST_SMALL_D_CASE(4)
    VQFAST_SMALL_D_CASE(5) VQFAST_SMALL_D_CASE(6) VQFAST_SMALL_D_CASE(7) VQFAST_SMALL_D_CASE(8)
    VQFAST_SMALL_D_CASE(9) VQFAST_SMALL_D_CASE(10) VQFAST_SMALL_D_CASE(11) VQFAST_SMALL_D_CASE(12)
    VQFAST_SMALL_D_CASE(13) VQFAST_SMALL_D_CASE(14) VQFAST_SMALL_D_CASE(15) VQFAST_SMALL_D_CASE(16)
#undef VQFAST_SMALL_D_CASE
    default:
      return small_d_block<ROWS, 0>(zrows, D, cbT, cbn_pad, Kp, track_second, st);
  }
}
#endif

at::Tensor normalize_rows(const at::Tensor& x) {
  return x / x.norm(2, {1}, true).clamp_min(1e-12);
}

// float64 (or mixed with float64): the direct double-precision search, parallel over rows.
void search_double(const at::Tensor& z, const at::Tensor& cb, int64_t* out_idx, float* out_dist) {
  const int64_t N = z.size(0), K = cb.size(0), D = z.size(1);
  const double* zp = z.data_ptr<double>();
  const double* cp = cb.data_ptr<double>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const double* zi = zp + i * D;
      double best = std::numeric_limits<double>::infinity();
      int64_t best_k = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double* ck = cp + k * D;
        double d = 0;
        for (int64_t j = 0; j < D; ++j) {
          const double t = zi[j] - ck[j];
          d += t * t;
        }
        if (d < best) {
          best = d;
          best_k = k;
        }
      }
      out_idx[i] = best_k;
      out_dist[i] = static_cast<float>(best);
    }
  });
}

void search_float(const at::Tensor& z_any, const at::Tensor& cb, bool cosine, bool exact, int64_t* out_idx,
                  float* out_dist) {
  const int64_t N = z_any.size(0), K = cb.size(0), D = cb.size(1);
  const float* cp = cb.data_ptr<float>();
  // ||c||^2 in double, rounded once: its error is within the bound's allowance.
  const at::Tensor cbn_t = cb.to(at::kDouble).pow(2).sum(1).to(at::kFloat).contiguous();
  const float* cbn = cbn_t.data_ptr<float>();
  const double cmax = std::sqrt(cb.to(at::kDouble).pow(2).sum(1).max().item<double>());
  const double n3 = static_cast<double>(D + 3);
  const double u = std::ldexp(1.0, -24);
  const double gamma = n3 * u / (1.0 - n3 * u);

  // Turn a row's lanes into its index (re-ranking an ambiguous row) and its direct distance.
  auto finish = [&](const RowState& st, const float* zi, int64_t row) {
    float best, second;
    int64_t best_k;
    finish_row(st, best, best_k, second);
    if (exact) {
      double zn = 0;
      for (int64_t j = 0; j < D; ++j) zn += double(zi[j]) * double(zi[j]);
      const double r = std::sqrt(zn) + cmax;
      const double tol = 2.0 * gamma * r * r;
      // Not "second > best + tol" -> re-rank (this also catches NaN and overflow).
      if (!(static_cast<double>(second) > static_cast<double>(best) + tol) || best_k >= K) {
        best_k = rerank_row(zi, cp, K, D);
      }
    } else if (best_k >= K) {
      best_k = 0;  // every value was NaN: keep the index in range
    }
    out_idx[row] = best_k;
    out_dist[row] = static_cast<float>(direct_sqdist(zi, cp + best_k * D, D));
  };

#if defined(__AVX512F__)
  if (D <= SMALL_D) {
    // Transposed codebook padded to a multiple of 16 codewords; padding has ||c||^2 = +inf so it never wins.
    const int64_t Kp = (K + LANES - 1) / LANES * LANES;
    at::Tensor cbT = at::zeros({D, Kp}, cb.options());
    cbT.narrow(1, 0, K).copy_(cb.t());
    at::Tensor cbn_pad = at::full({Kp}, INF, cb.options());
    cbn_pad.narrow(0, 0, K).copy_(cbn_t);
    const float* tp = cbT.data_ptr<float>();
    const float* np_ = cbn_pad.data_ptr<float>();
    constexpr int64_t ROWS = 6;
    at::parallel_for(0, (N + TILE_ROWS - 1) / TILE_ROWS, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * TILE_ROWS;
        const int64_t m = std::min(TILE_ROWS, N - r0);
        at::Tensor zt = z_any.narrow(0, r0, m).to(at::kFloat).contiguous();
        if (cosine) zt = normalize_rows(zt).contiguous();
        const float* zp = zt.data_ptr<float>();
        const at::Tensor zm2_t = zt * -2.0f;
        const float* zm2 = zm2_t.data_ptr<float>();
        RowState st[ROWS];
        for (int64_t i = 0; i < m; i += ROWS) {
          const int64_t rows = std::min<int64_t>(ROWS, m - i);
          if (rows == ROWS) {
            small_d_dispatch<ROWS>(zm2 + i * D, D, tp, np_, Kp, exact, st);
          } else {
            for (int64_t r = 0; r < rows; ++r) small_d_dispatch<1>(zm2 + (i + r) * D, D, tp, np_, Kp, exact, st + r);
          }
          for (int64_t r = 0; r < rows; ++r) finish(st[r], zp + (i + r) * D, r0 + i + r);
        }
      }
    });
    return;
  }
#endif

  const int64_t tile_rows = std::min(TILE_ROWS, N);
  const int64_t block = std::min(BLOCK_CODES, K);
  at::Tensor buf = at::empty({tile_rows, block}, cb.options());
  std::vector<RowState> state(tile_rows);

  for (int64_t r0 = 0; r0 < N; r0 += tile_rows) {
    const int64_t m = std::min(tile_rows, N - r0);
    at::Tensor zt = z_any.narrow(0, r0, m).to(at::kFloat).contiguous();  // fp16/bf16 converted per tile
    if (cosine) zt = normalize_rows(zt).contiguous();
    const float* zp = zt.data_ptr<float>();
    for (int64_t i = 0; i < m; ++i) state[i].reset();
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      const int64_t n = std::min(block, K - k0);
      at::Tensor out = buf.narrow(0, 0, m).narrow(1, 0, n);
      if (n != block) out = at::empty({m, n}, cb.options());
      at::mm_out(out, zt, cb.narrow(0, k0, n).t());
      const float* dots = out.data_ptr<float>();
      const int64_t ld = out.stride(0);
      at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) scan_row(dots + i * ld, cbn, k0, n, state[i], exact);
      });
    }
    at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) finish(state[i], zp + i * D, r0 + i);
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword(
    const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric, c10::string_view precision) {
  TORCH_CHECK(z.dim() == 2, "vqfast::nearest_codeword: z must be 2-D [N, D], got ", z.dim(), "-D");
  TORCH_CHECK(codebook.dim() == 2, "vqfast::nearest_codeword: codebook must be 2-D [K, D], got ", codebook.dim(), "-D");
  TORCH_CHECK(z.size(1) == codebook.size(1), "vqfast::nearest_codeword: z has D=", z.size(1), " but codebook has D=",
              codebook.size(1));
  TORCH_CHECK(codebook.size(0) > 0, "vqfast::nearest_codeword: codebook is empty (K=0)");
  TORCH_CHECK(codebook.size(0) < std::numeric_limits<int32_t>::max(),
              "vqfast::nearest_codeword (CPU kernel): K must be below 2^31 - 1");
  TORCH_CHECK(z.device().is_cpu() && codebook.device().is_cpu(), "vqfast::nearest_codeword (CPU kernel): tensors must be on the CPU");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()) && at::isFloatingType(codebook.scalar_type()),
              "vqfast::nearest_codeword: z and codebook must be floating point");
  TORCH_CHECK(metric == "l2" || metric == "cosine", "vqfast::nearest_codeword: metric must be 'l2' or 'cosine'");
  TORCH_CHECK(precision == "exact" || precision == "fast", "vqfast::nearest_codeword: precision must be 'exact' or 'fast'");

  const int64_t N = z.size(0);
  const bool cosine = metric == "cosine";
  at::Tensor indices = at::empty({N}, z.options().dtype(at::kLong));
  at::Tensor distances = at::empty({N}, z.options().dtype(at::kFloat));
  if (N > 0) {
    if (z.scalar_type() == at::kDouble || codebook.scalar_type() == at::kDouble) {
      at::Tensor zd = z.to(at::kDouble).contiguous();
      at::Tensor cd = codebook.to(at::kDouble).contiguous();
      if (cosine) {
        zd = normalize_rows(zd).contiguous();
        cd = normalize_rows(cd).contiguous();
      }
      search_double(zd, cd, indices.data_ptr<int64_t>(), distances.data_ptr<float>());
    } else {
      at::Tensor cf = codebook.to(at::kFloat).contiguous();
      if (cosine) cf = normalize_rows(cf).contiguous();
      search_float(z, cf, cosine, precision == "exact", indices.data_ptr<int64_t>(), distances.data_ptr<float>());
    }
  }
  at::Tensor codewords = codebook.index_select(0, indices).to(z.scalar_type());
  return {indices, codewords, distances};
}

}  // namespace cpu
}  // namespace vqfast
