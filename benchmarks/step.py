"""A training step: ``rpo-fast train`` beside the official Diffusion-DPO trainer, run as published
(``make bench-step OFFICIAL=/path/to/DiffusionDPO``), and the steady-state throughput of
rpo-fast's real set-up and step with its phases (``measure_throughput``: the GPU check, tests).

    python -m benchmarks.step --official /path/to/DiffusionDPO [--resolution 32 64] [--json F]

``--official`` is a checkout of SalesforceAIResearch/DiffusionDPO (its code stays out of this
repository). Its ``train.py`` runs as published but for one line: the ``raise`` when xformers
is missing (xformers has no CPU build), in a copy made in the work folder. Both trainers get
the tiny SD1.5 pipeline and the Pick-a-Pic-format parquet built here, the same pairs per step,
resolution, fp32, dpo with ``beta_dpo`` 5000 (rpo-fast's beta 2500), constant learning rate,
no checkpoints, one process.

Time per optimizer step: the wall time of a run of ``--steps`` long minus one of ``--steps``
short, over the difference in steps, so that start-up, data loading and the final save drop
out; each configuration ``--repeats`` times, the configurations interleaved. Peak memory two
ways: the child's maximum resident set (``wait4``; on a CPU mostly shared-library pages) and
its peak private memory (``RssAnon``, sampled every 5 ms: what training holds). Per step too:
CPU seconds and minor page faults (``--steady-malloc`` fixes glibc's thresholds in every
trainer, harness.keep_freed_host_memory, so no step faults back in a heap trimmed the step
before). rpo-fast's latent cache (and for ``--compile`` inductor's cache) is filled before the
timed runs: the official trainer VAE-encodes every step, rpo-fast once.
"""


from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from benchmarks.harness import child_env, keep_freed_host_memory_env, machine_info
from benchmarks.tiny_models import build_tiny_sd15
from rpo_fast.data import write_pickapic_parquet
from rpo_fast.train import TrainConfig
from rpo_fast.train.loop import prepare, settle_nonfinite, step_batches, train_step

ROWS = 64
REF_PASS = re.compile(r"reference errors of (\d+) pair\(s\) in ([0-9.]+) s")
XFORMERS_RAISE = 'raise ValueError("xformers is not available. Make sure it is installed correctly")'

# rpo-fast configurations: name -> extra flags (dpo with a frozen reference is the base).
RPO_FAST = {"rpo-fast": [], "rpo-fast --compile": ["--compile"], "rpo-fast --lora": ["--lora"],
            "rpo-fast --precompute-ref": ["--precompute-ref"]}
TRAINERS = ("official", *RPO_FAST)
# What wait4 counts besides the time, reported per step like the time: CPU seconds (user +
# system), system seconds, minor page faults.
PER_STEP_COUNTS = ("cpu_s", "sys_s", "minor_faults")


PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen, studio photo", "an astronaut riding a horse")


def tiny_model(workdir: Path) -> Path:
    """``workdir/tiny-sd15``: built once (``save_pretrained`` layout), then reused."""
    folder = Path(workdir) / "tiny-sd15"
    if not (folder / "model_index.json").exists():
        build_tiny_sd15(folder)
    return folder


