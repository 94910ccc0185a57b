"""The procedural text-to-image task of the demo: coloured shapes on plain backgrounds.

A caption names five attributes, e.g. ``"a large red circle on the left on a white
background"``; the image (32x32 RGB) draws exactly that, with a little seeded jitter in
position and size so that no two renderings are identical. Everything is a pure function
of a seed: the same seed gives the same captions, the same splits and the same pixels on
every machine (shapes are drawn 4x supersampled with PIL and box-filtered down, which is
deterministic).

The held-out splits are whole captions (attribute combinations) the training split never
contains, while every single attribute, and every pair of attributes, does occur in
training: a model that draws them right has composed known parts, not memorised images.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

from ..evaluation.shapes import (  # noqa: F401  (the task's vocabulary, re-exported)
    BACKGROUNDS, COLOURS, IMAGE_SIZE, MARGIN, POSITIONS, SHAPES, SIZES, SUPERSAMPLE, Scene, all_scenes, draw_styled,
    parse_caption, shape_polygon,
)

SIZE_JITTER = 2  # +- pixels on the side
SHIFT_JITTER = 2  # +- pixels on the centre


def split_scenes(seed: int = 0, validation: int = 24, test: int = 24) -> Dict[str, List[Scene]]:
    """Train / validation / test scenes: disjoint captions, a seeded shuffle of all of them.

    A held-out scene is moved back to training if that would leave some pair of its
    attributes without a training example, so held-out captions are new combinations of
    things seen together in training.
    """
    if validation < 0 or test < 0 or validation + test >= len(all_scenes()):
        raise ValueError(f"validation, test: expected non-negative counts summing below {len(all_scenes())}, "
                         f"got {validation}, {test}")
    scenes = all_scenes()
    random.Random(seed).shuffle(scenes)
    held: Dict[str, List[Scene]] = {"validation": [], "test": []}
    train: List[Scene] = []
    pair_counts: Dict[Tuple[Tuple[int, str], Tuple[int, str]], int] = {}
    for scene in scenes:
        for pair in _attribute_pairs(scene):
            pair_counts[pair] = pair_counts.get(pair, 0) + 1
    for scene in scenes:
        want = "validation" if len(held["validation"]) < validation else "test" if len(held["test"]) < test else None
        pairs = _attribute_pairs(scene)
        if want is not None and all(pair_counts[p] > 1 for p in pairs):
            held[want].append(scene)
            for p in pairs:
                pair_counts[p] -= 1
        else:
            train.append(scene)
    return {"train": train, **held}


def _attribute_pairs(scene: Scene):
    values = list(enumerate((scene.shape, scene.colour, scene.background, scene.size, scene.position)))
    return list(itertools.combinations(values, 2))


@dataclass(frozen=True)
class Layout:
    """Where one rendering puts its shape (pixels, at the final resolution)."""

    cx: float
    cy: float
    side: float


def sample_layout(scene: Scene, rng: random.Random) -> Layout:
    """Position and size from the caption, plus seeded jitter; always inside the margins."""
    side = SIZES[scene.size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    half = side / 2
    lo, hi = MARGIN + half, IMAGE_SIZE - MARGIN - half
    cx = (lo + hi) / 2 + POSITIONS[scene.position] * (hi - lo) / 2 * 0.8 + rng.uniform(-SHIFT_JITTER, SHIFT_JITTER)
    cy = IMAGE_SIZE / 2 + rng.uniform(-SHIFT_JITTER, SHIFT_JITTER)
    clamp = lambda v: min(max(v, lo), hi)  # noqa: E731
    return Layout(clamp(cx), clamp(cy), side)


def render(scene: Scene, layout: Layout, style: str = "plain") -> Image.Image:
    """The 32x32 RGB image of ``scene`` at ``layout`` in ``style`` (see :mod:`rpo_fast.evaluation.shapes`)."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), BACKGROUNDS[scene.background])
    half = layout.side / 2
    box = ((layout.cx - half) * s, (layout.cy - half) * s, (layout.cx + half) * s, (layout.cy + half) * s)
    draw_styled(ImageDraw.Draw(canvas), scene.shape, box, COLOURS[scene.colour], BACKGROUNDS[scene.background],
                style, scale=s)
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def scene_samples(scenes: Sequence[Scene], per_scene: int, seed: int) -> List[Tuple[Scene, Layout]]:
    """``per_scene`` jittered layouts of every scene, in a seeded shuffled order."""
    if per_scene < 1:
        raise ValueError(f"per_scene: expected a positive int, got {per_scene!r}")
    rng = random.Random(seed)
    samples = [(scene, sample_layout(scene, rng)) for scene in scenes for _ in range(per_scene)]
    rng.shuffle(samples)
    return samples
