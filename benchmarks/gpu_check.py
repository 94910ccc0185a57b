"""``make gpu-check``: proves and times the CUDA and Triton kernels on a GPU machine, in one
prepared run of at most 9 minutes, each stage time-boxed.

    python -m benchmarks.gpu_check [--out DIR] [--wheels gpu_wheels]    # DIR: $OUT, else gpu_check_out

Stages, on a machine with a CUDA device:

1. **build**: ``rpo_fast._C`` against this machine's torch, for this GPU's architecture only,
   with every core, into a virtual environment over the system packages (nothing is installed
   system-wide); wheels from ``--wheels`` (``make gpu-wheels``: diffusers, pytest and its
   plugins) go into it first;
2. **tests**: the kernel suites (parity of ``cuda`` and ``triton`` with the reference for
   every method, loss type and dtype, ``opcheck``, ``torch.compile(fullgraph=True)``, the
   gpu-marked launches and streams), with the Triton interpreter off;
3. **check**: ``rpo-fast check --device cuda`` at SD1.5's latent shape, bf16 and fp32: every
   GPU backend probed against the float64 reference (the first-use check's probe) and timed,
   forward and backward; which is right and which is fastest (what ``--backend auto`` picks);
4. **bench**: the loss benchmark on the GPU (``benchmarks.loss -k M16``): SD1.5 and SDXL
   latents, M = 16 (the whole grid's 32 inductor compilations would not fit the stage's time),
   fp32 and bf16, rpo and dpo; eager, compiled, triton, cuda, and a device copy for the byte bound;
5. **train**: with diffusers present, the gpu-marked training tests (a tiny SD UNet compiled,
   bf16, LoRA / full / precomputed reference, and its throughput);
6. **timing**: with diffusers present, a DPO step's components on the real SD1.5 and SDXL
   architectures with random weights (``benchmarks.step_timing``): the official trainer's and
   rpo-fast's configurations per pair (docs/step-budget.md has the estimates to compare);
7. **timing-flow**: the same for FLUX.1-dev, SD3.5-medium and SD3.5-large at 1024 px (most
   asked first; added to the timing stage's files after each model, so a time limit keeps what
   finished, and the report stays within the 8 files the GPU machine returns): no caches against
   rpo-fast's LoRA, and SD3.5-medium's full fine-tuning (docs/sd3-flux.md has the estimates).

Without a GPU every stage that needs none still runs, at a scale that takes seconds (a dry run:
the script, the test collection, ``rpo-fast check`` and the benchmark's code path on CPU tensors,
the step timing on scaled-down SD1.5 and FLUX.1-dev configs, the report writer) and the command exits 0 saying so,
in well under a minute on 2 busy cores; CI runs it (tests/test_gpu_check.py). Writes ``gpu-check.json`` and
``gpu-check.md`` (and the benchmark's files) to the output folder and prints a summary.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
# Seconds per stage: 100 + 100 + 40 + 100 + 60 + 60 + 80 = 540 s, the 9 minutes the check may take
# (the device tool's 10-minute command limit leaves a minute for the venv and the report).
# timing-flow's 80 s came from build (110 -> 100: one .cu file and a few .cpp on every core),
# tests (120 -> 100) and bench (130 -> 100), the three longest, and timing (80 -> 60: SD1.5's and
# SDXL's passes take seconds, SDXL's 2.6 B fp32 weights and optimizers the most). None has run on
# a GPU yet: the first run's seconds per stage (gpu-check.json) say where the slack is.
# timing-flow on paper, at 400 TFLOP/s (docs/sd3-flux.md's 2 x parameters x tokens), one pair
# (2 images), --warmups 1 --repeats 2, so 3 calls of each component:
#   FLUX.1-dev: forward 0.55 s; reference and adapters-off reference 3 x 0.55 s each, the LoRA
#     policy (checkpointed: forward, recomputed forward, input gradients) 3 x 1.65 s: 8 s;
#   SD3.5-medium: forward 0.1 s; the same 1.5 s, full fine-tuning (4 forwards' worth) 1.2 s: 3 s;
#   SD3.5-large: forward 0.34 s: 5 s;
# T5-XXL, CLIP and the VAE well under a second each; building the models on the GPU (random
# init, about 35 B parameters in all, T5 three times) and the imports and CUDA start perhaps 25 s:
# about 40 s, 60 s at 250 TFLOP/s, inside 80 s. SD3.5-large goes last: were the GPU slower, the
# JSON written after each model keeps FLUX.1-dev and SD3.5-medium.
LIMITS = {"build": 100, "tests": 100, "check": 40, "bench": 100, "train": 60, "timing": 60, "timing-flow": 80}
# The dry run's stages, each a few seconds' work, 5 to 10 times that as their limits.
DRY_LIMITS = {"build": 0, "tests": 30, "check": 30, "bench": 40, "train": 30, "timing": 40, "timing-flow": 40}
# The flow models, most asked first, and their sizes: one pair, 1 + 2 calls per component (above).
# Their results join step-timing.{json,md} (--append): the GPU machine returns 8 files, and
# gpu-check.{json,md}, gpu-check-loss.{json,md,png} and step-timing.{json,md} are 7.
FLOW_TIMING = ["--models", "flux-dev", "sd35m", "sd35l", "--pairs", "1", "--warmups", "1", "--repeats", "2"]
KERNEL_TESTS = ["tests/test_parity.py", "tests/test_cuda_kernels.py", "tests/test_triton_kernels.py",
                "tests/test_compile.py", "tests/test_checks.py", "tests/test_verify.py"]
TAIL = 4000  # characters of each stage's output kept in the report


def _run(name: str, cmd: List[str], limit: int, env: Optional[Dict[str, str]] = None) -> Dict:
    """One stage in its own process group, killed with everything it started at ``limit``."""
    start = time.perf_counter()
    print(f"[gpu-check] {name}: {' '.join(cmd)} (at most {limit} s)", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        status = f"timed out after {limit} s"
    seconds = time.perf_counter() - start
    print(f"[gpu-check] {name}: {status} in {seconds:.0f} s", flush=True)
    return {"stage": name, "status": status, "seconds": round(seconds, 1), "command": " ".join(cmd),
            "output_tail": (out or "")[-TAIL:]}


def _skipped(name: str, why: str) -> Dict:
    print(f"[gpu-check] {name}: skipped ({why})", flush=True)
    return {"stage": name, "status": f"skipped: {why}", "seconds": 0.0, "command": "", "output_tail": ""}


def _machine() -> Dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "cores": os.cpu_count(), "gpu": None}
    try:  # the installed version, without importing it (seconds on a busy machine)
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["triton"] = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}",
                    gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return info


def _build(work: Path, wheels: Path, capability: str) -> Tuple[Dict, str]:
    """A venv over the system packages, the wheels, then ``pip install -e .`` for this GPU."""
    venv = work / "venv"
    python = str(venv / "bin" / "python")
    steps = [[sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)]]
    wheel_files = sorted(str(p) for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    if wheel_files:
        steps.append([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *wheel_files])
    steps.append([python, "-m", "pip", "install", "--quiet", "--no-build-isolation", "--no-deps", "-e", "."])
    env = {"TORCH_CUDA_ARCH_LIST": capability, "MAX_JOBS": str(os.cpu_count() or 1), "RPO_FAST_CUDA": "1"}
    script = " && ".join(" ".join(f"'{a}'" for a in step) for step in steps)
    result = _run("build", ["bash", "-c", script], LIMITS["build"], env)
    result["wheels"] = [Path(w).name for w in wheel_files]
    return result, python


def run_check(out: Path, wheels: Path, work: Path) -> Dict:
    machine = _machine()
    gpu = machine["gpu"] is not None
    limits = LIMITS if gpu else DRY_LIMITS
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stages: List[Dict] = []
    python = sys.executable
    if gpu:
        build, python = _build(work, wheels, machine["capability"])
        stages.append(build)
        if build["status"] != "ok":
            python = None
    else:
        stages.append(_skipped("build", "no GPU: the dry run uses this interpreter's rpo_fast"))

    # pytest without the project's addopts (they deselect the gpu tests)
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore::DeprecationWarning"]
    # The dry run's stages on one thread: a 2-core machine with the other core busy would make
    # every parallel region wait for its descheduled second thread (measured: twice as slow).
    env: Dict[str, str] = {} if gpu else {"OMP_NUM_THREADS": "1"}
    if python is None:
        stages.append(_skipped("tests", "the build failed"))
    elif gpu:
        env_gpu = {**env, "TRITON_INTERPRET": "0"}
        stages.append(_run("tests", [*pytest, "-m", "not slow", *KERNEL_TESTS], limits["tests"], env_gpu))
    else:
        stages.append(_run("tests", [*pytest, "--collect-only", "-m", "gpu", *KERNEL_TESTS], limits["tests"], env))

    if python is None:
        stages.append(_skipped("check", "the build failed"))
    else:  # GPU: SD1.5's latents, 16 pairs, both training precisions; dry: the same code, toy sizes, once
        sizes = (["--pairs", "16", "--shape", "4", "64", "64"] if gpu else
                 ["--pairs", "2", "--shape", "4", "8", "8", "--repeats", "1", "--method", "rpo"])
        checks = [[python, "-m", "rpo_fast.cli", "check", "--device", "cuda" if gpu else "cpu", *sizes, "--dtype", d]
                  for d in (("bf16", "fp32") if gpu else ("fp32",))]
        script = " && ".join(" ".join(f"'{a}'" for a in c) for c in checks)
        stages.append(_run("check", ["bash", "-c", script], limits["check"], env))

    bench_out = work / "bench"  # copied next to the report below
    if python is None:
        stages.append(_skipped("bench", "the build failed"))
    else:
        profile = ["-k", "M16"] if gpu else ["--smoke"]
        stages.append(_run("bench", [python, "-m", "benchmarks.loss", *profile, "--out", str(bench_out),
                                     "--name", "gpu-check-loss"], limits["bench"], env))

    has_diffusers = python is not None and subprocess.run(  # found, not imported: seconds saved
        [python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('diffusers') is None)"],
        capture_output=True).returncode == 0
    if python is None or not has_diffusers:  # the two stages that train
        why = "diffusers is not installed (make gpu-wheels)" if python else "the build failed"
        stages += [_skipped("train", why), _skipped("timing", why), _skipped("timing-flow", why)]
    else:
        # the dry run: the training tests collected, the step timed on scaled-down configs on the CPU
        train = ["-m", "gpu"] if gpu else ["--collect-only", "-m", "gpu"]
        # (the dry run: SD1.5's and FLUX.1-dev's scaled-down configs, one call each;
        # tests/test_step_timing.py runs SDXL's and SD3.5's)
        dry = ["--tiny", "--repeats", "1", "--warmups", "0"]
        sizes = [] if gpu else [*dry, "--models", "sd15"]
        flow = FLOW_TIMING if gpu else [*dry, "--models", "flux-dev"]
        stages.append(_run("train", [*pytest, *train, "tests/test_train.py"], limits["train"], env))
        stages.append(_run("timing", [python, "-m", "benchmarks.step_timing", *sizes, "--json",
                                      str(out / "step-timing.json")], limits["timing"], env))
        stages.append(_run("timing-flow", [python, "-m", "benchmarks.step_timing", *flow, "--append", "--json",
                                           str(out / "step-timing.json")], limits["timing-flow"], env))

    # the benchmark's files next to the report, flat (the machine returns files from one folder)
    for path in sorted(bench_out.glob("gpu-check-loss*")) if bench_out.is_dir() else []:
        shutil.copy(path, out / path.name)
    report = {"dry_run": not gpu, "machine": machine, "limits_s": limits, "stages": stages,
              "seconds": round(sum(s["seconds"] for s in stages), 1),
              "ok": all(s["status"] == "ok" or s["status"].startswith("skipped") for s in stages)}
    (out / "gpu-check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu-check.md").write_text(format_report(report))
    return report


def format_report(report: Dict) -> str:
    m = report["machine"]
    where = (f"{m['gpu']} (sm_{m['capability'].replace('.', '')}, {m['gpu_memory_gib']} GiB)" if m["gpu"]
             else "no GPU: a dry run")
    lines = [
        "# rpo-fast GPU check", "",
        f"{where}; {m['cores']} cores; Python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), "
        f"triton {m['triton']}; {report['seconds']:.0f} s in all.", "",
        "| stage | status | seconds | limit s |", "| --- | --- | --- | --- |",
    ]
    for s in report["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {s['seconds']:.0f} | {report['limits_s'][s['stage']]} |")
    for s in report["stages"]:
        if s["output_tail"]:
            lines += ["", f"## {s['stage']}", "", f"`{s['command']}`", "", "```", s["output_tail"][-1500:].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                        help="report folder (default: $OUT, else gpu_check_out)")
    parser.add_argument("--wheels", type=Path, default=REPO_ROOT / "gpu_wheels",
                        help="wheels to install before building (make gpu-wheels)")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "build" / "gpu-check", help="venv and scratch files")
    args = parser.parse_args(argv)
    report = run_check(args.out, args.wheels, args.work)
    print(format_report(report))
    if report["dry_run"]:
        print("[gpu-check] dry run: no CUDA device here; every stage that needs none ran"
              + ("" if report["ok"] else ", and one failed"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
