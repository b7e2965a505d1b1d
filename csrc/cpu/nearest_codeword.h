#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace vqfast {
namespace cpu {

// Fused nearest-codeword search on the CPU. See vqfast/reference.py for the contract.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword(
    const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric, c10::string_view precision);

// The same search with vqfast.nearest_codeword's check_finite checks fused into its pass: float32
// inputs whose squared distances could overflow are searched in float64; NaN, Inf, or float64
// values beyond float64's range raise a ValueError.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword_checked(
    const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric, c10::string_view precision);

}  // namespace cpu
}  // namespace vqfast
