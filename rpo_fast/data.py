"""Preference data: (prompt, preferred image, dispreferred image) rows in a stable order.

Three sources, one interface (:class:`PreferenceDataset`):

* a folder (or one file) of ``*.parquet`` in the Pick-a-Pic v2 schema: ``caption``,
  ``jpg_0``, ``jpg_1`` (encoded image bytes) and ``label_0`` (1: ``jpg_0`` preferred,
  0: ``jpg_1`` preferred, 0.5: a tie, dropped by default). Only the caption and label
  columns are read up front; images are read one parquet row group at a time when asked
  for, so a 300 GB dataset opens in seconds and takes little memory;
* a folder with a ``pairs.jsonl`` of ``{"prompt", "chosen", "rejected"}`` (image paths
  relative to the folder);
* a dataset name (or a ``save_to_disk`` folder) for the ``datasets`` library, with either
  the Pick-a-Pic columns or ``prompt``/``chosen``/``rejected`` image columns.

The row index is the key of every cache (latents, embeddings): rows keep their order and
:attr:`PreferenceDataset.fingerprint` identifies (source, split, filtering) so that a cache
built for other data is refused instead of silently misread.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from PIL import Image

from .atomic import write_atomic

PathLike = Union[str, os.PathLike]

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
PAIRS_FILE = "pairs.jsonl"
_KNOWN_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")


@dataclass
class PreferencePair:
    prompt: str
    chosen: Image.Image  # RGB
    rejected: Image.Image  # RGB


def decode_image(value: Any) -> Optional[Image.Image]:
    """Encoded bytes, a ``datasets`` image dict, a path or a PIL image -> RGB image, or
    None when it cannot be read (corrupt bytes, missing file, no data)."""
    try:
        if value is None:
            return None
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):  # datasets' Image feature without decoding
            data = value.get("bytes")
            return decode_image(data if data is not None else value.get("path"))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            return None
        image.load()  # decode now: a truncated file must fail here, not in a worker later
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _preference_from_label(label: Any, drop_ties: bool) -> Optional[bool]:
    """Pick-a-Pic ``label_0`` -> True (image 0 preferred), False (image 1), None (drop)."""
    if label is None:
        return None
    label = float(label)
    if label != label:  # NaN: unlabeled
        return None
    if label == 0.5:
        return None if drop_ties else True
    return label > 0.5


def _head_tail_digest(path: PathLike, span: int = 1 << 16) -> str:
    """sha256 of a file's first and last ``span`` bytes: cheap, even for a 500 MB parquet file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(span))
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - span))
        h.update(f.read(span))
    return h.hexdigest()


