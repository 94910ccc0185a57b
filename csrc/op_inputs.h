// Argument checks and memory-layout preparation shared by the CPU and CUDA op wrappers.
//
// The kernels iterate raw memory: every input as n samples, sample k being the d
// contiguous elements at data + k * d, with the same element order inside a sample in
// every input. Sums over a sample do not care about that order and the gradient is
// elementwise, so contiguous and channels_last inputs (and any other layout whose samples
// are contiguous blocks) are used as they are. An input in another order than model_pred
// is copied into model_pred's order, and a model_pred whose samples are not blocks (a
// sliced view, say) is copied to contiguous: docs/kernels-cpp.md has the measured cost.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <utility>

namespace rpo_fast {

// Whether an optional tensor argument was passed (Python None arrives as nullopt or undefined).
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "rpo_fast::", op,
                   ": ", name, " must be float32, bfloat16 or float16, got ", dtype,
                   " (use backend='torch' for other dtypes)");
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), "rpo_fast::", op, ": ", name, " must be on ", like.device(),
                    " (the device of the first argument), got ", t.device());
}

inline void check_same_shape(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), "rpo_fast::", op, ": ", name, " must have the shape of model_pred ",
                    like.sizes(), ", got ", t.sizes());
}

// Whether every sample t[k] is a gap-free block of d elements in memory (any order inside):
// then the kernels walk sample k as the d elements at data + k * stride(0). True for
// contiguous and channels_last tensors and for views that slice the batch dimension.
inline bool samples_are_blocks(const at::Tensor& t) {
  if (t.dim() == 0) return false;
  if (t.size(0) == 0) return true;
  return t.select(0, 0).is_non_overlapping_and_dense();
}

// Same sizes assumed: the same strides along every non-batch dimension longer than 1 mean
// the same element order inside a sample.
inline bool same_element_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t i = 1; i < a.dim(); ++i) {
    if (a.size(i) > 1 && a.stride(i) != b.stride(i)) return false;
  }
  return true;
}

// An uninitialized tensor of like's sizes with like's order inside each sample and samples
// back to back. like's samples must be blocks.
inline at::Tensor empty_in_order_of(const at::Tensor& like, const at::TensorOptions& options) {
  std::vector<int64_t> strides(like.strides().begin(), like.strides().end());
  strides[0] = like.size(0) > 0 ? like.numel() / like.size(0) : 1;
  return at::empty_strided(like.sizes(), strides, options);
}

// t itself when its samples are blocks in like's element order, else a copy of t (in its
// own dtype) with like's order inside each sample and samples back to back. like's
// samples must be blocks.
inline at::Tensor in_order_of(const at::Tensor& t, const at::Tensor& like) {
  if (same_element_order(t, like) && samples_are_blocks(t)) return t;
  at::Tensor out = empty_in_order_of(like, t.options());
  out.copy_(t);
  return out;
}

// The inputs of sample_errors, checked and in one raw-memory order.
struct SampleBatch {
  at::Tensor model, target, ref;  // ref undefined when absent
  int64_t n = 0, d = 0;
};

// Elements between sample k and k + 1 of t.
inline int64_t sample_stride(const at::Tensor& t) { return t.dim() > 0 ? t.stride(0) : 0; }

inline SampleBatch prepare_sample_batch(const at::Tensor& model_pred, const at::Tensor& target,
                                        const std::optional<at::Tensor>& ref_pred) {
  constexpr const char* op = "sample_errors";
  TORCH_CHECK_VALUE(model_pred.dim() >= 1, "rpo_fast::sample_errors: model_pred must have a batch dimension, got a 0-d tensor");
  check_kernel_dtype(op, "model_pred", model_pred);
  check_kernel_dtype(op, "target", target);
  check_same_shape(op, "target", target, model_pred);
  check_same_device(op, "target", target, model_pred);
  const bool has_ref = present(ref_pred);
  if (has_ref) {
    check_kernel_dtype(op, "ref_pred", *ref_pred);
    check_same_shape(op, "ref_pred", *ref_pred, model_pred);
    check_same_device(op, "ref_pred", *ref_pred, model_pred);
  }
  SampleBatch b;
  b.model = samples_are_blocks(model_pred) ? model_pred : model_pred.contiguous();
  b.target = in_order_of(target, b.model);
  if (has_ref) b.ref = in_order_of(*ref_pred, b.model);
  b.n = model_pred.size(0);
  b.d = b.n > 0 ? model_pred.numel() / b.n : 0;
  if (b.n == 0) {  // numel is 0 as well: d is the product of the trailing sizes
    b.d = 1;
    for (int64_t i = 1; i < model_pred.dim(); ++i) b.d *= model_pred.size(i);
  }
  return b;
}

// The inputs of error_grad, checked and in the raw-memory order of the gradient they
// produce. The gradient is at::empty_like(model_pred), exactly what the fake kernel
// (rpo_fast/ops.py) promises; when its samples are not blocks (a dense tensor with the batch
// dimension inside, say), the kernel writes a contiguous `out` that is copied into it.
struct GradBatch {
  at::Tensor grad, out, model, target;
  int64_t n = 0, d = 0;
};

