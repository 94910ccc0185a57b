// CUDA implementations of the rpo_fast ops.
//
// Launch structure (docs/kernels-cpp.md has the why):
//   sample_errors: errors_partial_kernel, grid (chunks, samples), one block per kChunk
//                  elements of a sample: 16-byte loads, float sums per thread (a few dozen
//                  terms), block reduction in double, one double per (sample, chunk)
//                  -> errors_finish_kernel: one thread per sample adds its chunks in order.
//                  No atomics: the result is the same on every run.
//   pair_loss:     pair_tiles_kernel, one block of kPairTile threads a tile of the 2M winner
//                  rows and loser columns (rpo_math.h does the arithmetic and the tiling),
//                  block sums to one partial a tile -> pair_finish_kernel: one block
//                  combines the partials in order, NaN coefficients for non-finite inputs.
//   error_grad:    error_grad_kernel, grid (chunks, samples): 16-byte loads and stores.
// Streams: the current stream; device: the inputs' (a guard makes it current).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "op_inputs.h"
#include "rpo_math.h"

namespace rpo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;                         // elements per thread and step: 16 bytes of a 16-bit type
constexpr int kStepsPerChunk = 4;               // steps per thread in a chunk
constexpr int64_t kChunk = int64_t(kThreads) * kVec * kStepsPerChunk;  // 8192 elements per block
constexpr int kPairThreads = 512;

struct NoRef {};

// Elements between consecutive samples of each tensor (the reference's or the output's in
// the last slot).
struct SampleStrides {
  int64_t model, target, ref, out;
};

// Eight elements from p (16-byte aligned when `vec`), as floats.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&out)[kVec], bool vec) {
  if constexpr (sizeof(T) == 2) {
    if (vec) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kVec; ++i) out[i] = static_cast<float>(h[i]);
      return;
    }
  } else {
    if (vec) {
      const float4 a = *reinterpret_cast<const float4*>(p);
      const float4 b = *reinterpret_cast<const float4*>(p + 4);
      out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
      out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) out[i] = static_cast<float>(p[i]);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[kVec], bool vec) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw;
      T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[i] = static_cast<T>(v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kVec; ++i) p[i] = static_cast<T>(v[i]);
}

// Sum of `value` over the block, valid in thread 0. `scratch` holds one double per warp.
__device__ __forceinline__ double block_sum(double value, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < int(blockDim.x + 31) / 32; ++w) total += scratch[w];
  }
  return total;
}

// Block (chunk c, sample k): sums of squared differences over the chunk, in double, to
// partial[2 * (k * chunks + c)] (model) and [... + 1] (reference).
template <typename TM, typename TT, typename TR>
__global__ void __launch_bounds__(kThreads) errors_partial_kernel(const TM* __restrict__ model, const TT* __restrict__ target,
                                                                  const TR* __restrict__ ref, SampleStrides strides,
                                                                  int64_t d, bool vec, double* __restrict__ partial) {
  constexpr bool kRef = !std::is_same_v<TR, NoRef>;
  __shared__ double scratch[kThreads / 32];
  const int64_t c = blockIdx.x, k = blockIdx.y, chunks = gridDim.x;
  const int64_t lo = c * kChunk, hi = min(d, lo + kChunk);
  model += k * strides.model;
  target += k * strides.target;
  if constexpr (kRef) ref += k * strides.ref;
  float sum_m = 0.f, sum_r = 0.f;
  for (int64_t i = lo + int64_t(threadIdx.x) * kVec; i < hi; i += int64_t(kThreads) * kVec) {
    float t[kVec], m[kVec], r[kVec];
    if (i + kVec <= hi) {
      load8(target + i, t, vec);
      load8(model + i, m, vec);
      if constexpr (kRef) load8(ref + i, r, vec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float dm = m[j] - t[j];
        sum_m = fmaf(dm, dm, sum_m);
        if constexpr (kRef) {
          const float dr = r[j] - t[j];
          sum_r = fmaf(dr, dr, sum_r);
        }
      }
    } else {  // the sample's last, partial step
      for (int64_t j = i; j < hi; ++j) {
        const float tj = static_cast<float>(target[j]);
        const float dm = static_cast<float>(model[j]) - tj;
        sum_m = fmaf(dm, dm, sum_m);
        if constexpr (kRef) {
          const float dr = static_cast<float>(ref[j]) - tj;
          sum_r = fmaf(dr, dr, sum_r);
        }
      }
    }
  }
  const double total_m = block_sum(double(sum_m), scratch);
  const double total_r = kRef ? block_sum(double(sum_r), scratch) : 0.0;
  if (threadIdx.x == 0) {
    partial[2 * (k * chunks + c)] = total_m;
    partial[2 * (k * chunks + c) + 1] = total_r;
  }
}

