"""What every benchmark shares: the machine it measured, a quiet allocator, the results files."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

from rpo_fast.machine import cpu_cores, cpu_id, cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"


def bench_device() -> torch.device:
    """The device a benchmark measures: the GPU when there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def machine_slug() -> str:
    """``<gpu name or cpu model>-<cores>c``, e.g. ``amd-epyc-zen4-2c`` or ``nvidia-h100-80gb-hbm3-16c``."""
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_model()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + f"-{cpu_cores()}c"


def machine_info() -> Dict[str, object]:
    import rpo_fast

    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = float("nan")
    info: Dict[str, object] = {
        "slug": machine_slug(), "cpu": cpu_model(), "cpu_id": cpu_id(), "cores": cpu_cores(),
        # the instruction set the cpu backend's kernels run with here ("" without the extension)
        "cpu_kernels": torch.ops.rpo_fast.cpu_isa() if "cpu" in rpo_fast.available_backends() else "",
        "torch_threads": torch.get_num_threads(), "memory_gib": memory_gib, "device": str(bench_device()),
        "torch": torch.__version__, "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return info


def machine_line(machine: Dict[str, object]) -> str:
    cpu = ", ".join(x for x in (machine["cpu"], machine.get("cpu_id"),
                                machine.get("cpu_kernels") and f"{machine['cpu_kernels']} kernels") if x)
    parts = [f"**{machine['slug']}**: {cpu}, {machine['cores']} cores ({machine['torch_threads']} torch threads), "
             f"{machine['memory_gib']} GiB"]
    if machine.get("gpu"):
        parts.append(f"GPU {machine['gpu']} ({machine.get('gpu_memory_gib')} GiB)")
    return "; ".join(parts + [f"torch {machine['torch']}, Python {machine['python']}"])


def stamp() -> Dict[str, object]:
    """When, at which commit and under which load a run measured."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    return {"created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "commit": commit,
            "load_average": round(os.getloadavg()[0], 2)}


def warn_if_busy(info: Dict[str, object]) -> None:
    """Every parallel op of a timed call waits for its slowest thread: other processes on the
    cores make calls up to tens of times slower."""
    load = os.getloadavg()[0]
    if load > 0.25 * int(info["cores"]):
        print(f"benchmarks: WARNING: load average {load:.2f} on {info['cores']} cores; other processes will "
              "distort the timings. Run on a quiet machine for numbers worth reporting.", file=sys.stderr)


def table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_json(path: Path, results: Dict[str, object]) -> None:
    """Written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def child_env(**overrides: str) -> Dict[str, str]:
    """This process's environment for a benchmark subprocess: this checkout's ``benchmarks`` and
    ``rpo_fast`` importable ahead of an installed one, plus ``overrides``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
                **overrides)


# glibc malloc's thresholds while measuring: blocks of up to 32 MiB (the most it accepts) come
# from the heap, and the heap is trimmed only past 1 GiB free.
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 << 20, 1 << 30


def keep_freed_host_memory_env() -> Dict[str, str]:
    """``keep_freed_host_memory`` for a child process: the variables glibc reads at its start."""
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def keep_freed_host_memory() -> bool:
    """Makes glibc's malloc keep freed blocks of up to 32 MiB in the heap and trim it only past
    1 GiB free, for the rest of the process; returns whether it applied (glibc on Linux).

    Otherwise a fresh allocation above the mmap threshold (SDXL's fp32 gradient at M = 16,
    8 MiB) faults every page in on its first write, and how many depends on the heap's history:
    the fp32 rows swung 2-4x between runs (docs/benchmarks.md). jemalloc and tcmalloc, which
    PyTorch's CPU tuning guide recommends for training, behave like this anyway.
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
