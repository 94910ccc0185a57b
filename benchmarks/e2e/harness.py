"""Runs an end-to-end configuration in a fresh worker process and returns its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

from benchmarks.e2e.worker import RESULT_PREFIX
from benchmarks.machine import keep_freed_host_memory_env
from benchmarks.profiles import E2EConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_rows(profile) -> int:
    """Pairs in the synthetic dataset: the profile's size, and at least two batches of its
    largest configuration."""
    return max([profile.e2e_data_rows] + [2 * c.pairs for c in profile.e2e_configs])


def child_env(**overrides: str) -> Dict[str, str]:
    """This process's environment for a benchmark subprocess: the repository importable
    (``benchmarks``, and this checkout's ``rpo_fast`` ahead of an installed one), plus ``overrides``."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
                **overrides)


def run_worker(config: E2EConfig, model: Path, data: Path, workdir: Path, *, method: str = "rpo",
               mixed_precision: str = "no", timeout_s: float = 1800) -> Dict[str, object]:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "benchmarks.e2e.worker",
        "--loop", config.loop, "--model", str(model), "--data", str(data), "--workdir", str(workdir),
        "--pairs", str(config.pairs), "--resolution", str(config.resolution),
        "--warmup", str(config.warmup_steps), "--steps", str(config.timed_steps),
        "--method", method, "--mixed-precision", mixed_precision,
    ]
    # Every loop with glibc malloc's thresholds fixed, as the loss suite runs: otherwise how many
    # pages a step faults back in depends on the heap's history (docs/benchmarks.md, "Page faults").
    env = child_env(**keep_freed_host_memory_env())
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    results = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise RuntimeError(f"{config.id}: the worker failed (exit {proc.returncode}):\n{tail}")
    return json.loads(results[-1][len(RESULT_PREFIX):])
