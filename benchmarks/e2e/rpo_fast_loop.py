"""rpo-fast's own training step (rpo_fast.train), driven step by step for the benchmark.

``prepare`` is the trainer's real set-up (latent cache, reference, optimizer, compile on
CUDA) and ``train_step`` its real optimizer step, so what is timed is what ``rpo-fast train``
runs. With ``precompute_ref`` the reference errors of every step are computed during set-up;
the time of that pass is measured here (``ref_precompute_s``) so that throughput can be
reported with it spread over the steps it serves: the trainer's own phase clock
(rpo_fast/train/phases.py) times it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch


class RpoFastLoop:
    def __init__(self, model_dir: str, data: str, *, pairs: int, resolution: int, device: torch.device,
                 method: str, mixed_precision: str, seed: int, workdir: str, total_steps: int,
                 precompute_ref: bool = False):
        from rpo_fast.train import TrainConfig
        from rpo_fast.train import loop as train_loop

        self._train_loop = train_loop
        self.total_steps = total_steps
        workdir = Path(workdir)
        config = TrainConfig(
            pretrained_model=model_dir, data=data, output_dir=str(workdir / "out"), method=method,
            batch_pairs=pairs, resolution=resolution, mixed_precision=mixed_precision, device=str(device),
            seed=seed, max_steps=total_steps, precompute_ref=precompute_ref,
            latent_cache=str(workdir / "latents"),  # per run: set-up times stay comparable
            checkpoint_every=0, save_final=False, progress=False, log_every=total_steps,
            lr_scheduler="constant",  # as the baseline
        )
        self.run = train_loop.prepare(config)
        if device.type == "cuda":
            torch.cuda.synchronize()
        self.batches = train_loop.step_batches(self.run, 0, total_steps)

    def step(self) -> float:
        return self._train_loop.train_step(self.run, self.batches)["loss"]

    def details(self) -> Dict[str, object]:
        reference = self.run.reference
        return {
            "reference": reference.kind if reference is not None else None,
            # the precomputed pass, as the trainer's own clock timed it (set-up of the other references: 0 here)
            "ref_precompute_s": (self.run.phases.seconds["reference set-up"]
                                 if reference is not None and reference.kind == "precomputed" else 0.0),
            "compiled": self.run.forward_model is not self.run.unet,
            "loss_backend": self.run.config.backend,
        }
