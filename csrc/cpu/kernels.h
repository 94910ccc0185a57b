// Interface between the CPU op wrappers (ops_cpu.cpp) and the vectorized CPU kernels.
//
// The kernels are compiled three times, once per instruction set (kernels_default.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp, all including kernels_impl.h), and the best one the
// machine supports is picked at run time. This header is what the wrappers see: raw
// pointers and sizes only, no ATen types, so that nothing compiled for AVX-512 can leak
// into code that runs on a machine without it.
#pragma once

#include <cstdint>

namespace rpo_fast {
namespace cpu {

// Element types the kernels read; every input may have its own (mixed precision).
enum class ScalarKind : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// Per-sample squared errors. Every input holds n samples, sample k being the d contiguous
// elements at ptr + k * stride (each input has its own stride, in elements); the inputs
// share one element order inside a sample (the wrapper guarantees it), so the sums can
// run over raw memory.
struct ErrorsJob {
  const void* model;
  const void* target;
  const void* ref;  // null: no reference errors
  ScalarKind model_kind, target_kind, ref_kind;
  int64_t model_stride, target_stride, ref_stride;
  int64_t n, d;
  float* model_err;  // (n,)
  float* ref_err;    // (n,), unused without ref
};

// grad[k, :] = coef[k] * 2 / d * (model[k, :] - target[k, :]), written in model's kind.
struct GradJob {
  const float* coef;  // (n,)
  const void* model;
  const void* target;
  void* grad;
  ScalarKind model_kind, target_kind;
  int64_t model_stride, target_stride, grad_stride;
  int64_t n, d;
};

// The similarity weights of Diffusion-RPO: out[i, j] = softmax_j(cos(w[i], l[j]) / tau),
// from m rows of e contiguous floats each (row-major), into an (m, m) row-major output.
struct SimilarityJob {
  const float* w;
  const float* l;
  int64_t m, e;
  double tau;
  float* out;
};

struct KernelSet {
  const char* name;  // instruction set: "default", "avx2" or "avx512"
  void (*sample_errors)(const ErrorsJob&);
  void (*error_grad)(const GradJob&);
  void (*similarity_weights)(const SimilarityJob&);
};

// One per instruction set (defined in kernels_<isa>.cpp).
KernelSet kernels_default();
KernelSet kernels_avx2();
KernelSet kernels_avx512();

// The best set that both this CPU and ATen's capability setting (ATEN_CPU_CAPABILITY)
// allow; chosen once.
const KernelSet& selected_kernels();

}  // namespace cpu
}  // namespace rpo_fast
