"""The demo's data on disk, in the Pick-a-Pic v2 parquet schema that ``rpo_fast.data`` reads,
and the embeddings that weight RPO's contrast matrix.

* pretraining data: every training caption (``per_scene`` jittered renderings each) drawn
  ``plain`` most of the time and as a ``sketch`` a fraction ``sketch_fraction`` of the time,
  under the same caption (no caption names the style), as the preferred image; the trainer's
  ``sft`` reads only that one. The base therefore draws both styles, and preference
  optimization has a mode to move probability toward, as in the paper's style alignment;
* style preference data: the same caption and layout drawn as a ``sketch`` (preferred) and
  ``plain`` (dispreferred). Which of the two is ``jpg_0`` is random, with ``label_0`` saying
  which one won, as in Pick-a-Pic. Rows are shuffled across captions, so a batch of pairs
  mixes captions that share a shape, a colour or a background: RPO's cross-pair contrast
  has related pairs to use;
* embeddings: a stand-in for the CLIP (prompt, image) embeddings of the paper, which need
  downloaded weights: the caption's words (bag of words) and the image at 8x8, each
  L2-normalised, concatenated.

Every file is a pure function of its arguments; a folder is rewritten only when they change
(a ``meta.json`` records them).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..data import write_pickapic_parquet
from .shapes import all_scenes, render, scene_samples, split_scenes

PathLike = Union[str, os.PathLike]
DATA_FILE = "data.parquet"


def _up_to_date(folder: Path, meta: Dict) -> bool:
    meta_path = folder / "meta.json"
    return (folder / DATA_FILE).exists() and meta_path.exists() and json.loads(meta_path.read_text()) == meta


def _write(folder: Path, rows, meta: Dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # invalid until the data is complete
    write_pickapic_parquet(folder / DATA_FILE, rows)
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return folder


def write_pretrain_data(folder: PathLike, *, per_scene: int = 24, seed: int = 0, uncond_fraction: float = 0.1,
                        sketch_fraction: float = 0.25, split_seed: int = 0) -> Path:
    """Images of the training captions, each a ``sketch`` with probability ``sketch_fraction``
    and ``plain`` otherwise; ``uncond_fraction`` extra rows with an empty caption (random
    training images) teach the unconditional model that classifier-free guidance needs.
    Returns the folder (a source for ``load_preference_dataset``)."""
    if not 0.0 <= uncond_fraction < 1.0:
        raise ValueError(f"uncond_fraction: expected a number in [0, 1), got {uncond_fraction!r}")
    if not 0.0 <= sketch_fraction <= 1.0:
        raise ValueError(f"sketch_fraction: expected a number in [0, 1], got {sketch_fraction!r}")
    folder = Path(folder)
    meta = {"kind": "pretrain", "per_scene": per_scene, "seed": seed, "uncond_fraction": uncond_fraction,
            "sketch_fraction": sketch_fraction, "split_seed": split_seed, "version": 2}
    if _up_to_date(folder, meta):
        return folder
    samples = scene_samples(split_scenes(split_seed)["train"], per_scene, seed)
    rng = random.Random(seed + 1)
    style_rng = random.Random(seed + 3)
    rows = []
    for scene, layout in samples:
        image = render(scene, layout, "sketch" if style_rng.random() < sketch_fraction else "plain")
        rows.append((scene.caption, image, image, 1.0))
        if rng.random() < uncond_fraction / (1.0 - uncond_fraction):
            rows.append(("", image, image, 1.0))
    return _write(folder, rows, meta)


def prefers_style(scene, by_size: bool = False) -> bool:
    """Whether ``scene``'s preferred drawing is the style (else plain): always, or with
    ``by_size`` only for large shapes (the quality benchmark's condition where the preference
    depends on a property of the caption)."""
    return scene.size == "large" if by_size else True


def write_style_data(folder: PathLike, *, split: str = "train", per_scene: int = 8, seed: int = 0,
                     style: str = "sketch", split_seed: int = 0, by_size: bool = False) -> Path:
    """Preference pairs for the captions of ``split``: ``style`` preferred over ``plain``, or
    with ``by_size`` for large shapes only and ``plain`` preferred for small ones."""
    scenes = split_scenes(split_seed)
    if split not in scenes:
        raise ValueError(f"split: expected one of {list(scenes)}, got {split!r}")
    folder = Path(folder)
    meta = {"kind": "style", "split": split, "per_scene": per_scene, "seed": seed, "style": style,
            "split_seed": split_seed, "version": 1}
    if by_size:
        meta["by_size"] = True
    if _up_to_date(folder, meta):
        return folder
    rng = random.Random(seed + 2)
    rows = []
    for scene, layout in scene_samples(scenes[split], per_scene, seed):
        preferred, other = render(scene, layout, style), render(scene, layout, "plain")
        if not prefers_style(scene, by_size):
            preferred, other = other, preferred
        rows.append((scene.caption, preferred, other, 1.0) if rng.random() < 0.5
                    else (scene.caption, other, preferred, 0.0))
    return _write(folder, rows, meta)


_VOCABULARY: List[str] = sorted({w for s in all_scenes() for w in re.findall(r"[a-z]+", s.caption)})


class ShapesEmbedder:
    """(prompts, images) -> (B, E) float32: bag of caption words and the 8x8 image, each part
    L2-normalised then halved in weight, so that cosine similarity averages the two."""

    identity = "rpo-fast-demo:bag-of-words+pixels8x8:v1"

    def __call__(self, prompts: Sequence[str], images: Sequence) -> torch.Tensor:
        if len(prompts) != len(images):
            raise ValueError(f"prompts, images: expected equal lengths, got {len(prompts)} and {len(images)}")
        text = np.zeros((len(prompts), len(_VOCABULARY)), np.float32)
        for i, prompt in enumerate(prompts):
            for word in re.findall(r"[a-z]+", prompt.lower()):
                if word in _VOCABULARY:
                    text[i, _VOCABULARY.index(word)] = 1.0
        pixels = np.stack([np.asarray(im.convert("RGB").resize((8, 8), resample=3), np.float32).ravel() / 127.5 - 1
                           for im in images])
        parts = [text, pixels]
        parts = [p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-8) for p in parts]
        return torch.from_numpy((np.concatenate(parts, axis=1) / np.sqrt(2.0)).astype(np.float32))


def write_style_embeddings(data_folder: PathLike, path: Optional[PathLike] = None, progress: bool = False) -> Path:
    """The embedding cache (``rpo_fast.embedding`` format) of a style data folder."""
    from ..data import load_preference_dataset
    from ..embedding import build_embedding_cache

    data_folder = Path(data_folder)
    path = Path(path) if path is not None else data_folder / "embeddings.safetensors"
    dataset = load_preference_dataset(str(data_folder))
    if path.exists():
        try:
            from ..embedding import load_embedding_cache

            load_embedding_cache(path, dataset)
            return path
        except ValueError:
            path.unlink()
    return build_embedding_cache(dataset, ShapesEmbedder(), path, batch_size=256, progress=progress)
