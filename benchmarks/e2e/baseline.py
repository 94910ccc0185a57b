"""The training step as the public Diffusion-DPO trainers write it: the end-to-end baseline.

Kept close to diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
and the original Diffusion-DPO code (full fine-tuning): every step decodes the pair's images,
resizes, crops and flips them, tokenizes and encodes the prompts, VAE-encodes both images,
runs the trained UNet and a second, frozen reference UNet, computes the eager loss
(benchmarks/eager_loss.py), clips the gradient norm and steps AdamW. No torch.compile.
Data is read in the training process (the trainer's default ``dataloader_num_workers=0``).
"""

from __future__ import annotations

import contextlib
from typing import List

import numpy as np
import torch
from PIL import Image

from benchmarks.eager_loss import eager_dpo_loss, eager_rpo_loss
from rpo_fast._types import DTYPE_NAMES
from rpo_fast.data import load_preference_dataset

BETA_DPO = 5000.0  # equals rpo-fast's default beta of 2500 (eager_loss.py)


def train_transform(image: Image.Image, resolution: int, flip: bool) -> torch.Tensor:
    """Resize (shorter side, bilinear), center crop, optional horizontal flip, to [-1, 1]:
    the trainer's torchvision pipeline, written with PIL."""
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - 0.5) / 0.5


class DiffusionDPOBaseline:
    """``step()`` runs one optimizer step on the next ``pairs`` preference pairs."""

    def __init__(
        self,
        model_dir: str,
        data: str,
        *,
        pairs: int,
        resolution: int,
        device: torch.device,
        method: str = "rpo",
        mixed_precision: str = "no",
        learning_rate: float = 1e-5,
        max_grad_norm: float = 1.0,
        seed: int = 0,
    ):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if method not in ("rpo", "dpo"):
            raise ValueError(f"method: expected rpo or dpo, got {method!r}")
        if mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision: expected no, bf16 or fp16, got {mixed_precision!r}")
        torch.manual_seed(seed)
        self.pairs, self.resolution, self.device, self.method = pairs, resolution, device, method
        self.max_grad_norm = max_grad_norm
        self.rng = np.random.default_rng(seed)
        weight_dtype = DTYPE_NAMES.get(mixed_precision, torch.float32)  # "no": float32
        self.autocast_dtype = None if mixed_precision == "no" else weight_dtype

        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        self.ref_unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
        self.noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        for frozen in (self.text_encoder, self.vae, self.ref_unet):
            frozen.requires_grad_(False)
            frozen.to(device, dtype=weight_dtype)
        self.unet.to(device).train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

        self.dataset = load_preference_dataset(data)
        if len(self.dataset) < pairs:
            raise ValueError(f"data: {len(self.dataset)} pairs, fewer than one batch of {pairs}")
        self._order: List[int] = []

    def _next_rows(self) -> List[int]:
        if len(self._order) < self.pairs:  # a new epoch in a fresh shuffle (DataLoader(shuffle=True))
            self._order = list(self.rng.permutation(len(self.dataset)))
        rows, self._order = self._order[: self.pairs], self._order[self.pairs :]
        return rows

    def _batch(self):
        prompts, winners, losers = [], [], []
        while len(prompts) < self.pairs:
            for row in self._next_rows():  # a row with an unreadable image is skipped
                pair = self.dataset.get_pair(int(row)) if len(prompts) < self.pairs else None
                if pair is None:
                    continue
                prompts.append(pair.prompt)
                winners.append(train_transform(pair.chosen, self.resolution, bool(self.rng.random() < 0.5)))
                losers.append(train_transform(pair.rejected, self.resolution, bool(self.rng.random() < 0.5)))
        # The trainer stacks (winner, loser) on channels, then splits: winners first.
        pixel_values = torch.cat([torch.stack(winners), torch.stack(losers)], dim=1)
        input_ids = self.tokenizer(
            prompts, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True,
            return_tensors="pt",
        ).input_ids
        return pixel_values, input_ids

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self) -> float:
        pixel_values, input_ids = self._batch()
        pixel_values = pixel_values.to(self.device, dtype=self.vae.dtype)
        feed_pixel_values = torch.cat(pixel_values.chunk(2, dim=1))

        latents = self.vae.encode(feed_pixel_values).latent_dist.sample()
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents).chunk(2)[0].repeat(2, 1, 1, 1)
        bsz = latents.shape[0] // 2
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device, dtype=torch.long
        ).repeat(2)
        noisy_model_input = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(input_ids.to(self.device))[0].repeat(2, 1, 1)

        with self._autocast():
            model_pred = self.unet(noisy_model_input, timesteps, encoder_hidden_states).sample
            with torch.no_grad():
                ref_pred = self.ref_unet(noisy_model_input, timesteps, encoder_hidden_states).sample.detach()
        if self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)

        if self.method == "rpo":  # uniform weights, as rpo-fast without an embedding cache
            loss, logs = eager_rpo_loss(model_pred, target, ref_pred, beta_dpo=BETA_DPO)
        else:
            loss, logs = eager_dpo_loss(model_pred, target, ref_pred, beta_dpo=BETA_DPO)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        # The trainer logs these every step (its progress bar), which waits for the device.
        logged = {"loss": loss.item(), **{name: value.item() for name, value in logs.items()}}
        return logged["loss"]
