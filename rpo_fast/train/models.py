"""Loading a family's components with diffusers (train/families.py), prompt encoding, LoRA
set-up and export.

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
from .config import DEFAULT_LORA_TARGETS, TrainConfig
from .families import Family, TimestepDraw, family_of, get_family


@dataclass
class Models:
    unet: torch.nn.Module  # the trained denoiser: a UNet (sd15, sdxl) or a transformer (sd3, flux)
    vae: Optional[torch.nn.Module]  # released (None) once the latent cache is filled
    noise_scheduler: object  # DDPMScheduler, or FlowMatchEulerDiscreteScheduler (sd3, flux)
    tokenizers: List[object]
    text_encoders: List[torch.nn.Module]  # released (empty) once the text cache is filled
    family: Family
    timestep_draw: TimestepDraw  # a row's timestep index from its generator
    weighting_scheme: str = "none"  # flow families: diffusers' --weighting_scheme
    text_cache: Optional[object] = None  # text_cache.TextCache: prompt embeddings read, not encoded

    @property
    def model_type(self) -> str:  # sd15 | sdxl | sd3 | flux
        return self.family.name


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
    """sd15, sdxl, sd3 or flux, from the pipeline named in ``model_index.json``."""
    _check_source(pretrained_model)
    return family_of(_model_json(pretrained_model, "model_index.json", revision, cache_dir))


def family_for(config: TrainConfig) -> Family:
    """The family of ``config.model_type``, or with ``auto`` of the pipeline's ``model_index.json``."""
    model_type = config.model_type
    if model_type == "auto":
        model_type = detect_model_type(config.pretrained_model, config.revision, config.cache_dir)
    return get_family(model_type, config)


def native_resolution(config: TrainConfig, family: Family) -> Optional[int]:
    """The image size the model generates at, in pixels (512 for SD1.5, 1024 for SDXL and SD3);
    None when the configs do not say."""
    def read_json(filename: str) -> dict:
        if filename == "vae/config.json" and config.pretrained_vae:
            return _model_json(config.pretrained_vae, "config.json", None, config.cache_dir)
        return _model_json(config.pretrained_model, filename, config.revision, config.cache_dir)

    try:
        return family.native_resolution(read_json)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def load_models(config: TrainConfig, family: Optional[Family] = None) -> Models:
    """The denoiser (trainable, fp32), VAE, noise scheduler, tokenizers and text encoders
    (frozen), as the model's family (default: :func:`family_for` ``config``) loads them."""
    _check_source(config.pretrained_model)
    family = family or family_for(config)
    denoiser, vae, scheduler, tokenizers, encoders = family.load(config)
    for frozen in [vae, *encoders]:
        frozen.requires_grad_(False).eval()
    if any(p.dtype != torch.float32 for p in denoiser.parameters()):
        denoiser.to(torch.float32)  # trainable weights in fp32 whatever the variant; autocast does the rest
    return Models(denoiser, vae, scheduler, tokenizers, encoders, family,
                  family.timestep_draw(scheduler, config), config.weighting_scheme)


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


@torch.no_grad()
def encode_prompts(models: Models, prompts: List[str], device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hidden states, pooled embedding or None) of ``prompts``, as the family's pipeline
    encodes them: what the text cache stores."""
    ids = models.family.tokenize(models.tokenizers, prompts)
    return models.family.encode(models.text_encoders, ids, device)


def prompt_embeddings(models: Models, prompts: List[str], resolution: int, device):
    """(hidden states, the family's added conditioning or None) of ``prompts``: read from the
    text cache when the run has one, else encoded now."""
    if models.text_cache is not None:
        hidden, pooled = models.text_cache.lookup(prompts, device)
    else:
        hidden, pooled = encode_prompts(models, prompts, device)
    return hidden, models.family.conditioning(pooled, resolution) if pooled is not None else None


def lora_targets(config: TrainConfig, family: Family) -> List[str]:
    """``--lora-target-modules``, or when left at its default the family's attention
    projections (its diffusers training script's)."""
    targets = list(config.lora_target_modules)
    return list(family.lora_targets) if targets == list(DEFAULT_LORA_TARGETS) else targets


def add_lora(unet: torch.nn.Module, config: TrainConfig, family: Family) -> None:
    """Adds a peft LoRA adapter (as the diffusers LoRA examples): B = 0, so training starts
    from the pretrained model exactly; only adapter weights require grad."""
    from peft import LoraConfig

    targets = lora_targets(config, family)

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        init_lora_weights="gaussian",
        target_modules=targets,
    ))
    for p in unet.parameters():  # adapters in fp32 even if the base weights are not
        if p.requires_grad:
            p.data = p.data.float()
    if not any(p.requires_grad for p in unet.parameters()):
        raise ValueError(f"lora_target_modules: no {family.denoiser} module matches {targets}")


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
    """Diffusers-format outputs: ``unet/`` or ``transformer/`` (save_pretrained) for full fine-tuning, or
    ``pytorch_lora_weights.safetensors`` that ``pipeline.load_lora_weights(output_dir)`` reads.
    ``state``: the full state dict of a sharded ``unet`` (``--fsdp``), gathered by the caller.
    Written to a temporary name first, then renamed, so a crash never leaves half a file."""
    import shutil

    output_dir.mkdir(parents=True, exist_ok=True)
    family = models.family
    if config.lora:
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(unet, state_dict=state)
        if family.denoiser == "unet":  # the UNet loaders read diffusers' key names; the transformers' PEFT's
            layers = convert_state_dict_to_diffusers(layers)
        layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
        metadata = unet.peft_config["default"].to_dict()
        # peft keeps the targets as a set, whose order follows the process's string hashing: sorted,
        # the same run writes the same metadata (safetensors 0.8 still writes the header's two
        # metadata entries in its own per-process order; the tensors' bytes do not change)
        metadata["target_modules"] = sorted(metadata["target_modules"])
        tmp = output_dir / ".lora.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with removed_on_failure(tmp):
            getattr(diffusers, family.pipeline_class).save_lora_weights(
                tmp, safe_serialization=True, **{f"{family.denoiser}_lora_layers": layers,
                                                 f"{family.denoiser}_lora_adapter_metadata": metadata})
            written = []
            for f in tmp.iterdir():
                f.replace(output_dir / f.name)
                written.append(output_dir / f.name)
            tmp.rmdir()
        return written
    name = family.denoiser
    tmp, final, old = output_dir / f".{name}.tmp", output_dir / name, output_dir / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if state is not None:  # a plain model of the gathered weights: a sharded one saves its shards
        import diffusers

        plain = getattr(diffusers, unet.config["_class_name"]).from_config(unet.config)
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
