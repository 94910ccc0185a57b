"""The components of a DPO training step, timed on the real SD1.5 (512 px), SDXL, SD3.5-medium,
SD3.5-large and FLUX.1-dev (1024 px) architectures, on a GPU: what docs/step-budget.md and
docs/sd3-flux.md estimate on paper, measured.

    python -m benchmarks.step_timing [--models sd15 sdxl sd35m sd35l flux-dev] [--pairs 1] [--repeats 3] [--warmups 1] [--json F] [--tiny]

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

SD3.5 and FLUX.1 (:func:`measure_flow`, :func:`flow_per_pair`): the inputs built and the
transformer called by the trainer's family methods; the encoders (CLIP-L, SD3's CLIP-G, T5-XXL
at the family's length) and the transformers built in bf16 on the device, one model there at a
time; the LoRA policy (the trainer's default rank and targets) with gradient checkpointing, its
reference the adapters disabled, rpo-fast's loss; SD3.5-medium also fully fine-tuned (fp32
weights, bf16 autocast, checkpointing, fused AdamW over ``FLOW_PAIRS_PER_OPT_STEP`` pairs).
Their rows: no caches (diffusers' scripts without precomputed embeddings: encoders and VAE every
step), rpo-fast's LoRA from the caches, and SD3.5-medium's full fine-tuning.

docs/step-budget.md puts the on-paper estimates beside these numbers. ``--tiny`` runs the same code on scaled-down
configs (what the tests and the GPU check's dry run use). torch.compile is not timed (compiling
SDXL takes minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
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

# SD3.5-medium's and SD3.5-large's SD3Transformer2DModel, FLUX.1-dev's FluxTransformer2DModel,
# their 16-channel VAE (no quant convs) and T5 v1.1-XXL's encoder (CLIP-L and CLIP-G as above).
# Built on the meta device they have docs/sd3-flux.md's parameter counts (tests/test_step_timing.py).
SD35M_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=list(range(13)))
SD35L_TRANSFORMER = dict(SD35M_TRANSFORMER, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                         pos_embed_max_size=192, dual_attention_layers=[])
FLUX_DEV_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                            guidance_embeds=True, axes_dims_rope=[16, 56, 56])
VAE_16 = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              tie_word_embeddings=False, dropout_rate=0.0)
# model: (rpo-fast's family, transformer config)
FLOW_MODELS = {"sd35m": ("sd3", SD35M_TRANSFORMER), "sd35l": ("sd3", SD35L_TRANSFORMER),
               "flux-dev": ("flux", FLUX_DEV_TRANSFORMER)}
FLOW_RESOLUTION = 1024  # both families' native size: 128 x 128 latents
FULL_FINE_TUNED = ("sd35m",)  # the one whose full fine-tuning fits one 80 GB GPU (docs/sd3-flux.md)
# per GPU: docs/sd3-flux.md's one-GPU launch lines, 2 pairs x 16 accumulated (SD3.5-medium) or 1 x 32 (FLUX.1-dev)
FLOW_PAIRS_PER_OPT_STEP = 32
FLOW_LORA_RANK = 16  # the launch lines' --lora-rank

# Scaled-down configs with the real ones' structure (--tiny): latents 8 x 8, images 16 px.
TINY_UNET = dict(sample_size=8, block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, layers_per_block=1)
TINY_UNET_XL = dict(sample_size=8, block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4],
                    cross_attention_dim=32, transformer_layers_per_block=[1, 1, 1], layers_per_block=1,
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
TINY_VAE = dict(block_out_channels=[32, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1)
TINY_CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)
# The flow models' (latents 8 x 8, images 16 px): SD3's T5 width 64 holds the two CLIP widths it pads to
TINY_SD3 = dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
TINY_FLUX = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
TINY_T5 = dict(vocab_size=1000, d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2)
TINY_RESOLUTION = 16


def configs(xl: bool, tiny: bool) -> Dict[str, object]:
    unet = dict(SDXL_UNET if xl else SD15_UNET)
    vae, texts = dict(VAE), [dict(CLIP_L)] + ([dict(CLIP_BIGG)] if xl else [])
    if tiny:
        unet.update(TINY_UNET_XL if xl else TINY_UNET)
        vae.update(TINY_VAE)
        texts = [dict(t, **TINY_CLIP) for t in texts]
    return {"unet": unet, "vae": vae, "texts": texts}


def flow_configs(model: str, tiny: bool) -> Dict[str, object]:
    """``model``'s (``sd35m``, ``sd35l`` or ``flux-dev``) configs: its family, transformer, VAE,
    CLIP encoders, T5 encoder and image size; ``tiny``: scaled down, the structure kept (the
    double and single streams, SD3.5-medium's dual-attention layers, the 16 latent channels,
    the T5 lengths)."""
    family, transformer = FLOW_MODELS[model]
    transformer, vae, t5 = dict(transformer), dict(VAE_16), dict(T5_XXL)
    texts = [dict(CLIP_L)] + ([dict(CLIP_BIGG)] if family == "sd3" else [])
    resolution = FLOW_RESOLUTION
    if tiny:
        transformer.update(TINY_SD3 if family == "sd3" else TINY_FLUX)
        if transformer.get("dual_attention_layers"):
            transformer["dual_attention_layers"] = [0]
        vae.update(TINY_VAE)
        texts = [dict(t, **TINY_CLIP) for t in texts]
        t5.update(TINY_T5)
        resolution = TINY_RESOLUTION
    return {"family": family, "transformer": transformer, "vae": vae, "texts": texts, "t5": t5,
            "resolution": resolution}


def flow_transformer(cfg: Dict[str, object]) -> torch.nn.Module:
    """The configs' transformer, built where ``torch.device`` and the default dtype say."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if cfg["family"] == "sd3" else FluxTransformer2DModel
    return cls(**cfg["transformer"])


