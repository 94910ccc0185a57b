"""rpo_fast.data: the three sources, label handling, unreadable images, clear errors."""

import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from rpo_fast.data import load_preference_dataset, write_pickapic_parquet

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def _img(color):
    return Image.new("RGB", (8, 8), color)


def _colors(pair):
    return pair.chosen.getpixel((0, 0)), pair.rejected.getpixel((0, 0))


@pytest.fixture
def pickapic(tmp_path):
    rows = [
        ("zero wins", _img(RED), _img(BLUE), 1.0),
        ("one wins", _img(RED), _img(BLUE), 0.0),
        ("tie", _img(RED), _img(BLUE), 0.5),
        ("broken", b"not an image", _img(BLUE), 1.0),
        ("last", _img(GREEN), _img(RED), 1.0),
    ]
    write_pickapic_parquet(tmp_path / "pp", rows, row_group_size=2)
    return tmp_path / "pp"


def test_pickapic_labels_ties_and_broken_images(pickapic):
    ds = load_preference_dataset(pickapic)
    assert len(ds) == 4
    assert [ds.prompt(i) for i in range(4)] == ["zero wins", "one wins", "broken", "last"]
    assert _colors(ds.get_pair(0)) == (RED, BLUE)
    assert _colors(ds.get_pair(1)) == (BLUE, RED)  # label_0 = 0: jpg_1 preferred
    assert ds.get_pair(2) is None  # unreadable: None, no exception
    assert _colors(ds.get_pair(3)) == (GREEN, RED)
    assert ds.get_pair(0).chosen.mode == "RGB"
    with pytest.raises(IndexError):
        ds.get_pair(4)

    with_ties = load_preference_dataset(pickapic, drop_ties=False)
    assert len(with_ties) == 5 and with_ties.prompt(2) == "tie"
    assert with_ties.fingerprint != ds.fingerprint
    assert len(load_preference_dataset(pickapic, max_rows=2)) == 2
    assert load_preference_dataset(pickapic, max_rows=2).fingerprint != ds.fingerprint
    assert ds.dropped_ties == 1 and with_ties.dropped_ties == 0
    # max_rows counts kept rows across row groups (of 2 here); ties are counted up to the stop
    first3 = load_preference_dataset(pickapic, max_rows=3)
    assert [first3.prompt(i) for i in range(3)] == ["zero wins", "one wins", "broken"]
    assert first3.dropped_ties == 1 and first3.location(2) == ds.location(2)
    assert load_preference_dataset(pickapic, max_rows=2).dropped_ties == 0
    # stable across openings, and the dataset pickles (DataLoader workers)
    again = load_preference_dataset(pickapic)
    assert again.fingerprint == ds.fingerprint
    clone = pickle.loads(pickle.dumps(ds))
    assert _colors(clone.get_pair(1)) == (BLUE, RED) and clone.fingerprint == ds.fingerprint


def test_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [b""], "label_0": [1.0]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="jpg_1"):
        load_preference_dataset(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="found none of these"):
        load_preference_dataset(empty)


def test_split_selection_from_file_names(tmp_path):
    write_pickapic_parquet(tmp_path / "train-00000-of-00001.parquet", [("t", _img(RED), _img(BLUE), 1.0)])
    write_pickapic_parquet(tmp_path / "validation_unique-00000-of-00001.parquet",
                           [("vu", _img(RED), _img(BLUE), 1.0), ("vu2", _img(RED), _img(BLUE), 1.0)])
    assert len(load_preference_dataset(tmp_path)) == 1
    assert len(load_preference_dataset(tmp_path, split="validation_unique")) == 2
    with pytest.raises(ValueError, match="no parquet files for split 'test'"):
        load_preference_dataset(tmp_path, split="test")


def test_jsonl_folder(tmp_path):
    _img(RED).save(tmp_path / "a.png")
    _img(BLUE).save(tmp_path / "b.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    lines = [
        {"prompt": "p0", "chosen": "a.png", "rejected": "b.png"},
        {"prompt": "p1", "chosen": "bad.png", "rejected": "b.png"},
        {"prompt": "p2", "chosen": "b.png", "rejected": "missing.png"},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = load_preference_dataset(tmp_path)
    assert len(ds) == 3
    assert _colors(ds.get_pair(0)) == (RED, BLUE)
    assert ds.get_pair(1) is None and ds.get_pair(2) is None
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="pairs.jsonl:1: missing key"):
        load_preference_dataset(tmp_path)


def test_datasets_library_folder(pickapic, tmp_path):
    import datasets

    hf = datasets.Dataset.from_parquet(str(pickapic / "train.parquet"))
    hf.save_to_disk(str(tmp_path / "hf"))
    ds = load_preference_dataset(tmp_path / "hf")
    assert [ds.prompt(i) for i in range(len(ds))] == ["zero wins", "one wins", "broken", "last"]
    assert _colors(ds.get_pair(1)) == (BLUE, RED)
    assert ds.get_pair(2) is None
    assert ds.dropped_ties == 1
    first3 = load_preference_dataset(tmp_path / "hf", max_rows=3)
    assert [first3.prompt(i) for i in range(3)] == ["zero wins", "one wins", "broken"]
    assert first3.get_pair(2) is None and _colors(first3.get_pair(1)) == (BLUE, RED)

    bad = datasets.Dataset.from_dict({"caption": ["a"], "label_0": [1.0]})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="expected the Pick-a-Pic columns"):
        load_preference_dataset(tmp_path / "bad")


def test_bad_arguments(pickapic):
    with pytest.raises(ValueError, match="max_rows"):
        load_preference_dataset(pickapic, max_rows=0)
    with pytest.raises(TypeError, match="source"):
        load_preference_dataset(None)


def test_fingerprint_follows_content_not_location(tmp_path):
    import shutil

    rows = [("a", _img(RED), _img(BLUE), 1.0), ("b", _img(GREEN), _img(BLUE), 0.0)]
    write_pickapic_parquet(tmp_path / "one", rows)
    shutil.copytree(tmp_path / "one", tmp_path / "copy")
    assert load_preference_dataset(tmp_path / "copy").fingerprint == load_preference_dataset(tmp_path / "one").fingerprint
    # same names, captions, labels and file size, other image bytes: another dataset
    import numpy as np

    def blobs(seed):
        rng = np.random.default_rng(seed)
        return [("a", rng.bytes(500), rng.bytes(500), 1.0), ("b", rng.bytes(500), rng.bytes(500), 0.0)]

    first = write_pickapic_parquet(tmp_path / "three", blobs(1))
    second = write_pickapic_parquet(tmp_path / "four", blobs(2))
    assert first.stat().st_size == second.stat().st_size
    assert load_preference_dataset(first).fingerprint != load_preference_dataset(second).fingerprint

    _img(RED).save(tmp_path / "x.png")
    _img(BLUE).save(tmp_path / "y.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "x.png", "rejected": "y.png"}) + "\n")
    before = load_preference_dataset(tmp_path).fingerprint
    Image.new("RGB", (9, 9), GREEN).save(tmp_path / "x.png")  # the image changes, the jsonl does not
    assert load_preference_dataset(tmp_path).fingerprint != before
