"""The shapes scorer (``shapes`` in :data:`rpo_fast.evaluation.scorers.SCORERS`): deterministic scores
of images of the shapes task (:mod:`rpo_fast.evaluation.shapes`): style (is this the caption's shape drawn
as an outline?) and fidelity (right shape and colour). Image statistics only, no learned
model, so that a score cannot be gamed by fooling a network and means the same on every
machine.

Geometry comes from a segmentation of the image after a 3x3 median filter (which removes
the pixel noise a sampler leaves but keeps lines 2 pixels wide). The background colour is
the median of the image's border (the task keeps shapes ``MARGIN`` pixels inside it); a
pixel is foreground when some channel differs from it by more than
``FOREGROUND_THRESHOLD``; isolated foreground pixels are dropped. Every shape of the task
is convex, so the convex hull of the foreground is the region the shape claims, whether it
is drawn filled or as an outline.

* fidelity = 1 when the shape is present (its hull covers 2-80% of the image: an empty or
  noise-filled image fails), its colour (median foreground colour) is nearest to the
  caption's colour among the task's colours, and its hull matches the caption's shape best
  among the task's shapes (IoU against each shape fitted to the hull's bounding box);
  0 otherwise. The mean over images is the fraction drawn right.
* drawing = how the shape is drawn, read from the *unfiltered* pixels (a filter could close
  the holes that noise punches, or open holes in a speckled fill): the caption's shape is
  drawn in both styles into the foreground's bounding box, which gives the outline's ring
  (where an outline puts its line) and the interior (the filled shape less the ring, two
  pixels away from it where the shape is large enough). ``outline`` when at least
  ``RING_COVERAGE`` of the ring has a pixel of the caption's colour within one pixel (a
  drawn line wobbles) and at least ``CLEAN_INTERIOR`` of the interior is background;
  the counts are also checked against chance: an outline needs them to be less likely
  than ``SPECKLE_P`` for a filled shape under random speckle of any rate (so a small interior
  left clean by luck is not an outline). ``filled`` when the ring and at least
  ``FILLED_INTERIOR`` of the interior have the colour; ``neither`` otherwise (noise, blur that smears the line into the interior, a
  broken or missing line).
* style = 1 when the image is faithful (above) and drawn as an ``outline``; 0 otherwise.
  ``style_rate``, its mean, is the fraction of images that are the right shape and colour
  drawn in the target style. Noise cannot raise it: a fill that noise or speckle turns to
  background in a fraction s of its pixels keeps the colour in 1 - s of the ring, so it
  would need s >= CLEAN_INTERIOR and 1 - s >= RING_COVERAGE at once.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .shapes import COLOURS, SHAPES, SUPERSAMPLE, draw_styled, parse_caption

# The fidelity budget of the demo's success test and of the quality benchmark's selection:
# a tuned model may lose at most this fraction of the base's fidelity.
MAX_FIDELITY_DROP = 0.10
FOREGROUND_THRESHOLD = 60  # of 255, in the channel that differs most from the background
RING_COVERAGE = 0.6  # of the outline's ring in the caption's colour, for either drawing
CLEAN_INTERIOR = 0.8  # of the interior that is background, for an outline
FILLED_INTERIOR = 0.6  # of the interior in the caption's colour, for a filled shape
SPECKLE_P = 1e-3  # an outline's counts must be less likely than this under random speckle of any rate
MIN_INTERIOR = 8  # pixels: fewer is too little evidence to call an interior empty or filled
DRAWINGS = ("outline", "filled", "neither")
MIN_AREA, MAX_AREA = 0.02, 0.80  # hull area as a fraction of the image, for "a shape is there"


@dataclass(frozen=True)
class ImageScores:
    style: float  # 1.0 for a faithful outline, else 0.0
    fidelity: float  # 1.0 or 0.0
    drawing: str  # one of DRAWINGS
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


def _neighbourhood(array: np.ndarray, mode: str = "constant") -> List[np.ndarray]:
    """The 9 views of ``array`` shifted by (dy, dx) in {-1, 0, 1}^2 over its first two axes,
    padded by ``mode`` (np.pad's: zeros, or "edge" to replicate); the centre is index 4."""
    h, w = array.shape[:2]
    padded = np.pad(array, ((1, 1), (1, 1)) + ((0, 0),) * (array.ndim - 2), mode=mode)
    return [padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]


def median_filter(pixels: np.ndarray) -> np.ndarray:
    """3x3 median of every channel (edges replicated)."""
    return np.median(np.stack(_neighbourhood(pixels, "edge")), axis=0)


def background_colour(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return np.median(border, axis=0)


def foreground_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels unlike the background, without isolated ones (fewer than 2 of 8 neighbours)."""
    mask = np.abs(pixels - background_colour(pixels)).max(axis=2) > FOREGROUND_THRESHOLD
    views = _neighbourhood(mask)
    neighbours = sum(v.astype(np.int32) for i, v in enumerate(views) if i != 4)
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


def _coverage(shape: str, box, size, style: str = "plain") -> np.ndarray:
    """The fraction of every pixel that ``shape`` drawn in ``style`` covers when fitted to
    ``box`` (x0, y0, x1, y1 in pixel-centre coordinates): the renderer's own drawing,
    supersampled and box-filtered like the task's images."""
    s = SUPERSAMPLE
    x0, y0, x1, y1 = box
    big = ((x0 - 0.5) * s, (y0 - 0.5) * s, (x1 + 0.5) * s, (y1 + 0.5) * s)  # pixel centres -> edges
    canvas = Image.new("L", (size[1] * s, size[0] * s), 0)
    draw_styled(ImageDraw.Draw(canvas), shape, big, 255, 0, style, scale=s)
    small = canvas.resize((size[1], size[0]), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _shape_template(shape: str, box, size) -> np.ndarray:
    """The filled ``shape`` fitted to ``box``, as a mask."""
    return _coverage(shape, box, size) >= 0.5


def classify_shape(hull: np.ndarray) -> str:
    ys, xs = np.nonzero(hull)
    if not len(xs):
        return "none"
    box = (xs.min(), ys.min(), xs.max(), ys.max())
    ious = {shape: _iou(_shape_template(shape, box, hull.shape), hull) for shape in SHAPES}
    return max(ious, key=ious.get)


def classify_colour(pixels: np.ndarray, mask: np.ndarray) -> str:
    """The task's colour that most foreground pixels vote for. A pixel votes for the colour
    that, blended with the background in some proportion, comes nearest to it: the
    anti-aliased edge of a 2-pixel line is part background, and a pink pixel is then red on
    white, not the nearest colour to pink."""
    if not mask.any():
        return "none"
    background = background_colour(pixels)
    offsets = pixels[mask] - background  # (N, 3)
    names = list(COLOURS)
    residuals = []
    for name in names:
        d = np.asarray(COLOURS[name], dtype=np.float32) - background
        alpha = np.clip(offsets @ d / max(float(d @ d), 1e-6), 0.0, 1.0)
        residuals.append(np.linalg.norm(offsets - alpha[:, None] * d, axis=1))
    votes = np.bincount(np.argmin(np.stack(residuals), axis=0), minlength=len(names))
    return names[int(np.argmax(votes))]


def _dilate(mask: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce(_neighbourhood(mask))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def _fitted_regions(shape: str, mask: np.ndarray, is_colour: np.ndarray):
    """The outline's ring and the interior of ``shape`` fitted to the foreground: the
    bounding box of ``mask``, each edge moved by up to half a pixel (anti-aliased edges put
    the box that far off), the one whose filled or outlined template best overlaps the
    pixels of the colour."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
    best = None
    for box in itertools.product(*[(v - 0.5, v, v + 0.5) for v in (x0, y0, x1, y1)]):
        fill = _coverage(shape, box, mask.shape)
        ring_cover = _coverage(shape, box, mask.shape, "sketch")
        fit = max(_iou(is_colour, fill >= 0.5), _iou(is_colour, ring_cover >= 0.5))
        if best is None or fit > best[0]:
            best = (fit, fill, ring_cover)
    _, fill, ring_cover = best
    # the interior keeps a margin from the ring for a line that wobbles: two pixels where the
    # shape is large enough, else one, else none (a small triangle)
    line = ring_cover > 0.05
    for margin in (_dilate(_dilate(line)), _dilate(line), line):
        interior = (fill >= 0.99) & ~margin
        if interior.sum() >= MIN_INTERIOR:
            break
    return ring_cover >= 0.75, interior


def _binomial_tail(k: int, n: int, p: np.ndarray) -> np.ndarray:
    """P(Bin(n, p) >= k), for every p of an array."""
    j = np.arange(k, n + 1)
    logs = (np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in j])[:, None]
            + j[:, None] * np.log(p)[None] + (n - j)[:, None] * np.log1p(-p)[None])
    return np.exp(logs).sum(axis=0)


def speckle_p(ring_colour: int, ring: int, interior_background: int, interior: int) -> float:
    """How well random speckle explains an outline: the largest, over speckle rates s, of the
    probability that a filled shape whose pixels each turn to background with probability s
    shows at least ``ring_colour`` of ``ring`` ring pixels in colour and at least
    ``interior_background`` of ``interior`` interior pixels as background."""
    s = np.linspace(0.005, 0.995, 199)
    return float((_binomial_tail(ring_colour, ring, 1 - s) * _binomial_tail(interior_background, interior, s)).max())


def classify_drawing(raw: np.ndarray, mask: np.ndarray, shape: str, colour: str) -> str:
    """``outline``, ``filled`` or ``neither``: how ``shape`` in ``colour`` is drawn in the
    unfiltered ``raw`` pixels, with the geometry of the (filtered) foreground ``mask``."""
    if not mask.any():
        return "neither"
    background = background_colour(raw)
    is_background = np.abs(raw - background).max(axis=2) <= FOREGROUND_THRESHOLD
    target = np.asarray(COLOURS[colour], dtype=np.float32)
    # a pixel has the colour when it is foreground and nearer to the colour than to the background
    is_colour = ~is_background & (np.sum((raw - target) ** 2, axis=2) < np.sum((raw - background) ** 2, axis=2))
    ring, interior = _fitted_regions(shape, mask, is_colour)
    # the ring is covered where a pixel of the colour lies within one pixel (a drawn line
    # wobbles); chance is judged on the exact counts
    if interior.sum() < MIN_INTERIOR or _dilate(is_colour)[ring].mean() < RING_COVERAGE:
        return "neither"
    if is_background[interior].mean() >= CLEAN_INTERIOR and speckle_p(
            int(is_colour[ring].sum()), int(ring.sum()), int(is_background[interior].sum()), int(interior.sum())) < SPECKLE_P:
        return "outline"
    if is_colour[interior].mean() >= FILLED_INTERIOR:
        return "filled"
    return "neither"


def keeps_fidelity(fidelity: float, base_fidelity: float) -> bool:
    """Whether ``fidelity`` is within ``MAX_FIDELITY_DROP`` (relative) of the base's."""
    return fidelity >= (1 - MAX_FIDELITY_DROP) * base_fidelity


def score_image(image, caption: str) -> ImageScores:
    """Style and fidelity of one generated image for the caption it was generated from."""
    scene = parse_caption(caption)
    raw = _as_array(image)
    pixels = median_filter(raw)
    mask = foreground_mask(pixels)
    hull = hull_mask(mask)
    present = MIN_AREA <= hull.sum() / hull.size <= MAX_AREA
    colour = classify_colour(raw, mask)
    shape = classify_shape(hull)
    colour_ok, shape_ok = colour == scene.colour, shape == scene.shape
    faithful = present and colour_ok and shape_ok
    drawing = classify_drawing(raw, mask, scene.shape, scene.colour)
    return ImageScores(
        style=float(faithful and drawing == "outline"),
        fidelity=float(faithful),
        drawing=drawing,
        colour_ok=colour_ok,
        shape_ok=shape_ok,
        present=bool(present),
        predicted_colour=colour,
        predicted_shape=shape,
    )


def score_images(images: Sequence, captions: Sequence[str]) -> Dict[str, np.ndarray]:
    """Per-image arrays, same order: ``style`` (1.0 for a faithful outline, else 0.0; its
    mean is the style rate), ``fidelity``, the components ``colour_ok``, ``shape_ok``,
    ``present``, and ``outline`` / ``filled`` (the drawing, whatever the fidelity)."""
    if len(images) != len(captions):
        raise ValueError(f"images, captions: expected equal lengths, got {len(images)} and {len(captions)}")
    scores = [score_image(image, caption) for image, caption in zip(images, captions)]
    return {
        "style": np.array([s.style for s in scores]),
        "fidelity": np.array([s.fidelity for s in scores]),
        "colour_ok": np.array([s.colour_ok for s in scores], dtype=float),
        "shape_ok": np.array([s.shape_ok for s in scores], dtype=float),
        "present": np.array([s.present for s in scores], dtype=float),
        "outline": np.array([s.drawing == "outline" for s in scores], dtype=float),
        "filled": np.array([s.drawing == "filled" for s in scores], dtype=float),
    }


class ShapesScorer:
    """The shapes scorer as an evaluation scorer: ``(prompts, images)`` (captions of the
    shapes task) to ``{metric: (B,) float32 tensor}`` with the metrics of
    :func:`score_images`; ``style`` and ``fidelity`` are the ones the demo reports."""

    names = ["style", "fidelity", "colour_ok", "shape_ok", "present", "outline", "filled"]

    def __call__(self, prompts: Sequence[str], images: Sequence) -> Dict[str, "torch.Tensor"]:
        import torch

        return {k: torch.from_numpy(v).float() for k, v in score_images(list(images), list(prompts)).items()}
