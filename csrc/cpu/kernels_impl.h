// Body of the CPU kernels, compiled once per instruction set.
//
// Include only from kernels_<isa>.cpp, after kernels_prelude.h and after defining
// CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) and RPO_KERNELS_FN (the name of the function
// that returns this instruction set's KernelSet). at::vec puts its code in
// `inline namespace CPU_CAPABILITY`, and so does this file, so the three compilations
// define distinct symbols.
//
// Work split: a sample is cut into chunks of kChunk elements; (sample, chunk) pairs are the
// work items of at::parallel_for, so that few large samples and many small ones both keep
// every core busy. Inside a chunk the loop reads all inputs once, converts them to float
// and accumulates in float vectors over blocks of kBlock elements (few terms per lane, so
// float rounding stays at the level of the inputs' own precision); each block's sum is
// added in double. Chunk sums are combined in double in a fixed order, so the result does
// not depend on the number of threads.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY before including kernels_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace rpo_fast {
namespace cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using fVec = Vectorized<float>;

// Elements per inner step: two float vectors, i.e. one vector of a 16-bit type.
constexpr int64_t kStep = 2 * fVec::size();
// Elements summed in float vectors before the block sum goes into a double.
constexpr int64_t kBlock = 1024;
// Elements per parallel work item.
constexpr int64_t kChunk = 16384;
static_assert(kBlock % kStep == 0 && kChunk % kBlock == 0, "block sizes must nest");

struct NoRef {};  // the reference input is absent

// Two float vectors from kStep elements.
inline void load2(const float* p, fVec& a, fVec& b) {
  a = fVec::loadu(p);
  b = fVec::loadu(p + fVec::size());
}
inline void load2(const c10::BFloat16* p, fVec& a, fVec& b) { at::vec::load_to_float(p, a, b); }
inline void load2(const c10::Half* p, fVec& a, fVec& b) { at::vec::load_to_float(p, a, b); }

// kStep elements from two float vectors (round to nearest even, as tensor.to() does).
inline void store2(float* p, const fVec& a, const fVec& b) {
  a.store(p);
  b.store(p + fVec::size());
}
inline void store2(c10::BFloat16* p, const fVec& a, const fVec& b) {
  at::vec::convert_from_float<c10::BFloat16>(a, b).store(p);
}
inline void store2(c10::Half* p, const fVec& a, const fVec& b) {
  at::vec::convert_from_float<c10::Half>(a, b).store(p);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Non-temporal stores of the gradient: they skip reading each destination line before
// writing it and keep the gradient from evicting the inputs from the cache. Worth it when
// the pass touches more than the cache holds anyway (streams_output below).
#define RPO_HAS_STREAM 1
constexpr int64_t kStreamAlign = fVec::size() * 4;  // bytes of one vector register
template <typename T>
inline void stream2(T* p, const fVec& a, const fVec& b) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + fVec::size(), b);
#else
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + fVec::size(), b);
#endif
  } else {
    const Vectorized<T> v = at::vec::convert_from_float<T>(a, b);
#if defined(CPU_CAPABILITY_AVX512)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), __m512i(v));
#else
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(v));
#endif
  }
}
#endif

// Whether error_grad streams its output: when it reads and writes more than 16 MiB. Measured
// with one thread on a 2-core EPYC (32 MiB L3), SDXL latents, M = 16: fp32 (24 MiB touched)
// 2.4 -> 1.4..2.0 ms per loss fwd+bwd, bf16 (12 MiB) unchanged or slightly slower; on a
// 2-vCPU Xeon (whose sysfs reports the host's 480 MiB L3), 2 threads, fp32 error_grad 0.69 ->
// 0.57 ms into a gradient buffer not in cache, unchanged into one that is, bf16 unchanged
// (docs/kernels-cpp.md). A fixed size, not a fraction of the reported cache, for that reason.
constexpr int64_t kStreamBytes = int64_t(16) << 20;
inline bool streams_output(int64_t touched_bytes) { return touched_bytes > kStreamBytes; }

