"""Generate for a set of captions with fixed seeds and score the images.

Sample ``k`` of caption ``i`` always starts from the noise of seed ``seed * 100003 + i * 101 + k``,
so a base and a tuned model are compared image by image from the same starting noise, and
the prompt is the unit of the confidence intervals (per-prompt means over its samples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import torch

from .scores import score_images
from .shapes import IMAGE_SIZE, Scene
from ..evaluation.stats import mean_ci

INFERENCE_STEPS = 20
GUIDANCE_SCALE = 3.0


@dataclass
class Evaluation:
    captions: List[str]  # one per image
    prompt_index: np.ndarray  # (N,) which prompt each image belongs to
    images: List = field(repr=False)
    scores: Dict[str, np.ndarray] = field(repr=False)  # style, fidelity, ... per image

    def per_prompt(self, key: str) -> np.ndarray:
        """Mean of ``key`` over the samples of every prompt, in prompt order."""
        values = self.scores[key]
        return np.array([values[self.prompt_index == p].mean() for p in np.unique(self.prompt_index)])

    def summary(self, key: str):
        """(mean, 95% CI half-width) over prompts."""
        return mean_ci(self.per_prompt(key))


def sample_seed(seed: int, prompt: int, sample: int) -> int:
    return seed * 100003 + prompt * 101 + sample


@torch.no_grad()
def generate(pipe, captions: Sequence[str], seeds: Sequence[int], *, steps: int = INFERENCE_STEPS,
             guidance_scale: float = GUIDANCE_SCALE, batch_size: int = 64, progress: bool = True,
             desc: str = "generating") -> List:
    """One 32x32 PIL image per (caption, seed), DDIM with ``steps`` steps."""
    from tqdm.auto import tqdm

    if len(captions) != len(seeds):
        raise ValueError(f"captions, seeds: expected equal lengths, got {len(captions)} and {len(seeds)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps, batch_size: expected positive ints, got {steps}, {batch_size}")
    images: List = []
    starts = range(0, len(captions), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
        batch = list(captions[start : start + batch_size])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        out = pipe(prompt=batch, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                   height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="pil")
        images.extend(out.images)
    return images


def evaluate(pipe, scenes: Sequence[Scene], *, samples_per_prompt: int = 4, seed: int = 0,
             steps: int = INFERENCE_STEPS, guidance_scale: float = GUIDANCE_SCALE, progress: bool = True,
             desc: str = "generating") -> Evaluation:
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: expected a positive int, got {samples_per_prompt!r}")
    if not scenes:
        raise ValueError("scenes: expected at least one caption to evaluate")
    captions, seeds, index = [], [], []
    for p, scene in enumerate(scenes):
        for k in range(samples_per_prompt):
            captions.append(scene.caption)
            seeds.append(sample_seed(seed, p, k))
            index.append(p)
    images = generate(pipe, captions, seeds, steps=steps, guidance_scale=guidance_scale, progress=progress, desc=desc)
    return Evaluation(captions, np.array(index), images, score_images(images, captions))
