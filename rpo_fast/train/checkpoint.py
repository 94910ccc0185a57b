"""Checkpoints that survive a kill at any moment.

``<output_dir>/checkpoint-<step>/`` holds the trainable weights (safetensors) and the
optimizer state (with ``--fsdp``: both as a ``torch.distributed.checkpoint`` save in
safetensors files, one per rank, under ``shards/``, and the optimizer's plain values in
``optimizer_values.json``), the LR-scheduler and grad-scaler states, every process's RNG states and ``trainer_state.json``
(step, data position, counters, the options that must match on resume). It is written into
a hidden temporary folder, flushed to disk, then renamed: a folder named
``checkpoint-<step>`` is always complete, and ``--resume latest`` picks the highest one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from ..atomic import removed_on_failure
from .process import Process

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SHARDS_DIR = "shards"  # --fsdp: DCP's safetensors storage, one file per rank
VALUES_FILE = "optimizer_values.json"  # --fsdp: the optimizer state's entries that are not tensors


def list_checkpoints(output_dir: Path) -> Dict[int, Path]:
    found = {}
    if output_dir.is_dir():
        for p in output_dir.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).exists():
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def find_checkpoint(output_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """``resume``: None (start fresh), 'latest' (the newest checkpoint, or None if there is
    none yet), or a checkpoint folder (which must exist)."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[max(found)] if found else None
    path = Path(resume)
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume
    if not (path / STATE_FILE).exists():
        raise ValueError(f"resume: {resume!r} is not a checkpoint folder (no {STATE_FILE} in {path})")
    return path


def rng_state() -> Dict[str, Any]:
    """Every generator's state as tensors, ints and tuples: what ``torch.load(weights_only=True)``
    reads back without unpickling objects (numpy's key array travels as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_dir():
            _fsync_tree(f)
        elif f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class TrainingState:
    """What a checkpoint holds besides each rank's RNG state: the trained weights and the
    optimizer's state (with ``sharded``, this rank's shards, as train/sharding.py's
    ``state_dicts`` gives them; else rank 0's whole states), the LR schedule, fp16's grad scaler,
    and the trainer's counters and options (``STATE_FILE``)."""

    model: Dict[str, torch.Tensor]
    optimizer: Dict[str, Any]
    lr_scheduler: Any
    grad_scaler: Any
    trainer: Dict[str, Any]
    sharded: bool = False


def save_checkpoint(output_dir: Path, step: int, state: TrainingState, process: Process = Process(),
                    total_limit: Optional[int] = None) -> Path:
    """Every rank calls this (each writes its RNG state, and with ``state.sharded`` its shards);
    rank 0 writes the rest and renames; at most ``total_limit`` checkpoints are kept."""
    from safetensors.torch import save_file

    rank, barrier = process.rank, process.barrier
    model_state, optimizer_state, sharded = state.model, state.optimizer, state.sharded

    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with removed_on_failure(tmp):  # interrupted: no half-written folder stays behind
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        if sharded:
            _save_shards(tmp, model_state, optimizer_state, rank)
        elif rank == 0:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
            torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        if rank == 0:
            torch.save(state.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
            if state.grad_scaler is not None:
                torch.save(state.grad_scaler.state_dict(), tmp / "grad_scaler.pt")
            (tmp / STATE_FILE).write_text(json.dumps(state.trainer, indent=1))
        barrier()
        if rank == 0:
            _fsync_tree(tmp)
            old = output_dir / f".checkpoint-{step}.old"
            if final.exists():  # the same step written again after resuming from an earlier one
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            _fsync_dir(output_dir)
            shutil.rmtree(old, ignore_errors=True)
    if rank == 0 and total_limit is not None:
        found = list_checkpoints(output_dir)
        for s in sorted(found)[:-total_limit]:
            shutil.rmtree(found[s], ignore_errors=True)
    barrier()
    return final


def _shard_keys(model_state: Dict[str, Any], optimizer_state: Dict[str, Any]) -> Dict[str, Any]:
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    tensors.update({f"optimizer.{k}": v for k, v in optimizer_state.items() if torch.is_tensor(v)})
    return tensors


def _save_shards(folder: Path, model_state: Dict[str, Any], optimizer_state: Dict[str, Any], rank: int) -> None:
    """A DCP save (a collective: every rank its own shards, replicated tensors once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    dcp.save(_shard_keys(model_state, optimizer_state),
             storage_writer=HuggingFaceStorageWriter(str(folder / SHARDS_DIR), save_distributed=True))
    if rank == 0:
        values = {k: v for k, v in optimizer_state.items() if not torch.is_tensor(v)}
        (folder / VALUES_FILE).write_text(json.dumps(values, indent=0))


def _load_shards(path: Path, model_like: Dict[str, Any], optimizer_like: Dict[str, Any]):
    """The inverse, into the tensors of ``model_like`` / ``optimizer_like`` (a fresh run's
    sharded state: each rank reads its own shards). DCP's safetensors reader takes the layout
    from the files' JSON headers: nothing is unpickled."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    tensors = _shard_keys(model_like, optimizer_like)
    try:
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path / SHARDS_DIR)))
    except Exception as error:  # DCP wraps a rank's failure (e.g. a missing key) in a CheckpointException
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(f"resume: the sharded state in {path / SHARDS_DIR} does not fit this run ({first})") from None
    values = json.loads((path / VALUES_FILE).read_text())
    optimizer = {}
    for key, like in optimizer_like.items():
        if torch.is_tensor(like):
            optimizer[key] = tensors[f"optimizer.{key}"]
        elif key in values:
            optimizer[key] = tuple(values[key]) if isinstance(like, tuple) else values[key]  # JSON has no tuples
        else:
            raise ValueError(f"resume: {path / VALUES_FILE} has no {key!r} (written for another optimizer?)")
    return {k: tensors[f"model.{k}"] for k in model_like}, optimizer


def read_trainer_state(path: Path) -> Dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def load_checkpoint(path: Path, rank: int = 0, shards_like: Optional[tuple] = None) -> Dict[str, Any]:
    """Everything save_checkpoint wrote, as tensors and dicts (on the CPU); with ``shards_like``
    (``--fsdp``: a fresh run's model and optimizer state dicts) this rank's shards, loaded
    into those tensors."""
    from safetensors.torch import load_file

    rng_file = path / f"rng-rank{rank}.pt"
    for needed in (rng_file, path / (SHARDS_DIR if shards_like is not None else MODEL_FILE)):
        if not needed.exists():
            raise ValueError(f"resume: {path} has no {needed.name}; was it written with fewer processes, or "
                             f"{'without' if shards_like is not None else 'with'} --fsdp?")
    if shards_like is not None:
        model, optimizer = _load_shards(path, *shards_like)
    else:
        model, optimizer = load_file(str(path / MODEL_FILE)), _load_data(path / OPTIMIZER_FILE)
    scaler_file = path / "grad_scaler.pt"
    return {
        "model": model,
        "optimizer": optimizer,
        "lr_scheduler": _load_data(path / "lr_scheduler.pt"),
        "grad_scaler": _load_data(scaler_file) if scaler_file.exists() else None,
        "rng": _load_data(rng_file),
        "trainer_state": read_trainer_state(path),
    }


def _load_data(file: Path) -> Any:
    """Tensors, numbers, strings and containers only (``weights_only=True``): a checkpoint from
    someone else cannot run code when it is resumed."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"resume: {file} holds more than tensors and plain values (refused: loading it would "
                         f"run code it carries; a checkpoint from an older rpo-fast stored numpy objects): "
                         f"{str(error).splitlines()[0]}") from None
