// The whole loss in one op: rpo_fast::fused_loss, for CPU and CUDA tensors.
//
// It chains the stage ops (sample_errors, similarity_weights, pair_loss) in C++, so that a
// loss call on one process is one op and one autograd node (csrc/autograd.cpp) instead of
// two ops, a handful of small tensor ops for the weights, and their Python glue: on a
// 2-core CPU those cost about as much as the passes over the predictions at SD sizes
// (docs/kernels-cpp.md). The stage ops stay for the data-parallel path, which gathers the
// errors of every rank between the stages. Its backward (csrc/autograd.cpp) is error_grad
// of the coefficients, as for the stages.
//
// Also here: similarity_weights for tensors without a kernel of their own (CUDA, Meta), in
// ATen ops; the CPU kernel is in cpu/ops_cpu.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "op_calls.h"
#include "op_inputs.h"

namespace rpo_fast {
namespace {

// softmax_j(cos(emb_w[i], emb_l[j]) / tau) as rpo_fast/weights.py writes it, in double: an
// fp32 mm on a GPU would run in TF32 where the caller allows it (the trainer's default),
// about 1e-3 off in the cosines; M x M x E in double is cheap next to the loss's passes.
at::Tensor similarity_weights_aten(const at::Tensor& emb_w, const at::Tensor& emb_l, double tau) {
  const SimilarityArgs a = prepare_similarity_args(emb_w, emb_l, tau);
  const auto unit_rows = [](const at::Tensor& x) {
    const at::Tensor x64 = x.to(at::kDouble);
    return x64 / at::linalg_vector_norm(x64, 2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  };
  return at::softmax(at::mm(unit_rows(a.w), unit_rows(a.l).t()) / tau, 1).to(at::kFloat);
}

// The stages chained: errors, weights, pair stage. The arguments were checked by
// rpo_fast/validation.py; the stage ops assert what their kernels rely on.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_loss(
    const at::Tensor& model_pred, const at::Tensor& target, const std::optional<at::Tensor>& ref_pred,
    const std::optional<at::Tensor>& ref_err, const std::optional<at::Tensor>& emb_w,
    const std::optional<at::Tensor>& emb_l, const std::optional<at::Tensor>& weights, int64_t method,
    int64_t loss_type, double beta, double tau, double weight_scale) {
  RPO_ASSERT(present(emb_w) == present(emb_l) && !(present(emb_w) && present(weights)) &&
                 !(present(ref_pred) && present(ref_err)),
             "fused_loss: emb_w needs emb_l; embeddings exclude weights, ref_pred excludes ref_err");
  auto [model_err, ref_from_pred] = call_sample_errors(model_pred, target, ref_pred);
  const at::Tensor ref = present(ref_err) ? ref_err->to(at::kFloat).contiguous() : ref_from_pred;
  std::optional<at::Tensor> pair_weights;
  if (present(emb_w)) {
    pair_weights = call_similarity_weights(*emb_w, *emb_l, tau);
  } else if (present(weights)) {
    pair_weights = weights->to(at::kFloat).contiguous();
  }
  return call_pair_loss(model_err, ref, pair_weights, method, loss_type, beta, weight_scale);
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