__global__ void errors_finish_kernel(const double* __restrict__ partial, int64_t n, int64_t chunks, int64_t d,
                                     bool has_ref, float* __restrict__ model_err, float* __restrict__ ref_err) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n) return;
  double sum_m = 0.0, sum_r = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    sum_m += partial[2 * (k * chunks + c)];
    sum_r += partial[2 * (k * chunks + c) + 1];
  }
  model_err[k] = float(sum_m / double(d));  // d == 0: NaN, the mean of nothing
  if (has_ref) ref_err[k] = float(sum_r / double(d));
}

// Tile t of the pair stage (rpo_math.h): one thread an index k, the block's sums to tiles[t].
__global__ void __launch_bounds__(math::kPairTile) pair_tiles_kernel(math::PairProblem p, float* __restrict__ coef,
                                                                     math::TilePartial* __restrict__ tiles) {
  __shared__ double scratch[math::kPairTile / 32];
  const int64_t k = int64_t(blockIdx.x) * math::kPairTile + threadIdx.x;
  double loss = 0.0;
  double sums[math::kNumMetrics] = {0.0, 0.0, 0.0, 0.0, 0.0};
  const bool ok = k < 2 * p.m ? math::index_terms(p, k, coef, loss, sums) : true;
  const bool finite = __syncthreads_and(ok) != 0;
  const double total_loss = block_sum(loss, scratch);
  double totals[math::kNumMetrics];
  for (int i = 0; i < math::kNumMetrics; ++i) totals[i] = block_sum(sums[i], scratch);
  if (threadIdx.x == 0) {
    math::TilePartial& out = tiles[blockIdx.x];
    out.loss = total_loss;
    for (int i = 0; i < math::kNumMetrics; ++i) out.metrics[i] = totals[i];
    out.finite = finite;
  }
}

// One block after pair_tiles_kernel on the same stream: the loss and metrics from the tiles
// in order, then NaN over every coefficient when an input was not finite.
__global__ void __launch_bounds__(kPairThreads) pair_finish_kernel(math::PairProblem p,
                                                                   const math::TilePartial* __restrict__ tiles,
                                                                   int64_t count, float* __restrict__ loss,
                                                                   float* __restrict__ metrics,
                                                                   float* __restrict__ coef) {
  __shared__ bool finite;
  if (threadIdx.x == 0) finite = math::finish_tiles(p, tiles, count, loss, metrics);
  __syncthreads();
  if (finite) return;
  for (int64_t k = threadIdx.x; k < 2 * p.m; k += blockDim.x) coef[k] = float(math::quiet_nan());
}

