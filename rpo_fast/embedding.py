"""CLIP embeddings of preference pairs for the RPO weights, cached by dataset row.

Diffusion-RPO weighs the contrast between preferred pair i and dispreferred pair j by the
cosine similarity of their (prompt, image) embeddings (docs/loss.md). Embedding a
large dataset with a large CLIP takes hours, so it happens once, here, and the trainer
reads the result with :func:`load_embedding_cache` and looks up ``emb_w[idx], emb_l[idx]``.

Cache layout (``path`` is the final ``.safetensors`` file):

* while embedding, completed chunks of rows go to ``<path>.parts/chunk_XXXXXX.safetensors``
  (each written to a temporary name, then renamed: a crash never leaves a half chunk), next
  to a ``manifest.json`` holding the dataset fingerprint and the embedder identity;
* a rerun checks both, skips the chunks already there and embeds the rest;
* when every chunk exists they are merged into ``path`` (tensors ``emb_w``, ``emb_l`` of
  shape ``(N, E)`` and ``valid`` of shape ``(N,)``; metadata: fingerprint, embedder,
  rows, dim, and the data settings when known) and the parts folder is removed.

The data settings (source, split, ties kept or dropped, ``--max-rows``) let a training run
on the first rows of the same data (a smaller ``--max-rows``) use a cache built for more
rows, and a mismatch name its cause instead of "another dataset".

Rows whose images cannot be read (``dataset.get_pair`` returns None) get zero embeddings
and ``valid = False``; the trainer skips such rows anyway.

Any callable ``(prompts, images) -> (B, E) float32 tensor`` is an :data:`Embedder`; give it
an ``identity`` attribute (or pass ``embedder_id``) so that a resumed cache can tell it apart
from another embedder. :func:`rpo_fast.clip.open_clip_embedder` builds one from open_clip
(``rpo_fast/clip.py``: the open_clip adapter that the evaluation scorers share).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from PIL import Image

from .atomic import write_atomic
from .clip import EMBED_MODES, PRECISIONS, open_clip_embedder, register_open_clip_configs, require_open_clip_weights

PathLike = Union[str, os.PathLike]
Embedder = Callable[[List[str], List[Image.Image]], torch.Tensor]

CACHE_FORMAT = "rpo-fast-embeddings-v1"
DEFAULT_CHUNK_ROWS = 4096

def embedder_identity(embedder: Embedder, embedder_id: Optional[str] = None) -> str:
    if embedder_id is not None:
        return str(embedder_id)
    identity = getattr(embedder, "identity", None)
    if identity is not None:
        return str(identity)
    return getattr(embedder, "__qualname__", type(embedder).__qualname__)


# ---------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------


def _parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


def _chunk_file(parts: Path, chunk: int) -> Path:
    return parts / f"chunk_{chunk:06d}.safetensors"


def _chunk_rows(num_rows: int, chunk_rows: int) -> List[range]:
    return [range(start, min(num_rows, start + chunk_rows)) for start in range(0, num_rows, chunk_rows)]


def _atomic_save(tensors: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                             metadata=metadata))


def _read_metadata(path: Path) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _read_manifest(path: Path) -> Optional[Dict]:
    manifest = _parts_dir(path) / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.exists() else None


def _progress(path: Path) -> Optional[Tuple[int, int, int, int]]:
    """(chunks done, chunks, rows done, rows) of the unfinished cache at ``path``; None when
    none was started."""
    manifest = _read_manifest(path)
    if manifest is None:
        return None
    chunks = _chunk_rows(int(manifest["rows"]), int(manifest["chunk_rows"]))
    done = [rows for c, rows in enumerate(chunks) if _chunk_file(_parts_dir(path), c).exists()]
    return len(done), len(chunks), sum(len(rows) for rows in done), int(manifest["rows"])


class CacheConflict(ValueError):
    """``path`` holds a cache for other data or another embedder. ``detail`` says which; the
    message adds the Python API's remedy, and the command line words its own."""

    def __init__(self, detail: str):
        super().__init__(f"{detail}; choose another path or pass overwrite=True")
        self.detail = detail


# How the rows were chosen: load_preference_dataset's arguments, recorded in the cache when known.
DataSettings = Dict[str, object]  # {"source", "split", "drop_ties", "max_rows"}


