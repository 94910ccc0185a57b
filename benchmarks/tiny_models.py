"""Tiny Stable Diffusion 1.5-like, XL-like, SD3-like and FLUX.1-like pipelines, built from configs
and saved locally: fixtures of the tests and the benchmarks, not part of any command.

No model hub is reachable on the machines that build and test rpo-fast, so the tests and the
benchmarks build these: the real architectures (UNet2DConditionModel,
CLIPTextModel(WithProjection), AutoencoderKL, DDPMScheduler; for the flow-matching models
SD3Transformer2DModel / FluxTransformer2DModel, T5EncoderModel, a 16-channel AutoencoderKL and
FlowMatchEulerDiscreteScheduler) at toy sizes, saved with
``save_pretrained`` in the diffusers pipeline layout, so that the real loading code
(``from_pretrained`` of a folder) is what reads them. Needs rpo-fast's [train] and [eval]
extras (diffusers, transformers; open_clip's BPE vocabulary for the CLIP tokenizers; the T5
tokenizer is built with the ``tokenizers`` library, no sentencepiece model).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rpo_fast.demo.components import PathLike, build_tokenizer, tiny_scheduler, tiny_text_encoder


def _vae(latent_channels: int = 4, block_out_channels: Sequence[int] = (16, 32), **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(block_out_channels),
        block_out_channels=list(block_out_channels),
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        **extra,
    )


def _unet(sample_size: int, block_out_channels: Sequence[int], **extra):
    """A UNet2DConditionModel with SD's block layout (cross-attention below the top level)."""
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=list(block_out_channels),
        layers_per_block=1,
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (levels - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (levels - 1) + ["UpBlock2D"],
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


@dataclass(frozen=True)
class TinySizes:
    """The sizes of a tiny pipeline (the keyword arguments of both builders)."""

    sample_size: int = 8
    block_out_channels: Sequence[int] = (32, 64)
    text_hidden: int = 32
    text_layers: int = 2
    num_merges: int = 1000
    prediction_type: str = "epsilon"
    seed: int = 0


def build_tiny_sd15(save_dir: PathLike, **sizes) -> Path:
    """Saves a tiny SD1.5-architecture pipeline (unet, vae, text_encoder, tokenizer,
    scheduler) to ``save_dir`` and returns it; ``sizes``: TinySizes' fields. The tiny VAE (two
    blocks) downsamples by 2, so the UNet's native images are ``2 * sample_size`` pixels (any
    multiple of 4 works)."""
    from diffusers import StableDiffusionPipeline

    z = TinySizes(**sizes)
    torch.manual_seed(z.seed)
    save_dir = Path(save_dir)
    tokenizer = build_tokenizer(save_dir / "tokenizer", z.num_merges)
    text_encoder = tiny_text_encoder(len(tokenizer), z.text_hidden, z.text_hidden, 77, with_projection=False,
                                     num_layers=z.text_layers)
    unet = _unet(z.sample_size, z.block_out_channels, cross_attention_dim=z.text_hidden)
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(z.prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(save_dir)
    return save_dir


def build_tiny_sdxl(save_dir: PathLike, **sizes) -> Path:
    """Saves a tiny SDXL-architecture pipeline: two text encoders (the second with a
    projection giving the pooled embedding), ``text_time`` added conditioning; ``sizes``:
    TinySizes' fields."""
    from diffusers import StableDiffusionXLPipeline

    z = TinySizes(**sizes)
    torch.manual_seed(z.seed)
    save_dir = Path(save_dir)
    tokenizer = build_tokenizer(save_dir / "tokenizer", z.num_merges)
    tokenizer_2 = build_tokenizer(save_dir / "tokenizer_2", z.num_merges)
    text_encoder = tiny_text_encoder(len(tokenizer), z.text_hidden, z.text_hidden, 77, with_projection=False,
                                     num_layers=z.text_layers)
    text_encoder_2 = tiny_text_encoder(len(tokenizer_2), z.text_hidden, z.text_hidden, 77, with_projection=True,
                                       num_layers=z.text_layers)
    time_embed_dim = 8
    unet = _unet(
        z.sample_size,
        z.block_out_channels,
        cross_attention_dim=2 * z.text_hidden,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # pooled text embedding + 6 time ids (original size, crop offset, target size)
        projection_class_embeddings_input_dim=z.text_hidden + 6 * time_embed_dim,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=tiny_scheduler(z.prediction_type),
    )
    pipe.save_pretrained(save_dir)
    return save_dir


# ---------------------------------------------------------------------------------------------
# Flow-matching pipelines: SD3 (MMDiT, three text encoders) and FLUX.1 (MMDiT + single-stream
# blocks, CLIP + T5, guidance-distilled).

# Words of the prompts the tests and the demo use (the shapes task's vocabulary and a few
# common ones); any other word falls back to single characters, anything else to <unk>.
_T5_WORDS = (
    "a an the of and with in on at to is by for from this that photo picture painting image drawing of "
    "small large big tiny red green blue yellow black white gray grey orange purple pink brown "
    "circle square triangle shape background left right center centre top bottom middle "
    "cat dog house tree car person man woman sky sun water flower"
).split()
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"


def build_t5_tokenizer(save_dir: PathLike, max_length: int = 32):
    """A T5-style tokenizer built offline (no sentencepiece model): a ``tokenizers`` Unigram
    model with T5's special ids (<pad>=0, </s>=1, <unk>=2), whole-word pieces for the words of
    typical prompts and single characters as the fallback, T5's Metaspace pre-tokenization and
    ``</s>`` appended to every sequence. Saved as tokenizer.json + tokenizer_config.json (no
    sentinel ``<extra_id_*>`` tokens) so that ``T5TokenizerFast.from_pretrained(save_dir)``
    loads it; returns that loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast, T5TokenizerFast

    space = "\u2581"  # sentencepiece's word-start marker
    pieces = [(space, -2.0)]
    pieces += [(space + w, -3.0) for w in dict.fromkeys(_T5_WORDS)]
    pieces += [(space + c, -8.0) for c in _T5_CHARS] + [(c, -9.0) for c in _T5_CHARS]
    seen, vocab = set(), [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=space, prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement=space, prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    save_dir = Path(save_dir)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    ).save_pretrained(save_dir)
    # Loaded as T5's class, without the 100 sentinel tokens it would otherwise add.
    config_file = save_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="T5Tokenizer", extra_ids=0, additional_special_tokens=[])
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return T5TokenizerFast.from_pretrained(save_dir)


def tiny_t5_encoder(vocab_size: int, d_model: int, num_layers: int):
    """A T5 v1.1-style encoder (gated GELU, untied embeddings) as SD3 and FLUX.1 use (T5-XXL)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


@dataclass(frozen=True)
class TinyFlowSizes:
    """The sizes of a tiny flow-matching pipeline (the keyword arguments of build_tiny_sd3 and
    build_tiny_flux). The VAE has the real 16 latent channels and downsamples by
    ``2 ** (len(vae_block_out_channels) - 1)`` (2 by default: 32 px images, 16x16 latents)."""

    sample_size: int = 16  # latent side of the transformer's default image (32 px)
    latent_channels: int = 16
    vae_block_out_channels: Sequence[int] = (16, 32)
    num_layers: int = 1  # SD3's joint blocks; FLUX's double-stream blocks
    num_single_layers: int = 1  # FLUX's single-stream blocks
    attention_head_dim: int = 16
    num_attention_heads: int = 2
    clip_hidden: int = 16  # each CLIP encoder's hidden size (= projection dim)
    text_layers: int = 2
    t5_hidden: int = 32  # T5 d_model (SD3 needs >= 2 * clip_hidden: the CLIP states are padded to it)
    t5_layers: int = 2
    t5_max_length: int = 32
    num_merges: int = 1000
    seed: int = 0


def build_tiny_sd3(save_dir: PathLike, **sizes) -> Path:
    """Saves a tiny SD3-architecture pipeline (transformer, vae, text_encoder(_2, _3),
    tokenizer(_2, _3), scheduler) to ``save_dir`` and returns it; ``sizes``: TinyFlowSizes'
    fields. As SD3: two CLIP encoders with projections (the pooled embedding is both
    projections, concatenated; the per-token states are concatenated and zero-padded to the T5
    width), a T5 encoder, patch size 2, the SD3 VAE's shift and scale, flow matching with shift
    3. Images need sides that are multiples of 4 (VAE factor 2 x patch 2); the positional
    embedding covers up to 64 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    z = TinyFlowSizes(**sizes)
    if z.t5_hidden < 2 * z.clip_hidden:
        raise ValueError(f"SD3 pads the CLIP states (2 x {z.clip_hidden}) to the T5 width: "
                         f"t5_hidden={z.t5_hidden} is less")
    torch.manual_seed(z.seed)
    save_dir = Path(save_dir)
    tokenizer = build_tokenizer(save_dir / "tokenizer", z.num_merges)
    tokenizer_2 = build_tokenizer(save_dir / "tokenizer_2", z.num_merges)
    tokenizer_3 = build_t5_tokenizer(save_dir / "tokenizer_3", z.t5_max_length)
    text_encoder = tiny_text_encoder(len(tokenizer), z.clip_hidden, z.clip_hidden, 77, with_projection=True,
                                     num_layers=z.text_layers)
    text_encoder_2 = tiny_text_encoder(len(tokenizer_2), z.clip_hidden, z.clip_hidden, 77, with_projection=True,
                                       num_layers=z.text_layers)
    text_encoder_3 = tiny_t5_encoder(len(tokenizer_3), z.t5_hidden, z.t5_layers)
    inner_dim = z.num_attention_heads * z.attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=z.sample_size,
        patch_size=2,
        in_channels=z.latent_channels,
        out_channels=z.latent_channels,
        num_layers=z.num_layers,
        attention_head_dim=z.attention_head_dim,
        num_attention_heads=z.num_attention_heads,
        joint_attention_dim=z.t5_hidden,
        caption_projection_dim=inner_dim,  # the context stream's width is the image stream's
        pooled_projection_dim=2 * z.clip_hidden,  # CLIP-L + CLIP-G projections
        pos_embed_max_size=2 * z.sample_size,
    )
    vae = _vae(z.latent_channels, z.vae_block_out_channels, shift_factor=0.0609, scaling_factor=1.5305,
               use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(save_dir)
    return save_dir


def build_tiny_flux(save_dir: PathLike, **sizes) -> Path:
    """Saves a tiny FLUX.1-dev-architecture pipeline (transformer, vae, text_encoder(_2),
    tokenizer(_2), scheduler) to ``save_dir`` and returns it; ``sizes``: TinyFlowSizes' fields.
    As FLUX.1-dev: CLIP's pooled output and T5's states as the conditioning, 2x2-packed latents
    (``in_channels = 4 * latent_channels``, patch size 1), guidance embedding, rotary axes
    summing to the head dimension, the FLUX VAE's shift and scale, flow matching with
    resolution-dependent shift. Images need sides that are multiples of 4 (VAE factor 2 x
    packing 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    z = TinyFlowSizes(**sizes)
    torch.manual_seed(z.seed)
    save_dir = Path(save_dir)
    tokenizer = build_tokenizer(save_dir / "tokenizer", z.num_merges)
    tokenizer_2 = build_t5_tokenizer(save_dir / "tokenizer_2", z.t5_max_length)
    text_encoder = tiny_text_encoder(len(tokenizer), z.clip_hidden, z.clip_hidden, 77, with_projection=False,
                                     num_layers=z.text_layers)
    text_encoder_2 = tiny_t5_encoder(len(tokenizer_2), z.t5_hidden, z.t5_layers)
    # FLUX's rotary axes (text/image index, row, column): 16/56/56 of 128; here 1/4 : 3/8 : 3/8.
    d = z.attention_head_dim
    axes = (d // 4, 3 * d // 8, d - d // 4 - 3 * d // 8)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * z.latent_channels,
        num_layers=z.num_layers,
        num_single_layers=z.num_single_layers,
        attention_head_dim=d,
        num_attention_heads=z.num_attention_heads,
        joint_attention_dim=z.t5_hidden,
        pooled_projection_dim=z.clip_hidden,
        guidance_embeds=True,
        axes_dims_rope=axes,
    )
    vae = _vae(z.latent_channels, z.vae_block_out_channels, shift_factor=0.1159, scaling_factor=0.3611,
               use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(save_dir)
    return save_dir
