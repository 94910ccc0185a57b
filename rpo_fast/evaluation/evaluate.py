"""Base vs tuned: generate with both from the same seeds, score every image, report.

Every input is checked before anything loads: local paths, and hub ids or open_clip tags
that would be downloaded (offline, one line at once). The output folder keeps what a run
needs to continue (:mod:`rpo_fast.evaluation.outputs`): each image is saved as soon as it is
generated, and a rerun with the same settings generates only the images that are missing.

Order of work keeps one large model in memory at a time: the base pipeline generates, is
turned into the tuned one (a UNet swap or LoRA weights; a full tuned pipeline is loaded
instead), generates again, and is freed; then each scorer in turn loads, scores every
image, and is freed.
"""

from __future__ import annotations

import functools
import gc
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from ..clip import check_open_clip_source, register_open_clip_configs
from .generation import (
    DTYPES,
    GenerationSettings,
    apply_tuned,
    check_base,
    check_images_per_prompt,
    generate,
    load_pipeline,
    read_prompts,
    resolve_tuned,
)
from .outputs import MODELS, check_output_dir, image_file, load_images, open_output_dir, save_image
from .report import summarize, write_report
from .image_reward import DEFAULT_TOKENIZER, check_image_reward
from .scorers import (
    AestheticScorer,
    HPSv2Scorer,
    ImageRewardScorer,
    OpenClipMetrics,
    SCORERS,
    PickScoreScorer,
    check_scorer_paths,
    load_style_images,
)
from .sources import check_open_clip_weights


@dataclass
class EvalConfig:
    base: str                               # pipeline folder or hub id
    tuned: str                              # rpo-fast train output, UNet folder, pipeline or LoRA weights
    prompts: str                            # .txt (one prompt a line) or .jsonl
    output_dir: str
    tuned_type: str = "auto"                # auto | pipeline | unet | transformer | lora
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
    image_reward: Optional[str] = None      # folder of ImageReward.pt and med_config.json (or that .pt)
    image_reward_tokenizer: str = DEFAULT_TOKENIZER  # BERT's uncased tokenizer: folder or hub id
    aesthetic_head: Optional[str] = None
    aesthetic_clip_model: str = "ViT-L-14-quickgelu"
    aesthetic_clip_pretrained: Optional[str] = "openai"
    allow_pickle: bool = False              # load .pt checkpoints holding pickled objects (trusted files only)
    score_batch_size: int = 16
    scorer_precision: str = "fp32"
    grid_columns: int = 8
    grid_cell: int = 256
    shapes_score: bool = False              # the shapes task's style and fidelity (captions of the demo's task)
    progress: bool = True
    overwrite_output_dir: bool = False      # delete an earlier eval with other settings in output_dir


@dataclass
class EvalStage:
    """Where :func:`evaluate` is, for the line ``rpo-fast eval`` ends with when interrupted."""
    what: str = "while checking the inputs"
    done: int = 0                           # images of the current model on disk
    total: int = 0                          # images per model (0: not generating)
    output_dir: Optional[Path] = None       # set once the output folder is this eval's

    def reached(self) -> str:
        return f"{self.what}, {self.done} of {self.total} images" if self.total else self.what


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
    check_images_per_prompt(g.images_per_prompt)
    for name, value in (("height", g.height), ("width", g.width)):
        if value is not None and (not isinstance(value, int) or value < 8 or value % 8):
            raise ValueError(f"{name}: expected a multiple of 8 (or None for the model's default), got {value!r}")
    if config.dtype is not None and config.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {config.dtype!r}")
    if config.device is not None:
        try:
            device = torch.device(config.device)
        except RuntimeError as e:
            raise ValueError(f"device: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {config.device!r}, but torch sees no CUDA device here")
    if not config.clip and (config.style_prompt or config.style_images):
        raise ValueError("--style-prompt / --style-images need the CLIP scorer (drop --no-clip)")


