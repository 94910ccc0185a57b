"""Steady-state throughput of ``rpo-fast train``'s real set-up and step, for benchmarks and
the GPU check: ``measure_throughput(config)``."""

from __future__ import annotations

import dataclasses
import time
from typing import Dict

import torch

from rpo_fast.train import TrainConfig
from rpo_fast.train.loop import prepare, settle_nonfinite, step_batches, train_step


def measure_throughput(config: TrainConfig, num_steps: int = 10, warmup_steps: int = 2) -> Dict[str, float]:
    """Times ``num_steps`` optimizer steps after ``warmup_steps`` (compilation, caches) with the
    real set-up and step; writes nothing but caches. Returns pairs/s (global), seconds per
    step and, on CUDA, peak memory in GiB."""
    if num_steps < 1 or warmup_steps < 0:
        raise ValueError(f"num_steps >= 1 and warmup_steps >= 0 expected, got {num_steps}, {warmup_steps}")
    config = dataclasses.replace(config, max_steps=max(config.max_steps or 0, num_steps + warmup_steps), resume=None,
                                 progress=False, save_final=False)
    run = prepare(config)
    try:
        batches = step_batches(run, 0, num_steps + warmup_steps)
        for _ in range(warmup_steps):
            train_step(run, batches)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
        start = time.perf_counter()
        for _ in range(num_steps):
            train_step(run, batches, read=False)  # as rpo-fast train's steps between log steps
        settle_nonfinite(run)  # reads the steps' finiteness: waits for the device
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        seconds = time.perf_counter() - start
        result = {"pairs_per_s": num_steps * run.global_pairs_per_step / seconds, "seconds_per_step": seconds / num_steps}
        if run.device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        return result
    finally:
        run.close()
