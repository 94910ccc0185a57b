"""rpo-fast: Diffusion-RPO losses as fused kernels, and a lean trainer for SD1.5 / SDXL."""

from . import _extension
from .dispatch import available_backends
from .functional import diffusion_dpo_loss, diffusion_rpo_loss, sft_loss
from .module import RPOLoss
from .weights import similarity_weights

__version__ = "0.1.0"

_extension.load()  # warns once if the compiled extension is missing

__all__ = [
    "RPOLoss",
    "available_backends",
    "diffusion_dpo_loss",
    "diffusion_rpo_loss",
    "similarity_weights",
    "sft_loss",
]
