"""`rpo-fast eval`: scorers loaded by their real loading code from tiny local models,
tuned-model layouts, seeded generation, reports, the output folder (continued, refused,
replaced), offline checks; tiny SD1.5 / SDXL pipelines at 64 px. tests/test_eval_cli.py runs
the command in a subprocess (Ctrl-C, no hub)."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rpo_fast.cli import main as cli_main
from rpo_fast.evaluation import EvalConfig, GenerationSettings, evaluate, read_prompts, summarize, win_rate
from rpo_fast.evaluation.generation import generate, image_seed, load_pipeline, resolve_tuned
from rpo_fast.evaluation.report import image_grid, save_score_plot
from rpo_fast.evaluation.scorers import (
    AestheticScorer,
    HPSv2Scorer,
    OpenClipMetrics,
    SCORERS,
    PickScoreScorer,
    load_aesthetic_head,
)

from tiny_scorers import (
    TINY_CLIP_NAME,
    save_tiny_aesthetic_head,
    save_tiny_open_clip,
    save_tiny_pickscore,
)

PROMPTS = ["a red house by the sea", "a cat on a chair", "a mountain at dawn"]
FAST = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64)
FASTER = dict(num_inference_steps=2, guidance_scale=1.0)  # 16 px, no classifier-free guidance


def _image(seed: int, size: int = 40) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy())


def _save_tuned_unet(base: Path, folder: Path) -> Path:
    """A full fine-tune's output: ``folder/unet`` with perturbed weights."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    unet.save_pretrained(folder / "unet")
    return folder


