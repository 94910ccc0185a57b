// CPU implementations of the rpo_fast ops: argument checks and layout (op_inputs.h), then
// the vectorized kernels of the best instruction set (kernels.h) for the passes over the
// predictions, and the pair stage of rpo_math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"
#include "op_inputs.h"
#include "rpo_math.h"

namespace rpo_fast {
namespace cpu {

const KernelSet& selected_kernels() {
  static const KernelSet chosen = [] {
    // ATen's choice honours ATEN_CPU_CAPABILITY (default, avx2, avx512) as well as the CPU;
    // the feature checks make sure the pragmas of kernels_avx*.cpp hold here too.
    const std::string aten = at::get_cpu_capability();
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    if (aten == "AVX512" && avx512) return kernels_avx512();
    if ((aten == "AVX512" || aten == "AVX2") && avx2) return kernels_avx2();
#endif
    return kernels_default();
  }();
  return chosen;
}

namespace {

ScalarKind kind_of(const at::Tensor& t) {
  ScalarKind kind = ScalarKind::kFloat;
  with_kernel_type(t.scalar_type(), [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    kind = std::is_same_v<T, c10::BFloat16> ? ScalarKind::kBFloat16
           : std::is_same_v<T, c10::Half>   ? ScalarKind::kHalf
                                            : ScalarKind::kFloat;
  });
  return kind;
}

// The kernel job for b's errors, written into model_err and ref_err.
ErrorsJob errors_job(const SampleBatch& b, at::Tensor& model_err, at::Tensor& ref_err) {
  ErrorsJob job{};
  job.model = b.model.const_data_ptr();
  job.target = b.target.const_data_ptr();
  job.ref = b.ref.defined() ? b.ref.const_data_ptr() : nullptr;
  job.model_kind = kind_of(b.model);
  job.target_kind = kind_of(b.target);
  job.ref_kind = b.ref.defined() ? kind_of(b.ref) : ScalarKind::kFloat;
  job.model_stride = sample_stride(b.model);
  job.target_stride = sample_stride(b.target);
  job.ref_stride = b.ref.defined() ? sample_stride(b.ref) : 0;
  job.n = b.n;
  job.d = b.d;
  job.model_err = model_err.mutable_data_ptr<float>();
  job.ref_err = ref_err.mutable_data_ptr<float>();
  return job;
}

std::tuple<at::Tensor, at::Tensor> sample_errors_cpu(const at::Tensor& model_pred, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& ref_pred) {
  const SampleBatch b = prepare_sample_batch(model_pred, target, ref_pred);
  const auto f32 = model_pred.options().dtype(at::kFloat);
  at::Tensor model_err = at::empty({b.n}, f32);
  at::Tensor ref_err = at::empty({b.ref.defined() ? b.n : 0}, f32);
  if (b.n > 0) selected_kernels().sample_errors(errors_job(b, model_err, ref_err));
  return {model_err, ref_err};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_loss_cpu(const at::Tensor& model_err, const at::Tensor& ref_err,
                                                             const std::optional<at::Tensor>& weights, int64_t method,
                                                             int64_t loss_type, double beta, double weight_scale) {
  const PairArgs a = prepare_pair_args(model_err, ref_err, weights, method, loss_type, beta, weight_scale);
  const auto f32 = model_err.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor metrics = at::empty({math::kNumMetrics}, f32);
  at::Tensor coef = at::empty({2 * a.m}, f32);
  const int64_t m = a.m;
  if (m == 0) {
    loss.fill_(std::numeric_limits<float>::quiet_NaN());
    metrics.fill_(std::numeric_limits<float>::quiet_NaN());
    return {loss, metrics, coef};
  }
  math::PairProblem p{a.model_err.const_data_ptr<float>(),
                      a.ref_err.defined() ? a.ref_err.const_data_ptr<float>() : nullptr,
                      a.weights.defined() ? a.weights.const_data_ptr<float>() : nullptr,
                      m, method, loss_type, beta, weight_scale};
  // Tiles over threads (for a large global batch), indices in order within a tile, partials
  // combined in tile order (rpo_math.h): the result does not depend on the threads.
  const int64_t tiles = math::pair_tiles(m);
  std::vector<math::TilePartial> partials(static_cast<size_t>(tiles));
  float* c = coef.mutable_data_ptr<float>();
  // Tiles per task: at least 4096 (row, column) terms, so that a small batch stays on one thread.
  const int64_t grain = std::max<int64_t>(1, 4096 / (math::kPairTile * (method == math::kRpo ? m : 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      math::TilePartial& part = partials[t];
      part = math::TilePartial{0.0, {0.0, 0.0, 0.0, 0.0, 0.0}, true};
      for (int64_t k = t * math::kPairTile; k < std::min(2 * m, (t + 1) * math::kPairTile); ++k) {
        part.finite = math::index_terms(p, k, c, part.loss, part.metrics) && part.finite;
      }
    }
  });
  const bool finite = math::finish_tiles(p, partials.data(), tiles, loss.mutable_data_ptr<float>(),
                                         metrics.mutable_data_ptr<float>());
  if (!finite) coef.fill_(std::numeric_limits<float>::quiet_NaN());
  return {loss, metrics, coef};
}

// The kernel job for the gradient of model and target (samples in one element order) into out.
GradJob grad_job(const float* coef, const at::Tensor& model, const at::Tensor& target, at::Tensor& out, int64_t n,
                 int64_t d) {
  GradJob job{};
  job.coef = coef;
  job.model = model.const_data_ptr();
  job.target = target.const_data_ptr();
  job.grad = out.mutable_data_ptr();
  job.model_kind = kind_of(model);
  job.target_kind = kind_of(target);
  job.model_stride = sample_stride(model);
  job.target_stride = sample_stride(target);
  job.grad_stride = sample_stride(out);
  job.n = n;
  job.d = d;
  return job;
}

// The gradient is a fresh tensor every call, and glibc maps an allocation of many MiB anew (or
// trims the heap between calls): its first write then faults every 4 KiB page in (8192
// faults for SDXL fp32 at M = 64, docs/kernels-cpp.md "Page faults"). Advising transparent
// huge pages for its 2 MiB-aligned interior before the kernel writes it makes that a fault
// per 2 MiB where the kernel's THP mode is "madvise" or "always". Advice only: pages already
// present are left as they are, and a failure changes nothing.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

at::Tensor error_grad_cpu(const at::Tensor& coef, const at::Tensor& model_pred, const at::Tensor& target) {
  GradBatch b = prepare_grad_batch(coef, model_pred, target);
  advise_huge_pages(b.out);
  const at::Tensor coef_c = coef.contiguous();
  selected_kernels().error_grad(grad_job(coef_c.const_data_ptr<float>(), b.model, b.target, b.out, b.n, b.d));
  if (!b.out.is_same(b.grad)) b.grad.copy_(b.out);
  return b.grad;
}

at::Tensor similarity_weights_cpu(const at::Tensor& emb_w, const at::Tensor& emb_l, double tau) {
  const SimilarityArgs a = prepare_similarity_args(emb_w, emb_l, tau);
  const int64_t m = a.w.size(0);
  at::Tensor out = at::empty({m, m}, a.w.options());
  SimilarityJob job{a.w.const_data_ptr<float>(), a.l.const_data_ptr<float>(), m, a.w.size(1), tau,
                    out.mutable_data_ptr<float>()};
  selected_kernels().similarity_weights(job);
  return out;
}

}  // namespace

}  // namespace cpu
}  // namespace rpo_fast

TORCH_LIBRARY_IMPL(rpo_fast, CPU, m) {
  m.impl("sample_errors", &rpo_fast::cpu::sample_errors_cpu);
  m.impl("pair_loss", &rpo_fast::cpu::pair_loss_cpu);
  m.impl("error_grad", &rpo_fast::cpu::error_grad_cpu);
  m.impl("similarity_weights", &rpo_fast::cpu::similarity_weights_cpu);
}
