"""The open_clip adapter that the embedding cache and the evaluation scorers share.

:func:`load_open_clip` checks a model name and a pretrained tag or local checkpoint before
anything is loaded (:func:`check_open_clip_source`), :func:`encode_images` and
:func:`encode_texts` give unit-norm float32 embeddings, and :class:`OpenCLIPEmbedder` turns a
model into an embedder for ``rpo_fast.embedding.build_embedding_cache``. open_clip itself is
imported only when a function needs it. Offline, weights that would be downloaded fail at
once in one line (:func:`require_open_clip_weights`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from PIL import Image

PathLike = Union[str, os.PathLike]

EMBED_MODES = ("text", "image", "joint")
PRECISIONS = ("fp32", "fp16", "bf16")



def register_open_clip_configs(paths: Optional[Sequence[PathLike]]) -> List[str]:
    """Registers open_clip architecture JSON files (``{"embed_dim", "vision_cfg",
    "text_cfg"}``); each becomes a model name equal to its file stem. Returns the names."""
    if not paths:
        return []
    import open_clip

    names = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip config: no file at {path}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"open_clip config {path}: not valid JSON ({e})") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(config, dict) or k not in config]
        if missing:
            raise ValueError(f"open_clip config {path}: missing key(s) {missing}")
        open_clip.add_model_config(path)
        names.append(path.stem)
    return names


def looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or Path(value).suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz")


def check_open_clip_source(model_name: str, pretrained: Optional[str], what: str = "model") -> None:
    """Raises a clear error for an unknown architecture, a missing checkpoint file or an
    unknown pretrained tag, before anything is loaded or downloaded."""
    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"{what}: expected an open_clip model name such as 'ViT-H-14', got {model_name!r}")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return  # open_clip reads config and weights from there; `pretrained` is ignored
    name = model_name.replace("/", "-")
    if name not in open_clip.list_models():
        raise ValueError(
            f"{what}: unknown open_clip architecture {model_name!r}; use a built-in name "
            "(open_clip.list_models()) or register a JSON config with --open-clip-config"
        )
    if pretrained is None or pretrained == "":
        raise ValueError(f"{what}: pretrained weights are needed: a tag such as 'laion2b_s32b_b79k' or a checkpoint file")
    if os.path.isfile(pretrained):
        return
    if looks_like_path(pretrained):
        raise FileNotFoundError(f"{what}: no checkpoint file at {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained.lower().replace("-", "_") not in tags:  # open_clip's own tag normalization
        raise ValueError(f"{what}: {pretrained!r} is neither a checkpoint file nor a pretrained tag of {name} (tags: {tags})")


_URL_CACHE = "~/.cache/clip"  # where open_clip keeps weights it downloads from a URL


def _nothing_downloaded() -> bool:
    """No model in the hub cache and nothing in open_clip's URL cache: answered without
    importing open_clip (seconds)."""
    from huggingface_hub import constants

    url_cache = Path(_URL_CACHE).expanduser()
    return (not any(Path(constants.HF_HUB_CACHE).expanduser().glob("models--*"))
            and not (url_cache.is_dir() and any(url_cache.iterdir())))


def _tag_source(model_name: str, tag: str) -> Tuple[Optional[str], bool]:
    """The hub repo or URL open_clip downloads ``tag`` of ``model_name`` from (None if it
    knows none), and whether it has been downloaded before."""
    if _nothing_downloaded():
        return None, False
    import open_clip

    from .hub import in_hub_cache

    cfg = open_clip.get_pretrained_cfg(model_name.replace("/", "-"), tag)
    if cfg.get("hf_hub"):  # 'org/name/' or 'org/name/file.bin'
        repo = os.path.split(cfg["hf_hub"])[0]
        return repo, in_hub_cache(repo)
    if cfg.get("url"):  # open_clip's own download folder (create_model without cache_dir)
        url = cfg["url"]
        return url, os.path.isfile(os.path.join(os.path.expanduser(_URL_CACHE), os.path.basename(url)))
    return None, False


def require_open_clip_weights(model_name: str, pretrained: Optional[str], what: str = "--pretrained") -> None:
    """Offline (``HF_HUB_OFFLINE``, or the hub unreachable), weights that open_clip would have to
    download (a pretrained tag, or an ``hf-hub:`` model) fail here at once, in one line naming
    the option ``what`` and the local-file alternative, instead of after open_clip's retries.
    Returns when they can be downloaded, or when they were downloaded before (the process then
    reads the hub cache without trying the network: ``rpo_fast.hub.require_download``)."""
    from .hub import in_hub_cache, offline_reason, require_download

    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:"):]
        require_download(what, model_name, f"copy {repo} where the hub can be reached and pass local-dir:FOLDER "
                         "instead", cached=in_hub_cache(repo))
        return
    if (model_name.startswith("local-dir:") or not pretrained or os.path.isfile(pretrained)
            or looks_like_path(pretrained) or offline_reason() is None):
        return
    where, cached = _tag_source(model_name, pretrained)
    of = f"open_clip_model.safetensors of {where}" if where else "the weights of that open_clip tag"
    require_download(what, pretrained, f"pass a local checkpoint file path instead ({of}, downloaded where the hub "
                     "can be reached)", cached)


def load_open_clip(model_name: str, pretrained: Optional[str], *, device="cpu", precision: str = "fp32",
                   what: str = "model", allow_pickle: bool = False):
    """``(model, preprocess, tokenizer)`` of an open_clip model in eval mode.

    ``pretrained``: a tag (downloaded by open_clip) or a local checkpoint file (``.pt`` with or
    without a ``state_dict`` key, ``.bin``, ``.safetensors``), read by open_clip's own loader.
    A ``.pt`` holding pickled objects besides tensors is refused unless ``allow_pickle`` (only
    for files from a trusted source: unpickling can run code).
    """
    import pickle

    import open_clip

    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    check_open_clip_source(model_name, pretrained, what)
    require_open_clip_weights(model_name, pretrained, what)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, precision=precision, weights_only=not allow_pickle
        )
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{what}: {pretrained} holds pickled objects besides tensors; if you trust its source, allow "
            f"unpickling (--allow-pickle, allow_pickle=True) ({str(e).splitlines()[0]})"
        ) from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def _model_device_dtype(model) -> Tuple[torch.device, torch.dtype]:
    param = next(model.visual.parameters())
    return param.device, param.dtype


@torch.inference_mode()
def encode_images(model, preprocess, images: Sequence[Image.Image]) -> torch.Tensor:
    """L2-normalized open_clip image embeddings, float32 on the model's device."""
    device, dtype = _model_device_dtype(model)
    pixels = torch.stack([preprocess(image.convert("RGB")) for image in images]).to(device=device, dtype=dtype)
    return F.normalize(model.encode_image(pixels).float(), dim=-1)


