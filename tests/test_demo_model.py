"""The demo's model, data, statistics and commands (short runs; the real run is `make demo`)."""

import argparse
import json

import numpy as np
import pytest
import torch

from rpo_fast.data import load_preference_dataset
from rpo_fast.demo import base_model, datasets, shapes
from rpo_fast.evaluation import shapes_score
from rpo_fast.evaluation import stats


def test_identity_vae_is_the_identity_through_encode_and_decode():
    vae = base_model.identity_vae()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    x[0] *= 3  # sampling can leave [-1, 1]
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        assert (posterior.mean - x).abs().max() < 1e-4
        assert posterior.std.max() < 1e-6
        assert (vae.decode(posterior.sample()).sample - x).abs().max() < 1e-4
    assert vae.config.scaling_factor == 1.0 and vae.config.latent_channels == 3


def test_t_quantiles_and_intervals():
    for df, expected in ((1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423)):
        assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)
    mean, half = stats.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(4.3027 * 0 + 3.1824 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-4)
    assert np.isnan(stats.mean_ci([1.0])[1])
    with pytest.raises(ValueError, match="df"):
        stats.t_quantile(0.9, 0)


def test_style_data_prefers_the_sketch_and_is_deterministic(tmp_path):
    a = datasets.write_style_data(tmp_path / "a", per_scene=1, seed=5)
    b = datasets.write_style_data(tmp_path / "b", per_scene=1, seed=5)
    assert (a / datasets.DATA_FILE).read_bytes() == (b / datasets.DATA_FILE).read_bytes()
    data = load_preference_dataset(str(a))
    assert len(data) == len(shapes.split_scenes()["train"])
    pairs = [data.get_pair(i) for i in range(0, len(data), 3)]
    chosen = shapes_score.score_images([p.chosen for p in pairs], [p.prompt for p in pairs])
    rejected = shapes_score.score_images([p.rejected for p in pairs], [p.prompt for p in pairs])
    assert chosen["style"].mean() >= 0.95 and chosen["filled"].max() == 0.0
    assert rejected["filled"].mean() == 1.0 and rejected["style"].max() == 0.0
    import pyarrow.parquet as pq

    labels = set(pq.read_table(a / datasets.DATA_FILE, columns=["label_0"]).column("label_0").to_pylist())
    assert labels == {0.0, 1.0}  # both orders occur: the loader's label handling is exercised
    with pytest.raises(ValueError, match="split"):
        datasets.write_style_data(tmp_path / "c", split="holdout")


def test_pretrain_data_draws_both_styles_under_the_same_captions_and_has_unconditional_rows(tmp_path):
    folder = datasets.write_pretrain_data(tmp_path / "p", per_scene=2, uncond_fraction=0.2, sketch_fraction=0.3)
    data = load_preference_dataset(str(folder))
    prompts = [data.prompt(i) for i in range(len(data))]
    train_captions = {s.caption for s in shapes.split_scenes()["train"]}
    assert set(prompts) - {""} == train_captions  # no caption names the style
    assert 0.1 < prompts.count("") / len(prompts) < 0.3
    rows = [i for i, p in enumerate(prompts) if p]
    drawn = shapes_score.score_images([data.get_pair(i).chosen for i in rows], [prompts[i] for i in rows])
    assert drawn["outline"].sum() + drawn["filled"].sum() >= 0.97 * len(rows)
    assert 0.22 < drawn["outline"].mean() < 0.38  # 0.3 of the renderings are sketches
    with pytest.raises(ValueError, match="sketch_fraction"):
        datasets.write_pretrain_data(tmp_path / "q", sketch_fraction=1.5)


def test_embedder_is_most_similar_for_the_same_caption_and_layout():
    scene = shapes.Scene("circle", "red", "white", "large", "in the center")
    near = shapes.Scene("circle", "red", "white", "small", "in the center")
    far = shapes.Scene("triangle", "blue", "black", "small", "on the left")
    layout = shapes.Layout(16, 16, 20)
    images = [shapes.render(s, layout, st) for s, st in ((scene, "sketch"), (scene, "plain"), (near, "plain"), (far, "plain"))]
    emb = datasets.ShapesEmbedder()([s.caption for s in (scene, scene, near, far)], images)
    assert emb.shape[0] == 4 and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    sim = emb[0] @ emb[1:].T
    assert sim[0] > sim[1] > sim[2]


