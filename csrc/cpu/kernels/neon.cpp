// aarch64 Advanced SIMD: 4 fp32 lanes, fused multiply-add (fmla), 32 registers. NEON is part of
// every aarch64 CPU, so this differs from generic.cpp in its blocking for the 32-register file
// (and -ffp-contract=fast, which lets the compiler fuse the multiply-adds); chosen where
// getauxval(AT_HWCAP) reports ASIMD (dispatch.cpp).
#if !defined(__aarch64__)
#error "neon.cpp is built for aarch64 only"
#endif
#define VQFAST_ISA neon
#define VQFAST_VEC_BYTES 16
// 32 q registers of 4 lanes: the register budget of avx512.cpp.
#define VQFAST_SMALL_R 2
#define VQFAST_SMALL_P 8
#define VQFAST_LARGE_R 2
#define VQFAST_LARGE_P 12
#include "search.h"
