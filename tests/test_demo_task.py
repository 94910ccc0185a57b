"""The demo's procedural shapes task and its scores, on rendered ground-truth images."""

import io
import itertools

import numpy as np
import pytest
from PIL import Image, ImageFilter

from rpo_fast.demo import shapes
from rpo_fast.evaluation import shapes_score


def _rendered(style, seed=0, per_scene=1, scenes=None):
    samples = shapes.scene_samples(scenes or shapes.all_scenes(), per_scene, seed)
    return [shapes.render(s, layout, style) for s, layout in samples], [s.caption for s, _ in samples]


def test_captions_round_trip_and_are_unique():
    scenes = shapes.all_scenes()
    captions = [s.caption for s in scenes]
    assert len(set(captions)) == len(captions) == 216
    for scene in scenes[::17]:
        assert shapes.parse_caption(scene.caption) == scene
    with pytest.raises(ValueError, match="caption"):
        shapes.parse_caption("a purple hexagon")


def test_rendering_is_deterministic_from_the_seed():
    a, caps_a = _rendered("sketch", seed=3, scenes=shapes.all_scenes()[:20])
    b, caps_b = _rendered("sketch", seed=3, scenes=shapes.all_scenes()[:20])
    c, caps_c = _rendered("sketch", seed=4, scenes=shapes.all_scenes()[:20])
    assert caps_a == caps_b
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert caps_a != caps_c or any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, c))
    assert a[0].size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE) and a[0].mode == "RGB"


def test_splits_are_disjoint_deterministic_and_compositional():
    split = shapes.split_scenes(seed=0, validation=24, test=24)
    assert split == shapes.split_scenes(seed=0, validation=24, test=24)
    assert split != shapes.split_scenes(seed=1, validation=24, test=24)
    names = {k: {s.caption for s in v} for k, v in split.items()}
    assert len(names["validation"]) == len(names["test"]) == 24
    assert not (names["train"] & names["validation"]) and not (names["train"] & names["test"])
    assert not (names["validation"] & names["test"])
    assert sum(len(v) for v in names.values()) == len(shapes.all_scenes())
    train_pairs = {p for s in split["train"] for p in shapes._attribute_pairs(s)}
    for scene in split["validation"] + split["test"]:
        assert set(shapes._attribute_pairs(scene)) <= train_pairs
    with pytest.raises(ValueError, match="validation"):
        shapes.split_scenes(validation=200, test=100)


def test_sketch_keeps_the_border_and_empties_the_interior():
    scene = shapes.Scene("square", "red", "white", "large", "in the center")
    layout = shapes.Layout(16.0, 16.0, 22.0)
    plain = np.asarray(shapes.render(scene, layout, "plain")).astype(int)
    sketch = np.asarray(shapes.render(scene, layout, "sketch")).astype(int)
    assert np.abs(plain[16, 16] - shapes.COLOURS["red"]).max() < 5
    assert np.abs(sketch[16, 16] - shapes.BACKGROUNDS["white"]).max() < 5
    assert np.abs(sketch[16, 6] - shapes.COLOURS["red"]).max() < 5  # on the outline (x = 5..7.5)
    with pytest.raises(ValueError, match="style"):
        shapes.render(scene, layout, "watercolour")


def test_style_rate_on_ground_truth():
    """Rendered outlines are outlines, rendered fills are fills, image by image."""
    for seed in (1, 2):
        plain, captions = _rendered("plain", seed=seed)
        sketch, _ = _rendered("sketch", seed=seed)
        s_plain, s_sketch = shapes_score.score_images(plain, captions), shapes_score.score_images(sketch, captions)
        assert s_plain["style"].max() == 0.0 and s_plain["outline"].max() == 0.0
        assert s_plain["filled"].mean() == 1.0
        assert s_sketch["style"].mean() >= 0.97  # a few small triangles leave too small an interior to judge
        assert s_sketch["filled"].max() == 0.0
        assert set(np.unique(s_sketch["style"])) <= {0.0, 1.0}


def _corrupt(image, kind, strength, rng, background):
    pixels = np.asarray(image).astype(np.float32)
    if kind == "pixel noise":
        pixels = pixels + rng.normal(0.0, strength, pixels.shape)
    elif kind == "speckle":  # a fraction of the pixels replaced by the background
        pixels[rng.random(pixels.shape[:2]) < strength] = background
    elif kind == "salt and pepper":
        u = rng.random(pixels.shape[:2])
        pixels[u < strength / 2] = 0
        pixels[(u >= strength / 2) & (u < strength)] = 255
    elif kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(strength))
    elif kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=int(strength))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


DAMAGE = [("pixel noise", s) for s in (10, 30, 60, 100)] + [("speckle", s) for s in (0.1, 0.3, 0.5, 0.7, 0.9)] + [
    ("salt and pepper", s) for s in (0.1, 0.3, 0.5)] + [("blur", s) for s in (0.5, 1.0, 2.0)] + [
    ("jpeg", q) for q in (90, 50, 20, 5)]


@pytest.mark.parametrize("kind,strength", DAMAGE, ids=[f"{k}-{s}" for k, s in DAMAGE])
def test_damaged_fills_are_never_the_style(kind, strength):
    """The failures a hollowness score mistook for outlines: a filled shape with holes
    punched in by noise, speckle, blur or compression is never judged an outline."""
    rng = np.random.default_rng(0)
    samples = shapes.scene_samples(shapes.all_scenes()[::2], 1, 5)
    images = [_corrupt(shapes.render(s, layout, "plain"), kind, strength, rng, shapes.BACKGROUNDS[s.background])
              for s, layout in samples]
    result = shapes_score.score_images(images, [s.caption for s, _ in samples])
    assert result["outline"].sum() == 0 and result["style"].sum() == 0


