// The interface between the CPU driver (nearest_codeword.cpp, compiled for the baseline instruction
// set) and the search kernels compiled once per instruction level (generic.cpp, avx2.cpp, ...).
//
// Torch-free on purpose, and it defines no function: an inline function in a header shared by
// translation units built with different flags is emitted in each of them, and the linker keeps one
// copy, possibly the AVX-512 one, which the baseline code would then call on any CPU. Everything a
// level compiles lives in its own namespace (vqfast::cpu::<level>), in an anonymous namespace.
#pragma once

#include <cstdint>

namespace vqfast {
namespace cpu {

// Candidates kept per row before falling back to a full re-rank of the row (duplicated codewords
// or a tolerance that covers the whole codebook).
constexpr int CAND_CAP = 8;

// Rows per tile: the kernels transpose a tile into row groups of one step's rows (2 vectors), each
// group [D, rows of the group] contiguous (the rows in SIMD lanes); a multiple of every level's rows
// per step (2 vectors x 16 fp32 lanes at AVX-512).
constexpr int64_t TILE_ROWS = 128;

// K is padded to a multiple of this (every level's codewords per step divides it) with codewords
// that never win: c = 0 and ||c||^2 = +inf.
constexpr int64_t CODE_PAD = 24;

// fp32 D up to this many features runs a kernel with D fixed at compile time (fully unrolled
// terms); larger D, and fp64, run the kernels with D known at run time.
constexpr int64_t SMALL_D = 32;

// Elements of the codebook walked per block (128 KiB of fp32: the block stays in L2 while every
// row group of the tile passes over it). The recompute buffer holds one block's values of a row.
constexpr int64_t BLOCK_ELEMS = 32768;

// The running result of one row. No member functions (see above): the kernels set and update it
// with their own copies of the helpers, the driver re-ranks its candidates.
template <typename T>
struct RowState {
  T best;        // smallest computed value v_k = ||c_k||^2 - 2 z.c_k so far
  int64_t best_k;
  T tol;         // >= 2 gamma_{D+3} max||c|| (2 ||z|| + max||c||), 0 in "fast" precision
  int n;         // candidates within best + tol, in ascending k
  bool overflow; // more than CAND_CAP candidates, or an infinite bound: re-rank the whole row
  int64_t cand_k[CAND_CAP];
  T cand_v[CAND_CAP];
};

// One tile of rows against the whole codebook.
template <typename T>
struct TileArgs {
  const T* z;           // [rows, D] row-major, contiguous
  int64_t rows;         // 1 .. TILE_ROWS
  int64_t D;            // >= 1
  const T* cb;          // [K, D] the codebook, contiguous; rows below Kfull are read here
  const T* cb_tail;     // [CODE_PAD, D]: codewords Kfull .. K - 1, then zero rows up to Kp
  const T* csq;         // [Kp]: ||c||^2, +inf past K
  const T* cb_steps;    // null, or for the runtime-D kernels the padded codebook step by step:
                        // codewords [k, k + S) at cb_steps + k D, codeword k + p's feature j at
                        // [j S + p] (S = Kernels::step); read instead of cb and cb_tail
  int64_t K;            // real codewords
  int64_t Kfull;        // K rounded down to a multiple of CODE_PAD
  int64_t Kp;           // K rounded up to a multiple of CODE_PAD
  T tol_coef;           // 2 gamma_{D+3} ("exact" precision) or 0 ("fast")
  T cmax;               // an upper bound of max ||c||
  T tol_floor;          // added to every exact tolerance: what subnormal products and sums lose
  bool check;           // stop at a value of z that is NaN, infinite or beyond zlimit
  T zlimit;             // with check: the largest |z| allowed
  RowState<T>* state;   // [rows], set by the kernel
  T* scratch;           // SCRATCH(D) elements
};

// Elements of TileArgs::scratch: the transposed tile (whole row groups of at most 32 rows) and one
// codebook block's values of a row (at most max(BLOCK_ELEMS / D, 24) codewords). A macro, as this
// header defines no function.
#define VQFAST_SCRATCH(D) ((D) * TILE_ROWS + BLOCK_ELEMS / (D) + CODE_PAD)

// A level's kernels; each level's translation unit defines one table.
// search_*: one tile against the whole codebook, results in a.state. Returns false, having searched
// nothing, when a.check and a value of the tile's z is NaN, infinite or beyond a.zlimit.
struct Kernels {
  const char* name;
  int64_t step;  // codewords per step of the runtime-D kernels: the layout of TileArgs::cb_steps
  bool (*search_f32)(const TileArgs<float>&);
  bool (*search_f64)(const TileArgs<double>&);
};

#if defined(__x86_64__) || defined(_M_X64)
namespace generic { extern const Kernels kernels; }
namespace avx2 { extern const Kernels kernels; }
namespace avx512 { extern const Kernels kernels; }
#elif defined(__aarch64__)
namespace generic { extern const Kernels kernels; }
namespace neon { extern const Kernels kernels; }
#else
namespace generic { extern const Kernels kernels; }
#endif

}  // namespace cpu
}  // namespace vqfast
