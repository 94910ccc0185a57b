"""``rpo-fast check``: which loss backends are right on this device, and which is fastest.

For each method asked, every backend that runs on ``--device`` is probed against the float64
reference (rpo_fast/verify.py: loss, metrics and gradient on a small deterministic call) and
timed at the user's shapes (forward and backward, interleaved across backends, median of
``--repeats``). The trainer runs the same measurement once on CUDA with ``--backend auto``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Sequence

import torch

from . import verify
from ._types import DTYPE_NAMES, METHODS
from .dispatch import _backend, _runs_on, available_backends


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", nargs="+", choices=METHODS, default=["rpo", "dpo", "sft"],
                        help="losses to check (default: all three)")
    parser.add_argument("--pairs", type=int, default=4, help="M, preference pairs in the timed batch")
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 32, 32],
                        help="per-sample shape S of the timed batch (C H W: SD1.5 at 512 px is 4 64 64)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per backend")


@dataclass
class Measurement:
    backend: str
    correct: bool
    worst: str  # the quantity closest to (or past) its tolerance: "gradient 1.2e-09 / 3e-08"
    ms: float  # median forward + backward at the timed shape


def measure(method: str, device: torch.device, pairs: int, shape: Sequence[int], dtype: torch.dtype,
            repeats: int = 10, reference: str = "ref_pred", weights: str = "embeddings",
            backends: Optional[List[str]] = None) -> List[Measurement]:
    """Probes and times every backend that runs on ``device`` (or ``backends``)."""
    names = backends or [b for b in available_backends() if _runs_on(b, device)
                         and (b == "torch" or dtype in (torch.float32, torch.bfloat16, torch.float16))]
    weights = weights if method == "rpo" else "none"
    reference = reference if method != "sft" else "none"
    call = verify.CallClass("torch", device.type, method, dtype, reference, weights, "sigmoid", "mean")
    timed = verify.probe_inputs(call, device, pairs, tuple(shape))  # the same kind of call at the user's size
    findings = {name: verify.probe(_backend(name), replace(call, backend=name), device) for name in names}
    times: Dict[str, List[float]] = {name: [] for name in names}
    for name in names:  # warm-up: first launches, compilation
        for _ in range(2):
            verify.run_backend(_backend(name), timed)
    for _ in range(repeats):  # interleaved, so that a busy moment hits every backend alike
        for name in names:
            _sync(device)
            start = time.perf_counter()
            verify.run_backend(_backend(name), timed)
            _sync(device)
            times[name].append(1e3 * (time.perf_counter() - start))
    out = []
    for name in names:
        worst = verify.worst(findings[name])
        out.append(Measurement(name, all(f.ok for f in findings[name]),
                               f"{worst.what} {worst.distance:.2g} / {worst.tolerance:.2g}",
                               statistics.median(times[name])))
    return out


def fastest(measurements: List[Measurement]) -> str:
    """The fastest backend whose probe was right (``torch`` if none)."""
    right = [m for m in measurements if m.correct]
    return min(right, key=lambda m: m.ms).backend if right else "torch"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(measurements: List[Measurement]) -> List[str]:
    base = next((m.ms for m in measurements if m.backend == "torch"), None)
    lines = [f"  {'backend':8s} {'correct':8s} {'worst (distance / tolerance)':34s} {'ms':>9s}  vs torch"]
    for m in measurements:
        ratio = f"{base / m.ms:.2f}x" if base else ""
        lines.append(f"  {m.backend:8s} {'yes' if m.correct else 'NO':8s} {m.worst:34s} {m.ms:9.3f}  {ratio}")
    return lines


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from .machine import cpu_model

    return cpu_model()


def _device(arg: str) -> torch.device:
    try:
        device = torch.device(arg)
    except RuntimeError:
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {arg!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: expected cpu, cuda or cuda:N, got {arg!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {arg}: no CUDA device here (torch.cuda.is_available() is False)")
    return device


def run(args: argparse.Namespace) -> int:
    try:
        device = _device(args.device)
        for name in ("pairs", "repeats"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name}: expected a positive integer, got {getattr(args, name)}")
        if any(s < 1 for s in args.shape):
            raise ValueError(f"--shape: expected positive sizes, got {' '.join(map(str, args.shape))}")
    except ValueError as e:
        print(f"rpo-fast check: error: {e}", file=sys.stderr)
        return 2
    dtype = DTYPE_NAMES[args.dtype]
    print(f"rpo-fast check on {device_name(device)} ({device}): timed at M={args.pairs}, S={tuple(args.shape)}, "
          f"{args.dtype}, forward + backward, median of {args.repeats}; probed against the float64 reference "
          f"({verify.PROBE_PAIRS} pairs of {verify.PROBE_SHAPE}, within {verify.SLACK:g}x the rounding bound)")
    wrong = False
    for method in args.method:
        found = measure(method, device, args.pairs, args.shape, dtype, args.repeats)
        print(f"{method}:")
        print("\n".join(format_table(found)))
        print(f"  fastest correct: {fastest(found)}")
        wrong |= not all(m.correct for m in found)
    if wrong:
        print(f"a backend disagrees with the reference: please report it {verify.REPORT}")
    return 1 if wrong else 0


def as_records(measurements: List[Measurement]) -> List[Dict]:
    return [asdict(m) for m in measurements]
