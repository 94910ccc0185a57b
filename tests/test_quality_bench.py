"""The quality benchmark (benchmarks/quality.py) run tiny: both conditions, every method, the
grid, paired seeds, checkpoints, resumable records, the report and the plot; its rules and
its condition P's score on made-up inputs."""

import argparse
import json

import numpy as np
import pytest

from benchmarks import quality


def _namespace(argv):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_quality_runs_both_conditions_and_writes_the_report(tmp_path, short_pretrained_base):
    args = _namespace([
        "--out", str(tmp_path / "out"), "--model-dir", str(short_pretrained_base), "--work", str(tmp_path / "work"),
        "--seeds", "0", "1", "--steps", "2", "--checkpoints", "2", "--batch-pairs", "4", "--effective-betas", "100",
        "1000", "--pairs-per-caption", "1", "1", "--validation-samples", "1", "--test-samples", "1",
        "--inference-steps", "1", "--workers", "1", "--no-progress"])
    assert quality.run(args) == 0
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert set(report["conditions"]) == {"H", "P"} and len(report["rules"]) == 3
    for c in report["conditions"].values():
        assert set(c["results"]) == set(quality.METHODS)
        assert [(d["a"], d["b"]) for d in c["comparisons"]] == list(quality.COMPARISONS)
        for method, r in c["results"].items():
            assert len(r["grid"]) == (1 if method == "sft" else 2)
            assert len(r["score"]["per_seed"]) == 2 and r["seeds"] == [0, 1]
            assert [f["step"] for f in r["frontier"]] == [0, 1, 2]  # the base, a checkpoint, the end
        # one effective-beta scale: rpo's beta is the effective beta over its mean diagonal weight
        rpo, uniform = c["results"]["rpo"], c["results"]["rpo-uniform"]
        assert rpo["beta"] * c["mean_diagonal_weight"]["similarity"] == pytest.approx(rpo["beta_eff"])
        assert uniform["beta"] == uniform["beta_eff"]
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "Rules, fixed before the run" in table and "## Condition P" in table and "| rpo - dpo |" in table
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    runs = sorted((tmp_path / "work" / "runs").glob("*.json"))
    assert len(runs) == 2 * (1 + 4 * 2) + 2 * 5 * 2  # grid (sft once, four methods x two betas), 5 methods x 2 seeds
    mtimes = [p.stat().st_mtime for p in runs]
    assert quality.run(args) == 0  # a second run reuses every record
    assert [p.stat().st_mtime for p in runs] == mtimes


def test_the_rules_on_made_up_runs():
    def run(score, fidelity):
        return {"points": [{"step": 10, "score": score, "fidelity": fidelity}]}

    # setting: the best score keeping 90% of the base's fidelity, else the most faithful
    grid = [run(0.6, 0.5), run(0.4, 0.75), run(0.3, 0.8)]
    assert quality.select(grid, base_fidelity=0.8) is grid[1]
    assert quality.select(grid, base_fidelity=1.0) is grid[2]
    # score at matched fidelity: checkpoints that lost too much fidelity do not count; the base does
    base = {"step": 0, "score": 0.3, "fidelity": 0.8}
    points = [{"step": 1, "score": 0.5, "fidelity": 0.75}, {"step": 2, "score": 0.9, "fidelity": 0.6}]
    assert quality.matched_score(points, base) == 0.5
    assert quality.matched_score(points[1:], base) == 0.3
    # claims: paired differences over seeds
    assert quality.paired([0.5, 0.6, 0.55], [0.3, 0.35, 0.32])["verdict"] == "wins"
    assert quality.paired([0.3, 0.35, 0.32], [0.5, 0.6, 0.55])["verdict"] == "loses"
    tie = quality.paired([0.5, 0.3, 0.4], [0.4, 0.4, 0.4])
    assert tie["verdict"] == "no difference shown" and tie["per_seed"] == pytest.approx([0.1, -0.1, 0.0])


def test_condition_p_scores_the_style_the_captions_size_prefers():
    captions = ["a large red circle on the left on a white background",
                "a small red circle on the left on a white background"] * 2
    scores = {"style": np.array([1.0, 1.0, 0.0, 0.0]), "fidelity": np.array([1.0, 1.0, 1.0, 0.0]),
              "outline": np.array([1.0, 1.0, 0.0, 0.0]), "filled": np.array([0.0, 0.0, 1.0, 1.0])}
    # large: an outline is preferred; small: a fill, and only a faithful one counts
    assert quality.preferred_score(scores, captions, "P").tolist() == [1.0, 0.0, 0.0, 0.0]
    assert quality.preferred_score(scores, captions, "H").tolist() == [1.0, 1.0, 0.0, 0.0]


def test_the_control_embedding_leaves_out_the_size_only():
    import random

    from rpo_fast.demo.shapes import Scene, render, sample_layout

    def embed(embedder, size, colour="red"):
        scene = Scene("circle", colour, "white", size, "on the left")
        image = render(scene, sample_layout(scene, random.Random(0)), "plain")
        return embedder([scene.caption], [image])[0]

    control, full = quality.SizeBlindEmbedder(), quality.ShapesEmbedder()
    assert float(control_gap := (embed(control, "small") - embed(control, "large")).norm()) < 0.2, control_gap
    assert float((embed(full, "small") - embed(full, "large")).norm()) > 0.4
    assert float((embed(control, "small") - embed(control, "small", colour="blue")).norm()) > 0.4
