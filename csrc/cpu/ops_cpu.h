// What the CPU op wrappers (ops_cpu.cpp) offer the rest of the extension beyond the ops they
// register: the pairwise pass of dpo and sft, which fused_loss (fused.cpp) runs on CPU
// tensors when the gradient is wanted.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace rpo_fast {
namespace cpu {

struct PairwiseResult {
  at::Tensor model_err, ref_err;  // (2M,) float32; ref_err (0,) for sft without a reference
  at::Tensor grad;                // at::empty_like(model_pred): the gradient for dL = 1
  bool finite = true;             // false: some pair's inputs were not finite (grad then not NaN yet)
};

// dpo (ref_pred or given ref_err) and sft: errors, coefficients and gradient pair by pair,
// each input read from memory once (cpu/kernels.h, PairwiseJob). The arguments are checked
// as sample_errors and pair_loss check them.
PairwiseResult pairwise_loss_grad(const at::Tensor& model_pred, const at::Tensor& target,
                                  const std::optional<at::Tensor>& ref_pred, const std::optional<at::Tensor>& ref_err,
                                  int64_t method, int64_t loss_type, double beta);

}  // namespace cpu
}  // namespace rpo_fast
