"""The components of a DPO training step, timed on the real SD1.5 (512 px) and SDXL (1024 px)
architectures, on a GPU: what docs/step-budget.md estimates on paper, measured.

    python -m benchmarks.step_timing [--models sd15 sdxl] [--pairs 1] [--repeats 3] [--warmups 1] [--json F] [--tiny]

The models are built from their published configs (below) with random
weights (the time of a pass does not depend on the weights' values, so nothing is downloaded),
in the precisions the trainers use: the trained UNet in fp32 under bf16 autocast (SDXL with
gradient checkpointing, as both trainers run it), the frozen reference, the text encoders and
SD1.5's VAE in bf16, SDXL's VAE in fp32. Each component of one micro-batch of M pairs is timed
by itself, the median of ``--repeats`` calls after one warm-up call, and the configurations
are sums of their components per pair:

- official: VAE encoding and text encoding every step, the policy's forward and backward, the
  frozen reference's forward, the eager loss, and its optimizer (AdamW for SD1.5, Adafactor for
  SDXL) over ``PAIRS_PER_OPT_STEP`` pairs;
- rpo-fast (a) frozen reference: latents and prompts from the caches, the policy, the
  reference, rpo-fast's loss, fused AdamW; (b) ``--precompute-ref``: the same without the
  reference's forward (its pass before training left out); (c) ``--lora``: the policy with
  adapters, the reference the same UNet with its adapters disabled (the adapters' optimizer,
  a few MB, left out as on paper).

docs/step-budget.md puts the on-paper estimates beside these numbers. ``--tiny`` runs the same code on scaled-down
configs (what the tests and the GPU check's dry run use). torch.compile is not timed (compiling
SDXL takes minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from benchmarks.eager_loss import eager_dpo_loss

BETA = 2500.0  # rpo-fast's beta; the eager loss gets beta_dpo = 2 * BETA (eager_loss.py)
PAIRS_PER_OPT_STEP = 128  # per GPU: the official launchers' batch 1 x accumulation 128

# The published architectures: SD1.5's and SDXL's UNet, their VAE, CLIP ViT-L/14's and OpenCLIP
# ViT-bigG/14's text encoders.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# Scaled-down configs with the real ones' structure (--tiny): latents 8 x 8, images 16 px.
TINY_UNET = dict(sample_size=8, block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, layers_per_block=1)
TINY_UNET_XL = dict(sample_size=8, block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4],
                    cross_attention_dim=32, transformer_layers_per_block=[1, 1, 1], layers_per_block=1,
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
TINY_VAE = dict(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)


def configs(xl: bool, tiny: bool) -> Dict[str, object]:
    unet = dict(SDXL_UNET if xl else SD15_UNET)
    vae, texts = dict(VAE), [dict(CLIP_L)] + ([dict(CLIP_BIGG)] if xl else [])
    if tiny:
        unet.update(TINY_UNET_XL if xl else TINY_UNET)
        vae.update(TINY_VAE)
        texts = [dict(t, **TINY_CLIP) for t in texts]
    return {"unet": unet, "vae": vae, "texts": texts}


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warmups: int = 1) -> float:
    """Milliseconds of ``fn``: the median of ``repeats`` calls after ``warmups`` calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmups):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(model: str, *, pairs: int = 1, repeats: int = 3, device: Optional[torch.device] = None,
            tiny: bool = False, warmups: int = 1) -> Dict[str, float]:
    """Milliseconds of each component of one micro-batch of ``pairs`` pairs of ``model``
    (``sd15`` or ``sdxl``) on ``device`` (default: CUDA if present, else the CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from rpo_fast import diffusion_dpo_loss
    from rpo_fast.train.config import TrainConfig
    from rpo_fast.train.families import get_family
    from rpo_fast.train.models import add_lora
    from rpo_fast.train.optim import make_optimizer
    from rpo_fast.train.ref_model import adapters_disabled, frozen_copy

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xl, cfg, low = model == "sdxl", configs(model == "sdxl", tiny), torch.bfloat16
    n, s = 2 * pairs, cfg["unet"]["sample_size"]
    pixels = s * 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    autocast = lambda: torch.autocast(device.type, dtype=low)
    run = lambda f: timed(f, repeats, device, warmups)
    ms: Dict[str, float] = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)

    with torch.device(device):  # weights initialized where they live: SDXL's 2.6 B take seconds, not minutes
        texts = [(CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**t)).to(low).eval()
                 for i, t in enumerate(cfg["texts"])]
        vae = AutoencoderKL(**cfg["vae"]).to(torch.float32 if xl else low).eval()
        unet = UNet2DConditionModel(**cfg["unet"])

    # What the official trainer computes every step and rpo-fast's caches hold.
    ids = torch.randint(0, cfg["texts"][0]["vocab_size"], (pairs, 77), generator=gen).to(device)
    with torch.no_grad():
        ms["text encoder(s)"] = run(lambda: [t(ids, output_hidden_states=True) for t in texts])
        images = rand(n, 3, pixels, pixels).to(vae.dtype)
        ms["VAE encode"] = run(lambda: vae.encode(images).latent_dist.sample())
    del texts, vae

    latents, noise = rand(n, 4, s, s), rand(n, 4, s, s)
    context = rand(n, 77, cfg["unet"]["cross_attention_dim"])
    timesteps = torch.randint(0, 1000, (n,), generator=gen).to(device)
    added = None
    if xl:
        pooled = cfg["unet"]["projection_class_embeddings_input_dim"] - 6 * cfg["unet"]["addition_time_embed_dim"]
        added = {"text_embeds": rand(n, pooled), "time_ids": rand(n, 6)}
    predict = lambda m: m(latents, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample

    reference = frozen_copy(unet, low)
    with torch.no_grad(), autocast():  # as Reference.ref_pred runs it
        ref_pred = predict(reference)
        ms["reference UNet fwd"] = run(lambda: predict(reference))
    del reference

    if xl:
        unet.enable_gradient_checkpointing()
    unet.train()

    def policy_step() -> torch.Tensor:
        with autocast():
            return predict(unet)

    grad_out = rand(n, 4, s, s).to(low)  # as the loss's gradient, in the prediction's dtype
    ms["policy UNet fwd+bwd"] = run(lambda: policy_step().backward(grad_out))
    pred = policy_step().detach().requires_grad_(True)
    ms["loss fwd+bwd (eager)"] = run(
        lambda: torch.autograd.grad(eager_dpo_loss(pred, noise, ref_pred, 2 * BETA)[0], pred))
    ms["loss fwd+bwd (rpo-fast)"] = run(
        lambda: torch.autograd.grad(diffusion_dpo_loss(pred, noise, ref_pred, beta=BETA), pred))

    # The optimizers as rpo-fast builds them (its adafactor is the official SDXL script's settings);
    # the official SD1.5 script's AdamW is torch's default implementation.
    config = TrainConfig(pretrained_model="-", data="-", output_dir="-")
    params = [p for p in unet.parameters() if p.requires_grad]
    official_opt = (make_optimizer(dataclasses.replace(config, optimizer="adafactor"), params, device) if xl
                    else torch.optim.AdamW(params, lr=config.learning_rate))
    ms["optimizer step (official)"] = run(official_opt.step)
    del official_opt
    fused = make_optimizer(config, params, device)
    ms["optimizer step (fused AdamW)"] = run(fused.step)
    del fused, params
    unet.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    add_lora(unet, dataclasses.replace(config, lora=True), get_family(model))
    ms["policy UNet fwd+bwd (LoRA)"] = run(lambda: policy_step().backward(grad_out))
    with torch.no_grad(), adapters_disabled(unet):
        ms["reference UNet fwd (LoRA off)"] = run(policy_step)
    return ms


def per_pair(ms: Dict[str, float], pairs: int) -> Dict[str, float]:
    """Milliseconds per pair of each configuration, from one micro-batch's components."""
    opt = pairs / PAIRS_PER_OPT_STEP  # optimizer steps per micro-batch
    # rpo-fast's full fine-tuning without its reference: policy, its loss, fused AdamW
    trained = ms["policy UNet fwd+bwd"] + ms["loss fwd+bwd (rpo-fast)"] + opt * ms["optimizer step (fused AdamW)"]
    totals = {
        "official": ms["VAE encode"] + ms["text encoder(s)"] + ms["policy UNet fwd+bwd"] + ms["reference UNet fwd"]
        + ms["loss fwd+bwd (eager)"] + opt * ms["optimizer step (official)"],
        "(a) frozen reference": trained + ms["reference UNet fwd"],
        "(b) --precompute-ref": trained,
        "(c) --lora": ms["policy UNet fwd+bwd (LoRA)"] + ms["reference UNet fwd (LoRA off)"]
        + ms["loss fwd+bwd (rpo-fast)"],
    }
    return {name: total / pairs for name, total in totals.items()}