template <typename TM, typename TT>
__global__ void __launch_bounds__(kThreads) error_grad_kernel(const float* __restrict__ coef, const TM* __restrict__ model,
                                                              const TT* __restrict__ target, TM* __restrict__ grad,
                                                              SampleStrides strides, int64_t d, bool vec) {
  const int64_t c = blockIdx.x, k = blockIdx.y;
  const int64_t lo = c * kChunk, hi = min(d, lo + kChunk);
  model += k * strides.model;
  target += k * strides.target;
  grad += k * strides.out;
  const float scale = float(double(coef[k]) * 2.0 / double(d));
  for (int64_t i = lo + int64_t(threadIdx.x) * kVec; i < hi; i += int64_t(kThreads) * kVec) {
    if (i + kVec <= hi) {
      float t[kVec], m[kVec], g[kVec];
      load8(target + i, t, vec);
      load8(model + i, m, vec);
#pragma unroll
      for (int j = 0; j < kVec; ++j) g[j] = (m[j] - t[j]) * scale;
      store8(grad + i, g, vec);
    } else {
      for (int64_t j = i; j < hi; ++j) {
        grad[j] = static_cast<TM>((static_cast<float>(model[j]) - static_cast<float>(target[j])) * scale);
      }
    }
  }
}

// Whether every sample of every tensor starts 16-byte aligned, so that 8-element steps
// (chunks and d multiples of 8) can use 16-byte loads and stores.
bool vector_aligned(int64_t d, std::initializer_list<const at::Tensor*> tensors) {
  if (d % kVec != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (!t->defined()) continue;
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
    if (t->size(0) > 1 && (t->stride(0) * int64_t(t->element_size())) % 16 != 0) return false;
  }
  return true;
}

dim3 chunk_grid(int64_t n, int64_t d) {
  const int64_t chunks = std::max<int64_t>(1, (d + kChunk - 1) / kChunk);
  RPO_ASSERT(n <= 65535, "cuda kernels: at most 65535 samples per call, got ", n);
  RPO_ASSERT(chunks <= 2147483647, "cuda kernels: samples too large");
  return dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(n));
}

