"""What differs between the model families the trainer trains, one class each behind one small
interface: SD1.5 and SDXL (a UNet, DDPM noise, epsilon or v targets) and SD3 / SD3.5 and FLUX.1
(a transformer, rectified flow). ``train/loop.py`` reads the same for all four.

A family says how to load its denoiser, VAE, scheduler, tokenizers and text encoders
(``load``), how to encode prompts into the (hidden states, pooled embedding) pair the text cache
stores (``encode``) and what the denoiser takes besides them (``conditioning``), how a row's
timestep is drawn (``timestep_draw``), how a clean latent becomes the model's input and target
(``noisy_and_target``), how the denoiser is called (``predict``), which modules LoRA targets by
default and which are FSDP's units.

Flow matching as diffusers' SD3 and Flux training scripts define it: ``u`` from the weighting
scheme's density, ``index = int(u N)``, the scheduler's ``sigmas[index]`` and
``timesteps[index]``, ``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``. Schemes that
weight samples by sigma (``sigma_sqrt``, ``cosmap``) enter the per-sample errors: prediction and
target are both scaled by ``sqrt(w)``, so that ``e = w mean (pred - target)^2`` for the policy and
the reference alike (``forward.UNetInputs.scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline")


@dataclass(frozen=True)
class TimestepDraw:
    """One row's timestep index from its generator, a pure function of the generator's state
    (picklable, for DataLoader workers). ``uniform``: ``randint(0, N)`` (DDPM training);
    the flow schemes: ``u`` from the scheme's density, ``int(u N)``."""

    num_train_timesteps: int
    scheme: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __call__(self, g: torch.Generator) -> int:
        n = self.num_train_timesteps
        if self.scheme == "uniform":
            return int(torch.randint(0, n, (1,), generator=g)[0])
        if self.scheme == "logit_normal":
            u = torch.sigmoid(torch.empty(1).normal_(self.logit_mean, self.logit_std, generator=g))
        else:
            u = torch.rand(1, generator=g)
            if self.scheme == "mode":
                u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return min(int(u.item() * n), n - 1)


