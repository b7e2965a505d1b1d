// Runtime choice of the CPU kernel's instruction level (compare ATen's DispatchStub and faiss's
// FAISS_OPT_LEVEL loader). Compiled for the baseline instruction set, as every file outside
// csrc/cpu/kernels/<level>.cpp: nothing here may execute an instruction the CPU might lack.
#include "dispatch.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <asm/hwcap.h>
#include <sys/auxv.h>
#endif

namespace vqfast {
namespace cpu {
namespace {

struct Level {
  const char* name;
  const Kernels* kernels;
  bool (*supported)();
};

bool always() { return true; }

#if defined(__x86_64__) || defined(_M_X64)
// XCR0: which register states the OS saves on a context switch. A CPU can have AVX-512 while the
// OS (or a hypervisor) does not enable the zmm / opmask state: then the instructions fault.
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

struct X86Features {
  bool avx2_fma = false;
  bool avx512 = false;
};

X86Features detect() {
  X86Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
  if (!osxsave || !avx) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_state = (xcr0 & 0x6) == 0x6;            // SSE + AVX state
  const bool zmm_state = (xcr0 & 0xe6) == 0xe6;          // + opmask, upper zmm0-15, zmm16-31
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));  // F DQ BW VL
  f.avx2_fma = ymm_state && avx2 && fma;
  f.avx512 = f.avx2_fma && zmm_state && avx512;
  return f;
}

const X86Features& features() {
  static const X86Features f = detect();
  return f;
}

bool has_avx2() { return features().avx2_fma; }
bool has_avx512() { return features().avx512; }

const Level LEVELS[] = {
    {"generic", &generic::kernels, always},
    {"avx2", &avx2::kernels, has_avx2},
    {"avx512", &avx512::kernels, has_avx512},
};
#elif defined(__aarch64__)
bool has_neon() {
#if defined(__linux__)
  return getauxval(AT_HWCAP) & HWCAP_ASIMD;
#else
  return true;  // Advanced SIMD is part of ARMv8-A
#endif
}

const Level LEVELS[] = {
    {"generic", &generic::kernels, always},
    {"neon", &neon::kernels, has_neon},
};
#else
const Level LEVELS[] = {
    {"generic", &generic::kernels, always},
};
#endif

constexpr const char* ENV = "VQFAST_CPU_ISA";

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

const Level* find(const std::string& name) {
  for (const Level& l : LEVELS) {
    if (name == l.name) return &l;
  }
  return nullptr;
}

// The level a name asks for, or a ValueError that says what can be asked for.
const Level& require(const std::string& name, const char* source) {
  const Level* l = find(name);
  TORCH_CHECK_VALUE(l != nullptr, source, "='", name, "' is not an instruction level of this build of vqfast; choose one of ",
                    join(isa_compiled()), " (this CPU runs ", join(isa_levels()), "), or auto");
  TORCH_CHECK_VALUE(l->supported(), source, "='", name, "' forces a level this CPU cannot run (it runs ",
                    join(isa_levels()), "); unset ", ENV, " or choose one of those");
  return *l;
}

const Level* choose() {
  const char* env = std::getenv(ENV);
  if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0) return &require(env, ENV);
  const Level* best = &LEVELS[0];
  for (const Level& l : LEVELS) {
    if (l.supported()) best = &l;
  }
  return best;
}

std::atomic<const Level*> current{nullptr};

const Level& level() {
  const Level* l = current.load(std::memory_order_acquire);
  if (l == nullptr) {
    l = choose();  // throws on a bad VQFAST_CPU_ISA, every time it is asked
    const Level* expected = nullptr;
    if (!current.compare_exchange_strong(expected, l, std::memory_order_acq_rel)) l = expected;
  }
  return *l;
}

}  // namespace

const Kernels& isa_kernels() { return *level().kernels; }

std::string isa_name() { return level().name; }

std::vector<std::string> isa_levels() {
  std::vector<std::string> out;
  for (const Level& l : LEVELS) {
    if (l.supported()) out.push_back(l.name);
  }
  return out;
}

std::vector<std::string> isa_compiled() {
  std::vector<std::string> out;
  for (const Level& l : LEVELS) out.push_back(l.name);
  return out;
}

std::string set_isa(const std::string& name) {
  const Level& next = require(name, "cpu isa");
  const std::string previous = level().name;
  current.store(&next, std::memory_order_release);
  return previous;
}

}  // namespace cpu
}  // namespace vqfast
