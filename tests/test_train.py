"""rpo_fast.train on tiny SD1.5-like and SDXL-like models loaded from disk by the real code:
every method x full/LoRA, the reference forms, caches, bad input, export and reload."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rpo_fast.train import TrainConfig, train
from rpo_fast.train import loop as train_loop
from benchmarks.step import measure_throughput
from rpo_fast.train.batches import PairSchedule, assemble_batch, draw_sample
from rpo_fast.train.families import TimestepDraw
from rpo_fast.train.cli import add_arguments, config_from_args
from rpo_fast.train.latent_cache import LatentSpec, build_latent_cache
from rpo_fast.train.process import Process
from rpo_fast.train.models import load_models, module_identity
from train_utils import NUM_GOOD_ROWS, one_thread, synthetic_pickapic, tiny_config, unet_weights


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_pickapic(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def latent_root(tmp_path_factory):
    return tmp_path_factory.mktemp("latents")


@pytest.fixture(scope="module")
def run_training(tiny_sd15_dir, tiny_sdxl_dir, data_dir, latent_root, tmp_path_factory):
    """Trains each configuration once per module; tests share the results."""
    done = {}
    models = {"sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir}

    def run(model="sd15", **overrides):
        key = (model, tuple(sorted(overrides.items())))
        if key not in done:
            out = tmp_path_factory.mktemp(f"run-{model}")
            done[key] = train(tiny_config(models[model], data_dir, out, latent_root, **overrides))
        return done[key]

    return run


def _metrics_lines(result):
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


CASES = [("sd15", m, lora) for m in ("sft", "dpo", "rpo") for lora in (False, True)] + [
    ("sdxl", "rpo", True), ("sdxl", "dpo", False),
]


@pytest.mark.parametrize("model,method,lora", CASES)
def test_a_few_steps(run_training, tiny_sd15_dir, tiny_sdxl_dir, model, method, lora):
    result = run_training(model, method=method, lora=lora)
    assert result.steps == 2 and result.nonfinite_steps == 0
    assert result.skipped_pairs == 1  # the row with the corrupt image
    lines = _metrics_lines(result)
    assert [x["step"] for x in lines] == [1, 2]
    assert all(np.isfinite(x["loss"]) and x["grad_norm"] > 0 for x in lines)
    if method != "sft":
        # Step 1 starts from the pretrained weights: the policy equals the reference.
        assert lines[0]["model_mse"] == pytest.approx(lines[0]["ref_mse"], rel=1e-5)
        assert lines[0]["implicit_acc"] is not None
        if method == "dpo":
            assert lines[0]["loss"] == pytest.approx(np.log(2), rel=1e-4)
    # the trained weights were saved in diffusers format and differ from the pretrained ones
    pretrained = unet_weights((tiny_sd15_dir if model == "sd15" else tiny_sdxl_dir) / "unet")
    if lora:
        lora_file = result.output_dir / "pytorch_lora_weights.safetensors"
        assert lora_file.exists() and not (result.output_dir / "unet").exists()
        lora_weights = unet_weights(result.output_dir)
        assert lora_weights and all(k.startswith("unet.") for k in lora_weights)
        assert any(v.abs().sum() > 0 for k, v in lora_weights.items() if "lora_B" in k or "lora.up" in k)
    else:
        trained = unet_weights(result.output_dir / "unet")
        assert trained.keys() == pretrained.keys()
        assert any(not torch.equal(trained[k], pretrained[k]) for k in trained)
    assert result.checkpoints and result.checkpoints[-1].name == "checkpoint-2"


def _same_reference(live, pre):
    # Reference errors agree to fp32 rounding (another batch composition, another error
    # kernel) at every step. The loss multiplies error differences by beta = 2500: at step 1
    # (same weights) it agrees to ~1e-4; at step 2 the weights already differ by rounding.
    for a, b in zip(live, pre):
        assert a["ref_mse"] == pytest.approx(b["ref_mse"], rel=1e-6)
    assert live[0]["loss"] == pytest.approx(pre[0]["loss"], abs=2e-3)
    assert live[1]["loss"] == pytest.approx(pre[1]["loss"], rel=1e-2)


def test_precomputed_reference_equals_live_reference(run_training, tiny_sd15_dir):
    live = run_training(method="dpo", lora=False)
    pre = run_training(method="dpo", lora=False, precompute_ref=True)
    assert (pre.output_dir / "reference_errors.safetensors").exists()
    _same_reference(_metrics_lines(live), _metrics_lines(pre))
    w0 = unet_weights(tiny_sd15_dir / "unet")
    w_live, w_pre = unet_weights(live.output_dir / "unet"), unet_weights(pre.output_dir / "unet")
    update_live = torch.cat([(w_live[k] - w0[k]).flatten() for k in w0])
    update_pre = torch.cat([(w_pre[k] - w0[k]).flatten() for k in w0])
    # Adam turns rounding-level gradient differences of near-zero entries into lr-sized ones:
    # ~0.5% of the update norm here; a reference error given to the wrong row moves it by ~100%.
    assert (update_pre - update_live).norm() < 2e-2 * update_live.norm()

    lora_live = run_training(method="rpo", lora=True)
    lora_pre = run_training(method="rpo", lora=True, precompute_ref=True)
    _same_reference(_metrics_lines(lora_live), _metrics_lines(lora_pre))


def test_rpo_with_an_embedding_cache(run_training, data_dir, tmp_path):
    from rpo_fast.data import load_preference_dataset
    from rpo_fast.embedding import build_embedding_cache

    def mean_color(prompts, images):  # a stand-in embedder: mean RGB of the image, plus the prompt's length
        return torch.tensor([[*np.asarray(im, np.float32).mean((0, 1)), len(p)] for p, im in zip(prompts, images)])

    mean_color.identity = "mean-color-test"
    dataset = load_preference_dataset(data_dir)
    path = build_embedding_cache(dataset, mean_color, tmp_path / "emb.safetensors", progress=False)
    result = run_training(method="rpo", lora=True, embeddings=str(path), batch_pairs=4)
    uniform = run_training(method="rpo", lora=True, batch_pairs=4)
    diag = [x["weight_diag"] for x in _metrics_lines(result)]
    assert all(d != pytest.approx(1.0) for d in diag)  # not the uniform weights (1 each: --weight-norm mean)
    assert [x["weight_diag"] for x in _metrics_lines(uniform)] == [pytest.approx(1.0)] * 2


def test_export_reloads_into_pipelines_and_generates(run_training, tiny_sd15_dir, tiny_sdxl_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    def generate(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe("a picture of object 3", num_inference_steps=2, generator=g, output_type="np").images

    for model, pipeline_class in (("sd15", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)):
        folder = tiny_sd15_dir if model == "sd15" else tiny_sdxl_dir
        pipe = pipeline_class.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        base = generate(pipe)
        lora = run_training(model, method="rpo", lora=True, learning_rate=1e-2)
        pipe.load_lora_weights(lora.output_dir)
        tuned = generate(pipe)
        assert tuned.shape == base.shape and np.isfinite(tuned).all()
        assert not np.allclose(tuned, base, atol=1e-6)  # the adapter changed the output

    full = run_training("sd15", method="dpo", lora=False)
    unet = UNet2DConditionModel.from_pretrained(full.output_dir / "unet")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    image = generate(pipe)
    assert image.shape[0] == 1 and np.isfinite(image).all()


def test_nonfinite_loss_is_skipped_then_stops(run_training, tiny_sd15_dir, data_dir, latent_root, tmp_path, monkeypatch):
    real = train_loop.compute_loss
    calls = {"n": 0}

    def nan_on_second_call(run, batch):
        calls["n"] += 1
        loss, metrics = real(run, batch)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(train_loop, "compute_loss", nan_on_second_call)
    before = train_loop.prepare
    result = train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "a", latent_root, method="dpo", lora=True,
                               max_steps=3))
    assert result.steps == 3 and result.nonfinite_steps == 1
    assert train_loop.prepare is before

    def always_nan(run, batch):
        loss, metrics = real(run, batch)
        return loss * float("nan"), metrics

    monkeypatch.setattr(train_loop, "compute_loss", always_nan)
    with pytest.raises(RuntimeError, match="2 steps in a row had a non-finite loss"):
        train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "b", latent_root, method="dpo", lora=True,
                          max_steps=5, max_nonfinite_steps=2))


def test_a_nonfinite_step_is_skipped_on_the_device_and_counted_when_read(tiny_sd15_dir, data_dir, latent_root, tmp_path,
                                                                          monkeypatch):
    """Fused AdamW skips a non-finite step itself (found_inf): weights and optimizer state stay
    as they were, and the step is counted at the next reading step, not before."""
    run = train_loop.prepare(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "o", latent_root, method="dpo",
                                         max_steps=4, log_every=10))
    try:
        assert train_loop._skips_on_device(run)
        batches = train_loop.step_batches(run, 0, 4)
        unread = train_loop.train_step(run, batches, read=False)
        assert isinstance(unread["loss"], torch.Tensor) and run.unsettled  # nothing read yet
        weights = {n: p.detach().clone() for n, p in run.unet.named_parameters()}
        state = {k: v.clone() for k, v in run.optimizer.state[run.params[0]].items()}
        real = train_loop.compute_loss
        monkeypatch.setattr(train_loop, "compute_loss", lambda r, b: (lambda l, m: (l * float("nan"), m))(*real(r, b)))
        train_loop.train_step(run, batches, read=False)
        assert run.nonfinite_steps == 0  # not read yet
        for n, p in run.unet.named_parameters():
            assert torch.equal(p, weights[n]), n
        for k, v in run.optimizer.state[run.params[0]].items():
            assert torch.equal(v, state[k]), k
        monkeypatch.setattr(train_loop, "compute_loss", real)
        metrics = train_loop.train_step(run, batches, read=True)
        assert run.nonfinite_steps == 1 and run.nonfinite_in_a_row == 0 and not run.unsettled
        assert metrics["nonfinite_steps"] == 1 and isinstance(metrics["loss"], float)
        assert any(not torch.equal(p, weights[n]) for n, p in run.unet.named_parameters())  # the good step updated
    finally:
        run.close()


def test_nonfinite_steps_between_log_steps_stop_the_run_at_the_step_they_reached_the_limit(
        tiny_sd15_dir, data_dir, latent_root, tmp_path, monkeypatch):
    real = train_loop.compute_loss
    monkeypatch.setattr(train_loop, "compute_loss", lambda r, b: (lambda l, m: (l * float("nan"), m))(*real(r, b)))
    with pytest.raises(RuntimeError, match="stopped at step 2: 2 steps in a row had a non-finite loss"):
        train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "o", latent_root, method="dpo", max_steps=4,
                          log_every=10, max_nonfinite_steps=2))


def test_bad_input_is_a_clear_error_at_start(tiny_sd15_dir, data_dir, latent_root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b""], "label_0": [1.0]}), bad / "x.parquet")
    with pytest.raises(ValueError, match="missing column.*jpg_1"):
        train(tiny_config(tiny_sd15_dir, bad, tmp_path / "o", latent_root))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "o2", latent_root, batch_pairs=64))
    with pytest.raises(ValueError, match="model_index.json"):
        train(tiny_config(tmp_path, data_dir, tmp_path / "o3", latent_root))
    with pytest.raises(ValueError, match="resolution"):
        tiny_config(tiny_sd15_dir, data_dir, tmp_path, latent_root, resolution=30)
    with pytest.raises(ValueError, match="method"):
        tiny_config(tiny_sd15_dir, data_dir, tmp_path, latent_root, method="ppo")
    with pytest.raises(ValueError, match="precompute_ref"):
        tiny_config(tiny_sd15_dir, data_dir, tmp_path, latent_root, method="sft", precompute_ref=True)


def test_sft_weight_adds_the_sft_loss_of_the_preferred_images(tiny_sd15_dir, data_dir, latent_root, tmp_path):
    import dataclasses

    from rpo_fast import sft_loss

    run = train_loop.prepare(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "run", latent_root, method="rpo",
                                         lora=True))
    batch = next(train_loop.step_batches(run, 0, 1))
    with torch.no_grad():
        plain, metrics = train_loop.compute_loss(run, batch)
        run.config = dataclasses.replace(run.config, sft_weight=3.0)
        weighted, weighted_metrics = train_loop.compute_loss(run, batch)
    assert "sft_loss" not in metrics and float(weighted_metrics["sft_loss"]) > 0
    assert float(weighted) == pytest.approx(float(plain) + 3.0 * float(weighted_metrics["sft_loss"]), rel=1e-6)
    # the SFT loss is that of the preferred half, the same number sft_loss gives for this batch
    inputs = train_loop.unet_inputs(run.models, batch, run.device, run.config.resolution)
    with torch.no_grad():
        pred = train_loop.predict(run.forward_model, inputs)
    assert float(weighted_metrics["sft_loss"]) == pytest.approx(float(sft_loss(pred, inputs.target)), rel=1e-6)
    run.close()
    with pytest.raises(ValueError, match="sft_weight: only used by methods 'dpo' and 'rpo'"):
        tiny_config(tiny_sd15_dir, data_dir, tmp_path, latent_root, method="sft", sft_weight=1.0)
    with pytest.raises(ValueError, match="sft_weight"):
        tiny_config(tiny_sd15_dir, data_dir, tmp_path, latent_root, sft_weight=-1.0)


def test_resume_refuses_other_settings(run_training, tiny_sd15_dir, data_dir, latent_root):
    result = run_training(method="dpo", lora=True)
    with pytest.raises(ValueError, match="beta: checkpoint 2500.0 vs now 100.0"):
        train(tiny_config(tiny_sd15_dir, data_dir, result.output_dir, latent_root, method="dpo", lora=True,
                          beta=100.0, max_steps=3, resume="latest"))


class _Carried:
    """An object a foreign checkpoint could carry: unpickling it would call its code."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_resume_refuses_a_checkpoint_that_carries_objects(run_training, tiny_sd15_dir, data_dir, latent_root,
                                                          tmp_path):
    import shutil

    from rpo_fast.train.checkpoint import list_checkpoints

    done = run_training(method="dpo", lora=True)
    out = tmp_path / "copy"
    shutil.copytree(done.output_dir, out)
    checkpoint = list_checkpoints(out)[max(list_checkpoints(out))]
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)  # what a checkpoint holds: plain data
    state["note"] = _Carried()
    torch.save(state, checkpoint / "optimizer.pt")
    with pytest.raises(ValueError, match="optimizer.pt holds more than tensors and plain values"):
        train(tiny_config(tiny_sd15_dir, data_dir, out, latent_root, method="dpo", lora=True, max_steps=3,
                          resume="latest"))


