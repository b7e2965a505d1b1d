// x86-64 with AVX2 + FMA (Haswell, Zen and later): 8 fp32 lanes. Built with -mavx2 -mfma
// -ffp-contract=fast (setup.py); chosen at run time only where cpuid and xgetbv say the CPU and the
// OS support it (dispatch.cpp).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "avx2.cpp is compiled with -mavx2 -mfma (see setup.py)"
#endif
#define VQFAST_ISA avx2
#define VQFAST_VEC_BYTES 32
// 16 ymm registers. D <= 32: 2 x 4 accumulators (6 loads per 8 FMAs per term), the state partly
// in registers; larger D: 2 x 6 (8 loads per 12 FMAs, enough independent FMAs to cover their
// 4-cycle latency on two pipes), the state in L1 between steps. On a Zen 3, one thread (CPU time,
// shared machine): 2 x 4 over 2 x 2 gave 1.3-1.8x at D = 8-32; 2 x 6 over 2 x 4 1.1-1.2x at D = 64-256.
#define VQFAST_SMALL_R 2
#define VQFAST_SMALL_P 4
#define VQFAST_LARGE_R 2
#define VQFAST_LARGE_P 6
#include "search.h"
