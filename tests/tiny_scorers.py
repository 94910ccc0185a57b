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


TINY_BLIP = dict(width=128, depth=2, patch=8, image=32, text_width=32, text_layers=2, text_heads=2)


def save_tiny_bert_vocab(folder: Path) -> Path:
    """A WordPiece vocab.txt in a folder (BertTokenizer.from_pretrained reads it): BERT's special
    tokens, a few words, and every letter as a word start and a continuation, so that any
    lowercase prompt has tokens."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "cat", "dog", "red", "house", "sea", "on",
             "by", "chair", ",", ".", *[c for c in letters if c != "a"], *[f"##{c}" for c in letters]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def tiny_image_reward_state(vocab_size: int, seed: int = 0, max_positions: int = 40) -> dict:
    """Random weights in ImageReward.pt's own key layout (BLIP's timm-style ViT ``blip.visual_encoder``,
    its BERT ``blip.text_encoder`` with cross-attention, the head ``mlp.layers``), plus keys of
    BLIP_Pretrain that the reward does not use, as the real file has."""
    g = torch.Generator().manual_seed(seed)
    t = TINY_BLIP
    W, H, P = t["width"], t["text_width"], t["patch"]

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def norm(prefix, width):
        return {f"{prefix}.weight": 1 + rand(width, scale=0.1), f"{prefix}.bias": rand(width)}

    def linear(prefix, n_out, n_in):
        return {f"{prefix}.weight": rand(n_out, n_in, scale=n_in ** -0.5), f"{prefix}.bias": rand(n_out)}

    v = "blip.visual_encoder."
    # The ViT's input small (variance ~1e-5), so that its first LayerNorm's eps (BLIP's 1e-6, not
    # transformers' default 1e-5) shows in the scores.
    small = 3e-3
    state = {v + "cls_token": rand(1, 1, W, scale=0.5 * small),
             v + "pos_embed": rand(1, (t["image"] // P) ** 2 + 1, W, scale=0.5 * small),
             **{k: x * small for k, x in linear(v + "patch_embed.proj", W, 3 * P * P).items()}}
    state[v + "patch_embed.proj.weight"] = state[v + "patch_embed.proj.weight"].reshape(W, 3, P, P)
    for i in range(t["depth"]):
        b = f"{v}blocks.{i}."
        state.update({**norm(b + "norm1", W), **linear(b + "attn.qkv", 3 * W, W), **linear(b + "attn.proj", W, W),
                      **norm(b + "norm2", W), **linear(b + "mlp.fc1", 2 * W, W), **linear(b + "mlp.fc2", W, 2 * W)})
    state.update(norm(v + "norm", W))
    e = "blip.text_encoder."
    state.update({e + "embeddings.word_embeddings.weight": rand(vocab_size, H, scale=1.0),
                  e + "embeddings.position_embeddings.weight": rand(max_positions, H, scale=0.5),
                  e + "embeddings.position_ids": torch.arange(max_positions).expand(1, -1),
                  **norm(e + "embeddings.LayerNorm", H)})
    for i in range(t["text_layers"]):
        b = f"{e}encoder.layer.{i}."
        for part, kv_width in (("attention", H), ("crossattention", W)):
            state.update({**linear(f"{b}{part}.self.query", H, H), **linear(f"{b}{part}.self.key", H, kv_width),
                          **linear(f"{b}{part}.self.value", H, kv_width), **linear(f"{b}{part}.output.dense", H, H),
                          **norm(f"{b}{part}.output.LayerNorm", H)})
        state.update({**linear(b + "intermediate.dense", 2 * H, H), **linear(b + "output.dense", H, 2 * H),
                      **norm(b + "output.LayerNorm", H)})
    for i, (n_out, n_in) in zip((0, 2, 4, 6, 7), ((1024, H), (128, 1024), (64, 128), (16, 64), (1, 16))):
        state.update(linear(f"mlp.layers.{i}", n_out, n_in))
    state.update({"blip.vision_proj.weight": rand(8, W), "blip.text_proj.weight": rand(8, H)})  # not used
    return state


def tiny_med_config(vocab_size: int, max_positions: int = 40, **changes) -> dict:
    """med_config.json's keys (BLIP's BERT config) at the tiny sizes."""
    t = TINY_BLIP
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": t["text_width"], "initializer_range": 0.02,
            "intermediate_size": 2 * t["text_width"], "layer_norm_eps": 1e-12, "max_position_embeddings": max_positions,
            "model_type": "bert", "num_attention_heads": t["text_heads"], "num_hidden_layers": t["text_layers"],
            "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": 768,
            "add_cross_attention": True, **changes}


def save_tiny_image_reward(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """``folder/ImageReward.pt`` and ``folder/med_config.json`` as ``huggingface-cli download
    THUDM/ImageReward`` leaves them, for the vocabulary of ``tokenizer_dir`` (plus [DEC], [ENC])."""
    from transformers import BertTokenizer

    vocab_size = len(BertTokenizer.from_pretrained(str(tokenizer_dir))) + 2
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tiny_image_reward_state(vocab_size, seed), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(tiny_med_config(vocab_size), indent=2))
    return folder