def _save_lora(base: Path, folder: Path) -> Path:
    """LoRA weights as the diffusers training examples save them (peft -> save_lora_weights)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights="gaussian"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained LoRA weights are not zero
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_sd15_dir):
    root = tmp_path_factory.mktemp("eval")
    base = tiny_sd15_dir  # 16 px images by default (its VAE upsamples 2x); 64 px where a test asks
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    style = root / "style"
    style.mkdir()
    for i in range(2):
        _image(100 + i).save(style / f"ref_{i}.png")
    clip = save_tiny_open_clip(root / "clip", seed=0)
    return dict(
        root=root, base=base, prompts=prompts, style=style, clip=clip,
        clip_config=root / "clip" / f"{TINY_CLIP_NAME}.json",
        hps=save_tiny_open_clip(root / "clip", seed=1, hps_style=True),
        aesthetic=save_tiny_aesthetic_head(root / "aesthetic.pth"),
        pickscore=save_tiny_pickscore(root / "pickscore"),
        full=_save_tuned_unet(base, root / "full"),
        lora=_save_lora(base, root / "lora"),
    )


def _open_clip_direct(path):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME)
    state = torch.load(path, weights_only=True)["state_dict"] if str(path).endswith(".pt") else None
    if state is None:
        from safetensors.torch import load_file

        state = load_file(str(path))
    model.load_state_dict(state)
    tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
    model.eval()

    def embed(prompts, images):
        with torch.no_grad():
            img = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        return img, txt, model

    return embed


# ----------------------------------------------------------------------------- scorers


def test_open_clip_metrics_definitions(assets):
    images = [_image(1), _image(2)]
    refs = [_image(100), _image(101)]
    metrics = OpenClipMetrics(TINY_CLIP_NAME, str(assets["clip"]), style_prompt="a watercolor",
                              neutral_prompts=["a photo", "an image"], style_images=refs)
    got = metrics(PROMPTS[:2], images)
    embed = _open_clip_direct(assets["clip"])
    img, txt, model = embed(PROMPTS[:2], images)
    torch.testing.assert_close(got["clip_score"], 100 * (img * txt).sum(-1).clamp(min=0))
    _, style_txt, _ = embed(["a watercolor", "a photo", "an image"], images[:1] * 3)
    want_prob = (model.logit_scale.exp() * img @ style_txt.T).softmax(-1)[:, 0]
    torch.testing.assert_close(got["style_prob"], want_prob)
    ref_img, _, _ = embed(["x", "x"], refs)
    torch.testing.assert_close(got["style_similarity"], (img @ ref_img.T).mean(-1))
    # a reference image itself: mean of cos(r0, r0) = 1 and cos(r0, r1)
    torch.testing.assert_close(metrics(["x"], [refs[0]])["style_similarity"], (1 + ref_img[0:1] @ ref_img[1]) / 2)
    assert sorted(got) == ["clip_score", "style_prob", "style_similarity"]


def test_hpsv2_scorer_reads_state_dict_checkpoint(assets):
    images = [_image(3), _image(4)]
    got = HPSv2Scorer(assets["hps"], model_name=TINY_CLIP_NAME)(PROMPTS[:2], images)["hpsv2"]
    img, txt, _ = _open_clip_direct(assets["hps"])(PROMPTS[:2], images)
    torch.testing.assert_close(got, (img * txt).sum(-1))
    other = HPSv2Scorer(assets["clip"], model_name=TINY_CLIP_NAME)(PROMPTS[:2], images)["hpsv2"]
    assert not torch.allclose(got, other)  # the checkpoint's weights were used, not a default init


def test_pickled_checkpoint_needs_opt_in(assets, tmp_path):
    import argparse

    state = torch.load(assets["hps"], weights_only=True)
    state["args"] = argparse.Namespace(lr=1e-5)  # training state saved next to the weights
    torch.save(state, tmp_path / "hps_pickled.pt")
    with pytest.raises(ValueError, match="allow-pickle"):
        HPSv2Scorer(tmp_path / "hps_pickled.pt", model_name=TINY_CLIP_NAME)
    images = [_image(3)]
    got = HPSv2Scorer(tmp_path / "hps_pickled.pt", model_name=TINY_CLIP_NAME, allow_pickle=True)(PROMPTS[:1], images)
    want = HPSv2Scorer(assets["hps"], model_name=TINY_CLIP_NAME)(PROMPTS[:1], images)
    torch.testing.assert_close(got["hpsv2"], want["hpsv2"])


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_aesthetic_scorer(assets, tmp_path, kind):
    head_path = save_tiny_aesthetic_head(tmp_path / f"{kind}.pth", kind=kind, seed=3)
    scorer = AestheticScorer(head_path, TINY_CLIP_NAME, str(assets["clip"]))
    images = [_image(5), _image(6)]
    img, _, _ = _open_clip_direct(assets["clip"])(["x", "x"], images)
    head = load_aesthetic_head(head_path)
    assert isinstance(head, torch.nn.Linear) == (kind == "linear")
    with torch.no_grad():
        torch.testing.assert_close(scorer(["x", "y"], images)["aesthetic"], head(img).squeeze(-1))


def test_aesthetic_head_errors(assets, tmp_path):
    from rpo_fast.evaluation.scorers import AestheticMLP

    torch.save(AestheticMLP(768).state_dict(), tmp_path / "real_size.pth")
    with pytest.raises(ValueError, match="expects 768-dim"):
        AestheticScorer(tmp_path / "real_size.pth", TINY_CLIP_NAME, str(assets["clip"]))
    torch.save({"fc.weight": torch.zeros(1, 4)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="unknown layout"):
        load_aesthetic_head(tmp_path / "odd.pth")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_aesthetic_head(tmp_path / "missing.pth")


def test_pickscore_scorer(assets):
    from transformers import AutoProcessor, CLIPModel

    images = [_image(7), _image(8)]
    got = PickScoreScorer(assets["pickscore"])(PROMPTS[:2], images)["pickscore"]
    model = CLIPModel.from_pretrained(assets["pickscore"]).eval()
    processor = AutoProcessor.from_pretrained(assets["pickscore"])
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = processor(text=PROMPTS[:2], padding=True, return_tensors="pt")
    assert pixels.shape[-1] == 32  # the saved processor's own settings were read
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(**tokens).pooler_output)
    want = model.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    torch.testing.assert_close(got, want)
    with pytest.raises(FileNotFoundError, match="PickScore model"):
        PickScoreScorer(assets["root"] / "missing")


# ----------------------------------------------------------------------------- inputs


def test_read_prompts(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n"b"\n\n{"caption": "c"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b", "c"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"title": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="--prompts"):
        read_prompts(tmp_path / "missing.txt")


def test_resolve_tuned_layouts(assets, tmp_path):
    assert resolve_tuned(assets["base"]) == ("pipeline", assets["base"])
    assert resolve_tuned(assets["full"]) == ("unet", assets["full"] / "unet")
    assert resolve_tuned(assets["full"] / "unet") == ("unet", assets["full"] / "unet")
    assert resolve_tuned(assets["lora"]) == ("lora", assets["lora"])
    lora_file = assets["lora"] / "pytorch_lora_weights.safetensors"
    assert resolve_tuned(lora_file) == ("lora", lora_file)
    assert resolve_tuned(assets["base"], "unet") == ("unet", assets["base"] / "unet")
    with pytest.raises(ValueError, match="does not hold a lora model"):
        resolve_tuned(assets["full"], "lora")
    with pytest.raises(ValueError, match="holds no model"):
        resolve_tuned(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing at"):
        resolve_tuned(tmp_path / "missing")
    with pytest.raises(ValueError, match="--tuned-type"):
        resolve_tuned(assets["base"], "dreambooth")


# ----------------------------------------------------------------------------- generation and reports


def test_generation_is_seeded_per_image(assets):
    pipe = load_pipeline(assets["base"])
    settings = dict(FASTER, images_per_prompt=2)
    one = generate(pipe, PROMPTS[:2], GenerationSettings(batch_size=4, **settings), progress=False)
    two = generate(pipe, PROMPTS[:2], GenerationSettings(batch_size=3, **settings), progress=False)
    assert [[im.size for im in row] for row in one] == [[(16, 16)] * 2] * 2
    def diff(a, b):
        return (torch.tensor(np.asarray(a), dtype=torch.int16) - torch.tensor(np.asarray(b), dtype=torch.int16)).abs()

    # the same images whatever the batch size (up to rounding: batched matmuls sum in another order)
    for row_one, row_two in zip(one, two):
        for a, b in zip(row_one, row_two):
            assert diff(a, b).max() <= 2
    assert diff(one[0][0], one[0][1]).float().mean() > 10  # different seeds, different images
    # image (i, k) does not depend on how many images per prompt are asked for: runs extend
    fewer = generate(pipe, PROMPTS[:2], GenerationSettings(batch_size=4, **dict(FASTER, images_per_prompt=1)),
                     progress=False)
    for row_one, row_fewer in zip(one, fewer):
        assert diff(row_one[0], row_fewer[0]).max() <= 2


def test_one_seed_rule_and_at_most_101_images_per_prompt():
    settings = GenerationSettings(seed=3, images_per_prompt=2)
    assert image_seed(settings, 1, 1) == 3 * 100003 + 1 * 101 + 1
    more = GenerationSettings(seed=3, images_per_prompt=101)
    assert all(image_seed(more, i, k) == image_seed(settings, i, k) for i in range(3) for k in range(2))
    seeds = {image_seed(more, i, k) for i in range(5) for k in range(101)}
    assert len(seeds) == 5 * 101  # no two images share a seed up to the limit
    with pytest.raises(ValueError, match="images_per_prompt") as refused:
        generate(None, ["a"], GenerationSettings(images_per_prompt=102), progress=False)
    assert "at most 101" in str(refused.value) and "\n" not in str(refused.value)


def test_summary_and_win_rate():
    base = {"m": torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 5.0]])}
    tuned = {"m": torch.tensor([[4.0, 4.0], [2.0, 2.0], [1.0, 1.0]])}
    s = summarize(base, tuned)["m"]
    assert s["base"] == pytest.approx(3.0) and s["tuned"] == pytest.approx(14 / 6)
    assert s["win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert win_rate(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0])) == 0.5
    with pytest.raises(ValueError, match="differ"):
        summarize(base, {"other": tuned["m"]})
    from rpo_fast.evaluation.stats import mean_ci

    assert s["delta_ci95"] == pytest.approx(mean_ci([2.0, 0.0, -4.0])[1]) and s["delta_ci95"] > 0
    assert s["base_ci95"] == pytest.approx(mean_ci([2.0, 2.0, 5.0])[1])
    assert s["tuned_ci95"] == pytest.approx(mean_ci([4.0, 2.0, 1.0])[1])
    grid = image_grid({"base": [_image(1)] * 3, "tuned": [_image(2)] * 3}, cell=32, label_width=40)
    assert grid.size == (40 + 3 * 32, 2 * 32)
    labelled = image_grid({"base": [_image(1)] * 3}, cell=32, label_width=40, column_labels=["a b", "c", "d"])
    assert labelled.size[1] > 32 and labelled.crop((40, 32, 72, labelled.size[1])).getextrema() != ((255, 255),) * 3
    # NEAREST keeps a tiny image's pixels: every 4x4 block of the cell is one pixel
    small = _image(3, size=8)
    sharp = image_grid({"base": [small]}, cell=32, label_width=40, resample=Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(sharp)[:32, 40:72][::4, ::4], np.asarray(small.convert("RGB")))


def test_score_plot(tmp_path):
    path = save_score_plot(tmp_path / "plot.png", {"base": {"style_rate": (0.3, 0.1), "fidelity": (0.7, 0.1)},
                                                   "tuned": {"style_rate": (0.6, 0.1), "fidelity": (0.6, 0.1)}},
                           title="t")
    assert Image.open(path).size[0] > 0


def _eval_args(assets, out, tuned, *extra):
    return ["eval", "--base", str(assets["base"]), "--tuned", str(tuned), "--prompts", str(assets["prompts"]),
            "--output-dir", str(out), "--num-inference-steps", "2", "--guidance-scale", "5", "--device", "cpu",
            "--height", "64", "--width", "64",
            "--clip-model", TINY_CLIP_NAME, "--clip-pretrained", str(assets["clip"]),
            "--open-clip-config", str(assets["clip_config"]), "--grid-cell", "32", "--no-progress", *extra]


def test_eval_command_full_unet_all_metrics(assets, tmp_path, capsys):
    out = tmp_path / "out"
    args = _eval_args(
        assets, out, assets["full"], "--style-prompt", "a watercolor painting", "--style-images", str(assets["style"]),
        "--pickscore-model", str(assets["pickscore"]), "--hps-checkpoint", str(assets["hps"]),
        "--hps-model", TINY_CLIP_NAME, "--aesthetic-head", str(assets["aesthetic"]),
        "--aesthetic-clip-model", TINY_CLIP_NAME, "--aesthetic-clip-pretrained", str(assets["clip"]),
        "--images-per-prompt", "2", "--batch-size", "3",
    )
    assert cli_main(args) == 0
    record = json.loads((out / "metrics.json").read_text())
    metrics = ["clip_score", "style_prob", "style_similarity", "pickscore", "hpsv2", "aesthetic"]
    assert sorted(record["summary"]) == sorted(metrics)
    assert record["num_prompts"] == 3 and record["settings"]["tuned_kind"] == "unet"
    for name in metrics:  # the summary follows from the per-prompt scores
        base = torch.tensor([row["base"][name] for row in record["per_prompt"]])
        tuned = torch.tensor([row["tuned"][name] for row in record["per_prompt"]])
        assert base.shape == (3, 2)
        assert record["summary"][name]["base"] == pytest.approx(float(base.mean()), rel=1e-5)
        assert record["summary"][name]["win_rate"] == pytest.approx(win_rate(tuned.mean(1), base.mean(1)))
    row = record["per_prompt"][1]
    base_image = Image.open(out / row["images"]["base"][0])
    tuned_image = Image.open(out / row["images"]["tuned"][0])
    assert base_image.size == (64, 64) and base_image.tobytes() != tuned_image.tobytes()
    # the base images are those of the base pipeline with the documented seeds (prompt 1, image 0 -> seed 101)
    pipe = load_pipeline(assets["base"])
    def image(seed):
        return np.asarray(pipe(PROMPTS[1], generator=torch.Generator("cpu").manual_seed(seed), output_type="pil",
                               **FAST).images[0], dtype=np.int16)

    # alone, not in a batch of 3: the same image up to the rounding of another batch size
    assert np.abs(image(101) - np.asarray(base_image, dtype=np.int16)).max() <= 2
    assert np.abs(image(2) - np.asarray(base_image, dtype=np.int16)).mean() > 10  # not the old rule's seed
    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in metrics)
    assert f"base: `{assets['base']}`" in report and f"tuned: `{assets['full']}`" in report
    assert "3 prompts x 2 per prompt; 6 from base, 6 from tuned" in report and "95% CI" in report
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 64 + 3 * 32 and grid.size[1] > 2 * 32  # the prompts written under the columns
    assert "pickscore" in capsys.readouterr().out


def test_eval_lora_scale(assets, tmp_path):
    def run(scale):
        config = EvalConfig(base=str(assets["base"]), tuned=str(assets["lora"]), prompts=str(assets["prompts"]),
                            output_dir=str(tmp_path / f"lora_{scale}"), lora_scale=scale,
                            generation=GenerationSettings(**FASTER), device="cpu", clip_model=TINY_CLIP_NAME,
                            clip_pretrained=str(assets["clip"]), grid_cell=32, progress=False)
        result = evaluate(config)
        out = result.output_dir / "images"
        return result, [(Image.open(out / "base" / f"{i:04d}_0.png").tobytes(),
                         Image.open(out / "tuned" / f"{i:04d}_0.png").tobytes()) for i in range(3)]

    result, images = run(1.0)
    assert all(base != tuned for base, tuned in images)  # the LoRA changed the model
    assert set(result.summary) == {"clip_score"}
    zero, images = run(0.0)
    assert all(base == tuned for base, tuned in images)  # same seeds, LoRA switched off
    assert zero.summary["clip_score"]["win_rate"] == 0.5 and zero.summary["clip_score"]["delta"] == 0


def test_eval_tuned_pipeline_folder(assets, tmp_path):
    """A full pipeline as the tuned model: here the base itself, so both rows match exactly."""
    config = EvalConfig(base=str(assets["base"]), tuned=str(assets["base"]), prompts=str(assets["prompts"]),
                        output_dir=str(tmp_path / "out"), generation=GenerationSettings(**FASTER), device="cpu",
                        clip_model=TINY_CLIP_NAME, clip_pretrained=str(assets["clip"]), grid_cell=32, progress=False)
    result = evaluate(config)
    torch.testing.assert_close(result.scores["tuned"]["clip_score"], result.scores["base"]["clip_score"])
    record = json.loads(result.files["json"].read_text())
    assert record["settings"]["tuned_kind"] == "pipeline" and record["summary"]["clip_score"]["win_rate"] == 0.5


def test_eval_sdxl(assets, tmp_path, tiny_sdxl_dir):
    tuned = _save_tuned_unet(tiny_sdxl_dir, tmp_path / "xl_tuned")
    config = EvalConfig(base=str(tiny_sdxl_dir), tuned=str(tuned), prompts=str(assets["prompts"]),
                        output_dir=str(tmp_path / "out"), generation=GenerationSettings(**FASTER), device="cpu",
                        clip_model=TINY_CLIP_NAME, clip_pretrained=str(assets["clip"]), grid_cell=32, progress=False)
    result = evaluate(config)
    assert result.scores["tuned"]["clip_score"].shape == (3, 1)
    assert Image.open(tmp_path / "out" / "images" / "tuned" / "0002_0.png").size == (16, 16)


def test_eval_command_errors_before_generating(assets, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "bad_style").mkdir()
    (tmp_path / "bad_style" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--style-images", str(tmp_path / "bad_style")], "cannot read"),
        (["--hps-checkpoint", str(tmp_path / "hps.pt")], "--hps-checkpoint: no file"),
        (["--style-images", str(tmp_path / "nope")], "--style-images: no folder"),
        (["--num-inference-steps", "0"], "num_inference_steps"),
        (["--height", "60"], "multiple of 8"),
        (["--no-clip", "--style-prompt", "a watercolor"], "need the CLIP scorer"),
        (["--pickscore-model", "./weights/PickScore_v1"], "--pickscore-model: ./weights/PickScore_v1: no such"),
        (["--clip-model", "ViT-Nope"], "unknown open_clip architecture"),
        (["--device", "gpu"], "device: "),
    ]
    for extra, message in cases:
        assert cli_main(_eval_args(assets, out, assets["full"], *extra)) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert cli_main(_eval_args(assets, out, tmp_path)) == 2
    assert "holds no model" in capsys.readouterr().err
    bad_prompts = _eval_args(assets, out, assets["full"])
    bad_prompts[bad_prompts.index("--prompts") + 1] = str(tmp_path / "none.txt")
    assert cli_main(bad_prompts) == 2
    assert "--prompts: no file" in capsys.readouterr().err
    assert not out.exists()  # nothing was generated
    assert cli_main(_eval_args(assets, tmp_path / "a_file", assets["full"])) == 2
    assert "--output-dir: " in capsys.readouterr().err


def test_eval_reports_a_failed_clip_download_before_generating(assets, tmp_path, capsys, monkeypatch):
    # the default CLIP (ViT-L-14-quickgelu / openai), the hub answering but the download failing
    import open_clip.pretrained

    import rpo_fast.hub

    def failing(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(rpo_fast.hub, "offline_reason", lambda: None)
    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", failing)
    out = tmp_path / "out"
    args = _eval_args(assets, out, assets["full"])
    for flag in ("--clip-model", "--clip-pretrained"):
        del args[args.index(flag):args.index(flag) + 2]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--clip-pretrained" in err and "couldn't connect" in err, err
    assert "--no-clip" in err
    assert not out.exists()  # nothing was generated


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty hub cache; what a cache hit switches (rpo_fast.hub.go_offline)
    is switched back after the test."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # open_clip's url download cache: ~/.cache/clip
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    return tmp_path / "hub"


@pytest.mark.parametrize("extra, option", [
    (["--base", "runwayml/stable-diffusion-v1-5"], "--base"),
    (["--tuned", "someone/rpo-sd15"], "--tuned"),
    (["--clip-model", "ViT-L-14-quickgelu", "--clip-pretrained", "openai"], "--clip-pretrained"),
    (["--clip-model", "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"], "--clip-model"),
    (["--aesthetic-head", "AESTHETIC"], "--aesthetic-clip-pretrained"),
    (["--pickscore-model", "yuvalkirstain/PickScore_v1"], "--pickscore-model"),
    (["--pickscore-model", "PICKSCORE", "--pickscore-processor", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"],
     "--pickscore-processor"),
])
def test_offline_a_download_fails_in_one_line_naming_the_option(assets, tmp_path, capsys, offline_hub, extra, option):
    local = {"AESTHETIC": str(assets["aesthetic"]), "PICKSCORE": str(assets["pickscore"])}
    out = tmp_path / "out"
    args = _eval_args(assets, out, assets["full"])
    for flag, value in zip(extra[::2], extra[1::2]):  # replaces the option's value, or appends it
        value = local.get(value, value)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"rpo-fast eval: error: {option}: "), err
    if option != "--tuned":  # a tuned model is always local
        assert "HF_HUB_OFFLINE is set" in err and ("local" in err or "download it" in err), err
    assert not out.exists()


def test_offline_an_open_clip_tag_in_the_hub_cache_is_used(assets, tmp_path, offline_hub, monkeypatch):
    """Offline, a pretrained tag whose hub repo is in the cache is read from there."""
    import shutil

    import open_clip.pretrained

    tag = {"cached": open_clip.pretrained._pcfg(hf_hub="rpo-test/tiny-clip/")}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY_CLIP_NAME, tag)
    revision = "0" * 40
    repo = offline_hub / "models--rpo-test--tiny-clip"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    shutil.copy(assets["clip"], repo / "snapshots" / revision / "open_clip_model.safetensors")
    config = EvalConfig(base=str(assets["base"]), tuned=str(assets["base"]), prompts=str(assets["prompts"]),
                        output_dir=str(tmp_path / "out"), generation=GenerationSettings(**FASTER), device="cpu",
                        clip_model=TINY_CLIP_NAME, clip_pretrained="cached", grid_cell=32, progress=False)
    from_file = EvalConfig(**{**config.__dict__, "clip_pretrained": str(assets["clip"]),
                              "output_dir": str(tmp_path / "out_file")})
    torch.testing.assert_close(evaluate(config).scores["base"]["clip_score"],
                               evaluate(from_file).scores["base"]["clip_score"])


def test_images_only_eval(assets, tmp_path, capsys):
    out = tmp_path / "out"
    args = _eval_args(assets, out, assets["full"], "--no-clip", "--guidance-scale", "1", "--height", "16",
                      "--width", "16")
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "No metric was computed" in printed and "grid.png" in printed
    record = json.loads((out / "metrics.json").read_text())
    assert record["summary"] == {} and "No metric was computed" in record["note"]
    images = record["per_prompt"][2]["images"]
    assert images == {"base": ["images/base/0002_0.png"], "tuned": ["images/tuned/0002_0.png"]}
    assert len(list(out.glob("images/*/*.png"))) == 6 and (out / "grid.png").is_file()


def test_one_scoring_bar_over_all_scorers(assets, capsys):
    import re

    config = EvalConfig(base="unused", tuned="unused", prompts="unused", output_dir="unused", clip_model=TINY_CLIP_NAME,
                        clip_pretrained=str(assets["clip"]), aesthetic_head=str(assets["aesthetic"]),
                        aesthetic_clip_model=TINY_CLIP_NAME, aesthetic_clip_pretrained=str(assets["clip"]),
                        score_batch_size=2)
    from rpo_fast.evaluation.evaluate import score_images

    images = {"base": [[_image(1)], [_image(2)], [_image(3)]], "tuned": [[_image(4)], [_image(5)], [_image(6)]]}
    scores = score_images(config, "cpu", PROMPTS, images)
    assert sorted(scores["tuned"]) == ["aesthetic", "clip_score"]
    counts = re.findall(r"scoring:[^\r\n]*? (\d+)/(\d+) \[", capsys.readouterr().err)
    assert counts, "no progress bar"
    assert {int(total) for _, total in counts} == {2 * 2 * 2}  # scorers x models x batches, from the start
    assert [int(n) for n, _ in counts] == sorted(int(n) for n, _ in counts) and counts[-1][0] == "8"


def test_help_shows_every_default(capsys):
    import argparse

    from rpo_fast.evaluation.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())  # after the usage lines
    for option, default in (("--images-per-prompt", "1"), ("--num-inference-steps", "30"),
                            ("--guidance-scale", "7.5"), ("--score-batch-size", "16"), ("--scorer-precision", "fp32")):
        start = text.index(option + " ")
        assert f"(default: {default})" in text[start:text.index(" --", start + len(option))], option


# ----------------------------------------------------------------------------- the output folder


def _fast_args(assets, out, *extra):
    return _eval_args(assets, out, assets["full"], "--guidance-scale", "1", "--height", "16", "--width", "16",
                      *extra)


def test_an_earlier_eval_with_other_settings_is_refused_or_replaced(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(_fast_args(assets, out, "--images-per-prompt", "2")) == 0
    (out / "notes.txt").write_text("mine")
    (out / "images" / "base" / "mine.png").write_bytes(b"")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli_main(_fast_args(assets, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite-output-dir" in err and "images_per_prompt" in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    assert cli_main(_fast_args(assets, out, "--overwrite-output-dir")) == 0
    assert "deleted the 16 files of an earlier eval" in capsys.readouterr().out  # 12 images, manifest, 3 reports
    assert sorted(p.name for p in (out / "images" / "base").iterdir()) == ["0000_0.png", "0001_0.png", "0002_0.png",
                                                                           "mine.png"]
    assert len(list((out / "images" / "tuned").iterdir())) == 3 and (out / "notes.txt").read_text() == "mine"


def test_a_rerun_with_the_same_settings_reuses_the_saved_images(assets, tmp_path, capsys, monkeypatch):
    import importlib

    evaluate_module = importlib.import_module("rpo_fast.evaluation.evaluate")
    out = tmp_path / "out"
    assert cli_main(_fast_args(assets, out, "--batch-size", "2")) == 0
    first = {p: Image.open(p).tobytes() for p in out.glob("images/*/*.png")}
    (out / "images" / "tuned" / "0001_0.png").unlink()  # as if interrupted before that image
    loaded = []
    real_load = evaluate_module.load_pipeline
    monkeypatch.setattr(evaluate_module, "load_pipeline", lambda source, **kw: loaded.append(source) or
                        real_load(source, **kw))
    capsys.readouterr()
    assert cli_main(_fast_args(assets, out, "--batch-size", "3")) == 0  # the batch size does not matter
    printed = capsys.readouterr().out
    assert "base model: reusing 3 of 3 images" in printed and "tuned model: reusing 2 of 3 images" in printed
    assert loaded == [str(assets["base"])]  # loaded once, for the missing tuned image
    second = {p: Image.open(p).tobytes() for p in out.glob("images/*/*.png")}
    regenerated = out / "images" / "tuned" / "0001_0.png"
    assert {p: b for p, b in second.items() if p != regenerated} == {p: b for p, b in first.items() if p != regenerated}
    difference = np.abs(np.frombuffer(second[regenerated], np.uint8).astype(int)
                        - np.frombuffer(first[regenerated], np.uint8).astype(int))
    assert difference.max() <= 2  # the same seed: the same image, up to the rounding of another batch size
    # a retrained model (its files changed) is not the same setting
    unet_weights = next((assets["full"] / "unet").glob("*.safetensors"))
    os.utime(unet_weights, ns=(unet_weights.stat().st_atime_ns, unet_weights.stat().st_mtime_ns + 10**9))
    assert cli_main(_fast_args(assets, out)) == 2
    assert "differing: tuned" in capsys.readouterr().err


def test_ctrl_c_while_scoring_keeps_the_images_and_says_how_to_continue(assets, tmp_path, capsys, monkeypatch):
    from rpo_fast.evaluation import scorers

    out = tmp_path / "out"
    args = _fast_args(assets, out)

    def interrupt(self, prompts, images):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(scorers.OpenClipMetrics, "__call__", interrupt)
        assert cli_main(args) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"rpo-fast eval: interrupted while scoring with CLIP (scorer 1 of 1); kept the 6 finished images in {out}; "
        f"to continue: rpo-fast eval {shlex.join(args[1:])}"
    ]
    assert not (out / "metrics.json").exists() and not list(out.rglob("*.tmp"))
    assert cli_main(args) == 0
    assert "tuned model: reusing 3 of 3 images" in capsys.readouterr().out


def test_embed_train_eval_workflow(assets, tmp_path):
    """The documented workflow, through the three commands, on tiny models: the trainer reads
    the embedding cache and eval reads the trainer's LoRA output."""
    from rpo_fast.data import write_pickapic_parquet

    rows = [(PROMPTS[i % 3], _image(10 + 2 * i, 16), _image(11 + 2 * i, 16), float(i % 2)) for i in range(4)]
    write_pickapic_parquet(tmp_path / "data", rows)
    clip = ["--open-clip-config", str(assets["clip_config"])]
    emb = tmp_path / "emb.safetensors"
    assert cli_main(["embed", "--data", str(tmp_path / "data"), "--output", str(emb), "--model", TINY_CLIP_NAME,
                     "--pretrained", str(assets["clip"]), "--device", "cpu", "--no-progress", *clip]) == 0
    assert cli_main(["train", "--pretrained-model", str(assets["base"]), "--data", str(tmp_path / "data"),
                     "--output-dir", str(tmp_path / "run"), "--embeddings", str(emb), "--lora", "--max-steps", "2",
                     "--batch-pairs", "2", "--resolution", "16", "--learning-rate", "1e-2", "--device", "cpu",
                     "--no-progress", "--checkpoint-every", "0"]) == 0
    out = tmp_path / "eval"
    assert cli_main(_eval_args(assets, out, tmp_path / "run", "--guidance-scale", "1", "--height", "16",
                               "--width", "16")) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["settings"]["tuned_kind"] == "lora"
    tuned = Image.open(out / record["per_prompt"][0]["images"]["tuned"][0])
    base = Image.open(out / record["per_prompt"][0]["images"]["base"][0])
    assert tuned.tobytes() != base.tobytes()  # the trained LoRA changed the model
