"""The text-embedding cache: each distinct prompt of the data encoded once, before training.

Diffusion-DPO trainers run the text encoder(s) on every step for prompts that never change;
SDXL's two encoders are 0.8 B parameters held on the device for it. Here every distinct prompt
(and the empty prompt, for ``--proportion-empty-prompts``) is encoded once into
``<cache root>/text-<key>/``, the step reads its rows, and the encoders leave the device. The
key covers the data, the text encoders' and tokenizers' identity and the dtype the encoders
ran in, so a different model or precision gets a cache of its own.

Layout: ``prompts.json`` (the distinct prompts, in order of first appearance) and
``shard-00000.safetensors``, ... with ``hidden`` (S, L, D) and, but for SD1.5, ``pooled`` (S, P)
for prompts ``[i S, (i + 1) S)``. A shard is written whole (a temporary file, then a rename),
so a fill cut short resumes at the first missing shard; with several ranks each encodes
shards ``rank, rank + world, ...``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..data import content_hash
from ..atomic import write_atomic
from .latent_cache import shard_name
from .models import Models, encode_prompts, module_identity
from .process import Process

FORMAT_VERSION = 1
SHARD_SIZE = 256


def encoder_identity(models: Models) -> str:
    tokenizers = [(type(t).__name__, len(t), t.model_max_length) for t in models.tokenizers]
    encoders = [(module_identity(e), str(next(e.parameters()).dtype)) for e in models.text_encoders]
    return content_hash(models.model_type, tokenizers, encoders)


class TextCache:
    """Rows of the cache by prompt: ``lookup(prompts, device)`` returns what
    :func:`rpo_fast.train.models.encode_prompts` returns for them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        prompts = json.loads((self.folder / "prompts.json").read_text())
        self.index: Dict[str, int] = {p: i for i, p in enumerate(prompts)}
        self._shards: Dict[int, object] = {}  # open safetensors files: rows are read, not whole shards
        self.has_pooled = "pooled" in self._shard(0).keys()  # every family but SD1.5 stores a pooled embedding

    def _shard(self, s: int):
        if s not in self._shards:
            from safetensors import safe_open

            self._shards[s] = safe_open(str(self.folder / shard_name(s)), framework="pt")
        return self._shards[s]

    def _rows(self, name: str, rows: List[int]) -> torch.Tensor:
        return torch.cat([self._shard(r // SHARD_SIZE).get_slice(name)[r % SHARD_SIZE:r % SHARD_SIZE + 1] for r in rows])

    def lookup(self, prompts: List[str], device) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        try:
            rows = [self.index[p] for p in prompts]
        except KeyError as missing:
            raise RuntimeError(f"text cache {self.folder} has no embedding for prompt {missing}") from None
        hidden = self._rows("hidden", rows).to(device, non_blocking=True)
        if not self.has_pooled:
            return hidden, None
        return hidden, self._rows("pooled", rows).to(device, non_blocking=True)


def _missing_shards(folder: Path, count: int) -> List[int]:
    return [s for s in range(count) if not (folder / shard_name(s)).exists()]


def build_text_cache(models: Models, prompts: List[str], root: Path, dataset_fingerprint: str, *,
                     process: Process = Process(), batch_size: int = 32) -> TextCache:
    """Encodes (or reuses) every distinct prompt of ``prompts`` plus the empty one with the
    models' text encoders, which must be on ``process.device``; returns the cache opened."""
    rank, world, device = process.rank, process.world, process.device
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    distinct = list(dict.fromkeys(["", *prompts]))
    folder = Path(root) / f"text-{content_hash(FORMAT_VERSION, dataset_fingerprint, encoder_identity(models))}"
    shards = (len(distinct) + SHARD_SIZE - 1) // SHARD_SIZE
    todo = [s for s in _missing_shards(folder, shards) if s % world == rank]
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "prompts.json", lambda tmp: tmp.write_text(json.dumps(distinct)))
        bar = tqdm(total=sum(len(distinct[s * SHARD_SIZE:(s + 1) * SHARD_SIZE]) for s in todo), desc="encoding prompts",
                   unit="prompt", disable=not process.progress, dynamic_ncols=True)
        for s in todo:
            chunk = distinct[s * SHARD_SIZE:(s + 1) * SHARD_SIZE]
            hidden, pooled = [], []
            for i in range(0, len(chunk), batch_size):
                h, p = encode_prompts(models, chunk[i:i + batch_size], device)
                hidden.append(h.cpu())
                if p is not None:
                    pooled.append(p.cpu())
                bar.update(len(chunk[i:i + batch_size]))
            tensors = {"hidden": torch.cat(hidden).contiguous()}
            if pooled:
                tensors["pooled"] = torch.cat(pooled).contiguous()
            write_atomic(folder / shard_name(s), lambda tmp: save_file(tensors, str(tmp)))
        bar.close()
    process.barrier()  # every rank, whether it had work or not: collectives must pair up
    if _missing_shards(folder, shards) or not (folder / "prompts.json").exists():
        raise RuntimeError(f"text cache {folder} is incomplete after filling it")
    return TextCache(folder)
