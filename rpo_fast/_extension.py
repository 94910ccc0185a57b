"""Loads the compiled extension ``rpo_fast._C`` once; without it the package still works.

Importing ``rpo_fast._C`` registers the C++ ops ``torch.ops.rpo_fast.*`` (CPU, and CUDA
when built with it). If it is missing or broken, ``import rpo_fast`` goes on with the pure
PyTorch backend and warns once, saying why.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional

import torch

_loaded: Optional[bool] = None
_reason: str = ""
_kernel_keys: Dict[str, bool] = {}  # dispatch key -> whether the extension has kernels for it


def load() -> bool:
    """Imports the extension on first call; returns whether its ops are usable."""
    global _loaded, _reason
    if _loaded is None:
        try:
            importlib.import_module("rpo_fast._C")  # registers the ops
            from .fake_kernels import register_cxx_ops

            # Fake kernels and autograd now, at import: registering them on the first loss
            # call would break a torch.compile(fullgraph=True) that makes that call.
            register_cxx_ops()
            for key in ("CPU", "CUDA"):
                _kernel_keys[key] = torch._C._dispatch_has_kernel_for_dispatch_key("rpo_fast::sample_errors", key)
            _loaded = True
        except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
            _loaded = False
            _reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "rpo_fast: the compiled extension rpo_fast._C is not available "
                f"({_reason}); only the 'torch' (and 'triton') backends will be used. "
                "Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded


def unavailable_reason() -> str:
    load()
    return _reason


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered its kernels for ``dispatch_key`` (``CPU``, ``CUDA``).

    A lookup in what ``load`` found: constant for the life of the process, so torch.compile
    traces it as a constant (a dispatcher query would break the graph)."""
    return load() and _kernel_keys.get(dispatch_key, False)
