"""`rpo-fast eval` run as a user runs it, in a subprocess: Ctrl-C ends it in one line with a
command that continues it, and without the hub a name that would be downloaded fails at
once. Each subprocess gets an empty hub cache, so that nothing cached on the machine counts."""

from __future__ import annotations

import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time

import pytest

PROMPTS = ["a red house by the sea", "a cat on a chair", "a mountain at dawn"]
_HUB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT",
                  "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in _HUB_VARIABLES}
    env.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"),
               HOME=str(tmp_path / "home"), **extra)
    return env


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _command(*args):
    return [sys.executable, "-m", "rpo_fast.cli", *args]


@pytest.fixture
def eval_args(tiny_sd15_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return ["eval", "--base", str(tiny_sd15_dir), "--tuned", str(tiny_sd15_dir), "--prompts", str(prompts),
            "--output-dir", str(tmp_path / "out"), "--device", "cpu"]


def test_ctrl_c_ends_in_one_line_and_its_command_continues(eval_args, tmp_path):
    out = tmp_path / "out"
    args = [*eval_args, "--no-progress", "--no-clip", "--images-per-prompt", "3", "--num-inference-steps", "6",
            "--height", "64", "--width", "64", "--batch-size", "1"]
    env = _env(tmp_path)
    process = subprocess.Popen(_command(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("images/base/*.png")):  # generation has started
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"rpo-fast eval: interrupted while generating with the base model, (\d) of 9 images; "
                         r"kept the (\d) finished images in \S+; to continue: (rpo-fast eval .*)", last)
    assert match, last
    saved = sorted(out.glob("images/*/*.png"))
    assert int(match[2]) == len(saved) < 9 and int(match[1]) <= len(saved)
    assert not list(out.rglob("*.tmp"))  # nothing half-written
    again = shlex.split(match[3])
    assert again == ["rpo-fast", *args]
    done = subprocess.run(_command(*again[1:]), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"base model: reusing {len(saved)} of 9 images" in done.stdout
    assert len(list(out.glob("images/*/*.png"))) == 18 and (out / "grid.png").is_file()


@pytest.mark.parametrize("hub", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable"])
@pytest.mark.parametrize("extra, option", [([], "--clip-pretrained"),
                                           (["--base", "runwayml/stable-diffusion-v1-5"], "--base")])
def test_without_the_hub_a_download_fails_at_once(eval_args, tmp_path, hub, extra, option):
    args = [*eval_args, *extra]
    started, cpu = time.monotonic(), _children_cpu_s()
    done = subprocess.run(_command(*args), env=_env(tmp_path, **hub), capture_output=True, text=True, timeout=120)
    elapsed, cpu = time.monotonic() - started, _children_cpu_s() - cpu
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rpo-fast eval: error: {option}: "), done.stderr
    assert "local" in lines[0] or "download it" in lines[0]
    # Under 5 s of work (about 3 s on an idle machine, most of it importing torch), and no waiting
    # for retries (before: about 50 s). The wall-clock bound is wider: this machine may be shared.
    assert cpu < 5 and elapsed < 10, f"{cpu:.1f} s of CPU time, {elapsed:.1f} s in all"
    assert not (tmp_path / "out").exists()
