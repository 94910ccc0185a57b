"""Loading SD1.5 / SDXL components with diffusers, prompt encoding, LoRA set-up and export.

Everything is loaded with ``from_pretrained`` from a hub id or a local pipeline folder
(``model_index.json`` plus one subfolder per component), as the diffusers examples do.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..atomic import removed_on_failure
from .config import TrainConfig

_SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")


@dataclass
class Models:
    model_type: str  # sd15 | sdxl
    unet: torch.nn.Module
    vae: Optional[torch.nn.Module]  # released (None) once the latent cache is filled
    noise_scheduler: object  # DDPMScheduler: add_noise, get_velocity, prediction_type
    tokenizers: List[object]
    text_encoders: List[torch.nn.Module]  # released (empty) once the text cache is filled
    text_cache: Optional[object] = None  # text_cache.TextCache: prompt embeddings read, not encoded

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)


def check_source(what: str, source: str, marker: str) -> Path:
    """A name that looks local (:func:`rpo_fast.data.looks_local`) must be a folder holding
    ``marker``, and is never looked up on the hub (whose client would report a confusing
    repo-id error, after its retries)."""
    from ..data import looks_local

    local = Path(source).expanduser()
    if local.exists() or looks_local(source):
        kind = "a diffusers pipeline folder" if marker == "model_index.json" else "a diffusers model folder"
        if not local.is_dir():
            raise ValueError(f"{what}: no folder at {local} (expected {kind} or a hub id such as owner/name)")
        if not (local / marker).is_file():
            raise ValueError(f"{what}: {local} has no {marker}; expected {kind}")
    return local


def _check_source(pretrained_model: str) -> Path:
    return check_source("pretrained_model", pretrained_model, "model_index.json")


def _model_json(source: str, filename: str, revision: Optional[str], cache_dir: Optional[str]) -> dict:
    """A JSON file of a checked (:func:`check_source`) model folder or hub repo
    (``model_index.json``, ``unet/config.json``, ...), read without loading any weights."""
    local = Path(source).expanduser()
    if local.is_dir():
        path = local / filename
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, filename, revision=revision, cache_dir=cache_dir))
    return json.loads(path.read_text())


def detect_model_type(pretrained_model: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> str:
    """sd15 or sdxl, from the pipeline class named in ``model_index.json``."""
    _check_source(pretrained_model)
    index = _model_json(pretrained_model, "model_index.json", revision, cache_dir)
    if index.get("_class_name", "") in _SDXL_PIPELINES or "text_encoder_2" in index:
        return "sdxl"
    return "sd15"


def native_resolution(config: TrainConfig) -> Optional[int]:
    """The image size the model generates at, in pixels: the UNet's ``sample_size`` times the
    VAE's downsampling (512 for SD1.5, 1024 for SDXL); None when the configs do not say."""
    try:
        unet = _model_json(config.pretrained_model, "unet/config.json", config.revision, config.cache_dir)
        if config.pretrained_vae:
            vae = _model_json(config.pretrained_vae, "config.json", None, config.cache_dir)
        else:
            vae = _model_json(config.pretrained_model, "vae/config.json", config.revision, config.cache_dir)
        sample = unet["sample_size"]
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def load_models(config: TrainConfig) -> Models:
    """UNet (trainable, fp32), VAE, noise scheduler, tokenizer(s) and text encoder(s) (frozen)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    _check_source(config.pretrained_model)
    model_type = config.model_type
    if model_type == "auto":
        model_type = detect_model_type(config.pretrained_model, config.revision, config.cache_dir)
    source = dict(revision=config.revision, cache_dir=config.cache_dir)
    weights = dict(source, variant=config.variant)
    path = config.pretrained_model
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **source)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"pretrained_model: prediction type {noise_scheduler.config.prediction_type!r} "
                         "is not supported (epsilon or v_prediction)")
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", use_fast=False, **source)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)]
    if model_type == "sdxl":
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", use_fast=False, **source))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights))
    if config.pretrained_vae:  # e.g. the fp16-fix SDXL VAE: a model folder or repo of its own, as in diffusers
        vae = AutoencoderKL.from_pretrained(config.pretrained_vae, cache_dir=config.cache_dir)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights)
    for frozen in [vae, *text_encoders]:
        frozen.requires_grad_(False).eval()
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet.to(torch.float32)  # trainable weights in fp32 whatever the variant; autocast does the rest
    return Models(model_type, unet, vae, noise_scheduler, tokenizers, text_encoders)


def module_identity(module: torch.nn.Module) -> str:
    """A content hash of a module's config and weights: a model's identity in cache keys."""
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    # diffusers' configs are mappings, transformers' have to_dict()
    settings = config.to_dict() if hasattr(config, "to_dict") else dict(config) if config is not None else {}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def tokenize(tokenizers: List[object], prompts: List[str]) -> List[torch.Tensor]:
    return [
        tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
            return_tensors="pt").input_ids
        for tok in tokenizers
    ]


@torch.no_grad()
def encode_prompts(models: Models, input_ids: List[torch.Tensor], resolution: int, device) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
    """Token ids -> (encoder_hidden_states, added_cond_kwargs or None), as the pipelines do:
    SD1.5 takes the last hidden state; SDXL concatenates the penultimate hidden states of
    both encoders and adds the second encoder's pooled embedding and the size/crop ids."""
    if models.model_type == "sd15":
        return models.text_encoders[0](input_ids[0].to(device))[0], None
    hidden = []
    pooled = None
    for encoder, ids in zip(models.text_encoders, input_ids):
        out = encoder(ids.to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of the projection encoder (the last one)
    return torch.cat(hidden, dim=-1), sdxl_added_conditioning(pooled, resolution)


def sdxl_added_conditioning(pooled: torch.Tensor, resolution: int) -> Dict[str, torch.Tensor]:
    """SDXL's added_cond_kwargs: the pooled text embedding and the size and crop ids
    (original height, width, crop top, left, target height, width), as in the diffusers SDXL
    DPO example."""
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=pooled.device,
                            dtype=pooled.dtype)
    return {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], 6)}


