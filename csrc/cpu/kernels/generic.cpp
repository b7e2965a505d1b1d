// The baseline level: the search kernel at the target's base instruction set (x86-64: SSE2, no
// FMA; aarch64: Advanced SIMD), 16-byte vectors. Built without any -m flag: it runs on every CPU of
// the architecture and is what VQFAST_CPU_ISA=generic forces.
#define VQFAST_ISA generic
#define VQFAST_VEC_BYTES 16
// 16 xmm registers, no FMA: 2 x 6 accumulators (state spills to L1 between steps). On a Zen 3,
// one thread: 2 x 6 took 0.8x the time of 2 x 4 at D = 8 and 32 (CPU time, shared machine).
#define VQFAST_SMALL_R 2
#define VQFAST_SMALL_P 6
#define VQFAST_LARGE_R 2
#define VQFAST_LARGE_P 6
#include "search.h"