def _scorers(config: EvalConfig, device: str, refs: Optional[List[Image.Image]]) -> List[Tuple[str, Callable]]:
    """``(name, load)`` of each scorer asked for; each is loaded when its turn comes, so that
    only one is in memory."""
    precision, allow_pickle = config.scorer_precision, config.allow_pickle
    scorers: List[Tuple[str, Callable]] = []
    if config.clip:
        scorers.append(("CLIP", lambda: OpenClipMetrics(
            config.clip_model, config.clip_pretrained, device=device, precision=precision,
            style_prompt=config.style_prompt, neutral_prompts=config.neutral_prompts, style_images=refs,
            allow_pickle=allow_pickle)))
    if config.pickscore_model:
        scorers.append(("PickScore", lambda: PickScoreScorer(
            config.pickscore_model, config.pickscore_processor, device=device, dtype=DTYPES[precision])))
    if config.hps_checkpoint:
        scorers.append(("HPSv2", lambda: HPSv2Scorer(
            config.hps_checkpoint, config.hps_model, device=device, precision=precision, allow_pickle=allow_pickle)))
    if config.image_reward:
        scorers.append(("ImageReward", lambda: ImageRewardScorer(
            config.image_reward, config.image_reward_tokenizer, device=device, dtype=DTYPES[precision],
            allow_pickle=allow_pickle)))
    if config.aesthetic_head:
        scorers.append(("aesthetic", lambda: AestheticScorer(
            config.aesthetic_head, config.aesthetic_clip_model, config.aesthetic_clip_pretrained, device=device,
            precision=precision, allow_pickle=allow_pickle)))
    if config.shapes_score:
        scorers.append(("shapes", SCORERS["shapes"]))
    return scorers


