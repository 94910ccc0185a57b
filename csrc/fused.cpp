// The whole loss in one op: rpo_fast::fused_loss, for CPU and CUDA tensors.
//
// It chains the stage ops (sample_errors, similarity_weights, pair_loss) in C++, so that a
// loss call on one process is one op and one autograd node (csrc/autograd.cpp) instead of
// two ops, a handful of small tensor ops for the weights, and their Python glue: on a
// 2-core CPU those cost about as much as the passes over the predictions at SD sizes
// (docs/kernels-cpp.md). The stage ops stay for the data-parallel path, which gathers the
// errors of every rank between the stages, and for the Triton backend. For dpo and sft on
// CPU, when the gradient is wanted, the errors and the gradient come from one pairwise pass
// instead (cpu/ops_cpu.h).
//
// Also here: similarity_weights for tensors without a kernel of their own (CUDA, Meta), in
// ATen ops; the CPU kernel is in cpu/ops_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <tuple>

#include "cpu/ops_cpu.h"
#include "op_calls.h"
#include "op_inputs.h"
#include "rpo_math.h"

namespace rpo_fast {
namespace {

// softmax_j(cos(emb_w[i], emb_l[j]) / tau) as rpo_fast/weights.py writes it.
at::Tensor similarity_weights_aten(const at::Tensor& emb_w, const at::Tensor& emb_l, double tau) {
  const SimilarityArgs a = prepare_similarity_args(emb_w, emb_l, tau);
  const auto unit_rows = [](const at::Tensor& x) {
    return x / at::linalg_vector_norm(x, 2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  };
  return at::softmax(at::mm(unit_rows(a.w), unit_rows(a.l).t()) / tau, 1);
}

// Whether dpo / sft on CPU go pair by pair (cpu/ops_cpu.h): at least two pairs per thread,
// so that whole pairs keep every core busy; fewer pairs take the stages, which split samples.
bool goes_pairwise(const at::Tensor& model_pred, int64_t method) {
  if (!model_pred.is_cpu() || method == math::kRpo || model_pred.dim() < 1) return false;
  return model_pred.size(0) / 2 >= 2 * int64_t(at::get_num_threads());
}

// with_grad: also the gradient with respect to model_pred for dL = 1 (the fourth output, like
// model_pred; else an empty (0,) tensor). The autograd kernel (csrc/autograd.cpp) asks for
// it where that saves a pass: dpo and sft on CPU, whose pairwise pass reads each input once.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_loss(
    const at::Tensor& model_pred, const at::Tensor& target, const std::optional<at::Tensor>& ref_pred,
    const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& emb_w,
    const std::optional<at::Tensor>& emb_l, const std::optional<at::Tensor>& weights, int64_t method,
    int64_t loss_type, double beta, double tau, bool with_grad) {
  TORCH_CHECK_VALUE(present(emb_w) == present(emb_l), "rpo_fast::fused_loss: pass emb_w and emb_l together");
  TORCH_CHECK_VALUE(!(present(emb_w) && present(weights)),
                    "rpo_fast::fused_loss: pass embeddings or weights, not both");
  TORCH_CHECK_VALUE(!(present(ref_pred) && present(ref_err)),
                    "rpo_fast::fused_loss: pass ref_pred or ref_err, not both");
  if (with_grad && goes_pairwise(model_pred, method)) {
    cpu::PairwiseResult r = cpu::pairwise_loss_grad(model_pred, target, ref_pred, ref_err, method, loss_type, beta);
    auto [loss, metrics, coef] = call_pair_loss(r.model_err, r.ref_err, std::nullopt, method, loss_type, beta);
    // The pair stage makes every coefficient NaN when any input is not finite.
    if (!r.finite) r.grad.fill_(std::numeric_limits<double>::quiet_NaN());
    return {loss, metrics, coef, r.grad};
  }
  auto [model_err, ref_from_pred] = call_sample_errors(model_pred, target, ref_pred);
  const at::Tensor ref = present(ref_err) ? ref_err->to(at::kFloat).contiguous() : ref_from_pred;
  std::optional<at::Tensor> pair_weights;
  if (present(emb_w)) {
    pair_weights = call_similarity_weights(*emb_w, *emb_l, tau);
  } else if (present(weights)) {
    pair_weights = weights->to(at::kFloat).contiguous();
  }
  auto [loss, metrics, coef] = call_pair_loss(model_err, ref, pair_weights, method, loss_type, beta);
  at::Tensor grad = with_grad ? call_error_grad(coef, model_pred, target) : at::empty({0}, model_pred.options());
  return {loss, metrics, coef, grad};
}

}  // namespace
}  // namespace rpo_fast

TORCH_LIBRARY_IMPL(rpo_fast, CompositeExplicitAutograd, m) {
  m.impl("similarity_weights", &rpo_fast::similarity_weights_aten);
}

TORCH_LIBRARY_IMPL(rpo_fast, CPU, m) { m.impl("fused_loss", &rpo_fast::fused_loss); }

#ifdef RPO_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(rpo_fast, CUDA, m) { m.impl("fused_loss", &rpo_fast::fused_loss); }
#endif
