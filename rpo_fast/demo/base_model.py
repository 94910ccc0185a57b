"""The demo's base model: a tiny Stable Diffusion 1.5-architecture pipeline for 32x32 images.

Components, all stock diffusers/transformers classes so that the unmodified trainer
(:mod:`rpo_fast.train`) and ``StableDiffusionPipeline`` run it:

* tokenizer + CLIP text encoder from :mod:`rpo_fast.demo.components` (random, frozen, as in SD
  fine-tuning): 10000 BPE merges, so every word of the task's captions is one token
  ("triangle" is two);
* an ``AutoencoderKL`` whose weights are set by hand so that it is the identity: the
  diffusion runs in pixel space (3 x 32 x 32), with no VAE to train and no reconstruction
  blur to hide a thin outline (see :func:`identity_vae`);
* a ``UNet2DConditionModel`` (16, 32, 64 channels at 32, 16, 8 pixels; cross-attention at
  8x8 and in the middle block), trained from scratch with ``method="sft"`` on the plain
  images of the training captions (:func:`pretrain`);
* SD1.5's ``DDPMScheduler`` (scaled-linear betas, epsilon prediction) for training; DDIM
  with "trailing" timesteps (the first step at t = 999) and predictions clipped to the
  pixel range for sampling (the best of the DDIM variants tried: fidelity 0.71 against
  0.62 for SD's default "leading" spacing without clipping, 24 test captions). Known flaw,
  kept: this schedule leaves 7% of the signal at its last step, and at 32x32 pixels the mean
  of the starting noise then tints the background (pink, green, beige instead of white,
  gray, black). Trial runs with two schedules that end at (almost) zero signal fixed the
  tint but, in the same 2000 steps, drew shapes less reliably (cosine schedule with
  v-prediction: validation fidelity 0.44 against 0.73) or not at all (DDPM's linear schedule
  with v-prediction); the scores look at the shape, not at the background.

The pretrained pipeline is committed under ``rpo_fast/demo/base`` (UNet and text encoder
stored in fp16, 3.4 MB); ``rpo-fast demo --pretrain`` rebuilds it from nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..atomic import removed_on_failure
from .components import build_tokenizer, tiny_scheduler, tiny_text_encoder
from .shapes import IMAGE_SIZE

PathLike = Union[str, os.PathLike]

BASE_DIR = Path(__file__).parent / "base"
TEXT_HIDDEN = 32
NUM_MERGES = 10000  # every caption word a single token but "tri angle"
MAX_TOKENS = 20  # the longest caption is 14 tokens with start and end
UNET_CHANNELS = (16, 32, 64)

# identity_vae: the hidden activations are (s x, -s x, A, -A); see its docstring.
_SIGNAL_SCALE = 1e-3
_CARRIER = 1.0
_SILU_SHIFT = 20.0  # silu(y) = y - y sigmoid(-y): below 5e-8 away from y for y >= 19
_LOGVAR = -30.0  # the posterior std exp(-15) ~ 3e-7: latent_dist.sample() == mean


def identity_vae():
    """An ``AutoencoderKL`` (one block, 8 channels, no attention, latent = 3 channels at full
    resolution) whose encode and decode are the identity to ~1e-5.

    Every residual block is zeroed (its output is its input). What remains is conv_in ->
    GroupNorm -> SiLU -> conv_out in both encoder and decoder; a GroupNorm is not linear, so
    conv_in writes each channel x as the pair (s x, -s x) plus two constant carriers (A, -A):
    the group mean is then exactly 0 and the variance A^2/4 up to a relative 1e-6, so the
    normalisation is a fixed scale, which the GroupNorm's affine undoes while shifting every
    value to ~20, where SiLU is the identity to 5e-8; conv_out shifts back. The posterior
    log-variance is the constant -30, so ``latent_dist.sample()`` equals ``latent_dist.mean``.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
        block_out_channels=[8], layers_per_block=1, latent_channels=3, norm_num_groups=1, sample_size=IMAGE_SIZE,
        scaling_factor=1.0, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder in (vae.encoder, vae.decoder):
            _set_identity_path(coder, logvar_channels=3 if coder is vae.encoder else 0)
    return vae.eval()


