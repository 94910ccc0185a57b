"""Fine-tune the demo's base model on the style preference data with ``rpo_fast.train``."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from .shapes import IMAGE_SIZE

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class FinetuneSettings:
    method: str = "rpo"  # rpo | dpo | sft
    beta: float = 1250.0  # the demo's similarity weights average 1 with a mean diagonal of 2.3: ~2900 on a pair's own logit
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


RESUME_EVERY = 25  # steps between the checkpoints an interrupted fine-tune continues from
RUN_FILE = "demo_finetune.json"  # the inputs of the run in the folder, and whether it finished


def _stamp(path: Path) -> List:
    """Each file under ``path`` (or ``path`` itself) by name, size and modification time: a
    rebuilt base model or rewritten data changes it."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[p.relative_to(path).as_posix() if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def finetune(model_dir: PathLike, data_dir: PathLike, out_dir: PathLike, settings: FinetuneSettings, *,
             embeddings: Optional[PathLike] = None, latent_cache: Optional[PathLike] = None,
             progress: bool = True, checkpoint_every: int = 0) -> Tuple[Path, Dict[int, Path]]:
    """A fine-tune of the base UNet into ``out_dir``; returns what ``load_pipeline(tuned=)``
    reads (the ``unet/`` folder of a full fine-tune, ``out_dir`` with its LoRA weights) and the
    checkpoints written every ``checkpoint_every`` steps (step -> folder; none for 0).
    ``embeddings`` (rpo only): the cache whose similarities weight the contrast matrix;
    without it the weights are uniform.

    The same call again (same settings, base, data and embeddings, none of them rewritten)
    returns the finished run as it is, or continues an interrupted one from its last
    checkpoint (every ``checkpoint_every`` steps, else every :data:`RESUME_EVERY`); any
    other call starts ``out_dir`` over."""
    from ..train import TrainConfig, train
    from ..train.checkpoint import list_checkpoints

    out_dir = Path(out_dir)
    tuned = out_dir if settings.lora_rank else out_dir / "unet"
    inputs = {"settings": settings.__dict__, "checkpoint_every": checkpoint_every, "model": _stamp(Path(model_dir)),
              "data": _stamp(Path(data_dir)), "embeddings": _stamp(Path(embeddings)) if embeddings else None}
    record = out_dir / RUN_FILE
    try:
        earlier = json.loads(record.read_text())
    except (OSError, ValueError):  # none yet (or cut short by a kill)
        earlier = {}
    if earlier == {"inputs": inputs, "finished": True}:
        return tuned, list_checkpoints(out_dir)
    resume = earlier.get("inputs") == inputs and bool(list_checkpoints(out_dir))
    if not resume:  # nothing to continue: start clean
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        record.write_text(json.dumps({"inputs": inputs, "finished": False}))
    result = train(TrainConfig(
        pretrained_model=str(model_dir), data=str(data_dir), output_dir=str(out_dir), method=settings.method,
        beta=settings.beta if settings.method != "sft" else 1.0,  # sft has no beta; TrainConfig wants > 0
        tau=settings.tau, sft_weight=settings.sft_weight,
        embeddings=str(embeddings) if embeddings and settings.method == "rpo" else None,
        lora=settings.lora_rank > 0, lora_rank=max(1, settings.lora_rank),
        learning_rate=settings.learning_rate, lr_scheduler="constant_with_warmup", lr_warmup_steps=min(10, settings.steps),
        max_steps=settings.steps, batch_pairs=settings.batch_pairs, resolution=IMAGE_SIZE, seed=settings.seed,
        checkpoint_every=checkpoint_every or RESUME_EVERY, checkpoints_total_limit=None if checkpoint_every else 1,
        resume="latest" if resume else None, latent_cache=str(latent_cache) if latent_cache else None,
        vae_encode_batch_size=256, progress=progress, tensorboard=False, log_every=10,
        hflip=False,  # captions say "on the left": a flipped image would contradict its caption
    ))
    checkpoints = list_checkpoints(result.output_dir)
    # the end-of-run checkpoint repeats the weights in unet/, and the resume ones are done with:
    # drop them to keep the folder small
    for step in [s for s in checkpoints if s == settings.steps or not checkpoint_every]:
        shutil.rmtree(checkpoints.pop(step), ignore_errors=True)
    record.write_text(json.dumps({"inputs": inputs, "finished": True}))
    return tuned, checkpoints
