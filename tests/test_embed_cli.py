"""`rpo-fast embed` as a user runs it: a subprocess stopped with Ctrl-C, then continued; and
offline, a pretrained tag that would be downloaded fails at once, in one line."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from rpo_fast.cli import main as cli_main
from rpo_fast.data import write_pickapic_parquet
from rpo_fast.embedding import embedding_cache_info, load_embedding_cache

from tiny_scorers import TINY_CLIP_NAME, save_tiny_open_clip

ROOT = Path(__file__).resolve().parents[1]
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                      "ALL_PROXY", "all_proxy")


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _OFFLINE_VARIABLES}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), **extra)
    return env


def _write_data(folder: Path, n: int) -> Path:
    rows = [(f"prompt {i % 7}", Image.new("RGB", (24, 24), (i % 256, (3 * i) % 256, 90)),
             Image.new("RGB", (24, 24), (40, i % 256, (5 * i) % 256)), float(i % 2)) for i in range(n)]
    write_pickapic_parquet(folder, rows, row_group_size=16)
    return folder


def test_ctrl_c_keeps_the_chunks_and_the_printed_command_finishes_the_cache(tmp_path):
    clip = save_tiny_open_clip(tmp_path / "clip")
    data = _write_data(tmp_path / "data", 300)
    out = tmp_path / "emb.safetensors"
    args = ["embed", "--data", str(data), "--output", str(out), "--model", TINY_CLIP_NAME, "--pretrained", str(clip),
            "--open-clip-config", str(tmp_path / "clip" / f"{TINY_CLIP_NAME}.json"), "--batch-size", "1",
            "--chunk-rows", "5", "--device", "cpu"]
    process = subprocess.Popen([sys.executable, "-m", "rpo_fast.cli", *args, "--overwrite"], cwd=tmp_path,
                               env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_chunk = tmp_path / "emb.safetensors.parts" / "chunk_000000.safetensors"
    deadline = time.monotonic() + 120
    while not first_chunk.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("rpo-fast embed: interrupted after embedding "), line
    assert " of 300 rows; " in line and " of 60 chunk(s) kept in " in line and "; to continue: rpo-fast embed " in line
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))

    # the printed command (here through `python -m rpo_fast.cli`) embeds only what is missing
    again = shlex.split(line.split("; to continue: ", 1)[1])
    assert again[:2] == ["rpo-fast", "embed"] and again[2:] == args[1:]  # without --overwrite: it continues
    resumed = subprocess.run([sys.executable, "-m", "rpo_fast.cli", *again[1:], "--no-progress"], cwd=tmp_path,
                             env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "embedding: resuming" in resumed.stdout and not (tmp_path / "emb.safetensors.parts").exists()

    fresh = tmp_path / "fresh.safetensors"
    assert cli_main([*args[:4], str(fresh), *args[5:], "--no-progress"]) == 0
    for got, want in zip(load_embedding_cache(out), load_embedding_cache(fresh)):
        assert torch.equal(got, want)
    info, want = embedding_cache_info(out), embedding_cache_info(fresh)
    assert torch.equal(info.pop("valid"), want.pop("valid")) and info == want


# The command's own time, after the imports (torch and open_clip alone take seconds on a busy machine).
_TIMED_MAIN = ("import sys, time, open_clip, rpo_fast.embedding; from rpo_fast.cli import main; "
               "t = time.perf_counter(); rc = main(sys.argv[1:]); print(f'seconds {time.perf_counter() - t:.3f}'); "
               "sys.exit(rc)")


@pytest.mark.parametrize("offline", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}],
                         ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_offline_pretrained_tag_fails_at_once_in_one_line(tmp_path, offline):
    data = _write_data(tmp_path / "data", 2)
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _TIMED_MAIN, "embed", "--data", str(data),
                             "--output", str(tmp_path / "emb.safetensors")],  # the default ViT-H-14 tag
                            cwd=tmp_path, env=_env(tmp_path, **offline), capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - start
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rpo-fast embed: error: --pretrained: 'laion2b_s32b_b79k' is not a local path")
    assert "local checkpoint file" in lines[0]
    seconds = float(result.stdout.split("seconds ")[1])
    assert seconds < 5, (seconds, wall)
    assert not (tmp_path / "emb.safetensors.parts").exists()
