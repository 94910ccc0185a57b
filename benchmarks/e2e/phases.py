"""Where a training step's time goes: ``rpo-fast train``'s step beside the Diffusion-DPO-style
baseline (benchmarks/e2e/baseline.py), phase by phase, in one process.

    python -m benchmarks.e2e.phases --resolution 32 64 [--pairs 4] [--steps 12] [--steady-malloc]

Both loops are built on the same tiny SD1.5 pipeline and data (benchmarks/e2e/assets.py), dpo,
fp32, a frozen reference; their steps alternate, so the host's drift reaches both alike (the
side-by-side runs of benchmarks/e2e/official.py, one process per run, spread by a third on a
shared VM). rpo-fast's phases are the trainer's own marks (rpo_fast/train/phases.py); the
baseline's, the wall time of the functions that make it, wrapped for the run;
"backward and the rest" is the step less the phases. Prints a table per resolution, ms, the
median over the timed steps. With glibc's default thresholds, a phase that allocates and frees
much (a gradient-free forward) can fault memory back in that the step before returned to the
kernel, more in one loop than the other; ``--steady-malloc`` stops that.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

import torch

from benchmarks.e2e import baseline
from benchmarks.e2e.assets import preference_data, tiny_model
from benchmarks.e2e.rpo_fast_loop import RpoFastLoop
from benchmarks.machine import keep_freed_host_memory

REST = "backward and the rest"


class PhaseClock:
    """Seconds spent in the baseline's wrapped functions since the last ``reset``, per phase name."""

    def __init__(self):
        self.seconds: Dict[str, float] = collections.defaultdict(float)

    def wrap(self, owner, attribute: str, phase: str) -> Callable[[], None]:
        """Times ``owner.attribute`` as ``phase``; returns what puts the original back."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start

        setattr(owner, attribute, timed)
        return lambda: setattr(owner, attribute, original)

    def reset(self) -> None:
        self.seconds.clear()


def _baseline_phases(loop) -> List[tuple]:
    """(owner, attribute, phase) of what the baseline's step calls (the benchmark's own loop and
    the libraries' objects it holds; rpo-fast's step marks its phases itself)."""
    return [(loop, "_batch", "batch assembly"), (loop.vae, "encode", "VAE encoding"),
            (loop.text_encoder, "forward", "text encoder"), (loop.unet, "forward", "policy UNet forward"),
            (loop.ref_unet, "forward", "reference UNet forward"), (baseline, "eager_dpo_loss", "loss forward"),
            (loop.optimizer, "step", "optimizer"), (torch.nn.utils, "clip_grad_norm_", "gradient clipping")]


def _timed_step(loop, clock, samples: Dict[str, List[float]]) -> None:
    """One step of ``loop``, its phases (``clock.seconds``: the baseline's wrappers, or
    rpo-fast's own ``run.phases``) appended to ``samples``."""
    clock.reset()
    start = time.perf_counter()
    loop.step()
    total = time.perf_counter() - start
    for phase, seconds in clock.seconds.items():
        samples[phase].append(seconds)
    samples[REST].append(total - sum(clock.seconds.values()))
    samples["step"].append(total)


def profile(resolution: int, pairs: int, steps: int, warmup: int, workdir: Path) -> Dict[str, Dict[str, float]]:
    """{loop: {phase: median ms}} for the baseline and rpo-fast at ``resolution``."""
    model, data = tiny_model(workdir), preference_data(workdir, resolution, 64)
    device = torch.device("cpu")
    loops = {
        "baseline": baseline.DiffusionDPOBaseline(str(model), str(data), pairs=pairs, resolution=resolution,
                                                  device=device, method="dpo"),
        "rpo-fast": RpoFastLoop(str(model), str(data), pairs=pairs, resolution=resolution, device=device,
                                method="dpo", mixed_precision="no", seed=0,
                                workdir=tempfile.mkdtemp(dir=workdir), total_steps=warmup + steps),
    }
    for loop in loops.values():
        for _ in range(warmup):
            loop.step()
    samples = {name: collections.defaultdict(list) for name in loops}
    clocks = {"baseline": PhaseClock(), "rpo-fast": loops["rpo-fast"].run.phases}
    # (clip_grad_norm_ is torch's, called by both loops: the baseline's clock is reset before each
    # of its steps and read after it, so rpo-fast's calls in between never reach its samples)
    undo = [clocks["baseline"].wrap(*where) for where in _baseline_phases(loops["baseline"])]
    try:
        with warnings.catch_warnings():  # torch warns when optimizer.step is replaced after its scheduler was built
            warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
            for _ in range(steps):
                for name, loop in loops.items():
                    _timed_step(loop, clocks[name], samples[name])
    finally:
        for put_back in reversed(undo):
            put_back()
    return {name: {phase: 1e3 * statistics.median(values) for phase, values in phases.items()}
            for name, phases in samples.items()}


def table(times: Dict[str, Dict[str, float]]) -> str:
    phases: List[str] = []
    for per_loop in times.values():
        phases += [p for p in per_loop if p not in phases and p not in (REST, "step")]
    phases += [REST, "step"]
    lines = ["| phase | " + " | ".join(times) + " |", "| --- |" + " --- |" * len(times)]
    for phase in phases:
        lines.append(f"| {phase} | " + " | ".join(f"{t.get(phase, 0.0):.1f}" for t in times.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, nargs="+", default=[32, 64])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=12, help="timed steps of each loop")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--steady-malloc", action="store_true",
                   help="fix glibc malloc's thresholds first (benchmarks.machine.keep_freed_host_memory), so that "
                        "no phase faults back in memory the heap returned to the kernel the step before")
    args = p.parse_args(argv)
    if args.steady_malloc and not keep_freed_host_memory():
        p.error("--steady-malloc: needs glibc's malloc (Linux)")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        for resolution in args.resolution:
            times = profile(resolution, args.pairs, args.steps, args.warmup, workdir)
            ratio = times["baseline"]["step"] / times["rpo-fast"]["step"]
            print(f"\n{resolution} px, {args.pairs} pairs, dpo, fp32, {torch.get_num_threads()} threads: "
                  f"ms, median of {args.steps} alternating steps (baseline / rpo-fast = {ratio:.2f})")
            print(table(times))


if __name__ == "__main__":
    main()