def _namespace(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def test_pretrain_builds_a_loadable_base(short_pretrained_base):
    out = short_pretrained_base
    assert base_model.base_exists(out)
    unet = base_model.load_pipeline(out).unet
    assert next(unet.parameters()).dtype == torch.float32
    assert unet.config.in_channels == 3 and unet.config.sample_size == shapes.IMAGE_SIZE
    # the folder it was built in is not recorded (the base is committed; loading sets the path anew)
    for config in [out / "model_index.json", *out.glob("*/config.json")]:
        assert "_name_or_path" not in json.loads(config.read_text()), config


# Needs the committed, fully pretrained base (rpo_fast/demo/base): fails until it exists.
@pytest.mark.slow
def test_committed_base_draws_the_captions_in_both_styles():
    """The committed base draws the held-out test captions mostly right, as outlines
    between 10% and 40% of the time (what the demo measures: 24 captions x 4 samples)."""
    from rpo_fast.demo.evaluate import evaluate

    ev = evaluate(base_model.load_pipeline(), shapes.split_scenes()["test"], samples_per_prompt=4, progress=False)
    assert ev.scores["fidelity"].mean() >= 0.6
    assert 0.1 <= ev.scores["style"].mean() <= 0.4
    assert ev.scores["filled"].mean() >= 0.1


def test_short_demo_run_writes_grid_plot_and_results(tmp_path, capsys, short_pretrained_base):
    from rpo_fast.demo import cli

    args = _namespace(cli, ["--out", str(tmp_path), "--model-dir", str(short_pretrained_base), "--steps", "2", "--batch-pairs", "4", "--pairs-per-caption", "1",
                            "--max-prompts", "3", "--samples-per-prompt", "1", "--inference-steps", "2",
                            "--no-progress"])
    assert cli.run(args) == 0
    for name in ("demo_grid.png", "demo_scores.png", "demo_results.json"):
        assert (tmp_path / name).stat().st_size > 0
    result = json.loads((tmp_path / "demo_results.json").read_text())
    assert result["captions"] == 3 and result["weights"] == "similarity"
    assert result["settings"]["lora_rank"] > 0  # the demo's LoRA path (the quality test runs full fine-tunes)
    assert set(result["results"]) == {"base", "tuned", "difference"}
    for row in result["results"].values():
        assert set(row) == {"style_rate", "fidelity"} and set(row["style_rate"]) == {"mean", "ci95"}
    assert set(result["seconds"]) == {"train", "total"}
    assert "style rate up by at least" in capsys.readouterr().out


def test_demo_rejects_bad_arguments_in_one_line(tmp_path, capsys):
    from rpo_fast.cli import main

    for argv, expected in ((["--steps", "0"], "--steps"), (["--max-prompts", "1"], "--max-prompts"),
                           (["--lora-rank", "-1"], "--lora-rank"), (["--sft-weight", "-1"], "--sft-weight")):
        assert main(["demo", "--out", str(tmp_path), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("rpo-fast demo: error: ") and expected in err, err
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_finetune_outputs_and_checkpoints_load_into_the_pipeline(tmp_path, short_pretrained_base, lora_rank):
    # full and LoRA fine-tunes: the final output and a mid-run checkpoint each load onto the base,
    # and each is the UNet it was at that step (the checkpoint differs from the end and the base)
    import torch

    from rpo_fast.demo.base_model import load_pipeline
    from rpo_fast.demo.finetune import FinetuneSettings, finetune

    data = datasets.write_style_data(tmp_path / "data", per_scene=1)
    settings = FinetuneSettings(steps=3, batch_pairs=4, learning_rate=1e-3, lora_rank=lora_rank)
    tuned, checkpoints = finetune(short_pretrained_base, data, tmp_path / "run", settings, progress=False,
                                  checkpoint_every=1, latent_cache=tmp_path / "latents")
    assert sorted(checkpoints) == [1, 2]  # the end-of-run checkpoint is the final output, not kept twice

    def unet_out(pipe):
        config = pipe.unet.config
        x = torch.randn(1, config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
        cond = torch.randn(1, 8, config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([500])
        with torch.no_grad():
            return pipe.unet(x, t, cond).sample

    base = unet_out(load_pipeline(short_pretrained_base))
    final = unet_out(load_pipeline(short_pretrained_base, tuned))
    # (step 1 ran at the warm-up's learning rate 0, as in diffusers' schedules)
    middle = unet_out(load_pipeline(short_pretrained_base, checkpoint=checkpoints[2]))
    assert not torch.equal(final, base) and not torch.equal(middle, base) and not torch.equal(middle, final)


def test_finetune_again_returns_the_finished_run_and_other_inputs_start_over(tmp_path, short_pretrained_base,
                                                                              monkeypatch):
    import rpo_fast.train
    from rpo_fast.demo.finetune import FinetuneSettings, finetune

    data = datasets.write_style_data(tmp_path / "data", per_scene=1)
    common = dict(progress=False, latent_cache=tmp_path / "latents")
    settings = FinetuneSettings(steps=2, batch_pairs=4)
    tuned, checkpoints = finetune(short_pretrained_base, data, tmp_path / "run", settings, **common)
    assert checkpoints == {} and (tuned / "pytorch_lora_weights.safetensors").is_file()

    def no_training(config):
        raise AssertionError("trained again")

    monkeypatch.setattr(rpo_fast.train, "train", no_training)
    assert finetune(short_pretrained_base, data, tmp_path / "run", settings, **common) == (tuned, {})
    with pytest.raises(AssertionError, match="trained again"):  # other settings: a new run, from scratch
        finetune(short_pretrained_base, data, tmp_path / "run", FinetuneSettings(steps=3, batch_pairs=4), **common)
    assert not (tuned / "pytorch_lora_weights.safetensors").exists()
