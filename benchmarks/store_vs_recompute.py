"""Store the gradient direction in the forward, or recompute it in the backward? (a dev tool)

    python -m benchmarks.store_vs_recompute [--latents sdxl] [--pairs 4 16 64] [--repeat 300]

The kernel issue lets the fused forward either store the gradient and scale it in the
backward, or recompute it. The `cpu` backend's fused_loss can do both, and this script times
them side by side with the extension's own ops, float32:

* store: ``fused_loss(..., store_direction=True)`` reads model_pred, target and ref_pred and
  writes ``model_pred - target`` (3N + N); the backward's arithmetic then scales that buffer
  in place into the gradient (N + N), as csrc/autograd.cpp does;
* recompute: ``fused_loss`` reads the three inputs (3N), then ``error_grad`` reads model_pred
  and target and writes a fresh gradient (2N + N).

Both move 6N elements and allocate one buffer of size N per call. Both run without autograd
(no_grad, the backward's arithmetic spelled out), so that only the kernels differ; the third
variant is the store path as a user gets it, through the autograd engine. Calls alternate
between the variants so that a slow moment of a shared machine hits all of them; the script
prints the best and median time of each. docs/kernels-cpp.md has the results.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import rpo_fast  # noqa: F401  (registers torch.ops.rpo_fast)
from benchmarks.loss_bench import make_inputs
from benchmarks.profiles import LossCase
from rpo_fast._types import loss_type_code, method_code


def variants(latents: str, pairs: int):
    inputs = make_inputs(LossCase(latents, pairs, "fp32", "rpo"), torch.device("cpu"))
    pred, target, ref = inputs.model_pred, inputs.target, inputs.ref_pred
    ops = torch.ops.rpo_fast
    codes = (None, None, None, None, method_code("rpo"), loss_type_code("sigmoid"), 2500.0, 0.5)
    per_sample = (-1,) + (1,) * (pred.dim() - 1)
    sample_size = pred[0].numel()

    def store():
        with torch.no_grad():
            _, _, coef, direction = ops.fused_loss(pred, target, ref, *codes, True)
            return direction.mul_(coef.double().mul_(2.0 / sample_size).float().view(per_sample))

    def recompute():
        with torch.no_grad():
            _, _, coef, _ = ops.fused_loss(pred, target, ref, *codes)
            return ops.error_grad(coef, pred, target)

    def store_autograd():
        loss = ops.fused_loss(pred, target, ref, *codes)[0]
        return torch.autograd.grad(loss, [pred])[0]

    return {"store": store, "recompute": recompute, "store via autograd": store_autograd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", default="sdxl")
    parser.add_argument("--pairs", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu isa {torch.ops.rpo_fast.cpu_isa()}")
    for pairs in args.pairs:
        fns = variants(args.latents, pairs)
        grads = [fn() for fn in fns.values()]
        assert all(torch.equal(grads[0], g) for g in grads[1:]), "the variants must give the same gradient"
        times = {name: [] for name in fns}
        order = list(fns.items())
        for i in range(args.repeat + 10):
            for name, fn in order if i % 2 else order[::-1]:
                start = time.perf_counter()
                fn()
                if i >= 10:
                    times[name].append(time.perf_counter() - start)
        line = "  ".join(
            f"{name} {min(ts) * 1e3:.3f} / {statistics.median(ts) * 1e3:.3f}" for name, ts in times.items()
        )
        print(f"{args.latents} M={pairs} fp32, best / median ms: {line}")


if __name__ == "__main__":
    main()
