"""ImageReward: its published checkpoint layout (tiny sizes) loaded into transformers' BLIP
modules, checked against an independent plain-torch forward written from the architecture
(BLIP's pre-norm ViT, its post-norm BERT with cross-attention, the MLP head, the z-score);
the one-line errors; `rpo-fast eval --image-reward` end to end."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rpo_fast.cli import main as cli_main
from rpo_fast.evaluation.image_reward import ImageRewardScorer, check_image_reward
from rpo_fast.evaluation.scorers import SCORERS, check_scorer_paths

from tiny_scorers import (
    TINY_BLIP,
    save_tiny_bert_vocab,
    save_tiny_image_reward,
    tiny_image_reward_state,
    tiny_med_config,
)

PROMPTS = ["a red house by the sea", "a cat", "the dog on a chair, by the sea. " * 4]  # the last: > 35 tokens
MEAN, STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's normalization


def _image(seed: int, height: int, width: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_reward")
    tokenizer = save_tiny_bert_vocab(root / "bert")
    return dict(root=root, tokenizer=tokenizer, folder=save_tiny_image_reward(root / "ImageReward", tokenizer))


# ----------------------------------------------------------------------------- the oracle


def _preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize(size, bicubic) of the short side, CenterCrop(size), RGB, CLIP's mean and std."""
    w, h = image.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    x = torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(size, size, 3).permute(2, 0, 1) / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
    return (x - mean) / std


