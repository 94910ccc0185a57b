"""Checks of a run's inputs that need no model: every path, every optional package, and
whether the output folder already holds a run. They run before anything loads, so that a
mistake costs a second and one line naming the option, not a model load and a traceback."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import List

from ..hub import in_hub_cache, require_download
from . import checkpoint as ckpt
from .config import TrainConfig
from .metrics_log import METRICS_FILE
from .models import check_source

# What a run writes into its output_dir (checkpoint-<step>/ folders aside).
RUN_FILES = (METRICS_FILE, "train_config.yaml", "skipped_pairs.jsonl", "reference_errors.safetensors",
             "pytorch_lora_weights.safetensors", "unet", "tensorboard")


def check_paths_and_packages(config: TrainConfig) -> None:
    """ValueError naming the option for a missing path or package."""
    for what, source, marker in (("pretrained_model", config.pretrained_model, "model_index.json"),
                                 ("pretrained_vae", config.pretrained_vae, "config.json")):
        if source and not check_source(what, source, marker).is_dir():  # a hub id: offline, it must be cached
            require_download(what, source, f"pass a local folder instead (`huggingface-cli download {source} "
                             "--local-dir DIR` on a machine that reaches the hub)",
                             cached=in_hub_cache(source, cache_dir=config.cache_dir))
    if config.embeddings:
        path = Path(config.embeddings).expanduser()
        if not path.is_file():
            parts = path.with_name(path.name + ".parts")
            hint = ("is incomplete: rerun `rpo-fast embed` with the same arguments to finish it" if parts.is_dir()
                    else "does not exist: build it with `rpo-fast embed --data ... --output " + str(path) + "`")
            raise ValueError(f"embeddings: {path} {hint}")
    if config.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("optimizer: adamw8bit (--use_8bit_adam) needs bitsandbytes: pip install bitsandbytes")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("tensorboard: requested (--tensorboard, --report_to tensorboard) but not installed: "
                         "pip install tensorboard")
    if config.resume not in (None, "latest"):
        ckpt.find_checkpoint(Path(config.output_dir).expanduser().resolve(), config.resume)


def run_contents(output_dir: Path) -> List[str]:
    """The names of what an earlier run left in ``output_dir``."""
    found = [p.name for p in ckpt.list_checkpoints(output_dir).values()]
    return found + [name for name in RUN_FILES if (output_dir / name).exists()]


def check_output_dir(config: TrainConfig) -> None:
    """A folder holding a run is continued (``--resume``) or started over
    (``--overwrite-output-dir``), never silently overwritten."""
    output_dir = Path(config.output_dir).expanduser().resolve()
    found = run_contents(output_dir)
    if config.overwrite_output_dir and config.resume is not None:
        raise ValueError("overwrite_output_dir: cannot be combined with --resume (continue the run or start over)")
    if found and config.resume is None and not config.overwrite_output_dir:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"output_dir: {output_dir} holds a run ({shown}); pass --resume latest to continue it "
                         "or --overwrite-output-dir to start over")


def clear_run(output_dir: Path) -> List[str]:
    """Deletes what an earlier run wrote (nothing else); returns the names deleted."""
    found = run_contents(output_dir)
    for name in found:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return found
