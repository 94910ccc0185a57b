"""One diffusion training forward: noisy latents, conditioning, target, the denoiser's
prediction, as the model's family defines them (train/families.py).

Shared by the training step and the reference pass, so both see the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .batches import PairBatch
from .families import Family
from .models import Models, prompt_embeddings


@dataclass
class UNetInputs:
    noisy: torch.Tensor  # (R, C, h, w)
    timesteps: torch.Tensor  # (R,)
    hidden: torch.Tensor  # (R, L, D)
    added: Optional[Dict[str, torch.Tensor]]
    target: torch.Tensor  # (R, C, h, w): noise (epsilon), velocity (v_prediction) or noise - x0 (flow)
    family: Family
    scale: Optional[torch.Tensor] = None  # (R,) sqrt of a flow scheme's loss weight, on target and prediction


def unet_inputs(models: Models, batch: PairBatch, device: torch.device, resolution: int,
                winners_only: bool = False) -> UNetInputs:
    """Rows ``(2M, ...)`` winners first (or ``(M, ...)`` winners only, for sft). Both images of
    a pair carry the same noise and timestep (set by the batch) and the same prompt."""
    latents = batch.latents.to(device, non_blocking=True)
    noise = batch.noise.to(device, non_blocking=True)
    timesteps = batch.timesteps.to(device, non_blocking=True)
    if winners_only:
        m = latents.shape[0] // 2
        latents, noise, timesteps = latents[:m], noise[:m], timesteps[:m]
    noisy, timesteps, target, weight = models.family.noisy_and_target(models, latents, noise, timesteps)
    scale = None
    if weight is not None:  # e = w mean (pred - target)^2: both scaled by sqrt(w), in predict too
        scale = weight.sqrt().view(-1, *([1] * (target.dim() - 1)))
        target = target * scale
    hidden, added = prompt_embeddings(models, batch.prompts, resolution, device)
    repeat = 1 if winners_only else 2
    if repeat > 1:
        hidden = hidden.repeat(repeat, 1, 1)
        if added is not None:
            added = {k: v.repeat(repeat, 1) for k, v in added.items()}
    return UNetInputs(noisy, timesteps, hidden, added, target, models.family, scale)


def predict(model, x: UNetInputs) -> torch.Tensor:
    pred = x.family.predict(model, x)
    return pred if x.scale is None else pred * x.scale


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss contract's per-sample error ``e_k = mean_d (pred - target)^2`` in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
