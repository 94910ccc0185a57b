"""Tiny random-init models of the scorer architectures, saved the way the real ones ship.

The loading code under test is the real one: an open_clip architecture JSON + checkpoint
file (as HPSv2 and open_clip tags ship), a transformers CLIPModel folder with a processor
(as PickScore ships), and an aesthetic-predictor head file (as LAION's improved aesthetic
predictor ships). Only the sizes are toy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP_NAME = "rpo-tiny-clip"
TINY_CLIP_DIM = 16


def tiny_open_clip_config(folder: Path) -> Path:
    """A ViT + text transformer open_clip architecture JSON (name = file stem); the text tower
    keeps the real 49408-token vocabulary so open_clip's own tokenizer serves it."""
    config = {
        "embed_dim": TINY_CLIP_DIM,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{TINY_CLIP_NAME}.json"
    path.write_text(json.dumps(config))
    return path


def save_tiny_open_clip(folder: Path, seed: int = 0, hps_style: bool = False) -> Path:
    """Registers the tiny config and saves random weights: ``.safetensors`` (an open_clip
    release) or, with ``hps_style``, a ``.pt`` holding ``{"state_dict": ...}`` (as HPSv2 ships)."""
    import open_clip

    open_clip.add_model_config(tiny_open_clip_config(folder))
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP_NAME)
    if hps_style:
        path = folder / f"hps_tiny_{seed}.pt"
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        from safetensors.torch import save_file

        path = folder / f"open_clip_tiny_{seed}.safetensors"
        save_file(model.state_dict(), str(path))
    return path


def save_tiny_aesthetic_head(path: Path, kind: str = "mlp", seed: int = 0) -> Path:
    """An aesthetic head for the tiny CLIP's embeddings, with the real file's key layout."""
    from rpo_fast.evaluation.scorers import AestheticMLP

    torch.manual_seed(seed)
    head = AestheticMLP(TINY_CLIP_DIM) if kind == "mlp" else torch.nn.Linear(TINY_CLIP_DIM, 1)
    torch.save(head.state_dict(), path)
    return path


def save_tiny_pickscore(folder: Path, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel plus a CLIPProcessor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from rpo_fast.demo.components import build_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(folder / "_tokenizer", num_merges=500)
    vocab = len(tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2,
                         eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=TINY_CLIP_DIM,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