// kStep bfloat16 elements as two float vectors in an order of their own: the even-indexed
// elements, then the odd-indexed ones. A bfloat16 is the top half of a float, so that is a
// shift and a mask (2 instructions) instead of the widening of load_to_float (5); sums do
// not care about order, as long as every input of the sum is read the same way.
inline void load2_unordered(const c10::BFloat16* p, fVec& a, fVec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i v = _mm512_loadu_si512(p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  b = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
#else
  load2(p, a, b);
#endif
}

// The inverse of load2_unordered: kStep bfloat16 to memory from the even-indexed elements (a)
// and the odd-indexed ones (b), rounded to nearest even with NaN kept a NaN, as tensor.to()
// rounds; streamed or stored.
#if defined(CPU_CAPABILITY_AVX512)
#define RPO_HAS_UNORDERED_STORE 1
// x rounded to bfloat16, in the top half of each lane.
inline __m512i bf16_top_half(const fVec& x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), _mm512_set1_epi32(0x7FC00000), rounded);
}
inline void store2_unordered(c10::BFloat16* p, const fVec& a, const fVec& b, bool stream) {
  const __m512i v = _mm512_or_si512(_mm512_srli_epi32(bf16_top_half(a), 16),
                                    _mm512_and_si512(bf16_top_half(b), _mm512_set1_epi32(int(0xFFFF0000u))));
  if (stream) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  } else {
    _mm512_storeu_si512(p, v);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
#define RPO_HAS_UNORDERED_STORE 1
inline __m256i bf16_top_half(const fVec& x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 is_number = _mm256_cmp_ps(x, x, _CMP_ORD_Q);
  return _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), _mm256_castsi256_ps(rounded), is_number));
}
inline void store2_unordered(c10::BFloat16* p, const fVec& a, const fVec& b, bool stream) {
  const __m256i v = _mm256_or_si256(_mm256_srli_epi32(bf16_top_half(a), 16),
                                    _mm256_and_si256(bf16_top_half(b), _mm256_set1_epi32(int(0xFFFF0000u))));
  if (stream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
  }
}
#endif

inline double sum_lanes(const fVec& v) {
  alignas(64) float lanes[fVec::size()];
  v.store(lanes);
  double s = 0.0;
  for (int64_t i = 0; i < fVec::size(); ++i) s += double(lanes[i]);
  return s;
}

// Work items (chunks of samples of d elements) per parallel task: enough elements that
// waking the other threads pays off; small batches then run on the calling thread.
inline int64_t work_grain(int64_t d) {
  constexpr int64_t kMinTaskElements = 32768;
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, std::min(d, kChunk)));
}

// Sums of squared differences over elements [0, len) of one chunk:
// out[0] = sum (model - target)^2, out[1] = sum (ref - target)^2 (when TR is not NoRef).
template <typename TM, typename TT, typename TR>
void chunk_sums(const TM* pm, const TT* pt, const TR* pr, int64_t len, double* out) {
  constexpr bool kRef = !std::is_same_v<TR, NoRef>;
  // All inputs bfloat16: read in the cheaper order of load2_unordered (the same for all).
  constexpr bool kUnordered = std::is_same_v<TM, c10::BFloat16> && std::is_same_v<TT, c10::BFloat16> &&
                              (!kRef || std::is_same_v<TR, c10::BFloat16>);
  const auto load = [](const auto* p, fVec& a, fVec& b) {
    if constexpr (kUnordered) {
      load2_unordered(p, a, b);
    } else {
      load2(p, a, b);
    }
  };
  double sum_m = 0.0, sum_r = 0.0;
  int64_t i = 0;
  while (i + kStep <= len) {
    const int64_t block_end = std::min(len - len % kStep, i + kBlock);
    fVec am0(0.f), am1(0.f), ar0(0.f), ar1(0.f);
    for (; i < block_end; i += kStep) {
      fVec t0, t1, m0, m1;
      load(pt + i, t0, t1);
      load(pm + i, m0, m1);
      const fVec dm0 = m0 - t0, dm1 = m1 - t1;
      am0 = at::vec::fmadd(dm0, dm0, am0);
      am1 = at::vec::fmadd(dm1, dm1, am1);
      if constexpr (kRef) {
        fVec r0, r1;
        load(pr + i, r0, r1);
        const fVec dr0 = r0 - t0, dr1 = r1 - t1;
        ar0 = at::vec::fmadd(dr0, dr0, ar0);
        ar1 = at::vec::fmadd(dr1, dr1, ar1);
      }
    }
    sum_m += sum_lanes(am0 + am1);
    if constexpr (kRef) sum_r += sum_lanes(ar0 + ar1);
  }
  for (; i < len; ++i) {  // tail shorter than one step
    const double t = double(float(pt[i]));
    const double dm = double(float(pm[i])) - t;
    sum_m += dm * dm;
    if constexpr (kRef) {
      const double dr = double(float(pr[i])) - t;
      sum_r += dr * dr;
    }
  }
  out[0] = sum_m;
  out[1] = sum_r;
}

