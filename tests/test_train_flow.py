"""SD3 / SD3.5 and FLUX.1 in ``rpo-fast train`` (train/families.py), on tiny pipelines built
locally: every method, LoRA and full; the flow-matching objective as diffusers' scripts define
it; prompt encodings (and so the text cache) equal to the pipelines' own ``encode_prompt``;
Flux's packed forward equal to the pipeline's packing; a precomputed reference equal to a
frozen one; a resumed run equal to an uninterrupted one; outputs the pipelines load."""

from __future__ import annotations

import json

import pytest
import torch

from rpo_fast.train import train
from rpo_fast.train.families import Flux, StableDiffusion3, TimestepDraw, loss_weighting
from train_utils import one_thread, synthetic_pickapic, tiny_config, unet_weights

pytest.importorskip("diffusers")
FAMILIES = ["sd3", "flux"]


@pytest.fixture(scope="module")
def model_dirs(tiny_sd3_dir, tiny_flux_dir):
    return {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}


@pytest.fixture(scope="module")
def flow_runs(model_dirs, tmp_path_factory):
    """Each configuration trained once per module (4 steps of 2 pairs, 32 px)."""
    root = tmp_path_factory.mktemp("flow")
    data, latents, done = synthetic_pickapic(root / "data"), root / "latents", {}

    def run(family, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in done:
            values = dict(max_steps=4, **overrides)
            with one_thread():
                done[key] = train(tiny_config(model_dirs[family], data, tmp_path_factory.mktemp(family), latents,
                                              **values))
        return done[key]

    run.data, run.latents = data, latents
    return run


def _lines(result):
    return [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,lora", [("rpo", True), ("dpo", False), ("sft", True), ("rpo", False)])
def test_a_few_steps(flow_runs, family, method, lora):
    result = flow_runs(family, method=method, lora=lora)
    lines = _lines(result)
    assert result.steps == 4 and result.nonfinite_steps == 0 and len(lines) == 4
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in lines)
    if method != "sft":  # at step 1 the policy is the reference: the DPO / RPO logit is 0
        assert lines[0]["loss"] == pytest.approx(0.6931, abs=2e-3)
        assert lines[0]["model_mse"] == pytest.approx(lines[0]["ref_mse"], rel=1e-5)
    out = result.output_dir
    assert (out / "pytorch_lora_weights.safetensors").exists() if lora else (out / "transformer").is_dir()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_outputs_load_into_the_pipeline(flow_runs, model_dirs, family):
    import diffusers

    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    lora = flow_runs(family, method="rpo", lora=True).output_dir
    pipe = cls.from_pretrained(model_dirs[family])
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(lora)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights under their own names
    after = pipe.transformer.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    targets = (StableDiffusion3 if family == "sd3" else Flux).lora_targets
    assert changed and all(k.rsplit(".", 1)[0].endswith(targets) for k in changed)  # only what LoRA targets
    full = flow_runs(family, method="dpo", lora=False).output_dir / "transformer"
    trained = unet_weights(full)
    loaded = getattr(diffusers, type(pipe.transformer).__name__).from_pretrained(full).state_dict()
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_encodings_are_the_pipelines(model_dirs, family):
    """What the text cache stores is what the pipeline's own encode_prompt gives (T5 included)."""
    import diffusers
    from rpo_fast.train.models import encode_prompts, load_models

    config = tiny_config(model_dirs[family], model_dirs[family], model_dirs[family] / "unused", model_dirs[family])
    models = load_models(config)
    prompts = ["a red circle", "a large blue square on the left, studio photo"]
    hidden, pooled = encode_prompts(models, prompts, torch.device("cpu"))
    if family == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(model_dirs[family])
        want, _, want_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=32)
    else:
        pipe = diffusers.FluxPipeline.from_pretrained(model_dirs[family])
        want, want_pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=32)
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)  # batch and thread rounding only
    torch.testing.assert_close(pooled, want_pooled, rtol=1e-5, atol=1e-5)