def _free(device: str) -> None:
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def score_images(config: EvalConfig, device: str, prompts: List[str], images: Dict[str, List[List[Image.Image]]],
                 style_refs: Optional[List[Image.Image]] = None,
                 stage: Optional[EvalStage] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """``scores[model][metric]``: a ``(P, K)`` tensor for each model in ``images``; one progress
    bar over every scorer's batches."""
    from tqdm.auto import tqdm

    stage = stage or EvalStage()
    flat = {model: [(prompts[i], im) for i, row in enumerate(rows) for im in row] for model, rows in images.items()}
    num_prompts, per_prompt = len(prompts), len(next(iter(images.values()))[0])
    scores: Dict[str, Dict[str, torch.Tensor]] = {model: {} for model in images}
    scorers = _scorers(config, device, style_refs)
    batches = sum(-(-len(f) // config.score_batch_size) for f in flat.values())
    with tqdm(total=len(scorers) * batches, desc="scoring", unit="batch",
              disable=not (config.progress and scorers)) as bar:
        for number, (name, load) in enumerate(scorers, start=1):
            stage.what, stage.total = f"while scoring with {name} (scorer {number} of {len(scorers)})", 0
            bar.set_postfix_str(name)
            scorer = load()
            for model, items in flat.items():
                parts: Dict[str, List[torch.Tensor]] = {}
                for start in range(0, len(items), config.score_batch_size):
                    batch = items[start:start + config.score_batch_size]
                    for metric, value in scorer([p for p, _ in batch], [im for _, im in batch]).items():
                        parts.setdefault(metric, []).append(value)
                    bar.update(1)
                for metric, values in parts.items():
                    scores[model][metric] = torch.cat(values).reshape(num_prompts, per_prompt)
            del scorer
            _free(device)
    return scores


def _fingerprint(source) -> Dict[str, str]:
    """A model's path (or hub id) and a digest of its files' names, sizes and modification
    times: retraining into the same folder changes it."""
    path = Path(source).expanduser()
    if not path.exists():
        return {"source": str(source)}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return {"source": str(path.resolve()), "files": digest.hexdigest()[:16]}


def _manifest(config: EvalConfig, prompts: List[str], tuned_kind: str, tuned_path: Path, device: str,
              dtype: torch.dtype) -> Dict[str, object]:
    """What the images depend on (not the batch size: the same seeds give the same images)."""
    generation = asdict(config.generation)
    del generation["batch_size"]
    return {"prompts": prompts, **generation, "base": _fingerprint(config.base), "tuned": _fingerprint(tuned_path),
            "tuned_kind": tuned_kind, "lora_scale": config.lora_scale if tuned_kind == "lora" else None,
            "device": torch.device(device).type, "dtype": str(dtype).replace("torch.", ""),
            "safety_checker": not config.disable_safety_checker}


def _generate_both(config: EvalConfig, prompts: List[str], tuned_kind: str, tuned_path: Path, device: str,
                   dtype: torch.dtype, output_dir: Path, stage: EvalStage) -> Dict[str, List[List[Image.Image]]]:
    """Each model's images: those saved in ``output_dir`` already, the others generated and
    saved one batch at a time. A pipeline is loaded only if some image is missing."""
    load = functools.partial(load_pipeline, device=device, dtype=dtype,
                             disable_safety_checker=config.disable_safety_checker)
    per_prompt = config.generation.images_per_prompt
    images, pipe = {}, None
    for model in MODELS:
        saved = load_images(output_dir, model, len(prompts), per_prompt)
        stage.total = len(prompts) * per_prompt
        stage.done = sum(image is not None for row in saved for image in row)
        if stage.done:
            print(f"rpo-fast eval: {model} model: reusing {stage.done} of {stage.total} images saved in "
                  f"{output_dir} with the same settings")
        if stage.done < stage.total:
            stage.what = f"while loading the {model} model"
            own_pipeline = model == "tuned" and tuned_kind == "pipeline"
            if pipe is None or own_pipeline:
                pipe = None
                _free(device)
                pipe = load(tuned_path if own_pipeline else config.base)
            if model == "tuned" and not own_pipeline:
                apply_tuned(pipe, tuned_kind, tuned_path, lora_scale=config.lora_scale)
            stage.what = f"while generating with the {model} model"

            def save(i: int, k: int, image: Image.Image, model: str = model) -> None:
                save_image(output_dir, model, i, k, image)
                stage.done += 1

            saved = generate(pipe, prompts, config.generation, images=saved, save=save, desc=f"{model} model",
                             progress=config.progress)
        images[model] = saved
    pipe = None
    _free(device)
    return images


def evaluate(config: EvalConfig, stage: Optional[EvalStage] = None) -> EvalResult:
    """``stage`` (updated as the work goes on) says where an interrupted run was."""
    stage = stage or EvalStage()
    _check_config(config)
    prompts = read_prompts(config.prompts)
    check_base(config.base)
    tuned_kind, tuned_path = resolve_tuned(config.tuned, config.tuned_type)
    check_scorer_paths(pickscore_model=config.pickscore_model, pickscore_processor=config.pickscore_processor,
                       hps_checkpoint=config.hps_checkpoint, aesthetic_head=config.aesthetic_head,
                       style_images=config.style_images, image_reward=config.image_reward,
                       image_reward_tokenizer=config.image_reward_tokenizer)
    if config.open_clip_configs:  # (importing open_clip takes seconds: not before an offline check needs it)
        register_open_clip_configs(config.open_clip_configs)
    if config.clip:  # every scorer's weights, before generating
        check_open_clip_weights("--clip", config.clip_model, config.clip_pretrained, ", or --no-clip")
    if config.aesthetic_head:
        check_open_clip_weights("--aesthetic-clip", config.aesthetic_clip_model, config.aesthetic_clip_pretrained)
    if config.hps_checkpoint:
        check_open_clip_source(config.hps_model, config.hps_checkpoint, "--hps-model")
    if config.image_reward:  # keys and shapes (the checkpoint memory-mapped, the model on the meta device)
        check_image_reward(config.image_reward, config.image_reward_tokenizer, config.allow_pickle)
    style_refs = load_style_images(config.style_images) if config.style_images else None
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[config.dtype or ("fp16" if str(device).startswith("cuda") else "fp32")]
    output_dir = Path(config.output_dir)
    manifest = _manifest(config, prompts, tuned_kind, tuned_path, device, dtype)
    check_output_dir(output_dir, manifest, config.overwrite_output_dir)
    deleted = open_output_dir(output_dir, manifest)
    stage.output_dir = output_dir
    if deleted:
        print(f"rpo-fast eval: --overwrite-output-dir: deleted the {len(deleted)} files of an earlier eval "
              f"in {output_dir}")

    images = _generate_both(config, prompts, tuned_kind, tuned_path, device, dtype, output_dir, stage)
    scores = score_images(config, device, prompts, images, style_refs, stage)
    stage.what, stage.total = "while writing the report", 0
    summary = summarize(scores["base"], scores["tuned"])
    grid_rows = {model: [row[0] for row in rows[: config.grid_columns]] for model, rows in images.items()}
    paths = {model: [[image_file(output_dir, model, i, k).relative_to(output_dir).as_posix() for k in range(len(row))]
                     for i, row in enumerate(rows)] for model, rows in images.items()}
    record = asdict(config)
    record.update(device=str(device), dtype=str(dtype).replace("torch.", ""), tuned_kind=tuned_kind,
                  tuned_path=str(tuned_path))
    files = write_report(output_dir, prompts=prompts, summary=summary, base=scores["base"], tuned=scores["tuned"],
                         image_paths=paths, settings=record, grid_rows=grid_rows, grid_cell=config.grid_cell)
    return EvalResult(summary=summary, scores=scores, files=files, output_dir=output_dir)