def test_adafactor_trains_and_resumes_to_the_uninterrupted_weights(tiny_sd15_dir, data_dir, latent_root, tmp_path):
    # the official trainer's SDXL optimizer: its state goes into checkpoints and comes back exactly
    common = dict(method="rpo", lora=False, optimizer="adafactor", learning_rate=1e-3, checkpoint_every=2)
    straight = train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "straight", latent_root, max_steps=4, **common))
    first = train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "split", latent_root, max_steps=2, **common))
    resumed = train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "split", latent_root, max_steps=4,
                                resume="latest", **common))
    assert first.steps == 2 and resumed.steps == 4 and np.isfinite(straight.final_metrics["loss"])
    want, got = unet_weights(straight.output_dir / "unet"), unet_weights(resumed.output_dir / "unet")
    base = unet_weights(Path(tiny_sd15_dir) / "unet")
    assert any(not torch.equal(want[k], base[k]) for k in want)  # it trained
    assert all(torch.equal(want[k], got[k]) for k in want)  # and resumed bit for bit


def test_latent_cache_is_keyed_reused_and_resumable(tiny_sd15_dir, data_dir, tmp_path):
    from rpo_fast.data import load_preference_dataset

    dataset = load_preference_dataset(data_dir)
    models = load_models(TrainConfig(pretrained_model=str(tiny_sd15_dir), data=str(data_dir), output_dir=str(tmp_path)))
    ident = module_identity(models.vae)
    kwargs = dict(vae_identity=ident, process=Process(bars=False))
    at = lambda resolution: LatentSpec(resolution, shard_size=5)  # noqa: E731
    cache = build_latent_cache(dataset, models.vae, tmp_path, at(32), **kwargs)
    assert cache.num_rows == len(dataset) == NUM_GOOD_ROWS + 1 and cache.num_shards == 4
    assert cache.valid.sum() == NUM_GOOD_ROWS and not cache.valid[-1]
    mean_w, std_w, mean_l, std_l = cache.get(3)
    assert mean_w.shape == (4, 16, 16) and mean_w.dtype == torch.float16
    assert (std_w > 0).all() and not torch.equal(mean_w, mean_l)
    # reused: a complete cache opens without a VAE
    assert build_latent_cache(dataset, None, tmp_path, at(32), **kwargs).folder == cache.folder
    # resumable: a lost shard is re-encoded, the others are kept as they are
    kept = (cache.folder / "shard-00000.safetensors").stat().st_mtime_ns
    (cache.folder / "shard-00002.safetensors").unlink()
    again = build_latent_cache(dataset, models.vae, tmp_path, at(32), **kwargs)
    assert (again.folder / "shard-00000.safetensors").stat().st_mtime_ns == kept
    torch.testing.assert_close(again.get(11)[0], cache.get(11)[0])
    # keyed: another resolution or another VAE is another folder
    assert build_latent_cache(dataset, models.vae, tmp_path, at(16), **kwargs).folder != cache.folder
    kwargs["vae_identity"] = "another-vae"
    with pytest.raises(ValueError, match="incomplete"):
        build_latent_cache(dataset, None, tmp_path, at(32), **kwargs)


