#pragma once
// Which instruction level the CPU kernel runs: chosen once, at first use, from the CPU's features
// (cpuid + xgetbv on x86-64, getauxval on aarch64) or forced with VQFAST_CPU_ISA.
#include <string>
#include <vector>

#include "kernels/kernel.h"

namespace vqfast {
namespace cpu {

// The level in use. Throws (a ValueError in Python) when VQFAST_CPU_ISA names a level that this
// build lacks or this CPU cannot run.
const Kernels& isa_kernels();
std::string isa_name();
// Levels compiled into this build that this CPU can run, lowest first.
std::vector<std::string> isa_levels();
// Levels compiled into this build, lowest first.
std::vector<std::string> isa_compiled();
// Makes `name` the level in use for this process (a level the CPU can run); returns the previous
// one. For tests that compare levels in one process; VQFAST_CPU_ISA is the user's switch.
std::string set_isa(const std::string& name);

}  // namespace cpu
}  // namespace vqfast
