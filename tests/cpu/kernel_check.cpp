// Torch-free check of the CPU search kernels at every level compiled in: exact indices against a
// float64 brute force on odd shapes, exact ties and duplicated codewords, and the same indices at
// every level. Used to test levels that the build machine cannot reach through the extension,
// e.g. NEON through a cross compiler and qemu (tests/cpu/cross_check.sh).
//
// The driver's part (rounding bound, candidate re-rank in double) is restated here in a few lines;
// csrc/cpu/nearest_codeword.cpp is the reference for it.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "../../csrc/cpu/kernels/kernel.h"
#include "../../csrc/tolerance.h"

using namespace vqfast::cpu;

namespace {

int failures = 0;

const Kernels* const LEVELS[] = {
#if defined(__x86_64__)
    &generic::kernels, &avx2::kernels, &avx512::kernels,
#elif defined(__aarch64__)
    &generic::kernels, &neon::kernels,
#else
    &generic::kernels,
#endif
};

double dist(const float* a, const float* b, int64_t D) {
  double d = 0;
  for (int64_t j = 0; j < D; ++j) {
    const double t = double(a[j]) - double(b[j]);
    d += t * t;
  }
  return d;
}

std::vector<int64_t> search(const Kernels& k, const std::vector<float>& z, const std::vector<float>& cb, int64_t N,
                            int64_t K, int64_t D, bool by_steps) {
  const int64_t Kp = (K + CODE_PAD - 1) / CODE_PAD * CODE_PAD, Kfull = K / CODE_PAD * CODE_PAD;
  std::vector<float> csq(Kp, INFINITY), tail(CODE_PAD * D, 0.f), steps;
  std::copy(cb.begin() + Kfull * D, cb.end(), tail.begin());
  double cmax2 = 0;
  for (int64_t c = 0; c < K; ++c) {
    float s = 0;
    double sd = 0;
    for (int64_t j = 0; j < D; ++j) {
      s += cb[c * D + j] * cb[c * D + j];
      sd += double(cb[c * D + j]) * cb[c * D + j];
    }
    csq[c] = s;
    cmax2 = std::max(cmax2, sd);
  }
  if (by_steps) {  // the runtime-D kernels' step-by-step copy (TileArgs::cb_steps)
    steps.assign(Kp * D, 0.f);
    for (int64_t c = 0; c < K; ++c)
      for (int64_t j = 0; j < D; ++j) steps[(c - c % k.step) * D + c % k.step + j * k.step] = cb[c * D + j];
  }
  const double u = vqfast::unit_roundoff<float>();  // the driver's coefficient (csrc/tolerance.h), no floor
  const float tol_coef = float(vqfast::ranking_tolerance_coef<float>(D) * (1 + 4 * u)), cmax = float(std::sqrt(cmax2) * (1 + 1e-6));
  std::vector<RowState<float>> st(TILE_ROWS);
  std::vector<float> scratch(VQFAST_SCRATCH(D));
  std::vector<int64_t> out(N);
  for (int64_t r0 = 0; r0 < N; r0 += TILE_ROWS) {
    const int64_t mt = std::min<int64_t>(TILE_ROWS, N - r0);
    const TileArgs<float> args{&z[r0 * D], mt, D, cb.data(), tail.data(), csq.data(), by_steps ? steps.data() : nullptr,
                               K, Kfull, Kp, tol_coef, cmax, 0.f, true, 1e18f, st.data(), scratch.data()};
    if (!k.search_f32(args)) {
      std::printf("%s: a value of z beyond 1e18 reported\n", k.name);
      ++failures;
    }
    for (int64_t r = 0; r < mt; ++r) {
      const RowState<float>& s = st[r];
      int64_t best_k = s.best_k;
      if (s.overflow || s.n > 1) {
        double best = INFINITY;
        const int64_t m = s.overflow ? K : s.n;
        for (int64_t c = 0; c < m; ++c) {
          const int64_t kk = s.overflow ? c : s.cand_k[c];
          const double d = dist(&z[(r0 + r) * D], &cb[kk * D], D);
          if (d < best) best = d, best_k = kk;
        }
      }
      out[r0 + r] = best_k;
    }
  }
  return out;
}

bool runs_here(const Kernels& k) {
#if defined(__x86_64__)
  const std::string name = k.name;
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#endif
  (void)k;
  return true;
}

void check(const char* what, const std::vector<float>& z, const std::vector<float>& cb, int64_t N, int64_t K, int64_t D) {
  std::vector<int64_t> ref(N);
  for (int64_t i = 0; i < N; ++i) {
    double best = INFINITY;
    for (int64_t c = 0; c < K; ++c) {
      const double d = dist(&z[i * D], &cb[c * D], D);
      if (d < best) best = d, ref[i] = c;
    }
  }
  for (const Kernels* k : LEVELS) {
    if (!runs_here(*k)) {
      std::printf("%-8s %-28s not run: this CPU lacks the level\n", k->name, what);
      continue;
    }
    for (bool by_steps : {false, true}) {
      if (by_steps && D <= SMALL_D) continue;  // the compile-time-D kernels read the codebook as given
      const std::vector<int64_t> got = search(*k, z, cb, N, K, D, by_steps);
      int64_t bad = 0;
      for (int64_t i = 0; i < N; ++i) bad += got[i] != ref[i];
      std::printf("%-8s %-28s N=%-5ld K=%-6ld D=%-4ld %-8s %s\n", k->name, what, long(N), long(K), long(D),
                  by_steps ? "by steps" : "", bad ? "FAIL" : "ok");
      if (bad) ++failures;
    }
  }
}

}  // namespace

