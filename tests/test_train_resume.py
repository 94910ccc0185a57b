"""Nothing lost: a run killed with SIGKILL, or stopped with Ctrl-C, and resumed with --resume
latest ends with the same weights as a run never interrupted (model, optimizer, LR schedule, RNG
and data position all restored; checkpoints written atomically); a resume with other options
applies, refuses or takes each by its class (docs/training.md) and records what it applied."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from rpo_fast.train import train
from rpo_fast.train.checkpoint import find_checkpoint, list_checkpoints
from cli_utils import continue_command, interrupt_when, run_cli
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


FAMILIES = {"sd15": "unet", "sd3": "transformer", "flux": "transformer"}  # family: its trained model's folder


@pytest.fixture(scope="module")
def model_dirs(request):
    """The tiny pipelines by family, built when a test first asks for one."""
    return lambda family: request.getfixturevalue(f"tiny_{family}_dir")


@pytest.fixture(scope="module")
def straight_runs(model_dirs, tmp_path_factory):
    """Per family: the data, the latent cache and a run of SETTINGS never interrupted."""
    root = tmp_path_factory.mktemp("straight")
    data, latents, done = synthetic_pickapic(root / "data"), root / "latents", {}

    def run(family):
        if family not in done:
            with one_thread():
                reference = train(tiny_config(model_dirs(family), data, root / family, latents, **SETTINGS))
            assert reference.steps == 6
            done[family] = data, latents, unet_weights(reference.output_dir / FAMILIES[family])
        return done[family]

    return run


@pytest.fixture(scope="module")
def straight(straight_runs):
    return straight_runs("sd15")


def _equal_weights(want, got):
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_sigkill_then_resume_gives_the_uninterrupted_weights(model_dirs, tmp_path, straight_runs, family):
    data, latents, want = straight_runs(family)
    out = tmp_path / "killed"
    assert find_checkpoint(out, "latest") is None  # 'latest' with nothing saved yet: a fresh start
    config = tiny_config(model_dirs(family), data, out, latents, **SETTINGS)
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
    assert not (out / FAMILIES[family]).exists()
    assert min(list_checkpoints(out)) >= 2  # only complete checkpoints are listed

    resumed = run_cli(["train", *_cli_args(config)], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _equal_weights(want, unet_weights(out / FAMILIES[family]))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # the replayed steps are logged once
    assert sorted(list_checkpoints(out)) == [4, 6]  # checkpoints_total_limit


def test_ctrl_c_ends_in_one_line_and_the_command_it_gives_continues(tiny_sd15_dir, tmp_path, straight):
    data, latents, want = straight
    out = tmp_path / "interrupted"
    argv = _cli_args(tiny_config(tiny_sd15_dir, data, out, latents, **SETTINGS))[:-2]  # no --resume latest
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    line = interrupt_when(["train", *argv], (out / "checkpoint-2").exists, env)
    assert line.startswith("rpo-fast train: interrupted at step "), line
    assert "checkpoint-" in line and "is kept" in line, line
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # nothing half-written

    again = continue_command(line)
    assert again[:2] == ["rpo-fast", "train"] and again[-2:] == ["--resume", "latest"], line
    resumed = run_cli(again[1:], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _equal_weights(want, unet_weights(out / "unet"))


def test_a_resume_applies_refuses_or_takes_each_option_by_its_class(tiny_sd15_dir, tmp_path, straight, capsys):
    data, latents, _ = straight
    out = tmp_path / "run"
    common = dict(method="dpo", lora=True, checkpoint_every=2, learning_rate=1e-4)

    def run(folder, **changes):
        return train(tiny_config(tiny_sd15_dir, data, folder, latents, **{**common, "max_steps": 4,
                                                                        "resume": "latest", **changes}))

    with one_thread():
        train(tiny_config(tiny_sd15_dir, data, out, latents, max_steps=2, **common))
        before = sorted(p.name for p in out.iterdir())
        # refuse: every option that would make it another run, all listed at once, before anything loads
        with pytest.raises(ValueError) as refused:
            run(out, beta=100.0, seed=1)
        assert "beta: checkpoint 2500.0 vs now 100.0" in str(refused.value), refused.value
        assert "seed: checkpoint 0 vs now 1" in str(refused.value), refused.value
        with pytest.raises(ValueError, match=r"max_steps: 2 is not above step 2 of \S*checkpoint-2"):
            run(out, max_steps=2)
        assert sorted(p.name for p in out.iterdir()) == before

        shutil.copytree(out, tmp_path / "unchanged")
        capsys.readouterr()
        run(out, learning_rate=5e-5, log_every=2)  # apply: learning_rate; free: log_every
        said = capsys.readouterr().out
        run(tmp_path / "unchanged")

    assert "learning_rate: 0.0001 -> 5e-05 from step 3" in said, said
    assert "log_every" not in said, said
    lr = {line["step"]: line["lr"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert lr == {1: 1e-4, 2: 1e-4, 4: 5e-5}  # log_every 2 after the resume
    changed, same = unet_weights(out), unet_weights(tmp_path / "unchanged")
    assert any(not torch.equal(changed[k], same[k]) for k in changed)  # the new rate trained

    record = (out / "train_config.yaml").read_text()
    assert "#   learning_rate: 0.0001 until step 2, 5e-05 from step 3" in record, record
    assert "learning_rate: 5.0e-05" in record and "log_every: 2" in record, record
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["config"]["learning_rate"] == 5e-5
    assert {c["option"]: (c["old"], c["new"], c["from_step"]) for c in state["config_changes"]} == {
        "learning_rate": (1e-4, 5e-5, 3), "max_steps": (2, 4, 3)}


def test_more_epochs_on_resume_are_recorded_as_the_steps_they_resolve_to(tiny_sd15_dir, tmp_path, straight):
    data, latents, _ = straight
    common = dict(method="sft", lora=True, max_steps=None, batch_pairs=8, checkpoint_every=0)
    with one_thread():
        first = train(tiny_config(tiny_sd15_dir, data, tmp_path / "run", latents, num_train_epochs=1, **common))
        second = train(tiny_config(tiny_sd15_dir, data, tmp_path / "run", latents, num_train_epochs=2,
                                   resume="latest", **common))
    assert (first.steps, second.steps) == (2, 4)  # 16 pairs, 8 a step
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert {c["option"]: (c["old"], c["new"], c["from_step"]) for c in state["config_changes"]} == {
        "num_train_epochs": (1, 2, 3), "max_steps": (2, 4, 3)}


def test_a_checkpoint_from_before_weight_norm_resumes_with_rows_summing_to_one(tiny_sd15_dir, tmp_path, straight):
    data, latents, _ = straight
    common = dict(method="rpo", lora=True, checkpoint_every=2)
    with one_thread():
        train(tiny_config(tiny_sd15_dir, data, tmp_path / "run", latents, max_steps=2, **common))
        state_file = tmp_path / "run" / "checkpoint-2" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        del state["config"]["weight_norm"]  # what an older rpo-fast wrote: it trained with "row"
        state_file.write_text(json.dumps(state))
        with pytest.raises(ValueError, match="weight_norm: checkpoint 'row' vs now 'mean'"):
            train(tiny_config(tiny_sd15_dir, data, tmp_path / "run", latents, max_steps=3, resume="latest", **common))
        resumed = train(tiny_config(tiny_sd15_dir, data, tmp_path / "run", latents, max_steps=3, resume="latest",
                                    weight_norm="row", **common))
    assert resumed.steps == 3


# The options SD3 / FLUX.1 added: a checkpoint written before them (a8dc67f) records every other
# option, and its caches are read as they are.
FLOW_OPTIONS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale")


@pytest.mark.parametrize("lora", [True, False])
def test_a_checkpoint_from_before_the_flow_families_continues_bit_for_bit(tiny_sd15_dir, tmp_path, straight, lora):
    data, latents, _ = straight
    common = dict(method="rpo", lora=lora, checkpoint_every=2)
    old, new = tmp_path / "old", tmp_path / "straight"
    with one_thread():
        train(tiny_config(tiny_sd15_dir, data, old, latents, max_steps=2, **common))
        state_file = old / "checkpoint-2" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        assert set(FLOW_OPTIONS) <= set(state["config"])
        state["config"] = {k: v for k, v in state["config"].items() if k not in FLOW_OPTIONS}
        state_file.write_text(json.dumps(state))
        resumed = train(tiny_config(tiny_sd15_dir, data, old, latents, max_steps=4, resume="latest", **common))
        train(tiny_config(tiny_sd15_dir, data, new, latents, max_steps=4, **common))
    assert resumed.steps == 4
    folder = "" if lora else "unet"
    _equal_weights(unet_weights(new / folder), unet_weights(old / folder))
    state = json.loads((old / "checkpoint-4" / "trainer_state.json").read_text())
    assert set(FLOW_OPTIONS) <= set(state["config"])  # recorded from now on
    assert [c["option"] for c in state["config_changes"]] == ["max_steps"]  # nothing else reported as changed
