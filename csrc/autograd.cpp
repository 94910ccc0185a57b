// Autograd of the C++ ops, in C++ (dispatch key Autograd, for CPU and CUDA alike).
//
// The same formulas as rpo_fast/ops.py::register_op_family, which registers them in
// Python for the Triton ops: sample_errors' backward recomputes pred - target in
// error_grad; pair_loss's backward scales the coefficients its forward returned; fused_loss
// does both in one node, or scales a direction its forward stored (below). Written in C++
// because the Python autograd wrappers of torch.library cost about 0.1 to 0.2 ms per
// forward+backward of the loss (docs/kernels-cpp.md), a large share of a step at SD
// latent sizes. torch.compile traces these kernels like those of aten ops: the forward and
// the backward call the ops through the dispatcher, which the fake kernels answer.
//
// No double backward: the gradients do not require grad (a loss needs none).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "op_calls.h"

#include <optional>
#include <tuple>
#include <vector>

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

// The fused loss: one node whose backward writes the gradient, scaled by dL.
//
// Where the forward stores the direction model_pred - target (float32 on CPU with a
// concrete sample size, stores_direction below), the backward scales it in place by
// coef * dL * 2 / D into the gradient and hands that buffer on: 6N elements moved in all,
// as when recomputing (forward 3N + N, backward N + N against 3N, then 2N + N), but the
// in-place pass over a buffer written a moment ago measured 10-25% faster at SDXL latents
// on the 2-core benchmark machine (benchmarks/store_vs_recompute.py, docs/kernels-cpp.md).
// Elsewhere it recomputes: bf16/fp16 would round a stored direction twice, and the CUDA
// and Triton kernels are unmeasured. Nothing of size D is saved besides the direction
// (model_pred and target are saved only when recomputing).
class FusedLoss : public torch::autograd::Function<FusedLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& model_pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& ref_pred, const std::optional<at::Tensor>& ref_err,
                               const std::optional<at::Tensor>& emb_w, const std::optional<at::Tensor>& emb_l,
                               const std::optional<at::Tensor>& weights, int64_t method, int64_t loss_type,
                               double beta, double tau, std::optional<int64_t> stored_sample_size) {
    // Undefined incoming gradients stay undefined (the backward checks): materialized, the
    // unused outputs' would be zeros filled on every backward, the direction's of size D.
    ctx->set_materialize_grads(false);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool store = stored_sample_size.has_value();
    auto [loss, metrics, coef, direction] = call_fused_loss(model_pred, target, ref_pred, ref_err, emb_w, emb_l,
                                                            weights, method, loss_type, beta, tau, store);
    if (store) {
      // In saved_data, not save_for_backward: the backward overwrites it, which a saved
      // variable's version check would reject, and takes it out so that it is the only
      // reference to the buffer it returns.
      ctx->saved_data["direction"] = direction;
      ctx->saved_data["sample_size"] = *stored_sample_size;
      ctx->save_for_backward({coef});
    } else {
      ctx->save_for_backward({coef, model_pred, target});
    }
    ctx->mark_non_differentiable({metrics, coef, direction});
    return {loss, metrics, coef, direction};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(12);
    if (!grads[0].defined()) return out;
    const auto saved = ctx->get_saved_variables();  // raises if the graph was freed
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor coef = saved[0] * grads[0].to(at::kFloat);
    const auto stored = ctx->saved_data.find("direction");
    if (stored == ctx->saved_data.end()) {
      out[0] = call_error_grad(coef.contiguous(), saved[1], saved[2]);
      return out;
    }
    at::Tensor direction = stored->second.toTensor();
    const int64_t d = ctx->saved_data["sample_size"].toInt();
    // The scale error_grad computes, float(coef * 2 / D) with the product in double, one per
    // sample, broadcast over the sample's elements.
    std::vector<c10::SymInt> per_sample(static_cast<size_t>(direction.dim()), c10::SymInt(1));
    per_sample[0] = direction.sym_size(0);
    const at::Tensor scale = coef.to(at::kDouble).mul_(2.0 / double(d)).to(at::kFloat).view_symint(per_sample);
    if (torch::autograd::get_current_graph_task_keep_graph()) {
      out[0] = direction * scale;  // another backward will follow: keep the direction
    } else {
      ctx->saved_data.erase(stored);
      out[0] = direction.mul_(scale);
    }
    return out;
  }
};

// Elements per sample, when that is a number (under torch.compile with dynamic sample
// shapes it can be a symbol).
std::optional<int64_t> concrete_sample_size(const at::Tensor& model_pred) {
  c10::SymInt d = 1;
  for (int64_t i = 1; i < model_pred.dim(); ++i) d = d * model_pred.sym_size(i);
  return d.maybe_as_int();
}

// Whether the fused forward stores the direction: it returns the sample size D when it
// does. Asked for (store_direction: a graph that torch.compile traced from a call that
// stored, run without grad mode), or where it pays when a gradient is wanted: float32 CPU
// predictions and target of a concrete sample size (else the backward recomputes).
std::optional<int64_t> stored_sample_size(const at::Tensor& model_pred, const at::Tensor& target,
                                          bool store_direction) {
  if (model_pred.dim() < 1) return std::nullopt;  // the op's checks reject it
  if (store_direction) {
    const auto d = concrete_sample_size(model_pred);
    TORCH_CHECK_VALUE(d.has_value(), "rpo_fast::fused_loss: store_direction needs a concrete sample size");
    return d;
  }
  if (!(at::GradMode::is_enabled() && model_pred.requires_grad())) return std::nullopt;
  if (!(model_pred.is_cpu() && model_pred.scalar_type() == at::kFloat && target.scalar_type() == at::kFloat)) {
    return std::nullopt;
  }
  return concrete_sample_size(model_pred);
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

// Callers leave store_direction False: the autograd kernel turns it on where storing pays
// (stored_sample_size).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_loss_autograd(
    const at::Tensor& model_pred, const at::Tensor& target, const std::optional<at::Tensor>& ref_pred,
    const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& emb_w,
    const std::optional<at::Tensor>& emb_l, const std::optional<at::Tensor>& weights, int64_t method,
    int64_t loss_type, double beta, double tau, bool store_direction) {
  auto out = FusedLoss::apply(model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights, method, loss_type, beta,
                              tau, stored_sample_size(model_pred, target, store_direction));
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace rpo_fast

TORCH_LIBRARY_IMPL(rpo_fast, Autograd, m) {
  m.impl("fused_loss", &rpo_fast::fused_loss_autograd);
  m.impl("sample_errors", &rpo_fast::sample_errors_autograd);
  m.impl("pair_loss", &rpo_fast::pair_loss_autograd);
}