def content_hash(*parts: Any) -> str:
    """A short sha256 of JSON-serializable parts: the key of a cache entry."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def looks_local(source: str) -> bool:
    """Whether a name that is not on disk was meant as a local path rather than a hub id
    (``owner/name``): it starts with ``/``, ``.`` or ``~``, has no ``/`` or more than one, or
    ends with a file suffix. Such a name is never looked up on the hub."""
    source = str(source)
    return (source.startswith(("/", ".", "~")) or source.count("/") != 1
            or Path(source).suffix in (".parquet", ".jsonl", ".json", ".safetensors", ".arrow"))


class PreferenceDataset:
    """Rows of preference pairs in a stable order. Subclasses provide :meth:`_raw_images`
    and :meth:`location`."""

    dropped_ties = 0  # rows labelled as ties and left out

    def __init__(self, prompts: List[str], fingerprint_parts: Tuple[Any, ...], description: str):
        self._prompts = prompts
        self._fingerprint = content_hash(*fingerprint_parts, len(prompts))
        self.description = description

    def __len__(self) -> int:
        return len(self._prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description}, rows={len(self)}, fingerprint={self.fingerprint})"

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def prompt(self, index: int) -> str:
        return self._prompts[self._check_index(index)]

    def get_pair(self, index: int) -> Optional[PreferencePair]:
        """The pair at ``index``; None when either image cannot be read."""
        index = self._check_index(index)
        chosen_raw, rejected_raw = self._raw_images(index)
        chosen = decode_image(chosen_raw)
        rejected = decode_image(rejected_raw) if chosen is not None else None
        if chosen is None or rejected is None:
            return None
        return PreferencePair(self._prompts[index], chosen, rejected)

    def location(self, index: int) -> str:
        """Where row ``index`` comes from, for messages: a file and row (or line)."""
        return f"row {index}"

    def unreadable_reason(self, index: int) -> Optional[str]:
        """Why :meth:`get_pair` returns None for ``index`` (None when it does not)."""
        bad = [name for name, raw in zip(("chosen", "rejected"), self._raw_images(self._check_index(index)))
               if decode_image(raw) is None]
        return f"{' and '.join(bad)} image cannot be read" if bad else None

    def _check_index(self, index: int) -> int:
        if not isinstance(index, int) and not hasattr(index, "__index__"):
            raise TypeError(f"index: expected an int, got {type(index).__name__}")
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} rows")
        return index

    def _raw_images(self, index: int) -> Tuple[Any, Any]:  # (chosen, rejected), undecoded
        raise NotImplementedError

    def _kept_rows(self, captions: Sequence[Any], labels: Sequence[Any], drop_ties: bool,
                   room: Optional[int]) -> Iterator[Tuple[int, str, bool]]:
        """(row, prompt, image 0 preferred) for each row its label keeps, at most ``room``
        of them (None: all); counts the ties left out in ``dropped_ties``."""
        kept = 0
        for row, (caption, label) in enumerate(zip(captions, labels)):
            first_preferred = _preference_from_label(label, drop_ties)
            if first_preferred is None:
                self.dropped_ties += label is not None and float(label) == 0.5
                continue
            yield row, "" if caption is None else str(caption), first_preferred
            kept += 1
            if room is not None and kept >= room:
                return


def _missing_columns_error(where: str, have: Sequence[str]) -> ValueError:
    return ValueError(
        f"{where}: expected the Pick-a-Pic columns {list(PICKAPIC_COLUMNS)} or the pair columns "
        f"{list(PAIR_COLUMNS)}, found {sorted(have)}"
    )


class ParquetPreferenceDataset(PreferenceDataset):
    """Pick-a-Pic v2 parquet files; images are read lazily, one row group at a time."""

    _CACHED_ROW_GROUPS = 2

    def __init__(self, files: List[Path], split: str, drop_ties: bool, max_rows: Optional[int]):
        import pyarrow.parquet as pq

        prompts: List[str] = []
        self._files = [str(f) for f in files]
        self._locations: List[Tuple[int, int, int, bool]] = []  # (file, row group, row, image 0 preferred)
        for file_index, path in enumerate(files):
            parquet = pq.ParquetFile(path)
            names = parquet.schema_arrow.names
            missing = [c for c in PICKAPIC_COLUMNS if c not in names]
            if missing:
                raise ValueError(
                    f"{path}: missing column(s) {missing}; the Pick-a-Pic v2 schema needs "
                    f"{list(PICKAPIC_COLUMNS)} (found {names})"
                )
            for group in range(parquet.num_row_groups):
                table = parquet.read_row_group(group, columns=["caption", "label_0"])
                captions = table.column("caption").to_pylist()
                labels = table.column("label_0").to_pylist()
                room = None if max_rows is None else max_rows - len(prompts)
                for row, prompt, first_preferred in self._kept_rows(captions, labels, drop_ties, room):
                    prompts.append(prompt)
                    self._locations.append((file_index, group, row, first_preferred))
                if max_rows is not None and len(prompts) >= max_rows:
                    break
            if max_rows is not None and len(prompts) >= max_rows:
                break
        # Content-based, so a copied folder keeps its caches and regenerated data does not:
        # each file's name, size and first/last bytes, plus every kept caption and label.
        files_id = [(Path(f).name, os.path.getsize(f), _head_tail_digest(f)) for f in files]
        rows_id = hashlib.sha256(json.dumps([prompts, [loc[3] for loc in self._locations]]).encode()).hexdigest()
        super().__init__(prompts, ("parquet", files_id, rows_id, split, drop_ties, max_rows),
                         f"parquet: {len(files)} file(s)")
        self._open: dict = {}
        self._groups: "OrderedDict[Tuple[int, int], Any]" = OrderedDict()

    def __getstate__(self):  # picklable for DataLoader workers: open files are per process
        state = self.__dict__.copy()
        state["_open"], state["_groups"] = {}, OrderedDict()
        return state

    def _row_group(self, file_index: int, group: int):
        key = (file_index, group)
        if key in self._groups:
            self._groups.move_to_end(key)
            return self._groups[key]
        import pyarrow.parquet as pq

        if file_index not in self._open:
            self._open[file_index] = pq.ParquetFile(self._files[file_index])
        table = self._open[file_index].read_row_group(group, columns=["jpg_0", "jpg_1"])
        self._groups[key] = (table.column("jpg_0"), table.column("jpg_1"))
        while len(self._groups) > self._CACHED_ROW_GROUPS:
            self._groups.popitem(last=False)
        return self._groups[key]

    def location(self, index: int) -> str:
        file_index, group, row, _ = self._locations[index]
        parquet = self._open.get(file_index)
        if parquet is None:
            import pyarrow.parquet as pq

            parquet = self._open[file_index] = pq.ParquetFile(self._files[file_index])
        offset = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
        return f"{Path(self._files[file_index]).name} row {offset + row}"

    def _raw_images(self, index: int):
        file_index, group, row, first_preferred = self._locations[index]
        jpg_0, jpg_1 = self._row_group(file_index, group)
        image_0, image_1 = jpg_0[row].as_py(), jpg_1[row].as_py()
        return (image_0, image_1) if first_preferred else (image_1, image_0)


class JsonlPreferenceDataset(PreferenceDataset):
    """A folder with ``pairs.jsonl``: one ``{"prompt", "chosen", "rejected"}`` object a line."""

    def __init__(self, jsonl: Path, split: str, max_rows: Optional[int]):
        self._root, self._file = jsonl.parent, jsonl
        prompts: List[str] = []
        self._lines: List[int] = []
        self._paths: List[Tuple[str, str]] = []
        raw = jsonl.read_bytes()
        for line_number, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{jsonl}:{line_number}: not valid JSON ({e})") from None
            missing = [k for k in PAIR_COLUMNS if not isinstance(record, dict) or k not in record]
            if missing:
                raise ValueError(f"{jsonl}:{line_number}: missing key(s) {missing}; each line needs {list(PAIR_COLUMNS)}")
            prompts.append(str(record["prompt"]))
            self._lines.append(line_number)
            self._paths.append((str(record["chosen"]), str(record["rejected"])))
            if max_rows is not None and len(prompts) >= max_rows:
                break
        digest = hashlib.sha256(raw).hexdigest()
        # Images are separate files: their sizes and modification times join the fingerprint,
        # so replacing an image invalidates caches (copying the folder does too: safe side).
        stats = []
        for chosen, rejected in self._paths:
            for name in (chosen, rejected):
                try:
                    st = os.stat(self._root / name)
                    stats.append((st.st_size, st.st_mtime_ns))
                except OSError:
                    stats.append(None)  # missing: the pair is skipped when read
        stats_id = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
        super().__init__(prompts, ("jsonl", digest, stats_id, split, max_rows), f"jsonl: {jsonl}")

    def location(self, index: int) -> str:
        return f"{self._file.name} line {self._lines[index]} ({', '.join(self._paths[index])})"

    def _raw_images(self, index: int):
        chosen, rejected = self._paths[index]
        return self._root / chosen, self._root / rejected


class HFPreferenceDataset(PreferenceDataset):
    """A ``datasets`` dataset (hub name or ``save_to_disk`` folder), Pick-a-Pic or pair columns."""

    def __init__(self, dataset, name: str, split: str, drop_ties: bool, max_rows: Optional[int]):
        names = list(dataset.column_names)
        if all(c in names for c in PICKAPIC_COLUMNS):
            self._columns = ("jpg_0", "jpg_1")
            table = dataset.select_columns(["caption", "label_0"]).with_format("arrow")[:]
            captions, labels = table.column("caption").to_pylist(), table.column("label_0").to_pylist()
        elif all(c in names for c in PAIR_COLUMNS):
            self._columns = ("chosen", "rejected")
            captions = dataset.select_columns(["prompt"]).with_format("arrow")[:].column("prompt").to_pylist()
            labels = [1.0] * len(captions)
        else:
            raise _missing_columns_error(f"dataset {name!r} split {split!r}", names)
        kept = list(self._kept_rows(captions, labels, drop_ties, max_rows))
        prompts = [prompt for _, prompt, _ in kept]
        self._rows: List[Tuple[int, bool]] = [(row, first_preferred) for row, _, first_preferred in kept]
        # Undecoded images: decoding happens in get_pair, where a bad image becomes None.
        from datasets import Image as ImageFeature

        for column in self._columns:
            if isinstance(dataset.features[column], ImageFeature):
                dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self._dataset = dataset.select_columns(list(self._columns))
        self._name = name
        fingerprint = getattr(dataset, "_fingerprint", None)
        super().__init__(prompts, ("datasets", name, fingerprint, split, drop_ties, max_rows), f"datasets: {name}")

    def location(self, index: int) -> str:
        return f"{self._name} row {self._rows[index][0]}"

    def _raw_images(self, index: int):
        row, first_preferred = self._rows[index]
        record = self._dataset[row]
        image_0, image_1 = record[self._columns[0]], record[self._columns[1]]
        return (image_0, image_1) if first_preferred else (image_1, image_0)


class SampledPreferenceDataset(PreferenceDataset):
    """``count`` rows of ``parent`` drawn at random with ``seed`` (in their original order), as
    ``--max_train_samples`` of the diffusers examples (``shuffle(seed).select(range(count))``)."""

    def __init__(self, parent: PreferenceDataset, count: int, seed: int):
        import numpy as np

        order = np.random.Generator(np.random.PCG64([seed, 0x5341])).permutation(len(parent))
        self.parent, self.rows = parent, sorted(int(r) for r in order[:count])
        self.dropped_ties = parent.dropped_ties
        super().__init__([parent.prompt(r) for r in self.rows], ("sample", parent.fingerprint, count, seed),
                         f"{parent.description}, {len(self.rows)} rows drawn with seed {seed}")

    def location(self, index: int) -> str:
        return self.parent.location(self.rows[self._check_index(index)])

    def _raw_images(self, index: int):
        return self.parent._raw_images(self.rows[index])


def _parquet_files(source: Path, split: str) -> List[Path]:
    if source.is_file():
        return [source]
    files = sorted(source.rglob("*.parquet"))
    if not files:
        return []

    def split_of(path: Path) -> Optional[str]:
        for s in sorted(_KNOWN_SPLITS, key=len, reverse=True):
            if path.name.startswith(s + "-") or path.parent.name == s:
                return s
        return None

    named = [f for f in files if split_of(f) is not None]
    if not named:  # no split in the file names: the whole folder is the requested split
        return files
    chosen = [f for f in files if split_of(f) == split]
    if not chosen:
        raise ValueError(f"{source}: no parquet files for split {split!r} (found splits "
                         f"{sorted({split_of(f) for f in named})})")
    return chosen


def load_preference_dataset(
    source: PathLike,
    *,
    split: str = "train",
    drop_ties: bool = True,
    max_rows: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
) -> PreferenceDataset:
    """Open a preference dataset; see the module docstring for the accepted sources.

    ``max_rows`` keeps the first rows (after dropping ties). A missing column, or a name
    that is neither on disk nor a hub id (:func:`looks_local`), raises a ``ValueError`` here,
    before any training starts. ``cache_dir``: the ``datasets`` download cache.
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise TypeError(f"source: expected a folder, file or dataset name, got {source!r}")
    if max_rows is not None and (not isinstance(max_rows, int) or max_rows < 1):
        raise ValueError(f"max_rows: expected a positive int or None, got {max_rows!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"split: expected a split name such as 'train', got {split!r}")
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file() and path.suffix == ".jsonl":
            return JsonlPreferenceDataset(path, split, max_rows)
        if path.is_dir() and (path / PAIRS_FILE).exists():
            return JsonlPreferenceDataset(path / PAIRS_FILE, split, max_rows)
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path}: no split {split!r} (has {list(loaded)})")
                loaded = loaded[split]
            return HFPreferenceDataset(loaded, str(path), split, drop_ties, max_rows)
        files = _parquet_files(path, split)
        if files:
            return ParquetPreferenceDataset(files, split, drop_ties, max_rows)
        raise ValueError(
            f"source {str(source)!r}: expected parquet files (Pick-a-Pic v2 schema), a {PAIRS_FILE}, "
            "or a datasets save_to_disk folder; found none of these"
        )
    if looks_local(str(source)):
        raise ValueError(f"data: no file or folder at {path} (expected Pick-a-Pic parquet files, a folder with "
                         f"{PAIRS_FILE}, or a hub dataset id such as owner/name)")
    import datasets

    from .hub import in_hub_cache, require_download

    processed = Path(cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser() / str(source).replace("/", "___")
    require_download("data", str(source), "pass a local folder of Pick-a-Pic parquet files, a folder with "
                     f"{PAIRS_FILE}, or a datasets save_to_disk folder",
                     cached=in_hub_cache(str(source), "dataset") or processed.is_dir())
    loaded = datasets.load_dataset(str(source), split=split, cache_dir=None if cache_dir is None else str(cache_dir))
    return HFPreferenceDataset(loaded, str(source), split, drop_ties, max_rows)


def _encode_image(image: Union[Image.Image, bytes], image_format: str) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)  # already encoded (or deliberately corrupt, in tests)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image or encoded bytes, got {type(image).__name__}")
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format)
    return buffer.getvalue()


