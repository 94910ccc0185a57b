"""The latent cache: every image VAE-encoded once, reused across epochs and runs.

A cache folder is keyed by (dataset fingerprint, resolution, crop policy, VAE identity), so a
cache built for other data, another size or another VAE is never read by mistake. It holds
``meta.json`` and shards ``shard-00000.safetensors`` ... of ``shard_size`` rows each, with
the VAE posterior's mean and standard deviation (already multiplied by the VAE scaling
factor) of both images of a row, and ``valid`` (0 where an image was unreadable). Training
draws ``latent = mean + std * eps`` like ``latent_dist.sample()`` of the diffusers
examples, with ``eps`` fixed per (seed, epoch, row).

With ``hflip`` the cache also holds the encodings of both images flipped horizontally
(``*_flip``), so that a batch can flip a pair (drawn per seed, epoch and row) without a VAE.
The crop is the centre, or with ``crop_seed`` a random position per image drawn from
(crop_seed, row): one crop per image, the same in every epoch.

Shards are written to a temporary name and renamed, so an interrupted fill resumes where
it stopped; with several processes each fills its own shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps

from ..data import PreferenceDataset, content_hash
from .process import Process
from ..atomic import write_atomic

FORMAT_VERSION = 1
CROP_POLICY = "resize-shorter-side-bilinear+center-crop"
_NAMES = ("mean_w", "std_w", "mean_l", "std_l")
_FLIP_NAMES = tuple(n + "_flip" for n in _NAMES)


def default_cache_root() -> Path:
    base = os.environ.get("RPO_FAST_CACHE")
    if base:
        return Path(base) / "latents"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rpo_fast" / "latents"


def crop_policy(hflip: bool = False, crop_seed: Optional[int] = None) -> str:
    policy = CROP_POLICY if crop_seed is None else f"resize-shorter-side-bilinear+random-crop(seed={crop_seed})"
    return policy + ("+hflip" if hflip else "")


def cache_key(dataset_fingerprint: str, resolution: int, vae_identity: str, hflip: bool = False,
              crop_seed: Optional[int] = None) -> str:
    extra = () if not hflip and crop_seed is None else (crop_policy(hflip, crop_seed),)
    return content_hash(FORMAT_VERSION, dataset_fingerprint, resolution, CROP_POLICY, vae_identity, *extra)


def crop_centering(crop_seed: Optional[int], row: int, image: int) -> Tuple[float, float]:
    """Where image ``image`` (0: chosen, 1: rejected) of ``row`` is cropped, as ImageOps.fit's
    ``centering`` (0: left/top edge, 1: right/bottom): the centre, or drawn from (crop_seed, row)."""
    if crop_seed is None:
        return 0.5, 0.5
    x, y = np.random.Generator(np.random.PCG64([crop_seed, row, image, 0x4352])).random(2)
    return float(x), float(y)


def image_to_tensor(image: Image.Image, resolution: int, centering: Tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    """RGB image -> (3, resolution, resolution) in [-1, 1]: shorter side resized, cropped at ``centering``."""
    image = ImageOps.fit(image, (resolution, resolution), method=Image.BILINEAR, centering=centering)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class _PixelRows(torch.utils.data.Dataset):
    """Row -> (row, pixels of chosen, pixels of rejected, readable) for the encoding pass."""

    def __init__(self, dataset: PreferenceDataset, rows: range, resolution: int, crop_seed: Optional[int] = None):
        self.dataset, self.rows, self.resolution, self.crop_seed = dataset, rows, resolution, crop_seed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        pair = self.dataset.get_pair(row)
        if pair is None:
            blank = torch.zeros(3, self.resolution, self.resolution)
            return row, blank, blank, False
        chosen, rejected = ((image_to_tensor(im, self.resolution, crop_centering(self.crop_seed, row, k)))
                            for k, im in enumerate((pair.chosen, pair.rejected)))
        return row, chosen, rejected, True


class LatentCache:
    """Read side of a filled cache; opened lazily per process (DataLoader workers)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.num_rows: int = self.meta["num_rows"]
        self.shard_size: int = self.meta["shard_size"]
        self._handles: Dict[int, object] = {}
        valid = [self._open(s).get_tensor("valid") for s in range(self.num_shards)]
        self.valid = torch.cat(valid).numpy().astype(bool) if valid else np.zeros(0, bool)
        self._handles = {}

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        return tuple(self.meta["latent_shape"])

    @property
    def has_flips(self) -> bool:
        return bool(self.meta.get("hflip", False))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _open(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(str(self.folder / shard_name(shard)), framework="pt")
        return self._handles[shard]

    def get(self, row: int, flip: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean_w, std_w, mean_l, std_l), each (C, h, w) in the storage dtype (fp16); with
        ``flip``, those of the horizontally flipped images."""
        if flip and not self.has_flips:
            raise ValueError(f"latent cache {self.folder} holds no flipped images")
        shard, offset = divmod(int(row), self.shard_size)
        handle = self._open(shard)
        return tuple(handle.get_slice(name)[offset : offset + 1][0]  # type: ignore[return-value]
                     for name in (_FLIP_NAMES if flip else _NAMES))


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def _complete(folder: Path, num_rows: int, shard_size: int) -> bool:
    shards = -(-num_rows // shard_size)
    return (folder / "meta.json").exists() and all((folder / shard_name(s)).exists() for s in range(shards))


@dataclass(frozen=True)
class LatentSpec:
    """What a cache holds: images at ``resolution`` (shorter side resized, then the centre, or
    with ``crop_seed`` a random crop), with ``hflip`` their mirror images too, stored in
    ``storage_dtype``, ``shard_size`` rows a shard."""

    resolution: int
    hflip: bool = False
    crop_seed: Optional[int] = None
    storage_dtype: torch.dtype = torch.float16
    shard_size: int = 1024


@torch.no_grad()
def build_latent_cache(dataset: PreferenceDataset, vae: Optional[torch.nn.Module], root: Path, spec: LatentSpec, *,
                       vae_identity: str, process: Process = Process(), batch_size: int = 8,
                       num_workers: int = 0) -> LatentCache:
    """Fills (or reuses) the cache folder for ``dataset`` and returns it opened.

    ``vae`` may be None when the cache is known complete. With several processes each encodes
    shards ``rank, rank + world, ...`` and all of them wait for the others.
    """
    folder = Path(root) / cache_key(dataset.fingerprint, spec.resolution, vae_identity, spec.hflip, spec.crop_seed)
    if not _complete(folder, len(dataset), _existing_shard_size(folder, spec.shard_size)):
        if vae is None:
            raise ValueError(f"latent cache {folder} is incomplete and no VAE was given to fill it")
        _fill(folder, dataset, vae, spec, vae_identity, process, batch_size, num_workers)
    process.barrier()  # every rank, whether it had work or not: collectives must pair up
    if not _complete(folder, len(dataset), _existing_shard_size(folder, spec.shard_size)):
        raise RuntimeError(f"latent cache {folder} is incomplete after filling it")
    return LatentCache(folder)


def _fill(folder: Path, dataset: PreferenceDataset, vae, spec: LatentSpec, vae_identity: str, process: Process,
          batch_size: int, num_workers: int) -> None:
    resolution, hflip, crop_seed, storage_dtype = spec.resolution, spec.hflip, spec.crop_seed, spec.storage_dtype
    rank, world, device = process.rank, process.world, process.device
    num_rows = len(dataset)
    shard_size = _existing_shard_size(folder, spec.shard_size)
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latent_hw = resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    meta = {
        "format_version": FORMAT_VERSION, "dataset_fingerprint": dataset.fingerprint,
        "resolution": resolution, "crop_policy": crop_policy(hflip, crop_seed), "hflip": hflip,
        "vae_identity": vae_identity,
        "num_rows": num_rows, "shard_size": shard_size, "scaling_factor": scaling, "shift_factor": shift,
        "latent_shape": [int(vae.config.latent_channels), latent_hw, latent_hw],
        "storage_dtype": str(storage_dtype),
    }
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (folder / "meta.json").exists():
        write_atomic(folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    shards = [s for s in range(-(-num_rows // shard_size)) if s % world == rank and not (folder / shard_name(s)).exists()]
    todo = sum(min(num_rows, (s + 1) * shard_size) - s * shard_size for s in shards)
    vae_dtype = next(vae.parameters()).dtype
    bar = tqdm(total=todo, desc=f"encoding latents (rank {rank})" if world > 1 else "encoding latents",
               unit="img pair", disable=not process.progress or todo == 0, dynamic_ncols=True)
    for shard in shards:
        rows = range(shard * shard_size, min(num_rows, (shard + 1) * shard_size))
        loader = torch.utils.data.DataLoader(_PixelRows(dataset, rows, resolution, crop_seed), batch_size=batch_size,
                                             num_workers=num_workers, shuffle=False)
        parts: Dict[str, list] = {k: [] for k in (*_NAMES, *(_FLIP_NAMES if hflip else ()), "valid")}
        for _, pixels_w, pixels_l, readable in loader:
            n = pixels_w.shape[0]
            keep = readable.view(-1, 1, 1, 1)
            for names, flip in ((_NAMES, False), (_FLIP_NAMES, True))[: 2 if hflip else 1]:
                pixels = torch.cat([pixels_w, pixels_l]).to(device, vae_dtype)
                dist = vae.encode(pixels.flip(-1) if flip else pixels).latent_dist
                mean = ((dist.mean.float() - shift) * scaling).to(storage_dtype).cpu()
                std = (dist.std.float() * scaling).to(storage_dtype).cpu()
                for name, value in zip(names, (mean[:n], std[:n], mean[n:], std[n:])):
                    parts[name].append(value * keep)
            parts["valid"].append(readable.to(torch.uint8))
            bar.update(n)
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        write_atomic(folder / shard_name(shard), lambda tmp: save_file(tensors, str(tmp)))
    bar.close()


def _existing_shard_size(folder: Path, default: int) -> int:
    """A partly filled cache keeps the shard size it was started with."""
    meta = folder / "meta.json"
    if meta.exists():
        return int(json.loads(meta.read_text())["shard_size"])
    return default

