"""What ``rpo-fast eval`` writes in its output folder, and how a rerun finds it again.

Every file is written under a temporary name and renamed, so an interrupted eval leaves
only finished files. ``eval_manifest.json`` records what the images depend on (prompts,
generation settings, models and their files); a later eval with the same manifest reuses
the images already saved (generation is deterministic per seed), one with another manifest
is refused unless it may delete the earlier eval's files (``--overwrite-output-dir``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List, Optional

from PIL import Image

from ..atomic import final_name, write_atomic

MODELS = ("base", "tuned")
MANIFEST = "eval_manifest.json"
REPORT_FILES = ("metrics.json", "report.md", "grid.png")
_IMAGE_NAME = re.compile(r"\d{4}_\d+\.png")


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def image_file(output_dir: Path, model: str, i: int, k: int) -> Path:
    return output_dir / "images" / model / f"{i:04d}_{k}.png"


def save_image(output_dir: Path, model: str, i: int, k: int, image: Image.Image) -> None:
    path = image_file(output_dir, model, i, k)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def load_images(output_dir: Path, model: str, num_prompts: int, per_prompt: int) -> List[List[Optional[Image.Image]]]:
    """``images[i][k]``: the saved image, or None where there is none (PNG is lossless: a saved
    image is the generated one)."""
    images: List[List[Optional[Image.Image]]] = []
    for i in range(num_prompts):
        row = []
        for k in range(per_prompt):
            try:
                with Image.open(image_file(output_dir, model, i, k)) as image:
                    row.append(image.convert("RGB"))
            except OSError:  # missing (or unreadable): generated again
                row.append(None)
        images.append(row)
    return images


def _image_files(output_dir: Path) -> List[Path]:
    found = []
    for model in MODELS:
        folder = output_dir / "images" / model
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir()) if _IMAGE_NAME.fullmatch(final_name(p.name))]
    return found


def eval_files(output_dir: Path) -> List[Path]:
    """The files an eval wrote in ``output_dir`` (leftover temporary files included)."""
    names = {MANIFEST, *REPORT_FILES}
    top = [p for p in sorted(output_dir.glob("*")) if p.is_file() and final_name(p.name) in names]
    return top + _image_files(output_dir)


def count_images(output_dir: Path) -> int:
    """Finished images in ``output_dir``."""
    return sum(1 for p in _image_files(output_dir) if p.suffix == ".png")


def _read_manifest(output_dir: Path) -> Optional[dict]:
    try:
        return json.loads((output_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def check_output_dir(output_dir: Path, manifest: Dict[str, object], overwrite: bool) -> None:
    """A folder holding an eval with other settings is refused unless ``overwrite``."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir: {output_dir} is a file, not a folder")
    found = eval_files(output_dir) if output_dir.is_dir() else []
    earlier = _read_manifest(output_dir)
    if not found or overwrite or earlier == manifest:
        return
    if earlier is None:
        what = f"{len(found)} files of an earlier eval whose settings are not recorded"
    else:
        changed = sorted(k for k in manifest.keys() | earlier.keys() if manifest.get(k) != earlier.get(k))
        what = f"an earlier eval with other settings (differing: {', '.join(changed)})"
    raise ValueError(f"--output-dir: {output_dir} holds {what}; pass --overwrite-output-dir to delete its files "
                     "and start over, or choose another --output-dir")


def open_output_dir(output_dir: Path, manifest: Dict[str, object]) -> List[Path]:
    """Deletes what an earlier eval with another manifest wrote (nothing else; one with the
    same manifest is continued) and records ``manifest``; returns the files deleted. Call
    after :func:`check_output_dir`."""
    deleted = []
    if output_dir.is_dir() and _read_manifest(output_dir) != manifest:
        deleted = eval_files(output_dir)
        for path in deleted:
            path.unlink()
        for folder in [output_dir / "images" / m for m in MODELS] + [output_dir / "images"]:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text(output_dir / MANIFEST, json.dumps(manifest, indent=2))
    return deleted