def _image(rng: np.random.Generator, resolution: int) -> Image.Image:
    """A smooth random picture (a coarse colour field upsampled, plus grain): JPEG-compressible
    like a photo, unlike white noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((resolution, resolution), Image.BICUBIC)
    grain = rng.normal(0, 8, (resolution, resolution, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def preference_data(workdir: Path, resolution: int, rows: int, seed: int = 0) -> Path:
    """``workdir/data-<rows>x<resolution>px``: a Pick-a-Pic-style parquet of ``rows`` pairs of
    JPEGs at the training resolution (label_0 = 1 or 0, no ties)."""
    folder = Path(workdir) / f"data-{rows}x{resolution}px"
    if not (folder / "train.parquet").exists():
        rng = np.random.default_rng(seed)
        write_pickapic_parquet(folder, ((PROMPTS[i % len(PROMPTS)], _image(rng, resolution), _image(rng, resolution),
                                         float(i % 2)) for i in range(rows)), image_format="JPEG")
    return folder


def measure_throughput(config: TrainConfig, num_steps: int = 10, warmup_steps: int = 2) -> Dict[str, object]:
    """``num_steps`` optimizer steps after ``warmup_steps`` (compilation, caches) of the real
    set-up and step, writing nothing but caches: pairs/s (global), seconds per step, the
    trainer's own phase clock in ms per step (host time) and, on CUDA, peak memory in GiB."""
    if num_steps < 1 or warmup_steps < 0:
        raise ValueError(f"num_steps >= 1 and warmup_steps >= 0 expected, got {num_steps}, {warmup_steps}")
    config = dataclasses.replace(config, max_steps=max(config.max_steps or 0, num_steps + warmup_steps), resume=None,
                                 progress=False, save_final=False)
    run = prepare(config)
    cuda = run.device.type == "cuda"
    try:
        batches = step_batches(run, 0, num_steps + warmup_steps)
        for _ in range(warmup_steps):
            train_step(run, batches)
        if cuda:
            torch.cuda.synchronize(run.device)
            torch.cuda.reset_peak_memory_stats(run.device)
        run.phases.reset()
        start = time.perf_counter()
        for _ in range(num_steps):
            train_step(run, batches, read=False)  # as rpo-fast train's steps between log steps
        settle_nonfinite(run)  # reads the steps' finiteness: waits for the device
        if cuda:
            torch.cuda.synchronize(run.device)
        seconds = time.perf_counter() - start
        result = {"pairs_per_s": num_steps * run.global_pairs_per_step / seconds, "seconds_per_step": seconds / num_steps,
                  "phase_ms": {name: 1e3 * s / num_steps for name, s in run.phases.seconds.items()}}
        if cuda:
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        return result
    finally:
        run.close()


