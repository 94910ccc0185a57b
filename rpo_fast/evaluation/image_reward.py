"""ImageReward (Xu et al. 2023, THUDM/ImageReward): a BLIP image-grounded text encoder and an
MLP head trained on human preference rankings; the reward, higher is better, normalized with
its package's mean and std.

Its package (``image-reward`` 1.5) installs beside our pins but does not import: it needs
OpenAI's ``clip`` (not on PyPI) and ``transformers.modeling_utils.apply_chunking_to_forward``
(gone in transformers 5). So its published weights (``ImageReward.pt``, ``med_config.json``,
as ``huggingface-cli download THUDM/ImageReward --local-dir DIR`` saves them) are loaded into
transformers' own BLIP modules, which compute what its ``ImageReward.score`` does:

* image: ``Resize(S, bicubic)``, ``CenterCrop(S)``, RGB, CLIP's mean and std (S = 224);
* ``BlipVisionModel``: BLIP's ViT (ViT-L/16 for ImageReward: width 1024, 24 blocks, 16 heads,
  LayerNorm eps 1e-6), every token after the final norm;
* prompt: BERT's uncased WordPiece tokenizer plus BLIP's ``[DEC]`` and ``[ENC]`` tokens, padded
  and truncated to 35 tokens;
* ``BlipTextModel`` (the BERT of ``med_config.json``, each layer's cross-attention reading the
  image tokens, bidirectional self-attention) -> the ``[CLS]`` state -> the MLP head (the
  layout of :class:`~rpo_fast.evaluation.scorers.AestheticMLP`) -> ``(r - 0.16717...) / 1.03333...``.

The image size, patch size, width and depth of the ViT are read from the checkpoint's shapes
(BLIP's ViTs have 64-wide heads); the BERT's sizes from ``med_config.json``.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from PIL import Image

from .sources import check_local_or_hub, hub_alternative

OPTION = "--image-reward"
TOKENIZER_OPTION = "--image-reward-tokenizer"
HUB_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"
MAX_LENGTH = 35                                    # tokens per prompt, as ImageReward.score
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # the reward's normalization, as ImageReward
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64                                    # of BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)

VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp."
IGNORED = {TEXT + "embeddings.position_ids"}       # a buffer of 0, 1, 2, ... (not saved by transformers)

# transformers' BlipVisionModel names -> BLIP's (timm-style ViT) names; the text encoder's and
# the head's names are the same in both.
_VISION_NAMES = (
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding", "pos_embed"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
)


def _get_it(folder) -> str:
    return f"get it with `huggingface-cli download {HUB_REPO} --local-dir {folder}`"


def image_reward_files(source) -> Tuple[Path, Path]:
    """``(checkpoint, med_config.json)`` of ``source``: the folder holding both, or the
    checkpoint file (``.pt`` or ``.safetensors``) with ``med_config.json`` beside it."""
    path = Path(source).expanduser()
    if path.is_dir():
        checkpoint = path / CHECKPOINT
        if not checkpoint.is_file() and (path / "ImageReward.safetensors").is_file():
            checkpoint = path / "ImageReward.safetensors"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{OPTION}: no {CHECKPOINT} in {path} (looked for {checkpoint}); {_get_it(path)}")
    elif path.is_file():
        checkpoint = path
    else:
        raise FileNotFoundError(f"{OPTION}: no folder or file at {path} (the folder of {CHECKPOINT} and "
                                f"{MED_CONFIG}; {_get_it('DIR')})")
    med_config = checkpoint.parent / MED_CONFIG
    if not med_config.is_file():
        raise FileNotFoundError(f"{OPTION}: no {MED_CONFIG} beside {checkpoint.name} (looked for {med_config}); "
                                f"{_get_it(checkpoint.parent)}")
    return checkpoint, med_config


def _read_state(checkpoint: Path, allow_pickle: bool, shapes_only: bool = False) -> Dict[str, torch.Tensor]:
    """The checkpoint's tensors; ``shapes_only``: without reading their data (memory-mapped, or
    meta tensors for safetensors)."""
    try:
        if checkpoint.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            if not shapes_only:
                return load_file(str(checkpoint))
            with safe_open(str(checkpoint), "pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        load = dict(map_location="cpu", weights_only=not allow_pickle)
        try:
            state = torch.load(checkpoint, mmap=shapes_only, **load)
        except RuntimeError as e:
            if not (shapes_only and "mmap" in str(e)):
                raise
            state = torch.load(checkpoint, **load)  # saved in torch's legacy format, which cannot be mapped
    except pickle.UnpicklingError as e:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):
            raise ValueError(f"{OPTION}: {checkpoint} holds pickled objects besides tensors ({found[1]}); if you "
                             "trust its source, allow unpickling (--allow-pickle)") from None
        found = re.search(r"WeightsUnpickler error:\s*(\S.*)", str(e))
        raise ValueError(f"{OPTION}: cannot read {checkpoint} "
                         f"({found[1] if found else str(e).strip().splitlines()[0]})") from None
    except Exception as e:  # a truncated or foreign file: the readers' many errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{OPTION}: cannot read {checkpoint} ({reason})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{OPTION}: {checkpoint}: expected a state dict of tensors")
    return state


def _not_image_reward(checkpoint: Path, state, missing: List[str]) -> ValueError:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return ValueError(f"{OPTION}: {checkpoint} is not an ImageReward checkpoint (keys {VISION}*, {TEXT}*, "
                      f"{HEAD}layers.*): missing {shown}; it holds {', '.join(sorted(state)[:3]) or 'nothing'}...")


def _configs(state, checkpoint: Path, med_config: Path):
    """The BlipVisionConfig read from the checkpoint's shapes and the BlipTextConfig of
    ``med_config.json``."""
    from transformers import BlipTextConfig, BlipVisionConfig

    needed = [VISION + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")]
    if any(k not in state for k in needed):
        raise _not_image_reward(checkpoint, state, [k for k in needed if k not in state])
    width, patch = state[VISION + "cls_token"].shape[-1], state[VISION + "patch_embed.proj.weight"].shape[-1]
    tokens = state[VISION + "pos_embed"].shape[-2] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens or width % HEAD_WIDTH:
        raise ValueError(f"{OPTION}: {checkpoint}: a ViT of {tokens} patches and width {width} is not BLIP's "
                         f"(a square grid of patches, {HEAD_WIDTH}-wide heads)")
    depth = 1 + max(int(m[1]) for k in state if (m := re.match(re.escape(VISION) + r"blocks\.(\d+)\.", k)))
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=state[VISION + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=width // HEAD_WIDTH, image_size=grid * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6)
    try:
        med = json.loads(med_config.read_text())
        text = BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"], intermediate_size=med["intermediate_size"],
            max_position_embeddings=med.get("max_position_embeddings", 512), hidden_act=med.get("hidden_act", "gelu"),
            layer_norm_eps=med.get("layer_norm_eps", 1e-12), pad_token_id=med.get("pad_token_id", 0),
            encoder_hidden_size=width, is_decoder=True,  # is_decoder: each layer gets its cross-attention
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            bos_token_id=None, eos_token_id=None, sep_token_id=None)  # (used by generation only)
    except Exception as e:  # unreadable, not JSON, a key missing, a value of another type
        what = f"no {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ValueError(f"{OPTION}: {med_config}: not a BERT config of BLIP's ({what})") from None
    return vision, text


def _original_name(prefix: str, name: str) -> str:
    if prefix != VISION:
        return prefix + name
    for pattern, original in _VISION_NAMES:
        if match := re.fullmatch(pattern, name):
            return prefix + match.expand(original)
    raise RuntimeError(f"BlipVisionModel parameter {name!r}: no ImageReward name for it (another transformers?)")


def build_image_reward(source, allow_pickle: bool = False, check_only: bool = False):
    """``(vision, text, head)`` with the checkpoint's weights, all in eval mode (fp32, CPU);
    ``check_only``: only checks the files, keys and shapes (the checkpoint memory-mapped) and
    returns the three on the meta device, without weights."""
    from transformers import BlipTextModel, BlipVisionModel

    from .scorers import AestheticMLP

    checkpoint, med_config = image_reward_files(source)
    state = _read_state(checkpoint, allow_pickle, shapes_only=check_only)
    vision_config, text_config = _configs(state, checkpoint, med_config)
    try:
        with torch.device("meta" if check_only else "cpu"):
            parts = {VISION: BlipVisionModel(vision_config), TEXT: BlipTextModel(text_config, add_pooling_layer=False),
                     HEAD: AestheticMLP(text_config.hidden_size)}
    except ValueError as e:  # sizes that do not go together (heads and width)
        raise ValueError(f"{OPTION}: {med_config}: {' '.join(str(e).split())}") from None
    shapes = {prefix: {name: p.shape for name, p in module.state_dict().items()} for prefix, module in parts.items()}
    names = {prefix: {_original_name(prefix, name): name for name in shapes[prefix]} for prefix in parts}
    missing = [key for keys in names.values() for key in keys if key not in state]
    if missing:
        raise _not_image_reward(checkpoint, state, missing)
    unexpected = sorted(k for k in state if k.startswith(tuple(parts)) and k not in IGNORED
                        and not any(k in keys for keys in names.values()))
    wrong = [f"{key} of shape {tuple(state[key].shape)}, not {tuple(shapes[prefix][name])}"
             for prefix, keys in names.items() for key, name in keys.items()
             if state[key].shape != shapes[prefix][name]]
    if unexpected or wrong:
        what = wrong[:2] + [f"unexpected {k}" for k in unexpected[:2]]
        raise ValueError(f"{OPTION}: {checkpoint} does not fit its {MED_CONFIG} ({med_config}): "
                         f"{'; '.join(what)}{' ...' if len(wrong) + len(unexpected) > len(what) else ''}")
    if check_only:
        return parts[VISION], parts[TEXT], parts[HEAD]
    for prefix, module in parts.items():
        module.load_state_dict({name: state[key] for key, name in names[prefix].items()}, strict=True)
        module.eval()
    return parts[VISION], parts[TEXT], parts[HEAD]


def check_image_reward(source, tokenizer=DEFAULT_TOKENIZER, allow_pickle: bool = False) -> None:
    """Fails fast (before hours of generation) on missing files, keys or wrong shapes, and on
    a tokenizer that is not the text encoder's."""
    _, text, _ = build_image_reward(source, allow_pickle, check_only=True)
    load_blip_tokenizer(tokenizer, text.config.vocab_size)


