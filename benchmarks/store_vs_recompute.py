"""Store the gradient in the forward, or recompute it in the backward? (a dev experiment)

    python -m benchmarks.store_vs_recompute [--pairs 16] [--threads 1 2] [--repeat 200]

The kernel issue lets the fused forward either store the gradient direction and scale it in
the backward, or recompute it. The `cpu` backend recomputes: forward `sample_errors` reads
model_pred, target and ref_pred (3N); backward `error_grad` reads model_pred and target and
writes a fresh gradient (2N + N). Storing instead writes `2/D (pred - target)` in the forward
pass (3N + N) and scales it in the backward (N + N): in place, so that the stored direction
becomes the gradient ("store"), or into a fresh tensor ("store, new grad"). All move 6N
elements. Measured here side by side at SDXL latents, fp32: the recompute pair is the
extension's own ops, the store kernels are written the same way (at::vec, at::parallel_for,
16384-element work items) and compiled here with ``-O3 -march=native`` (a minute's build,
cached by torch). docs/kernels-cpp.md has the results, and those of the store path built
into the real kernels afterwards (commit 8d63831), which was no faster: the backends
recompute.

Calls alternate between the variants so that a slow moment of a shared machine hits all of
them; the script prints the best and median time of each, per thread count.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

import rpo_fast  # noqa: F401  (registers torch.ops.rpo_fast)
from benchmarks.loss_bench import make_inputs
from benchmarks.profiles import LossCase

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>

using fVec = at::vec::Vectorized<float>;
constexpr int64_t kChunk = 16384;

// One pass: per-sample squared errors of model and ref against target, and
// direction = 2/D (model - target) written for the backward.
std::vector<at::Tensor> errors_and_direction(at::Tensor m, at::Tensor t, at::Tensor r) {
  const int64_t n = m.size(0), d = m.numel() / n, chunks = (d + kChunk - 1) / kChunk;
  auto direction = at::empty_like(m);
  std::vector<double> partial(2 * n * chunks);
  const float *pm = m.data_ptr<float>(), *pt = t.data_ptr<float>(), *pr = r.data_ptr<float>();
  float* pg = direction.data_ptr<float>();
  const fVec scale(2.0f / float(d));
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / chunks, lo = (item % chunks) * kChunk, len = std::min(d - lo, kChunk);
      const int64_t base = k * d + lo;
      fVec am(0.f), ar(0.f);
      int64_t i = 0;
      for (; i + fVec::size() <= len; i += fVec::size()) {
        const fVec tv = fVec::loadu(pt + base + i);
        const fVec dm = fVec::loadu(pm + base + i) - tv, dr = fVec::loadu(pr + base + i) - tv;
        am = at::vec::fmadd(dm, dm, am);
        ar = at::vec::fmadd(dr, dr, ar);
        (dm * scale).store(pg + base + i);
      }
      double sm = at::vec::vec_reduce_all<float>(std::plus<fVec>(), am);
      double sr = at::vec::vec_reduce_all<float>(std::plus<fVec>(), ar);
      for (; i < len; ++i) {
        const float dm = pm[base + i] - pt[base + i], dr = pr[base + i] - pt[base + i];
        sm += dm * dm; sr += dr * dr; pg[base + i] = dm * 2.0f / float(d);
      }
      partial[2 * item] = sm;
      partial[2 * item + 1] = sr;
    }
  });
  auto errors = at::empty({2, n}, m.options());
  float* pe = errors.data_ptr<float>();
  for (int64_t k = 0; k < n; ++k) {
    double sm = 0.0, sr = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      sm += partial[2 * (k * chunks + c)];
      sr += partial[2 * (k * chunks + c) + 1];
    }
    pe[k] = float(sm / double(d));
    pe[n + k] = float(sr / double(d));
  }
  return {errors, direction};
}

// The backward of the store variant: direction[k] *= coef[k], in place.
at::Tensor scale_in_place(at::Tensor direction, at::Tensor coef) {
  const int64_t n = direction.size(0), d = direction.numel() / n, chunks = (d + kChunk - 1) / kChunk;
  float* pg = direction.data_ptr<float>();
  const float* pc = coef.data_ptr<float>();
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / chunks, lo = (item % chunks) * kChunk, len = std::min(d - lo, kChunk);
      float* p = pg + k * d + lo;
      const fVec c(pc[k]);
      int64_t i = 0;
      for (; i + fVec::size() <= len; i += fVec::size()) (fVec::loadu(p + i) * c).store(p + i);
      for (; i < len; ++i) p[i] *= pc[k];
    }
  });
  return direction;
}

// The same scaling into a fresh tensor (the direction stays as it was).
at::Tensor scale_into_new(at::Tensor direction, at::Tensor coef) {
  auto out = at::empty_like(direction);
  const int64_t n = direction.size(0), d = direction.numel() / n, chunks = (d + kChunk - 1) / kChunk;
  const float* pg = direction.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float* pc = coef.data_ptr<float>();
  at::parallel_for(0, n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / chunks, lo = (item % chunks) * kChunk, len = std::min(d - lo, kChunk);
      const fVec c(pc[k]);
      int64_t i = 0;
      for (; i + fVec::size() <= len; i += fVec::size()) (fVec::loadu(pg + k * d + lo + i) * c).store(po + k * d + lo + i);
      for (; i < len; ++i) po[k * d + lo + i] = pg[k * d + lo + i] * pc[k];
    }
  });
  return out;
}
"""


def build():
    return load_inline(
        name="rpo_fast_store_vs_recompute",
        cpp_sources=_SOURCE,
        functions=["errors_and_direction", "scale_in_place", "scale_into_new"],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    store = build()
    ops = torch.ops.rpo_fast
    inputs = make_inputs(LossCase("sdxl", args.pairs, "fp32", "dpo"), torch.device("cpu"))
    pred, target, ref = inputs.model_pred.detach(), inputs.target, inputs.ref_pred
    coef = torch.randn(pred.shape[0], generator=torch.Generator().manual_seed(0))

    def recompute():
        ops.sample_errors(pred, target, ref)
        return ops.error_grad(coef, pred, target)

    def stored():
        _, direction = store.errors_and_direction(pred, target, ref)
        return store.scale_in_place(direction, coef)

    def stored_new():
        _, direction = store.errors_and_direction(pred, target, ref)
        return store.scale_into_new(direction, coef)

    # Same gradient both ways (float32 roundings apart).
    torch.testing.assert_close(recompute(), stored(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(recompute(), stored_new(), rtol=1e-5, atol=1e-12)
    for threads in args.threads:
        torch.set_num_threads(threads)
        variants = (("recompute", recompute), ("store", stored), ("store, new grad", stored_new))
        times = {name: [] for name, _ in variants}
        for _ in range(5):
            for _, fn in variants:
                fn()
        for _ in range(args.repeat):
            for name, fn in variants:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        line = "  ".join(
            f"{name} best {min(ts) * 1e3:.3f} ms median {statistics.median(ts) * 1e3:.3f} ms" for name, ts in times.items()
        )
        print(f"threads {threads}, SDXL M={args.pairs} fp32: {line}")


if __name__ == "__main__":
    main()