def test_flux_forward_packs_as_the_pipeline(model_dirs):
    """Flux.predict packs 2x2 patches, builds the position ids and unpacks as FluxPipeline's
    _pack_latents / _prepare_latent_image_ids / _unpack_latents do."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from rpo_fast.train.forward import UNetInputs

    model = FluxTransformer2DModel.from_pretrained(model_dirs["flux"], subfolder="transformer")
    family = Flux(guidance_scale=3.5)
    family.guidance = True
    g = torch.Generator().manual_seed(0)
    noisy, hidden, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 16, generator=g)
    t = torch.tensor([700.0, 100.0])
    x = UNetInputs(noisy, t, hidden, {"pooled_projections": pooled}, torch.zeros_like(noisy), family)
    with torch.no_grad():
        ours = family.predict(model, x)
        packed = FluxPipeline._pack_latents(noisy, 2, 16, 8, 8)
        ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, noisy.device, noisy.dtype)
        out = model(hidden_states=packed, timestep=t / 1000, guidance=torch.full((2,), 3.5), pooled_projections=pooled,
                    encoder_hidden_states=hidden, txt_ids=torch.zeros(5, 3), img_ids=ids, return_dict=False)[0]
        # the pipeline unpacks at pixel size with its VAE factor: 8 latent px = 16 image px at factor 2
        want = FluxPipeline._unpack_latents(out, 16, 16, 2)
    torch.testing.assert_close(ours, want, rtol=0, atol=0)


def test_flow_matching_inputs_targets_and_weights():
    """x_t = (1 - sigma) x0 + sigma eps, target eps - x0, at the scheduler's sigmas[index] and
    timesteps[index]; the mode and logit-normal densities draw indices as diffusers'
    compute_density_for_timestep_sampling; sigma_sqrt weighs sigma^-2 into the errors."""
    from types import SimpleNamespace

    from diffusers import FlowMatchEulerDiscreteScheduler

    from rpo_fast.train.forward import per_sample_mse

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    models = SimpleNamespace(noise_scheduler=scheduler, weighting_scheme="sigma_sqrt")
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    idx = torch.tensor([0, 500, 999])
    noisy, timesteps, target, weight = StableDiffusion3().noisy_and_target(models, x0, eps, idx)
    sigma = scheduler.sigmas[idx].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(target, eps - x0)
    torch.testing.assert_close(timesteps, scheduler.timesteps[idx])
    torch.testing.assert_close(weight, scheduler.sigmas[idx].float() ** -2)
    assert loss_weighting("logit_normal", sigma.flatten()) is None
    # the weight enters the errors through sqrt(w) on prediction and target alike
    pred = torch.randn(3, 4, 2, 2)
    scale = weight.sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(per_sample_mse(pred * scale, target * scale), weight * per_sample_mse(pred, target))

    from diffusers.training_utils import compute_density_for_timestep_sampling

    for scheme, kwargs in (("logit_normal", dict(logit_mean=0.3, logit_std=1.2)), ("mode", dict(mode_scale=1.29))):
        draw = TimestepDraw(1000, scheme, **kwargs)
        ours = [draw(torch.Generator().manual_seed(s)) for s in range(5)]
        torch.manual_seed(0)
        theirs = []
        for s in range(5):  # the same density, fed the same generator stream
            g = torch.Generator().manual_seed(s)
            if scheme == "logit_normal":
                u = torch.sigmoid(torch.empty(1).normal_(0.3, 1.2, generator=g))
            else:
                u = torch.rand(1, generator=g)
                u = 1 - u - 1.29 * (torch.cos(torch.pi * u / 2) ** 2 - 1 + u)
            theirs.append(int(u.item() * 1000))
        assert ours == theirs
        # and the distribution is diffusers': the same mean index over many draws, within noise
        many = torch.tensor([draw(torch.Generator().manual_seed(s)) for s in range(2000)], dtype=torch.float64)
        ref = compute_density_for_timestep_sampling(scheme, 20000, **kwargs) * 1000
        assert abs(many.mean() - ref.double().mean()) < 20


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_reference_equals_frozen_reference(flow_runs, family):
    live = _lines(flow_runs(family, method="dpo", lora=False))
    pre = _lines(flow_runs(family, method="dpo", lora=False, precompute_ref=True))
    for a, b in zip(live, pre):
        assert a["ref_mse"] == pytest.approx(b["ref_mse"], rel=1e-6)
    assert live[0]["loss"] == pytest.approx(pre[0]["loss"], abs=2e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_gives_the_uninterrupted_weights(flow_runs, model_dirs, family, tmp_path):
    """4 steps straight, against 2 steps, then --resume latest to 4: the same weights, bit for bit."""
    straight = flow_runs(family, method="rpo", lora=False, checkpoint_every=2)
    settings = dict(method="rpo", lora=False, checkpoint_every=2)
    out = tmp_path / "resumed"
    with one_thread():
        train(tiny_config(model_dirs[family], flow_runs.data, out, flow_runs.latents, max_steps=2, **settings))
        resumed = train(tiny_config(model_dirs[family], flow_runs.data, out, flow_runs.latents, max_steps=4,
                                    resume="latest", **settings))
    assert resumed.steps == 4
    want, got = unet_weights(straight.output_dir / "transformer"), unet_weights(out / "transformer")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_command_line_trains_and_resumes(flow_runs, model_dirs, family, tmp_path):
    """As a user runs it: ``rpo-fast train`` on the pipeline folder, then ``--resume latest``
    for more steps; the start-up names the family and the transformer."""
    import os

    from cli_utils import run_cli

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    words = ["train", "--pretrained-model", str(model_dirs[family]), "--data", str(flow_runs.data),
             "--output-dir", str(tmp_path / "run"), "--latent-cache", str(flow_runs.latents), "--resolution", "32",
             "--batch-pairs", "2", "--method", "rpo", "--lora", "--no-compile", "--no-progress", "--checkpoint-every", "1",
             "--weighting-scheme", "mode"]
    first = run_cli([*words, "--max-steps", "2"], env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"({family}), training LoRA rank 8 on attn." in first.stdout, first.stdout
    again = run_cli([*words, "--max-steps", "3", "--resume", "latest"], env)
    assert again.returncode == 0, again.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3 and all(x["step"] <= 3 for x in lines)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lora", [True, False])
def test_eval_generates_base_and_tuned_from_the_same_seeds(flow_runs, model_dirs, family, lora, tmp_path):
    """``rpo-fast eval`` on the family's pipeline with a trained output (LoRA weights or
    transformer/): base images as the pipeline draws them from the seed rule, tuned images from
    the same seeds through the tuned model (identical weights would give identical images)."""
    import os

    import numpy as np
    from PIL import Image

    from cli_utils import run_cli

    trained = flow_runs(family, method="rpo" if lora else "dpo", lora=lora).output_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na large blue square on the left\n")
    out = tmp_path / "eval"
    done = run_cli(["eval", "--base", str(model_dirs[family]), "--tuned", str(trained), "--prompts", str(prompts),
                    "--output-dir", str(out), "--images-per-prompt", "2", "--num-inference-steps", "2", "--height", "32",
                    "--width", "32", "--no-clip", "--no-progress"], {**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "eval_manifest.json").read_text())
    assert manifest["tuned_kind"] == ("lora" if lora else "transformer")
    base = sorted((out / "images" / "base").glob("*.png"))
    tuned = sorted((out / "images" / "tuned").glob("*.png"))
    assert len(base) == len(tuned) == 4 and (out / "grid.png").exists()
    pixels = lambda p: np.asarray(Image.open(p), dtype=np.int16)  # noqa: E731
    assert any(np.abs(pixels(a) - pixels(b)).max() > 0 for a, b in zip(base, tuned))
    import diffusers

    pipe = getattr(diffusers, "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline").from_pretrained(
        model_dirs[family])
    again = pipe(prompt=["a large blue square on the left"], num_inference_steps=2, height=32, width=32,
                 guidance_scale=7.5, generator=torch.Generator().manual_seed(101 + 1), output_type="np").images[0]
    got = pixels(out / "images" / "base" / "0001_1.png")
    assert np.abs(np.round(again * 255).astype(np.int16) - got).max() <= 2  # the seed rule; batch rounding only


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_recomputes_the_blocks_and_changes_nothing(flow_runs, model_dirs, family, tmp_path):
    """--gradient-checkpointing: each transformer block runs again in the backward, and a
    step's gradients are those of the run without it."""
    from rpo_fast.train import loop

    grads, calls = {}, {}
    for checkpointing in (False, True):
        config = tiny_config(model_dirs[family], flow_runs.data, tmp_path / str(checkpointing), flow_runs.latents,
                             method="dpo", lora=False, gradient_checkpointing=checkpointing)
        count = [0]
        with one_thread():
            run = loop.prepare(config)
            block = run.unet.transformer_blocks[0]  # a pre-hook: the recompute stops once it has what the backward needs
            block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
            loss, _ = loop.compute_loss(run, next(loop.step_batches(run, 0, 1)))
            loss.backward()
        calls[checkpointing] = count[0]
        grads[checkpointing] = {n: p.grad.clone() for n, p in run.unet.named_parameters() if p.grad is not None}
        del run
    assert calls == {False: 1, True: 2}
    assert grads[False].keys() == grads[True].keys() and len(grads[False]) > 10
    for name, want in grads[False].items():
        torch.testing.assert_close(grads[True][name], want, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_text_cache_frees_the_encoders_and_gives_the_live_encodings_errors(flow_runs, model_dirs, family, tmp_path):
    """With the text cache (the default) the encoders, T5 included, and the VAE are gone before
    training; without it they stay and encode every step, to the same prediction errors."""
    from rpo_fast.train import loop

    seen, losses = [], []
    for text_cache in (True, False):
        config = tiny_config(model_dirs[family], flow_runs.data, tmp_path / str(text_cache), flow_runs.latents,
                             method="rpo", lora=True, text_cache=text_cache)
        with one_thread():
            run = loop.prepare(config)
            seen.append((run.models.text_cache is not None, len(run.models.text_encoders), run.models.vae is None))
            with torch.no_grad():
                metrics = loop.compute_loss(run, next(loop.step_batches(run, 0, 1)))[1]
                losses.append(torch.as_tensor(metrics["model_mse"]))  # the loss is log 2 at the start, whatever the prompts
        del run
    assert seen == [(True, 0, True), (False, {"sd3": 3, "flux": 2}[family], True)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