def flow_text_encoders(cfg: Dict[str, object]) -> List[torch.nn.Module]:
    """As the family loads them: SD3's CLIP-L and CLIP-G with projections, FLUX.1's CLIP-L
    without; then T5's encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = CLIPTextModelWithProjection if cfg["family"] == "sd3" else CLIPTextModel
    return [clip(CLIPTextConfig(**t)) for t in cfg["texts"]] + [T5EncoderModel(T5Config(**cfg["t5"]))]


@contextlib.contextmanager
def built_in(device: torch.device, dtype: torch.dtype):
    """Modules constructed here get their weights on ``device`` in ``dtype`` from the start:
    FLUX.1's 11.9 B parameters never exist in fp32 (48 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _free(device: torch.device) -> None:
    if device.type == "cuda":  # the modules' reference cycles, then the allocator's cache
        gc.collect()
        torch.cuda.empty_cache()


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
    (``sd15``, ``sdxl`` or one of ``FLOW_MODELS``: :func:`measure_flow`) on ``device`` (default:
    CUDA if present, else the CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from rpo_fast import diffusion_dpo_loss
    from rpo_fast.train.config import TrainConfig
    from rpo_fast.train.families import get_family
    from rpo_fast.train.models import add_lora
    from rpo_fast.train.optim import make_optimizer
    from rpo_fast.train.ref_model import adapters_disabled, frozen_copy

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model in FLOW_MODELS:
        return measure_flow(model, pairs=pairs, repeats=repeats, device=device, tiny=tiny, warmups=warmups)
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


def measure_flow(model: str, *, pairs: int = 1, repeats: int = 3, device: Optional[torch.device] = None,
                 tiny: bool = False, warmups: int = 1) -> Dict[str, float]:
    """:func:`measure` for SD3.5 and FLUX.1 at 1024 px: the inputs built and the transformer
    called by the family's own methods (``encode``, ``conditioning``, ``timestep_draw``,
    ``noisy_and_target``, ``predict``: T5's length, SD3's padded states, Flux's packing,
    position ids and guidance), one model on the device at a time."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    from rpo_fast import diffusion_dpo_loss
    from rpo_fast.train.config import TrainConfig
    from rpo_fast.train.families import get_family
    from rpo_fast.train.forward import UNetInputs, predict
    from rpo_fast.train.models import add_lora
    from rpo_fast.train.optim import make_optimizer
    from rpo_fast.train.ref_model import adapters_disabled, frozen_copy

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, low = flow_configs(model, tiny), torch.bfloat16
    config = TrainConfig(pretrained_model="-", data="-", output_dir="-", mixed_precision="bf16",
                         gradient_checkpointing=True)
    family = get_family(cfg["family"], config)
    family.guidance = bool(cfg["transformer"].get("guidance_embeds"))  # as Flux.load sets it
    n, resolution = 2 * pairs, cfg["resolution"]
    side = resolution // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    autocast = lambda: torch.autocast(device.type, dtype=low)
    run = lambda f: timed(f, repeats, device, warmups)
    ms: Dict[str, float] = {}
    gen = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)

    # What diffusers' scripts compute every step without precomputed embeddings and rpo-fast's
    # caches hold: the prompts through the encoders in bf16, T5 at the family's length (the
    # trainer's tokenize: at most T5's 512), and the images through the VAE (SD3's script keeps
    # it in fp32, Flux's in bf16).
    with built_in(device, low):
        encoders = [e.to(low).eval() for e in flow_text_encoders(cfg)]
    t5_length = min(family.max_sequence_length, 512)
    ids = [torch.randint(0, t["vocab_size"], (pairs, 77), generator=gen).to(device) for t in cfg["texts"]]
    ids.append(torch.randint(0, cfg["t5"]["vocab_size"], (pairs, t5_length), generator=gen).to(device))
    with torch.no_grad():
        hidden, pooled = family.encode(encoders, ids, device)
        ms["text encoders"] = run(lambda: family.encode(encoders, ids, device))
    del encoders
    _free(device)
    vae_dtype = torch.float32 if cfg["family"] == "sd3" else low
    with built_in(device, vae_dtype):
        vae = AutoencoderKL(**cfg["vae"]).to(vae_dtype).eval()
    with torch.no_grad():
        images = rand(n, 3, resolution, resolution).to(vae_dtype)
        latent_shape = vae.encode(images).latent_dist.sample().shape
        ms["VAE encode"] = run(lambda: vae.encode(images).latent_dist.sample())
    del vae, images
    _free(device)

    # The transformer's inputs as forward.unet_inputs builds them: both images of a pair with
    # the same noise, timestep and prompt. The prompt embeddings: the encoders' shapes, drawn
    # anew (random weights' outputs may have any size; a pass's time does not depend on it).
    latents, noise = rand(*latent_shape), rand(*latent_shape)
    assert latent_shape == (n, 16, side, side), latent_shape
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    draw = family.timestep_draw(scheduler, config)
    indices = torch.tensor([draw(gen) for _ in range(pairs)] * 2, device=device)
    models = SimpleNamespace(noise_scheduler=scheduler, weighting_scheme=config.weighting_scheme)
    noisy, timesteps, target, _ = family.noisy_and_target(models, latents, noise, indices)
    hidden, pooled = rand(*hidden.shape).repeat(2, 1, 1), rand(*pooled.shape).repeat(2, 1)
    x = UNetInputs(noisy, timesteps, hidden, family.conditioning(pooled, resolution), target, family)

    full = model in FULL_FINE_TUNED
    # the trained weights in fp32 for full fine-tuning; else the frozen base in bf16 from the start
    with built_in(device, torch.float32 if full else low):
        transformer = flow_transformer(cfg)
    if not full:
        transformer.to(low)  # what the default dtype missed (SD3's positional table is built in fp32)
    reference = frozen_copy(transformer, low) if full else transformer.requires_grad_(False).eval()
    with torch.no_grad(), autocast():  # as Reference.ref_pred runs it
        ref_pred = predict(reference, x)
        ms["reference transformer fwd"] = run(lambda: predict(reference, x))
    del reference
    _free(device)

    transformer.enable_gradient_checkpointing()
    transformer.train()

    def policy_step() -> torch.Tensor:
        with autocast():
            return predict(transformer, x)

    grad_out = torch.randn_like(ref_pred)  # as the loss's gradient, in the prediction's dtype
    if full:  # fp32 weights under bf16 autocast, checkpointed; fused AdamW as rpo-fast builds it
        transformer.requires_grad_(True)
        ms["policy transformer fwd+bwd (full)"] = run(lambda: policy_step().backward(grad_out))
        params = [p for p in transformer.parameters() if p.requires_grad]
        fused = make_optimizer(config, params, device)
        ms["optimizer step (fused AdamW)"] = run(fused.step)
        del fused, params
        transformer.zero_grad(set_to_none=True)
        transformer.to(low)  # LoRA's frozen base in bf16, as the trainer casts it
        _free(device)

    add_lora(transformer, dataclasses.replace(config, lora=True, lora_rank=FLOW_LORA_RANK), family)
    ms["policy transformer fwd+bwd (LoRA)"] = run(lambda: policy_step().backward(grad_out))
    with torch.no_grad():
        pred = policy_step().requires_grad_(True)  # the loss's input, without the policy's graph
        with adapters_disabled(transformer):
            ms["reference transformer fwd (LoRA off)"] = run(policy_step)
    ms["loss fwd+bwd (rpo-fast)"] = run(
        lambda: torch.autograd.grad(diffusion_dpo_loss(pred, target, ref_pred, beta=BETA), pred))
    del transformer, pred
    _free(device)
    return ms


def per_pair(ms: Dict[str, float], pairs: int) -> Dict[str, float]:
    """Milliseconds per pair of each configuration, from one micro-batch's components (SD1.5's
    and SDXL's, or the flow models': :func:`flow_per_pair`)."""
    if "policy UNet fwd+bwd" not in ms:
        return flow_per_pair(ms, pairs)
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


def flow_per_pair(ms: Dict[str, float], pairs: int) -> Dict[str, float]:
    """SD3.5's and FLUX.1's configurations per pair, the first the baseline: diffusers' scripts
    without precomputed embeddings (the encoders and the VAE every step, the LoRA policy, its
    adapters-off reference; with rpo-fast's loss, so that the rows differ by the caches alone);
    rpo-fast's LoRA (latents and prompts from the caches); where measured (SD3.5-medium), full
    fine-tuning with a frozen bf16 reference and with ``--precompute-ref``. The adapters'
    optimizer, a few MB, is left out as on paper."""
    lora = ms["policy transformer fwd+bwd (LoRA)"] + ms["reference transformer fwd (LoRA off)"] \
        + ms["loss fwd+bwd (rpo-fast)"]
    totals = {"no caches": ms["text encoders"] + ms["VAE encode"] + lora, "rpo-fast LoRA (caches)": lora}
    if "policy transformer fwd+bwd (full)" in ms:
        trained = ms["policy transformer fwd+bwd (full)"] + ms["loss fwd+bwd (rpo-fast)"] \
            + pairs / FLOW_PAIRS_PER_OPT_STEP * ms["optimizer step (fused AdamW)"]
        totals["rpo-fast full, frozen reference"] = trained + ms["reference transformer fwd"]
        totals["rpo-fast full, --precompute-ref"] = trained
    return {name: total / pairs for name, total in totals.items()}


def format_report(results: Dict[str, Dict]) -> str:
    lines = ["## Step components, measured (benchmarks/step_timing.py)", ""]
    for model, r in results.items():
        lines += [f"### {model}, M = {r['pairs']} pair(s) per micro-batch, {r['device']}", "",
                  "| component | ms per micro-batch |", "| --- | ---: |"]
        lines += [f"| {k} | {v:.2f} |" for k, v in r["components_ms"].items()]
        measured = r["per_pair_ms"]
        baseline = next(iter(measured))  # SD: the official trainer; SD3.5 and FLUX.1: no caches
        lines += ["", f"| configuration | ms per pair | × {baseline} |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {value:.2f} | {measured[baseline] / value:.2f} |" for name, value in measured.items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_timing", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=("sd15", "sdxl", *FLOW_MODELS), default=["sd15", "sdxl"],
                   help="sd15 sdxl (default), sd35m sd35l flux-dev")
    p.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch (the official launchers: 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per component, after one warm-up")
    p.add_argument("--warmups", type=int, default=1, help="untimed calls per component first (a dry run: 0)")
    p.add_argument("--tiny", action="store_true", help="scaled-down configs (a dry run of the code on any device)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (and the tables as .md beside)")
    p.add_argument("--append", action="store_true",
                   help="keep the models already in --json's file (one measured again is replaced)")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.repeats < 1 or args.warmups < 0:
        p.error("--pairs and --repeats: expected whole numbers >= 1; --warmups: >= 0")
    if args.append and args.json is None:
        p.error("--append: adds to --json's file; give --json")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its notes on casting random-weight models with .to()
    results = json.loads(args.json.read_text()) if args.append and args.json.exists() else {}
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
