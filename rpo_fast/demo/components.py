"""The demo base's parts that carry no training: a CLIP tokenizer, a toy CLIP text encoder and
SD's noise scheduler, built from configs (no model hub is reachable where rpo-fast is built).

The tokenizer is a real CLIP BPE tokenizer cut to the first ``num_merges`` merges of the
vocabulary that ships inside open_clip (``rpo-fast[eval]``): every string still tokenizes, into
more pieces. benchmarks/tiny_models.py builds the tests' and benchmarks' tiny SD pipelines
from the same parts.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def build_tokenizer(save_dir: PathLike, num_merges: int = 1000, max_length: int = 77):
    """A CLIPTokenizer with ``2 * 256 + num_merges + 2`` tokens, saved to ``save_dir``."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 1 + num_merges]
    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    save_dir = Path(save_dir)
    raw = save_dir / "_bpe"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(save_dir)
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()
    return tokenizer


def tiny_text_encoder(vocab_size: int, hidden: int, projection_dim: int, max_length: int, with_projection: bool,
                      num_layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,  # as the SD1.5 / SDXL schedulers ship
    )
