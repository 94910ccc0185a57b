"""`rpo-fast embed` as a user runs it: a subprocess stopped with Ctrl-C, then continued; and
offline, a pretrained tag that would be downloaded fails at once, in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from rpo_fast.cli import main as cli_main
from rpo_fast.data import write_pickapic_parquet
from rpo_fast.embedding import embedding_cache_info, load_embedding_cache

from cli_utils import cli_env, continue_command, interrupt_when, run_cli, timed_cli
from tiny_scorers import TINY_CLIP_NAME, save_tiny_open_clip


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
    first_chunk = tmp_path / "emb.safetensors.parts" / "chunk_000000.safetensors"
    line = interrupt_when([*args, "--overwrite"], first_chunk.exists, cli_env(tmp_path), cwd=tmp_path)
    assert line.startswith("rpo-fast embed: interrupted after embedding "), line
    assert " of 300 rows; " in line and " of 60 chunk(s) kept in " in line and "; to continue: rpo-fast embed " in line
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))

    # the printed command (here through `python -m rpo_fast.cli`) embeds only what is missing
    again = continue_command(line)
    assert again[:2] == ["rpo-fast", "embed"] and again[2:] == args[1:]  # without --overwrite: it continues
    resumed = run_cli([*again[1:], "--no-progress"], cli_env(tmp_path), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "embedding: resuming" in resumed.stdout and not (tmp_path / "emb.safetensors.parts").exists()

    fresh = tmp_path / "fresh.safetensors"
    assert cli_main([*args[:4], str(fresh), *args[5:], "--no-progress"]) == 0
    for got, want in zip(load_embedding_cache(out), load_embedding_cache(fresh)):
        assert torch.equal(got, want)
    info, want = embedding_cache_info(out), embedding_cache_info(fresh)
    assert torch.equal(info.pop("valid"), want.pop("valid")) and info == want


@pytest.mark.parametrize("offline", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}],
                         ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_offline_pretrained_tag_fails_at_once_in_one_line(tmp_path, offline):
    data = _write_data(tmp_path / "data", 2)
    result, seconds = timed_cli(["embed", "--data", str(data), "--output", str(tmp_path / "emb.safetensors")],
                                cli_env(tmp_path, **offline), timeout=120, cwd=tmp_path)  # the default ViT-H-14 tag
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rpo-fast embed: error: --pretrained: 'laion2b_s32b_b79k' is not a local path")
    assert "local checkpoint file" in lines[0]
    assert seconds < 5  # no waiting for open_clip's retries (before: about 50 s, then a traceback)
    assert not (tmp_path / "emb.safetensors.parts").exists()