def _rows_text(max_rows: Optional[int], rows: int) -> str:
    return f"all {rows} rows" if max_rows is None else f"the first {rows} rows (--max-rows {max_rows})"


def _differences(built: DataSettings, built_rows: int, run: DataSettings, run_rows: int) -> List[str]:
    """What differs between the settings a cache was built with and this run's, in words."""
    found = []
    if (built["source"], built["split"]) != (run["source"], run["split"]):
        found.append(f"built from {built['source']} split {built['split']}, this run reads {run['source']} "
                     f"split {run['split']}")
    if built["drop_ties"] != run["drop_ties"]:
        found.append("built with ties dropped, this run keeps them" if built["drop_ties"]
                     else "built with ties kept (--keep-ties), this run drops them")
    if built["max_rows"] != run["max_rows"]:
        found.append(f"built for {_rows_text(built['max_rows'], built_rows)}, this run uses "
                     f"{_rows_text(run['max_rows'], run_rows)}")
    return found or [f"the data at {run['source']} changed since it was built"]


def _stored_settings(stored: Dict) -> Optional[DataSettings]:
    data = stored.get("data")
    return json.loads(data) if isinstance(data, str) else data


def _check_identity(where: str, stored: Dict, fingerprint: str, identity: str, rows: int,
                    settings: Optional[DataSettings]) -> None:
    if stored.get("format") != CACHE_FORMAT:
        raise ValueError(f"{where}: not an rpo-fast embedding cache (format {stored.get('format')!r})")
    problems = []
    built = _stored_settings(stored)
    if stored.get("fingerprint") != fingerprint or int(stored.get("rows", -1)) != rows:
        if built is not None and settings is not None:
            problems += _differences(built, int(stored["rows"]), settings, rows)
        else:
            problems.append(f"dataset fingerprint {stored.get('fingerprint')} ({stored.get('rows')} rows) != "
                            f"{fingerprint} ({rows} rows)")
    if stored.get("embedder") != identity:
        problems.append(f"embedder {stored.get('embedder')!r} != {identity!r}")
    if problems:
        raise CacheConflict(f"{where} was built for other data or another embedder ({'; '.join(problems)})")


