"""Pictures of a demo run: an image grid (rows: models, columns: captions) and a bar plot of
the scores with their confidence intervals."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from PIL import Image, ImageDraw

PathLike = Union[str, os.PathLike]


LINE_HEIGHT = 11  # pixels per caption line in PIL's default font


def save_grid(path: PathLike, rows: Dict[str, Sequence[Image.Image]], *, captions: Optional[Sequence[str]] = None,
              scale: int = 3, label_width: int = 110) -> Path:
    """One row per entry of ``rows`` (label -> images, equal counts), images upscaled
    ``scale``x; ``captions`` (one per column) are written under the columns."""
    if not rows:
        raise ValueError("rows: expected at least one row of images")
    counts = {len(v) for v in rows.values()}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"rows: expected the same non-zero number of images in every row, got {sorted(counts)}")
    columns = counts.pop()
    if captions is not None and len(captions) != columns:
        raise ValueError(f"captions: expected one per column ({columns}), got {len(captions)}")
    w, h = next(iter(rows.values()))[0].size
    cell_w, cell_h = w * scale + 2, h * scale + 2
    wrapped = [textwrap.wrap(c, width=max(8, (cell_w - 4) // 6)) for c in captions] if captions is not None else []
    caption_h = (max(len(lines) for lines in wrapped) * LINE_HEIGHT + 6) if wrapped else 0
    grid = Image.new("RGB", (label_width + columns * cell_w, len(rows) * cell_h + caption_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell_h + cell_h // 2 - 6), label, fill=(0, 0, 0))
        for c, image in enumerate(images):
            big = image.convert("RGB").resize((w * scale, h * scale), Image.Resampling.NEAREST)
            grid.paste(big, (label_width + c * cell_w + 1, r * cell_h + 1))
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((label_width + c * cell_w + 3, len(rows) * cell_h + 3 + k * LINE_HEIGHT), line, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_score_plot(path: PathLike, results: Dict[str, Dict[str, Tuple[float, float]]], *,
                    metrics: Sequence[str] = ("style_rate", "fidelity"), title: str = "") -> Path:
    """Bars of ``results[model][metric] = (mean, ci half-width)``, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models: List[str] = list(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        means = [results[m][metric][0] for m in models]
        errors = [results[m][metric][1] for m in models]
        ax.bar(models, means, yerr=errors, capsize=4, color=["#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(models)])
        ax.set_title(metric)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelrotation=20)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