def test_batches_are_pure_functions_of_seed_epoch_row(tiny_sd15_dir, data_dir, tmp_path):
    T = TimestepDraw(1000)  # DDPM's: randint(0, 1000) from the row's generator
    schedule = PairSchedule(np.arange(10), batch_pairs=2, world=2, seed=3)
    assert schedule.micro_batches_per_epoch == 2  # 10 rows, global batch 4: last 2 rows dropped
    epoch0 = np.concatenate([schedule.global_rows(u)[1] for u in range(2)])
    assert len(set(epoch0.tolist())) == 4 * 2
    assert schedule.global_rows(2)[0] == 1 and not np.array_equal(schedule.permutation(0), schedule.permutation(1))
    _, r0 = schedule.local_rows(1, 0)
    _, r1 = schedule.local_rows(1, 1)
    np.testing.assert_array_equal(np.concatenate([r0, r1]), schedule.global_rows(1)[1])

    a, b = draw_sample(0, 1, 5, (4, 2, 2), T), draw_sample(0, 1, 5, (4, 2, 2), T)
    assert a.timestep == b.timestep and torch.equal(a.noise, b.noise)
    assert not torch.equal(a.noise, draw_sample(0, 2, 5, (4, 2, 2), T).noise)

    class FakeCache:
        latent_shape = (4, 2, 2)
        has_flips = True

        def get(self, row, flip=False):  # the flipped encodings stand 100 apart
            base = torch.full((4, 2, 2), float(row) + 100 * flip, dtype=torch.float16)
            return base, torch.full_like(base, 0.5), -base, torch.full_like(base, 2.0)

    batch = assemble_batch(1, np.array([4, 7, 1]), FakeCache(), lambda epoch, r: f"p{r}", 0, T)
    assert batch.latents.shape == (6, 4, 2, 2) and batch.prompts == ["p4", "p7", "p1"]
    assert torch.equal(batch.noise[:3], batch.noise[3:])  # one noise per pair
    assert torch.equal(batch.timesteps[:3], batch.timesteps[3:])  # one timestep per pair
    for i, row in enumerate([4, 7, 1]):  # the same draws as draw_sample
        d = draw_sample(0, 1, row, (4, 2, 2), T)
        assert int(batch.timesteps[i]) == d.timestep and torch.equal(batch.noise[i], d.noise)
        shift = 100 * d.flip  # both images of a pair flipped together, as drawn
        torch.testing.assert_close(batch.latents[i], row + shift + 0.5 * d.eps_w)
        torch.testing.assert_close(batch.latents[3 + i], -(row + shift) + 2.0 * d.eps_l)
    flips = [draw_sample(0, e, r, (1,), T).flip for e in range(4) for r in range(16)]
    assert 16 < sum(flips) < 48  # about half, redrawn each epoch


