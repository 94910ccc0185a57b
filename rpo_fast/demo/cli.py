"""``rpo-fast demo``: style alignment on the synthetic shapes task, on a CPU in minutes.

1. the base model, which draws both styles (committed under ``rpo_fast/demo/base``;
   ``--pretrain`` rebuilds it);
2. style preference data: sketch (preferred) vs plain (dispreferred) drawings of the
   training captions, and the embeddings that weight RPO's contrast matrix;
3. a fine-tune of the base with the stock ``rpo_fast.train`` trainer (RPO by default);
4. base and tuned generate for the held-out test captions from the same seeds; style and
   fidelity scores are printed with 95% confidence intervals over prompts; an image grid and
   a plot are saved.

Success: the style rate (the fraction of images that are the caption's shape and colour
drawn as outlines) rises by at least ``MIN_STYLE_GAIN`` with the 95% CI of the paired
per-prompt difference above 0, and fidelity stays at least 90% of the base's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..cli import interrupted, rerun_command
from .base_model import BASE_DIR, PretrainConfig, base_exists, load_pipeline, pretrain, pretrain_run_dir
from .datasets import write_style_data, write_style_embeddings
from .evaluate import GUIDANCE_SCALE, INFERENCE_STEPS, evaluate
from .finetune import FinetuneSettings, finetune
from .shapes import IMAGE_SIZE, split_scenes
from ..evaluation.report import image_grid, save_score_plot, summarize
from ..evaluation.shapes_score import MAX_FIDELITY_DROP, keeps_fidelity

DEFAULTS = FinetuneSettings()
MIN_STYLE_GAIN = 0.25  # the success test: style rate up by at least this much (absolute)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="demo_output", help="folder for the grid, plot, results and work files")
    parser.add_argument("--model-dir", default=str(BASE_DIR), help="the base pipeline folder")
    parser.add_argument("--pretrain", action="store_true",
                        help="(re)build the base model into --model-dir first (it is built anyway when missing)")
    parser.add_argument("--pretrain-steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--method", choices=["rpo", "dpo", "sft"], default=DEFAULTS.method)
    parser.add_argument("--steps", type=int, default=DEFAULTS.steps, help="fine-tuning steps")
    parser.add_argument("--beta", type=float, default=DEFAULTS.beta)
    parser.add_argument("--learning-rate", type=float, default=DEFAULTS.learning_rate)
    parser.add_argument("--batch-pairs", type=int, default=DEFAULTS.batch_pairs)
    parser.add_argument("--tau", type=float, default=DEFAULTS.tau, help="RPO temperature of the similarity weights")
    parser.add_argument("--lora-rank", type=int, default=DEFAULTS.lora_rank, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--sft-weight", type=float, default=DEFAULTS.sft_weight,
                        help="dpo / rpo: plus this times the SFT loss of the preferred images (0: off)")
    parser.add_argument("--uniform-weights", action="store_true", help="RPO without embeddings (weights 1/M)")
    parser.add_argument("--pairs-per-caption", type=int, default=8, help="style pairs per training caption")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="images per held-out caption")
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N test captions")
    parser.add_argument("--inference-steps", type=int, default=INFERENCE_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (unset: torch's default; 1 is faster on a busy machine)")
    parser.add_argument("--no-progress", action="store_true")


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_pairs", "pairs_per_caption", "samples_per_prompt", "inference_steps", "pretrain_steps"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {value}")
    if args.max_prompts is not None and args.max_prompts < 2:
        raise ValueError(f"--max-prompts: expected at least 2 (for a confidence interval), got {args.max_prompts}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank: expected 0 (full fine-tuning) or a positive int, got {args.lora_rank}")
    if not args.sft_weight >= 0:
        raise ValueError(f"--sft-weight: expected a non-negative number, got {args.sft_weight}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive int, got {args.threads}")


def _fmt(mean: float, half: float) -> str:
    return f"{mean:.3f} ± {half:.3f}"


def run(args: argparse.Namespace) -> int:
    from ..train.loop import TrainingInterrupted

    try:
        _check(args)
    except ValueError as e:
        print(f"rpo-fast demo: error: {e}", file=sys.stderr)
        return 2
    where: Dict[str, object] = {"stage": "starting", "kept": "nothing was written"}
    try:
        return _run(args, where)
    except (KeyboardInterrupt, TrainingInterrupted) as e:
        step = e.reached if isinstance(e, TrainingInterrupted) else None  # e.g. "at step 57 of 200"
        return interrupted("demo", *_interruption(where, step), rerun_command(args))


def _interruption(where: Dict[str, object], step: Optional[str]) -> Tuple[str, str]:
    """Where the demo was stopped and what it keeps, for the one line Ctrl-C ends it with. In
    a training stage (``where["run_dir"]``), a rerun continues from the last checkpoint."""
    from ..train.checkpoint import list_checkpoints

    stage, run_dir = where["stage"], where.get("run_dir")
    reached = f"{stage} {step}" if step else f"while {stage}"
    if run_dir is None:
        return reached, str(where["kept"])
    found = list_checkpoints(Path(run_dir))
    if not found:
        return reached, f"no checkpoint yet: a rerun starts {stage} over"
    return reached, f"{found[max(found)].name} kept in {run_dir}: a rerun continues from step {max(found)}"


def _run(args: argparse.Namespace, where: Dict[str, object]) -> int:
    """The demo; ``where`` is kept up to date with its stage (see :func:`_interruption`)."""
    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.no_progress
    start = time.perf_counter()
    out = Path(args.out)
    work = out / "work"
    model_dir = Path(args.model_dir)

    if args.pretrain or not base_exists(model_dir):
        print(f"[demo] pretraining the base model into {model_dir} ({args.pretrain_steps} steps)")
        where.update(stage="pretraining the base model", run_dir=pretrain_run_dir(work / "pretrain"))
        pretrain(model_dir, work / "pretrain", PretrainConfig(steps=args.pretrain_steps, seed=args.seed), progress=progress)

    where.update(stage="writing the style data", run_dir=None, kept=f"the files finished in {work} are kept")
    data = write_style_data(work / "style-train", split="train", per_scene=args.pairs_per_caption, seed=args.seed)
    embeddings = None
    if args.method == "rpo" and not args.uniform_weights:
        embeddings = write_style_embeddings(data)
    settings = FinetuneSettings(method=args.method, beta=args.beta, learning_rate=args.learning_rate,
                                steps=args.steps, batch_pairs=args.batch_pairs, tau=args.tau, lora_rank=args.lora_rank,
                                sft_weight=args.sft_weight, seed=args.seed)
    print(f"[demo] fine-tuning: {settings.label()}, {'similarity' if embeddings else 'uniform'} weights")
    where.update(stage="fine-tuning", run_dir=work / "finetune")
    tuned_dir, _ = finetune(model_dir, data, work / "finetune", settings, embeddings=embeddings,
                            latent_cache=work / "latents", progress=progress)
    train_seconds = time.perf_counter() - start

    where.update(stage="evaluating", run_dir=None,
                 kept=f"the tuned model is kept in {work / 'finetune'}: a rerun skips fine-tuning")
    scenes = split_scenes()["test"][: args.max_prompts]
    common = dict(samples_per_prompt=args.samples_per_prompt, seed=args.seed, steps=args.inference_steps,
                  guidance_scale=args.guidance_scale, progress=progress)
    base = evaluate(load_pipeline(model_dir), scenes, desc="base model", **common)
    tuned = evaluate(load_pipeline(model_dir, tuned_dir), scenes, desc="tuned model", **common)

    # style_rate: the fraction of images that are the caption's shape and colour drawn as outlines;
    # the paired summary of evaluation: means and 95% CIs over the captions' per-prompt means
    base_tables, tuned_tables = base.tables(), tuned.tables()
    paired = summarize({k: base_tables[k] for k in ("style", "fidelity")},
                       {k: tuned_tables[k] for k in ("style", "fidelity")})
    results = {"base": {}, "tuned": {}, "difference": {}}
    for metric, key in (("style_rate", "style"), ("fidelity", "fidelity")):
        s = paired[key]
        results["base"][metric] = (s["base"], s["base_ci95"])
        results["tuned"][metric] = (s["tuned"], s["tuned_ci95"])
        results["difference"][metric] = (s["delta"], s["delta_ci95"])
    gain, gain_half = results["difference"]["style_rate"]
    base_fid, tuned_fid = results["base"]["fidelity"][0], results["tuned"]["fidelity"][0]
    fidelity_ratio = tuned_fid / base_fid if base_fid > 0 else float("nan")
    style_ok = gain >= MIN_STYLE_GAIN and gain - gain_half > 0
    fidelity_ok = keeps_fidelity(tuned_fid, base_fid)

    n_images = len(base.images)
    tuned_name = f"{args.method.upper()}-tuned"
    print(f"\n[demo] {len(scenes)} held-out captions x {args.samples_per_prompt} samples = {n_images} images per model; "
          "mean ± 95% CI over captions")
    print(f"{'':10s} {'style rate (outlines)':>22s} {'fidelity (shape+colour)':>25s}")
    for name, label in (("base", "base"), ("tuned", tuned_name)):
        print(f"{label:10s} {_fmt(*results[name]['style_rate']):>22s} {_fmt(*results[name]['fidelity']):>25s}")
    print(f"{'change':10s} {_fmt(*results['difference']['style_rate']):>22s} "
          f"{_fmt(*results['difference']['fidelity']):>25s}  (fidelity {100 * fidelity_ratio:.0f}% of the base's)")
    print(f"[demo] style rate up by at least {MIN_STYLE_GAIN} with its CI above 0: {'yes' if style_ok else 'NO'}; "
          f"fidelity at least {100 * (1 - MAX_FIDELITY_DROP):.0f}% of the base's: {'yes' if fidelity_ok else 'NO'}")

    # the grid: sample 0 of the first 12 captions, base and tuned from the same starting noise
    columns = list(range(0, n_images, args.samples_per_prompt))[:12]
    grid = out / "demo_grid.png"
    out.mkdir(parents=True, exist_ok=True)
    image_grid({"base": [base.images[i] for i in columns], tuned_name: [tuned.images[i] for i in columns]},
               cell=4 * IMAGE_SIZE, label_width=110, column_labels=[base.captions[i] for i in columns],
               resample=Image.Resampling.NEAREST).save(grid)
    plot = save_score_plot(out / "demo_scores.png", {"base": results["base"], tuned_name: results["tuned"]},
                           title=f"{settings.label()}; {len(scenes)} held-out captions, 95% CI")
    elapsed = time.perf_counter() - start
    summary = {
        "settings": settings.__dict__, "weights": "similarity" if embeddings else "uniform",
        "captions": len(scenes), "samples_per_prompt": args.samples_per_prompt,
        "results": {k: {m: {"mean": v[0], "ci95": v[1]} for m, v in r.items()} for k, r in results.items()},
        "fidelity_ratio": fidelity_ratio, "style_gain_met": bool(style_ok), "fidelity_kept": bool(fidelity_ok),
        "seconds": {"train": train_seconds, "total": elapsed},
        "per_prompt": {f"{model}_{metric}": tables[key].mean(dim=1).tolist()
                       for metric, key in (("style_rate", "style"), ("fidelity", "fidelity"))
                       for model, tables in (("base", base_tables), ("tuned", tuned_tables))},
    }
    (out / "demo_results.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"[demo] saved {grid}, {plot}, {out / 'demo_results.json'} ({elapsed:.0f} s)")
    return 0
