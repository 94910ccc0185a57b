"""`rpo-fast train`'s command line: the diffusers DPO examples' launch lines keep their meaning,
and every user mistake is one line naming the option, exit status 2, before any model loads."""

import argparse
import os
import shlex

import pytest

from rpo_fast.cli import main
from rpo_fast.train.cli import add_arguments, config_from_args

# The launch lines of diffusers' examples/research_projects/diffusion_dpo/README.md (diffusers
# main as of 0.36), with tiny local models and data for the hub ids.
SD15_LINE = """--pretrained_model_name_or_path={sd15} --output_dir="{out}" --mixed_precision="fp16"
  --dataset_name={data} --resolution=512 --train_batch_size=16 --gradient_accumulation_steps=2
  --gradient_checkpointing --use_8bit_adam --rank=8 --learning_rate=1e-5 --report_to="wandb"
  --lr_scheduler="constant" --lr_warmup_steps=0 --max_train_steps=10000 --checkpointing_steps=2000
  --run_validation --validation_steps=200 --seed="0" --report_to="wandb" --push_to_hub"""
SDXL_LINE = """--pretrained_model_name_or_path={sdxl} --pretrained_vae_model_name_or_path={vae}
  --output_dir="{out}" --mixed_precision="fp16" --dataset_name={data} --train_batch_size=8
  --gradient_accumulation_steps=2 --gradient_checkpointing --use_8bit_adam --rank=8 --learning_rate=1e-5
  --report_to="wandb" --lr_scheduler="constant" --lr_warmup_steps=0 --max_train_steps=2000
  --checkpointing_steps=500 --run_validation --validation_steps=50 --seed="0" --report_to="wandb" --push_to_hub"""
UNSUPPORTED = ("--report_to", "--run_validation", "--validation_steps", "--push_to_hub")


