"""Deterministic scores of generated shapes images: style (how sketch-like) and fidelity
(right shape and colour). Image statistics only, no learned model, so that a score cannot
be gamed by fooling a network and means the same on every machine.

Both start from the same segmentation of the image after a 3x3 median filter (which removes
the pixel noise a sampler leaves but keeps lines 2 pixels wide). The background colour is the median of the image's
border (the task keeps shapes ``MARGIN`` pixels inside it); a pixel is foreground when some
channel differs from it by more than ``FOREGROUND_THRESHOLD``; isolated foreground pixels
(sampling noise) are dropped. Every shape of the task is convex, so the convex hull of the
foreground is the region the shape claims, whether it is drawn filled or as an outline.

* style (hollowness) = the fraction of that hull which is *not* foreground: about 0 for a
  filled shape, about 0.5-0.7 for the task's outlines; gaps in an outline do not change it
  much, because the hull still spans the whole shape.
* fidelity = 1 when the shape is present (its hull covers 2-80% of the image: an empty or
  noise-filled image fails), its colour (median foreground colour) is nearest to the
  caption's colour among the task's colours, and its hull matches the caption's shape best
  among the task's shapes (IoU against each shape fitted to the hull's bounding box);
  0 otherwise. The mean over images is the fraction drawn right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .shapes import COLOURS, SHAPES, SUPERSAMPLE, parse_caption, shape_polygon

# The fidelity budget of the demo's success test and of the quality benchmark's selection:
# a tuned model may lose at most this fraction of the base's fidelity.
MAX_FIDELITY_DROP = 0.10
FOREGROUND_THRESHOLD = 60  # of 255, in the channel that differs most from the background
MIN_AREA, MAX_AREA = 0.02, 0.80  # hull area as a fraction of the image, for "a shape is there"


@dataclass(frozen=True)
class ImageScores:
    style: float  # hollowness in [0, 1]
    fidelity: float  # 1.0 or 0.0
    colour_ok: bool
    shape_ok: bool
    present: bool
    predicted_colour: str
    predicted_shape: str


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image: expected a PIL image or an (H, W, 3) array, got shape {array.shape}")
    return array


def median_filter(pixels: np.ndarray) -> np.ndarray:
    """3x3 median of every channel (edges replicated)."""
    h, w = pixels.shape[:2]
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    shifted = [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    return np.median(np.stack(shifted), axis=0)


def background_colour(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return np.median(border, axis=0)


def foreground_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels unlike the background, without isolated ones (fewer than 2 of 8 neighbours)."""
    mask = np.abs(pixels - background_colour(pixels)).max(axis=2) > FOREGROUND_THRESHOLD
    padded = np.pad(mask, 1)
    h, w = mask.shape
    neighbours = sum(
        padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w].astype(np.int32)
        for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    )
    return mask & (neighbours >= 2)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; ``points`` (N, 2) -> hull vertices in order."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) <= 2:
        return np.asarray(pts, dtype=np.float64)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: List = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: List = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1], dtype=np.float64)


def hull_mask(mask: np.ndarray) -> np.ndarray:
    """The pixels inside the convex hull of the mask's pixel centres (the hull included)."""
    ys, xs = np.nonzero(mask)
    out = Image.new("1", (mask.shape[1], mask.shape[0]), 0)
    if len(xs):
        hull = [tuple(p) for p in _convex_hull(np.stack([xs, ys], axis=1))]
        draw = ImageDraw.Draw(out)
        if len(hull) >= 3:
            draw.polygon(hull, fill=1, outline=1)
        else:  # one pixel, or pixels on a line: PIL's polygon needs three vertices
            draw.line(hull * 2, fill=1)
    return np.asarray(out, dtype=bool)


def _shape_template(shape: str, box, size) -> np.ndarray:
    """The filled ``shape`` fitted to ``box`` (pixel-centre coordinates), as a mask."""
    s = SUPERSAMPLE
    x0, y0, x1, y1 = box
    big = ((x0 - 0.5) * s, (y0 - 0.5) * s, (x1 + 0.5) * s, (y1 + 0.5) * s)  # pixel centres -> edges
    canvas = Image.new("L", (size[1] * s, size[0] * s), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = shape_polygon(shape, big)
    if polygon is None:
        draw.ellipse(big, fill=255)
    else:
        draw.polygon(polygon, fill=255)
    small = canvas.resize((size[1], size[0]), Image.Resampling.BOX)
    return np.asarray(small) >= 128


def classify_shape(hull: np.ndarray) -> str:
    ys, xs = np.nonzero(hull)
    if not len(xs):
        return "none"
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    ious = {}
    for shape in SHAPES:
        template = _shape_template(shape, box, hull.shape)
        union = (template | hull).sum()
        ious[shape] = (template & hull).sum() / union if union else 0.0
    return max(ious, key=ious.get)


def classify_colour(pixels: np.ndarray, mask: np.ndarray) -> str:
    if not mask.any():
        return "none"
    colour = np.median(pixels[mask], axis=0)
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - colour) ** 2)))


def keeps_fidelity(fidelity: float, base_fidelity: float) -> bool:
    """Whether ``fidelity`` is within ``MAX_FIDELITY_DROP`` (relative) of the base's."""
    return fidelity >= (1 - MAX_FIDELITY_DROP) * base_fidelity


def score_image(image, caption: str) -> ImageScores:
    """Style and fidelity of one generated image for the caption it was generated from."""
    scene = parse_caption(caption)
    pixels = median_filter(_as_array(image))
    mask = foreground_mask(pixels)
    hull = hull_mask(mask)
    hull_area = hull.sum()
    style = float(1.0 - (mask & hull).sum() / hull_area) if hull_area else 0.0
    present = MIN_AREA <= hull_area / hull.size <= MAX_AREA
    colour = classify_colour(pixels, mask)
    shape = classify_shape(hull)
    colour_ok, shape_ok = colour == scene.colour, shape == scene.shape
    return ImageScores(
        style=style,
        fidelity=float(present and colour_ok and shape_ok),
        colour_ok=colour_ok,
        shape_ok=shape_ok,
        present=bool(present),
        predicted_colour=colour,
        predicted_shape=shape,
    )


def score_images(images: Sequence, captions: Sequence[str]) -> Dict[str, np.ndarray]:
    """Per-image ``style`` and ``fidelity`` arrays (and the components), same order."""
    if len(images) != len(captions):
        raise ValueError(f"images, captions: expected equal lengths, got {len(images)} and {len(captions)}")
    scores = [score_image(image, caption) for image, caption in zip(images, captions)]
    return {
        "style": np.array([s.style for s in scores]),
        "fidelity": np.array([s.fidelity for s in scores]),
        "colour_ok": np.array([s.colour_ok for s in scores], dtype=float),
        "shape_ok": np.array([s.shape_ok for s in scores], dtype=float),
        "present": np.array([s.present for s in scores], dtype=float),
    }