def test_cli_documents_every_option_and_merges_yaml(tmp_path):
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = parser.format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text
    for alias in ("--train_batch_size", "--max_train_steps", "--pretrained_model_name_or_path", "--resume_from_checkpoint"):
        assert alias in text
    (tmp_path / "c.yaml").write_text("pretrained_model: m\ndata: d\noutput_dir: o\nmethod: dpo\nbeta: 100\nlora: true\n")
    config = config_from_args(parser.parse_args(["--config", str(tmp_path / "c.yaml"), "--beta", "50",
                                                 "--train_batch_size", "3", "--no-lora", "--lora-alpha", "none"]))
    assert (config.method, config.beta, config.batch_pairs, config.lora, config.lora_alpha) == ("dpo", 50.0, 3, False, None)
    (tmp_path / "bad.yaml").write_text("pretrained_model: m\ndata: d\noutput_dir: o\nbetta: 1\n")
    with pytest.raises(ValueError, match="unknown option.*betta"):
        config_from_args(parser.parse_args(["--config", str(tmp_path / "bad.yaml")]))
    with pytest.raises(ValueError, match="missing required option.*output_dir"):
        config_from_args(parser.parse_args(["--pretrained-model", "m", "--data", "d"]))


def test_speed_and_memory_options(run_training, tiny_sd15_dir, data_dir, latent_root, tmp_path_factory):
    # bf16 autocast with gradient checkpointing (CPU autocast here; CUDA in real runs)
    result = run_training(method="rpo", lora=True, mixed_precision="bf16", gradient_checkpointing=True)
    lines = _metrics_lines(result)
    assert all(np.isfinite(x["loss"]) for x in lines) and lines[-1]["model_mse"] != lines[-1]["ref_mse"]
    # DataLoader workers build the same batches (they are pure functions of seed, epoch, row)
    with_workers = run_training(method="rpo", lora=False, dataloader_num_workers=1)
    for a, b in zip(_metrics_lines(with_workers), _metrics_lines(run_training(method="rpo", lora=False))):
        assert a["loss"] == b["loss"] and a["model_mse"] == b["model_mse"]
    # a v-prediction model: the target is the velocity
    from benchmarks.tiny_models import build_tiny_sd15

    v_model = build_tiny_sd15(tmp_path_factory.mktemp("tiny-sd15-v"), prediction_type="v_prediction")
    v_run = train(tiny_config(v_model, data_dir, tmp_path_factory.mktemp("v-run"), latent_root, method="dpo", lora=True))
    assert v_run.steps == 2 and np.isfinite(v_run.final_metrics["loss"])
    # the benchmark entry point
    speed = measure_throughput(
        tiny_config(tiny_sd15_dir, data_dir, tmp_path_factory.mktemp("speed"), latent_root, method="rpo", lora=True),
        num_steps=2, warmup_steps=1)
    assert speed["pairs_per_s"] > 0 and speed["seconds_per_step"] > 0
    # the trainer's own phase marks, per step: each phase timed, together no more than the step
    for phase in ("batch assembly", "reference UNet forward", "policy UNet forward", "loss forward",
                  "gradient clipping", "optimizer"):
        assert speed["phase_ms"][phase] > 0, (phase, speed["phase_ms"])
    assert sum(speed["phase_ms"].values()) <= 1e3 * speed["seconds_per_step"]


