"""benchmarks/step_timing.py, the step's components a GPU session runs on the real
architectures: here on the CPU with its scaled-down configs, so that it cannot rot."""

from __future__ import annotations

import json
import math

import pytest

import torch

from benchmarks.step_timing import (FLOW_MODELS, FLOW_PAIRS_PER_OPT_STEP, PAIRS_PER_OPT_STEP, SD15_UNET, SDXL_UNET,
                                    configs, flow_configs, flow_text_encoders, flow_transformer, format_report, main,
                                    measure, per_pair)

pytest.importorskip("diffusers")

CONFIGURATIONS = ["official", "(a) frozen reference", "(b) --precompute-ref", "(c) --lora"]
FLOW_CONFIGURATIONS = ["no caches", "rpo-fast LoRA (caches)"]
FULL_CONFIGURATIONS = ["rpo-fast full, frozen reference", "rpo-fast full, --precompute-ref"]


@pytest.mark.parametrize("xl", [False, True])
def test_tiny_configs_keep_the_real_architecture(xl):
    real, tiny = configs(xl, tiny=False), configs(xl, tiny=True)
    assert real["unet"] == (SDXL_UNET if xl else SD15_UNET)
    for key in ("down_block_types", "up_block_types", "in_channels", "addition_embed_type", "use_linear_projection"):
        assert tiny["unet"].get(key) == real["unet"].get(key)
    assert len(tiny["texts"]) == len(real["texts"]) == (2 if xl else 1)
    assert tiny["unet"]["sample_size"] < real["unet"]["sample_size"]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny_components(request):
    return request.param, measure(request.param, pairs=2, repeats=1, tiny=True)


def test_every_component_is_timed(tiny_components):
    _, ms = tiny_components
    assert len(ms) == 10
    assert all(math.isfinite(v) and v > 0 for v in ms.values()), ms


def test_configurations_add_their_components_per_pair(tiny_components):
    _, ms = tiny_components
    rows = per_pair(ms, pairs=2)
    assert list(rows) == CONFIGURATIONS
    opt = 2 / PAIRS_PER_OPT_STEP
    official = (ms["VAE encode"] + ms["text encoder(s)"] + ms["policy UNet fwd+bwd"] + ms["reference UNet fwd"]
                + ms["loss fwd+bwd (eager)"] + opt * ms["optimizer step (official)"])
    assert rows["official"] == pytest.approx(official / 2)
    # rpo-fast reads latents and prompts from its caches: no VAE or text encoder in any of its rows
    assert rows["(a) frozen reference"] - rows["(b) --precompute-ref"] == pytest.approx(ms["reference UNet fwd"] / 2)
    assert rows["(c) --lora"] == pytest.approx(
        (ms["policy UNet fwd+bwd (LoRA)"] + ms["reference UNet fwd (LoRA off)"] + ms["loss fwd+bwd (rpo-fast)"]) / 2)


def test_report_gives_each_configuration_over_the_official():
    measured = dict(zip(CONFIGURATIONS, (100.0, 50.0, 40.0, 25.0)))
    text = format_report({"sd15": {"pairs": 1, "device": "GPU", "components_ms": {"VAE encode": 1.5},
                                   "per_pair_ms": measured}})
    assert "| (a) frozen reference | 50.00 | 2.00 |" in text
    assert "| (c) --lora | 25.00 | 4.00 |" in text
    assert "| VAE encode | 1.50 |" in text


