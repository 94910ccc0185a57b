"""The reference model of dpo / rpo, in one of three forms.

* LoRA: the trained UNet itself with its adapters disabled (no second copy of the weights).
* Full fine-tuning: a frozen copy of the initial UNet, optionally in bf16/fp16.
* ``precompute_ref``: before training, one no-grad pass computes the reference error of every
  (epoch, row) the run will visit, with that row's fixed noise and timestep (batches.py), and
  keeps only those numbers: no reference model is held or run while training. The table is
  saved next to the checkpoints, so a resumed run reuses it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..data import content_hash
from ..atomic import write_atomic
from .batches import PairSchedule, assemble_batch
from .forward import UNetInputs, per_sample_mse, predict, unet_inputs
from .process import Process

REF_ERRORS_FILE = "reference_errors.safetensors"


@contextlib.contextmanager
def adapters_disabled(unet):
    """The pretrained UNet from a LoRA-wrapped one (peft layers bypassed), then back."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class Reference:
    """``ref_pred(inputs)`` for the live forms, ``ref_err(batch)`` for the precomputed one."""

    def __init__(self, kind: str, model=None, table: Optional[torch.Tensor] = None):
        self.kind = kind  # lora | copy | precomputed
        self.model = model  # the module (whose adapters are toggled, for lora)
        self.forward = model  # what is called: the module, or a compiled wrapper of it
        self.table = table  # (epochs, N, 2) float32

    @torch.no_grad()
    def ref_pred(self, inputs: UNetInputs, autocast: Callable) -> torch.Tensor:
        with autocast():
            if self.kind == "lora":
                with adapters_disabled(self.model):
                    return predict(self.forward, inputs)
            return predict(self.forward, inputs)

    def ref_err(self, epoch: int, rows: torch.Tensor, device) -> torch.Tensor:
        """(2M,) winners first, from the precomputed table."""
        if epoch >= self.table.shape[0]:
            raise RuntimeError(f"precomputed reference errors cover {self.table.shape[0]} epoch(s), asked for epoch {epoch}")
        errors = self.table[epoch, rows]  # (M, 2)
        if not bool(torch.isfinite(errors).all()):
            raise RuntimeError("precomputed reference errors missing for some rows of this batch "
                               "(the run's schedule changed?): delete reference_errors.safetensors to recompute")
        return torch.cat([errors[:, 0], errors[:, 1]]).to(device)


def frozen_copy(unet: torch.nn.Module, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    ref = copy.deepcopy(unet).requires_grad_(False).eval()
    return ref.to(dtype) if dtype is not None else ref


def visited_rows(schedule: PairSchedule, num_micro_batches: int):
    """{epoch: rows visited in that epoch} for micro-batches ``[0, num_micro_batches)``."""
    visited = {}
    per_epoch = schedule.micro_batches_per_epoch
    last_epoch = (num_micro_batches - 1) // per_epoch
    for epoch in range(last_epoch + 1):
        count = min(per_epoch, num_micro_batches - epoch * per_epoch) * schedule.global_pairs
        visited[epoch] = schedule.permutation(epoch)[:count]
    return visited


def table_key(dataset_fingerprint: str, latent_key: str, model_key: str, schedule: PairSchedule,
              num_micro_batches: int, mixed_precision: str, empty_prompt_rate: float = 0.0, draw=None) -> str:
    empty = (("empty-prompts", empty_prompt_rate),) if empty_prompt_rate else ()
    flow = (("timesteps", repr(draw)),) if draw is not None and draw.scheme != "uniform" else ()  # SD keys as before
    return content_hash("ref-errors-v1", dataset_fingerprint, latent_key, model_key, schedule.seed,
                        schedule.global_pairs, num_micro_batches, mixed_precision, *empty, *flow)


@torch.no_grad()
def precompute_reference_errors(unet: torch.nn.Module, models, cache, prompts, schedule: PairSchedule, config,
                                dataset_fingerprint: str, process: Process) -> torch.Tensor:
    """The (epochs, N, 2) table of reference errors (NaN where a row is not visited) of the
    ``config.max_steps`` steps of ``config`` (a TrainConfig), loaded from the run's
    ``REF_ERRORS_FILE`` when its key (``table_key``: data, latents, model, schedule, length,
    precision) matches, else computed (split over ranks) and saved."""
    num_micro_batches = config.max_steps * config.gradient_accumulation_steps
    key = table_key(dataset_fingerprint, cache.folder.name, f"{config.pretrained_model}@{config.revision}/"
                    f"{config.variant}", schedule, num_micro_batches, config.mixed_precision, prompts.empty_rate,
                    models.timestep_draw)
    path = Path(config.output_dir).expanduser().resolve() / REF_ERRORS_FILE
    seed, resolution, batch_pairs = config.seed, config.resolution, 2 * config.batch_pairs
    rank, world, device = process.rank, process.world, process.device
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return f.get_tensor("errors")
    visited = visited_rows(schedule, num_micro_batches)
    table = torch.zeros(len(visited), cache.num_rows, 2, dtype=torch.float64)
    filled = torch.zeros(len(visited), cache.num_rows, dtype=torch.float64)
    chunks = [(epoch, rows[i : i + batch_pairs]) for epoch, rows in visited.items()
              for i in range(0, len(rows), batch_pairs)]
    mine = chunks[rank::world]
    start = time.perf_counter()
    was_training = unet.training
    unet.eval()
    for epoch, rows in tqdm(mine, desc="reference errors", unit="batch", disable=not process.progress,
                            dynamic_ncols=True):
        batch = assemble_batch(epoch, rows, cache, prompts, seed, models.timestep_draw)
        inputs = unet_inputs(models, batch, device, resolution)
        with process.autocast(config.mixed_precision):
            errors = per_sample_mse(predict(unet, inputs), inputs.target).double().cpu()
        m = len(rows)
        table[epoch, rows, 0] = errors[:m]
        table[epoch, rows, 1] = errors[m:]
        filled[epoch, rows] = 1.0
    unet.train(was_training)
    if rank == 0:
        pairs, seconds = sum(len(rows) for _, rows in mine), time.perf_counter() - start
        print(f"rpo-fast train: reference errors of {pairs} pair(s) in {seconds:.2f} s "
              f"({1e3 * seconds / max(pairs, 1):.1f} ms a pair{', rank 0' if world > 1 else ''})", flush=True)
    if world > 1:
        import torch.distributed as dist

        summed = []
        for t in (table, filled):  # on the device: NCCL reduces only GPU tensors
            t = t.to(device)
            dist.all_reduce(t, group=process.group)
            summed.append(t.cpu())
        table, filled = summed
    table = table.float()
    table[filled == 0] = float("nan")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"key": key, "epochs": json.dumps(len(visited))}
        write_atomic(path, lambda tmp: save_file({"errors": table.contiguous()}, str(tmp), metadata=metadata))
    return table


def readable_rows(valid: np.ndarray, emb_valid: Optional[np.ndarray] = None) -> np.ndarray:
    keep = valid.copy()
    if emb_valid is not None:
        keep &= emb_valid
    return np.flatnonzero(keep)
