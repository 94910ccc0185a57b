"""`rpo-fast eval` run as a user runs it, in a subprocess: Ctrl-C ends it in one line with a
command that continues it, and without the hub a name that would be downloaded fails at
once. Each subprocess gets an empty hub cache, so that nothing cached on the machine counts."""

from __future__ import annotations

import re
import shlex

import pytest

from cli_utils import cli_env, interrupt_when, run_cli, timed_cli

PROMPTS = ["a red house by the sea", "a cat on a chair", "a mountain at dawn"]


def _env(tmp_path, **extra):
    return cli_env(tmp_path, HOME=str(tmp_path / "home"), **extra)  # and no open_clip download cache


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
    last = interrupt_when(args, lambda: bool(list(out.glob("images/base/*.png"))), env)  # generation has started
    match = re.fullmatch(r"rpo-fast eval: interrupted while generating with the base model, (\d) of 9 images; "
                         r"kept the (\d) finished images in \S+; to continue: (rpo-fast eval .*)", last)
    assert match, last
    saved = sorted(out.glob("images/*/*.png"))
    assert int(match[2]) == len(saved) < 9 and int(match[1]) <= len(saved)
    assert not list(out.rglob("*.tmp"))  # nothing half-written
    again = shlex.split(match[3])
    assert again == ["rpo-fast", *args]
    done = run_cli(again[1:], env)
    assert done.returncode == 0, done.stderr
    assert f"base model: reusing {len(saved)} of 9 images" in done.stdout
    assert len(list(out.glob("images/*/*.png"))) == 18 and (out / "grid.png").is_file()


@pytest.mark.parametrize("hub", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["HF_HUB_OFFLINE", "unreachable"])
@pytest.mark.parametrize("extra, option", [([], "--clip-pretrained"),
                                           (["--base", "runwayml/stable-diffusion-v1-5"], "--base")])
def test_without_the_hub_a_download_fails_at_once(eval_args, tmp_path, hub, extra, option):
    args = [*eval_args, *extra]
    done, seconds = timed_cli(args, _env(tmp_path, **hub), timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"rpo-fast eval: error: {option}: "), done.stderr
    assert "local" in lines[0] or "download it" in lines[0]
    assert seconds < 5  # no waiting for the download libraries' retries (before: about 50 s)
    assert not (tmp_path / "out").exists()
