// Internal asserts and the memory-layout rules shared by the CPU and CUDA op wrappers.
//
// Users' arguments are validated once, by rpo_fast/validation.py, before any op runs; the asserts
// here only keep a direct call of an op from reading memory it should not (a RuntimeError
// naming the op and the argument).
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

#include "rpo_math.h"

#include <optional>

namespace rpo_fast {

// Whether an optional tensor argument was passed (Python None arrives as nullopt or undefined).
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

#define RPO_ASSERT(cond, ...) TORCH_CHECK(cond, "rpo_fast::", __VA_ARGS__, " (internal check failed)")

// The kernels' input dtypes (rpo_fast._types.KERNEL_DTYPES in Python): calls fn(T*) with a
// null pointer of the element type of dtype.
template <typename Fn>
void with_kernel_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: fn(static_cast<c10::Half*>(nullptr)); break;
    default: RPO_ASSERT(false, "kernels: float32, bfloat16 or float16 inputs only, got ", dtype);
  }
}

// t has a kernel dtype and, unless t is like itself, like's sizes and device.
inline void assert_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  with_kernel_type(t.scalar_type(), [](auto*) {});
  RPO_ASSERT(t.sizes() == like.sizes() && t.device() == like.device(), op, ": ", name,
             " must have the sizes and device of model_pred");
}

inline void assert_errors(const char* op, const char* name, const at::Tensor& t, int64_t n) {
  RPO_ASSERT(t.scalar_type() == at::kFloat && t.dim() == 1 && (n < 0 || t.size(0) == n), op, ": ", name,
             " must be float32 of shape (", n, ",), got ", t.scalar_type(), " ", t.sizes());
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
  RPO_ASSERT(model_pred.dim() >= 1, op, ": model_pred must have a batch dimension");
  assert_input(op, "model_pred", model_pred, model_pred);
  assert_input(op, "target", target, model_pred);
  const bool has_ref = present(ref_pred);
  if (has_ref) assert_input(op, "ref_pred", *ref_pred, model_pred);
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
// (rpo_fast/fake_kernels.py) promises; when its samples are not blocks (a dense tensor with the batch
// dimension inside, say), the kernel writes a contiguous `out` that is copied into it.
struct GradBatch {
  at::Tensor grad, out, model, target;
  int64_t n = 0, d = 0;
};

inline GradBatch prepare_grad_batch(const at::Tensor& coef, const at::Tensor& model_pred, const at::Tensor& target) {
  constexpr const char* op = "error_grad";
  RPO_ASSERT(model_pred.dim() >= 1, op, ": model_pred must have a batch dimension");
  assert_input(op, "model_pred", model_pred, model_pred);
  assert_input(op, "target", target, model_pred);
  assert_errors(op, "coef", coef, model_pred.size(0));
  RPO_ASSERT(coef.device() == model_pred.device(), op, ": coef must be on the device of model_pred");
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
                                  double beta, double weight_scale) {
  constexpr const char* op = "pair_loss";
  RPO_ASSERT(method >= math::kSft && method <= math::kRpo && loss_type >= math::kSigmoid && loss_type <= math::kIpo &&
                 beta > 0.0 && weight_scale > 0.0,
             op, ": method, loss_type, beta or weight_scale out of range");
  assert_errors(op, "model_err", model_err, -1);
  RPO_ASSERT(model_err.size(0) % 2 == 0, op, ": model_err must have shape (2M,)");
  PairArgs a;
  a.m = model_err.size(0) / 2;
  a.model_err = model_err.contiguous();
  RPO_ASSERT(ref_err.device() == model_err.device(), op, ": ref_err must be on the device of model_err");
  assert_errors(op, "ref_err", ref_err, method == math::kSft ? -1 : model_err.size(0));
  if (method != math::kSft) a.ref_err = ref_err.contiguous();
  if (method == math::kRpo && present(weights)) {
    RPO_ASSERT(weights->scalar_type() == at::kFloat && weights->device() == model_err.device() &&
                   weights->sizes() == at::IntArrayRef({a.m, a.m}),
               op, ": weights must be float32 (M, M) on the device of model_err");
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
  RPO_ASSERT(at::isFloatingType(emb_w.scalar_type()) && at::isFloatingType(emb_l.scalar_type()) &&
                 emb_w.device() == emb_l.device() && emb_w.dim() == 2 && emb_l.sizes() == emb_w.sizes() && tau > 0.0,
             op, ": emb_w and emb_l must be floating (M, E) on one device, tau > 0");
  return {emb_w.to(at::kFloat).contiguous(), emb_l.to(at::kFloat).contiguous()};
}

}  // namespace rpo_fast
