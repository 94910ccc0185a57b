"""One diffusion training forward: noisy latents, conditioning, target, UNet prediction.

Shared by the training step and the reference pass, so both see the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .batches import PairBatch
from .models import Models, prompt_embeddings


@dataclass
class UNetInputs:
    noisy: torch.Tensor  # (R, C, h, w)
    timesteps: torch.Tensor  # (R,)
    hidden: torch.Tensor  # (R, L, D)
    added: Optional[Dict[str, torch.Tensor]]
    target: torch.Tensor  # (R, C, h, w): noise (epsilon) or velocity (v_prediction)


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
    scheduler = models.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if models.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    hidden, added = prompt_embeddings(models, batch.prompts, resolution, device)
    repeat = 1 if winners_only else 2
    if repeat > 1:
        hidden = hidden.repeat(repeat, 1, 1)
        if added is not None:
            added = {k: v.repeat(repeat, 1) for k, v in added.items()}
    return UNetInputs(noisy, timesteps, hidden, added, target)


def predict(unet, x: UNetInputs) -> torch.Tensor:
    kwargs = {"added_cond_kwargs": x.added} if x.added is not None else {}
    return unet(x.noisy, x.timesteps, encoder_hidden_states=x.hidden, **kwargs).sample


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The loss contract's per-sample error ``e_k = mean_d (pred - target)^2`` in fp32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
