// The search kernel, written once over the SIMD width and compiled once per instruction level.
//
// Included only by the level files (generic.cpp, avx2.cpp, avx512.cpp, neon.cpp), each of which
// defines, before including it:
//   VQFAST_ISA          the level's name, also its namespace (vqfast::cpu::<name>)
//   VQFAST_VEC_BYTES    bytes per SIMD register (16 SSE2 / NEON, 32 AVX2, 64 AVX-512)
//   VQFAST_SMALL_R, VQFAST_SMALL_P   register block for D <= SMALL_D (fp32, D known at compile time)
//   VQFAST_LARGE_R, VQFAST_LARGE_P   register block for larger D and for fp64
// and is compiled with its own flags (setup.py). All code below has internal linkage (anonymous
// namespace) and uses no standard-library template that could be emitted out of line: see kernel.h.
//
// Layout: rows in SIMD lanes (as faiss's fused small-D kernel), codewords broadcast. A step takes
// R vectors of W rows and P codewords: R x P accumulators, each the D-term dot product
//     v = ||c||^2 + sum_j (-2 z_j) c_j          (one FMA per term where the level has FMA)
// The tile's z is scaled by -2 as it is transposed (a power of two: exact, so each product is the
// one z_j (-2 c_j) would give), and the codebook is read where the caller holds it: no per-call
// copy of K x D (a copy scaled by -2 cost as much as the search at N = 16, K = 4096, D = 32).
// The transposed tile is stored group by group, each group's [D, R W] contiguous: at D = 256 a
// group is 16 KiB that stays in L1, where one [D, 128] tile with a 512-byte row stride mapped every
// group onto 8 of L1's 64 sets.
// then per accumulator five vector operations keep, per lane (per row), the running minimum, its
// codeword index (strict <, codewords in ascending order: the lowest index on ties) and the second
// smallest value. State per row is three registers whatever P is, so P can grow until the
// accumulators fill the register file. Loads per term: R (rows) + P (broadcast codewords) for R x P
// FMAs.
// At the end of a codebook block (BLOCK_ELEMS elements, kept in L2 while the tile's row groups pass)
// a row whose second smallest value lies within the rounding bound of the minimum recomputes the
// block's values and collects its candidates exactly; every other row takes the lane's minimum.
//
// Rounding: v is a sum of D + 1 terms (||c||^2 itself a D-term sum, -2z exact), so in any order and
// with or without FMA (one rounding per step instead of two) the computed v is within
// gamma_{D+3} max||c|| (2 ||z|| + max||c||) of its true value (Higham 3.1): the bound the driver sets
// as tol (twice it, to compare two values) holds at every level.
#include <cstdint>
#include <cstring>
#include <utility>

#include "kernel.h"

#if !defined(VQFAST_ISA) || !defined(VQFAST_VEC_BYTES) || !defined(VQFAST_SMALL_R) || !defined(VQFAST_LARGE_R)
#error "search.h is included by a level file that defines VQFAST_ISA, VQFAST_VEC_BYTES and the blocking"
#endif

#define VQFAST_STR2(x) #x
#define VQFAST_STR(x) VQFAST_STR2(x)

namespace vqfast {
namespace cpu {
namespace VQFAST_ISA {
namespace {

template <typename T>
struct Simd;

template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(VQFAST_VEC_BYTES)));
  typedef int32_t I __attribute__((vector_size(VQFAST_VEC_BYTES)));  // the type of a comparison of V
  typedef int32_t Index;
  static constexpr int W = VQFAST_VEC_BYTES / 4;
};

template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(VQFAST_VEC_BYTES)));
  typedef int64_t I __attribute__((vector_size(VQFAST_VEC_BYTES)));
  typedef int64_t Index;
  static constexpr int W = VQFAST_VEC_BYTES / 8;
};

template <typename T>
inline T infinity() {
  return static_cast<T>(__builtin_huge_val());
}

template <typename T>
inline T min_of(T a, T b) {
  return b < a ? b : a;
}

// x in every lane: one broadcast. (x - 0 is x for every x, -0 included, so the subtraction folds
// away; V{} + x would not, as -0 + 0 = +0, and a lane-by-lane loop becomes a chain of inserts.)
template <typename V, typename T>
inline V splat(T x) {
  return x - V{};
}

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// ---- the row state (kernel.h's RowState) -------------------------------------------------------

template <typename T>
inline void hit(RowState<T>& s, T x, int64_t k) {
  if (x < s.best) {  // strict: blocks and lanes arrive in ascending k, so ties keep the lowest index
    s.best = x;
    s.best_k = k;
  }
  if (x <= s.best + s.tol) {
    if (s.n < CAND_CAP) {
      s.cand_k[s.n] = k;
      s.cand_v[s.n] = x;
      ++s.n;
    } else {
      s.overflow = true;
    }
  }
}

