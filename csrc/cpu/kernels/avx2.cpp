// x86-64 with AVX2 + FMA (Haswell, Zen and later): 8 fp32 lanes. Built with -mavx2 -mfma
// -ffp-contract=fast (setup.py); chosen at run time only where cpuid and xgetbv say the CPU and the
// OS support it (dispatch.cpp).
#if !defined(__AVX2__) || !defined(__FMA__)
#error "avx2.cpp is compiled with -mavx2 -mfma (see setup.py)"
#endif
#define VQFAST_ISA avx2
#define VQFAST_VEC_BYTES 32
// 16 ymm registers: D <= 32 keeps 2 x 2 accumulators, 6 state registers (min, second min, index
// per row vector), 2 rows and a broadcast in registers (4 loads per 4 FMAs per term); larger D
// takes 2 x 4 accumulators and lets the state live in L1 between steps (6 loads per 8 FMAs).
#define VQFAST_SMALL_R 2
#define VQFAST_SMALL_P 2
#define VQFAST_LARGE_R 2
#define VQFAST_LARGE_P 4
#include "search.h"
