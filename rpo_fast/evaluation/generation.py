"""Prompt files, base / tuned pipelines (SD1.5, SDXL, SD3 / SD3.5, FLUX.1), seeded generation.

The tuned model is what ``rpo-fast train`` writes, or any diffusers layout:

* ``pipeline``: a full pipeline folder (``model_index.json``);
* ``unet`` / ``transformer``: a folder with ``unet/`` or ``transformer/`` (a full fine-tune's
  output), or such a model folder itself; it replaces the base pipeline's, everything else is
  shared;
* ``lora``: LoRA weights that ``pipeline.load_lora_weights`` reads (a folder with
  ``pytorch_lora_weights.safetensors`` or one ``.safetensors`` file), loaded onto the base.

Seeds: image k of prompt i starts from the noise of a CPU generator seeded with
``seed * 100003 + i * 101 + k`` (:func:`image_seed`), for the base and the tuned model alike,
so both start from the same noise on any device and at any batch size. The seed of image
(i, k) does not depend on how many prompts or images per prompt are asked for: a run with
more prompts or more images per prompt extends an earlier one without changing its images.
The price is a limit of ``MAX_IMAGES_PER_PROMPT`` (101) images per prompt, beyond which
prompts would share seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from PIL import Image

from .._types import DTYPE_NAMES
from .sources import check_local_or_hub, hub_alternative

TUNED_KINDS = ("auto", "pipeline", "unet", "transformer", "lora")
# The denoisers a full fine-tune writes, by config class: the pipeline attribute they replace.
DENOISERS = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "transformer",
             "FluxTransformer2DModel": "transformer"}
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline")
DTYPES = DTYPE_NAMES  # --dtype names
_PROMPT_KEYS = ("prompt", "caption", "text")


def read_prompts(path) -> List[str]:
    """One prompt a line (``.txt`` and anything not ``.jsonl``), or ``.jsonl`` lines that are
    objects with a ``prompt`` (or ``caption`` / ``text``) key, or JSON strings. Blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts: no file at {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e})") from None
            if isinstance(record, dict):
                key = next((k for k in _PROMPT_KEYS if k in record), None)
                if key is None:
                    raise ValueError(f"{path}:{number}: expected a key among {list(_PROMPT_KEYS)}")
                record = record[key]
            if not isinstance(record, str):
                raise ValueError(f"{path}:{number}: expected a prompt string, got {type(record).__name__}")
            prompts.append(record)
        else:
            prompts.append(line.strip())
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompts")
    return prompts