def loss_weighting(scheme: str, sigmas: torch.Tensor) -> Optional[torch.Tensor]:
    """diffusers' ``compute_loss_weighting_for_sd3``: None where every sample weighs 1."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return None


class Family:
    name = ""
    denoiser = "unet"  # the pipeline's subfolder of the trained model
    denoiser_label = "UNet"
    pipeline_class = ""  # diffusers pipeline that reads the outputs
    lora_targets: Tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    default_resolution = 512

    # -- loading -------------------------------------------------------------------------
    def load(self, config):
        raise NotImplementedError

    def native_resolution(self, read_json) -> Optional[int]:
        """The size the model generates at: the denoiser's ``sample_size`` times the VAE's downsampling."""
        sample = read_json(f"{self.denoiser}/config.json")["sample_size"]
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * self.vae_factor(read_json)

    @staticmethod
    def vae_factor(read_json) -> int:
        return 2 ** (len(read_json("vae/config.json")["block_out_channels"]) - 1)

    # -- prompts ---------------------------------------------------------------------------
    def tokenize(self, tokenizers, prompts: List[str]) -> List[torch.Tensor]:
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in tokenizers]

    def encode(self, encoders, input_ids, device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        raise NotImplementedError

    def conditioning(self, pooled: Optional[torch.Tensor], resolution: int) -> Optional[Dict[str, torch.Tensor]]:
        return None

    # -- the objective ------------------------------------------------------------------
    def timestep_draw(self, scheduler, config) -> TimestepDraw:
        return TimestepDraw(int(scheduler.config.num_train_timesteps))

    def noisy_and_target(self, models, latents, noise, indices):
        """(model input, timesteps the model takes, target, per-sample loss weight or None)."""
        raise NotImplementedError

    def predict(self, model, x) -> torch.Tensor:
        raise NotImplementedError

    # -- FSDP ------------------------------------------------------------------------------
    def shard_units(self, model) -> List[torch.nn.Module]:
        raise NotImplementedError


class StableDiffusion(Family):
    """SD1.5 (and SD2): a UNet on one CLIP encoder's last hidden state; DDPM noise; epsilon or v."""

    name = "sd15"
    pipeline_class = "StableDiffusionPipeline"

    def load(self, config):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        source = dict(revision=config.revision, cache_dir=config.cache_dir)
        weights = dict(source, variant=config.variant)
        path = config.pretrained_model
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **source)
        if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"pretrained_model: prediction type {scheduler.config.prediction_type!r} "
                             "is not supported (epsilon or v_prediction)")
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False, **source)]
        encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)]
        if self.name == "sdxl":
            tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False, **source))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights))
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
        return unet, load_vae(config, AutoencoderKL), scheduler, tokenizers, encoders

    def encode(self, encoders, input_ids, device):
        return encoders[0](input_ids[0].to(device))[0], None

    def noisy_and_target(self, models, latents, noise, indices):
        scheduler = models.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, indices)
        if scheduler.config.prediction_type == "epsilon":
            return noisy, indices, noise, None
        return noisy, indices, scheduler.get_velocity(latents, noise, indices), None

    def predict(self, model, x):
        kwargs = {"added_cond_kwargs": x.added} if x.added is not None else {}
        return model(x.noisy, x.timesteps, encoder_hidden_states=x.hidden, **kwargs).sample

    def shard_units(self, model):
        """Each resnet and transformer layer, then each down, mid and up block for what is left:
        SDXL's first up block alone is 1.2 B parameters (docs/memory.md)."""
        from diffusers.models.attention import BasicTransformerBlock
        from diffusers.models.resnet import ResnetBlock2D

        layers = [m for m in model.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
        mid = [model.mid_block] if getattr(model, "mid_block", None) is not None else []
        return layers + [*model.down_blocks, *mid, *model.up_blocks]


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP encoders' penultimate states side by side, the second one's pooled
    embedding and the size and crop ids as added conditioning."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    default_resolution = 1024

    def encode(self, encoders, input_ids, device):
        hidden, pooled = [], None
        for encoder, ids in zip(encoders, input_ids):
            out = encoder(ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection encoder (the last one)
        return torch.cat(hidden, dim=-1), pooled

    def conditioning(self, pooled, resolution):
        """The pooled embedding and (original height, width, crop top, left, target height,
        width), as in the diffusers SDXL DPO example."""
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=pooled.device,
                                dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], 6)}


