"""Nothing lost: a run killed with SIGKILL and resumed with --resume latest ends with the same
weights as a run never interrupted (model, optimizer, LR schedule, RNG and data position all
restored; checkpoints written atomically)."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from rpo_fast.train import train
from rpo_fast.train.checkpoint import find_checkpoint, list_checkpoints
from train_utils import one_thread, synthetic_pickapic, tiny_config, unet_weights

SETTINGS = dict(method="rpo", lora=False, batch_pairs=2, gradient_accumulation_steps=2, max_steps=6,
                checkpoint_every=2, checkpoints_total_limit=2, lr_warmup_steps=3, learning_rate=1e-3)


def _cli_args(config):
    args = []
    for name in ("pretrained_model", "data", "output_dir", "latent_cache", "resolution", "batch_pairs", "max_steps",
                 "learning_rate", "checkpoint_every", "log_every", "vae_encode_batch_size", "method",
                 "gradient_accumulation_steps", "checkpoints_total_limit", "lr_warmup_steps"):
        args += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    return args + ["--no-compile", "--no-progress", "--no-lora", "--resume", "latest"]


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tiny_sd15_dir, tmp_path):
    data = synthetic_pickapic(tmp_path / "data")
    latents = tmp_path / "latents"
    with one_thread():
        reference = train(tiny_config(tiny_sd15_dir, data, tmp_path / "straight", latents, **SETTINGS))
    assert reference.steps == 6

    out = tmp_path / "killed"
    assert find_checkpoint(out, "latest") is None  # 'latest' with nothing saved yet: a fresh start
    config = tiny_config(tiny_sd15_dir, data, out, latents, **SETTINGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rpo_fast.cli", "train", *_cli_args(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Kill while checkpoint-4 is being written if we catch it, else just after it appears
    # (in the middle of step 5): either way the run dies without warning.
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / ".checkpoint-4.tmp").exists() or (out / "checkpoint-4").exists():
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "unet").exists()
    assert min(list_checkpoints(out)) >= 2  # only complete checkpoints are listed

    resumed = subprocess.run([sys.executable, "-m", "rpo_fast.cli", "train", *_cli_args(config)], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want, got = unet_weights(reference.output_dir / "unet"), unet_weights(out / "unet")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the replayed steps are logged once
    assert sorted(list_checkpoints(out)) == [4, 6]  # checkpoints_total_limit
