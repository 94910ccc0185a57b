"""Tiny Stable Diffusion 1.5-like and XL-like pipelines, built from configs and saved locally:
fixtures of the tests and the benchmarks, not part of any command.

No model hub is reachable on the machines that build and test rpo-fast, so the tests and the
benchmarks build these: the real architectures (UNet2DConditionModel,
CLIPTextModel(WithProjection), AutoencoderKL, DDPMScheduler) at toy sizes, saved with
``save_pretrained`` in the diffusers pipeline layout, so that the real loading code
(``from_pretrained`` of a folder) is what reads them. Needs rpo-fast's [train] and [eval]
extras (diffusers, transformers; open_clip's BPE vocabulary for the tokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rpo_fast.demo.components import PathLike, build_tokenizer, tiny_scheduler, tiny_text_encoder


def _vae(latent_channels: int = 4, block_out_channels: Sequence[int] = (16, 32)):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(block_out_channels),
        block_out_channels=list(block_out_channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def _unet(sample_size: int, block_out_channels: Sequence[int], **extra):
    """A UNet2DConditionModel with SD's block layout (cross-attention below the top level)."""
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=list(block_out_channels),
        layers_per_block=1,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"],
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


@dataclass(frozen=True)
class TinySizes:
    """The sizes of a tiny pipeline (the keyword arguments of both builders)."""

    sample_size: int = 8
    block_out_channels: Sequence[int] = (32, 64)
    text_hidden: int = 32
    text_layers: int = 2
    num_merges: int = 1000
    prediction_type: str = "epsilon"
    seed: int = 0


def build_tiny_sd15(save_dir: PathLike, **sizes) -> Path:
    """Saves a tiny SD1.5-architecture pipeline (unet, vae, text_encoder, tokenizer,
    scheduler) to ``save_dir`` and returns it; ``sizes``: TinySizes' fields. The tiny VAE (two
    blocks) downsamples by 2, so the UNet's native images are ``2 * sample_size`` pixels (any
    multiple of 4 works)."""
    from diffusers import StableDiffusionPipeline

    z = TinySizes(**sizes)
    torch.manual_seed(z.seed)
    save_dir = Path(save_dir)
    tokenizer = build_tokenizer(save_dir / "tokenizer", z.num_merges)
    text_encoder = tiny_text_encoder(len(tokenizer), z.text_hidden, z.text_hidden, 77, with_projection=False,
                                     num_layers=z.text_layers)
    unet = _unet(z.sample_size, z.block_out_channels, cross_attention_dim=z.text_hidden)
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(z.prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(save_dir)
    return save_dir


def build_tiny_sdxl(save_dir: PathLike, **sizes) -> Path:
    """Saves a tiny SDXL-architecture pipeline: two text encoders (the second with a
    projection giving the pooled embedding), ``text_time`` added conditioning; ``sizes``:
    TinySizes' fields."""
    from diffusers import StableDiffusionXLPipeline

    z = TinySizes(**sizes)
    torch.manual_seed(z.seed)
    save_dir = Path(save_dir)
    tokenizer = build_tokenizer(save_dir / "tokenizer", z.num_merges)
    tokenizer_2 = build_tokenizer(save_dir / "tokenizer_2", z.num_merges)
    text_encoder = tiny_text_encoder(len(tokenizer), z.text_hidden, z.text_hidden, 77, with_projection=False,
                                     num_layers=z.text_layers)
    text_encoder_2 = tiny_text_encoder(len(tokenizer_2), z.text_hidden, z.text_hidden, 77, with_projection=True,
                                       num_layers=z.text_layers)
    time_embed_dim = 8
    unet = _unet(
        z.sample_size,
        z.block_out_channels,
        cross_attention_dim=2 * z.text_hidden,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding + 6 time ids (original size, crop offset, target size)
        projection_class_embeddings_input_dim=z.text_hidden + 6 * time_embed_dim,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=tiny_scheduler(z.prediction_type),
    )
    pipe.save_pretrained(save_dir)
    return save_dir
