"""What each run of the suite measures: the loss cases, the end-to-end configurations, the timing budget.

Three profiles: ``full`` (``make bench``), ``quick`` (the loss targets of the kernel issue and
one end-to-end point, baseline against rpo-fast's default, about a minute) and ``smoke`` (tiny shapes, one round: the test that
keeps the suite from rotting).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Tuple

import torch

from rpo_fast._types import DTYPE_NAMES

# Latent shapes (C, H, W): SD1.5 at 512 px, SDXL at 1024 px, and a toy one for the smoke run.
LATENT_SHAPES: Dict[str, Tuple[int, ...]] = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128), "tiny": (4, 8, 8)}
DTYPES: Dict[str, torch.dtype] = {name: DTYPE_NAMES[name] for name in ("fp32", "bf16")}  # the measured ones
PAIRS = (1, 4, 16, 64)
METHODS = ("rpo", "dpo")


@dataclass(frozen=True)
class LossCase:
    latents: str  # a key of LATENT_SHAPES
    pairs: int  # M: the batch holds 2M samples
    dtype: str  # a key of DTYPES
    method: str  # rpo | dpo

    @property
    def shape(self) -> Tuple[int, ...]:
        return (2 * self.pairs, *LATENT_SHAPES[self.latents])

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def minimal_bytes(self) -> int:
        """Read model_pred, ref_pred and target once, write the gradient once."""
        return 4 * self.numel * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def id(self) -> str:
        return f"{self.latents}-M{self.pairs}-{self.dtype}-{self.method}"


# The Diffusion-DPO-style baseline; rpo-fast with a frozen reference copy (its default for full
# fine-tuning); rpo-fast with the reference errors precomputed before training.
E2E_LOOPS = ("baseline", "rpo_fast", "rpo_fast_precompute_ref")


@dataclass(frozen=True)
class E2EConfig:
    loop: str  # one of E2E_LOOPS
    pairs: int  # preference pairs per step
    resolution: int  # pixels
    sweep: str  # batch | resolution: which scaling series the point belongs to
    warmup_steps: int
    timed_steps: int

    @property
    def id(self) -> str:
        return f"{self.loop}-B{self.pairs}-R{self.resolution}"


@dataclass(frozen=True)
class Timing:
    """Rounds per loss case (one call of each implementation): enough for ``target_s`` seconds
    of calls per implementation on average, within the bounds."""

    target_s: float
    min_rounds: int
    max_rounds: int


@dataclass(frozen=True)
class Profile:
    name: str
    loss_cases: Tuple[LossCase, ...]
    e2e_configs: Tuple[E2EConfig, ...]
    timing: Timing
    compile_backend: str = "inductor"
    e2e_data_rows: int = 16  # pairs in the synthetic dataset (at least two batches of the largest config)


def _loss_grid(latents, pairs, dtypes, methods) -> Tuple[LossCase, ...]:
    return tuple(LossCase(*c) for c in itertools.product(latents, pairs, dtypes, methods))


def _e2e_grid(batches, resolutions, base_pairs, base_resolution, warmup, timed, loops=E2E_LOOPS) -> Tuple[E2EConfig, ...]:
    points = [(b, base_resolution, "batch") for b in batches]
    points += [(base_pairs, r, "resolution") for r in resolutions if r != base_resolution]
    return tuple(E2EConfig(loop, b, r, sweep, warmup, timed) for b, r, sweep in points for loop in loops)


def e2e_grid_for(device: torch.device, name: str) -> Tuple[E2EConfig, ...]:
    if name == "smoke":
        return _e2e_grid((1,), (), 1, 32, warmup=0, timed=1)
    if name == "quick":
        return _e2e_grid((2,), (), 2, 64, warmup=1, timed=3, loops=E2E_LOOPS[:2])
    if device.type == "cuda":
        # Fewer points than on the CPU: every rpo-fast run compiles its UNet (tens of seconds).
        return _e2e_grid((2, 8, 32), (128, 256, 512), 8, 128, warmup=5, timed=20)
    # The tiny model is 64 px natively; 2 pairs is the sweep's base batch.
    return _e2e_grid((1, 2, 4, 8), (32, 64, 128), 2, 64, warmup=2, timed=8)


def get_profile(name: str, device: torch.device) -> Profile:
    if name == "full":
        return Profile(
            name,
            _loss_grid(("sd15", "sdxl"), PAIRS, tuple(DTYPES), METHODS),
            e2e_grid_for(device, name),
            Timing(target_s=1.0, min_rounds=10, max_rounds=300),
        )
    if name == "quick":
        return Profile(
            name,
            _loss_grid(("sdxl",), (16,), tuple(DTYPES), ("rpo",)),
            e2e_grid_for(device, name),
            Timing(target_s=0.4, min_rounds=3, max_rounds=50),
        )
    if name == "smoke":
        # aot_eager: torch.compile's tracing and autograd without inductor's C++ build, which
        # alone takes ~25 s on a cold cache; the full run compiles with inductor.
        return Profile(
            name,
            _loss_grid(("tiny",), (2,), ("fp32",), METHODS) + _loss_grid(("tiny",), (2,), ("bf16",), ("rpo",)),
            e2e_grid_for(device, name),
            Timing(target_s=0.0, min_rounds=1, max_rounds=1),
            compile_backend="aot_eager",
            e2e_data_rows=2,
        )
    raise ValueError(f"profile: expected one of full, quick, smoke, got {name!r}")


PROFILE_NAMES = ("full", "quick", "smoke")
