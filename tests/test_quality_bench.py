"""The quality benchmark (benchmarks/quality.py), run tiny: selection, seeds, the steps
curve, resumable records, the table and the plot; and its two rules on made-up records."""

import argparse
import json

import pytest

from benchmarks import quality


def _namespace(argv):
    parser = argparse.ArgumentParser()
    quality.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_quality_selects_runs_seeds_and_writes_the_table(tmp_path, short_pretrained_base):
    args = _namespace([
        "--out", str(tmp_path / "out"), "--model-dir", str(short_pretrained_base), "--work", str(tmp_path / "work"), "--methods", "sft", "rpo", "rpo-uniform", "--lora-rank", "0",
        "--seeds", "0", "1", "--steps", "2", "--curve-points", "2", "--batch-pairs", "4", "--betas", "100", "1000", "--learning-rates", "1e-5",
        "--validation-samples", "1", "--test-samples", "1", "--inference-steps", "1", "--pairs-per-caption", "1",
        "--no-progress"])
    assert quality.run(args) == 0
    report = json.loads((tmp_path / "out" / "quality.json").read_text())
    assert set(report["results"]) == {"sft", "rpo", "rpo-uniform"}
    assert len(report["selection"]["rpo"]["grid"]) == 2 and len(report["selection"]["sft"]["grid"]) == 1
    # the ablation trains at RPO's chosen setting, with uniform weights: no grid of its own
    uniform, rpo = report["selection"]["rpo-uniform"], report["selection"]["rpo"]
    assert uniform["grid"] == [] and (uniform["beta"], uniform["learning_rate"]) == (rpo["beta"], rpo["learning_rate"])
    for r in report["results"].values():
        assert len(r["style_rate"]["per_seed"]) == 2 and r["style_rate"]["ci95"] >= 0
        assert [c["step"] for c in r["curve"]] == [0, 1, 2]  # base, the mid-run checkpoint, the end
    assert report["winner"]["method"] in ("sft", "rpo", "rpo-uniform")
    table = (tmp_path / "out" / "quality.md").read_text()
    assert "| rpo |" in table and "Winner" in table and "Rules fixed before the run" in table
    assert (tmp_path / "out" / "quality.png").stat().st_size > 0
    runs = sorted((tmp_path / "work" / "runs").glob("*.json"))
    assert len(runs) == 2 + 3 + 6  # base (validation, test), 3 grid runs, 3 methods x 2 seeds
    mtimes = [p.stat().st_mtime for p in runs]
    assert quality.run(args) == 0  # a second run reuses every record
    assert [p.stat().st_mtime for p in runs] == mtimes


def test_bench_quality_selection_respects_the_fidelity_constraint():
    from benchmarks.quality import _select, _winner

    def rec(style, fid):
        return {"style_rate": {"mean": style}, "fidelity": {"mean": fid}}

    records = [rec(0.6, 0.5), rec(0.4, 0.75), rec(0.3, 0.8)]
    assert _select(records, base_fidelity=0.8) is records[1]  # 0.75 >= 0.72; 0.5 is not
    assert _select(records, base_fidelity=1.0) is records[2]  # none within 10%: the most faithful
    results = {"a": {"style_rate": {"mean": 0.5, "ci95": 0.05}, "fidelity": {"mean": 0.8}},
               "b": {"style_rate": {"mean": 0.3, "ci95": 0.05}, "fidelity": {"mean": 0.8}}}
    assert _winner(results, 0.8) == {"method": "a", "runner_up": "b", "cis_separate": True,
                                     "fidelity_constraint_met": True, "excluded_by_fidelity": {}}
    # the most stylish method is out when its fidelity falls more than 10% (0.7 < 0.72)
    results["c"] = {"style_rate": {"mean": 0.9, "ci95": 0.05}, "fidelity": {"mean": 0.7}}
    winner = _winner(results, 0.8)
    assert winner["method"] == "a" and winner["excluded_by_fidelity"] == {"c": pytest.approx(-0.125)}