def _denoiser_kind(folder: Path) -> Optional[str]:
    """``unet`` or ``transformer`` when ``folder`` holds a denoiser's config, else None."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return DENOISERS.get(json.loads(config.read_text()).get("_class_name"))
    except json.JSONDecodeError:
        return None


def _denoiser(path: Path, kind: str) -> Optional[Path]:
    return next((p for p in (path / kind, path) if _denoiser_kind(p) == kind), None)


def resolve_tuned(path, kind: str = "auto") -> Tuple[str, Path]:
    """``(kind, path to load)`` of a tuned model; see the module docstring for the layouts."""
    if kind not in TUNED_KINDS:
        raise ValueError(f"--tuned-type: expected one of {list(TUNED_KINDS)}, got {kind!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--tuned: nothing at {path} (the tuned model is a local path: download a hub "
                                "model first)")
    is_lora_file = path.is_file() and path.suffix in (".safetensors", ".bin")
    has_lora = path.is_dir() and (any(path.glob("*lora*.safetensors")) or any(path.glob("*lora*.bin")))
    found = {
        "pipeline": path if (path / "model_index.json").is_file() else None,
        "unet": _denoiser(path, "unet"),
        "transformer": _denoiser(path, "transformer"),
        "lora": path if is_lora_file or has_lora else None,
    }
    if kind != "auto":
        if found[kind] is None:
            raise ValueError(f"--tuned: {path} does not hold a {kind} model ({_LAYOUTS})")
        return kind, found[kind]
    for candidate in ("pipeline", "unet", "transformer", "lora"):
        if found[candidate] is not None:
            return candidate, found[candidate]
    raise ValueError(f"--tuned: {path} holds no model the evaluation can load ({_LAYOUTS})")


_LAYOUTS = ("expected a pipeline folder with model_index.json, a folder with unet/ or transformer/ (or such a model "
            "folder), or LoRA weights: a folder with *lora*.safetensors or a .safetensors file")


def check_base(source) -> None:
    """``--base``: a local pipeline folder, or a hub id that can be fetched now (or is cached)."""
    check_local_or_hub("--base", source, hub_alternative(str(source)))


def load_pipeline(source, *, device="cpu", dtype: torch.dtype = torch.float32, disable_safety_checker: bool = False):
    """An SD1.5, SDXL, SD3 or FLUX.1 pipeline from a local folder or a hub id."""
    from diffusers import DiffusionPipeline

    source = str(source)
    kwargs = {"dtype": dtype}
    local = Path(source)
    check_base(source)
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise ValueError(f"{source}: expected a diffusers pipeline folder with model_index.json")
        if disable_safety_checker and "safety_checker" in json.loads(index.read_text()):
            kwargs.update(safety_checker=None, requires_safety_checker=False)
    elif disable_safety_checker:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
    if type(pipe).__name__ not in PIPELINES:
        raise ValueError(f"{source}: a {type(pipe).__name__}; the evaluation supports {', '.join(PIPELINES)}")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images instead
    return pipe


def apply_tuned(pipe, kind: str, path: Path, *, lora_scale: float = 1.0):
    """Turns the base pipeline into the tuned one in place (``unet``, ``transformer``, ``lora``)."""
    if kind in ("unet", "transformer"):
        import diffusers

        base = getattr(pipe, kind, None)
        if base is None:
            raise ValueError(f"--tuned: a {kind} does not fit a {type(pipe).__name__}")
        name = json.loads((path / "config.json").read_text())["_class_name"]
        model = getattr(diffusers, name).from_pretrained(str(path), dtype=base.dtype)
        for key in ("_class_name", "in_channels", "cross_attention_dim", "addition_embed_type", "joint_attention_dim"):
            if model.config.get(key) != base.config.get(key):
                raise ValueError(f"--tuned: {name} {key} {model.config.get(key)} does not fit the base "
                                 f"pipeline's ({base.config.get(key)})")
        setattr(pipe, kind, model.to(pipe.device))
    elif kind == "lora":
        from diffusers.utils import logging as diffusers_logging

        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # not "no LoRA keys for the text encoder": UNet-only is normal
        try:
            if path.is_file():
                pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="tuned")
            else:
                pipe.load_lora_weights(str(path), adapter_name="tuned")
        finally:
            diffusers_logging.set_verbosity(level)
        if lora_scale != 1.0:
            pipe.set_adapters(["tuned"], adapter_weights=[lora_scale])
    else:
        raise ValueError(f"apply_tuned: kind {kind!r} is loaded as its own pipeline")
    return pipe


@dataclass
class GenerationSettings:
    seed: int = 0
    images_per_prompt: int = 1
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    height: Optional[int] = None
    width: Optional[int] = None
    negative_prompt: Optional[str] = None
    batch_size: int = 4


MAX_IMAGES_PER_PROMPT = 101  # the prompt stride of the seed rule


def check_images_per_prompt(images_per_prompt: int) -> None:
    """A one-line ``ValueError`` beyond the seed rule's ``MAX_IMAGES_PER_PROMPT``."""
    if images_per_prompt > MAX_IMAGES_PER_PROMPT:
        raise ValueError(f"images_per_prompt (--images-per-prompt): expected at most {MAX_IMAGES_PER_PROMPT} (image k "
                         f"of prompt i has seed seed * 100003 + i * 101 + k), got {images_per_prompt}")


def image_seed(settings: GenerationSettings, prompt_index: int, k: int) -> int:
    """The seed of image ``k`` of prompt ``prompt_index`` (the module docstring's rule)."""
    return settings.seed * 100003 + prompt_index * MAX_IMAGES_PER_PROMPT + k


def generate(pipe, prompts: List[str], settings: GenerationSettings, *,
             images: Optional[List[List[Optional[Image.Image]]]] = None,
             save: Optional[Callable[[int, int, Image.Image], None]] = None,
             desc: str = "generating", progress: bool = True) -> List[List[Image.Image]]:
    """``images[i][k]``: image k of prompt i, with the seeds of the module docstring. Images
    already in ``images`` are kept, not generated again; ``save(i, k, image)`` gets each new
    image as soon as its batch is done."""
    from tqdm.auto import tqdm

    check_images_per_prompt(settings.images_per_prompt)
    images = images or [[None] * settings.images_per_prompt for _ in prompts]
    jobs = [(i, k) for i, row in enumerate(images) for k, image in enumerate(row) if image is None]
    total = len(prompts) * settings.images_per_prompt
    with tqdm(total=total, initial=total - len(jobs), desc=desc, unit="image", disable=not progress) as bar:
        for start in range(0, len(jobs), settings.batch_size):
            batch = jobs[start:start + settings.batch_size]
            generators = [torch.Generator("cpu").manual_seed(image_seed(settings, i, k)) for i, k in batch]
            out = pipe(
                prompt=[prompts[i] for i, _ in batch],
                negative_prompt=None if settings.negative_prompt is None else [settings.negative_prompt] * len(batch),
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=generators,
                output_type="pil",
            )
            for (i, k), image in zip(batch, out.images):
                images[i][k] = image
                if save is not None:
                    save(i, k, image)
            bar.update(len(batch))
    return images  # type: ignore[return-value]
