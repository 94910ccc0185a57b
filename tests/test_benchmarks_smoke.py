"""The benchmark suite, run small (``python -m benchmarks.run --smoke``), so that it cannot rot.

One subprocess runs the whole suite the way ``make bench`` does, on toy shapes with one
round: every loss implementation and every end-to-end loop must produce rows with finite,
positive numbers, and the json, the markdown table and the plots must be written. The
other tests check the arithmetic that turns timings into the table's columns.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.collect import e2e_rows, loss_rows, targets
from benchmarks.eager_loss import eager_dpo_loss, eager_rpo_loss
from benchmarks.loss_bench import (
    BETA, TAU, agreement, cached_inputs, impls_for, interleaved, loss_fn, make_inputs, paired_ratio, saved_for_backward,
)
from benchmarks.machine import machine_info
from benchmarks.profiles import E2E_LOOPS, LossCase, get_profile
from benchmarks.report import main as report_main
from parity_utils import torch_threads

REPO_ROOT = Path(__file__).resolve().parents[1]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as `make bench`: no interpreted Triton on the CPU
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(out), "--name", "smoke",
         "--e2e-workdir", str(out / "work")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, json.loads((out / "smoke.json").read_text())


def test_every_loss_implementation_is_timed(smoke_run):
    _, results = smoke_run
    profile = get_profile("smoke", torch.device("cpu"))
    timed = {(m["latents"], m["pairs"], m["dtype"], m["method"], m["impl"]): m for m in results["loss"]}
    for case in profile.loss_cases:
        for impl in impls_for(torch.device("cpu")):
            m = timed.get((case.latents, case.pairs, case.dtype, case.method, impl))
            assert m is not None, f"no measurement for {case.id} {impl}"
            assert _finite_positive(m["min_s"]) and m["min_s"] <= m["median_s"] and m["rounds"] >= 1
    rows = results["loss_rows"]
    assert {r["backend"] for r in rows} == set(impls_for(torch.device("cpu"))) - {"copy", "eager", "compiled"}
    for r in rows:
        for key in ("time_s", "speedup_eager", "speedup_compiled", "roofline"):
            assert _finite_positive(r[key]), (key, r)
        assert r["loss_rel_err"] <= 1e-2


def test_every_training_loop_is_timed(smoke_run):
    _, results = smoke_run
    assert {m["loop"] for m in results["e2e"]} == set(E2E_LOOPS)
    for m in results["e2e"]:
        assert _finite_positive(m["pairs_per_s"]) and _finite_positive(m["train_peak_bytes"]), m
        assert _finite_positive(m["setup_peak_bytes"]), m
        assert all(math.isfinite(x) for x in m["losses"])
    (row,) = results["e2e_rows"]
    assert _finite_positive(row["rpo_fast_throughput_ratio"]) and _finite_positive(row["rpo_fast_memory_ratio"])


def test_table_and_plots_are_written(smoke_run, tmp_path):
    out, results = smoke_run
    md = (out / "smoke.md").read_text()
    assert results["machine"]["slug"] in md
    assert "## Loss: forward + backward" in md and "## End to end: training steps" in md
    assert md.count("| tiny |") == len(results["loss_rows"])
    for name in ("smoke-loss-time.png", "smoke-loss-speedup.png", "smoke-e2e.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    # benchmarks/report.py redraws the same table from the json alone.
    assert report_main([str(out / "smoke.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "smoke.md").read_text() == md


def _loss_measurement(impl, min_s, paired=None, **case):
    base = dict(kind="loss", latents="sdxl", pairs=16, dtype="fp32", method="rpo", minimal_bytes=4000)
    extra = {"paired": paired} if paired is not None else {}
    return {**base, **case, "impl": impl, "min_s": min_s, "median_s": 3 * min_s, **extra}


def test_columns_are_ratios_of_the_same_case():
    # the speedups are the per-round ratios, not the quotients of the fastest calls (10, 2, 0.5)
    paired = {"eager": 9.0, "compiled": 1.8, "copy": 0.45}
    loss = [_loss_measurement("copy", 1.0), _loss_measurement("eager", 20.0), _loss_measurement("compiled", 4.0),
            _loss_measurement("cpu", 2.0, paired), _loss_measurement("eager", 7.0, dtype="bf16")]
    (row,) = loss_rows(loss)
    assert row["backend"] == "cpu" and row["dtype"] == "fp32"
    assert row["time_s"] == 2.0 and row["eager_s"] == 20.0 and row["compiled_s"] == 4.0
    assert row["speedup_eager"] == 9.0 and row["speedup_compiled"] == 1.8 and row["roofline"] == 0.45
    assert row["copy_gbps"] == pytest.approx(4000 / 1e9)
    met = {t["target"]: t["met"] for t in targets([row], [])}
    assert met["cpu backend, SDXL, M=16, fp32, rpo: speedup_eager >= 4.00"] is True
    assert met["cpu backend, SDXL, M=16, fp32, rpo: roofline >= 0.67"] is False  # 2.2x the copy time
    assert met["cpu backend, SDXL, M=16, bf16, rpo: speedup_eager >= 4.00"] is None  # not measured
    # results measured before per-round ratios still render: there the fastest calls' quotients
    (old,) = loss_rows([m for m in loss if m["impl"] != "cpu"] + [_loss_measurement("cpu", 2.0)])
    assert old["speedup_eager"] == 10.0 and old["speedup_compiled"] == 2.0 and old["roofline"] == 0.5


def test_machine_names_the_cpu_generation_and_its_kernels():
    # "AMD EPYC" alone named a Zen 3 host (AVX2) and a Zen 4 one (AVX-512) alike
    info = machine_info()
    assert re.fullmatch(r"family \d+ model \d+", info["cpu_id"]), info["cpu_id"]
    assert info["cpu_kernels"] == torch.ops.rpo_fast.cpu_isa()


def test_rounds_pair_calls_after_the_same_untimed_write():
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    one_round, times = interleaved(steps, lambda: calls.append("write"))
    for _ in range(3):
        one_round()
    # every call comes right after the write; each round starts one implementation further
    assert calls[0::2] == ["write"] * 9
    assert calls[1::2] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t) == 3 for t in times.values())
    # a ratio per round: one interrupted call (100x) moves one round's ratio, not the median
    assert paired_ratio([2.0, 4.0, 300.0], [1.0, 2.0, 3.0]) == 2.0
    assert paired_ratio([2.0, 4.0, 3.0], [1.0, 2.0, 300.0]) == 2.0


def test_end_to_end_ratios_pair_the_same_configuration():
    def m(loop, pairs, pairs_per_s, peak):
        return dict(loop=loop, sweep="batch", pairs=pairs, resolution=64, pairs_per_s=pairs_per_s,
                    step_times_s=[1.0], train_peak_bytes=peak, setup_peak_bytes=2 * peak, setup_s=1.0)

    rows = e2e_rows([m("baseline", 2, 1.0, 100), m("rpo_fast", 2, 3.0, 50), m("baseline", 4, 2.0, 200)])
    assert [r["pairs"] for r in rows] == [2, 4]
    assert rows[0]["rpo_fast_throughput_ratio"] == 3.0 and rows[0]["rpo_fast_memory_ratio"] == 0.5
    assert rows[1]["rpo_fast_throughput_ratio"] is None


@pytest.mark.parametrize("method", ["dpo", "rpo"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_agreement_bounds_pass_rounding_and_catch_a_wrong_beta(method, dtype):
    """The benchmark's check against the float64 truth: the eager loss and the cpu backend lie
    within the rounding bounds; the same loss with beta 10% off (the loss moves by about as
    much) does not."""
    case = LossCase("tiny", 2, dtype, method)
    x = cached_inputs(case, "cpu")

    def within(beta_factor=None, impl="eager"):
        if beta_factor is None:
            loss = loss_fn(case, impl)(x)
        elif method == "dpo":
            loss = eager_dpo_loss(x.model_pred, x.target, x.ref_pred, 2 * BETA * beta_factor)[0]
        else:
            loss = eager_rpo_loss(x.model_pred, x.target, x.ref_pred, x.emb_w, x.emb_l, 2 * BETA * beta_factor, TAU)[0]
        (grad,) = torch.autograd.grad(loss, [x.model_pred])
        a = agreement(case, (loss.detach(), grad))
        return a["loss_rel_err"] <= a["loss_rel_bound"] and a["grad_rel_err"] <= a["grad_rel_bound"]

    assert within(impl="eager") and within(impl="cpu")
    assert not within(1.1) and not within(1 / 1.1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_saved_bytes_count_each_storage_once(dtype):
    case = LossCase("tiny", 2, dtype, "dpo")
    inputs = make_inputs(case, torch.device("cpu"))
    fn = loss_fn(case, "eager")
    total, extra = saved_for_backward(lambda: fn(inputs), inputs)
    fp32_copy = case.numel * 4
    if dtype == "fp32":  # mse_loss keeps model_pred and target themselves: nothing beyond the inputs
        assert extra < 1024 and total >= 2 * fp32_copy
    else:  # .float() makes fp32 copies of model_pred and target, and autograd keeps both
        assert 2 * fp32_copy <= extra < 2 * fp32_copy + 1024


@pytest.mark.parametrize("method", ["dpo", "rpo"])
def test_saved_bytes_of_the_cpu_backend(method):
    """The cpu backend keeps nothing of size D beyond its inputs between forward and backward
    (its backward recomputes the gradient from them): the column must show no extra bytes."""
    case = LossCase("tiny", 4, "fp32", method)
    inputs = make_inputs(case, torch.device("cpu"))
    fn = loss_fn(case, "cpu")
    with torch_threads(1):
        _, extra = saved_for_backward(lambda: fn(inputs), inputs)
    assert extra < 1024


def test_official_side_by_side_counts_private_memory_apart_from_libraries(tmp_path):
    """The side-by-side harness's two peaks: a child that fills 160 MiB of its own heap shows it
    in its private peak (anonymous pages), while its resident peak also counts the libraries."""
    from benchmarks.e2e.official import run

    fill = "import time; b = bytearray(160 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.2)"
    measured = run([sys.executable, "-c", fill], tmp_path, tmp_path / "child.log")
    assert 160 <= measured["private_peak_mib"] < 200
    assert measured["minor_faults"] >= (160 << 20) // 4096  # each page written once, faulted once
    assert measured["peak_mib"] >= measured["private_peak_mib"]
    idle = run([sys.executable, "-c", "import time; time.sleep(0.2)"], tmp_path, tmp_path / "idle.log")
    assert idle["private_peak_mib"] < 40


# A heap grown by four 7 MiB blocks and freed again, 20 times, after one 8 MiB block has raised
# glibc's dynamic mmap threshold to 8 MiB (so its trim threshold to 16 MiB).
HEAP_CYCLES = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(8 << 20))
for _ in range(20):
    blocks = [libc.malloc(7 << 20) for _ in range(4)]
    for b in blocks:
        ctypes.memset(b, 1, 7 << 20)
    for b in reversed(blocks):
        libc.free(b)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and its environment variables")
def test_official_side_by_side_steady_malloc_stops_the_heap_faulting_back_in(tmp_path):
    """With glibc's defaults the 28 MiB freed on top of the heap exceed its trim threshold and go
    back to the kernel, so cycle after cycle faults its 7168 pages in again (about 15 of the 20
    here); with ``--steady-malloc`` they stay mapped and only the first cycle faults."""
    from benchmarks.e2e.official import run

    pages = 4 * (7 << 20) // 4096
    default = run([sys.executable, "-c", HEAP_CYCLES], tmp_path, tmp_path / "default.log")
    steady = run([sys.executable, "-c", HEAP_CYCLES], tmp_path, tmp_path / "steady.log", steady_malloc=True)
    assert default["minor_faults"] > 10 * pages
    assert steady["minor_faults"] < 3 * pages
    assert steady["sys_s"] <= default["sys_s"] and steady["cpu_s"] > 0


def test_e2e_workers_run_with_the_loss_suites_malloc_thresholds(tmp_path, monkeypatch):
    """Every e2e loop's process gets the thresholds the loss suite sets in-process, as glibc
    reads them (environment variables), so no loop is timed with page faults its heap's history
    decides."""
    from benchmarks import machine
    from benchmarks.e2e import harness
    from benchmarks.profiles import E2EConfig

    seen = {}

    def fake_run(cmd, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 0, stdout='RESULT {"loop": "baseline"}\n', stderr="")

    monkeypatch.setattr(harness.subprocess, "run", fake_run)
    config = E2EConfig("baseline", 2, 16, "batch", 1, 1)
    assert harness.run_worker(config, tmp_path, tmp_path, tmp_path / "run") == {"loop": "baseline"}
    assert seen["MALLOC_MMAP_THRESHOLD_"] == str(machine.MMAP_THRESHOLD)
    assert seen["MALLOC_TRIM_THRESHOLD_"] == str(machine.TRIM_THRESHOLD)


def test_official_side_by_side_counts_per_step_from_the_two_run_lengths():
    """Time, CPU time and page faults per step are each the long run's less the short run's over
    the steps between them; runs measured before the counts existed summarize without them."""
    from benchmarks.e2e.official import PER_STEP_COUNTS, markdown, summarize

    def runs(trainer, per_step_s, faults_per_step):
        return [{"trainer": trainer, "resolution": 32, "steps": n, "repeat": 0, "seconds": 5 + n * per_step_s,
                 "peak_mib": 1000, "private_peak_mib": 500, "cpu_s": 7 + 2 * n * per_step_s, "sys_s": 1 + 0.01 * n,
                 "minor_faults": 9000 + n * faults_per_step} for n in (3, 63)]

    results = {"steps": [3, 63], "repeats": 1, "runs": runs("official", 0.2, 11000) + runs("baseline", 0.25, 17000)}
    rows = {r["trainer"]: r for r in summarize(results)}
    assert rows["baseline"]["ms_per_step"] == pytest.approx([250.0])
    assert rows["baseline"]["speedup"] == pytest.approx(0.8)
    assert rows["baseline"]["minor_faults_per_step"] == pytest.approx([17000])
    assert rows["official"]["cpu_s_per_step"] == pytest.approx([0.4]) and rows["official"]["sys_s_per_step"] == pytest.approx([0.01])
    assert "| 500 | 17.0 |" in markdown(list(rows.values()))
    for run in results["runs"]:
        for key in PER_STEP_COUNTS:
            del run[key]
    old = summarize(results)
    assert not any(key.endswith("_per_step") and key != "ms_per_step" for row in old for key in row)
    assert "faults" not in markdown(old)


def test_step_phases_time_both_loops_and_put_every_function_back(tmp_path):
    """benchmarks/e2e/phases.py on the tiny model: every UNet pass is timed in both loops,
    only the baseline encodes with the VAE (rpo-fast reads its latent cache), the phases add
    up to no more than the step, and the wrapped functions are the originals afterwards."""
    from benchmarks.e2e import phases

    clip = torch.nn.utils.clip_grad_norm_
    times = phases.profile(resolution=16, pairs=2, steps=2, warmup=1, workdir=tmp_path)
    assert set(times) == {"baseline", "rpo-fast"}
    for loop, t in times.items():
        for phase in ("policy UNet forward", "reference UNet forward", "optimizer", "gradient clipping"):
            assert t[phase] > 0, (loop, phase)
        assert t[phases.REST] > 0 and t["step"] >= sum(v for k, v in t.items() if k not in ("step", phases.REST))
    assert times["baseline"]["VAE encoding"] > 0 and "VAE encoding" not in times["rpo-fast"]
    assert torch.nn.utils.clip_grad_norm_ is clip
    import rpo_fast.train.loop as train_loop
    from rpo_fast.train.forward import predict

    assert train_loop.predict is predict
    assert "| policy UNet forward |" in phases.table(times)
