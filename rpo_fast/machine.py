"""What machine this is, in the words a results table needs (the benchmarks)."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU model as the kernel reports it (``/proc/cpuinfo``), else ``platform``'s guess."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask), which is what the timings used."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
