"""`rpo-fast demo` as a user runs it: stopped with Ctrl-C while fine-tuning, then continued."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_while_fine_tuning_says_where_and_the_printed_command_continues(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "40", "--batch-pairs", "4", "--pairs-per-caption", "1",
            "--max-prompts", "2", "--samples-per-prompt", "1", "--inference-steps", "2", "--threads", "1",
            "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "rpo_fast.cli", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = out / "work" / "finetune" / "checkpoint-25"  # the first of those a rerun continues from
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("rpo-fast demo: interrupted fine-tuning at step "), line
    assert f" of 40; checkpoint-25 kept in {out / 'work' / 'finetune'}: a rerun continues from step 25; " in line, line
    again = shlex.split(line.split("; to continue: ", 1)[1])
    assert again == ["rpo-fast", *args]

    resumed = subprocess.run([sys.executable, "-m", "rpo_fast.cli", *again[1:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "rpo-fast train: resuming from " in resumed.stdout and "(step 25 of 40)" in resumed.stdout
    assert (out / "demo_results.json").is_file()
    assert not list((out / "work" / "finetune").glob("checkpoint-*"))  # done with: removed