inline GradBatch prepare_grad_batch(const at::Tensor& coef, const at::Tensor& model_pred, const at::Tensor& target) {
  constexpr const char* op = "error_grad";
  TORCH_CHECK_VALUE(model_pred.dim() >= 1, "rpo_fast::error_grad: model_pred must have a batch dimension, got a 0-d tensor");
  check_kernel_dtype(op, "model_pred", model_pred);
  check_kernel_dtype(op, "target", target);
  check_same_shape(op, "target", target, model_pred);
  check_same_device(op, "target", target, model_pred);
  check_same_device(op, "coef", coef, model_pred);
  TORCH_CHECK_TYPE(coef.scalar_type() == at::kFloat, "rpo_fast::error_grad: coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK_VALUE(coef.dim() == 1 && coef.size(0) == model_pred.size(0), "rpo_fast::error_grad: coef must have shape (",
                    model_pred.size(0), ",), got ", coef.sizes());
  GradBatch b;
  b.grad = at::empty_like(model_pred);
  if (samples_are_blocks(b.grad)) {
    b.out = b.grad;
    b.model = in_order_of(model_pred, b.grad);
  } else {
    b.model = model_pred.contiguous();
    b.out = at::empty_like(b.model);
  }
  b.target = in_order_of(target, b.out);
  b.n = model_pred.size(0);
  b.d = b.n > 0 ? model_pred.numel() / b.n : 0;
  return b;
}

// pair_loss arguments: checked; weights made contiguous (absent stays undefined).
struct PairArgs {
  at::Tensor model_err, ref_err, weights;
  int64_t m = 0;
};

inline PairArgs prepare_pair_args(const at::Tensor& model_err, const at::Tensor& ref_err,
                                  const std::optional<at::Tensor>& weights, int64_t method, int64_t loss_type,
                                  double beta) {
  TORCH_CHECK_VALUE(method >= 0 && method <= 2, "rpo_fast::pair_loss: method must be 0 (sft), 1 (dpo) or 2 (rpo), got ", method);
  TORCH_CHECK_VALUE(loss_type >= 0 && loss_type <= 2,
                    "rpo_fast::pair_loss: loss_type must be 0 (sigmoid), 1 (hinge) or 2 (ipo), got ", loss_type);
  TORCH_CHECK_VALUE(beta > 0.0, "rpo_fast::pair_loss: beta must be > 0, got ", beta);
  TORCH_CHECK_TYPE(model_err.scalar_type() == at::kFloat, "rpo_fast::pair_loss: model_err must be float32, got ",
                   model_err.scalar_type());
  TORCH_CHECK_VALUE(model_err.dim() == 1 && model_err.size(0) % 2 == 0,
                    "rpo_fast::pair_loss: model_err must have shape (2M,), got ", model_err.sizes());
  PairArgs a;
  a.m = model_err.size(0) / 2;
  a.model_err = model_err.contiguous();
  check_same_device("pair_loss", "ref_err", ref_err, model_err);
  TORCH_CHECK_TYPE(ref_err.scalar_type() == at::kFloat, "rpo_fast::pair_loss: ref_err must be float32, got ", ref_err.scalar_type());
  if (method == 0) {
    TORCH_CHECK_VALUE(ref_err.dim() == 1, "rpo_fast::pair_loss: ref_err must be 1-d, got ", ref_err.sizes());
  } else {
    TORCH_CHECK_VALUE(ref_err.dim() == 1 && ref_err.size(0) == model_err.size(0), "rpo_fast::pair_loss: ref_err must have shape (",
                      model_err.size(0), ",) for dpo and rpo, got ", ref_err.sizes());
    a.ref_err = ref_err.contiguous();
  }
  if (method == 2 && present(weights)) {
    check_same_device("pair_loss", "weights", *weights, model_err);
    TORCH_CHECK_TYPE(weights->scalar_type() == at::kFloat, "rpo_fast::pair_loss: weights must be float32, got ",
                     weights->scalar_type());
    TORCH_CHECK_VALUE(weights->dim() == 2 && weights->size(0) == a.m && weights->size(1) == a.m,
                      "rpo_fast::pair_loss: weights must have shape (", a.m, ", ", a.m, "), got ", weights->sizes());
    a.weights = weights->contiguous();
  }
  return a;
}

// similarity_weights arguments: checked, as float32 contiguous (M, E) matrices.
struct SimilarityArgs {
  at::Tensor w, l;
};

inline SimilarityArgs prepare_similarity_args(const at::Tensor& emb_w, const at::Tensor& emb_l, double tau) {
  constexpr const char* op = "similarity_weights";
  // Any floating dtype (float64 CLIP features too): the kernel reads float32 copies.
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"emb_w", emb_w}, {"emb_l", emb_l}}) {
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "rpo_fast::", op, ": ", name,
                     " must have a floating dtype, got ", t.scalar_type());
  }
  check_same_device(op, "emb_l", emb_l, emb_w);
  TORCH_CHECK_VALUE(emb_w.dim() == 2 && emb_l.sizes() == emb_w.sizes(),
                    "rpo_fast::similarity_weights: emb_w and emb_l must both have shape (M, E), got ", emb_w.sizes(),
                    " and ", emb_l.sizes());
  TORCH_CHECK_VALUE(tau > 0.0, "rpo_fast::similarity_weights: tau must be > 0, got ", tau);
  return {emb_w.to(at::kFloat).contiguous(), emb_l.to(at::kFloat).contiguous()};
}

}  // namespace rpo_fast
