"""Peak memory of a training process, measured from inside it.

CPU: the peak resident set size (``VmHWM``) above the resident size once the libraries are
imported. Linux lets a process reset its own peak (``/proc/self/clear_refs``), so the
interpreter's start-up does not count; where that fails, ``ru_maxrss`` (the peak since the
process started) is used and the result says so. CUDA: ``torch.cuda.max_memory_allocated``
(tensors only, as PyTorch's allocator sees them), reset at the same point.
"""

from __future__ import annotations

import re
import resource
from typing import Dict, Optional

import torch


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device
        self.start_rss = (_status_kib("VmRSS") or 0) * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.rss_source = "VmHWM"
        except OSError:
            self.rss_source = "ru_maxrss"
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_cuda = torch.cuda.memory_allocated()

    def peak_rss(self) -> int:
        if self.rss_source == "VmHWM":
            return (_status_kib("VmHWM") or 0) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def report(self) -> Dict[str, object]:
        out: Dict[str, object] = {
            "peak_rss_bytes": self.peak_rss() - self.start_rss,
            "rss_source": self.rss_source,
        }
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() - self.start_cuda
        out["peak_bytes"] = out.get("peak_cuda_bytes", out["peak_rss_bytes"])
        return out
