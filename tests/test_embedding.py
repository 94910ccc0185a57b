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


def test_cache_resumes_after_interruption(tmp_path):
    dataset = _write_dataset(tmp_path / "data", 11)
    path = tmp_path / "emb.safetensors"
    with pytest.raises(KeyboardInterrupt):  # two batches of 2 pairs done = 1 chunk of 4 rows saved
        build_embedding_cache(dataset, ColorEmbedder(fail_after_calls=3), path, batch_size=2, chunk_rows=4,
                              progress=False)
    parts = tmp_path / "emb.safetensors.parts"
    assert sorted(p.name for p in parts.glob("chunk_*")) == ["chunk_000000.safetensors"]
    with pytest.raises(ValueError, match="incomplete"):
        load_embedding_cache(path, dataset)

    resumed = ColorEmbedder()
    build_embedding_cache(dataset, resumed, path, batch_size=2, chunk_rows=4, progress=False)
    assert resumed.rows_seen == 7  # rows 4..10 only
    fresh = ColorEmbedder()
    build_embedding_cache(dataset, fresh, tmp_path / "fresh.safetensors", batch_size=3, progress=False)
    for a, b in zip(load_embedding_cache(path, dataset), load_embedding_cache(tmp_path / "fresh.safetensors")):
        torch.testing.assert_close(a, b)
    again = ColorEmbedder()  # a finished cache is not recomputed
    build_embedding_cache(dataset, again, path, progress=False)
    assert again.calls == 0


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
    rebuilt = ColorEmbedder()
    build_embedding_cache(dataset, rebuilt, path, embedder_id="another", overwrite=True, progress=False)
    assert rebuilt.rows_seen == 6 and embedding_cache_info(path)["embedder"] == "another"


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

    bad = list(args)
    bad[bad.index("--pretrained") + 1] = str(tmp_path / "nope.safetensors")
    assert cli_main(bad + ["--overwrite"]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert load_embedding_cache(out)[0].shape == (5, TINY_CLIP_DIM)  # a failed run deletes nothing