def test_cli_writes_json_and_refuses_bad_counts(tmp_path, capsys, monkeypatch, tiny_components):
    _, ms = tiny_components  # measured above: the CLI's own part is the arguments and the files
    monkeypatch.setattr("benchmarks.step_timing.measure", lambda model, **kwargs: ms)
    out = tmp_path / "timing.json"
    assert main(["--tiny", "--models", "sd15", "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["sd15"]
    assert list(result["per_pair_ms"]) == CONFIGURATIONS
    assert "tiny configs" in result["device"]
    assert "| (b) --precompute-ref |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["--tiny", "--pairs", "0"])
    assert exit_info.value.code == 2
    assert "--pairs and --repeats" in capsys.readouterr().err


# -- SD3.5 and FLUX.1 ------------------------------------------------------------------------


@pytest.mark.parametrize("model, billions", [("sd35m", 2.24), ("sd35l", 8.06), ("flux-dev", 11.90)])
def test_flow_configs_have_the_documented_parameter_counts(model, billions):
    """docs/sd3-flux.md's counts: the transformer and T5-XXL's encoder (4.76 B), on the meta device."""
    cfg = flow_configs(model, tiny=False)
    with torch.device("meta"):
        transformer, encoders = flow_transformer(cfg), flow_text_encoders(cfg)
    count = lambda module: sum(p.numel() for p in module.parameters()) / 1e9
    assert round(count(transformer), 2) == billions
    assert round(count(encoders[-1]), 2) == 4.76
    assert len(encoders) == (3 if cfg["family"] == "sd3" else 2)


@pytest.mark.parametrize("model", list(FLOW_MODELS))
def test_tiny_flow_configs_keep_the_real_architecture(model):
    real, tiny = flow_configs(model, tiny=False), flow_configs(model, tiny=True)
    assert set(tiny["transformer"]) == set(real["transformer"]) and tiny["family"] == real["family"]
    for key in ("in_channels", "patch_size", "qk_norm", "guidance_embeds"):
        assert tiny["transformer"].get(key) == real["transformer"].get(key)
    assert bool(tiny["transformer"].get("dual_attention_layers")) == (model == "sd35m")
    assert tiny["vae"]["latent_channels"] == real["vae"]["latent_channels"] == 16
    assert tiny["t5"]["feed_forward_proj"] == "gated-gelu" and len(tiny["texts"]) == len(real["texts"])
    assert tiny["resolution"] < real["resolution"] == 1024


@pytest.fixture(scope="module", params=list(FLOW_MODELS))
def tiny_flow_components(request):
    return request.param, measure(request.param, pairs=2, repeats=1, tiny=True, warmups=0)


def test_every_flow_component_is_timed(tiny_flow_components):
    model, ms = tiny_flow_components
    assert len(ms) == (8 if model == "sd35m" else 6)
    assert all(math.isfinite(v) and v > 0 for v in ms.values()), ms


def test_flow_configurations_add_their_components_per_pair(tiny_flow_components):
    model, ms = tiny_flow_components
    rows = per_pair(ms, pairs=2)
    assert list(rows) == FLOW_CONFIGURATIONS + (FULL_CONFIGURATIONS if model == "sd35m" else [])
    lora = ms["policy transformer fwd+bwd (LoRA)"] + ms["reference transformer fwd (LoRA off)"] \
        + ms["loss fwd+bwd (rpo-fast)"]
    assert rows["rpo-fast LoRA (caches)"] == pytest.approx(lora / 2)
    # the caches take the encoders and the VAE out of every step
    assert rows["no caches"] - rows["rpo-fast LoRA (caches)"] == pytest.approx((ms["text encoders"] + ms["VAE encode"]) / 2)
    if model == "sd35m":
        full = (ms["policy transformer fwd+bwd (full)"] + ms["loss fwd+bwd (rpo-fast)"]
                + 2 / FLOW_PAIRS_PER_OPT_STEP * ms["optimizer step (fused AdamW)"])
        assert rows["rpo-fast full, --precompute-ref"] == pytest.approx(full / 2)
        assert rows["rpo-fast full, frozen reference"] == pytest.approx((full + ms["reference transformer fwd"]) / 2)
    text = format_report({model: {"pairs": 2, "device": "CPU", "components_ms": ms, "per_pair_ms": rows}})
    assert "| configuration | ms per pair | × no caches |" in text and "| no caches |" in text


def test_cli_append_keeps_the_models_already_in_the_file(tmp_path, capsys, monkeypatch, tiny_flow_components):
    """gpu_check's timing-flow stage adds its models to the timing stage's files."""
    model, ms = tiny_flow_components
    monkeypatch.setattr("benchmarks.step_timing.measure", lambda name, **kwargs: ms)
    out = tmp_path / "timing.json"
    out.write_text(json.dumps({"sd15": {"pairs": 1, "device": "GPU", "components_ms": {"VAE encode": 1.0},
                                        "per_pair_ms": dict(zip(CONFIGURATIONS, (4.0, 2.0, 1.0, 1.0)))}}))
    assert main(["--tiny", "--models", model, "--repeats", "1", "--append", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["sd15", model]
    assert f"### {model}" in out.with_suffix(".md").read_text() and "### sd15" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        main(["--tiny", "--append"])
    assert "--append" in capsys.readouterr().err