@pytest.mark.slow
def test_compiled_unet_trains(run_training):
    result = run_training(method="rpo", lora=True, compile=True)
    eager = run_training(method="rpo", lora=True)
    for a, b in zip(_metrics_lines(result), _metrics_lines(eager)):
        # errors, not the loss: beta = 2500 magnifies fused-kernel rounding in the loss
        assert a["model_mse"] == pytest.approx(b["model_mse"], rel=1e-3)
        assert a["ref_mse"] == pytest.approx(b["ref_mse"], rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("lora,precompute_ref", [(True, False), (False, False), (False, True)])
def test_cuda_training_compiled_bf16(tiny_sd15_dir, data_dir, latent_root, tmp_path, lora, precompute_ref):
    # The CUDA path: compile on by default, bf16 autocast, bf16 frozen models / reference copy,
    # fused AdamW, LoRA base weights in bf16 with fp32 adapters.
    config = tiny_config(tiny_sd15_dir, data_dir, tmp_path / "run", latent_root, method="rpo", lora=lora,
                         precompute_ref=precompute_ref, compile=None, device="cuda", mixed_precision="bf16",
                         max_steps=3)
    result = train(config)
    lines = _metrics_lines(result)
    assert result.steps == 3 and all(np.isfinite(x["loss"]) for x in lines)
    assert lines[0]["model_mse"] == pytest.approx(lines[0]["ref_mse"], rel=2e-2)
    speed = measure_throughput(config, num_steps=2, warmup_steps=1)
    assert speed["pairs_per_s"] > 0 and speed["peak_memory_gib"] > 0


def test_epochs_sampled_rows_and_random_crops(run_training):
    # one pass over 12 rows drawn at random (maybe the corrupt one among them), random crops
    result = run_training(method="dpo", lora=True, max_steps=None, num_train_epochs=1, max_train_samples=12,
                          random_crop=True)
    readable = 12 - result.skipped_pairs
    assert result.skipped_pairs in (0, 1) and result.steps == readable // 2
    lines = _metrics_lines(result)
    assert [x["step"] for x in lines] == list(range(1, result.steps + 1)) and all(x["epoch"] == 0 for x in lines)


# ----------------------------------------------------------------- the text-embedding cache


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_text_cache_gives_the_encoders_embeddings_and_resumes(tiny_sd15_dir, tiny_sdxl_dir, tmp_path, model):
    from rpo_fast.train import text_cache as tc
    from rpo_fast.train.models import prompt_embeddings

    folder = {"sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir}[model]
    models = load_models(TrainConfig(pretrained_model=str(folder), data=".", output_dir=str(tmp_path)))
    prompts = [f"prompt {i % 300}" for i in range(700)]  # 300 distinct + "": two shards of 256, a partial third
    build = lambda: tc.build_text_cache(models, prompts, tmp_path, "data-fp",  # noqa: E731
                                        process=Process(bars=False), batch_size=64)
    cache = build()
    assert sorted(p.name for p in cache.folder.glob("shard-*")) == [f"shard-0000{i}.safetensors" for i in range(2)]
    asked = ["prompt 299", "", "prompt 7", "prompt 7"]
    want = prompt_embeddings(models, asked, 64, torch.device("cpu"))  # no cache yet: encoded now
    models.text_cache = cache
    got = prompt_embeddings(models, asked, 64, torch.device("cpu"))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)  # batches of 64 vs 4: rounding only
    assert (got[1] is None) == (model == "sd15")
    if got[1] is not None:
        torch.testing.assert_close(got[1]["text_embeds"], want[1]["text_embeds"], rtol=1e-5, atol=1e-6)
        assert torch.equal(got[1]["time_ids"], want[1]["time_ids"])
    with pytest.raises(RuntimeError, match="no embedding for prompt 'not in the data'"):
        cache.lookup(["not in the data"], torch.device("cpu"))
    # resumable: a lost shard is encoded again, the other kept as it is
    models.text_cache = None
    kept = (cache.folder / "shard-00000.safetensors").stat().st_mtime_ns
    (cache.folder / "shard-00001.safetensors").unlink()
    again = build()
    assert again.folder == cache.folder and (cache.folder / "shard-00000.safetensors").stat().st_mtime_ns == kept
    # keyed by the encoders: other weights, another folder
    with torch.no_grad():
        next(models.text_encoders[0].parameters()).add_(1.0)
    assert build().folder != cache.folder


def test_text_cache_run_frees_the_encoders_and_trains_as_without(tiny_sd15_dir, data_dir, latent_root, tmp_path,
                                                                  monkeypatch):
    seen = []
    original = train_loop.prepare

    def spy(config, **kwargs):
        run = original(config, **kwargs)
        seen.append((run.models.text_cache is not None, len(run.models.text_encoders)))
        return run

    monkeypatch.setattr(train_loop, "prepare", spy)
    kwargs = dict(method="rpo", max_steps=3)
    cached = train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "cached", latent_root, **kwargs))
    live = train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "live", latent_root, text_cache=False, **kwargs))
    assert seen == [(True, 0), (False, 1)]
    w_cached, w_live = unet_weights(cached.output_dir / "unet"), unet_weights(live.output_dir / "unet")
    w0 = unet_weights(tiny_sd15_dir / "unet")
    update = torch.cat([(w_live[k] - w0[k]).flatten() for k in w0])
    diff = torch.cat([(w_cached[k] - w_live[k]).flatten() for k in w0])
    assert diff.norm() < 2e-2 * update.norm()  # Adam magnifies rounding of near-zero gradients, as above


