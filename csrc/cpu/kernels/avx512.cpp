// x86-64 with AVX-512 F/DQ/BW/VL (Skylake-SP, Ice Lake, Zen 4 and later): 16 fp32 lanes. Built with
// -mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma -ffp-contract=fast (setup.py); chosen at
// run time only where cpuid and xgetbv (opmask and zmm state) allow it (dispatch.cpp). The same
// template as avx2.cpp at twice the width with twice the registers.
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512DQ__) || !defined(__AVX512VL__)
#error "avx512.cpp is compiled with -mavx512f -mavx512dq -mavx512bw -mavx512vl (see setup.py)"
#endif
#define VQFAST_ISA avx512
#define VQFAST_VEC_BYTES 64
// 32 zmm registers: the AVX2 blocking with twice the codewords per step (not measured: no AVX-512
// machine was at hand; the template's logic is the one tested at every other level).
#define VQFAST_SMALL_R 2
#define VQFAST_SMALL_P 8
#define VQFAST_LARGE_R 2
#define VQFAST_LARGE_P 12
#include "search.h"