// Sample k's errors from its chunks' (model, ref) sums, added in chunk order.
template <bool kRef>
void finish_errors(const ErrorsJob& job, int64_t k, const double* sums, int64_t chunks) {
  double sum_m = 0.0, sum_r = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sum_m += sums[2 * c];
    sum_r += sums[2 * c + 1];
  }
  // d == 0 gives 0/0 = NaN: the mean of nothing, as torch's mean.
  job.model_err[k] = float(sum_m / double(job.d));
  if constexpr (kRef) job.ref_err[k] = float(sum_r / double(job.d));
}

inline int64_t chunks_of(int64_t d) { return std::max<int64_t>(1, (d + kChunk - 1) / kChunk); }

// chunk_sums over chunk c of sample k of job's inputs, into out[0..1].
template <typename TM, typename TT, typename TR>
void sample_chunk_sums(const ErrorsJob& job, int64_t k, int64_t c, double* out) {
  constexpr bool kRef = !std::is_same_v<TR, NoRef>;
  const int64_t lo = c * kChunk, len = std::min(job.d, lo + kChunk) - lo;
  chunk_sums<TM, TT, TR>(static_cast<const TM*>(job.model) + k * job.model_stride + lo,
                         static_cast<const TT*>(job.target) + k * job.target_stride + lo,
                         kRef ? static_cast<const TR*>(job.ref) + k * job.ref_stride + lo : nullptr, len, out);
}

template <typename TM, typename TT, typename TR>
void sample_errors_typed(const ErrorsJob& job) {
  constexpr bool kRef = !std::is_same_v<TR, NoRef>;
  const int64_t n = job.n, d = job.d;
  const int64_t chunks = chunks_of(d);
  std::vector<double> partial(static_cast<size_t>(2 * n * chunks), 0.0);
  at::parallel_for(0, n * chunks, work_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      sample_chunk_sums<TM, TT, TR>(job, item / chunks, item % chunks, &partial[2 * item]);
    }
  });
  for (int64_t k = 0; k < n; ++k) finish_errors<kRef>(job, k, &partial[2 * k * chunks], chunks);
}

// All-bfloat16 gradients are read and written in the cheaper order of load2_unordered.
template <typename TM, typename TT>
constexpr bool kUnorderedGrad =
#ifdef RPO_HAS_UNORDERED_STORE
    std::is_same_v<TM, c10::BFloat16> && std::is_same_v<TT, c10::BFloat16>;
#else
    false;
#endif

// Whether the gradient of job goes out with non-temporal stores.
template <typename TM, typename TT>
bool grad_streams(const GradJob& job) {
  return streams_output(job.n * job.d * int64_t(2 * sizeof(TM) + sizeof(TT)));
}

// Chunk c of sample k's gradient: coef[k] * 2 / d * (model - target), in model's type.
template <typename TM, typename TT>
void grad_chunk(const GradJob& job, int64_t k, int64_t c, [[maybe_unused]] bool stream) {
  constexpr bool kUnordered = kUnorderedGrad<TM, TT>;
  const int64_t d = job.d;
  const int64_t lo = c * kChunk, len = std::min(d, lo + kChunk) - lo;
  const TM* pm = static_cast<const TM*>(job.model) + k * job.model_stride + lo;
  const TT* pt = static_cast<const TT*>(job.target) + k * job.target_stride + lo;
  TM* pg = static_cast<TM*>(job.grad) + k * job.grad_stride + lo;
  const float scale = float(double(job.coef[k]) * 2.0 / double(d));
  const fVec vscale(scale);
  // kStep elements from i on; stream_now: non-temporal stores (i aligned for them).
  const auto step = [&](int64_t i, bool stream_now) {
    fVec t0, t1, m0, m1;
    if constexpr (kUnordered) {
#ifdef RPO_HAS_UNORDERED_STORE
      load2_unordered(pt + i, t0, t1);
      load2_unordered(pm + i, m0, m1);
      store2_unordered(pg + i, (m0 - t0) * vscale, (m1 - t1) * vscale, stream_now);
#endif
    } else {
      load2(pt + i, t0, t1);
      load2(pm + i, m0, m1);
#ifdef RPO_HAS_STREAM
      if (stream_now) {
        stream2(pg + i, (m0 - t0) * vscale, (m1 - t1) * vscale);
        return;
      }
#endif
      store2(pg + i, (m0 - t0) * vscale, (m1 - t1) * vscale);
    }
  };
  int64_t i = 0;
#ifdef RPO_HAS_STREAM
  if (stream) {
    for (; i < len && reinterpret_cast<uintptr_t>(pg + i) % kStreamAlign != 0; ++i)
      pg[i] = TM((float(pm[i]) - float(pt[i])) * scale);
    for (; i + kStep <= len; i += kStep) step(i, true);
  }
#endif
  for (; i + kStep <= len; i += kStep) step(i, false);
  for (; i < len; ++i) pg[i] = TM((float(pm[i]) - float(pt[i])) * scale);
}

