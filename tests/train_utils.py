"""Shared helpers of the training tests: synthetic preference data and a tiny TrainConfig."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rpo_fast.data import write_pickapic_parquet
from rpo_fast.train import TrainConfig

NUM_GOOD_ROWS = 16  # plus one row with an unreadable image


def synthetic_pickapic(folder: Path, rows: int = NUM_GOOD_ROWS, seed: int = 0) -> Path:
    """Warm-toned images preferred over cool-toned ones, odd sizes (resized and cropped by
    the trainer), alternating label_0 so both columns hold winners, one corrupt image."""
    rng = np.random.default_rng(seed)

    def image(warm: bool) -> Image.Image:
        base = np.array([200, 90, 40] if warm else [40, 90, 200], dtype=np.float64)
        pixels = np.clip(base + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels)

    data = []
    for i in range(rows):
        warm, cool = image(True), image(False)
        data.append((f"a picture of object {i}", warm, cool, 1.0) if i % 2 else
                    (f"a picture of object {i}", cool, warm, 0.0))
    data.append(("a broken row", b"\x89PNG not really", image(True), 1.0))
    write_pickapic_parquet(folder, data, row_group_size=5)
    return folder


def tiny_config(model: Path, data: Path, output_dir: Path, latent_cache: Path, **overrides) -> TrainConfig:
    values = dict(
        pretrained_model=str(model), data=str(data), output_dir=str(output_dir), latent_cache=str(latent_cache),
        resolution=32, batch_pairs=2, max_steps=2, learning_rate=1e-4, compile=False, progress=False,
        checkpoint_every=0, log_every=1, vae_encode_batch_size=16,
    )
    values.update(overrides)
    return TrainConfig(**values)


def unet_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    assert files, f"no safetensors in {path}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


class one_thread:
    """The test machines are small and shared: oversubscribed intra-op threads make tiny
    models orders of magnitude slower, so training tests run torch on one thread."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)
