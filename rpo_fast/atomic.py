"""Files and folders written whole or not at all, by every command: a crash, a kill or Ctrl-C
never leaves a half-written one under its final name, and an interrupted writer removes its
temporary (``<name>.<pid>.tmp``: processes writing the same file never share one)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def removed_on_failure(path: Path) -> Iterator[Path]:
    """Yields ``path`` (a temporary file or folder); removes it when the block raises,
    KeyboardInterrupt included."""
    try:
        yield path
    except BaseException:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then a rename: a reader (or a
    resumed fill) sees the whole file or none."""
    with removed_on_failure(path.with_name(f"{path.name}.{os.getpid()}.tmp")) as tmp:
        write(tmp)
        os.replace(tmp, path)


def final_name(name: str) -> str:
    """The name a temporary left by :func:`write_atomic` (a killed writer's) was meant to get."""
    return re.sub(r"\.\d+\.tmp$", "", name)
