"""Which rows each micro-batch holds, and every random draw of a sample, as pure functions.

Nothing here depends on hidden RNG state: the rows of micro-batch ``u`` come from a
permutation seeded by (seed, epoch), and the VAE posterior draw, the noise and the timestep of
a row come from a generator seeded by (seed, epoch, row), and so does its horizontal flip
(when the latent cache holds flipped images). So a resumed run sees exactly the
batches an uninterrupted one would, a precomputed reference pass sees the same noise and
timestep as the training step that uses it, and the batches do not depend on how many
DataLoader workers assemble them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from .families import TimestepDraw
from .latent_cache import LatentCache


def sample_seed(seed: int, epoch: int, row: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, row, 0x5250]).generate_state(1, dtype=np.uint64)[0] >> 1)


def draw_flip(seed: int, epoch: int, row: int) -> bool:
    """Whether both images of ``row`` are flipped horizontally in ``epoch`` (probability 1/2,
    a pair flipped together as in the diffusers SDXL DPO example); a stream of its own, so
    the other draws are the same with and without flipping."""
    return bool(np.random.SeedSequence([seed, epoch, row, 0x464C]).generate_state(1)[0] & 1)


def draw_empty_prompt(seed: int, epoch: int, row: int) -> float:
    """A uniform draw in [0, 1) per (seed, epoch, row): the pair trains on the empty prompt
    when it falls below ``--proportion-empty-prompts`` (a stream of its own, like the flip)."""
    return float(np.random.SeedSequence([seed, epoch, row, 0x454D]).generate_state(1, dtype=np.uint64)[0] / 2.0**64)


@dataclass(frozen=True)
class PromptTable:
    """Row -> prompt in an epoch: the dataset's, or the empty prompt for the pairs that
    ``empty_rate`` drops (diffusers' --proportion_empty_prompts)."""

    prompts: List[str]
    seed: int = 0
    empty_rate: float = 0.0

    def __call__(self, epoch: int, row: int) -> str:
        if self.empty_rate and draw_empty_prompt(self.seed, epoch, row) < self.empty_rate:
            return ""
        return self.prompts[row]


class PairSchedule:
    """Micro-batch ``u`` -> (epoch, rows of this rank). Each epoch visits the readable rows
    in a fresh permutation; the last incomplete global micro-batch of an epoch is dropped."""

    def __init__(self, readable_rows: np.ndarray, batch_pairs: int, world: int, seed: int):
        self.rows = np.asarray(readable_rows, dtype=np.int64)
        self.batch_pairs, self.world, self.seed = batch_pairs, world, seed
        self.global_pairs = batch_pairs * world
        self.micro_batches_per_epoch = len(self.rows) // self.global_pairs
        if self.micro_batches_per_epoch == 0:
            raise ValueError(
                f"data: {len(self.rows)} readable pairs, fewer than one global batch of {self.global_pairs} "
                f"(batch_pairs {batch_pairs} x {world} processes); lower batch_pairs or add data"
            )
        self._perm_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_cache[0] != epoch:
            perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.rows))
            self._perm_cache = (epoch, self.rows[perm])
        return self._perm_cache[1]

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.micro_batches_per_epoch

    def global_rows(self, micro_batch: int) -> Tuple[int, np.ndarray]:
        epoch, b = divmod(micro_batch, self.micro_batches_per_epoch)
        return epoch, self.permutation(epoch)[b * self.global_pairs : (b + 1) * self.global_pairs]

    def local_rows(self, micro_batch: int, rank: int) -> Tuple[int, np.ndarray]:
        epoch, rows = self.global_rows(micro_batch)
        return epoch, rows[rank * self.batch_pairs : (rank + 1) * self.batch_pairs]


@dataclass
class SampleDraw:
    timestep: int
    noise: torch.Tensor  # (C, h, w)
    eps_w: torch.Tensor  # posterior draws of the two cached latents
    eps_l: torch.Tensor
    flip: bool = False  # only meaningful when the cache holds flipped images


def _generator(seed: int, epoch: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, epoch, row))


def draw_sample(seed: int, epoch: int, row: int, shape: Tuple[int, ...], draw: TimestepDraw) -> SampleDraw:
    """The random draws of one row in one epoch, in the order :func:`assemble_batch` makes
    them: one timestep and one noise for both images of the pair (as in Diffusion-DPO), then
    the posterior draws of the two cached latents."""
    g = _generator(seed, epoch, row)
    timestep = draw(g)
    noise, eps_w, eps_l = (torch.empty(shape).normal_(generator=g) for _ in range(3))
    return SampleDraw(timestep, noise, eps_w, eps_l, draw_flip(seed, epoch, row))


@dataclass
class PairBatch:
    epoch: int
    rows: torch.Tensor  # (M,) dataset rows
    prompts: List[str]
    latents: torch.Tensor  # (2M, C, h, w) winners first
    noise: torch.Tensor  # (2M, C, h, w), rows i and M + i equal
    timesteps: torch.Tensor  # (2M,), rows i and M + i equal

    def pin_memory(self) -> "PairBatch":
        self.latents, self.noise = self.latents.pin_memory(), self.noise.pin_memory()
        return self


def assemble_batch(epoch: int, rows: np.ndarray, cache: LatentCache, prompt_of: Callable[[int, int], str], seed: int,
                   draw: TimestepDraw) -> PairBatch:
    """The batch of ``rows``, drawn straight into preallocated tensors (the draws of
    :func:`draw_sample`, without a temporary tensor per row)."""
    rows_list = [int(r) for r in rows]
    m = len(rows_list)
    shape = tuple(cache.latent_shape)
    latents = torch.empty((2 * m, *shape))
    noise = torch.empty((2 * m, *shape))
    timesteps = torch.empty(2 * m, dtype=torch.long)
    eps = torch.empty(shape)
    for i, row in enumerate(rows_list):
        mean_w, std_w, mean_l, std_l = cache.get(row, flip=cache.has_flips and draw_flip(seed, epoch, row))
        g = _generator(seed, epoch, row)
        timesteps[i] = timesteps[m + i] = draw(g)
        noise[i].normal_(generator=g)
        noise[m + i].copy_(noise[i])
        eps.normal_(generator=g)
        torch.addcmul(mean_w, std_w, eps, out=latents[i])  # latent = mean + std * eps
        eps.normal_(generator=g)
        torch.addcmul(mean_l, std_l, eps, out=latents[m + i])
    return PairBatch(epoch, torch.tensor(rows_list, dtype=torch.long), [prompt_of(epoch, r) for r in rows_list],
                     latents, noise, timesteps)


class MicroBatches(torch.utils.data.Dataset):
    """Index ``u`` (a micro-batch number) -> this rank's PairBatch; for a DataLoader with
    ``batch_size=None`` so that workers assemble batches ahead of the training step."""

    def __init__(self, schedule: PairSchedule, cache: LatentCache, prompts: PromptTable, rank: int, seed: int,
                 draw: TimestepDraw, start: int, stop: int):
        self.schedule, self.cache, self.prompts = schedule, cache, prompts
        self.rank, self.seed, self.draw = rank, seed, draw
        self.start, self.stop = start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> PairBatch:
        epoch, rows = self.schedule.local_rows(self.start + i, self.rank)
        return assemble_batch(epoch, rows, self.cache, self.prompts, self.seed, self.draw)


def micro_batch_loader(dataset: MicroBatches, num_workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
    )
