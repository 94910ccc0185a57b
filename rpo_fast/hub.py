"""Names that would be downloaded from the Hugging Face hub, checked before anything loads.

Offline (``HF_HUB_OFFLINE=1``, or the hub's host not answering a connection within
:data:`PROBE_TIMEOUT_S`), a name that is neither a local path nor already in the local hub
cache fails at once, in one line naming the option and the local-file alternative, instead
of after the download libraries' retries (about 50 s, then a traceback). A name that is in
the cache switches the process to offline mode, so that the libraries read it without
trying the network first.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
_TRUE = ("1", "on", "yes", "true")
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@functools.lru_cache(maxsize=None)
def _unreachable(host: str, port: int) -> Optional[str]:
    """Why ``host:port`` takes no connection (None when it does). The connection attempt runs
    in a thread, so that a resolver that hangs cannot hold the caller past the timeout."""
    outcome = {}

    def connect():
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
            outcome["ok"] = True
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    if outcome.get("ok"):
        return None
    error = outcome.get("error")
    why = (error.strerror or str(error)) if error is not None else f"no answer in {PROBE_TIMEOUT_S:g} s"
    return f"the hub ({host}) cannot be reached: {why}"


def offline_reason() -> Optional[str]:
    """Why nothing can be downloaded from the hub now, or None when it can."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return f"{name} is set"
    if any(os.environ.get(name) for name in _PROXIES):
        return None  # a proxy decides what is reachable; the libraries report its answer
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return _unreachable(endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443))


def in_hub_cache(repo_id: str, repo_type: str = "model", cache_dir: Optional[str] = None) -> bool:
    """Whether the local hub cache holds a snapshot of ``repo_id`` (a download made earlier)."""
    from huggingface_hub import constants

    folder = f"{repo_type}s--" + repo_id.replace("/", "--")
    snapshots = Path(cache_dir or constants.HF_HUB_CACHE).expanduser() / folder / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def go_offline() -> None:
    """From now on the hub libraries read their cache without trying the network."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported already: it read the environment at import
        constants.HF_HUB_OFFLINE = True


def require_download(what: str, name: str, alternative: str, cached: bool) -> None:
    """Call for a ``name`` that is not a local path and would be fetched from the hub: returns
    when it can be (online, or ``cached`` locally: then the process goes offline), else
    raises ValueError naming the option ``what`` and the ``alternative`` (a local file or
    folder the user can pass instead)."""
    reason = offline_reason()
    if reason is None:
        return
    if cached:
        go_offline()
        return
    raise ValueError(f"{what}: {name!r} is not a local path and is not in the hub cache, and {reason}; {alternative}")
