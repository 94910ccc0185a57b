"""The tiny SD1.5-architecture model and synthetic preference data both training loops read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rpo_fast.data import write_pickapic_parquet
from benchmarks.tiny_models import build_tiny_sd15

PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen, studio photo", "an astronaut riding a horse")


def tiny_model(workdir: Path) -> Path:
    """``workdir/tiny-sd15``: built once (``save_pretrained`` layout), then reused."""
    folder = Path(workdir) / "tiny-sd15"
    if not (folder / "model_index.json").exists():
        build_tiny_sd15(folder)
    return folder


def _image(rng: np.random.Generator, resolution: int) -> Image.Image:
    """A smooth random picture (coarse colour field, upsampled, plus grain): JPEG-compressible
    like a photo, unlike white noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((resolution, resolution), Image.BICUBIC)
    grain = rng.normal(0, 8, (resolution, resolution, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def preference_data(workdir: Path, resolution: int, rows: int, seed: int = 0) -> Path:
    """``workdir/data-<rows>x<resolution>px``: a Pick-a-Pic-style parquet of ``rows`` pairs of
    JPEGs at the training resolution (label_0 = 1 or 0, no ties)."""
    folder = Path(workdir) / f"data-{rows}x{resolution}px"
    if not (folder / "train.parquet").exists():
        rng = np.random.default_rng(seed)
        write_pickapic_parquet(
            folder,
            ((PROMPTS[i % len(PROMPTS)], _image(rng, resolution), _image(rng, resolution), float(i % 2)) for i in range(rows)),
            image_format="JPEG",
        )
    return folder
