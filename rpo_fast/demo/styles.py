"""Drawing styles of the shapes task.

``plain``: the shape filled with its colour (what the base model learns to draw).
``sketch``: the same shape as an outline only, a line ``SKETCH_WIDTH`` pixels wide with the
background showing inside (the diffusion runs in pixel space, so a 2-pixel line survives): the target style of the demo, in the spirit of the sketch-style
datasets of the Diffusion-RPO paper's style-alignment evaluation. The outline follows the
plain shape's border exactly, so the shape, colour, position and size (what the fidelity
score checks) are the same in both styles; only the interior differs.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

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
    from .shapes import shape_polygon

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