def _config(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def _without_unsupported(argv):
    return [a for a in argv if not a.startswith(UNSUPPORTED)]


def test_diffusers_launch_lines(tmp_path, tiny_sd15_dir, tiny_sdxl_dir):
    paths = dict(sd15=tiny_sd15_dir, sdxl=tiny_sdxl_dir, vae=tiny_sdxl_dir / "vae", data=tmp_path / "data",
                 out=tmp_path / "out")
    for line in (SD15_LINE, SDXL_LINE):
        argv = shlex.split(line.format(**paths))
        with pytest.raises(ValueError) as refused:  # every unsupported flag, in one message
            _config(argv)
        message = str(refused.value)
        assert "\n" not in message
        for flag in UNSUPPORTED:
            assert flag in message
        assert "rpo-fast eval" in message and "tensorboard" in message
    sd15 = _config(_without_unsupported(shlex.split(SD15_LINE.format(**paths))))
    assert (sd15.pretrained_model, sd15.data, sd15.output_dir) == (str(tiny_sd15_dir), str(paths["data"]),
                                                                   str(paths["out"]))
    assert (sd15.lora, sd15.lora_rank, sd15.optimizer, sd15.gradient_checkpointing) == (True, 8, "adamw8bit", True)
    assert (sd15.mixed_precision, sd15.resolution, sd15.batch_pairs, sd15.gradient_accumulation_steps) == \
        ("fp16", 512, 16, 2)
    assert (sd15.learning_rate, sd15.lr_scheduler, sd15.lr_warmup_steps, sd15.max_steps, sd15.checkpoint_every,
            sd15.seed) == (1e-5, "constant", 0, 10000, 2000, 0)
    assert sd15.beta == 2500.0 and sd15.hflip  # defaults; diffusers flips by default too
    sdxl = _config(_without_unsupported(shlex.split(SDXL_LINE.format(**paths))))
    assert sdxl.pretrained_vae == str(paths["vae"]) and sdxl.resolution is None  # resolved to 1024 for SDXL
    assert (sdxl.lora, sdxl.lora_rank, sdxl.batch_pairs, sdxl.max_steps) == (True, 8, 8, 2000)


def test_diffusers_flags_mean_what_they_mean_there():
    base = ["--pretrained-model", "m", "--data", "d", "--output-dir", "o"]
    c = _config(base + ["--beta_dpo", "5000", "--no_hflip", "--random_crop", "--allow_tf32", "--report_to",
                        "tensorboard", "--num_train_epochs", "2", "--max_train_samples", "10",
                        "--dataset_split_name", "validation", "--cache_dir", "c"])
    assert c.beta == 2500.0  # diffusers scales by -0.5 * beta_dpo
    assert (c.hflip, c.random_crop, c.allow_tf32, c.tensorboard) == (False, True, True, True)
    assert (c.num_train_epochs, c.max_steps, c.max_train_samples, c.split, c.cache_dir) == (2, None, 10,
                                                                                           "validation", "c")
    assert _config(base + ["--rank", "4"]).lora  # the diffusers DPO examples are LoRA-only
    assert not _config(base + ["--lora-rank", "4"]).lora
    with pytest.raises(ValueError, match="--rank.*--no-lora"):
        _config(base + ["--rank", "4", "--no-lora"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert "beta = beta_dpo / 2" in " ".join(parser.format_help().split())


def _one_line_error(capsys, argv, *expected):
    try:
        status = main(["train", *argv])
    except SystemExit as e:  # argparse's usage errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_user_mistakes_are_one_line_before_any_model_loads(capsys, tmp_path, tiny_sd15_dir, monkeypatch):
    import rpo_fast.train.models as models

    monkeypatch.setattr(models, "load_models", lambda config: pytest.fail("a model loaded"))
    base = ["--pretrained-model", str(tiny_sd15_dir), "--output-dir", str(tmp_path / "o"), "--no-progress"]
    _one_line_error(capsys, [*base, "--data", "/no/such/path"], "data:", "/no/such/path")
    _one_line_error(capsys, [*base, "--data", "nope"], "data:", "nope")
    data = tmp_path / "d"
    data.mkdir()
    (data / "pairs.jsonl").write_text("")
    _one_line_error(capsys, [*base, "--data", str(data), "--embeddings", str(tmp_path / "e.safetensors")],
                    "embeddings:", "rpo-fast embed")
    _one_line_error(capsys, ["--pretrained-model", str(tmp_path / "none"), "--data", str(data), "--output-dir",
                             str(tmp_path / "o")], "pretrained_model:")
    _one_line_error(capsys, [*base, "--data", str(data), "--resolution", "abc"], "--resolution")
    _one_line_error(capsys, [*base, "--data", str(data), "--push_to_hub"], "--push_to_hub")
    _one_line_error(capsys, [*base, "--data", str(data), "--pretrained_vae_model_name_or_path", str(tmp_path / "v")],
                    "pretrained_vae:")
    _one_line_error(capsys, [*base, "--data", str(data), "--use_8bit_adam"], "bitsandbytes")


def test_a_folder_holding_a_run_is_not_overwritten(capsys, tmp_path, tiny_sd15_dir, monkeypatch):
    import rpo_fast.train.loop as loop

    out = tmp_path / "o"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "trainer_state.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "mine.txt").write_text("not the run's")
    argv = ["--pretrained-model", str(tiny_sd15_dir), "--data", str(tmp_path), "--output-dir", str(out)]
    _one_line_error(capsys, argv, "output_dir:", "--resume latest", "--overwrite-output-dir")
    assert (out / "metrics.jsonl").exists()

    class Stop(Exception):
        pass

    def stop(config, **kwargs):
        raise Stop

    monkeypatch.setattr(loop, "prepare", stop)
    with pytest.raises(Stop):
        main(["train", *argv, "--overwrite-output-dir"])
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint-2").exists()
    assert (out / "mine.txt").exists()  # only what a run writes is deleted


@pytest.fixture
def library_bars():
    """diffusers' and transformers' progress switches, switched back on afterwards."""
    diffusers_logging = pytest.importorskip("diffusers.utils.logging")
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    yield diffusers_logging, transformers_logging
    diffusers_logging.enable_progress_bar()
    transformers_logging.enable_progress_bar()


def test_no_progress_also_quiets_the_libraries_bars(capsys, tmp_path, tiny_sd15_dir, monkeypatch, library_bars):
    import rpo_fast.train.loop as loop

    def stop(config):
        raise ValueError("stopped by the test")

    monkeypatch.setattr(loop, "train", stop)
    train = ["train", "--pretrained-model", str(tiny_sd15_dir), "--data", str(tmp_path), "--output-dir",
             str(tmp_path / "out")]
    embed = ["embed", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "emb.safetensors")]
    for argv in (train, embed):
        for switch in library_bars:
            switch.enable_progress_bar()
        assert main(argv) == 2  # stopped after the options were read
        assert all(switch.is_progress_bar_enabled() for switch in library_bars), argv
        assert main(argv + ["--no-progress"]) == 2
        assert not any(switch.is_progress_bar_enabled() for switch in library_bars), argv
    capsys.readouterr()


def test_options_are_never_matched_by_a_prefix(capsys, tmp_path, tiny_sd15_dir):
    # --max-step is a typo, not --max-steps: argparse would otherwise take any unambiguous prefix
    argv = ["--pretrained-model", str(tiny_sd15_dir), "--data", str(tmp_path), "--output-dir", str(tmp_path / "o")]
    _one_line_error(capsys, [*argv, "--max-step", "5"], "unrecognized arguments: --max-step 5")
    with pytest.raises(SystemExit):
        main(["eval", "--base", "b", "--tuned", "t", "--prompts", "p", "--output", "o"])  # --output-dir's prefix
    assert "required: --output-dir" in capsys.readouterr().err  # --output was not taken for it


def test_yaml_numbers_in_any_float_notation(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 3e-4 as a string; the config reads numbers as YAML 1.2 does
    (tmp_path / "c.yaml").write_text("pretrained_model: m\ndata: d\noutput_dir: o\nlearning_rate: 3e-4\n"
                                     "beta: 2.5E+3\ntau: .5e0\nadam_epsilon: 1e-08\nmax_steps: 7\nseed: 1_0\n")
    config = _config(["--config", str(tmp_path / "c.yaml")])
    assert (config.learning_rate, config.beta, config.tau, config.adam_epsilon) == (3e-4, 2500.0, 0.5, 1e-8)
    assert (config.max_steps, config.seed) == (7, 10)
    (tmp_path / "bad.yaml").write_text("pretrained_model: m\ndata: d\noutput_dir: o\nlearning_rate: 3e-4x\n")
    with pytest.raises(ValueError, match="learning_rate: expected a number, got '3e-4x'"):
        _config(["--config", str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "unreachable"])
def test_offline_a_hub_name_fails_at_once_naming_the_option(capsys, tmp_path, tiny_sd15_dir, monkeypatch, how):
    import time

    from rpo_fast import hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing downloaded before counts
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # restored after the test
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy",
                 "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:  # a port nothing listens on: the connection is refused, whatever the machine's own network
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
        hub._unreachable.cache_clear()
    data = tmp_path / "d"
    data.mkdir()
    (data / "pairs.jsonl").write_text("")
    out = ["--output-dir", str(tmp_path / "o"), "--no-progress"]
    start = time.perf_counter()
    err = _one_line_error(capsys, ["--pretrained-model", "someone/sd-model", "--data", str(data), *out],
                          "pretrained_model: 'someone/sd-model'", "local folder")
    assert ("HF_HUB_OFFLINE is set" if how == "HF_HUB_OFFLINE" else "cannot be reached") in err
    _one_line_error(capsys, ["--pretrained-model", str(tiny_sd15_dir), "--pretrained-vae", "someone/vae",
                             "--data", str(data), *out], "pretrained_vae: 'someone/vae'")
    _one_line_error(capsys, ["--pretrained-model", str(tiny_sd15_dir), "--data", "someone/pairs", *out],
                    "data: 'someone/pairs'", "local folder")
    assert time.perf_counter() - start < 5  # not the download libraries' retries (about 50 s)

    # a name the hub cache holds is read from there, offline (the libraries are told not to try)
    (tmp_path / "hub" / "models--someone--sd-model" / "snapshots" / "abc").mkdir(parents=True)
    hub.require_download("pretrained_model", "someone/sd-model", "", cached=hub.in_hub_cache("someone/sd-model"))
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_docs_list_every_option_in_its_resume_class():
    import re
    from pathlib import Path

    from rpo_fast.train.config import ON_RESUME, config_fields

    text = (Path(__file__).parent.parent / "docs" / "training.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| refused", "| applied", "| taken as given"))]
    documented = dict(zip(("refuse", "apply", "free"), (set(re.findall(r"`(\w+)`", row)) for row in rows)))
    for kind in ON_RESUME:
        assert documented[kind] == {f.name for f in config_fields() if f.metadata.get("on_resume", "refuse") == kind}