def write_pickapic_parquet(
    path: PathLike,
    rows: Iterable[Tuple[str, Union[Image.Image, bytes], Union[Image.Image, bytes], float]],
    *,
    image_format: str = "PNG",
    row_group_size: int = 256,
) -> Path:
    """Write ``(caption, image_0, image_1, label_0)`` rows as a Pick-a-Pic v2 parquet file.

    ``path``: a ``.parquet`` file, or a folder (created) that receives ``train.parquet``.
    Images are PIL images (encoded as ``image_format``) or already-encoded bytes.
    Returns the file written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix != ".parquet":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "train.parquet"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    captions, images_0, images_1, labels = [], [], [], []
    for i, row in enumerate(rows):
        if len(row) != 4:
            raise ValueError(f"rows[{i}]: expected (caption, image_0, image_1, label_0), got {len(row)} items")
        caption, image_0, image_1, label = row
        captions.append(str(caption))
        images_0.append(_encode_image(image_0, image_format))
        images_1.append(_encode_image(image_1, image_format))
        labels.append(float(label))
    table = pa.table({
        "caption": pa.array(captions, pa.string()),
        "jpg_0": pa.array(images_0, pa.binary()),
        "jpg_1": pa.array(images_1, pa.binary()),
        "label_0": pa.array(labels, pa.float64()),
        "label_1": pa.array([1.0 - x for x in labels], pa.float64()),
    })
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size))
    return path
