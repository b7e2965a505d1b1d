// The baseline level: the search kernel at the target's base instruction set (x86-64: SSE2, no
// FMA; aarch64: Advanced SIMD), 16-byte vectors. Built without any -m flag: it runs on every CPU of
// the architecture and is what VQFAST_CPU_ISA=generic forces.
#define VQFAST_ISA generic
#define VQFAST_VEC_BYTES 16
// 16 registers of 4 lanes at x86-64 baseline: 2 x 2 accumulators + 6 state registers + 2 rows.
#define VQFAST_SMALL_R 2
#define VQFAST_SMALL_P 2
#define VQFAST_LARGE_R 2
#define VQFAST_LARGE_P 2
#include "search.h"
