// The exact mode's rounding tolerance, the C++ copy of vqfast/reference.py's ranking_tolerance_terms
// (the one definition; tests/test_reference.py checks this copy against it through the op
// vqfast::_ranking_tolerance_terms, and that the CPU driver and the CUDA binding take theirs from here).
//
// A computed value v_k = ||c_k||^2 - 2 z.c_k in a type of unit roundoff u is within
// gamma_{D+3} max||c|| (2 ||z|| + max||c||) of its true value, gamma_n = n u / (1 - n u) (Higham 3.1), so
// two values are ordered with certainty when they differ by more than
//     coef max||c|| (2 ||z|| + max||c||) + floor,   coef = 2 gamma_{D+3},
// with floor = 8 (D + 3) smallest_normal eps for products that underflow (each loses up to half a
// subnormal spacing, which the relative bound does not cover).
// No torch headers: csrc/cpu and the CUDA binding include it alike.
#pragma once

#include <cstdint>
#include <limits>

namespace vqfast {

// gamma_{D+3} for a type of unit roundoff u.
inline double expansion_error_bound(int64_t dim, double unit_roundoff) {
  const double n = static_cast<double>(dim + 3);
  return n * unit_roundoff / (1.0 - n * unit_roundoff);
}

template <typename T>
double unit_roundoff() {
  return static_cast<double>(std::numeric_limits<T>::epsilon()) / 2.0;  // 2^-24 float, 2^-53 double
}

template <typename T>
double ranking_tolerance_coef(int64_t dim) {
  return 2.0 * expansion_error_bound(dim, unit_roundoff<T>());
}

template <typename T>
double ranking_tolerance_floor(int64_t dim) {
  return 8.0 * static_cast<double>(dim + 3) * static_cast<double>(std::numeric_limits<T>::min()) *
         static_cast<double>(std::numeric_limits<T>::epsilon());
}

}  // namespace vqfast
