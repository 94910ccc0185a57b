"""Where each model of an eval comes from, checked before anything loads.

A local path must exist. A hub id (``--base``, ``--pickscore-*``) or an open_clip pretrained
tag (``--clip-pretrained``, ``--aesthetic-clip-pretrained``) is downloaded now when the hub
is reachable, read from the local cache when it is there; otherwise (offline) it fails at
once, in one line naming the option and the local-file alternative
(:func:`rpo_fast.hub.require_download`), instead of after the download retries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..clip import check_open_clip_source, looks_like_path, require_open_clip_weights
from ..hub import in_hub_cache, require_download

def check_local_or_hub(what: str, source: str, alternative: str) -> None:
    """``source`` is an existing local path, or a hub id (``org/name``) that can be fetched."""
    source = str(source)
    if Path(source).expanduser().exists():
        return
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"{what}: {source}: no such file or folder (and not a hub id of the form org/name)")
    require_download(what, source, alternative, cached=in_hub_cache(source))


def hub_alternative(repo_id: str) -> str:
    return (f"download it where the hub is reachable (huggingface-cli download {repo_id} --local-dir DIR) "
            "and pass the folder")


def check_open_clip_weights(option: str, model_name: str, pretrained: Optional[str], hint: str = "") -> None:
    """The weights of open_clip ``model_name`` / ``pretrained`` (options ``{option}-model`` and
    ``{option}-pretrained``): a local file, or a tag fetched now (or found in the cache), so
    that an offline machine fails here and not after generating every image. ``hint`` ends
    the error message."""
    alternative = "pass a local checkpoint file instead" + hint
    hub_model = model_name.startswith("hf-hub:")
    require_open_clip_weights(model_name, pretrained, f"{option}-model" if hub_model else f"{option}-pretrained")
    if hub_model:  # open_clip reads config and weights from that hub repo
        return
    is_tag = (pretrained and not os.path.isfile(pretrained) and not looks_like_path(pretrained)
              and not model_name.startswith("local-dir:"))
    check_open_clip_source(model_name, pretrained, f"{option}-model / {option}-pretrained")
    if not is_tag:
        return
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    try:
        if not download_pretrained(get_pretrained_cfg(model_name.replace("/", "-"), pretrained)):
            raise RuntimeError("open_clip knows no download for it")
    except Exception as e:  # the hub client's many network errors: all mean the same here
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{option}-pretrained: cannot get the open_clip weights {pretrained!r} of {model_name} "
                         f"({reason}); {alternative}") from None