// Orders a thread's streamed stores before the op returns.
inline void fence_streams([[maybe_unused]] bool stream) {
#ifdef RPO_HAS_STREAM
  if (stream) _mm_sfence();
#endif
}

template <typename TM, typename TT>
void error_grad_typed(const GradJob& job) {
  const int64_t n = job.n, d = job.d;
  if (n == 0 || d == 0) return;
  const int64_t chunks = chunks_of(d);
  const bool stream = grad_streams<TM, TT>(job);
  at::parallel_for(0, n * chunks, work_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) grad_chunk<TM, TT>(job, item / chunks, item % chunks, stream);
    fence_streams(stream);
  });
}

// sum_i a[i] * b[i] over e floats: float vectors (a few dozen terms per lane at CLIP widths),
// their lanes summed in double.
inline double dot(const float* a, const float* b, int64_t e) {
  fVec acc0(0.f), acc1(0.f);
  int64_t i = 0;
  for (; i + kStep <= e; i += kStep) {
    acc0 = at::vec::fmadd(fVec::loadu(a + i), fVec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(fVec::loadu(a + i + fVec::size()), fVec::loadu(b + i + fVec::size()), acc1);
  }
  double s = sum_lanes(acc0 + acc1);
  for (; i < e; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

// cos(w_i, l_j) = w_i . l_j / (max(|w_i|, eps) max(|l_j|, eps)), eps = 1e-12 as in
// F.normalize, without writing normalized copies; the row softmax in double. Non-finite
// embeddings give NaN rows (the pair stage then makes the loss NaN).
void similarity_weights(const SimilarityJob& job) {
  const int64_t m = job.m, e = job.e;
  if (m == 0) return;
  std::vector<double> inv_w(static_cast<size_t>(m)), inv_l(static_cast<size_t>(m));
  for (int64_t i = 0; i < m; ++i) {
    inv_w[i] = 1.0 / std::max(std::sqrt(dot(job.w + i * e, job.w + i * e, e)), 1e-12);
    inv_l[i] = 1.0 / std::max(std::sqrt(dot(job.l + i * e, job.l + i * e, e)), 1e-12);
  }
  // Rows in parallel only when there is enough work (a global batch of many pairs).
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, m * e));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> row(static_cast<size_t>(m));
    for (int64_t i = begin; i < end; ++i) {
      double top = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < m; ++j) {
        row[j] = dot(job.w + i * e, job.l + j * e, e) * inv_w[i] * inv_l[j] / job.tau;
        top = std::max(top, row[j]);
      }
      double total = 0.0;
      for (int64_t j = 0; j < m; ++j) {
        row[j] = std::exp(row[j] - top);  // NaN stays NaN, and makes total NaN
        total += row[j];
      }
      for (int64_t j = 0; j < m; ++j) job.out[i * m + j] = float(row[j] / total);
    }
  });
}

// Calls fn(T{}) with a null pointer of the C++ type of kind: turns runtime kinds into
// template arguments.
template <typename Fn>
void with_type(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat: fn(static_cast<float*>(nullptr)); break;
    case ScalarKind::kBFloat16: fn(static_cast<c10::BFloat16*>(nullptr)); break;
    case ScalarKind::kHalf: fn(static_cast<c10::Half*>(nullptr)); break;
  }
}

void sample_errors(const ErrorsJob& job) {
  with_type(job.model_kind, [&](auto* m) {
    with_type(job.target_kind, [&](auto* t) {
      using TM = std::remove_pointer_t<decltype(m)>;
      using TT = std::remove_pointer_t<decltype(t)>;
      if (job.ref == nullptr) {
        sample_errors_typed<TM, TT, NoRef>(job);
      } else {
        with_type(job.ref_kind, [&](auto* r) {
          sample_errors_typed<TM, TT, std::remove_pointer_t<decltype(r)>>(job);
        });
      }
    });
  });
}

void error_grad(const GradJob& job) {
  with_type(job.model_kind, [&](auto* m) {
    with_type(job.target_kind, [&](auto* t) {
      error_grad_typed<std::remove_pointer_t<decltype(m)>, std::remove_pointer_t<decltype(t)>>(job);
    });
  });
}

}  // namespace CPU_CAPABILITY

KernelSet RPO_KERNELS_FN() {
  return KernelSet{RPO_KERNELS_NAME, &CPU_CAPABILITY::sample_errors, &CPU_CAPABILITY::error_grad,
                   &CPU_CAPABILITY::similarity_weights};
}

}  // namespace cpu
}  // namespace rpo_fast
