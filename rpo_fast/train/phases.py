"""Where a run's time goes, marked by the trainer itself.

Each phase of a step (batch assembly, the reference's and the policy's forward, the loss,
gradient clipping, the optimizer) and the reference's set-up run inside ``run.phases(name)``:
a ``torch.profiler.record_function`` range (so a profiler's trace names them) and the phase's
wall seconds, summed until ``reset``. The step benchmark (benchmarks/step.py,
``measure_throughput``) reads these seconds, so a call moved inside loop.py takes its mark
along. The seconds are host time: on a GPU they count launches, not kernels.
"""

from __future__ import annotations

import collections
import contextlib
import time
from typing import Dict, Iterator

import torch


class PhaseClock:
    def __init__(self) -> None:
        self.seconds: Dict[str, float] = collections.defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with torch.profiler.record_function(f"rpo_fast/{name}"):
                yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()
