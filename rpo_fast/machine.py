"""What machine this is, in the words a results table needs (the benchmarks)."""

from __future__ import annotations

import os
import platform
from typing import Dict


def _cpuinfo() -> Dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, value in
            (line.split(":", 1) for line in first.splitlines() if ":" in line)}


def cpu_model() -> str:
    """The CPU model as the kernel reports it (``/proc/cpuinfo``), else ``platform``'s guess."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown-cpu"


def cpu_id() -> str:
    """``family F model M`` (``/proc/cpuinfo``): a virtual machine's model name ("AMD EPYC") does
    not tell one host generation from another; "" where it is not known."""
    fields = _cpuinfo()
    if "cpu family" not in fields or "model" not in fields:
        return ""
    return f"family {fields['cpu family']} model {fields['model']}"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask), which is what the timings used."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