int main() {
  std::mt19937 g(1);
  std::normal_distribution<float> nd;
  const int64_t shapes[][3] = {{1, 1, 1}, {131, 33001, 1}, {259, 25, 3}, {517, 1031, 17}, {130, 200, 31},
                               {129, 777, 32}, {300, 150, 33}, {77, 49, 100}, {45, 300, 257}};
  for (const auto& s : shapes) {
    const int64_t N = s[0], K = s[1], D = s[2];
    std::vector<float> z(N * D), cb(K * D);
    for (auto& x : z) x = nd(g);
    for (auto& x : cb) x = nd(g);
    check("random", z, cb, N, K, D);
  }
  {  // z = 0 between +e and -e, 50 alternating copies: index 0
    const int64_t N = 37, K = 50, D = 2;
    std::vector<float> z(N * D, 0.f), cb(K * D, 0.f);
    for (int64_t c = 0; c < K; ++c) cb[c * D] = c % 2 ? 1.f : -1.f;
    check("exact ties", z, cb, N, K, D);
  }
  {  // 20 copies of one codeword straddling the 8192-codeword block at D = 4, z near it
    const int64_t N = 60, K = 9000, D = 4;
    std::vector<float> z(N * D), cb(K * D);
    for (auto& x : cb) x = nd(g);
    for (int64_t c = 3000; c < 9000; c += 300)
      for (int64_t j = 0; j < D; ++j) cb[c * D + j] = 0.5f + j;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < D; ++j) z[i * D + j] = 0.5f + j + 1e-3f * nd(g);
    check("duplicates across blocks", z, cb, N, K, D);
  }
  for (const int64_t D : {16, 130}) {  // near-ties under a large common offset
    const int64_t N = 200, K = 256;
    std::vector<float> z(N * D), cb(K * D);
    for (auto& x : z) x = 1000.f + 1e-2f * nd(g);
    for (auto& x : cb) x = 1000.f + 1e-2f * nd(g);
    check("large offset", z, cb, N, K, D);
  }
  std::printf("%s\n", failures ? "FAILED" : "all levels exact");
  return failures ? 1 : 0;
}
