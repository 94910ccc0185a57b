// Autograd of the C++ ops, in C++ (dispatch key Autograd, for CPU and CUDA alike).
//
// The same formulas as rpo_fast/ops.py::register_op_family, which registers them in
// Python for the Triton ops: sample_errors' backward recomputes pred - target in
// error_grad; pair_loss's backward scales the coefficients its forward returned; fused_loss
// does both in one node, or hands on a gradient its forward wrote (below). Written in C++
// because the Python autograd wrappers of torch.library cost about 0.1 to 0.2 ms per
// forward+backward of the loss (docs/kernels-cpp.md), a large share of a step at SD
// latent sizes. torch.compile traces these kernels like those of aten ops: the forward and
// the backward call the ops through the dispatcher, which the fake kernels answer.
//
// No double backward: the gradients do not require grad (a loss needs none).
#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "op_calls.h"
#include "rpo_math.h"

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

// The fused loss: one node. Where the forward can write the gradient with each input read
// from memory once (dpo and sft on CPU: fused.cpp's pairwise pass), it does, for dL = 1,
// and the backward hands that buffer on as it is when dL is 1, or scales it by dL (in place
// unless the graph is kept for another backward): 4N elements moved instead of 6N. Elsewhere
// the backward recomputes the gradient with error_grad from the saved inputs and the
// coefficients scaled by dL: rpo's coefficients depend on every sample, so its gradient
// needs a second pass either way, and a stored one would cost a third when dL != 1
// (gradient accumulation, loss scaling); on CUDA, dL == 1 cannot be checked without a sync.
class FusedLoss : public torch::autograd::Function<FusedLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& ref_pred, const std::optional<at::Tensor>& ref_err,
                               const std::optional<at::Tensor>& emb_w, const std::optional<at::Tensor>& emb_l,
                               const std::optional<at::Tensor>& weights, int64_t method, int64_t loss_type,
                               double beta, double tau, bool with_grad) {
    // Undefined incoming gradients stay undefined (the backward checks): materialized, the
    // unused outputs' would be zero tensors allocated and filled on every backward.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, metrics, coef, grad] = call_fused_loss(model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights,
                                                       method, loss_type, beta, tau, with_grad);
    if (with_grad) {
      // Saved like any tensor (saved-tensor hooks see it; the engine releases it after the
      // backward, which lets autograd own the buffer that backward returns).
      ctx->save_for_backward({coef, grad});
      ctx->saved_data["grad_written"] = true;
    } else {
      ctx->save_for_backward({coef, model_pred, target});
    }
    ctx->mark_non_differentiable({metrics, coef, grad});
    return {loss, metrics, coef, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(12);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();  // raises if the graph was freed
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor& dloss = grads[0];
    if (ctx->saved_data.count("grad_written") == 0) {
      out[0] = call_error_grad((saved[0] * dloss.to(at::kFloat)).contiguous(), saved[1], saved[2]);
      return out;
    }
    const at::Tensor& grad = saved[1];
    // dL's value can be read for free from a real CPU tensor; not while torch.compile traces.
    const bool unit = dloss.is_cpu() && !at::isTensorSubclassLike(dloss) && dloss.item<double>() == 1.0;
    if (torch::autograd::get_current_graph_task_keep_graph()) {
      out[0] = unit ? grad.clone() : grad * dloss;  // another backward will follow: keep ours
    } else {
      // The engine releases the saved gradient after this call: the buffer is autograd's.
      out[0] = unit ? grad : grad.mul_(dloss);
    }
    return out;
  }
};

// Whether the fused forward writes the gradient (FusedLoss): asked for (with_grad: a graph
// that torch.compile traced from a call that did, run without grad mode), or where it pays
// and a gradient is wanted.
bool forward_writes_grad(const at::Tensor& model_pred, int64_t method, bool with_grad) {
  if (with_grad) return true;
  return at::GradMode::is_enabled() && model_pred.requires_grad() && model_pred.is_cpu() && method != math::kRpo;
}

class PairLoss : public torch::autograd::Function<PairLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_err, const at::Tensor& ref_err,
                               const std::optional<at::Tensor>& weights, int64_t method, int64_t loss_type,
                               double beta) {
    ctx->set_materialize_grads(false);  // see FusedLoss
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, metrics, coef] = call_pair_loss(model_err, ref_err, weights, method, loss_type, beta);
    ctx->save_for_backward({coef});
    ctx->mark_non_differentiable({metrics, coef});
    return {loss, metrics, coef};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor grad_err;
    if (grads[0].defined()) grad_err = ctx->get_saved_variables()[0] * grads[0];
    return {grad_err, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> sample_errors_autograd(const at::Tensor& model_pred, const at::Tensor& target,
                                                          const std::optional<at::Tensor>& ref_pred) {
  auto out = SampleErrors::apply(model_pred, target, ref_pred);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_loss_autograd(const at::Tensor& model_err, const at::Tensor& ref_err,
                                                                  const std::optional<at::Tensor>& weights,
                                                                  int64_t method, int64_t loss_type, double beta) {
  auto out = PairLoss::apply(model_err, ref_err, weights, method, loss_type, beta);
  return {out[0], out[1], out[2]};
}

// Callers leave with_grad False: the autograd kernel turns it on (forward_writes_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_loss_autograd(
    const at::Tensor& model_pred, const at::Tensor& target, const std::optional<at::Tensor>& ref_pred,
    const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& emb_w,
    const std::optional<at::Tensor>& emb_l, const std::optional<at::Tensor>& weights, int64_t method,
    int64_t loss_type, double beta, double tau, bool with_grad) {
  auto out = FusedLoss::apply(model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights, method, loss_type, beta,
                              tau, forward_writes_grad(model_pred, method, with_grad));
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace rpo_fast

TORCH_LIBRARY_IMPL(rpo_fast, Autograd, m) {
  m.impl("fused_loss", &rpo_fast::fused_loss_autograd);
  m.impl("sample_errors", &rpo_fast::sample_errors_autograd);
  m.impl("pair_loss", &rpo_fast::pair_loss_autograd);
}
