"""This process's place in a launch, built once and passed as one object.

Under ``torchrun`` the launcher's variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) say
which process this is; without it, one process. Everything that differs between ranks, or
waits for all of them, reads it from here: the device, the rank and world size, their process
group, the barrier, whether this process shows progress bars, and autocast on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .._types import DTYPE_NAMES


@dataclass(frozen=True)
class Process:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world: int = 1
    group: Any = None  # the process group (None: one process)
    owns_group: bool = False  # this process started the group, and ends it
    bars: bool = True  # progress bars wanted (the main process shows them)

    @classmethod
    def start(cls, config) -> "Process":
        """From torchrun's variables and ``config`` (device, TF32, DDP timeout, progress)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if config.device is not None:
            device = torch.device(config.device)
        else:
            device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
            torch.backends.cudnn.allow_tf32 = config.allow_tf32
        owns_group = False
        if world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(minutes=config.ddp_timeout_minutes))
            owns_group = True
        return cls(device, rank, world, dist.group.WORLD if world > 1 else None, owns_group, config.progress)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def progress(self) -> bool:
        """Whether this process shows progress bars."""
        return self.bars and self.main

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def autocast(self, mixed_precision: str):
        return torch.autocast(self.device.type, dtype=weight_dtype(mixed_precision), enabled=mixed_precision != "no")

    def close(self) -> None:
        """Ends the process group this process started (none otherwise)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return DTYPE_NAMES.get(mixed_precision, torch.float32)  # "no": fp32