def format_report(results: Dict[str, Dict]) -> str:
    lines = ["## Step components, measured (benchmarks/step_timing.py)", ""]
    for model, r in results.items():
        lines += [f"### {model}, M = {r['pairs']} pair(s) per micro-batch, {r['device']}", "",
                  "| component | ms per micro-batch |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in r["components_ms"].items()]
        lines += ["", "| configuration | ms per pair | × official |", "| --- | ---: | ---: |"]
        measured = r["per_pair_ms"]
        lines += [f"| {name} | {value:.2f} | {measured['official'] / value:.2f} |" for name, value in measured.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_timing", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=("sd15", "sdxl"), default=["sd15", "sdxl"])
    p.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch (the official launchers: 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per component, after one warm-up")
    p.add_argument("--warmups", type=int, default=1, help="untimed calls per component first (a dry run: 0)")
    p.add_argument("--tiny", action="store_true", help="scaled-down configs (a dry run of the code on any device)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (and the tables as .md beside)")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.repeats < 1 or args.warmups < 0:
        p.error("--pairs and --repeats: expected whole numbers >= 1; --warmups: >= 0")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its notes on casting random-weight models with .to()
    results = {}
    for model in args.models:
        ms = measure(model, pairs=args.pairs, repeats=args.repeats, tiny=args.tiny, warmups=args.warmups)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        results[model] = {"pairs": args.pairs, "device": device + (", tiny configs" if args.tiny else ""),
                          "torch": torch.__version__,
                          "components_ms": ms, "per_pair_ms": per_pair(ms, args.pairs)}
        print(format_report({model: results[model]}), flush=True)
        if args.json:  # after each model (a time limit may stop the next), and the tables beside it
            args.json.write_text(json.dumps(results, indent=1))
            args.json.with_suffix(".md").write_text(format_report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
