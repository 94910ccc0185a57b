"""Running `rpo-fast` as a user does, in a subprocess: Ctrl-C at a chosen moment, the command it
says continues the work, and an environment that sees no hub cache of the machine's."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parents[1]
HUB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HTTPS_PROXY",
                 "https_proxy", "ALL_PROXY", "all_proxy")


def cli_env(tmp_path: Path, **extra: str) -> dict:
    """One torch thread, the checkout importable, and an empty hub cache of its own (nothing the
    machine downloaded before counts); ``extra`` on top (e.g. HF_HUB_OFFLINE=1)."""
    env = {k: v for k, v in os.environ.items() if k not in HUB_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), **extra)
    return env


def run_cli(words: List[str], env: dict, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``rpo-fast WORDS...`` (through ``python -m rpo_fast.cli``), output captured."""
    return subprocess.run([sys.executable, "-m", "rpo_fast.cli", *words], env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def default_sigint() -> None:
    """In the child, before Python starts: SIGINT back to its default. A shell's background job
    (``make test &``, some CI runners) starts with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so the signal a test sends would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_when(words: List[str], ready: Callable[[], bool], env: dict, timeout: float = 300, **kwargs) -> str:
    """Starts ``rpo-fast WORDS...``, sends SIGINT (what Ctrl-C sends) once ``ready()``, and
    checks that it ended as an interrupted command must: exit 130, no traceback. Returns the
    last line it wrote to stderr (the one line)."""
    process = subprocess.Popen([sys.executable, "-m", "rpo_fast.cli", *words], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint, **kwargs)
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"it ended before it could be interrupted: {process.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, "never ready to be interrupted"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def continue_command(line: str) -> List[str]:
    """The words of the command an interrupted command's line says continues it."""
    assert "; to continue: " in line, line
    return shlex.split(line.split("; to continue: ", 1)[1])


# The command's own time: its subcommand's module is imported first (torch and the libraries
# alone take seconds on a busy machine; they are not what a user waits for on a mistake).
_TIMED_MAIN = ("import importlib, sys, time; from rpo_fast.cli import SUBCOMMANDS, main; "
               "importlib.import_module(SUBCOMMANDS[sys.argv[1]][0]); t = time.perf_counter(); rc = main(sys.argv[1:]); "
               "print(f'seconds {time.perf_counter() - t:.3f}'); sys.exit(rc)")


def timed_cli(words: List[str], env: dict, timeout: float = 300, **kwargs):
    """``run_cli``, and the seconds the command took once its modules were imported."""
    done = subprocess.run([sys.executable, "-c", _TIMED_MAIN, *words], env=env, capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    return done, float(done.stdout.rsplit("seconds ", 1)[1])