def test_proportion_empty_prompts_is_drawn_per_seed_epoch_row():
    from rpo_fast.train.batches import PromptTable

    table = PromptTable([f"p{r}" for r in range(2000)], seed=3, empty_rate=0.25)
    epoch0 = [table(0, r) for r in range(2000)]
    assert 0.21 < epoch0.count("") / 2000 < 0.29
    assert epoch0 == [table(0, r) for r in range(2000)]  # a pure function: resume sees the same prompts
    assert epoch0 != [table(1, r) for r in range(2000)]  # redrawn each epoch
    assert all(p in ("", f"p{r}") for r, p in enumerate(epoch0))
    assert [PromptTable(table.prompts, 3)(0, r) for r in range(5)] == table.prompts[:5]  # rate 0: never
    with pytest.raises(ValueError, match=r"proportion_empty_prompts: expected a fraction in \[0, 1\], got 1.5"):
        TrainConfig(pretrained_model="m", data="d", output_dir="o", proportion_empty_prompts=1.5)


def test_the_same_command_trains_the_same_model_on_a_cold_or_a_warm_cache(tiny_sd15_dir, data_dir, tmp_path):
    # The first run fills the latent and text caches (a DataLoader draws its seed from the global
    # generator), the second reads them: the adapters' initial weights must not depend on it.
    from safetensors.torch import load_file

    latents = tmp_path / "fresh-cache"
    weights = []
    for name in ("cold", "warm"):
        train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / name, latents, method="dpo", lora=True, max_steps=2))
        weights.append(load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors")))
    cold, warm = weights
    assert cold.keys() == warm.keys()
    assert all(torch.equal(cold[k], warm[k]) for k in cold), [k for k in cold if not torch.equal(cold[k], warm[k])]


def test_the_start_says_what_the_defaults_do(tiny_sd15_dir, data_dir, latent_root, tmp_path, capsys):
    # rpo without --embeddings: uniform weights, and their strength on dpo's scale (beta itself
    # with --weight-norm mean, beta/M with row); no --resolution: the model's own size (the
    # tiny UNet's 8 latents x the VAE's 2 = 16 px)
    config = tiny_config(tiny_sd15_dir, data_dir, tmp_path / "a", latent_root, method="rpo", resolution=None,
                         batch_pairs=4, max_steps=1)
    result = train(config)
    out = capsys.readouterr().out
    assert "resolution 16 px (the model's native size)" in out, out
    assert "uniform weights (no --embeddings; --weight-norm mean, M = 4 pairs a contrast)" in out, out
    assert "= 2500 (dpo at beta 2500 has that per-pair strength)" in out, out
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["effective_beta"] == 2500.0  # logged every step, as the loss reports it
    train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "r", latent_root, method="rpo", weight_norm="row",
                      batch_pairs=4, max_steps=1))
    assert "= 625 (dpo at beta 625 has that per-pair strength)" in capsys.readouterr().out
    assert "data " + str(data_dir) + ": 16 pairs used; 1 unreadable" in out, out
    assert f"caches: latents {latent_root}" in out and "prompts " in out, out
    assert f"output {result.output_dir}" in out and f"model {tiny_sd15_dir} (sd15), training the whole UNet" in out

    train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "b", latent_root, method="dpo", max_steps=1))
    out = capsys.readouterr().out
    assert "warning: resolution 32 px, but the model generates at 16 px" in out, out
    assert "objective dpo, beta 2500" in out, out


