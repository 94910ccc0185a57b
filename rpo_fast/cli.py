"""``rpo-fast``: one command line, one subcommand per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so that
``rpo-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import shlex
import sys
from typing import List, Optional, Sequence

from .extras import missing_extra_message

SUBCOMMANDS = {
    "check": ("rpo_fast.backend_check", "which loss backends agree with the reference here, and which is fastest"),
    "train": ("rpo_fast.train.cli", "fine-tune SD1.5 / SDXL with rpo, dpo or sft (full or LoRA)"),
    "embed": ("rpo_fast.embedding", "embed a preference dataset with open_clip for the RPO weights"),
    "eval": ("rpo_fast.evaluation.cli", "generate with a base and a tuned model and score both"),
    "demo": ("rpo_fast.demo.cli", "style alignment on a synthetic task, on a CPU in minutes"),
}


INTERRUPTED = 130  # the shell's status for a command ended by SIGINT (128 + 2)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, naming the argument, and exit status 2. Options are never
    matched by a prefix (``--max-step`` is not ``--max-steps``): a typo is an error."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="rpo-fast", description="Diffusion-RPO for Stable Diffusion 1.5 and XL.",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])  # prints help or the usage error
        return 2
    name = argv[0]
    try:
        return _run(name, argv[1:])
    except KeyboardInterrupt:  # before the subcommand's own handler took over (imports, parsing)
        return interrupted(name, "before it started", "nothing was written", None)
    except ModuleNotFoundError as e:  # an optional dependency: say which extra brings it
        message = missing_extra_message(name, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2


def _run(name: str, argv: List[str]) -> int:
    module = importlib.import_module(SUBCOMMANDS[name][0])
    cmd_parser = _Parser(
        prog=f"rpo-fast {name}",
        description=SUBCOMMANDS[name][1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv)
    args._command_line = ["rpo-fast", name, *argv]  # for the command that continues an interrupted run
    if getattr(args, "no_progress", False):
        quiet_library_progress()
    return int(module.run(args) or 0)


def interrupted(command: str, reached: str, kept: str, again: Optional[str]) -> int:
    """The one line a subcommand ends with on Ctrl-C (SIGINT): where it was, what it kept,
    the command that continues (None: nothing to continue); returns the exit status 130."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):  # live bars end their line first
        bar.close()
    line = f"rpo-fast {command}: interrupted {reached}; {kept}"
    print(line + (f"; to continue: {again}" if again else ""), file=sys.stderr, flush=True)
    return INTERRUPTED


def rerun_command(args: argparse.Namespace, add: Sequence[str] = (), drop: Sequence[str] = (),
                  drop_switches: Sequence[str] = ()) -> str:
    """The command line that started this subcommand without the options in ``drop`` (each
    with its value: ``--flag value`` or ``--flag=value``) and the switches in
    ``drop_switches`` (no value), then the words ``add``."""
    kept, skip = [], False
    for word in getattr(args, "_command_line", None) or ["rpo-fast"]:
        if skip or word in drop_switches:
            skip = False
        elif word in drop:
            skip = True
        elif not any(word.startswith(flag + "=") for flag in drop):
            kept.append(word)
    return shlex.join(kept + list(add))


def quiet_library_progress() -> None:
    """``--no-progress`` silences the libraries' bars too ("Loading pipeline components",
    "Loading weights"), not only rpo-fast's own."""
    for name in ("diffusers", "transformers"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(f"{name}.utils.logging").disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
