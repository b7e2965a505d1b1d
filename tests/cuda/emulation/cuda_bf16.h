// Host emulation of <cuda_bf16.h> (see cuda_runtime.h here): bfloat16 storage (the top half of an
// fp32) and the conversions the kernels and tests/cuda use, rounding to nearest even.
#pragma once

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  unsigned short x = 0;
};

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16{bits}; }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float(static_cast<unsigned>(h.x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const unsigned u = __float_as_uint(f);
  if (std::isnan(f)) return __nv_bfloat16{static_cast<unsigned short>((u >> 16) | 0x40u)};
  const unsigned rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(rounded >> 16)};
}

// For the emulated mma (cuda_runtime.h).
inline float emu_float(__nv_bfloat16 h) { return __bfloat162float(h); }
