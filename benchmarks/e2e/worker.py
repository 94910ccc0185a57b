"""Runs one end-to-end configuration in this (fresh) process and prints its result as json.

``python -m benchmarks.e2e.worker --loop baseline|rpo_fast|rpo_fast_precompute_ref --model DIR --data DIR --pairs 2
--resolution 64 --warmup 2 --steps 8``. The last line of stdout is ``RESULT <json>``: set-up
time, the time of each timed step, pairs per second at the median step time (``pairs_per_s``
adds the reference pass that ``precompute_ref`` runs before training, spread over the steps
it serves; ``step_pairs_per_s`` leaves it out), and the peak memory of set-up and of the
training steps (benchmarks/e2e/memory.py). One process per configuration, so that no configuration's
memory or compiled code leaks into the next one's numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks.profiles import E2E_LOOPS as LOOPS

RESULT_PREFIX = "RESULT "


def _import_libraries() -> None:
    """What either loop imports, imported by both before the memory baseline is taken, so that
    neither is charged for libraries."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import benchmarks.e2e.baseline  # noqa: F401
    import rpo_fast.train  # noqa: F401


def warm_up_kernels(model: str, pairs: int, resolution: int, device: torch.device) -> None:
    """One UNet forward+backward at the run's shapes, before anything is measured, in every
    worker alike: first calls pay one-time costs (oneDNN primitives, cuDNN plans, allocator
    growth). The timed loops skip them with their warm-up steps, but a reference pass run
    during set-up (``precompute_ref``) would otherwise pay them inside its measured time."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)
    side = resolution // 8
    sample = torch.randn(2 * pairs, unet.config.in_channels, side, side, device=device)
    hidden = torch.randn(2 * pairs, 77, unet.config.cross_attention_dim, device=device)
    timesteps = torch.randint(0, 1000, (2 * pairs,), device=device)
    unet(sample, timesteps, hidden).sample.float().square().mean().backward()
    with torch.no_grad():
        unet(sample, timesteps, hidden)
    del unet, sample, hidden


def build_loop(args, device: torch.device):
    if args.loop == "baseline":
        from benchmarks.e2e.baseline import DiffusionDPOBaseline

        return DiffusionDPOBaseline(
            args.model, args.data, pairs=args.pairs, resolution=args.resolution, device=device,
            method=args.method, mixed_precision=args.mixed_precision, seed=args.seed,
        )
    from benchmarks.e2e.rpo_fast_loop import RpoFastLoop

    return RpoFastLoop(
        args.model, args.data, pairs=args.pairs, resolution=args.resolution, device=device,
        method=args.method, mixed_precision=args.mixed_precision, seed=args.seed, workdir=args.workdir,
        total_steps=args.warmup + args.steps, precompute_ref=args.loop == "rpo_fast_precompute_ref",
    )


def _phase_memory(phase: str, peak: dict) -> dict:
    """``<phase>_peak_bytes`` (the benchmark device's: CUDA tensors on a GPU, else RSS) and
    ``<phase>_peak_rss_bytes`` / ``<phase>_peak_cuda_bytes``."""
    out = {f"{phase}_peak_bytes": peak["peak"], f"{phase}_peak_rss_bytes": peak["rss"]}
    if "cuda" in peak:
        out[f"{phase}_peak_cuda_bytes"] = peak["cuda"]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loop", required=True, choices=LOOPS)
    p.add_argument("--model", required=True, help="tiny SD1.5 pipeline folder (save_pretrained layout)")
    p.add_argument("--data", required=True, help="preference data folder (Pick-a-Pic parquet)")
    p.add_argument("--workdir", required=True, help="scratch folder for outputs and caches")
    p.add_argument("--pairs", type=int, required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--method", default="rpo", choices=("rpo", "dpo"))
    p.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("pairs", "resolution", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup: expected >= 0, got {args.warmup}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    _import_libraries()
    warm_up_kernels(args.model, args.pairs, args.resolution, device)

    from benchmarks.e2e.memory import PeakMemory

    memory = PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    loop = build_loop(args, device)
    sync()
    setup_s = time.perf_counter() - start
    # Set-up (for rpo-fast: filling the latent cache, the precomputed reference pass) is a
    # phase of its own: a run can do it once, ahead of training, on another machine.
    setup_memory = memory.peak()
    memory.start()

    step_times, losses = [], []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = loop.step()
        sync()
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            step_times.append(elapsed)
            losses.append(loss)
    step_s = statistics.median(step_times)  # robust to a step that another process interrupted
    details = getattr(loop, "details", lambda: {})()
    # Work done for the steps before they start (the precomputed reference pass) is spread
    # over the steps it serves, so that throughputs stay comparable.
    upfront_per_step = details.get("ref_precompute_s", 0.0) / (args.warmup + args.steps)
    result = {
        "loop": args.loop,
        "pairs": args.pairs,
        "resolution": args.resolution,
        "method": args.method,
        "mixed_precision": args.mixed_precision,
        "device": str(device),
        "setup_s": setup_s,
        "warmup_steps": args.warmup,
        "step_times_s": step_times,
        "step_pairs_per_s": args.pairs / step_s,
        "pairs_per_s": args.pairs / (step_s + upfront_per_step),
        "losses": losses,
        "rss_source": memory.rss_source,
        **_phase_memory("setup", setup_memory),
        **_phase_memory("train", memory.peak()),
        **details,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