@pytest.mark.parametrize("kind,strength,rate", [("pixel noise", 10, 0.9), ("blur", 0.5, 0.9), ("jpeg", 95, 0.75)])
def test_lightly_damaged_outlines_are_still_the_style(kind, strength, rate):
    """Not brittle: a sampler's faint noise or softness keeps most outlines outlines (JPEG's
    chroma subsampling smears a 2-pixel coloured line, so fewer survive it)."""
    rng = np.random.default_rng(0)
    samples = shapes.scene_samples(shapes.all_scenes()[::3], 1, 5)
    images = [_corrupt(shapes.render(s, layout, "sketch"), kind, strength, rng, shapes.BACKGROUNDS[s.background])
              for s, layout in samples]
    assert shapes_score.score_images(images, [s.caption for s, _ in samples])["style"].mean() >= rate


def test_outlines_of_the_wrong_shape_or_colour_are_not_the_style():
    images, captions = _rendered("sketch", seed=2)
    for attribute, values in (("shape", shapes.SHAPES), ("colour", list(shapes.COLOURS))):
        wrong = []
        for caption in captions:
            scene = shapes.parse_caption(caption)
            other = values[(list(values).index(getattr(scene, attribute)) + 1) % len(values)]
            wrong.append(shapes.Scene(**{**scene.__dict__, attribute: other}).caption)
        assert shapes_score.score_images(images, wrong)["style"].sum() == 0, attribute


@pytest.mark.parametrize("style", ["plain", "sketch"])
def test_fidelity_is_one_for_the_right_caption_and_zero_for_a_wrong_one(style):
    images, captions = _rendered(style, seed=2)
    assert shapes_score.score_images(images, captions)["fidelity"].mean() == 1.0
    by_caption = {shapes.parse_caption(c): c for c in captions}
    for attribute, values in (("shape", shapes.SHAPES), ("colour", list(shapes.COLOURS))):
        wrong = []
        for c in captions:
            scene = shapes.parse_caption(c)
            other = next(v for v in itertools.islice(itertools.cycle(values), values.index(getattr(scene, attribute)) + 1, None))
            wrong.append(shapes.Scene(**{**scene.__dict__, attribute: other}).caption)
        result = shapes_score.score_images(images, wrong)
        assert result["fidelity"].mean() == 0.0, attribute
        assert result[f"{attribute}_ok"].mean() == 0.0
    assert len(by_caption) == len(shapes.all_scenes())


def test_fidelity_catches_collapse():
    caption = shapes.all_scenes()[0].caption
    blank = np.full((32, 32, 3), 245, np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    for image in (blank, noise):
        s = shapes_score.score_image(image, caption)
        assert s.fidelity == 0.0 and not s.present
        assert s.style == 0.0 and s.drawing == "neither"


@pytest.mark.parametrize("pixels", [[(5, 7)], [(5, 7), (9, 7)], [(2, 2), (4, 4), (6, 6)]], ids=["one", "two", "collinear"])
def test_hull_of_degenerate_masks(pixels):
    """A sampler can leave one speck or a thin line of foreground: the hull is those pixels
    (found in a quality run, where one such image stopped the benchmark)."""
    mask = np.zeros((32, 32), dtype=bool)
    for x, y in pixels:
        mask[y, x] = True
    hull = shapes_score.hull_mask(mask)
    assert hull[mask].all()
    xs = [x for x, _ in pixels]
    assert hull.sum() == max(xs) - min(xs) + 1  # the segment between the end pixels, no more
    image = np.full((32, 32, 3), 255, dtype=np.uint8)
    image[mask] = (220, 30, 30)
    assert shapes_score.score_image(image, shapes.all_scenes()[0].caption).fidelity == 0.0


def test_scores_reject_bad_input():
    with pytest.raises(ValueError, match="image"):
        shapes_score.score_image(np.zeros((32, 32)), shapes.all_scenes()[0].caption)
    with pytest.raises(ValueError, match="equal lengths"):
        shapes_score.score_images([np.zeros((32, 32, 3))], [])


def test_shapes_scorer_is_an_evaluation_scorer():
    """``shapes`` in the evaluation's scorer registry: (prompts, images) -> {metric: (B,)
    float32 tensor}, the same values as score_images; ``rpo-fast eval --shapes-score`` uses it."""
    import random

    import torch

    from rpo_fast.evaluation.evaluate import EvalConfig, _scorers
    from rpo_fast.evaluation.scorers import SCORERS

    rng = random.Random(0)
    scenes = shapes.all_scenes()[::37]
    images = [shapes.render(s, shapes.sample_layout(s, rng), style) for s in scenes for style in ("plain", "sketch")]
    captions = [s.caption for s in scenes for _ in ("plain", "sketch")]
    scorer = SCORERS["shapes"]()
    got = scorer(captions, images)
    want = shapes_score.score_images(images, captions)
    assert sorted(got) == sorted(scorer.names) == sorted(want)
    for name, value in got.items():
        assert value.dtype == torch.float32 and value.shape == (len(images),)
        assert np.array_equal(value.numpy(), want[name])
    assert got["style"].tolist() == [0.0, 1.0] * len(scenes) and got["fidelity"].min() == 1.0
    config = EvalConfig(base="b", tuned="t", prompts="p", output_dir="o", clip=False, shapes_score=True)
    assert [name for name, _ in _scorers(config, "cpu", None)] == ["shapes"]
