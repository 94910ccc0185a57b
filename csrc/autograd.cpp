// Autograd of the C++ ops, in C++ (dispatch key Autograd, for CPU and CUDA alike).
//
// The only backward of the C++ ops (the Triton ops have theirs in kernels/triton_loss.py):
// sample_errors' backward recomputes pred - target in error_grad; pair_loss's backward
// scales the coefficients its forward returned; fused_loss does both in one node. Written in
// C++ because the Python autograd wrappers of torch.library cost about 0.1 to 0.2 ms per
// forward+backward of the loss (docs/kernels-cpp.md), a large share of a step at SD
// latent sizes. torch.compile traces these kernels like those of aten ops: the forward and
// the backward call the ops through the dispatcher, which the fake kernels answer.
//
// No double backward: the gradients do not require grad (a loss needs none).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "op_calls.h"

#include <optional>
#include <tuple>

namespace rpo_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class SampleErrors : public torch::autograd::Function<SampleErrors> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& ref_pred) {
    ctx->set_materialize_grads(false);  // see FusedLoss
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [model_err, ref_err] = call_sample_errors(model_pred, target, ref_pred);
    ctx->save_for_backward({model_pred, target});
    ctx->mark_non_differentiable({ref_err});
    return {model_err, ref_err};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_pred;
    if (grads[0].defined()) {
      const auto saved = ctx->get_saved_variables();
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      grad_pred = call_error_grad(grads[0].to(at::kFloat).contiguous(), saved[0], saved[1]);
    }
    return {grad_pred, at::Tensor(), at::Tensor()};
  }
};

// The fused loss: one node, the same for every method and device. The forward saves the
// (2M,) coefficients and the inputs the caller holds anyway; the backward is error_grad of
// the coefficients scaled by the incoming gradient (docs/kernels-cpp.md, "One gradient path").
class FusedLoss : public torch::autograd::Function<FusedLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& ref_pred, const std::optional<at::Tensor>& ref_err,
                               const std::optional<at::Tensor>& emb_w, const std::optional<at::Tensor>& emb_l,
                               const std::optional<at::Tensor>& weights, int64_t method, int64_t loss_type,
                               double beta, double tau, double weight_scale) {
    // Undefined incoming gradients stay undefined (the backward checks): materialized, the
    // unused outputs' would be zero tensors allocated and filled on every backward.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, metrics, coef] =
        call_fused_loss(model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights, method, loss_type, beta, tau,
                        weight_scale);
    ctx->save_for_backward({coef, model_pred, target});
    ctx->mark_non_differentiable({metrics, coef});
    return {loss, metrics, coef};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(12);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();  // raises if the graph was freed
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out[0] = call_error_grad((saved[0] * grads[0].to(at::kFloat)).contiguous(), saved[1], saved[2]);
    return out;
  }
};

class PairLoss : public torch::autograd::Function<PairLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_err, const at::Tensor& ref_err,
                               const std::optional<at::Tensor>& weights, int64_t method, int64_t loss_type,
                               double beta, double weight_scale) {
    ctx->set_materialize_grads(false);  // see FusedLoss
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, metrics, coef] = call_pair_loss(model_err, ref_err, weights, method, loss_type, beta, weight_scale);
    ctx->save_for_backward({coef});
    ctx->mark_non_differentiable({metrics, coef});
    return {loss, metrics, coef};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_err;
    if (grads[0].defined()) grad_err = ctx->get_saved_variables()[0] * grads[0];
    return {grad_err, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> sample_errors_autograd(const at::Tensor& model_pred, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& ref_pred) {
  auto out = SampleErrors::apply(model_pred, target, ref_pred);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_loss_autograd(const at::Tensor& model_err, const at::Tensor& ref_err,
                                                                  const std::optional<at::Tensor>& weights,
                                                                  int64_t method, int64_t loss_type, double beta,
                                                                  double weight_scale) {
  auto out = PairLoss::apply(model_err, ref_err, weights, method, loss_type, beta, weight_scale);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_loss_autograd(
    const at::Tensor& model_pred, const at::Tensor& target, const std::optional<at::Tensor>& ref_pred,
    const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& emb_w,
    const std::optional<at::Tensor>& emb_l, const std::optional<at::Tensor>& weights, int64_t method,
    int64_t loss_type, double beta, double tau, double weight_scale) {
  auto out = FusedLoss::apply(model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights, method, loss_type, beta,
                              tau, weight_scale);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace rpo_fast

TORCH_LIBRARY_IMPL(rpo_fast, Autograd, m) {
  m.impl("fused_loss", &rpo_fast::fused_loss_autograd);
  m.impl("sample_errors", &rpo_fast::sample_errors_autograd);
  m.impl("pair_loss", &rpo_fast::pair_loss_autograd);
}
