"""End-to-end: training-step throughput and peak memory, rpo-fast's trainer against the
Diffusion-DPO-style baseline, on the same tiny SD1.5-architecture model and data.

Each configuration runs in a fresh process (benchmarks/e2e/worker.py), which times its own
steps after warm-up and measures its peak memory; pytest-benchmark's time for these rows is
the wall time of that whole process (start, setup, warm-up and timed steps), and the
steady-state numbers are in ``extra_info``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest

from benchmarks.e2e.assets import preference_data, tiny_model
from benchmarks.e2e.harness import data_rows, run_worker
from benchmarks.machine import bench_device


@pytest.fixture(scope="session")
def e2e_workdir(request):
    given = request.config.getoption("--e2e-workdir")
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        yield Path(given)
    else:
        with tempfile.TemporaryDirectory(prefix="rpo-fast-bench-") as tmp:
            yield Path(tmp)


def test_train_step(benchmark, e2e_item, e2e_workdir, bench_profile):
    config = e2e_item
    device = bench_device()
    mixed_precision = "bf16" if device.type == "cuda" else "no"
    model = tiny_model(e2e_workdir)
    data = preference_data(e2e_workdir, config.resolution, data_rows(bench_profile))
    run_dir = e2e_workdir / "runs" / config.id

    benchmark.group = f"e2e-{config.sweep}"
    result = benchmark.pedantic(
        run_worker, args=(config, model, data, run_dir), kwargs={"mixed_precision": mixed_precision},
        rounds=1, iterations=1,
    )
    benchmark.extra_info.update({"kind": "e2e", **dataclasses.asdict(config), **result})
    assert result["pairs_per_s"] > 0
