"""`make gpu-check` without a GPU: the dry run that CI runs so that the GPU check cannot rot
(every stage that needs no GPU runs; the report is written; exit 0 says it was a dry run), and
so quickly that a busy machine cannot make it time out."""

import json
import time

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is what a machine without a GPU runs")
def test_dry_run_runs_every_stage_that_needs_no_gpu_and_writes_the_report(tmp_path, capsys):
    start = time.perf_counter()
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                           "--wheels", str(tmp_path / "no-wheels")]) == 0
    seconds = time.perf_counter() - start
    # the limit of the issue that made the dry run small: under a minute on 2 cores, one kept busy
    assert seconds < 60, f"the dry run took {seconds:.0f} s"
    report = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    assert report["dry_run"] and report["ok"] and report["machine"]["gpu"] is None
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == ["build", "tests", "check", "bench", "train", "timing", "timing-flow"]
    assert stages["build"]["status"].startswith("skipped")
    # the GPU tests are collected (they import and parametrize), the benchmark ran on CPU tensors
    assert stages["tests"]["status"] == "ok" and "test_cuda_kernels.py" in stages["tests"]["output_tail"]
    assert stages["check"]["status"] == "ok" and "fastest correct: cpu" in stages["check"]["output_tail"]
    assert stages["bench"]["status"] == "ok"
    assert (tmp_path / "out" / "gpu-check-loss.json").stat().st_size > 0
    assert stages["train"]["status"] == "ok" and "test_cuda_training_compiled_bf16" in stages["train"]["output_tail"]
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "no GPU: a dry run" in table and "| bench | ok |" in table
    timing = json.loads((tmp_path / "out" / "step-timing.json").read_text())
    # SD1.5's stage, then FLUX.1-dev's added to its files (both scaled down)
    assert stages["timing"]["status"] == "ok" and stages["timing-flow"]["status"] == "ok"
    assert list(timing) == ["sd15", "flux-dev"] and "no caches" in timing["flux-dev"]["per_pair_ms"]
    assert "### flux-dev" in (tmp_path / "out" / "step-timing.md").read_text()
    assert sum(gpu_check.LIMITS.values()) == 9 * 60 and set(gpu_check.LIMITS) == set(gpu_check.DRY_LIMITS)
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the GPU machine returns
    assert "dry run" in capsys.readouterr().out


def test_a_stage_that_overruns_its_limit_is_killed_and_reported(tmp_path):
    result = gpu_check._run("sleep", ["bash", "-c", "sleep 30 & sleep 30"], limit=1)
    assert result["status"] == "timed out after 1 s" and result["seconds"] < 10