def test_auto_on_a_probed_device_measures_the_backends_and_records_its_choice(run_training, tiny_sd15_dir, data_dir,
                                                                               latent_root, tmp_path, monkeypatch,
                                                                               capsys):
    """The path --backend auto takes on CUDA, run on the CPU: every backend that runs there is
    probed and timed once at the run's shapes; the fastest right one trains, and the choice and
    the timings are kept in the run's folder. Without it (the CPU default) nothing is measured."""
    from rpo_fast import verify

    assert not (run_training(method="rpo", lora=True).output_dir / "loss_backend.json").exists()
    monkeypatch.setattr(verify, "DEVICE_TYPES", {"cpu", "cuda"})
    verify.reset()
    result = train(tiny_config(tiny_sd15_dir, data_dir, tmp_path / "run", latent_root, method="rpo", lora=True))
    record = json.loads((result.output_dir / "loss_backend.json").read_text())
    measured = {m["backend"]: m for m in record["measurements"]}
    assert set(measured) >= {"torch", "cpu"} and all(m["correct"] and m["ms"] > 0 for m in measured.values())
    assert record["chosen"] == min(measured.values(), key=lambda m: m["ms"])["backend"]
    assert record["method"] == "rpo" and record["dtype"] == "float32" and len(record["shape"]) == 3
    assert f"rpo-fast train: loss backend {record['chosen']} (--backend auto, measured on" in capsys.readouterr().out
    if record["chosen"] != "torch":  # the loss ran the chosen backend, probed on first use
        assert [c.backend for c in verify._DECIDED] == [record["chosen"]]
    verify.reset()
