"""A lean Diffusion-RPO / DPO / SFT trainer for Stable Diffusion 1.5 and XL.

``train(TrainConfig(...))`` from Python, ``rpo-fast train`` from the shell. Modules, in the
order a run uses them: config (options), models (loading, LoRA, export), latent_cache,
batches (rows, noise and timesteps as pure functions of seed/epoch/row), forward, ref_model,
checkpoint, metrics_log, loop (prepare / train_step / train), cli.
"""

from .config import TrainConfig, load_yaml_config
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "load_yaml_config", "train"]
