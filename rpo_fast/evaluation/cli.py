"""``rpo-fast eval``: base vs tuned model on a prompt file; see :mod:`rpo_fast.evaluation.evaluate`.

Ctrl-C ends it with one line saying where it was and how to continue: the same command,
which reuses the images already saved."""

from __future__ import annotations

import argparse
import sys

from ..cli import interrupted, rerun_command
from ..clip import PRECISIONS
from .evaluate import EvalConfig, EvalStage, evaluate
from .image_reward import DEFAULT_TOKENIZER
from .outputs import count_images
from .generation import DTYPES, TUNED_KINDS, GenerationSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help="base pipeline: local diffusers folder or hub id (SD1.5, SDXL, SD3 / SD3.5 or FLUX.1)")
    models.add_argument("--tuned", required=True,
                        help="tuned model: an `rpo-fast train` output (unet/, transformer/ or LoRA weights), a UNet "
                             "or transformer folder, a pipeline folder, or a LoRA .safetensors file")
    models.add_argument("--tuned-type", choices=TUNED_KINDS, default="auto", help="how to read --tuned")
    models.add_argument("--lora-scale", type=float, default=1.0, help="LoRA adapter weight")
    models.add_argument("--device", default=None, help="torch device (None: cuda if available, else cpu)")
    models.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="pipeline dtype (None: fp16 on CUDA, fp32 on CPU)")
    models.add_argument("--no-safety-checker", action="store_true", help="load SD1.5 pipelines without the safety checker")

    gen = parser.add_argument_group("generation")
    gen.add_argument("--prompts", required=True, help="prompt file: one prompt a line, or .jsonl with a 'prompt' key")
    gen.add_argument("--output-dir", required=True,
                     help="where images, metrics.json, report.md and grid.png go; an earlier eval there with the "
                          "same settings is continued (its saved images reused)")
    gen.add_argument("--overwrite-output-dir", action="store_true",
                     help="delete an earlier eval with other settings in --output-dir (only its files) and start over")
    gen.add_argument("--seed", type=int, default=0, help="image k of prompt i uses seed * 100003 + i * 101 + k")
    gen.add_argument("--images-per-prompt", type=int, default=1, help="images generated per prompt and model (at most 101)")
    gen.add_argument("--num-inference-steps", type=int, default=30, help="denoising steps per image")
    gen.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument("--height", type=int, default=None, help="image height, a multiple of 8 (None: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width, a multiple of 8 (None: the model's)")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt for every image")
    gen.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")

    clip = parser.add_argument_group("CLIP score and style alignment (open_clip)")
    clip.add_argument("--no-clip", action="store_true", help="skip the CLIP score and style metrics")
    clip.add_argument("--clip-model", default="ViT-L-14-quickgelu", help="open_clip architecture")
    clip.add_argument("--clip-pretrained", default="openai", help="open_clip tag or local checkpoint file")
    clip.add_argument("--style-prompt", default=None, help="target style, e.g. 'a painting in the style of Van Gogh'")
    clip.add_argument("--neutral-prompts", nargs="+", default=["a photo", "an image"],
                      help="prompts the style prompt competes with in the zero-shot probability")
    clip.add_argument("--style-images", default=None, help="folder of reference images of the target style")
    clip.add_argument("--open-clip-config", action="append", default=[], metavar="JSON",
                      help="register an extra open_clip architecture (name = file stem); repeatable")

    pref = parser.add_argument_group("preference scorers (computed when their weights are given)")
    pref.add_argument("--pickscore-model", default=None, help="PickScore_v1 folder (transformers CLIPModel)")
    pref.add_argument("--pickscore-processor", default=None,
                      help="its processor folder (CLIP-ViT-H-14-laion2B-s32B-b79K); default: --pickscore-model")
    pref.add_argument("--hps-checkpoint", default=None, help="HPSv2 / HPSv2.1 checkpoint file (e.g. HPS_v2.1_compressed.pt)")
    pref.add_argument("--hps-model", default="ViT-H-14", help="open_clip architecture of the HPS checkpoint")
    pref.add_argument("--image-reward", default=None, metavar="DIR",
                      help="ImageReward folder with ImageReward.pt and med_config.json "
                           "(huggingface-cli download THUDM/ImageReward --local-dir DIR), or that .pt file")
    pref.add_argument("--image-reward-tokenizer", default=DEFAULT_TOKENIZER,
                      help="ImageReward's tokenizer (bert-base-uncased): folder or hub id")
    pref.add_argument("--aesthetic-head", default=None, help="LAION aesthetic predictor head (e.g. sac+logos+ava1-l14-linearMSE.pth)")
    pref.add_argument("--aesthetic-clip-model", default="ViT-L-14-quickgelu", help="open_clip architecture of its backbone")
    pref.add_argument("--aesthetic-clip-pretrained", default="openai", help="backbone tag or local checkpoint file")

    pref.add_argument("--allow-pickle", action="store_true",
                      help="load .pt checkpoints that hold pickled objects (only files from a trusted source)")

    pref.add_argument("--shapes-score", action="store_true",
                      help="the demo's shapes task: style (an outline) and fidelity (right shape and colour) per image")

    out = parser.add_argument_group("scoring and output")
    out.add_argument("--score-batch-size", type=int, default=16, help="images per scorer call")
    out.add_argument("--scorer-precision", choices=PRECISIONS, default="fp32", help="precision of the scorer models")
    out.add_argument("--grid-columns", type=int, default=8, help="prompts shown in grid.png")
    out.add_argument("--grid-cell", type=int, default=256, help="pixel size of a grid cell")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    generation = GenerationSettings(
        seed=args.seed, images_per_prompt=args.images_per_prompt, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, height=args.height, width=args.width,
        negative_prompt=args.negative_prompt, batch_size=args.batch_size,
    )
    return EvalConfig(
        base=args.base, tuned=args.tuned, prompts=args.prompts, output_dir=args.output_dir,
        tuned_type=args.tuned_type, lora_scale=args.lora_scale, generation=generation, device=args.device,
        dtype=args.dtype, disable_safety_checker=args.no_safety_checker, clip=not args.no_clip,
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, style_prompt=args.style_prompt,
        neutral_prompts=tuple(args.neutral_prompts), style_images=args.style_images,
        open_clip_configs=tuple(args.open_clip_config), pickscore_model=args.pickscore_model,
        pickscore_processor=args.pickscore_processor, hps_checkpoint=args.hps_checkpoint, hps_model=args.hps_model,
        image_reward=args.image_reward, image_reward_tokenizer=args.image_reward_tokenizer,
        aesthetic_head=args.aesthetic_head, aesthetic_clip_model=args.aesthetic_clip_model,
        aesthetic_clip_pretrained=args.aesthetic_clip_pretrained, allow_pickle=args.allow_pickle,
        score_batch_size=args.score_batch_size, shapes_score=args.shapes_score,
        scorer_precision=args.scorer_precision, grid_columns=args.grid_columns, grid_cell=args.grid_cell,
        progress=not args.no_progress, overwrite_output_dir=args.overwrite_output_dir,
    )


def run(args: argparse.Namespace) -> int:
    stage = EvalStage()
    try:
        result = evaluate(config_from_args(args), stage)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"rpo-fast eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        saved = count_images(stage.output_dir) if stage.output_dir else 0
        kept = f"kept the {saved} finished images in {stage.output_dir}" if saved else "no image was saved"
        return interrupted("eval", stage.reached(), kept, rerun_command(args))
    print(result.files["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in result.files.values()))
    return 0
