"""Which pip extra provides each optional dependency, so that a command run without it says,
in one line, what to install.

``pip install rpo-fast`` is the loss alone (torch). ``[train]`` adds what ``train`` and ``demo``
import, ``[eval]`` what ``embed`` and ``eval`` import, ``[all]`` both; setup.py lists the same
distributions (pinned by requirements.txt).
"""

from __future__ import annotations

from typing import Optional

# import name -> distribution name (as in setup.py's EXTRAS)
MODULES = {
    "numpy": "numpy", "PIL": "pillow", "safetensors": "safetensors", "tqdm": "tqdm", "yaml": "PyYAML",
    "pyarrow": "pyarrow", "datasets": "datasets", "diffusers": "diffusers", "transformers": "transformers",
    "peft": "peft", "accelerate": "accelerate", "matplotlib": "matplotlib", "open_clip": "open_clip_torch",
}
# subcommand -> the extra that holds everything it imports
COMMAND_EXTRAS = {"train": "train", "demo": "train", "embed": "eval", "eval": "eval"}


def missing_extra_message(command: str, error: ModuleNotFoundError) -> Optional[str]:
    """``rpo-fast <command>: ...`` naming the extra to install, or None when ``error`` is not
    about an optional dependency of rpo-fast."""
    top = (error.name or "").split(".")[0]
    if top not in MODULES:
        return None
    extra = COMMAND_EXTRAS.get(command, "all")
    return (f"rpo-fast {command}: needs {MODULES[top]} (No module named {top!r}), which comes with the "
            f"'{extra}' extra: pip install \"rpo-fast[{extra}]\"")
