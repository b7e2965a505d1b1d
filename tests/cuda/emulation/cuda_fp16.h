// Host emulation of <cuda_fp16.h> (see cuda_runtime.h here): IEEE binary16 storage and the
// conversions the kernels and tests/cuda use, rounding to nearest even.
#pragma once

#include "cuda_runtime.h"

struct __half {
  unsigned short x = 0;
};

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }

inline float __half2float(__half h) {
  const unsigned sign = (h.x & 0x8000u) << 16;
  const unsigned exponent = (h.x >> 10) & 0x1fu;
  const unsigned mantissa = h.x & 0x3ffu;
  if (exponent == 0x1f) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));  // inf / NaN
  if (exponent != 0) return __uint_as_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in fp32.
  const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
  return sign ? -magnitude : magnitude;
}

inline __half __float2half_rn(float f) {
  const unsigned u = __float_as_uint(f);
  const unsigned short sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const float a = std::fabs(f);
  if (std::isnan(f)) return __half{static_cast<unsigned short>(sign | 0x7e00u)};
  if (a >= 65520.0f) return __half{static_cast<unsigned short>(sign | 0x7c00u)};  // rounds to inf
  if (a < 0x1p-14f) {
    // Subnormal range: a multiple of 2^-24, rounded to nearest even by rint.
    const float q = std::nearbyint(std::ldexp(a, 24));
    return __half{static_cast<unsigned short>(sign | static_cast<unsigned short>(q))};
  }
  int e;
  const float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  // 11 significant bits: q in [1024, 2048], rounded to nearest even.
  float q = std::nearbyint(std::ldexp(m, 11));
  if (q == 2048.0f) q = 1024.0f, ++e;
  const unsigned exponent = static_cast<unsigned>(e - 1 + 15);
  return __half{static_cast<unsigned short>(sign | (exponent << 10) | (static_cast<unsigned>(q) - 1024u))};
}

// For the emulated mma (cuda_runtime.h).
inline float emu_float(__half h) { return __half2float(h); }
