"""``make bench``: runs the suite with pytest-benchmark and writes results, table and plots.

    python -m benchmarks.run                 # the full grid (5 min on a quiet 2-core EPYC)
    python -m benchmarks.run --quick         # the kernel targets and one end-to-end pair (~30 s)
    python -m benchmarks.run --only e2e      # one part; merged into this machine's existing results

Writes ``<out>/<machine>.json`` (machine, measurements, derived rows, targets), ``<machine>.md``
and ``<machine>-*.png`` (benchmarks/report.py). ``<machine>``: a slug of the GPU name or CPU
model and the core count (benchmarks/machine.py); ``-quick`` / ``-smoke`` are appended for
those profiles, so that they never replace a full run's files.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks.collect import measurements, summarize
from benchmarks.machine import machine_info
from benchmarks.profiles import PROFILE_NAMES
from benchmarks.report import write_report

import rpo_fast

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=PROFILE_NAMES, default="full")
    p.add_argument("--quick", dest="profile", action="store_const", const="quick", help="same as --profile quick")
    p.add_argument("--smoke", dest="profile", action="store_const", const="smoke", help="same as --profile smoke")
    p.add_argument("--only", choices=("all", "loss", "e2e"), default="all")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results folder")
    p.add_argument("--name", default=None,
                   help="results file stem (default: the machine slug, plus -quick or -smoke for those profiles)")
    p.add_argument("--e2e-workdir", type=Path, default=None, help="keep the tiny model and data here")
    p.add_argument("-k", dest="keyword", default=None, help="pytest -k expression: a subset of benchmarks")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch here and in the end-to-end workers (default: torch's choice, "
                        "one per core)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected a positive integer, got {args.threads}")
    return args


def run_suite(args, raw_json: Path) -> int:
    pytest_args = [
        str(BENCH_DIR), "-p", "no:cacheprovider", "--benchmark-enable", f"--benchmark-json={raw_json}",
        "--benchmark-sort=name", "--benchmark-columns=min,median,rounds", "--profile", args.profile,
        "--only", args.only, "-o", "python_files=test_*.py", "-q",
    ]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    if args.e2e_workdir:
        pytest_args += ["--e2e-workdir", str(args.e2e_workdir)]
    return pytest.main(pytest_args)


def _load_average() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the end-to-end workers
        torch.set_num_threads(args.threads)
    info = machine_info()
    load_before = _load_average()
    if load_before > 0.25 * info["cores"]:
        # Every parallel op of a timed call waits for its slowest thread: with other processes
        # on the cores, rounds take up to tens of times longer (measured here: 2 ms -> 50 ms).
        print(f"benchmarks: WARNING: load average {load_before} on {info['cores']} cores; other processes "
              "will distort the timings. Run on a quiet machine for numbers worth reporting.", file=sys.stderr)
    # A quick or smoke run gets its own files: it must not replace a full run's results.
    name = args.name or (info["slug"] + (f"-{args.threads}t" if args.threads else "")
                         + (f"-{args.profile}" if args.profile != "full" else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    results_json = args.out / f"{name}.json"

    with tempfile.TemporaryDirectory(prefix="rpo-fast-bench-") as tmp:
        raw_json = Path(tmp) / "pytest-benchmark.json"
        code = run_suite(args, raw_json)
        if not raw_json.exists():
            print(f"benchmarks: pytest exited with {code} and wrote no results", file=sys.stderr)
            return int(code) or 1
        loss, e2e = measurements(json.loads(raw_json.read_text()))

    profiles = {"loss": args.profile, "e2e": args.profile}
    previous = json.loads(results_json.read_text()) if results_json.exists() else {}
    if args.only != "all" and previous.get("machine", {}).get("slug") == info["slug"]:
        # One part re-measured: keep the other part of this machine's last run.
        kept = "e2e" if args.only == "loss" else "loss"
        if kept == "e2e":
            e2e = previous.get("e2e", [])
        else:
            loss = previous.get("loss", [])
        profiles[kept] = previous.get("profiles", {}).get(kept, previous.get("profile", "?"))
    results = {
        "machine": info,
        "profile": args.profile,
        "profiles": profiles,  # per part: differs from "profile" after an --only run merged into older results
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": _commit(),
        "backends": rpo_fast.available_backends(),
        "environment": {
            "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
            "load_average_before": load_before,
            "load_average_after": _load_average(),
        },
        "loss": loss,
        "e2e": e2e,
    }
    results.update(summarize(loss, e2e))
    tmp_json = results_json.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(results, indent=1))
    os.replace(tmp_json, results_json)
    written = [results_json] + write_report(results_json, args.out)
    print("benchmarks: wrote " + ", ".join(str(p) for p in written))
    for t in results["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['target']}: {value} ({verdict})")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
