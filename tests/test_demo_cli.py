"""`rpo-fast demo` as a user runs it: stopped with Ctrl-C while fine-tuning, then continued."""

from __future__ import annotations

import os

from cli_utils import ROOT, continue_command, interrupt_when, run_cli


def test_ctrl_c_while_fine_tuning_says_where_and_the_printed_command_continues(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "40", "--batch-pairs", "4", "--pairs-per-caption", "1",
            "--max-prompts", "2", "--samples-per-prompt", "1", "--inference-steps", "2", "--threads", "1",
            "--no-progress"]
    checkpoint = out / "work" / "finetune" / "checkpoint-25"  # the first of those a rerun continues from
    line = interrupt_when(args, checkpoint.exists, env, cwd=tmp_path)
    assert line.startswith("rpo-fast demo: interrupted fine-tuning at step "), line
    assert f" of 40; checkpoint-25 kept in {out / 'work' / 'finetune'}: a rerun continues from step 25; " in line, line
    again = continue_command(line)
    assert again == ["rpo-fast", *args]
    resumed = run_cli(again[1:], env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "rpo-fast train: resuming from " in resumed.stdout and "(step 25 of 40)" in resumed.stdout
    assert (out / "demo_results.json").is_file()
    assert not list((out / "work" / "finetune").glob("checkpoint-*"))  # done with: removed
