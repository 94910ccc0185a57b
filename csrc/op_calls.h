// Calls of the rpo_fast ops through the dispatcher, from C++: each op's typed handle is
// looked up once. Used by the autograd kernels (autograd.cpp), which call the ops below
// autograd, and by fused_loss (fused.cpp), which chains the stages.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace rpo_fast {

inline std::tuple<at::Tensor, at::Tensor> call_sample_errors(const at::Tensor& model_pred, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& ref_pred) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rpo_fast::sample_errors", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const std::optional<at::Tensor>&)>();
  return op.call(model_pred, target, ref_pred);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> call_pair_loss(const at::Tensor& model_err,
                                                                     const at::Tensor& ref_err,
                                                                     const std::optional<at::Tensor>& weights,
                                                                     int64_t method, int64_t loss_type, double beta,
                                                                     double weight_scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rpo_fast::pair_loss", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                 int64_t, double, double)>();
  return op.call(model_err, ref_err, weights, method, loss_type, beta, weight_scale);
}

inline at::Tensor call_error_grad(const at::Tensor& coef, const at::Tensor& model_pred, const at::Tensor& target) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rpo_fast::error_grad", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(coef, model_pred, target);
}

inline at::Tensor call_similarity_weights(const at::Tensor& emb_w, const at::Tensor& emb_l, double tau) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rpo_fast::similarity_weights", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(emb_w, emb_l, tau);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fused_loss(
    const at::Tensor& model_pred, const at::Tensor& target, const std::optional<at::Tensor>& ref_pred,
    const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& emb_w,
    const std::optional<at::Tensor>& emb_l, const std::optional<at::Tensor>& weights, int64_t method,
    int64_t loss_type, double beta, double tau, double weight_scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rpo_fast::fused_loss", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                 const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                                 int64_t, double, double, double)>();
  return op.call(model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights, method, loss_type, beta, tau,
                 weight_scale);
}

}  // namespace rpo_fast
