"""Loss forward+backward: every rpo-fast backend against the eager and the compiled eager loss.

One benchmark per (case, implementation). ``extra_info`` carries what benchmarks/collect.py
needs to turn the timings into rows: the case, the implementation, the bytes kept for
backward, the agreement with the eager loss, and the first call's time (which includes
torch.compile's compilation for ``compiled``).
"""

from __future__ import annotations

import dataclasses

from benchmarks.loss_bench import (
    TOLERANCE, agreement, cached_inputs, copy_step, loss_fn, loss_step, plan_rounds, saved_for_backward,
)
from benchmarks.machine import bench_device


def test_loss(benchmark, loss_item, bench_profile):
    case, impl = loss_item
    device = bench_device()
    inputs = cached_inputs(case, str(device))
    fn = None if impl == "copy" else loss_fn(case, impl, bench_profile.compile_backend)
    step = copy_step(case, device) if fn is None else loss_step(fn, inputs)
    plan = plan_rounds(step, bench_profile.timing)

    benchmark.group = case.id
    info = benchmark.extra_info
    info.update(kind="loss", impl=impl, **dataclasses.asdict(case))
    info.update(numel=case.numel, minimal_bytes=case.minimal_bytes, first_call_s=plan.first_call_s)
    info.update(compile_backend=bench_profile.compile_backend if impl == "compiled" else None)
    benchmark.pedantic(step, rounds=plan.rounds, iterations=plan.iterations, warmup_rounds=1)
    if fn is None:
        return

    errors = agreement(case, step())
    info.update(errors)
    info["saved_bytes"], info["saved_extra_bytes"] = saved_for_backward(lambda: fn(inputs), inputs)
    loss_tol, grad_tol = TOLERANCE[case.dtype]
    assert errors["loss_rel_err"] <= loss_tol, f"{impl} disagrees with the eager loss: {errors}"
    assert errors["grad_rel_err"] <= grad_tol, f"{impl} disagrees with the eager gradient: {errors}"
