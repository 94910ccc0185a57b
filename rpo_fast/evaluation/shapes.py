"""The shapes task's vocabulary and drawing, shared by the shapes scorer
(:mod:`rpo_fast.evaluation.shapes_score`) and the demo that renders the task's images
(:mod:`rpo_fast.demo.shapes`).

A caption names five attributes, e.g. ``"a large red circle on the left on a white
background"``. Drawing styles: ``plain``, the shape filled with its colour; ``sketch``, the
same shape as an outline only, a line ``SKETCH_WIDTH`` pixels wide with the background
showing inside (a 2-pixel line survives a pixel-space diffusion). The outline follows the
plain shape's border exactly, so shape, colour, position and size (what the fidelity score
checks) are the same in both styles; only the interior differs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

IMAGE_SIZE = 32
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth, deterministic edges

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle")
# Shape colours are far from every background and from each other (>= 100 in some channel),
# so that the fidelity score can tell them apart on blurry generated images.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
}
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
SIZES: Dict[str, int] = {"small": 16, "large": 22}  # bounding-box side in pixels
POSITIONS: Dict[str, float] = {"on the left": -1.0, "in the center": 0.0, "on the right": 1.0}
MARGIN = 2  # shapes stay this far from the border, which the scores read as background


@dataclass(frozen=True)
class Scene:
    """One caption's attributes."""

    shape: str
    colour: str
    background: str
    size: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position} on a {self.background} background"


def all_scenes() -> List[Scene]:
    """Every attribute combination, in a fixed order (216 captions)."""
    return [
        Scene(shape, colour, background, size, position)
        for shape, colour, background, size, position in itertools.product(
            SHAPES, COLOURS, BACKGROUNDS, SIZES, POSITIONS
        )
    ]


def parse_caption(caption: str) -> Scene:
    """The inverse of :attr:`Scene.caption`; ``ValueError`` for any other string."""
    for scene in all_scenes():
        if scene.caption == caption:
            return scene
    raise ValueError(f"caption: not a caption of the shapes task: {caption!r}")


def shape_polygon(shape: str, box: Tuple[float, float, float, float]):
    """Outline points of ``shape`` filling ``box`` = (x0, y0, x1, y1); None for a circle
    (an ellipse, drawn by PIL directly)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":  # apex up, base down
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")


STYLES = ("plain", "sketch")
SKETCH_WIDTH = 2.0  # pixels at the final resolution

Colour = Tuple[int, int, int]


def _inradius_centre(points: Sequence[Tuple[float, float]]):
    """Incentre and inradius of a convex polygon given by a triangle or a rectangle."""
    if len(points) == 3:
        (ax, ay), (bx, by), (cx, cy) = points
        a = math.dist((bx, by), (cx, cy))
        b = math.dist((ax, ay), (cx, cy))
        c = math.dist((ax, ay), (bx, by))
        p = a + b + c
        if p == 0:  # a degenerate box (a one-pixel foreground): no interior
            return (ax, ay), 0.0
        centre = ((a * ax + b * bx + c * cx) / p, (a * ay + b * by + c * cy) / p)
        area = abs((bx - ax) * (cy - ay) - (cx - ax) * (by - ay)) / 2
        return centre, 2 * area / p
    xs, ys = [x for x, _ in points], [y for _, y in points]
    centre = ((min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2)
    return centre, min(max(xs) - min(xs), max(ys) - min(ys)) / 2


def _shrunk(points, width: float):
    """The polygon moved inward by ``width`` along every edge (scaling about the incentre
    does exactly that for triangles and squares)."""
    (cx, cy), r = _inradius_centre(points)
    k = max(r - width, 0.0) / r if r > 0 else 0.0
    return [(cx + k * (x - cx), cy + k * (y - cy)) for x, y in points]


def draw_styled(draw, shape: str, box, colour: Colour, background: Colour, style: str, scale: int = 1) -> None:
    """Draw ``shape`` filling ``box`` (x0, y0, x1, y1) on a PIL ``ImageDraw`` in ``style``.
    ``scale``: pixels of the canvas per pixel of the final image (for the sketch width)."""
    if style not in STYLES:
        raise ValueError(f"style: expected one of {STYLES}, got {style!r}")
    polygon = shape_polygon(shape, box)
    width = SKETCH_WIDTH * scale
    if polygon is None:
        draw.ellipse(box, fill=colour)
        if style == "sketch":
            x0, y0, x1, y1 = box
            inner = (x0 + width, y0 + width, x1 - width, y1 - width)
            if inner[2] > inner[0] and inner[3] > inner[1]:
                draw.ellipse(inner, fill=background)
        return
    draw.polygon(polygon, fill=colour)
    if style == "sketch":
        draw.polygon(_shrunk(polygon, width), fill=background)
