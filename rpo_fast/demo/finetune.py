"""Fine-tune the demo's base model on the style preference data with ``rpo_fast.train``."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from .shapes import IMAGE_SIZE

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class FinetuneSettings:
    method: str = "rpo"  # rpo | dpo | sft
    beta: float = 2500.0
    learning_rate: float = 3e-4
    steps: int = 200
    batch_pairs: int = 8
    tau: float = 0.5
    lora_rank: int = 16  # 0: a full fine-tune; else LoRA adapters of this rank (alpha = rank)
    sft_weight: float = 300.0  # dpo / rpo: plus this times the SFT loss of the preferred images
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method == "sft":  # the SFT loss alone: there is no preference loss to add it to
            object.__setattr__(self, "sft_weight", 0.0)

    def label(self) -> str:
        beta = "" if self.method == "sft" else f" beta={self.beta:g}"
        lora = f" lora-rank={self.lora_rank}" if self.lora_rank else ""
        sft = f" sft-weight={self.sft_weight:g}" if self.sft_weight else ""
        return f"{self.method}{beta}{sft}{lora} lr={self.learning_rate:g} steps={self.steps} seed={self.seed}"


def finetune(model_dir: PathLike, data_dir: PathLike, out_dir: PathLike, settings: FinetuneSettings, *,
             embeddings: Optional[PathLike] = None, latent_cache: Optional[PathLike] = None,
             progress: bool = True, checkpoint_every: int = 0) -> Tuple[Path, Dict[int, Path]]:
    """A fresh fine-tune of the base UNet into ``out_dir``; returns what ``load_pipeline(tuned=)``
    reads (the ``unet/`` folder of a full fine-tune, ``out_dir`` with its LoRA weights) and the
    checkpoints written every ``checkpoint_every`` steps (step -> folder; none for 0).
    ``embeddings`` (rpo only): the cache whose similarities weight the contrast matrix;
    without it the weights are uniform."""
    from ..train import TrainConfig, train
    from ..train.checkpoint import list_checkpoints

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)  # a demo run is short: start clean, never half-resume
    result = train(TrainConfig(
        pretrained_model=str(model_dir), data=str(data_dir), output_dir=str(out_dir), method=settings.method,
        beta=settings.beta if settings.method != "sft" else 1.0,  # sft has no beta; TrainConfig wants > 0
        tau=settings.tau, sft_weight=settings.sft_weight,
        embeddings=str(embeddings) if embeddings and settings.method == "rpo" else None,
        lora=settings.lora_rank > 0, lora_rank=max(1, settings.lora_rank),
        learning_rate=settings.learning_rate, lr_scheduler="constant_with_warmup", lr_warmup_steps=min(10, settings.steps),
        max_steps=settings.steps, batch_pairs=settings.batch_pairs, resolution=IMAGE_SIZE, seed=settings.seed,
        checkpoint_every=checkpoint_every, checkpoints_total_limit=None if checkpoint_every else 1,
        latent_cache=str(latent_cache) if latent_cache else None,
        vae_encode_batch_size=256, progress=progress, tensorboard=False, log_every=10,
        hflip=False,  # captions say "on the left": a flipped image would contradict its caption
    ))
    checkpoints = list_checkpoints(result.output_dir)
    # the end-of-run checkpoint repeats the weights in unet/: drop it to keep the folder small
    for step in [s for s in checkpoints if s == settings.steps or not checkpoint_every]:
        shutil.rmtree(checkpoints.pop(step), ignore_errors=True)
    return (result.output_dir if settings.lora_rank else result.output_dir / "unet"), checkpoints
