// What the CPU op wrappers (ops_cpu.cpp) offer the rest of the extension beyond the ops
// they register: the pass over the predictions that also stores the gradient direction,
// which fused_loss (fused.cpp) uses on CPU tensors.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace rpo_fast {
namespace cpu {

// sample_errors' (model_err, ref_err), and with store_direction also model_pred - target
// (float32 model_pred and target only) in at::empty_like(model_pred), the layout the fake
// kernel promises; an undefined tensor otherwise. The same pass reads every input once.
std::tuple<at::Tensor, at::Tensor, at::Tensor> errors_and_direction(const at::Tensor& model_pred,
                                                                    const at::Tensor& target,
                                                                    const std::optional<at::Tensor>& ref_pred,
                                                                    bool store_direction);

}  // namespace cpu
}  // namespace rpo_fast