@torch.inference_mode()
def encode_texts(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """L2-normalized open_clip text embeddings, float32 on the model's device."""
    device, _ = _model_device_dtype(model)
    return F.normalize(model.encode_text(tokenizer(list(texts)).to(device)).float(), dim=-1)


def _pretrained_identity(pretrained: Optional[str]) -> str:
    # A file is named by its name and size, not its folder: moving the checkpoint keeps the cache valid.
    if pretrained and os.path.isfile(pretrained):
        return f"{Path(pretrained).name}:{os.path.getsize(pretrained)}"
    return str(pretrained)


class OpenCLIPEmbedder:
    """An embedder (``rpo_fast.embedding.Embedder``) over an open_clip model.

    ``text``: the prompt's embedding; ``image``: the image's; ``joint``: the normalized mean
    of the normalized text and image embeddings, so that two pairs are close when both
    their prompts and their images are. Outputs are unit vectors, float32, on the CPU.
    """

    def __init__(self, model, preprocess, tokenizer, mode: str, identity: str):
        if mode not in EMBED_MODES:
            raise ValueError(f"mode: expected one of {list(EMBED_MODES)}, got {mode!r}")
        self.model, self.preprocess, self.tokenizer, self.mode = model, preprocess, tokenizer, mode
        self.identity = identity

    def __call__(self, prompts: List[str], images: List[Image.Image]) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"images: expected one image per prompt ({len(prompts)}), got {len(images)}")
        parts = []
        if self.mode in ("text", "joint"):
            position = {p: i for i, p in enumerate(dict.fromkeys(prompts))}  # each pair's prompt comes twice
            text = encode_texts(self.model, self.tokenizer, list(position))
            parts.append(text[torch.tensor([position[p] for p in prompts], device=text.device)])
        if self.mode in ("image", "joint"):
            parts.append(encode_images(self.model, self.preprocess, images))
        emb = parts[0] if len(parts) == 1 else F.normalize(parts[0] + parts[1], dim=-1)
        return emb.cpu()


def open_clip_embedder(model_name: str, pretrained: Optional[str], mode: str = "joint", device="cpu",
                       precision: str = "fp32", allow_pickle: bool = False) -> OpenCLIPEmbedder:
    """An embedder from an open_clip model name and a pretrained tag or local checkpoint."""
    if mode not in EMBED_MODES:
        raise ValueError(f"mode: expected one of {list(EMBED_MODES)}, got {mode!r}")
    model, preprocess, tokenizer = load_open_clip(model_name, pretrained, device=device, precision=precision,
                                                  allow_pickle=allow_pickle)
    identity = f"open_clip:{model_name}:{_pretrained_identity(pretrained)}:{mode}"
    return OpenCLIPEmbedder(model, preprocess, tokenizer, mode, identity)
