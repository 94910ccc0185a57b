"""The benchmarks, run small, so that they cannot rot: ``python -m benchmarks.loss --smoke`` as
``make bench`` runs it (toy shapes, one round), and the pieces whose arithmetic makes the
tables: paired rounds, the float64 agreement bounds, bytes kept for backward, and the step
benchmark's per-step counts and memory peaks."""

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

from benchmarks.eager_loss import eager_dpo_loss, eager_rpo_loss
from benchmarks.harness import machine_info
from benchmarks.loss import (
    BETA, PROFILES, TAU, LossCase, agreement, cached_inputs, impls_for, interleaved, loss_fn, make_inputs,
    paired_ratio, saved_for_backward,
)
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
    proc = subprocess.run([sys.executable, "-m", "benchmarks.loss", "--smoke", "--out", str(out), "--name", "smoke"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out, json.loads((out / "smoke.json").read_text())


def test_every_backend_is_timed_against_every_baseline(smoke_run):
    _, results = smoke_run
    backends = set(impls_for(torch.device("cpu"))) - {"copy", "eager", "compiled"}
    for case in PROFILES["smoke"].cases:
        rows = {r["backend"]: r for r in results["rows"] if (r["latents"], r["pairs"], r["dtype"], r["method"])
                == (case.latents, case.pairs, case.dtype, case.method)}
        assert set(rows) == backends, case.id
        for r in rows.values():
            for key in ("time_s", "eager_s", "compiled_s", "copy_s", "speedup_eager", "speedup_compiled", "byte_bound"):
                assert _finite_positive(r[key]), (key, r)
            assert r["loss_rel_err"] <= r["loss_rel_bound"] and r["grad_rel_err"] <= r["grad_rel_bound"]


def test_table_and_plot_are_written(smoke_run):
    out, results = smoke_run
    md = (out / "smoke.md").read_text()
    assert results["machine"]["slug"] in md and f"`{results['commit']}`" in md
    assert md.count("| tiny |") == len(results["rows"])
    assert (out / "smoke.png").read_bytes()[:8] == PNG_MAGIC


def test_a_keyword_that_selects_no_case_is_one_line(capsys):
    from benchmarks.loss import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--smoke", "-k", "sdxl-M7"])
    assert exit_info.value.code == 2 and "-k: expected part of a case id" in capsys.readouterr().err


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
    from benchmarks.step import run

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
    from benchmarks.step import run

    pages = 4 * (7 << 20) // 4096
    default = run([sys.executable, "-c", HEAP_CYCLES], tmp_path, tmp_path / "default.log")
    steady = run([sys.executable, "-c", HEAP_CYCLES], tmp_path, tmp_path / "steady.log", steady_malloc=True)
    assert default["minor_faults"] > 10 * pages
    assert steady["minor_faults"] < 3 * pages
    assert steady["sys_s"] <= default["sys_s"] and steady["cpu_s"] > 0


def test_official_side_by_side_counts_per_step_from_the_two_run_lengths():
    """Time, CPU time and page faults per step are each the long run's less the short run's over
    the steps between them; runs measured before the counts existed summarize without them."""
    from benchmarks.step import PER_STEP_COUNTS, markdown, summarize

    def runs(trainer, per_step_s, faults_per_step):
        return [{"trainer": trainer, "resolution": 32, "steps": n, "repeat": 0, "seconds": 5 + n * per_step_s,
                 "peak_mib": 1000, "private_peak_mib": 500, "cpu_s": 7 + 2 * n * per_step_s, "sys_s": 1 + 0.01 * n,
                 "minor_faults": 9000 + n * faults_per_step} for n in (3, 63)]

    results = {"steps": [3, 63], "repeats": 1, "runs": runs("official", 0.2, 11000) + runs("rpo-fast", 0.25, 17000)}
    rows = {r["trainer"]: r for r in summarize(results)}
    assert rows["rpo-fast"]["ms_per_step"] == pytest.approx([250.0])
    assert rows["rpo-fast"]["speedup"] == pytest.approx(0.8)
    assert rows["rpo-fast"]["minor_faults_per_step"] == pytest.approx([17000])
    assert rows["official"]["cpu_s_per_step"] == pytest.approx([0.4]) and rows["official"]["sys_s_per_step"] == pytest.approx([0.01])
    assert "| 500 | 17.0 |" in markdown(list(rows.values()))
    for run in results["runs"]:
        for key in PER_STEP_COUNTS:
            del run[key]
    old = summarize(results)
    assert not any(key.endswith("_per_step") and key != "ms_per_step" for row in old for key in row)
    assert "faults" not in markdown(old)
