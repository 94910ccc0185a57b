"""Loss forward+backward: every rpo-fast backend against the eager and the compiled eager loss.

One benchmark per case: its implementations (``loss_bench.impls_for``) are called in turn,
call by call, each call timed by itself, on inputs that no cache holds (``input_ring``).
pytest-benchmark times the rounds; ``extra_info["impls"]`` carries each implementation's call
times, its per-round ratios to the baselines (``paired``), and what benchmarks/collect.py
needs besides to turn them into rows: the bytes kept for backward, the agreement with the
eager loss, and the first call's time (which includes torch.compile's compilation for
``compiled``).
"""

from __future__ import annotations

import dataclasses

from benchmarks.loss_bench import (
    BASELINE_IMPLS, agreement, cached_inputs, call_stats, copy_step, dirty_cache_step, impls_for, input_ring,
    interleaved, loss_fn, loss_step, paired_ratio, rounds_for, saved_for_backward, warm_up,
)
from benchmarks.machine import bench_device


def test_loss(benchmark, loss_case, bench_profile):
    case, device = loss_case, bench_device()
    ring = input_ring(case, str(device))
    fns = {impl: loss_fn(case, impl, bench_profile.compile_backend) for impl in impls_for(device) if impl != "copy"}
    steps = {"copy": copy_step(case, device), **{impl: loss_step(fn, ring) for impl, fn in fns.items()}}
    warm = {impl: warm_up(step) for impl, step in steps.items()}
    one_round, times = interleaved(steps, dirty_cache_step(device))

    benchmark.group = case.id
    info = benchmark.extra_info
    info.update(kind="loss", **dataclasses.asdict(case), numel=case.numel, minimal_bytes=case.minimal_bytes)
    benchmark.pedantic(one_round, rounds=rounds_for([call for _, call in warm.values()], bench_profile.timing))

    info["impls"] = impls = {impl: {**call_stats(times[impl]), "first_call_s": warm[impl][0]} for impl in steps}
    impls["compiled"]["compile_backend"] = bench_profile.compile_backend
    for impl in fns:  # each implementation over each baseline, round by round
        impls[impl]["paired"] = {base: paired_ratio(times[base], times[impl]) for base in BASELINE_IMPLS}
    inputs = cached_inputs(case, str(device))
    for impl, fn in fns.items():
        errors = agreement(case, steps[impl]())
        impls[impl].update(errors)
        impls[impl]["saved_bytes"], impls[impl]["saved_extra_bytes"] = saved_for_backward(lambda: fn(inputs), inputs)
        assert errors["loss_rel_err"] <= errors["loss_rel_bound"], f"{impl}: loss off the float64 truth by more than rounding: {errors}"
        assert errors["grad_rel_err"] <= errors["grad_rel_bound"], f"{impl}: gradient off the float64 truth by more than rounding: {errors}"