class _ReadPairs:
    """DataLoader collate function: row indices -> (indices, pairs); picklable for workers."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __call__(self, indices: List[int]):
        return indices, [self.dataset.get_pair(i) for i in indices]


def _embed_chunk(dataset, embedder: Embedder, rows: range, batch_size: int, num_workers: int, bar):
    """(valid row indices, emb_w, emb_l) of one chunk; unreadable pairs are left out."""
    from torch.utils.data import DataLoader

    loader = DataLoader(list(rows), batch_size=batch_size, num_workers=num_workers, collate_fn=_ReadPairs(dataset))
    valid, emb_w, emb_l = [], [], []
    for idx, pairs in loader:
        kept = [(i, p) for i, p in zip(idx, pairs) if p is not None]
        if kept:
            m = len(kept)
            prompts = [p.prompt for _, p in kept]
            images = [p.chosen for _, p in kept] + [p.rejected for _, p in kept]
            emb = embedder(prompts + prompts, images)
            if not isinstance(emb, torch.Tensor) or emb.dim() != 2 or emb.shape[0] != 2 * m:
                got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                raise ValueError(f"embedder: expected a (B, E) tensor with B = {2 * m}, got {got}")
            emb = emb.detach().float().cpu()
            if not torch.isfinite(emb).all():
                raise ValueError(f"embedder: non-finite embeddings for rows {idx[0]}..{idx[-1]}")
            valid += [i for i, _ in kept]
            emb_w.append(emb[:m])
            emb_l.append(emb[m:])
        bar.update(len(idx))
    if not valid:
        empty = torch.zeros(0, 0)
        return torch.zeros(0, dtype=torch.int64), empty, empty
    return torch.tensor(valid, dtype=torch.int64), torch.cat(emb_w), torch.cat(emb_l)


def build_embedding_cache(
    dataset,
    embedder: Embedder,
    path: PathLike,
    *,
    batch_size: int = 32,
    progress: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    embedder_id: Optional[str] = None,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    data_settings: Optional[DataSettings] = None,
) -> Path:
    """Embeds every row of ``dataset`` into the safetensors file ``path`` (see the module
    docstring), resuming from the chunks a previous interrupted run left. Returns ``path``.

    ``chunk_rows``: rows per saved chunk (the most work an interruption loses); a resumed
    run keeps the chunk size it started with. ``dtype``: float32 or float16 on disk
    (:func:`load_embedding_cache` returns float32 either way). ``num_workers``: DataLoader
    worker processes decoding images. ``data_settings``: the arguments ``dataset`` was opened
    with (``source``, ``split``, ``drop_ties``, ``max_rows`` of ``load_preference_dataset``),
    recorded so that a run using fewer rows can read the cache and a mismatch names its cause.
    """
    from tqdm.auto import tqdm

    for name, value in (("batch_size", batch_size), ("chunk_rows", chunk_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers: expected an int >= 0, got {num_workers!r}")
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype: expected torch.float32 or torch.float16, got {dtype}")
    if not callable(embedder):
        raise TypeError(f"embedder: expected a callable (prompts, images) -> tensor, got {type(embedder).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path: expected a file name ending in .safetensors, got {path}")
    num_rows = len(dataset)
    if num_rows == 0:
        raise ValueError("dataset: has no rows to embed")
    fingerprint, identity = dataset.fingerprint, embedder_identity(embedder, embedder_id)
    parts = _parts_dir(path)

    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        path.unlink(missing_ok=True)
    if path.exists():
        _check_identity(str(path), _read_metadata(path), fingerprint, identity, num_rows, data_settings)
        shutil.rmtree(parts, ignore_errors=True)  # left over if a run stopped right after the merge
        return path  # already complete

    manifest = _read_manifest(path)
    if manifest is not None:
        _check_identity(str(parts), manifest, fingerprint, identity, num_rows, data_settings)
        chunk_rows = int(manifest["chunk_rows"])
        done_chunks, num_chunks, done_rows, _ = _progress(path)
        print(f"embedding: resuming {parts}: {done_chunks} of {num_chunks} chunk(s) done "
              f"({done_rows} of {num_rows} rows)", flush=True)
    else:
        parts.mkdir(parents=True, exist_ok=True)
        manifest = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "embedder": identity,
                    "rows": num_rows, "chunk_rows": chunk_rows, "data": data_settings}
        write_atomic(parts / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))

    chunks = _chunk_rows(num_rows, chunk_rows)
    chunk_files = [_chunk_file(parts, c) for c in range(len(chunks))]
    todo = [c for c in range(len(chunks)) if not chunk_files[c].exists()]
    done_rows = num_rows - sum(len(chunks[c]) for c in todo)
    with tqdm(total=num_rows, initial=done_rows, unit="pair", desc="embedding", disable=not progress) as bar:
        for c in todo:
            valid, emb_w, emb_l = _embed_chunk(dataset, embedder, chunks[c], batch_size, num_workers, bar)
            _atomic_save({"rows": valid, "emb_w": emb_w.to(dtype), "emb_l": emb_l.to(dtype)}, chunk_files[c],
                         {"format": CACHE_FORMAT, "first_row": str(chunks[c].start), "end_row": str(chunks[c].stop)})

    metadata = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "embedder": identity, "rows": str(num_rows)}
    if data_settings is not None:
        metadata["data"] = json.dumps(data_settings)
    _merge_chunks(chunk_files, path, num_rows, dtype, metadata)
    shutil.rmtree(parts)
    return path


def _merge_chunks(chunk_files: List[Path], path: Path, num_rows: int, dtype: torch.dtype,
                  metadata: Dict[str, str]) -> None:
    from safetensors.torch import load_file

    chunks = [load_file(str(f)) for f in chunk_files]
    dims = {c["emb_w"].shape[1] for c in chunks if c["rows"].numel()}
    if not dims:
        raise ValueError("dataset: no row has two readable images; nothing to embed")
    if len(dims) > 1:
        raise CacheConflict(f"{_parts_dir(path)}: its chunks have different embedding sizes {sorted(dims)}")
    dim = dims.pop()
    emb_w = torch.zeros(num_rows, dim, dtype=dtype)
    emb_l = torch.zeros(num_rows, dim, dtype=dtype)
    valid = torch.zeros(num_rows, dtype=torch.bool)
    for chunk in chunks:
        rows = chunk["rows"]
        if rows.numel():
            emb_w[rows], emb_l[rows], valid[rows] = chunk["emb_w"].to(dtype), chunk["emb_l"].to(dtype), True
    metadata = {**metadata, "dim": str(dim), "valid_rows": str(int(valid.sum()))}
    _atomic_save({"emb_w": emb_w, "emb_l": emb_l, "valid": valid}, path, metadata)


def embedding_cache_info(path: PathLike) -> Dict[str, object]:
    """The metadata of a finished cache plus its ``valid`` row mask (a bool tensor)."""
    from safetensors import safe_open

    path = Path(path)
    _require_complete(path)
    with safe_open(str(path), framework="pt") as f:
        info: Dict[str, object] = dict(f.metadata() or {})
        info["valid"] = f.get_tensor("valid")
    return info


def _require_complete(path: Path) -> None:
    if path.exists():
        return
    progress = _progress(path)
    if progress is not None:
        raise ValueError(
            f"embedding cache {path} is incomplete ({progress[2]} of {progress[3]} rows embedded); "
            "rerun `rpo-fast embed` with the same arguments to finish it"
        )
    raise FileNotFoundError(f"embedding cache: no file at {path}")


def _reopened(settings: DataSettings, **changes):
    """The cache's data as ``load_preference_dataset`` reads it now (with ``changes`` to its
    settings); None when its source is not a local path any more or cannot be read."""
    from .data import load_preference_dataset

    if not Path(str(settings["source"])).exists():
        return None  # a hub name: never looked up here (it may need the network)
    settings = {**settings, **changes}
    try:
        return load_preference_dataset(settings["source"], split=settings["split"], drop_ties=settings["drop_ties"],
                                       max_rows=settings["max_rows"])
    except (ValueError, OSError):
        return None


def _rows_for(path: Path, metadata: Dict[str, str], dataset) -> int:
    """How many of the cache's rows are ``dataset``'s: all of them when the fingerprints
    match, the first ``len(dataset)`` when ``dataset`` is the cache's data cut short by
    ``--max-rows`` (checked by reading the cache's data source again). Else raises, naming
    what differs (ties kept or dropped, --max-rows) when the source tells."""
    rows = int(metadata.get("rows", -1))
    if metadata.get("fingerprint") == dataset.fingerprint and rows == len(dataset):
        return rows
    built = _stored_settings(metadata)
    run = None
    if built is not None:  # which settings give this run's rows from the cache's source?
        candidates = [dict(drop_ties=ties, max_rows=max_rows) for ties in (built["drop_ties"], not built["drop_ties"])
                      for max_rows in (len(dataset), None)]
        run = next((c for c in candidates if getattr(_reopened(built, **c), "fingerprint", None) == dataset.fingerprint),
                   None)
    if run is not None:
        run = {**built, **run}
        if run["drop_ties"] != built["drop_ties"] or len(dataset) > rows:
            problems = _differences(built, rows, run, len(dataset))
        elif getattr(_reopened(built), "fingerprint", None) == metadata.get("fingerprint"):
            return len(dataset)  # the first rows of the cache's data, unchanged since
        else:
            problems = [f"the data at {built['source']} changed since it was built"]
        raise ValueError(f"{path}: {'; '.join(problems)}; rerun `rpo-fast embed` with this run's data settings")
    raise ValueError(
        f"{path} was built for another dataset (fingerprint {metadata.get('fingerprint')}, {rows} rows; this "
        f"dataset's is {dataset.fingerprint}, {len(dataset)} rows); rerun `rpo-fast embed` for this data"
    )


def load_embedding_cache(path: PathLike, dataset=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(emb_w, emb_l)``, each ``(N, E)`` float32, row i for dataset row i.

    With ``dataset``, checks that the cache was built for it (fingerprint and row count); a
    cache built for more rows of the same data (``dataset`` opened with a smaller
    ``max_rows``) gives its first ``len(dataset)`` rows. Raises for an unfinished or foreign
    file, naming the cause (another dataset, --max-rows, ties kept or dropped) when known.
    """
    from safetensors import safe_open

    path = Path(path)
    _require_complete(path)
    metadata = _read_metadata(path)
    if metadata.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not an rpo-fast embedding cache (format {metadata.get('format')!r})")
    rows = int(metadata["rows"])
    used = rows if dataset is None else _rows_for(path, metadata, dataset)
    with safe_open(str(path), framework="pt") as f:
        shapes = [f.get_slice(name).get_shape() for name in ("emb_w", "emb_l")]
        if shapes[0] != shapes[1] or len(shapes[0]) != 2 or shapes[0][0] != rows:
            raise ValueError(f"{path}: corrupt cache: emb_w {tuple(shapes[0])}, emb_l {tuple(shapes[1])}, rows {rows}")
        return f.get_slice("emb_w")[:used].float(), f.get_slice("emb_l")[:used].float()


# ---------------------------------------------------------------------------------------
# `rpo-fast embed`
# ---------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="preference data: Pick-a-Pic parquet folder, pairs.jsonl folder or dataset name")
    parser.add_argument("--split", default="train", help="dataset split")
    parser.add_argument("--max-rows", type=int, default=None, help="embed only the first rows (must match training)")
    parser.add_argument("--keep-ties", action="store_true", help="keep tied pairs (must match training)")
    parser.add_argument("--output", required=True, help="cache file to write (.safetensors)")
    parser.add_argument("--model", default="ViT-H-14", help="open_clip architecture name")
    parser.add_argument("--pretrained", default="laion2b_s32b_b79k", help="open_clip pretrained tag or local checkpoint file")
    parser.add_argument("--open-clip-config", action="append", default=[], metavar="JSON",
                        help="register an extra open_clip architecture (name = file stem); repeatable")
    parser.add_argument("--mode", choices=EMBED_MODES, default="joint",
                        help="embed the prompt, the image, or both (normalized mean)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per embedder call")
    parser.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows per saved chunk (resume granularity)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="model precision")
    parser.add_argument("--storage-dtype", choices=("float32", "float16"), default="float32", help="dtype on disk")
    parser.add_argument("--overwrite", action="store_true", help="discard an existing cache at --output")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="load a .pt checkpoint that holds pickled objects (only from a trusted source)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from .data import load_preference_dataset

    try:
        register_open_clip_configs(args.open_clip_config)
        # before the data is read: offline, weights to download fail now, in one line
        require_open_clip_weights(args.model, args.pretrained,
                                  "--model" if args.model.startswith("hf-hub:") else "--pretrained")
        source = Path(args.data).expanduser()
        settings = {"source": str(source.resolve()) if source.exists() else args.data, "split": args.split,
                    "drop_ties": not args.keep_ties, "max_rows": args.max_rows}
        dataset = load_preference_dataset(args.data, split=args.split, drop_ties=settings["drop_ties"],
                                          max_rows=args.max_rows)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        embedder = open_clip_embedder(args.model, args.pretrained, args.mode, device=device, precision=args.precision,
                                      allow_pickle=args.allow_pickle)
        path = build_embedding_cache(
            dataset, embedder, args.output, batch_size=args.batch_size, progress=not args.no_progress,
            chunk_rows=args.chunk_rows, num_workers=args.num_workers, overwrite=args.overwrite,
            dtype=torch.float16 if args.storage_dtype == "float16" else torch.float32, data_settings=settings,
        )
    except KeyboardInterrupt:
        return _interrupted(args)
    except CacheConflict as e:
        print(f"rpo-fast embed: error: {e.detail}; choose another --output or pass --overwrite", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"rpo-fast embed: error: {e}", file=sys.stderr)
        return 2
    info = embedding_cache_info(path)
    print(f"wrote {path}: {info['rows']} rows ({info['valid_rows']} with readable images), dim {info['dim']}, "
          f"embedder {info['embedder']}")
    return 0


def _interrupted(args: argparse.Namespace) -> int:
    """The line Ctrl-C ends `rpo-fast embed` with: the rows embedded, the chunks kept, and the
    command that continues (the same one, without --overwrite: the chunks are resumed)."""
    from .cli import interrupted, rerun_command

    path = Path(args.output)
    if path.exists():
        return interrupted("embed", "after writing the cache", f"{path} is complete", None)
    progress = _progress(path)
    if progress is None:
        return interrupted("embed", "before embedding any row", "nothing was written", None)
    done_chunks, num_chunks, done_rows, num_rows = progress
    return interrupted("embed", f"after embedding {done_rows} of {num_rows} rows",
                       f"{done_chunks} of {num_chunks} chunk(s) kept in {_parts_dir(path)}/",
                       rerun_command(args, drop_switches=["--overwrite"]))