def status_kib(field: str, pid: str = "self") -> Optional[int]:
    """One ``kB`` field of /proc/<pid>/status (None where there is none, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def official_script(checkout: Path, workdir: Path) -> Path:
    source = (checkout / "train.py").read_text()
    if XFORMERS_RAISE not in source:
        raise SystemExit(f"--official: {checkout / 'train.py'} is not the expected version (no xformers check found)")
    script = workdir / "official_train.py"
    script.write_text(source.replace(XFORMERS_RAISE, "pass  # xformers check lifted (benchmarks/step.py)"))
    return script


def official_command(script: Path, model: Path, data: Path, out: Path, steps: int, pairs: int, resolution: int) -> List[str]:
    return [sys.executable, str(script), f"--pretrained_model_name_or_path={model}", f"--dataset_name={data}",
            f"--train_batch_size={pairs}", f"--max_train_steps={steps}", f"--resolution={resolution}",
            "--mixed_precision=no", "--learning_rate=1e-5", "--lr_scheduler=constant", "--lr_warmup_steps=0",
            "--beta_dpo=5000", "--seed=0", "--dataloader_num_workers=0", "--checkpointing_steps=1000000",
            "--report_to=all", f"--output_dir={out}"]


def rpo_fast_command(flags: List[str], model: Path, data: Path, out: Path, cache: Path, steps: int, pairs: int,
                     resolution: int) -> List[str]:
    return [sys.executable, "-m", "rpo_fast.cli", "train", "--pretrained-model", str(model), "--data", str(data),
            "--output-dir", str(out), "--latent-cache", str(cache), "--batch-pairs", str(pairs),
            "--max-steps", str(steps), "--resolution", str(resolution), "--method", "dpo", "--beta", "2500",
            "--mixed-precision", "no", "--learning-rate", "1e-5", "--lr-scheduler", "constant",
            "--checkpoint-every", "0", "--no-progress", "--seed", "0", *flags]


def _sample_private_peak(pid: int, done: threading.Event, peak: List[int], every_s: float = 0.005) -> None:
    while not done.wait(every_s):
        peak[0] = max(peak[0], status_kib("RssAnon", str(pid)) or 0)  # anonymous pages: heap, tensors


def run(command: List[str], cwd: Path, log: Path, *, out: Optional[Path] = None,
        steady_malloc: bool = False) -> Dict[str, float]:
    """Wall seconds, peak resident MiB and peak private MiB of one run, and what ``PER_STEP_COUNTS``
    names; its output goes to ``log``. ``out``, the run's output folder, starts empty (an earlier
    run's is removed)."""
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    env = child_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    **(keep_freed_host_memory_env() if steady_malloc else {}))
    with open(log, "w") as f:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
        done, private = threading.Event(), [0]
        sampler = threading.Thread(target=_sample_private_peak, args=(child.pid, done, private), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{command[1]} failed (exit {child.returncode}); see {log}")
    measured = {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024, "private_peak_mib": private[0] / 1024,
                "cpu_s": usage.ru_utime + usage.ru_stime, "sys_s": usage.ru_stime, "minor_faults": usage.ru_minflt}
    ref_pass = REF_PASS.search(log.read_text())  # rpo-fast --precompute-ref prints its pass
    if ref_pass:
        measured.update(ref_pairs=int(ref_pass.group(1)), ref_pass_s=float(ref_pass.group(2)))
    return measured


def measure(args) -> Dict[str, object]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rpo-fast-official-"))
    work.mkdir(parents=True, exist_ok=True)
    script = official_script(args.official, work)
    model = tiny_model(work)
    cache = work / "latent-cache"
    results: Dict[str, object] = {"machine": machine_info(), "pairs": args.pairs, "steps": args.steps,
                                  "repeats": args.repeats, "steady_malloc": args.steady_malloc, "runs": []}
    for resolution in args.resolution:
        data = preference_data(work, resolution, ROWS)
        link = work / f"pickapic-{resolution}px"  # the official trainer's Pick-a-Pic branch keys on the name
        if not link.exists():
            link.symlink_to(data.resolve())
        commands = {"official": lambda out, n: official_command(script, model, link, out, n, args.pairs, resolution)}
        for name, flags in RPO_FAST.items():
            commands[name] = (lambda flags: lambda out, n: rpo_fast_command(flags, model, data, out, cache, n,
                                                                            args.pairs, resolution))(flags)
        commands = {name: commands[name] for name in args.trainers}
        warm = work / f"warm-{resolution}px"
        run(rpo_fast_command([], model, data, warm, cache, 1, args.pairs, resolution), work,
            work / f"warm-{resolution}px.log", out=warm)  # fills the latent cache
        for name in (n for n in commands if "--compile" in n):  # fills inductor's cache for this shape
            warm = work / f"warm-{resolution}px-compile"
            run(commands[name](warm, 1), work, work / f"warm-{resolution}px-compile.log", out=warm)
        for repeat in range(args.repeats):
            for name, command in commands.items():
                for steps in args.steps:
                    tag = f"{name.replace(' --', '-')}-{resolution}px-{steps}-{repeat}"
                    out = work / "out" / tag
                    measured = run(command(out, steps), work, work / f"{tag}.log", out=out, steady_malloc=args.steady_malloc)
                    results["runs"].append({"trainer": name, "resolution": resolution, "steps": steps,
                                            "repeat": repeat, **measured})
                    print(f"{tag}: {measured['seconds']:.1f} s, {measured['peak_mib']:.0f} MiB", flush=True)
    return results


def summarize(results: Dict[str, object]) -> List[Dict[str, object]]:
    """Per (trainer, resolution): milliseconds per step of each repeat (without the reference
    pass of --precompute-ref, reported as ms per pair), and the peak memory."""
    short, long_ = min(results["steps"]), max(results["steps"])
    rows = []
    keys = sorted({(r["trainer"], r["resolution"]) for r in results["runs"]}, key=lambda k: (k[1], k[0] != "official", k[0]))
    for trainer, resolution in keys:
        runs = [r for r in results["runs"] if r["trainer"] == trainer and r["resolution"] == resolution]
        per_step, pass_ms = [], []
        counted = {key: [] for key in PER_STEP_COUNTS if all(key in r for r in runs)}  # older runs lack them
        for repeat in range(results["repeats"]):
            by_steps = {r["steps"]: r for r in runs if r["repeat"] == repeat}

            def difference(value) -> float:  # the long run's less the short run's, per step between them
                return (value(by_steps[long_]) - value(by_steps[short])) / (long_ - short)

            per_step.append(difference(lambda r: r["seconds"] - r.get("ref_pass_s", 0.0)))
            for key, values in counted.items():
                values.append(difference(lambda r: r[key]))
            if "ref_pass_s" in by_steps[long_]:
                pass_ms.append(1e3 * by_steps[long_]["ref_pass_s"] / by_steps[long_]["ref_pairs"])
        row = {"trainer": trainer, "resolution": resolution, "ms_per_step": [1e3 * s for s in per_step],
               **{key: max(r[key] for r in runs if r["steps"] == long_) for key in ("peak_mib", "private_peak_mib")}}
        if pass_ms:
            row["ref_pass_ms_per_pair"] = pass_ms
        row.update({f"{key}_per_step": values for key, values in counted.items()})
        rows.append(row)
    for row in rows:
        official = next(o for o in rows if o["trainer"] == "official" and o["resolution"] == row["resolution"])
        row["speedup"] = statistics.median(official["ms_per_step"]) / statistics.median(row["ms_per_step"])
        row["memory_ratio"] = row["peak_mib"] / official["peak_mib"]
        row["private_ratio"] = row["private_peak_mib"] / official["private_peak_mib"]
    return rows


def markdown(rows: List[Dict[str, object]]) -> str:
    """The summary as a table; runs that counted them add the median CPU ms and thousands of
    minor page faults per step."""
    counts = all("minor_faults_per_step" in r for r in rows)
    lines = ["| trainer | px | ms per step (each repeat) | median | × official | peak RSS MiB (/ official) "
             "| peak private MiB | private / official |" + (" CPU ms / step | faults / step (k) |" if counts else ""),
             "| --- " * (10 if counts else 8) + "|"]
    for r in rows:
        each = " / ".join(f"{v:.0f}" for v in r["ms_per_step"])
        if "ref_pass_ms_per_pair" in r:
            each += f" (+ pass {statistics.median(r['ref_pass_ms_per_pair']):.1f} ms a pair)"
        line = (f"| {r['trainer']} | {r['resolution']} | {each} | {statistics.median(r['ms_per_step']):.0f} | "
                f"{r['speedup']:.2f} | {r['peak_mib']:.0f} ({r['memory_ratio']:.2f}) | {r['private_peak_mib']:.0f} | "
                f"{r['private_ratio']:.2f} |")
        if counts:
            line += (f" {1e3 * statistics.median(r['cpu_s_per_step']):.0f} |"
                     f" {statistics.median(r['minor_faults_per_step']) / 1e3:.1f} |")
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, required=True, help="a checkout of SalesforceAIResearch/DiffusionDPO")
    p.add_argument("--resolution", type=int, nargs="+", default=[32, 64])
    p.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    p.add_argument("--steps", type=int, nargs=2, default=[3, 63], help="the short and the long run's steps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS),
                   help="which to run (default: all; official is needed for the ratios)")
    p.add_argument("--steady-malloc", action="store_true",
                   help="run every trainer with glibc malloc's thresholds fixed (benchmarks.harness."
                        "keep_freed_host_memory): no step faults back in a heap trimmed the step before")
    p.add_argument("--workdir", type=Path, default=None, help="keep the model, data, logs and outputs here")
    p.add_argument("--json", type=Path, default=None, help="write the runs and the summary here")
    args = p.parse_args(argv)
    if not (args.official / "train.py").is_file():
        p.error(f"--official: expected a DiffusionDPO checkout with train.py, got {args.official}")
    if "official" not in args.trainers:
        p.error("--trainers: include official (every ratio is against it)")
    if args.steps[0] >= args.steps[1] or args.steps[0] < 1:
        p.error(f"--steps: expected SHORT LONG with 1 <= SHORT < LONG, got {args.steps}")
    results = measure(args)
    rows = summarize(results)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({**results, "summary": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
