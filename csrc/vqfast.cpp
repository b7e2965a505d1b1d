// Op schemas of the vqfast:: namespace and their CPU registrations.
//
// One schema per op; each device registers its kernel under its dispatch key (CPU here, CUDA in
// csrc/cuda/binding.cpp). Fake (meta) implementations and autograd live in vqfast/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"
#include "cpu/nearest_codeword.h"
#include "tolerance.h"

extern "C" {
// Importing vqfast._C loads this library, which runs the TORCH_LIBRARY registrations below.
// The module itself has no Python functions (the ops are reached through torch.ops.vqfast).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "vqfast C++/CUDA kernels (ops under torch.ops.vqfast)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(vqfast, m) {
  // z [N, D], codebook [K, D] -> indices int64 [N], codewords [N, D] (z's dtype), distances fp32 [N].
  m.def(
      "nearest_codeword(Tensor z, Tensor codebook, str metric=\"l2\", str precision=\"exact\") "
      "-> (Tensor indices, Tensor codewords, Tensor distances)");
  // nearest_codeword with the value checks of vqfast.nearest_codeword(check_finite=True) in the
  // same pass (CPU only): float32 inputs whose squared distances could overflow are searched in
  // float64; NaN, Inf, or float64 values beyond float64's range raise a ValueError.
  m.def(
      "nearest_codeword_checked(Tensor z, Tensor codebook, str metric=\"l2\", str precision=\"exact\") "
      "-> (Tensor indices, Tensor codewords, Tensor distances)");
  // nearest_codeword plus extremes float64 [2] = (max |z|, max |codebook|), NaN where a NaN was read,
  // +inf where an Inf was, computed in the kernels' own passes over the inputs and left on the device,
  // for check_finite's value test at one host read per call (vqfast/ops.py). GPU kernels only
  // (csrc/cuda/binding.cpp); defined in every build so that vqfast/_opdef.py's fake implementation
  // finds the schema.
  m.def(
      "nearest_codeword_flagged(Tensor z, Tensor codebook, str metric=\"l2\", str precision=\"exact\") "
      "-> (Tensor indices, Tensor codewords, Tensor distances, Tensor extremes)");
  // True when the CUDA kernels were compiled into this library.
  m.def("cuda_built() -> bool", []() -> bool {
#ifdef VQFAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // The CPU kernel's instruction level (chosen at first use; VQFAST_CPU_ISA forces one), the levels
  // this build has and this CPU runs (lowest first), and a switch for tests that compare levels.
  m.def("cpu_isa() -> str", []() -> std::string { return vqfast::cpu::isa_name(); });
  m.def("cpu_isa_levels() -> str[]", []() -> std::vector<std::string> { return vqfast::cpu::isa_levels(); });
  m.def("cpu_isa_compiled() -> str[]", []() -> std::vector<std::string> { return vqfast::cpu::isa_compiled(); });
  m.def("_set_cpu_isa(str name) -> str", [](std::string name) -> std::string { return vqfast::cpu::set_isa(name); });
  // The exact mode's tolerance terms (coef, floor) of csrc/tolerance.h for "float32" or "float64", which the
  // kernels use: tests compare them with vqfast/reference.py's ranking_tolerance_terms, the definition.
  m.def("_ranking_tolerance_terms(int dim, str dtype) -> float[]",
        [](int64_t dim, std::string dtype) -> std::vector<double> {
          TORCH_CHECK(dtype == "float32" || dtype == "float64", "dtype must be 'float32' or 'float64'");
          if (dtype == "float32") return {vqfast::ranking_tolerance_coef<float>(dim), vqfast::ranking_tolerance_floor<float>(dim)};
          return {vqfast::ranking_tolerance_coef<double>(dim), vqfast::ranking_tolerance_floor<double>(dim)};
        });
}

TORCH_LIBRARY_IMPL(vqfast, CPU, m) {
  m.impl("nearest_codeword", &vqfast::cpu::nearest_codeword);
  m.impl("nearest_codeword_checked", &vqfast::cpu::nearest_codeword_checked);
}
