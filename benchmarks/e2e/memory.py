"""Peak memory of a training process, measured from inside it, per phase.

A phase's peak is counted above the process's memory once the libraries are imported, so the
interpreter and the imports do not count. CPU: the peak resident set size (``VmHWM``); Linux
lets a process reset its own peak (``/proc/self/clear_refs``), which starts each phase.
Where that fails, ``ru_maxrss`` (the peak since the process started, not resettable) is used
and ``rss_source`` says so. CUDA: ``torch.cuda.max_memory_allocated`` (tensors, as PyTorch's
allocator sees them), reset at the same points.
"""

from __future__ import annotations

import re
import resource
from typing import Dict, Optional

import torch


def status_kib(field: str, pid: str = "self") -> Optional[int]:
    """One ``kB`` field of /proc/<pid>/status (None where there is none, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    """``start()`` begins a phase, ``peak()`` is the phase's peak above the imports."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base_rss = (status_kib("VmRSS") or 0) * 1024
        self.base_cuda = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        self.rss_source = "VmHWM"

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
        except OSError:
            self.rss_source = "ru_maxrss"
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> Dict[str, int]:
        if self.rss_source == "VmHWM":
            rss = (status_kib("VmHWM") or 0) * 1024
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out = {"rss": rss - self.base_rss}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            out["cuda"] = torch.cuda.max_memory_allocated() - self.base_cuda
        out["peak"] = out.get("cuda", out["rss"])
        return out
