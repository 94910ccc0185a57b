"""`rpo-fast embed`: open_clip embedders, the resumable safetensors cache, the command."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rpo_fast.cli import main as cli_main
from rpo_fast.data import load_preference_dataset, write_pickapic_parquet
from rpo_fast.clip import check_open_clip_source, open_clip_embedder
from rpo_fast.embedding import build_embedding_cache, embedding_cache_info, load_embedding_cache

from tiny_scorers import TINY_CLIP_DIM, TINY_CLIP_NAME, save_tiny_open_clip, tiny_open_clip_config


def _color(i: int) -> Image.Image:
    return Image.new("RGB", (24, 24), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))


def _write_dataset(folder: Path, n: int, corrupt_rows=()):
    rows = []
    for i in range(n):
        image_0 = b"not an image" if i in corrupt_rows else _color(2 * i)
        rows.append((f"prompt {i % 4}", image_0, _color(2 * i + 1), 1.0 if i % 2 else 0.0))
    write_pickapic_parquet(folder, rows, row_group_size=4)
    return load_preference_dataset(folder)


class ColorEmbedder:
    """A cheap pluggable embedder: mean colour of the image and a prompt code; counts rows."""

    identity = "test:color"

    def __init__(self, fail_after_calls=None):
        self.rows_seen = 0
        self.calls = 0
        self.fail_after_calls = fail_after_calls

    def __call__(self, prompts, images):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt  # an interruption in the middle of the run
        self.calls += 1
        self.rows_seen += len(prompts) // 2
        color = torch.stack([torch.tensor(im.getpixel((0, 0)), dtype=torch.float32) for im in images]) / 255
        code = torch.tensor([[float(hash(p) % 7), 1.0] for p in prompts])
        return F.normalize(torch.cat([color, code], dim=1), dim=1)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return save_tiny_open_clip(folder)


def test_open_clip_embedder_modes(tiny_clip):
    images = [_color(1), _color(2), _color(1)]
    prompts = ["a cat", "a cat", "a dog"]
    text = open_clip_embedder(TINY_CLIP_NAME, str(tiny_clip), "text")(prompts, images)
    image = open_clip_embedder(TINY_CLIP_NAME, str(tiny_clip), "image")(prompts, images)
    joint_embedder = open_clip_embedder(TINY_CLIP_NAME, str(tiny_clip), "joint")
    joint = joint_embedder(prompts, images)
    for emb in (text, image, joint):
        assert emb.shape == (3, TINY_CLIP_DIM) and emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(text[0], text[1])  # same prompt, different image
    assert not torch.allclose(text[0], text[2])
    torch.testing.assert_close(image[0], image[2])  # same image, different prompt
    assert not torch.allclose(image[0], image[1])
    torch.testing.assert_close(joint, F.normalize(text + image, dim=1))
    assert "joint" in joint_embedder.identity and tiny_clip.name in joint_embedder.identity


def test_open_clip_embedder_matches_open_clip_directly(tiny_clip):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=str(tiny_clip))
    model.eval()
    with torch.no_grad():
        want = F.normalize(model.encode_image(preprocess(_color(5)).unsqueeze(0)), dim=-1)
    got = open_clip_embedder(TINY_CLIP_NAME, str(tiny_clip), "image")(["x"], [_color(5)])
    torch.testing.assert_close(got, want)


def test_open_clip_embedder_bad_sources(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        open_clip_embedder("no-such-arch", str(tiny_clip))
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        open_clip_embedder(TINY_CLIP_NAME, str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="neither a checkpoint file nor a pretrained tag"):
        open_clip_embedder("ViT-B-32", "not_a_tag")
    check_open_clip_source("ViT-H-14", "laion2B-s32B-b79K")  # open_clip's own spelling of the tag is fine
    with pytest.raises(ValueError, match="mode"):
        open_clip_embedder(TINY_CLIP_NAME, str(tiny_clip), "audio")
    with pytest.raises(ValueError, match="precision"):
        open_clip_embedder(TINY_CLIP_NAME, str(tiny_clip), precision="fp8")


def test_offline_weights_to_download_fail_at_once(tiny_clip, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from rpo_fast.clip import load_open_clip, require_open_clip_weights

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")  # (a cached name sets them all: restored after the test)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    # nothing downloaded at all: answered without importing open_clip (seconds), so without its repo name
    with pytest.raises(ValueError, match=r"^--clip-pretrained: 'laion2b_s32b_b79k' is not a local path .*HF_HUB_OFFLINE "
                                         r"is set; pass a local checkpoint file path instead \(the weights of that"):
        require_open_clip_weights("ViT-H-14", "laion2b_s32b_b79k", "--clip-pretrained")
    (tmp_path / "models--other--model" / "snapshots" / "abc").mkdir(parents=True)  # something else downloaded
    with pytest.raises(ValueError, match=r"^--clip-pretrained: 'laion2b_s32b_b79k' is not a local path .*HF_HUB_OFFLINE "
                                         r"is set; pass a local checkpoint file path instead \(open_clip_model"
                                         r"\.safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, "):
        require_open_clip_weights("ViT-H-14", "laion2b_s32b_b79k", "--clip-pretrained")
    with pytest.raises(ValueError, match="^CLIP scorer: 'openai' .* timm/vit_base_patch32_clip_224.openai"):
        load_open_clip("ViT-B-32", "openai", what="CLIP scorer")
    with pytest.raises(ValueError, match="^--model: 'hf-hub:org/clip' .*pass local-dir:FOLDER instead"):
        require_open_clip_weights("hf-hub:org/clip", None, "--model")
    (tmp_path / "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K" / "snapshots" / "abc").mkdir(parents=True)
    require_open_clip_weights("ViT-H-14", "laion2B-s32B-b79K")  # downloaded before: read from the cache
    assert constants.HF_HUB_OFFLINE is True
    require_open_clip_weights(TINY_CLIP_NAME, str(tiny_clip))  # a local file: nothing to download


def test_cache_round_trip_with_unreadable_row(tmp_path):
    dataset = _write_dataset(tmp_path / "data", 10, corrupt_rows=(3,))
    embedder = ColorEmbedder()
    out = build_embedding_cache(dataset, embedder, tmp_path / "emb.safetensors", batch_size=4, chunk_rows=4,
                                progress=False)
    emb_w, emb_l = load_embedding_cache(out, dataset)
    assert emb_w.shape == emb_l.shape == (10, 5) and emb_w.dtype == torch.float32
    for i in (0, 4, 9):
        pair = dataset.get_pair(i)
        want = ColorEmbedder()([pair.prompt] * 2, [pair.chosen, pair.rejected])
        torch.testing.assert_close(emb_w[i], want[0])
        torch.testing.assert_close(emb_l[i], want[1])
    info = embedding_cache_info(out)
    assert info["valid"].tolist() == [i != 3 for i in range(10)]
    assert torch.count_nonzero(emb_w[3]) == 0 and info["embedder"] == "test:color"
    assert not (tmp_path / "emb.safetensors.parts").exists()


def test_cache_resumes_after_interruption(tmp_path, capsys):
    dataset = _write_dataset(tmp_path / "data", 11)
    path = tmp_path / "emb.safetensors"
    with pytest.raises(KeyboardInterrupt):  # two batches of 2 pairs done = 1 chunk of 4 rows saved
        build_embedding_cache(dataset, ColorEmbedder(fail_after_calls=3), path, batch_size=2, chunk_rows=4,
                              progress=False)
    parts = tmp_path / "emb.safetensors.parts"
    assert sorted(p.name for p in parts.glob("chunk_*")) == ["chunk_000000.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        load_embedding_cache(path, dataset)

    capsys.readouterr()
    resumed = ColorEmbedder()
    build_embedding_cache(dataset, resumed, path, batch_size=2, chunk_rows=4, progress=False)
    assert resumed.rows_seen == 7  # rows 4..10 only
    assert "resuming" in capsys.readouterr().out  # without the progress bar too
    fresh = ColorEmbedder()
    build_embedding_cache(dataset, fresh, tmp_path / "fresh.safetensors", batch_size=3, progress=False)
    for a, b in zip(load_embedding_cache(path, dataset), load_embedding_cache(tmp_path / "fresh.safetensors")):
        torch.testing.assert_close(a, b)
    again = ColorEmbedder()  # a finished cache is not recomputed
    build_embedding_cache(dataset, again, path, progress=False)
    assert again.calls == 0


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    dataset = _write_dataset(tmp_path / "data", 6)
    real_save = safetensors.torch.save_file
    saves = []

    def save_then_interrupt(tensors, filename, metadata=None):
        saves.append(filename)
        real_save(tensors, filename, metadata=metadata)
        if len(saves) in (2, 4):  # the second chunk; then the merged file
            raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_interrupt)
    path = tmp_path / "emb.safetensors"
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            build_embedding_cache(dataset, ColorEmbedder(), path, batch_size=2, chunk_rows=3, progress=False)
        assert not list(tmp_path.rglob("*.tmp")) and not path.exists()
    assert all(name.endswith(".tmp") for name in saves)
    assert sorted(p.name for p in (tmp_path / "emb.safetensors.parts").glob("chunk_*")) == [
        "chunk_000000.safetensors", "chunk_000001.safetensors"]
    build_embedding_cache(dataset, ColorEmbedder(), path, progress=False)
    assert load_embedding_cache(path, dataset)[0].shape == (6, 5)


def test_cache_refuses_other_data_or_embedder(tmp_path):
    dataset = _write_dataset(tmp_path / "data", 6)
    other = _write_dataset(tmp_path / "other", 5)
    path = tmp_path / "emb.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build_embedding_cache(dataset, ColorEmbedder(fail_after_calls=1), path, batch_size=2, chunk_rows=2,
                              progress=False)
    with pytest.raises(ValueError, match="embedder"):
        build_embedding_cache(dataset, ColorEmbedder(), path, embedder_id="another", progress=False)
    with pytest.raises(ValueError, match="fingerprint"):
        build_embedding_cache(other, ColorEmbedder(), path, progress=False)
    build_embedding_cache(dataset, ColorEmbedder(), path, progress=False)
    with pytest.raises(ValueError, match="another dataset"):
        load_embedding_cache(path, other)
    with pytest.raises(ValueError, match="embedder"):
        build_embedding_cache(dataset, ColorEmbedder(), path, embedder_id="another", progress=False)
    with pytest.raises(ValueError, match="pass overwrite=True"):  # the Python API's remedy
        build_embedding_cache(dataset, ColorEmbedder(), path, embedder_id="another", progress=False)
    rebuilt = ColorEmbedder()
    build_embedding_cache(dataset, rebuilt, path, embedder_id="another", overwrite=True, progress=False)
    assert rebuilt.rows_seen == 6 and embedding_cache_info(path)["embedder"] == "another"


def _write_with_ties(folder: Path, n: int) -> Path:
    """Rows 4, 9, 14, ... are ties."""
    rows = [(f"prompt {i}", _color(2 * i), _color(2 * i + 1), 0.5 if i % 5 == 4 else float(i % 2)) for i in range(n)]
    write_pickapic_parquet(folder, rows, row_group_size=4)
    return folder


def test_cache_serves_fewer_rows_of_the_same_data_and_names_other_settings(tmp_path):
    folder = _write_with_ties(tmp_path / "data", 20)  # 16 rows without the ties

    def data(drop_ties=True, max_rows=None):
        return load_preference_dataset(folder, drop_ties=drop_ties, max_rows=max_rows)

    def build(name, **settings):
        settings = {"source": str(folder.resolve()), "split": "train", "drop_ties": True, "max_rows": None, **settings}
        dataset = data(settings["drop_ties"], settings["max_rows"])
        return build_embedding_cache(dataset, ColorEmbedder(), tmp_path / name, data_settings=settings, progress=False)

    every = build("all.safetensors")
    emb_w, emb_l = load_embedding_cache(every, data())
    first_w, first_l = load_embedding_cache(every, data(max_rows=8))  # `train --max-rows 8` on a full cache
    assert first_w.shape == (8, 5) and torch.equal(first_w, emb_w[:8]) and torch.equal(first_l, emb_l[:8])
    with pytest.raises(ValueError, match=r"all\.safetensors: built with ties dropped, this run keeps them;"):
        load_embedding_cache(every, data(drop_ties=False))

    kept = build("kept.safetensors", drop_ties=False)
    with pytest.raises(ValueError, match=r"built with ties kept \(--keep-ties\), this run drops them; built for all "
                                         r"20 rows, this run uses the first 8 rows \(--max-rows 8\)"):
        load_embedding_cache(kept, data(max_rows=8))
    first = build("first5.safetensors", max_rows=5)
    with pytest.raises(ValueError, match=r"built for the first 5 rows \(--max-rows 5\), this run uses all 16 rows"):
        load_embedding_cache(first, data())
    assert load_embedding_cache(first, data(max_rows=3))[0].shape == (3, 5)

    _write_with_ties(folder, 21)  # the data changed: its first rows are no longer the cache's to vouch for
    with pytest.raises(ValueError, match="changed since it was built"):
        load_embedding_cache(every, data(max_rows=8))
    old = build_embedding_cache(data(), ColorEmbedder(), tmp_path / "old.safetensors", progress=False)
    with pytest.raises(ValueError, match="built for another dataset"):  # no settings recorded: as before
        load_embedding_cache(old, data(max_rows=8))


def test_cache_argument_errors(tmp_path):
    dataset = _write_dataset(tmp_path / "data", 2)
    with pytest.raises(ValueError, match="batch_size"):
        build_embedding_cache(dataset, ColorEmbedder(), tmp_path / "e.safetensors", batch_size=0)
    with pytest.raises(ValueError, match=r"\.safetensors"):
        build_embedding_cache(dataset, ColorEmbedder(), tmp_path / "e.pt")
    with pytest.raises(TypeError, match="embedder"):
        build_embedding_cache(dataset, "clip", tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="expected a \\(B, E\\) tensor"):
        build_embedding_cache(dataset, lambda p, i: torch.zeros(len(p)), tmp_path / "e.safetensors", progress=False)
    with pytest.raises(FileNotFoundError, match="no file"):
        load_embedding_cache(tmp_path / "missing.safetensors")


def test_embed_command(tiny_clip, tmp_path, capsys):
    _write_dataset(tmp_path / "data", 5)
    config = tiny_open_clip_config(tmp_path / "cfg")
    out = tmp_path / "emb.safetensors"
    args = ["embed", "--data", str(tmp_path / "data"), "--output", str(out), "--model", TINY_CLIP_NAME,
            "--pretrained", str(tiny_clip), "--open-clip-config", str(config), "--batch-size", "2",
            "--device", "cpu", "--storage-dtype", "float16", "--no-progress"]
    assert cli_main(args) == 0
    dataset = load_preference_dataset(tmp_path / "data")
    emb_w, emb_l = load_embedding_cache(out, dataset)
    assert emb_w.shape == (5, TINY_CLIP_DIM) and emb_w.dtype == torch.float32
    pair = dataset.get_pair(2)
    want = open_clip_embedder(TINY_CLIP_NAME, str(tiny_clip), "joint")([pair.prompt], [pair.rejected])
    torch.testing.assert_close(emb_l[2], want[0], atol=2e-3, rtol=0)  # float16 on disk
    assert "5 rows" in capsys.readouterr().out

    assert cli_main(args + ["--max-rows", "3"]) == 2  # the command line's wording, and the real cause
    err = capsys.readouterr().err
    assert "built for all 5 rows, this run uses the first 3 rows (--max-rows 3)" in err
    assert err.rstrip().endswith("choose another --output or pass --overwrite") and "overwrite=True" not in err

    bad = list(args)
    bad[bad.index("--pretrained") + 1] = str(tmp_path / "nope.safetensors")
    assert cli_main(bad + ["--overwrite"]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert load_embedding_cache(out)[0].shape == (5, TINY_CLIP_DIM)  # a failed run deletes nothing
