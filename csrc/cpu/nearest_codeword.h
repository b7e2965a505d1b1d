#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace vqfast {
namespace cpu {

// Fused nearest-codeword search on the CPU. See vqfast/reference.py for the contract.
std::tuple<at::Tensor, at::Tensor, at::Tensor> nearest_codeword(
    const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric, c10::string_view precision);

}  // namespace cpu
}  // namespace vqfast