def _attention(q, k, v, heads, mask=None):
    B, N, C = q.shape

    def split(t):
        return t.reshape(B, t.shape[1], heads, C // heads).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(C // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, N, C)


def _oracle(sd, tokens, pixels):
    """The reward from the raw ImageReward.pt state dict."""

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    def norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)

    v = "blip.visual_encoder."
    W, patch = sd[v + "cls_token"].shape[-1], sd[v + "patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(TINY_BLIP["depth"]):  # pre-norm blocks, exact GELU
        b = f"{v}blocks.{i}."
        q, k, val = lin(norm(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + lin(_attention(q, k, val, W // 64), b + "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = norm(x, v + "norm", 1e-6)

    e, heads = "blip.text_encoder.", TINY_BLIP["text_heads"]
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    h = sd[e + "embeddings.word_embeddings.weight"][ids]
    h = h + sd[e + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = norm(h, e + "embeddings.LayerNorm", 1e-12)
    padding = (1.0 - mask[:, None, None, :].float()) * -10000.0  # as BLIP's med.py
    for i in range(TINY_BLIP["text_layers"]):  # post-norm: self-attention, cross-attention, feed-forward
        b = f"{e}encoder.layer.{i}."
        a, s = b + "attention.", b + "crossattention."
        h = norm(lin(_attention(lin(h, a + "self.query"), lin(h, a + "self.key"), lin(h, a + "self.value"), heads,
                                padding), a + "output.dense") + h, a + "output.LayerNorm", 1e-12)
        h = norm(lin(_attention(lin(h, s + "self.query"), lin(image, s + "self.key"), lin(image, s + "self.value"),
                                heads), s + "output.dense") + h, s + "output.LayerNorm", 1e-12)
        h = norm(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):  # no activations between the layers
        r = lin(r, f"mlp.layers.{i}")
    return (r.squeeze(-1) - MEAN) / STD


def _tokens(tokenizer_dir, prompts):
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")


# ----------------------------------------------------------------------------- scores


def test_scorer_equals_the_plain_torch_forward(files):
    images = [_image(1, 41, 57), _image(2, 64, 33), _image(3, 32, 32)]  # resized and cropped, wide and tall
    tokens = _tokens(files["tokenizer"], PROMPTS)
    assert tokens["attention_mask"].sum(1).tolist()[2] == 35 > tokens["attention_mask"].sum(1).tolist()[0]  # truncated
    sd = torch.load(files["folder"] / "ImageReward.pt", weights_only=True)
    with torch.no_grad():
        want = _oracle(sd, tokens, torch.stack([_preprocess(im, TINY_BLIP["image"]) for im in images]))
    scorer = SCORERS["image-reward"](files["folder"], files["tokenizer"])
    assert scorer.names == ["image_reward"] and isinstance(scorer, ImageRewardScorer)
    got = scorer(PROMPTS, images)["image_reward"]
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.std() > 0.05  # the scores differ: the check has teeth
    # one at a time (the batch pads every prompt to 35 tokens: nothing depends on the others)
    torch.testing.assert_close(scorer(PROMPTS[1:2], images[1:2])["image_reward"], want[1:2], atol=1e-5, rtol=1e-5)
    # the .pt file itself, and a .safetensors copy, give the same scores
    torch.testing.assert_close(ImageRewardScorer(files["folder"] / "ImageReward.pt", files["tokenizer"])(
        PROMPTS, images)["image_reward"], got)
    from safetensors.torch import save_file

    other = files["root"] / "safetensors"
    other.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(other / "ImageReward.safetensors"))
    (other / "med_config.json").write_text((files["folder"] / "med_config.json").read_text())
    torch.testing.assert_close(ImageRewardScorer(other, files["tokenizer"])(PROMPTS, images)["image_reward"], got)


def test_other_weights_other_scores(files, tmp_path):
    images = [_image(4, 40, 40)]
    other = save_tiny_image_reward(tmp_path / "seed1", files["tokenizer"], seed=1)
    one = ImageRewardScorer(files["folder"], files["tokenizer"])(PROMPTS[:1], images)["image_reward"]
    two = ImageRewardScorer(other, files["tokenizer"])(PROMPTS[:1], images)["image_reward"]
    assert not torch.allclose(one, two)


# ----------------------------------------------------------------------------- one-line errors


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


def _copy(files, folder, state=None, **med_changes):
    folder.mkdir(parents=True)
    med = json.loads((files["folder"] / "med_config.json").read_text())
    (folder / "med_config.json").write_text(json.dumps({**med, **med_changes}))
    torch.save(state if state is not None else torch.load(files["folder"] / "ImageReward.pt", weights_only=True),
               folder / "ImageReward.pt")
    return folder


def test_missing_files(files, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        ImageRewardScorer(tmp_path / "nowhere", files["tokenizer"])
    assert _one_line(e).startswith(f"--image-reward: no folder or file at {tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        ImageRewardScorer(tmp_path / "empty", files["tokenizer"])
    assert str(tmp_path / "empty" / "ImageReward.pt") in _one_line(e)
    assert f"huggingface-cli download THUDM/ImageReward --local-dir {tmp_path / 'empty'}" in str(e.value)
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "ImageReward.pt").write_bytes((files["folder"] / "ImageReward.pt").read_bytes())
    for source in (tmp_path / "lone", tmp_path / "lone" / "ImageReward.pt"):
        with pytest.raises(FileNotFoundError) as e:
            check_scorer_paths(image_reward=str(source), image_reward_tokenizer=str(files["tokenizer"]))
        assert str(tmp_path / "lone" / "med_config.json") in _one_line(e) and "--image-reward: " in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        check_scorer_paths(image_reward=str(files["folder"]), image_reward_tokenizer=str(tmp_path / "bert"))
    assert _one_line(e).startswith("--image-reward-tokenizer: ")


def test_a_checkpoint_without_the_keys_or_with_other_shapes(files, tmp_path):
    state = torch.load(files["folder"] / "ImageReward.pt", weights_only=True)
    lacking = {k: v for k, v in state.items() if ".blocks.0.attn." not in k and not k.startswith("mlp.layers.7")}
    with pytest.raises(ValueError) as e:
        check_image_reward(_copy(files, tmp_path / "lacking", lacking))
    text = _one_line(e)
    assert "not an ImageReward checkpoint" in text and str(tmp_path / "lacking" / "ImageReward.pt") in text
    assert ("missing blip.visual_encoder.blocks.0.attn.qkv.weight, blip.visual_encoder.blocks.0.attn.qkv.bias, "
            "blip.visual_encoder.blocks.0.attn.proj.weight and 3 more;") in text, text
    foreign = _copy(files, tmp_path / "foreign", {"layers.0.weight": torch.zeros(4, 2)})  # (an aesthetic head)
    with pytest.raises(ValueError) as e:
        ImageRewardScorer(foreign, files["tokenizer"])
    assert "missing blip.visual_encoder.cls_token" in _one_line(e) and "it holds layers.0.weight" in str(e.value)
    with pytest.raises(ValueError) as e:  # a med_config.json of another BERT
        ImageRewardScorer(_copy(files, tmp_path / "wide", intermediate_size=48), files["tokenizer"])
    assert "does not fit its med_config.json" in _one_line(e)
    assert "blip.text_encoder.encoder.layer.0.intermediate.dense.weight of shape (64, 32), not (48, 32)" in str(e.value)
    with pytest.raises(ValueError) as e:  # a deeper BERT in the checkpoint than in med_config.json
        check_image_reward(_copy(files, tmp_path / "shallow", num_hidden_layers=1))
    assert "unexpected blip.text_encoder.encoder.layer.1." in _one_line(e)
    (_copy(files, tmp_path / "bad_json", state) / "med_config.json").write_text("{")
    with pytest.raises(ValueError) as e:
        check_image_reward(tmp_path / "bad_json")
    assert "med_config.json: not a BERT config" in _one_line(e)


def test_a_pickled_checkpoint_needs_opt_in(files, tmp_path):
    state = torch.load(files["folder"] / "ImageReward.pt", weights_only=True)
    folder = _copy(files, tmp_path / "pickled", {**state, "args": argparse.Namespace(lr=1e-5)})
    with pytest.raises(ValueError) as e:
        ImageRewardScorer(folder, files["tokenizer"])
    assert "allow-pickle" in _one_line(e)
    assert f"{folder / 'ImageReward.pt'} holds pickled objects besides tensors (argparse.Namespace)" in str(e.value)
    with pytest.raises(ValueError) as e:  # unpickled: still not a state dict of tensors
        ImageRewardScorer(folder, files["tokenizer"], allow_pickle=True)
    assert "expected a state dict of tensors" in _one_line(e)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ImageReward.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "broken" / "med_config.json").write_text("{}")
    with pytest.raises(ValueError) as e:
        check_image_reward(tmp_path / "broken")
    assert _one_line(e).startswith(f"--image-reward: cannot read {tmp_path / 'broken' / 'ImageReward.pt'}")


def test_a_tokenizer_that_is_not_the_text_encoders(files, tmp_path):
    vocab = tiny_med_config(10)["vocab_size"]
    folder = _copy(files, tmp_path / "small_vocab", tiny_image_reward_state(vocab), vocab_size=vocab)
    with pytest.raises(ValueError) as e:
        ImageRewardScorer(folder, files["tokenizer"])
    assert _one_line(e).startswith("--image-reward-tokenizer: ") and "text encoder 10 (" in str(e.value)
    (tmp_path / "no_vocab").mkdir()  # transformers loads it as 5 special tokens, without a word
    with pytest.raises(ValueError) as e:
        check_image_reward(files["folder"], tmp_path / "no_vocab")
    assert _one_line(e).startswith(f"--image-reward-tokenizer: {tmp_path / 'no_vocab'} has 7 tokens")


def test_offline_the_default_tokenizer_fails_in_one_line(files, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty
    with pytest.raises(ValueError) as e:
        check_scorer_paths(image_reward=str(files["folder"]))
    assert _one_line(e).startswith("--image-reward-tokenizer: 'google-bert/bert-base-uncased' is not a local path")
    assert "HF_HUB_OFFLINE is set" in str(e.value) and "--local-dir" in str(e.value)


# ----------------------------------------------------------------------------- rpo-fast eval


def _eval_args(tiny_sd15_dir, tmp_path, files, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    return ["eval", "--base", str(tiny_sd15_dir), "--tuned", str(tiny_sd15_dir), "--prompts", str(prompts),
            "--output-dir", str(tmp_path / "out"), "--device", "cpu", "--no-clip", "--no-progress",
            "--num-inference-steps", "2", "--guidance-scale", "1", "--height", "16", "--width", "16",
            "--grid-cell", "16", "--image-reward-tokenizer", str(files["tokenizer"]), *extra]


def test_eval_reports_image_reward(tiny_sd15_dir, files, tmp_path, capsys):
    assert cli_main(_eval_args(tiny_sd15_dir, tmp_path, files, "--image-reward", str(files["folder"]),
                               "--images-per-prompt", "2")) == 0
    record = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(record["summary"]) == ["image_reward"]
    for row in record["per_prompt"]:
        assert len(row["base"]["image_reward"]) == len(row["tuned"]["image_reward"]) == 2
    assert record["summary"]["image_reward"]["win_rate"] == 0.5  # the tuned model is the base: same images
    assert record["settings"]["image_reward"] == str(files["folder"])
    assert "| image_reward |" in capsys.readouterr().out
    base = Image.open(tmp_path / "out" / record["per_prompt"][1]["images"]["base"][1])
    want = ImageRewardScorer(files["folder"], files["tokenizer"])([PROMPTS[1]], [base])["image_reward"]
    assert record["per_prompt"][1]["base"]["image_reward"][1] == pytest.approx(float(want), abs=1e-5)


@pytest.mark.parametrize("case", ["no folder", "no med_config", "wrong shapes", "no tokenizer vocabulary"])
def test_eval_fails_in_one_line_before_generating(tiny_sd15_dir, files, tmp_path, capsys, case):
    if case == "no folder":
        source, message = tmp_path / "missing", "--image-reward: no folder or file at"
    elif case == "no med_config":
        (tmp_path / "ir").mkdir()
        (tmp_path / "ir" / "ImageReward.pt").write_bytes(b"")
        source, message = tmp_path / "ir", "med_config.json"
    elif case == "wrong shapes":
        source, message = _copy(files, tmp_path / "ir", intermediate_size=48), "does not fit"
    else:
        (tmp_path / "bert").mkdir()
        source, message = files["folder"], "--image-reward-tokenizer: "
    args = _eval_args(tiny_sd15_dir, tmp_path, files, "--image-reward", str(source))
    if case == "no tokenizer vocabulary":
        args += ["--image-reward-tokenizer", str(tmp_path / "bert")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rpo-fast eval: error: --image-reward"), err
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing was generated