def _set_identity_path(coder, logvar_channels: int) -> None:
    """conv_in: x -> (s x, -s x, A, -A); residual blocks: identity (all zero); GroupNorm
    affine: back to x, shifted by 20; conv_out: the shift removed (+ constant log-variance)."""
    conv_in, norm, conv_out = coder.conv_in, coder.conv_norm_out, coder.conv_out
    for c in range(3):
        conv_in.weight[c, c, 1, 1] = _SIGNAL_SCALE
        conv_in.weight[3 + c, c, 1, 1] = -_SIGNAL_SCALE
    conv_in.bias[6], conv_in.bias[7] = _CARRIER, -_CARRIER
    std = _CARRIER / 2  # sqrt((A^2 + A^2) / 8): the group's std with the signal ~0
    norm.weight.fill_(1.0)
    norm.weight[:3] = std / _SIGNAL_SCALE
    norm.bias[:3] = _SILU_SHIFT
    for c in range(3):
        conv_out.weight[c, c, 1, 1] = 1.0
        conv_out.bias[c] = -_SILU_SHIFT
    for c in range(logvar_channels):
        conv_out.bias[3 + c] = _LOGVAR


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=list(UNET_CHANNELS),
        layers_per_block=1,
        # attention only at 8x8 (and in the middle block): half the cost of also attending at
        # 16x16 (measured), and enough to place a caption's colour and shape
        down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_untrained(save_dir: PathLike, seed: int = 0) -> Path:
    """Writes the untrained pipeline (random UNet and text encoder, identity VAE) to ``save_dir``."""
    from diffusers import StableDiffusionPipeline

    save_dir = Path(save_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(save_dir / "tokenizer", NUM_MERGES, MAX_TOKENS)
    text_encoder = tiny_text_encoder(len(tokenizer), TEXT_HIDDEN, TEXT_HIDDEN, MAX_TOKENS, with_projection=False)
    pipe = StableDiffusionPipeline(
        vae=identity_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=build_unet(seed),
        scheduler=tiny_scheduler("epsilon"), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(save_dir)
    return save_dir


def base_exists(model_dir: PathLike = BASE_DIR) -> bool:
    model_dir = Path(model_dir)
    return (model_dir / "model_index.json").exists() and any((model_dir / "unet").glob("*.safetensors"))


@dataclass
class PretrainConfig:
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    per_scene: int = 24  # jittered renderings of every training caption
    uncond_fraction: float = 0.1  # rows with an empty caption: the unconditional model for guidance
    sketch_fraction: float = 0.3  # renderings drawn as outlines: the base draws both styles
    seed: int = 0


def pretrain_run_dir(work_dir: PathLike) -> Path:
    """The trainer's folder of a pretraining in ``work_dir``: its checkpoints, continued from."""
    return Path(work_dir) / "sft"


def pretrain(out_dir: PathLike = BASE_DIR, work_dir: Optional[PathLike] = None, config: PretrainConfig = PretrainConfig(),
             progress: bool = True) -> Path:
    """Builds the base from nothing: untrained pipeline, plain-image data of the training
    captions, ``rpo_fast.train.train(method="sft")``, then the pipeline with the trained
    UNet (fp16 UNet and text encoder) written to ``out_dir``. Resumes from the last
    checkpoint in ``work_dir`` when interrupted."""
    from ..train import TrainConfig, train
    from .datasets import write_pretrain_data

    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir.parent / (out_dir.name + "-work")
    init_dir = work_dir / "untrained"
    if not (init_dir / "model_index.json").exists():
        build_untrained(init_dir, config.seed)
    data_dir = write_pretrain_data(work_dir / "data", per_scene=config.per_scene, seed=config.seed,
                                   uncond_fraction=config.uncond_fraction, sketch_fraction=config.sketch_fraction)
    result = train(TrainConfig(
        pretrained_model=str(init_dir), data=str(data_dir), output_dir=str(pretrain_run_dir(work_dir)), method="sft",
        learning_rate=config.learning_rate, lr_scheduler="cosine", lr_warmup_steps=min(100, config.steps // 10),
        max_steps=config.steps, batch_pairs=config.batch_size, resolution=IMAGE_SIZE, seed=config.seed,
        checkpoint_every=250, checkpoints_total_limit=1, resume="latest", latent_cache=str(work_dir / "latents"),
        vae_encode_batch_size=256, progress=progress, tensorboard=False, adam_weight_decay=0.0,
        hflip=False,  # captions say "on the left": a flipped image would contradict its caption
    ))
    export_pipeline(init_dir, result.output_dir / "unet", out_dir)
    return out_dir


def export_pipeline(init_dir: PathLike, unet_dir: PathLike, out_dir: PathLike) -> Path:
    """The pipeline of ``init_dir`` with the UNet of ``unet_dir``, UNet and text encoder in fp16."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out_dir = Path(out_dir)
    pipe = StableDiffusionPipeline.from_pretrained(str(init_dir), dtype=torch.float32)
    pipe.unet = UNet2DConditionModel.from_pretrained(str(unet_dir), dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with removed_on_failure(tmp):
        pipe.save_pretrained(tmp)
        # fp16 on disk halves the committed size; every loader casts back to fp32
        pipe.unet.to(torch.float16).save_pretrained(tmp / "unet")
        pipe.text_encoder.to(torch.float16).save_pretrained(tmp / "text_encoder")
        _drop_build_paths(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def _drop_build_paths(folder: Path) -> None:
    """diffusers records the folder a model was loaded from (``_name_or_path``) in the configs it
    saves: an absolute path of this machine in committed files, and unused (loading sets it anew)."""
    for path in [folder / "model_index.json", *folder.glob("*/config.json")]:
        config = json.loads(path.read_text())
        if config.pop("_name_or_path", None) is not None:
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_pipeline(model_dir: PathLike = BASE_DIR, tuned: Optional[PathLike] = None, device: str = "cpu",
                  checkpoint: Optional[PathLike] = None):
    """``StableDiffusionPipeline`` in fp32 with a DDIM scheduler, optionally tuned: ``tuned`` is
    what a fine-tune writes (a ``unet/`` folder, or a folder with LoRA weights, as
    ``rpo-fast eval --tuned`` reads them), ``checkpoint`` a ``checkpoint-<step>/`` folder of a
    run (full or LoRA)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..evaluation.generation import apply_tuned, resolve_tuned

    if not (Path(model_dir) / "model_index.json").exists():
        raise ValueError(f"model_dir: {model_dir} holds no diffusers pipeline (model_index.json); "
                         "run `rpo-fast demo --pretrain` to build the base model")
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=torch.float32)
    if tuned is not None:
        apply_tuned(pipe, *resolve_tuned(tuned))
        if getattr(pipe.unet, "peft_config", None):
            pipe.fuse_lora()  # one UNet, as fast to sample as the base
    if checkpoint is not None:
        _load_checkpoint(pipe.unet, Path(checkpoint))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", clip_sample=True,
                                               clip_sample_range=1.0, set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_checkpoint(unet, checkpoint: Path) -> None:
    """The trained weights of a run's checkpoint into ``unet``: the whole UNet, or LoRA
    adapters added as the run added them (its ``train_config.yaml``)."""
    from safetensors.torch import load_file

    from ..train import load_yaml_config
    from ..train.checkpoint import MODEL_FILE
    from ..train.families import StableDiffusion
    from ..train.models import add_lora, load_trainable_state_dict

    config = load_yaml_config(checkpoint.parent / "train_config.yaml")
    if config.lora:
        add_lora(unet, config, StableDiffusion())  # the demo's pipeline is SD1.5's architecture
    load_trainable_state_dict(unet, load_file(str(checkpoint / MODEL_FILE)), config.lora)