template <typename T>
inline void prune(RowState<T>& s) {
  const T thr = s.best + s.tol;
  int w = 0;
  for (int c = 0; c < s.n; ++c) {
    if (s.cand_v[c] <= thr) {
      s.cand_k[w] = s.cand_k[c];
      s.cand_v[w] = s.cand_v[c];
      ++w;
    }
  }
  s.n = w;
}

// An ambiguous row: its values for codewords [k0, k1) recomputed one by one into buf, then every
// value within the bound of the (new) minimum becomes a candidate.
template <typename T>
inline void collect_block(const TileArgs<T>& a, int64_t row, int64_t k0, int64_t k1, T* buf) {
  RowState<T>& s = a.state[row];
  const int64_t D = a.D;
  const T* zr = a.z + row * D;
  const int64_t n = min_of(k1, a.K) - k0;
  T m = infinity<T>();
  for (int64_t q = 0; q < n; ++q) {
    const T* c = a.cb + (k0 + q) * D;
    T v = a.csq[k0 + q];
    for (int64_t j = 0; j < D; ++j) v += (T(-2) * zr[j]) * c[j];
    buf[q] = v;
    m = min_of(m, v);
  }
  if (!(m <= s.best + s.tol)) return;
  const T thr = min_of(s.best, m) + s.tol;
  for (int64_t q = 0; q < n; ++q) {
    if (buf[q] <= thr) hit(s, buf[q], k0 + q);  // hit re-checks against the falling minimum
  }
  prune(s);
}

// ---- the micro-kernel --------------------------------------------------------------------------

// Rows [row0, row0 + R W) of the tile (transposed in zT: element (j, r) of the group at
// zT[row0 * D + j * R W + r]) against codewords [k0, k1) (k1 - k0 a multiple of P), folded into
// the rows' states. STEPS: the codebook is read from a.cb_steps (a step's P codewords
// interleaved: one stream of broadcasts rather than P streams D apart; 1.08x at D = 256 and 1.02x
// at D = 128 on a Zen 3, one thread), else from a.cb and a.cb_tail.
template <typename T, int R, int P, int DC, bool STEPS>
void scan_group(const TileArgs<T>& a, const T* zT, int64_t row0, int64_t k0, int64_t k1, T* buf) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  using Index = typename Simd<T>::Index;
  constexpr int W = Simd<T>::W;
  constexpr int G = R * W;
  const int64_t D = DC > 0 ? DC : a.D;
  const T* zg = zT + row0 * D;

  V mn[R], sec[R];
  I id[R];
  for (int r = 0; r < R; ++r) {
    mn[r] = splat<V>(infinity<T>());
    sec[r] = mn[r];
    id[r] = I{};
  }
  I kv = I{} + static_cast<Index>(k0);
  for (int64_t k = k0; k < k1; k += P) {
    V acc[R][P];
    for (int p = 0; p < P; ++p) {
      const V c = splat<V>(a.csq[k + p]);
      for (int r = 0; r < R; ++r) acc[r][p] = c;
    }
    // Steps never straddle Kfull (P divides CODE_PAD): the last partial step reads the padded tail.
    const T* cp = STEPS ? a.cb_steps + k * D : k < a.Kfull ? a.cb + k * D : a.cb_tail + (k - a.Kfull) * D;
    for (int64_t j = 0; j < D; ++j) {
      V zj[R];
      for (int r = 0; r < R; ++r) zj[r] = load<V>(zg + j * G + r * W);
      for (int p = 0; p < P; ++p) {
        const V b = splat<V>(STEPS ? cp[j * P + p] : cp[p * D + j]);
        for (int r = 0; r < R; ++r) acc[r][p] += zj[r] * b;
      }
    }
    for (int p = 0; p < P; ++p) {  // ascending k within the step
      const I kp = kv + static_cast<Index>(p);
      for (int r = 0; r < R; ++r) {
        const V x = acc[r][p];
        const I lt = x < mn[r];
        id[r] = lt ? kp : id[r];
        const V hi = x < mn[r] ? mn[r] : x;  // max(mn, x): the loser joins the second minimum
        sec[r] = hi < sec[r] ? hi : sec[r];
        mn[r] = x < mn[r] ? x : mn[r];       // a NaN x is never taken (minps / fminnm order)
      }
    }
    kv += static_cast<Index>(P);
  }

  for (int r = 0; r < R; ++r) {
    for (int l = 0; l < W; ++l) {
      const int64_t row = row0 + r * W + l;
      if (row >= a.rows) return;
      RowState<T>& s = a.state[row];
      if (s.overflow) continue;  // the whole row is re-ranked in the end anyway
      const T m = mn[r][l];
      if (!(m <= s.best + s.tol)) continue;  // nothing in this block can matter (also all-NaN)
      const T t = min_of(s.best, m) + s.tol;
      if (!(sec[r][l] <= t)) {  // only the lane's minimum is within the bound
        hit(s, m, static_cast<int64_t>(id[r][l]));
        if (s.n > 1) prune(s);
      } else {  // near-ties, duplicates: collect exactly
        collect_block(a, row, k0, k1, buf);
      }
    }
  }
}