def prompt_embeddings(models: Models, prompts: List[str], resolution: int, device):
    """(encoder_hidden_states, added_cond_kwargs or None) of ``prompts``: read from the text
    cache when the run has one, else encoded now."""
    if models.text_cache is not None:
        return models.text_cache.lookup(prompts, resolution, device)
    return encode_prompts(models, tokenize(models.tokenizers, prompts), resolution, device)


def add_lora(unet: torch.nn.Module, config: TrainConfig) -> None:
    """Adds a peft LoRA adapter (as the diffusers LoRA examples): B = 0, so training starts
    from the pretrained model exactly; only adapter weights require grad."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        init_lora_weights="gaussian",
        target_modules=list(config.lora_target_modules),
    ))
    for p in unet.parameters():  # adapters in fp32 even if the base weights are not
        if p.requires_grad:
            p.data = p.data.float()
    if not any(p.requires_grad for p in unet.parameters()):
        raise ValueError(f"lora_target_modules: no UNet module matches {config.lora_target_modules}")


def trainable_state_dict(unet: torch.nn.Module, lora: bool) -> Dict[str, torch.Tensor]:
    """What a checkpoint needs to restore the model: adapter weights, or the whole UNet."""
    if lora:
        from peft.utils import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    return {k: v.detach() for k, v in unet.state_dict().items()}


def load_trainable_state_dict(unet: torch.nn.Module, state: Dict[str, torch.Tensor], lora: bool) -> None:
    if lora:
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(unet, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint: unexpected LoRA keys {unexpected[:5]}...")
        return
    unet.load_state_dict(state, strict=True)


def save_trained(unet: torch.nn.Module, models: Models, config: TrainConfig, output_dir: Path,
                 state: Optional[Dict[str, torch.Tensor]] = None) -> List[Path]:
    """Diffusers-format outputs: ``unet/`` (save_pretrained) for full fine-tuning, or
    ``pytorch_lora_weights.safetensors`` that ``pipeline.load_lora_weights(output_dir)`` reads.
    ``state``: the full state dict of a sharded ``unet`` (``--fsdp``), gathered by the caller.
    Written to a temporary name first, then renamed, so a crash never leaves half a file."""
    import shutil

    output_dir.mkdir(parents=True, exist_ok=True)
    if config.lora:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=state))
        layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
        pipeline_class = StableDiffusionXLPipeline if models.model_type == "sdxl" else StableDiffusionPipeline
        tmp = output_dir / ".lora.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with removed_on_failure(tmp):
            pipeline_class.save_lora_weights(
                tmp, unet_lora_layers=layers, safe_serialization=True,
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            )
            written = []
            for f in tmp.iterdir():
                f.replace(output_dir / f.name)
                written.append(output_dir / f.name)
            tmp.rmdir()
        return written
    tmp, final, old = output_dir / ".unet.tmp", output_dir / "unet", output_dir / ".unet.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if state is not None:  # a plain UNet of the gathered weights: a sharded one saves its shards
        from diffusers import UNet2DConditionModel

        plain = UNet2DConditionModel.from_config(unet.config)
        plain.load_state_dict(state)
        unet = plain
    with removed_on_failure(tmp):
        unet.save_pretrained(tmp, safe_serialization=True)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return [final]