class _Flow(Family):
    """Rectified flow on a transformer: what SD3 and Flux share."""

    denoiser = denoiser_label = "transformer"
    default_resolution = 1024
    max_sequence_length = 77

    def tokenize(self, tokenizers, prompts):
        *clips, t5 = tokenizers
        ids = super().tokenize(clips, prompts)
        length = min(self.max_sequence_length, t5.model_max_length)
        return ids + [t5(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids]

    def _load(self, config, transformer_class, clip_classes):
        """(transformer, VAE, scheduler, tokenizers, encoders): CLIP encoders of ``clip_classes``, then T5."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer, T5EncoderModel

        source = dict(revision=config.revision, cache_dir=config.cache_dir)
        weights = dict(source, variant=config.variant)
        path = config.pretrained_model
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **source)
        names = [("tokenizer", "text_encoder")] + [(f"tokenizer_{i}", f"text_encoder_{i}")
                                                  for i in range(2, len(clip_classes) + 2)]
        tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=t, use_fast=False, **source)
                      for t, _ in names[:-1]]
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder=names[-1][0], **source))  # T5: fast only
        encoders = [cls.from_pretrained(path, subfolder=e, **weights) for cls, (_, e) in zip(clip_classes, names)]
        encoders.append(T5EncoderModel.from_pretrained(path, subfolder=names[-1][1], **weights))
        vae = load_vae(config, AutoencoderKL)
        model = transformer_class.from_pretrained(path, subfolder="transformer", **weights)
        return model, vae, scheduler, tokenizers, encoders

    def timestep_draw(self, scheduler, config):
        scheme = config.weighting_scheme
        return TimestepDraw(int(scheduler.config.num_train_timesteps),
                            "uniform_u" if scheme in ("none", "sigma_sqrt", "cosmap") else scheme,
                            config.logit_mean, config.logit_std, config.mode_scale)

    def noisy_and_target(self, models, latents, noise, indices):
        scheduler = models.noise_scheduler
        sigmas = scheduler.sigmas.to(latents.device)[indices].to(latents.dtype)
        timesteps = scheduler.timesteps.to(latents.device)[indices]
        s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1 - s) * latents + s * noise
        return noisy, timesteps, noise - latents, loss_weighting(models.weighting_scheme, sigmas)

    def shard_units(self, model):
        return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]


class StableDiffusion3(_Flow):
    """SD3 / SD3.5: CLIP-L and CLIP-G penultimate states side by side, padded to T5's width,
    then T5's states after them; the two pooled embeddings side by side."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")

    def load(self, config):
        from diffusers import SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection

        return self._load(config, SD3Transformer2DModel, [CLIPTextModelWithProjection] * 2)

    def encode(self, encoders, input_ids, device):
        hidden, pooled = [], []
        for encoder, ids in zip(encoders[:2], input_ids[:2]):
            out = encoder(ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        t5 = encoders[2](input_ids[2].to(device))[0]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def conditioning(self, pooled, resolution):
        return {"pooled_projections": pooled}

    def predict(self, model, x):
        return model(hidden_states=x.noisy, timestep=x.timesteps, encoder_hidden_states=x.hidden,
                     return_dict=False, **x.added)[0]


class Flux(_Flow):
    """FLUX.1: T5's states, CLIP-L's pooled embedding, 2x2-packed latents with position ids,
    and for the guidance-distilled models (dev) the guidance scale as an input."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    max_sequence_length = 512
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")

    def __init__(self, guidance_scale: float = 3.5):
        self.guidance_scale = guidance_scale
        self.guidance = False  # whether the transformer takes the guidance scale (set by load)

    def native_resolution(self, read_json):
        return None  # FLUX.1's transformer config names no sample size: the default, 1024

    def load(self, config):
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel

        loaded = self._load(config, FluxTransformer2DModel, [CLIPTextModel])
        self.guidance = bool(loaded[0].config.guidance_embeds)
        return loaded

    def encode(self, encoders, input_ids, device):
        pooled = encoders[0](input_ids[0].to(device), output_hidden_states=False).pooler_output
        return encoders[1](input_ids[1].to(device))[0], pooled

    def conditioning(self, pooled, resolution):
        return {"pooled_projections": pooled}

    def predict(self, model, x):
        b, c, h, w = x.noisy.shape
        packed = x.noisy.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=packed.device, dtype=packed.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=packed.device, dtype=packed.dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=packed.device, dtype=packed.dtype)[None, :]
        txt_ids = torch.zeros(x.hidden.shape[1], 3, device=packed.device, dtype=packed.dtype)
        guidance = torch.full((b,), self.guidance_scale, device=packed.device) if self.guidance else None
        out = model(hidden_states=packed, timestep=x.timesteps / 1000, guidance=guidance, encoder_hidden_states=x.hidden,
                    txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3), return_dict=False, **x.added)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)  # unpacked


def load_vae(config, autoencoder_class):
    if config.pretrained_vae:  # e.g. the fp16-fix SDXL VAE: a model folder or repo of its own, as in diffusers
        return autoencoder_class.from_pretrained(config.pretrained_vae, cache_dir=config.cache_dir)
    return autoencoder_class.from_pretrained(config.pretrained_model, subfolder="vae", revision=config.revision,
                                             cache_dir=config.cache_dir, variant=config.variant)


def family_of(model_index: dict) -> str:
    """The family of a pipeline, from its ``model_index.json``."""
    name = model_index.get("_class_name", "")
    if name in SD3_PIPELINES or "text_encoder_3" in model_index:
        return "sd3"
    if name in FLUX_PIPELINES:
        return "flux"
    if name in SDXL_PIPELINES or "text_encoder_2" in model_index:
        return "sdxl"
    return "sd15"


def get_family(name: str, config=None) -> Family:
    if name == "flux":
        return Flux(config.guidance_scale if config is not None else 3.5)
    return {"sd15": StableDiffusion, "sdxl": StableDiffusionXL, "sd3": StableDiffusion3}[name]()
