"""The demo's evaluation: a client of :mod:`rpo_fast.evaluation` on the held-out captions.

Images come from :func:`rpo_fast.evaluation.generation.generate` (sample ``k`` of caption ``i``
from the seed rule there, ``seed * 100003 + i * 101 + k``, so base and tuned model are compared
image by image from the same starting noise) and are scored by the evaluation's ``shapes``
scorer; the prompt is the unit of the confidence intervals
(:func:`rpo_fast.evaluation.report.summarize` on the ``(P, K)`` tables).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..evaluation.generation import GenerationSettings, generate
from ..evaluation.scorers import SCORERS
from .shapes import IMAGE_SIZE, Scene

INFERENCE_STEPS = 20
GUIDANCE_SCALE = 3.0
BATCH_SIZE = 64  # images per pipeline call


@dataclass
class Evaluation:
    captions: List[str]  # one per image, prompt by prompt
    prompt_index: np.ndarray  # (N,) which prompt each image belongs to
    images: List = field(repr=False)
    scores: Dict[str, np.ndarray] = field(repr=False)  # style, fidelity, ... per image

    def tables(self) -> Dict[str, torch.Tensor]:
        """Every score as a ``(prompts, samples_per_prompt)`` tensor, what ``summarize`` reads."""
        prompts = len(np.unique(self.prompt_index))
        return {k: torch.from_numpy(v).reshape(prompts, -1) for k, v in self.scores.items()}


def evaluate(pipe, scenes: Sequence[Scene], *, samples_per_prompt: int = 4, seed: int = 0,
             steps: int = INFERENCE_STEPS, guidance_scale: float = GUIDANCE_SCALE, progress: bool = True,
             desc: str = "generating") -> Evaluation:
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt: expected a positive int, got {samples_per_prompt!r}")
    if not scenes:
        raise ValueError("scenes: expected at least one caption to evaluate")
    if steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps}")
    settings = GenerationSettings(seed=seed, images_per_prompt=samples_per_prompt, num_inference_steps=steps,
                                  guidance_scale=guidance_scale, height=IMAGE_SIZE, width=IMAGE_SIZE,
                                  batch_size=BATCH_SIZE)
    prompts = [scene.caption for scene in scenes]
    with torch.no_grad():
        nested = generate(pipe, prompts, settings, desc=desc, progress=progress)
    images = [image for row in nested for image in row]
    captions = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    scores = SCORERS["shapes"]()(captions, images)
    return Evaluation(captions, np.repeat(np.arange(len(scenes)), samples_per_prompt), images,
                      {k: v.double().numpy() for k, v in scores.items()})
