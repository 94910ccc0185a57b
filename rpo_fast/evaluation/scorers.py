"""Automatic image scorers: CLIP score and style alignment, PickScore, HPSv2, ImageReward,
aesthetic, and the shapes task's deterministic scorer; :data:`SCORERS` names them.

Every scorer maps ``(prompts, images)`` to a dict ``{metric name: (B,) float32 tensor}``,
higher is better. Each one loads its weights with the code its authors use (open_clip for
CLIP, HPSv2 and the aesthetic predictor's backbone, transformers for PickScore; ImageReward's
weights in transformers' BLIP modules, :mod:`.image_reward`), from local paths or (for
open_clip) pretrained tags; architecture names are arguments so that tests
can point them at tiny models while the defaults are the real ones.

Definitions:

* ``clip_score``: ``100 * max(cos(image, prompt), 0)`` (Hessel et al. 2021, as torchmetrics).
* ``style_prob``: zero-shot CLIP probability of the style prompt among the style prompt and
  the neutral prompts: ``softmax(logit_scale * cos(image, [style, neutral...]))[0]``.
* ``style_similarity``: mean cosine similarity of the image to the reference style images.
* ``pickscore``: ``logit_scale.exp() * cos(image, prompt)`` with the PickScore CLIP (Kirstain
  et al. 2023), as in its model card (about 18-23 for typical images).
* ``hpsv2``: ``cos(image, prompt)`` with the HPSv2 / HPSv2.1 CLIP (Wu et al. 2023), as the
  ``hpsv2`` package reports it (about 0.2-0.35).
* ``image_reward``: ImageReward (Xu et al. 2023): its MLP head on the ``[CLS]`` state of BLIP's
  text encoder reading the prompt with cross-attention to the image, normalized with its
  package's mean and std (:mod:`.image_reward`).
* ``aesthetic``: the LAION aesthetic predictor's head on the L2-normalized CLIP ViT-L/14
  image embedding (a 1-10 rating).
* ``style`` and ``fidelity`` (the ``shapes`` scorer, :mod:`.shapes_score`, for captions of the
  demo's shapes task): 1 for the caption's shape and colour drawn as an outline (style) or
  drawn at all (fidelity), else 0; image statistics, no weights.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..clip import encode_images, encode_texts, load_open_clip
from .image_reward import DEFAULT_TOKENIZER, ImageRewardScorer, image_reward_files
from .shapes_score import ShapesScorer
from .sources import check_local_or_hub, hub_alternative

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"style images: no folder at {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"style images: {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_style_images(folder) -> List[Image.Image]:
    """The reference style images of ``folder``, decoded now so a bad file fails early."""
    images = []
    for path in list_images(folder):
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except OSError as e:
            raise ValueError(f"style images: cannot read {path} ({e})") from None
    return images


class OpenClipMetrics:
    """CLIP score and the two style-alignment metrics, from one open_clip model."""

    def __init__(self, model_name: str, pretrained: Optional[str], *, device="cpu", precision="fp32",
                 style_prompt: Optional[str] = None, neutral_prompts: Sequence[str] = ("a photo", "an image"),
                 style_images: Optional[Sequence[Image.Image]] = None, allow_pickle: bool = False):
        if style_prompt is not None and not list(neutral_prompts):
            raise ValueError("neutral_prompts: the style probability needs at least one neutral prompt")
        self.model, self.preprocess, self.tokenizer = load_open_clip(
            model_name, pretrained, device=device, precision=precision, what="CLIP scorer", allow_pickle=allow_pickle)
        self.names = ["clip_score"]
        self.style_text = None
        if style_prompt is not None:
            self.style_text = encode_texts(self.model, self.tokenizer, [style_prompt, *neutral_prompts])
            self.names.append("style_prob")
        self.style_refs = None
        if style_images:
            self.style_refs = encode_images(self.model, self.preprocess, style_images)
            self.names.append("style_similarity")

    @torch.inference_mode()
    def __call__(self, prompts: List[str], images: List[Image.Image]) -> Dict[str, torch.Tensor]:
        image = encode_images(self.model, self.preprocess, images)
        text = encode_texts(self.model, self.tokenizer, prompts)
        scores = {"clip_score": 100 * (image * text).sum(-1).clamp(min=0)}
        if self.style_text is not None:
            logits = self.model.logit_scale.exp().float() * image @ self.style_text.T
            scores["style_prob"] = logits.softmax(-1)[:, 0]
        if self.style_refs is not None:
            scores["style_similarity"] = (image @ self.style_refs.T).mean(-1)
        return {k: v.float().cpu() for k, v in scores.items()}


class HPSv2Scorer:
    """HPSv2 / HPSv2.1: an open_clip ViT-H-14 fine-tuned on human preferences; the checkpoint
    (``HPS_v2.1_compressed.pt``, a ``{"state_dict": ...}`` file) holds the whole CLIP."""

    names = ["hpsv2"]

    def __init__(self, checkpoint, model_name: str = "ViT-H-14", *, device="cpu", precision="fp32",
                 allow_pickle: bool = False):
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"HPSv2 checkpoint: no file at {checkpoint}")
        self.model, self.preprocess, self.tokenizer = load_open_clip(
            model_name, str(checkpoint), device=device, precision=precision, what="HPSv2", allow_pickle=allow_pickle)

    @torch.inference_mode()
    def __call__(self, prompts: List[str], images: List[Image.Image]) -> Dict[str, torch.Tensor]:
        image = encode_images(self.model, self.preprocess, images)
        text = encode_texts(self.model, self.tokenizer, prompts)
        return {"hpsv2": (image * text).sum(-1).float().cpu()}


class AestheticMLP(torch.nn.Module):
    """The head of LAION's improved aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE.pth``),
    layer for layer as in its ``simple_inference.py`` (no activations between the layers)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_aesthetic_head(path, allow_pickle: bool = False) -> torch.nn.Module:
    """The v2 MLP head (keys ``layers.N.*``) or the v1 linear head (keys ``weight``, ``bias``,
    as ``sa_0_4_vit_l_14_linear.pth``), from a ``.pth`` or ``.safetensors`` state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic head: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except pickle.UnpicklingError as e:
            raise ValueError(f"aesthetic head {path}: holds pickled objects besides tensors; if you trust its "
                             f"source, allow unpickling (--allow-pickle) ({str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"aesthetic head {path}: expected a state dict of tensors")
    if "layers.0.weight" in state:
        head: torch.nn.Module = AestheticMLP(state["layers.0.weight"].shape[1])
    elif set(state) == {"weight", "bias"} and state["weight"].dim() == 2 and state["weight"].shape[0] == 1:
        head = torch.nn.Linear(state["weight"].shape[1], 1)
    else:
        raise ValueError(
            f"aesthetic head {path}: unknown layout (keys {sorted(state)[:6]}...); expected the LAION "
            "improved-aesthetic-predictor MLP (layers.0 ... layers.7) or a linear head (weight, bias)"
        )
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"aesthetic head {path}: weights do not fit the expected layers ({e})") from None
    return head.eval()


class AestheticScorer:
    """LAION aesthetic predictor: an open_clip image embedding (CLIP ViT-L/14 of OpenAI by
    default: ``ViT-L-14-quickgelu`` / ``openai``), L2-normalized, through the head."""

    names = ["aesthetic"]

    def __init__(self, head_path, clip_model: str = "ViT-L-14-quickgelu", clip_pretrained: Optional[str] = "openai",
                 *, device="cpu", precision="fp32", allow_pickle: bool = False):
        self.head = load_aesthetic_head(head_path, allow_pickle).to(device)
        self.model, self.preprocess, _ = load_open_clip(
            clip_model, clip_pretrained, device=device, precision=precision, what="aesthetic CLIP",
            allow_pickle=allow_pickle)
        width = self.model.visual.output_dim
        expected = self.head.in_features if isinstance(self.head, torch.nn.Linear) else self.head.input_size
        if width != expected:
            raise ValueError(
                f"aesthetic head: expects {expected}-dim CLIP image embeddings, {clip_model} gives {width}"
            )

    @torch.inference_mode()
    def __call__(self, prompts: List[str], images: List[Image.Image]) -> Dict[str, torch.Tensor]:
        image = encode_images(self.model, self.preprocess, images)
        return {"aesthetic": self.head(image).squeeze(-1).float().cpu()}


class PickScoreScorer:
    """PickScore: a transformers CLIPModel (``yuvalkirstain/PickScore_v1``) and its processor
    (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; defaults to the model), each a local folder or
    a hub id."""

    names = ["pickscore"]

    def __init__(self, model_dir, processor_dir=None, *, device="cpu", dtype=torch.float32):
        from transformers import AutoProcessor, CLIPModel

        processor_dir = processor_dir or model_dir
        for what, source in (("PickScore model", model_dir), ("PickScore processor", processor_dir)):
            check_local_or_hub(what, source, hub_alternative(str(source)))
        if Path(model_dir).is_dir() and not (Path(model_dir) / "config.json").is_file():
            raise ValueError(f"PickScore model: {model_dir} has no config.json (expected a save_pretrained folder)")
        self.processor = AutoProcessor.from_pretrained(str(processor_dir))
        self.model = CLIPModel.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, prompts: List[str], images: List[Image.Image]) -> Dict[str, torch.Tensor]:
        inputs = self.processor(text=list(prompts), images=[im.convert("RGB") for im in images], padding=True,
                                truncation=True, max_length=77, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = self.model(**inputs)
        image, text = F.normalize(out.image_embeds.float(), dim=-1), F.normalize(out.text_embeds.float(), dim=-1)
        return {"pickscore": (self.model.logit_scale.exp().float() * (image * text).sum(-1)).cpu()}


def check_scorer_paths(*, pickscore_model=None, pickscore_processor=None, hps_checkpoint=None, aesthetic_head=None,
                       style_images=None, image_reward=None, image_reward_tokenizer=DEFAULT_TOKENIZER) -> None:
    """Fails fast on a missing local path (or a PickScore or tokenizer hub id that cannot be
    fetched), before hours of generation."""
    if image_reward is not None:
        image_reward_files(image_reward)
    for what, value in (("--pickscore-model", pickscore_model), ("--pickscore-processor", pickscore_processor),
                        ("--image-reward-tokenizer", image_reward_tokenizer if image_reward is not None else None)):
        if value is not None:
            check_local_or_hub(what, value, hub_alternative(value))
    for what, value, want_dir in (("--hps-checkpoint", hps_checkpoint, False),
                                  ("--aesthetic-head", aesthetic_head, False),
                                  ("--style-images", style_images, True)):
        if value is not None and not (os.path.isdir(value) if want_dir else os.path.isfile(value)):
            raise FileNotFoundError(f"{what}: no {'folder' if want_dir else 'file'} at {value}")


# Every scorer by name; each instance maps (prompts, images) to {metric: (B,) float32 tensor}.
SCORERS = {
    "clip": OpenClipMetrics,
    "pickscore": PickScoreScorer,
    "hpsv2": HPSv2Scorer,
    "image-reward": ImageRewardScorer,
    "aesthetic": AestheticScorer,
    "shapes": ShapesScorer,
}
