"""Base vs tuned: generate with both from the same seeds, score every image, report.

Order of work keeps one large model in memory at a time: the base pipeline generates, is
turned into the tuned one (a UNet swap or LoRA weights; a full tuned pipeline is loaded
instead), generates again, and is freed; then each scorer in turn loads, scores every
image, and is freed. Every local path is checked before the first image is generated, and
images are saved to disk before scoring starts.
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image

from ..clip import check_open_clip_source, register_open_clip_configs
from .generation import (
    DTYPES,
    GenerationSettings,
    apply_tuned,
    generate,
    load_pipeline,
    read_prompts,
    resolve_tuned,
    save_images,
)
from .report import summarize, write_report
from .scorers import (
    AestheticScorer,
    HPSv2Scorer,
    OpenClipMetrics,
    PickScoreScorer,
    check_open_clip_weights,
    check_scorer_paths,
    load_style_images,
)


@dataclass
class EvalConfig:
    base: str                               # pipeline folder or hub id
    tuned: str                              # rpo-fast train output, UNet folder, pipeline or LoRA weights
    prompts: str                            # .txt (one prompt a line) or .jsonl
    output_dir: str
    tuned_type: str = "auto"                # auto | pipeline | unet | lora
    lora_scale: float = 1.0
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    device: Optional[str] = None            # default: cuda if available
    dtype: Optional[str] = None             # fp32 | fp16 | bf16; default fp16 on CUDA, fp32 on CPU
    disable_safety_checker: bool = False
    # CLIP score and style alignment (open_clip)
    clip: bool = True
    clip_model: str = "ViT-L-14-quickgelu"
    clip_pretrained: Optional[str] = "openai"
    style_prompt: Optional[str] = None
    neutral_prompts: Sequence[str] = ("a photo", "an image")
    style_images: Optional[str] = None      # folder of reference style images
    open_clip_configs: Sequence[str] = ()   # extra open_clip architecture JSONs
    # preference scorers, each when its weights are given
    pickscore_model: Optional[str] = None
    pickscore_processor: Optional[str] = None
    hps_checkpoint: Optional[str] = None
    hps_model: str = "ViT-H-14"
    aesthetic_head: Optional[str] = None
    aesthetic_clip_model: str = "ViT-L-14-quickgelu"
    aesthetic_clip_pretrained: Optional[str] = "openai"
    allow_pickle: bool = False              # load .pt checkpoints holding pickled objects (trusted files only)
    score_batch_size: int = 16
    scorer_precision: str = "fp32"
    grid_columns: int = 8
    grid_cell: int = 256
    progress: bool = True


@dataclass
class EvalResult:
    summary: Dict[str, Dict[str, float]]    # metric -> {base, tuned, delta, win_rate}
    scores: Dict[str, Dict[str, torch.Tensor]]  # "base" / "tuned" -> metric -> (P, K)
    files: Dict[str, Path]                  # json, markdown, grid
    output_dir: Path


def _check_config(config: EvalConfig) -> None:
    g = config.generation
    for name, value in (("images_per_prompt", g.images_per_prompt), ("num_inference_steps", g.num_inference_steps),
                        ("batch_size", g.batch_size), ("score_batch_size", config.score_batch_size),
                        ("grid_columns", config.grid_columns), ("grid_cell", config.grid_cell)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    for name, value in (("height", g.height), ("width", g.width)):
        if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
            raise ValueError(f"{name}: expected a multiple of 8 (or None for the model's default), got {value!r}")
    if config.dtype is not None and config.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {config.dtype!r}")
    if not (config.clip or config.pickscore_model or config.hps_checkpoint or config.aesthetic_head):
        raise ValueError("no metric to compute: keep the CLIP metrics or give --pickscore-model, "
                         "--hps-checkpoint or --aesthetic-head")
    if not config.clip and (config.style_prompt or config.style_images):
        raise ValueError("--style-prompt / --style-images need the CLIP scorer (drop --no-clip)")


def _build_scorers(config: EvalConfig, device: str, refs: Optional[List[Image.Image]]):
    """Yields one scorer at a time, so that only one is in memory."""
    precision, allow_pickle = config.scorer_precision, config.allow_pickle
    if config.clip:
        yield OpenClipMetrics(config.clip_model, config.clip_pretrained, device=device, precision=precision,
                              style_prompt=config.style_prompt, neutral_prompts=config.neutral_prompts,
                              style_images=refs, allow_pickle=allow_pickle)
    if config.pickscore_model:
        dtype = DTYPES[precision]
        yield PickScoreScorer(config.pickscore_model, config.pickscore_processor, device=device, dtype=dtype)
    if config.hps_checkpoint:
        yield HPSv2Scorer(config.hps_checkpoint, config.hps_model, device=device, precision=precision,
                          allow_pickle=allow_pickle)
    if config.aesthetic_head:
        yield AestheticScorer(config.aesthetic_head, config.aesthetic_clip_model, config.aesthetic_clip_pretrained,
                              device=device, precision=precision, allow_pickle=allow_pickle)


def _free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def score_images(config: EvalConfig, device: str, prompts: List[str], images: Dict[str, List[List[Image.Image]]],
                 style_refs: Optional[List[Image.Image]] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """``scores[model][metric]``: a ``(P, K)`` tensor for each model in ``images``."""
    from tqdm.auto import tqdm

    flat = {model: [(prompts[i], im) for i, row in enumerate(rows) for im in row] for model, rows in images.items()}
    num_prompts, per_prompt = len(prompts), len(next(iter(images.values()))[0])
    scores: Dict[str, Dict[str, torch.Tensor]] = {model: {} for model in images}
    batches = sum(-(-len(f) // config.score_batch_size) for f in flat.values())
    with tqdm(desc="scoring", unit="batch", disable=not config.progress) as bar:
        for scorer in _build_scorers(config, device, style_refs):
            bar.total = (bar.total or 0) + batches
            bar.refresh()
            for model, items in flat.items():
                parts: Dict[str, List[torch.Tensor]] = {}
                for start in range(0, len(items), config.score_batch_size):
                    batch = items[start:start + config.score_batch_size]
                    for name, value in scorer([p for p, _ in batch], [im for _, im in batch]).items():
                        parts.setdefault(name, []).append(value)
                    bar.update(1)
                for name, values in parts.items():
                    scores[model][name] = torch.cat(values).reshape(num_prompts, per_prompt)
            del scorer
            _free(device)
    return scores


def evaluate(config: EvalConfig) -> EvalResult:
    _check_config(config)
    register_open_clip_configs(config.open_clip_configs)
    prompts = read_prompts(config.prompts)
    check_scorer_paths(pickscore_model=config.pickscore_model, pickscore_processor=config.pickscore_processor,
                       hps_checkpoint=config.hps_checkpoint, aesthetic_head=config.aesthetic_head,
                       style_images=config.style_images)
    if config.clip:  # every scorer's weights, before generating
        check_open_clip_weights("--clip-pretrained (or --no-clip)", config.clip_model, config.clip_pretrained)
    if config.aesthetic_head:
        check_open_clip_weights("--aesthetic-clip-pretrained", config.aesthetic_clip_model,
                                config.aesthetic_clip_pretrained)
    if config.hps_checkpoint:
        check_open_clip_source(config.hps_model, config.hps_checkpoint, "--hps-model")
    style_refs = load_style_images(config.style_images) if config.style_images else None
    tuned_kind, tuned_path = resolve_tuned(config.tuned, config.tuned_type)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[config.dtype or ("fp16" if str(device).startswith("cuda") else "fp32")]
    output_dir = Path(config.output_dir)
    settings = config.generation

    pipe = load_pipeline(config.base, device=device, dtype=dtype, disable_safety_checker=config.disable_safety_checker)
    images = {"base": generate(pipe, prompts, settings, desc="base model", progress=config.progress)}
    paths = {"base": save_images(images["base"], output_dir / "images" / "base", output_dir)}
    if tuned_kind == "pipeline":
        del pipe
        _free(device)
        pipe = load_pipeline(tuned_path, device=device, dtype=dtype, disable_safety_checker=config.disable_safety_checker)
    else:
        apply_tuned(pipe, tuned_kind, tuned_path, lora_scale=config.lora_scale)
    images["tuned"] = generate(pipe, prompts, settings, desc="tuned model", progress=config.progress)
    paths["tuned"] = save_images(images["tuned"], output_dir / "images" / "tuned", output_dir)
    del pipe
    _free(device)

    scores = score_images(config, device, prompts, images, style_refs)
    summary = summarize(scores["base"], scores["tuned"])
    grid_rows = {model: [row[0] for row in rows[: config.grid_columns]] for model, rows in images.items()}
    record = asdict(config)
    record.update(device=str(device), dtype=str(dtype).replace("torch.", ""), tuned_kind=tuned_kind,
                  tuned_path=str(tuned_path))
    files = write_report(output_dir, prompts=prompts, summary=summary, base=scores["base"], tuned=scores["tuned"],
                         image_paths=paths, settings=record, grid_rows=grid_rows, grid_cell=config.grid_cell)
    return EvalResult(summary=summary, scores=scores, files=files, output_dir=output_dir)
