"""Which machine a run measured: a stable slug for the results files, and the facts behind it."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
import sys
from typing import Dict

import torch

from rpo_fast.machine import cpu_cores, cpu_id, cpu_model


def bench_device() -> torch.device:
    """The device the suite measures: the GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_slug() -> str:
    """``<gpu name or cpu model>-<cores>c``, e.g. ``amd-epyc-2c`` or ``nvidia-h100-80gb-hbm3-16c``."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_model()
    return f"{_slug(name)}-{cpu_cores()}c"


def machine_info() -> Dict[str, object]:
    info: Dict[str, object] = {
        "slug": machine_slug(),
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_kernels": _cpu_kernels(),
        "cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "device": str(bench_device()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def _cpu_kernels() -> str:
    """The instruction set the ``cpu`` backend's kernels run with here ("" without the extension)."""
    import rpo_fast

    return torch.ops.rpo_fast.cpu_isa() if "cpu" in rpo_fast.available_backends() else ""


def _memory_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return float("nan")


# glibc malloc's thresholds while measuring: blocks of up to 32 MiB (the most it accepts) come
# from the heap, and the heap is trimmed only past 1 GiB free.
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def keep_freed_host_memory_env() -> Dict[str, str]:
    """``keep_freed_host_memory`` for a child process: the environment variables glibc reads at
    its start."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def keep_freed_host_memory() -> bool:
    """Makes glibc's malloc keep freed blocks of up to 32 MiB in the heap, and trim the heap only
    past 1 GiB free, for the rest of the process; returns whether it applied (glibc on Linux).

    Without it glibc maps an allocation above its mmap threshold afresh (or returns the top of
    the heap to the kernel between calls), and the next write faults every page in: the loss
    gradient of SDXL fp32 at M = 16 (8 MiB, a fresh tensor each call) took 110 faults a call on
    average for the cpu backend and 383 for the compiled eager loss, which made the fp32 rows
    swing by 2 to 4x between runs while bf16 (4 MiB, under the threshold) stayed put
    (docs/kernels-cpp.md, "Page faults"). The suite measures kernels, not that: every
    implementation runs with it. In a training process the same is jemalloc's or tcmalloc's
    behaviour, which PyTorch's CPU tuning guide recommends.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # a C library without mallopt (musl)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))
