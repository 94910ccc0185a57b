"""Which machine a run measured: a stable slug for the results files, and the facts behind it."""

from __future__ import annotations

import os
import platform
import re
from typing import Dict

import torch

from rpo_fast.machine import cpu_cores, cpu_model


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


def _memory_gib() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return float("nan")
