"""Quick timing of the cpu backend against the baselines of the kernel issue (a dev tool).

    python -m benchmarks.quick_cpu [--pairs 16] [--latents sdxl] [--dtype fp32 bf16] [--repeat 30]

Uses the definitions of the benchmark suite (benchmarks/loss_bench.py: inputs, the eager loss
as the Diffusion-DPO trainers write it, its torch.compile, the plain copy) and prints, per
dtype, the best-of-``repeat`` time of one forward+backward of each and the ratios the issue
sets targets for. Min over many single calls: the machine is shared, and the minimum is the
least disturbed measurement. The full suite is ``make bench``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.loss_bench import copy_step, loss_fn, loss_step, make_inputs
from benchmarks.profiles import LossCase


def best_time(step, repeat: int) -> float:
    """The fastest of ``repeat`` single calls: on a shared 2-core machine most calls wait
    for a core at some point, and only the fastest ones measure the code."""
    step()
    step()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--latents", default="sdxl")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--method", default="rpo")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--impls", nargs="+", default=["copy", "eager", "compiled", "cpu"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu isa {torch.ops.rpo_fast.cpu_isa()}")
    for dtype in args.dtype:
        case = LossCase(args.latents, args.pairs, dtype, args.method)
        inputs = make_inputs(case, torch.device("cpu"))
        times = {}
        for impl in args.impls:
            if impl == "copy":
                step = copy_step(case, torch.device("cpu"))
            else:
                step = loss_step(loss_fn(case, impl), inputs)
            times[impl] = best_time(step, args.repeat)
        line = "  ".join(f"{k} {v * 1e3:7.2f} ms" for k, v in times.items())
        print(f"{case.id}: {line}")
        if "cpu" in times:
            ratios = []
            for base in ("eager", "compiled"):
                if base in times:
                    ratios.append(f"{base}/cpu {times[base] / times['cpu']:.2f}x")
            if "copy" in times:
                ratios.append(f"cpu/copy {times['cpu'] / times['copy']:.2f}x")
            print("   " + "  ".join(ratios))


if __name__ == "__main__":
    main()