def load_blip_tokenizer(source, vocab_size: int):
    """BERT's uncased tokenizer (a local folder or hub id) plus BLIP's ``[DEC]`` and ``[ENC]``:
    as many tokens as the text encoder's ``vocab_size`` (30522 + 2 for ``bert-base-uncased``)."""
    from transformers import BertTokenizer

    check_local_or_hub(TOKENIZER_OPTION, str(source), hub_alternative(str(source)))
    try:
        tokenizer = BertTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{TOKENIZER_OPTION}: cannot load a BERT tokenizer from {source} ({reason})") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tokenizer) != vocab_size:  # (a folder without vocab.txt loads as 5 special tokens, silently)
        raise ValueError(f"{TOKENIZER_OPTION}: {source} has {len(tokenizer)} tokens with [DEC] and [ENC], "
                         f"ImageReward's text encoder {vocab_size} (bert-base-uncased: 30522 + 2)")
    return tokenizer


class ImageRewardScorer:
    """ImageReward from its published weights (``source``: the folder with ``ImageReward.pt`` and
    ``med_config.json``, or that ``.pt`` / a ``.safetensors`` file) and BERT's tokenizer."""

    names = ["image_reward"]

    def __init__(self, source, tokenizer=DEFAULT_TOKENIZER, *, device="cpu", dtype=torch.float32,
                 allow_pickle: bool = False):
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

        vision, text, head = build_image_reward(source, allow_pickle)
        self.tokenizer = load_blip_tokenizer(tokenizer, text.config.vocab_size)
        self.vision, self.text = vision.to(device=device, dtype=dtype), text.to(device=device, dtype=dtype)
        self.head, self.device, self.dtype = head.to(device), device, dtype
        size = vision.config.image_size
        self.preprocess = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                                   lambda image: image.convert("RGB"), ToTensor(), Normalize(CLIP_MEAN, CLIP_STD)])

    @torch.inference_mode()
    def __call__(self, prompts: List[str], images: List[Image.Image]) -> Dict[str, torch.Tensor]:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)
        hidden = self.text(input_ids=text.input_ids, attention_mask=text.attention_mask,
                           encoder_hidden_states=image_tokens,
                           encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long,
                                                             device=self.device)).last_hidden_state
        reward = self.head(hidden[:, 0].float()).squeeze(-1)
        return {"image_reward": ((reward - MEAN) / STD).cpu()}