std::tuple<at::Tensor, at::Tensor> sample_errors_cuda(const at::Tensor& model_pred, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& ref_pred) {
  const SampleBatch b = prepare_sample_batch(model_pred, target, ref_pred);
  const c10::cuda::CUDAGuard guard(model_pred.device());
  const auto f32 = model_pred.options().dtype(at::kFloat);
  const bool has_ref = b.ref.defined();
  at::Tensor model_err = at::empty({b.n}, f32);
  at::Tensor ref_err = at::empty({has_ref ? b.n : 0}, f32);
  if (b.n == 0) return {model_err, ref_err};
  const dim3 grid = chunk_grid(b.n, b.d);
  at::Tensor partial = at::empty({int64_t(grid.x) * b.n * 2}, model_pred.options().dtype(at::kDouble));
  const bool vec = vector_aligned(b.d, {&b.model, &b.target, &b.ref});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (b.d > 0) {
    with_kernel_type(b.model.scalar_type(), [&](auto* m) {
      with_kernel_type(b.target.scalar_type(), [&](auto* t) {
        using TM = std::remove_pointer_t<decltype(m)>;
        using TT = std::remove_pointer_t<decltype(t)>;
        const auto* pm = static_cast<const TM*>(b.model.const_data_ptr());
        const auto* pt = static_cast<const TT*>(b.target.const_data_ptr());
        const SampleStrides strides{sample_stride(b.model), sample_stride(b.target),
                                    has_ref ? sample_stride(b.ref) : 0, 0};
        if (!has_ref) {
          errors_partial_kernel<TM, TT, NoRef><<<grid, kThreads, 0, stream>>>(
              pm, pt, nullptr, strides, b.d, vec, partial.mutable_data_ptr<double>());
        } else {
          with_kernel_type(b.ref.scalar_type(), [&](auto* r) {
            using TR = std::remove_pointer_t<decltype(r)>;
            errors_partial_kernel<TM, TT, TR><<<grid, kThreads, 0, stream>>>(
                pm, pt, static_cast<const TR*>(b.ref.const_data_ptr()), strides, b.d, vec,
                partial.mutable_data_ptr<double>());
          });
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    partial.zero_();
  }
  const int finish_threads = 128;
  errors_finish_kernel<<<static_cast<unsigned>((b.n + finish_threads - 1) / finish_threads), finish_threads, 0, stream>>>(
      partial.const_data_ptr<double>(), b.n, grid.x, b.d, has_ref, model_err.mutable_data_ptr<float>(),
      ref_err.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {model_err, ref_err};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_loss_cuda(const at::Tensor& model_err, const at::Tensor& ref_err,
                                                              const std::optional<at::Tensor>& weights, int64_t method,
                                                              int64_t loss_type, double beta, double weight_scale) {
  const PairArgs a = prepare_pair_args(model_err, ref_err, weights, method, loss_type, beta, weight_scale);
  const c10::cuda::CUDAGuard guard(model_err.device());
  const auto f32 = model_err.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor metrics = at::empty({math::kNumMetrics}, f32);
  at::Tensor coef = at::empty({2 * a.m}, f32);
  if (a.m == 0) {
    loss.fill_(std::numeric_limits<float>::quiet_NaN());
    metrics.fill_(std::numeric_limits<float>::quiet_NaN());
    return {loss, metrics, coef};
  }
  const math::PairProblem p{a.model_err.const_data_ptr<float>(),
                            a.ref_err.defined() ? a.ref_err.const_data_ptr<float>() : nullptr,
                            a.weights.defined() ? a.weights.const_data_ptr<float>() : nullptr,
                            a.m, method, loss_type, beta, weight_scale};
  const int64_t tiles = math::pair_tiles(a.m);
  at::Tensor partials = at::empty({tiles * int64_t(sizeof(math::TilePartial))}, model_err.options().dtype(at::kByte));
  auto* tile_ptr = reinterpret_cast<math::TilePartial*>(partials.mutable_data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  pair_tiles_kernel<<<tiles, math::kPairTile, 0, stream>>>(p, coef.mutable_data_ptr<float>(), tile_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  pair_finish_kernel<<<1, kPairThreads, 0, stream>>>(p, tile_ptr, tiles, loss.mutable_data_ptr<float>(),
                                                     metrics.mutable_data_ptr<float>(), coef.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, metrics, coef};
}

at::Tensor error_grad_cuda(const at::Tensor& coef, const at::Tensor& model_pred, const at::Tensor& target) {
  GradBatch b = prepare_grad_batch(coef, model_pred, target);
  const c10::cuda::CUDAGuard guard(model_pred.device());
  if (b.n == 0 || b.d == 0) return b.grad;
  const at::Tensor coef_c = coef.contiguous();
  const dim3 grid = chunk_grid(b.n, b.d);
  const bool vec = vector_aligned(b.d, {&b.model, &b.target, &b.out});
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel_type(b.model.scalar_type(), [&](auto* m) {
    with_kernel_type(b.target.scalar_type(), [&](auto* t) {
      using TM = std::remove_pointer_t<decltype(m)>;
      using TT = std::remove_pointer_t<decltype(t)>;
      const SampleStrides strides{sample_stride(b.model), sample_stride(b.target), 0, sample_stride(b.out)};
      error_grad_kernel<TM, TT><<<grid, kThreads, 0, stream>>>(
          coef_c.const_data_ptr<float>(), static_cast<const TM*>(b.model.const_data_ptr()),
          static_cast<const TT*>(b.target.const_data_ptr()), static_cast<TM*>(b.out.mutable_data_ptr()), strides, b.d,
          vec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!b.out.is_same(b.grad)) b.grad.copy_(b.out);
  return b.grad;
}

}  // namespace
}  // namespace cuda
}  // namespace rpo_fast

TORCH_LIBRARY_IMPL(rpo_fast, CUDA, m) {
  m.impl("sample_errors", &rpo_fast::cuda::sample_errors_cuda);
  m.impl("pair_loss", &rpo_fast::cuda::pair_loss_cuda);
  m.impl("error_grad", &rpo_fast::cuda::error_grad_cuda);
}
