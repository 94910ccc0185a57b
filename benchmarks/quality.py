"""SFT vs DPO vs RPO on the demo's style task: ``python -m benchmarks.quality`` (``make bench-quality``).

The protocol, fixed before any run (and printed with the results):

* every method fine-tunes the committed demo base with the same data, steps and batch size
  through the stock ``rpo_fast.train`` trainer and the public losses;
* per method, a small grid (learning rate; beta for DPO and RPO) trains with seed 0 and is
  scored on the **validation** captions. Setting rule: the highest ``style_rate`` among the
  settings whose fidelity is at least 90% of the base's; if none is, the most faithful.
  ``rpo-uniform`` (the ablation) takes RPO's chosen setting, so that the two differ only in
  the weights;
* the chosen setting trains with every seed and is scored on the **test** captions (the
  same sampling seeds for every run, so seeds vary only the training); mean and 95%
  t-interval over seeds. Winner rule: the highest mean test ``style_rate`` among the methods
  whose mean test fidelity is at least 90% of the base's;
* reported besides: (a) the frontier of validation style rate against fidelity of every grid
  point, per method; (b) style rate against training steps at the chosen setting (seed 0,
  test captions, checkpoints at quarters of the run): sample efficiency; (c) RPO with
  similarity weights against RPO with uniform weights (``rpo-uniform``), the paper's claim.

Every finished run is recorded in ``<work>/runs/*.json`` and skipped when the command runs
again, so an interrupted benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from rpo_fast.demo.base_model import BASE_DIR, base_exists, load_pipeline
from rpo_fast.demo.datasets import write_style_data, write_style_embeddings
from rpo_fast.demo.evaluate import GUIDANCE_SCALE, INFERENCE_STEPS, evaluate
from rpo_fast.demo.finetune import FinetuneSettings, finetune
from rpo_fast.demo.scores import MAX_FIDELITY_DROP, keeps_fidelity
from rpo_fast.demo.shapes import split_scenes
from rpo_fast.demo.stats import mean_ci
from rpo_fast.machine import cpu_cores, cpu_model

METRICS = ("style_rate", "fidelity")
SCORE_KEYS = {"style_rate": "style", "fidelity": "fidelity"}  # metric -> the per-image score it averages

METHODS = ("sft", "dpo", "rpo", "rpo-uniform")  # rpo-uniform: RPO with weights 1/M (no embeddings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="benchmarks/results", help="where quality.md, quality.json, quality.png go")
    parser.add_argument("--work", default="bench_quality_work", help="data, runs and their records")
    parser.add_argument("--model-dir", default=str(BASE_DIR))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=FinetuneSettings.steps)
    parser.add_argument("--batch-pairs", type=int, default=FinetuneSettings.batch_pairs)
    parser.add_argument("--betas", nargs="+", type=float, default=[500.0, 2500.0], help="grid for DPO and RPO")
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-4, 3e-4], help="grid for all")
    parser.add_argument("--lora-rank", type=int, default=FinetuneSettings.lora_rank,
                        help="LoRA rank of every fine-tune (0: full fine-tuning)")
    parser.add_argument("--sft-weight", type=float, default=0.0,
                        help="dpo / rpo: plus this times the SFT loss of the preferred images (default 0: the "
                             "methods' own losses, unlike the demo's default)")
    parser.add_argument("--validation-samples", type=int, default=2, help="images per validation caption")
    parser.add_argument("--test-samples", type=int, default=4, help="images per test caption")
    parser.add_argument("--inference-steps", type=int, default=INFERENCE_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--pairs-per-caption", type=int, default=8)
    parser.add_argument("--curve-points", type=int, default=4,
                        help="points of the style-against-steps curve (checkpoints at equal intervals)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (unset: torch's default)")
    parser.add_argument("--no-progress", action="store_true")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.model_dir = Path(args.model_dir)
        self.progress = not args.no_progress
        self.data = write_style_data(self.work / "style-train", split="train", per_scene=args.pairs_per_caption)
        self.embeddings = write_style_embeddings(self.data)
        self.scenes = split_scenes()
        self._base_pipe = None

    def _eval_kwargs(self, split: str) -> Dict:
        samples = self.args.validation_samples if split == "validation" else self.args.test_samples
        return dict(samples_per_prompt=samples, seed=0, steps=self.args.inference_steps,
                    guidance_scale=self.args.guidance_scale, progress=self.progress)

    def _record(self, name: str, compute) -> Dict:
        path = self.work / "runs" / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
        record = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)
        return record

    def _scores(self, pipe, split: str, desc: str) -> Dict:
        ev = evaluate(pipe, self.scenes[split], desc=desc, **self._eval_kwargs(split))
        out = {}
        for metric in METRICS:
            mean, half = ev.summary(SCORE_KEYS[metric])
            out[metric] = {"mean": mean, "ci95_over_prompts": half,
                           "per_prompt": ev.per_prompt(SCORE_KEYS[metric]).tolist()}
        return out

    def base(self, split: str) -> Dict:
        def compute():
            if self._base_pipe is None:
                self._base_pipe = load_pipeline(self.model_dir)
            return {"split": split, **self._scores(self._base_pipe, split, f"base ({split})")}
        return self._record(f"base-{split}", compute)

    def run(self, method: str, beta: float, lr: float, seed: int, split: str, curve: bool = False) -> Dict:
        """One fine-tune scored on ``split``; with ``curve``, also every intermediate
        checkpoint (``--curve-points`` in all), as ``record["curve"]``."""
        settings = FinetuneSettings(method="rpo" if method == "rpo-uniform" else method, beta=beta, learning_rate=lr,
                                    steps=self.args.steps, batch_pairs=self.args.batch_pairs,
                                    lora_rank=self.args.lora_rank,
                                    sft_weight=self.args.sft_weight, seed=seed)
        name = (f"{method}-beta{beta:g}-lr{lr:g}-rank{settings.lora_rank}-sft{settings.sft_weight:g}-steps{settings.steps}"
                f"-bp{settings.batch_pairs}-seed{seed}-{split}")
        every = max(1, settings.steps // self.args.curve_points) if curve else 0
        if curve:
            name += f"-curve{self.args.curve_points}"

        def compute():
            start = time.perf_counter()
            out_dir = self.work / "train" / name
            unet, checkpoints = finetune(self.model_dir, self.data, out_dir, settings,
                                         embeddings=self.embeddings if method == "rpo" else None,
                                         latent_cache=self.work / "latents", progress=self.progress,
                                         checkpoint_every=every)
            train_s = time.perf_counter() - start
            record = {"method": method, "beta": beta, "learning_rate": lr, "seed": seed, "split": split,
                      "steps": settings.steps, "batch_pairs": settings.batch_pairs, "train_seconds": train_s,
                      **self._scores(load_pipeline(self.model_dir, unet), split, name)}
            if curve:
                record["curve"] = [{"step": 0, **{m: self.base(split)[m]["mean"] for m in METRICS}}]
                for step, path in sorted(checkpoints.items()):
                    if step < settings.steps:
                        scores = self._scores(load_pipeline(self.model_dir, checkpoint=path), split, f"{name}@{step}")
                        record["curve"].append({"step": step, **{m: scores[m]["mean"] for m in METRICS}})
                record["curve"].append({"step": settings.steps, **{m: record[m]["mean"] for m in METRICS}})
            shutil.rmtree(out_dir, ignore_errors=True)  # keep only the record
            return record
        return self._record(name, compute)


def _select(records: List[Dict], base_fidelity: float) -> Dict:
    ok = [r for r in records if keeps_fidelity(r["fidelity"]["mean"], base_fidelity)]
    if ok:
        return max(ok, key=lambda r: (r["style_rate"]["mean"], r["fidelity"]["mean"]))
    return max(records, key=lambda r: (r["fidelity"]["mean"], r["style_rate"]["mean"]))


def run(args: argparse.Namespace) -> int:
    import torch

    if not args.sft_weight >= 0:
        raise ValueError(f"--sft-weight: expected a non-negative number, got {args.sft_weight}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank: expected 0 (full fine-tuning) or a positive int, got {args.lora_rank}")
    for name in ("steps", "batch_pairs", "validation_samples", "test_samples", "inference_steps", "pairs_per_caption",
                 "curve_points"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if len(args.seeds) < 2:
        raise ValueError(f"--seeds: expected at least 2 seeds for a confidence interval, got {args.seeds}")
    if not base_exists(args.model_dir):
        raise ValueError(f"--model-dir: no base model in {args.model_dir}; run `rpo-fast demo --pretrain` first")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bench = Bench(args)
    base_val, base_test = bench.base("validation"), bench.base("test")

    selection: Dict[str, Dict] = {}
    tuned = [m for m in args.methods if not (m == "rpo-uniform" and "rpo" in args.methods)]
    for method in tuned:
        betas = [0.0] if method == "sft" else args.betas
        grid = [bench.run(method, b, lr, args.seeds[0], "validation")
                for b, lr in itertools.product(betas, args.learning_rates)]
        chosen = _select(grid, base_val["fidelity"]["mean"])
        selection[method] = {"beta": chosen["beta"], "learning_rate": chosen["learning_rate"],
                             "grid": [{k: r[k] for k in ("beta", "learning_rate")} |
                                      {m: r[m]["mean"] for m in METRICS} for r in grid]}
        print(f"[bench-quality] {method}: chose beta={chosen['beta']:g} lr={chosen['learning_rate']:g} "
              f"(validation style rate {chosen['style_rate']['mean']:.3f}, fidelity {chosen['fidelity']['mean']:.3f})")
    if "rpo-uniform" not in tuned and "rpo-uniform" in args.methods:
        selection["rpo-uniform"] = {**selection["rpo"], "grid": [], "as": "rpo"}  # the ablation: RPO's setting

    results: Dict[str, Dict] = {}
    for method in args.methods:
        s = selection[method]
        runs = [bench.run(method, s["beta"], s["learning_rate"], seed, "test", curve=seed == args.seeds[0])
                for seed in args.seeds]
        entry = {"beta": s["beta"], "learning_rate": s["learning_rate"], "seeds": args.seeds,
                 "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs])), "curve": runs[0]["curve"]}
        for metric in METRICS:
            values = [r[metric]["mean"] for r in runs]
            mean, half = mean_ci(values)
            entry[metric] = {"mean": mean, "ci95": half, "per_seed": values}
        results[method] = entry

    report = {
        "task": "shapes style alignment (sketch preferred over plain), 32x32, rpo-fast demo base model",
        "protocol": {k: getattr(args, k) for k in ("steps", "batch_pairs", "betas", "learning_rates", "lora_rank", "sft_weight", "seeds",
                                                     "validation_samples", "test_samples", "inference_steps",
                                                     "guidance_scale", "pairs_per_caption", "curve_points")},
        "machine": f"{cpu_model()}, {cpu_cores()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "base": {split: {m: {"mean": b[m]["mean"], "ci95_over_prompts": b[m]["ci95_over_prompts"]}
                         for m in METRICS} for split, b in (("validation", base_val), ("test", base_test))},
        "selection": selection,
        "results": results,
        "winner": _winner(results, base_test["fidelity"]["mean"]),
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    (out / "quality.md").write_text(format_table(report))
    _plot(out / "quality.png", report)
    print(format_table(report))
    return 0


def _winner(results: Dict[str, Dict], base_fidelity: float) -> Dict:
    """Highest mean style rate among methods keeping fidelity within 10% of the base; whether its
    CI separates it from the runner-up; and the methods the fidelity rule excluded, with their
    relative fidelity change."""
    ok = {m: r for m, r in results.items() if keeps_fidelity(r["fidelity"]["mean"], base_fidelity)}
    excluded = {m: r["fidelity"]["mean"] / base_fidelity - 1 for m, r in results.items() if m not in ok}
    pool = ok or results
    ranked = sorted(pool, key=lambda m: pool[m]["style_rate"]["mean"], reverse=True)
    best = ranked[0]
    separated: Optional[bool] = None
    if len(ranked) > 1:
        a, b = pool[best]["style_rate"], pool[ranked[1]]["style_rate"]
        separated = bool(a["mean"] - a["ci95"] > b["mean"] + b["ci95"])
    return {"method": best, "runner_up": ranked[1] if len(ranked) > 1 else None,
            "cis_separate": separated, "fidelity_constraint_met": bool(ok),
            "excluded_by_fidelity": excluded if ok else {}}


def format_table(report: Dict) -> str:
    base = report["base"]["test"]
    p = report["protocol"]
    lines = [
        "# Quality: SFT vs DPO vs RPO on the shapes style task",
        "",
        f"Fine-tuning the demo base model toward the sketch style: {p['steps']} steps x {p['batch_pairs']} pairs, "
        + (f"LoRA rank {p['lora_rank']}, " if p.get("lora_rank") else "full fine-tuning, ")
        + f"the setting of each method chosen on the validation captions (grid: lr {p['learning_rates']}, "
        f"beta {p['betas']}; rpo-uniform, the ablation, takes rpo's setting); scored on 24 held-out test captions x {p['test_samples']} samples (DDIM "
        f"{p['inference_steps']} steps, guidance {p['guidance_scale']:g}). Mean and 95% t-interval over "
        f"{len(p['seeds'])} training seeds {p['seeds']}. Machine: {report['machine']}.",
        "",
        "Rules fixed before the run: a method's setting is the most stylish on validation among those keeping "
        f"fidelity at least {100 * (1 - MAX_FIDELITY_DROP):.0f}% of the base's (else the most faithful); the winner "
        "is the method with the highest test style rate among those keeping that fidelity.",
        "",
        "| method | beta | lr | style rate ↑ | fidelity | style rate per seed |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| base | | | {base['style_rate']['mean']:.3f} | {base['fidelity']['mean']:.3f} | |",
    ]
    for method, r in report["results"].items():
        beta = "" if method == "sft" else f"{r['beta']:g}"
        per_seed = ", ".join(f"{v:.3f}" for v in r["style_rate"]["per_seed"])
        lines.append(f"| {method} | {beta} | {r['learning_rate']:g} | {r['style_rate']['mean']:.3f} ± "
                     f"{r['style_rate']['ci95']:.3f} | {r['fidelity']['mean']:.3f} ± {r['fidelity']['ci95']:.3f} "
                     f"| {per_seed} |")
    w = report["winner"]
    verdict = f"**Winner: {w['method']}**"
    if w["runner_up"] is not None:
        verdict += (f" (ahead of {w['runner_up']}; the 95% intervals "
                    f"{'do not overlap' if w['cis_separate'] else 'overlap, so the lead is not significant'})")
    if not w["fidelity_constraint_met"]:
        verdict += f"; no method kept fidelity at least {100 * (1 - MAX_FIDELITY_DROP):.0f}% of the base's"
    for method, change in w.get("excluded_by_fidelity", {}).items():
        verdict += (f"; {method} (style rate {report['results'][method]['style_rate']['mean']:.3f}) is out: its "
                    f"fidelity fell {-100 * change:.1f}% from the base's, more than the "
                    f"{100 * MAX_FIDELITY_DROP:.0f}% allowed")
    results = report["results"]
    if "rpo" in results and "rpo-uniform" in results:
        a, b = results["rpo"]["style_rate"], results["rpo-uniform"]["style_rate"]
        verdict += (f". Similarity weights against uniform weights (RPO): style rate {a['mean']:.3f} ± {a['ci95']:.3f} "
                    f"against {b['mean']:.3f} ± {b['ci95']:.3f}")
    curve_steps = [c["step"] for c in next(iter(results.values()))["curve"]]
    lines += ["", verdict + ".", "", "Style rate against training steps (seed 0, test captions):", "",
              "| method | " + " | ".join(str(s) for s in curve_steps) + " |",
              "| --- |" + " --- |" * len(curve_steps)]
    for method, r in results.items():
        lines.append(f"| {method} | " + " | ".join(f"{c['style_rate']:.3f}" for c in r["curve"]) + " |")
    lines += ["", "style rate: the fraction of images that are the caption's shape and colour drawn as outlines; "
              "fidelity: the fraction with the caption's shape and colour. See docs/demo.md.", ""]
    return "\n".join(lines)


def _plot(path: Path, report: Dict) -> None:
    """(a) validation frontier of every grid point, (b) test style rate against steps, (c) the
    test results with their intervals over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_c, ax_r) = plt.subplots(1, 3, figsize=(13, 4))
    colours = dict(zip(METHODS, ["#2ca02c", "#ff7f0e", "#1f77b4", "#9467bd"]))
    base_val, base_test = report["base"]["validation"], report["base"]["test"]
    for method, sel in report["selection"].items():
        ax_f.scatter([g["fidelity"] for g in sel["grid"]], [g["style_rate"] for g in sel["grid"]],
                     color=colours.get(method), label=method)
    ax_f.scatter([base_val["fidelity"]["mean"]], [base_val["style_rate"]["mean"]], color="gray", marker="x",
                 label="base")
    ax_f.axvline((1 - MAX_FIDELITY_DROP) * base_val["fidelity"]["mean"], color="gray", ls=":", lw=1)
    ax_f.set(xlabel="fidelity", ylabel="style rate", title="(a) grid on validation captions")
    for method, r in report["results"].items():
        ax_c.plot([c["step"] for c in r["curve"]], [c["style_rate"] for c in r["curve"]], marker="o",
                  color=colours.get(method), label=method)
        ax_r.errorbar([r["fidelity"]["mean"]], [r["style_rate"]["mean"]], xerr=[r["fidelity"]["ci95"]],
                      yerr=[r["style_rate"]["ci95"]], fmt="o", capsize=3, color=colours.get(method), label=method)
    ax_c.set(xlabel="training step", ylabel="style rate", title="(b) chosen setting, test captions, seed 0")
    ax_r.scatter([base_test["fidelity"]["mean"]], [base_test["style_rate"]["mean"]], color="gray", marker="x",
                 label="base")
    ax_r.set(xlabel="fidelity", ylabel="style rate", title="(c) test captions, 95% CI over seeds")
    for ax in (ax_f, ax_c, ax_r):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as error:
        parser.exit(2, f"python -m benchmarks.quality: error: {error}\n")


if __name__ == "__main__":
    raise SystemExit(main())
