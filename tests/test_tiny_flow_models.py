"""The tiny SD3-like and FLUX.1-like pipelines of benchmarks/tiny_models.py: saved in the
diffusers layout, they load with the real from_pretrained code, encode prompts the way a trainer
caches them and generate 32x32 images; their T5 tokenizer (built without sentencepiece) loads
as T5's."""

import json

import pytest
import torch

from benchmarks.tiny_models import TinyFlowSizes, build_t5_tokenizer

T5_MAX = TinyFlowSizes().t5_max_length
PROMPTS = ["a red circle", "a large blue square on the left on a white background"]


def _load(cls, folder):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe):
    return pipe(prompt=PROMPTS[:1], num_inference_steps=2, height=32, width=32, guidance_scale=3.0,
                output_type="pil", max_sequence_length=T5_MAX, generator=torch.Generator().manual_seed(0)).images


def test_t5_tokenizer_loads_as_t5s_and_round_trips(tmp_path):
    from transformers import T5TokenizerFast

    build_t5_tokenizer(tmp_path / "t5", max_length=T5_MAX)
    tok = T5TokenizerFast.from_pretrained(tmp_path / "t5")
    assert isinstance(tok, T5TokenizerFast) and tok.model_max_length == T5_MAX
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert not [t for t in tok.get_vocab() if t.startswith("<extra_id_")]
    ids = tok(PROMPTS[1]).input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.tokenize("a red circle") == ["\u2581a", "\u2581red", "\u2581circle"]  # whole words
    assert tok.decode(ids, skip_special_tokens=True) == PROMPTS[1]
    assert tok.decode(tok("Zebra qx 42").input_ids, skip_special_tokens=True) == "Zebra qx 42"  # by characters
    batch = tok(PROMPTS, padding="max_length", max_length=T5_MAX, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, T5_MAX) and batch.input_ids[0, -1] == tok.pad_token_id


def test_tiny_sd3(tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    index = json.loads((tiny_sd3_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert {"transformer", "vae", "text_encoder_3", "tokenizer_3", "scheduler"} <= set(index)
    pipe = _load(StableDiffusion3Pipeline, tiny_sd3_dir)
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 16
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.0609, 1.5305)
    assert pipe.scheduler.config.shift == 3.0
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, max_sequence_length=T5_MAX)
    hidden = pipe.transformer.config.joint_attention_dim
    assert embeds.shape == negative.shape == (2, pipe.tokenizer.model_max_length + T5_MAX, hidden)  # CLIP + T5 tokens
    assert pooled.shape == negative_pooled.shape == (2, pipe.transformer.config.pooled_projection_dim)
    (image,) = _generate(pipe)
    assert image.size == (32, 32)


def test_tiny_flux(tiny_flux_dir):
    from diffusers import FluxPipeline

    pipe = _load(FluxPipeline, tiny_flux_dir)
    config = pipe.transformer.config
    assert config.in_channels == 4 * pipe.vae.config.latent_channels == 64 and config.guidance_embeds
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert (pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor) == (0.1159, 0.3611)
    assert pipe.scheduler.config.use_dynamic_shifting
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, max_sequence_length=T5_MAX)
    assert embeds.shape == (2, T5_MAX, config.joint_attention_dim)
    assert pooled.shape == (2, config.pooled_projection_dim) and text_ids.shape == (T5_MAX, 3)
    (image,) = _generate(pipe)
    assert image.size == (32, 32)


def test_sd3_refuses_a_t5_narrower_than_the_clip_states(tmp_path):
    from benchmarks.tiny_models import build_tiny_sd3

    with pytest.raises(ValueError, match="T5 width"):
        build_tiny_sd3(tmp_path, clip_hidden=16, t5_hidden=16)