// Each row's state, its bound from ||z|| computed here with the rows in lanes (in the driver, a
// serial double sum per row cost 10% of the search at K = 256-512, D = 8-16). zT holds -2z, so the
// sum is 4 ||z||^2 and ||z|| = sqrt(sum) / 2, both scalings exact. The computed quantities round:
// ||z||^2 by gamma_D relative, the rest by one u per operation, so the bound is scaled by
// 1 + 4 (D + 8) u, which covers them all, and stays a bound for the exact values.
// With a.check, the same loads test every value against the limit (|-2z| <= 2 zlimit, exact):
// false when one is NaN, infinite or beyond it. This is check_finite's scan of z, at no extra pass.
template <typename T, int G>
bool init_states(const TileArgs<T>& a, const T* zT) {
  using V = typename Simd<T>::V;
  using I = typename Simd<T>::I;
  constexpr int W = Simd<T>::W;
  const T u = sizeof(T) == 4 ? T(5.9604644775390625e-8) : T(1.1102230246251565e-16);  // 2^-24, 2^-53
  const T slack = T(1) + T(4) * T(a.D + 8) * u;
  const V lim = splat<V>(T(2) * a.zlimit);
  I within = ~I{};
  for (int64_t r0 = 0; r0 < a.rows; r0 += W) {
    const T* zg = zT + r0 / G * G * a.D + r0 % G;
    V s{};
    for (int64_t j = 0; j < a.D; ++j) {
      const V x = load<V>(zg + j * G);
      s += x * x;
      within &= (x <= lim) & (-lim <= x);  // false for NaN
    }
    for (int l = 0; l < W && r0 + l < a.rows; ++l) {
      RowState<T>& st = a.state[r0 + l];
      const T zn = T(0.5) * (sizeof(T) == 4 ? __builtin_sqrtf(static_cast<float>(s[l])) : __builtin_sqrt(s[l]));
      const T tol = a.tol_coef == T(0) ? T(0) : a.tol_coef * a.cmax * (T(2) * zn + a.cmax) * slack + a.tol_floor;
      st.best = infinity<T>();
      st.best_k = 0;
      st.tol = tol;
      st.n = 0;
      st.overflow = !(tol < infinity<T>());  // also NaN (a NaN in z): the row is re-ranked whole
    }
  }
  if (!a.check) return true;
  for (int l = 0; l < W; ++l) {
    if (within[l] == 0) return false;
  }
  return true;
}

template <typename T, int R, int P, int DC>
bool search_tile(const TileArgs<T>& a) {
  constexpr int G = R * Simd<T>::W;  // rows per group
  static_assert(TILE_ROWS % G == 0, "a tile holds whole row groups");
  static_assert(CODE_PAD % P == 0, "the padded codebook holds whole steps");
  const int64_t D = a.D;
  T* zT = a.scratch;
  T* buf = a.scratch + D * TILE_ROWS;
  const int64_t rows_p = (a.rows + G - 1) / G * G;
  for (int64_t r = 0; r < rows_p; ++r) {
    const T* src = a.z + r * D;
    T* dst = zT + r / G * G * D + r % G;
    for (int64_t j = 0; j < D; ++j) dst[j * G] = r < a.rows ? T(-2) * src[j] : T(0);
  }
  if (!init_states<T, G>(a, zT)) return false;
  int64_t kb = BLOCK_ELEMS / D / P * P;
  if (kb < P) kb = P;
  for (int64_t k0 = 0; k0 < a.Kp; k0 += kb) {
    const int64_t k1 = min_of(a.Kp, k0 + kb);
    for (int64_t row0 = 0; row0 < rows_p; row0 += G) {
      if constexpr (DC == 0) {
        if (a.cb_steps != nullptr) {
          scan_group<T, R, P, DC, true>(a, zT, row0, k0, k1, buf);
          continue;
        }
      }
      scan_group<T, R, P, DC, false>(a, zT, row0, k0, k1, buf);
    }
  }
  return true;
}

using SearchF32 = bool (*)(const TileArgs<float>&);

template <int... Ds>
SearchF32 pick_f32(int64_t D, std::integer_sequence<int, Ds...>) {
  SearchF32 fn = &search_tile<float, VQFAST_LARGE_R, VQFAST_LARGE_P, 0>;
  ((D == Ds + 1 ? (fn = &search_tile<float, VQFAST_SMALL_R, VQFAST_SMALL_P, Ds + 1>, 0) : 0), ...);
  return fn;
}

bool search_f32(const TileArgs<float>& a) {
  return pick_f32(a.D, std::make_integer_sequence<int, SMALL_D>{})(a);
}

bool search_f64(const TileArgs<double>& a) {
  return search_tile<double, VQFAST_LARGE_R, VQFAST_LARGE_P, 0>(a);
}

}  // namespace

extern const Kernels kernels;
const Kernels kernels = {VQFAST_STR(VQFAST_ISA), VQFAST_LARGE_P, &search_f32, &search_f64};

}  // namespace VQFAST_ISA
}  // namespace cpu
}  // namespace vqfast
