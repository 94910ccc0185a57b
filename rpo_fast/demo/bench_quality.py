"""``rpo-fast bench-quality``: SFT vs DPO vs RPO on the demo's style task.

Every method fine-tunes the same base with the same data, steps and batch size. Per method,
beta (DPO, RPO) and the learning rate are chosen on a small grid by the validation captions
(seed 0): the highest style score among settings that keep fidelity within 10% of the
base's; if none does, the highest fidelity. The chosen setting then trains with every seed
and is scored on the held-out test captions; the table gives the mean and 95% t-interval
over seeds. Evaluation noise (the sampling seeds) is the same for every run, so seeds vary
only the training (data order, noise, timesteps).

Every finished run is recorded in ``<work>/runs/*.json`` and skipped when the command is run
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

from ..machine import cpu_cores, cpu_model
from .base_model import BASE_DIR, base_exists, load_pipeline
from .datasets import write_style_data, write_style_embeddings
from .evaluate import GUIDANCE_SCALE, INFERENCE_STEPS, evaluate
from .finetune import FinetuneSettings, finetune
from .scores import MAX_FIDELITY_DROP, keeps_fidelity
from .shapes import split_scenes
from .stats import mean_ci

METHODS = ("sft", "dpo", "rpo", "rpo-uniform")  # rpo-uniform: RPO with weights 1/M (no embeddings)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="benchmarks/results", help="where quality.md, quality.json, quality.png go")
    parser.add_argument("--work", default="bench_quality_work", help="data, runs and their records")
    parser.add_argument("--model-dir", default=str(BASE_DIR))
    parser.add_argument("--methods", nargs="+", default=["sft", "dpo", "rpo"], choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=FinetuneSettings.steps)
    parser.add_argument("--batch-pairs", type=int, default=FinetuneSettings.batch_pairs)
    parser.add_argument("--betas", nargs="+", type=float, default=[500.0, 2500.0], help="grid for DPO and RPO")
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-6, 3e-6], help="grid for all")
    parser.add_argument("--validation-samples", type=int, default=2, help="images per validation caption")
    parser.add_argument("--test-samples", type=int, default=4, help="images per test caption")
    parser.add_argument("--inference-steps", type=int, default=INFERENCE_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--pairs-per-caption", type=int, default=8)
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
        for metric in ("style", "fidelity"):
            mean, half = ev.summary(metric)
            out[metric] = {"mean": mean, "ci95_over_prompts": half, "per_prompt": ev.per_prompt(metric).tolist()}
        return out

    def base(self, split: str) -> Dict:
        def compute():
            if self._base_pipe is None:
                self._base_pipe = load_pipeline(self.model_dir)
            return {"split": split, **self._scores(self._base_pipe, split, f"base ({split})")}
        return self._record(f"base-{split}", compute)

    def run(self, method: str, beta: float, lr: float, seed: int, split: str) -> Dict:
        settings = FinetuneSettings(method="rpo" if method == "rpo-uniform" else method, beta=beta, learning_rate=lr,
                                    steps=self.args.steps, batch_pairs=self.args.batch_pairs, seed=seed)
        name = f"{method}-beta{beta:g}-lr{lr:g}-steps{settings.steps}-bp{settings.batch_pairs}-seed{seed}-{split}"

        def compute():
            start = time.perf_counter()
            out_dir = self.work / "train" / name
            unet = finetune(self.model_dir, self.data, out_dir, settings,
                            embeddings=self.embeddings if method == "rpo" else None,
                            latent_cache=self.work / "latents", progress=self.progress)
            train_s = time.perf_counter() - start
            scores = self._scores(load_pipeline(self.model_dir, unet), split, name)
            shutil.rmtree(out_dir, ignore_errors=True)  # keep only the record
            return {"method": method, "beta": beta, "learning_rate": lr, "seed": seed, "split": split,
                    "steps": settings.steps, "batch_pairs": settings.batch_pairs, "train_seconds": train_s, **scores}
        return self._record(name, compute)


def _select(records: List[Dict], base_fidelity: float) -> Dict:
    ok = [r for r in records if keeps_fidelity(r["fidelity"]["mean"], base_fidelity)]
    if ok:
        return max(ok, key=lambda r: (r["style"]["mean"], r["fidelity"]["mean"]))
    return max(records, key=lambda r: (r["fidelity"]["mean"], r["style"]["mean"]))


def run(args: argparse.Namespace) -> int:
    import torch

    for name in ("steps", "batch_pairs", "validation_samples", "test_samples", "inference_steps", "pairs_per_caption"):
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
    for method in args.methods:
        betas = [0.0] if method == "sft" else args.betas
        grid = [bench.run(method, b, lr, args.seeds[0], "validation")
                for b, lr in itertools.product(betas, args.learning_rates)]
        chosen = _select(grid, base_val["fidelity"]["mean"])
        selection[method] = {"beta": chosen["beta"], "learning_rate": chosen["learning_rate"],
                             "grid": [{k: r[k] for k in ("beta", "learning_rate")} |
                                      {m: r[m]["mean"] for m in ("style", "fidelity")} for r in grid]}
        print(f"[bench-quality] {method}: chose beta={chosen['beta']:g} lr={chosen['learning_rate']:g} "
              f"(validation style {chosen['style']['mean']:.3f}, fidelity {chosen['fidelity']['mean']:.3f})")

    results: Dict[str, Dict] = {}
    for method in args.methods:
        s = selection[method]
        runs = [bench.run(method, s["beta"], s["learning_rate"], seed, "test") for seed in args.seeds]
        entry = {"beta": s["beta"], "learning_rate": s["learning_rate"], "seeds": args.seeds,
                 "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs]))}
        for metric in ("style", "fidelity"):
            values = [r[metric]["mean"] for r in runs]
            mean, half = mean_ci(values)
            entry[metric] = {"mean": mean, "ci95": half, "per_seed": values}
        results[method] = entry

    report = {
        "task": "shapes style alignment (sketch preferred over plain), 32x32, rpo-fast demo base model",
        "protocol": {k: getattr(args, k) for k in ("steps", "batch_pairs", "betas", "learning_rates", "seeds",
                                                     "validation_samples", "test_samples", "inference_steps",
                                                     "guidance_scale", "pairs_per_caption")},
        "machine": f"{cpu_model()}, {cpu_cores()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "base": {split: {m: {"mean": b[m]["mean"], "ci95_over_prompts": b[m]["ci95_over_prompts"]}
                         for m in ("style", "fidelity")} for split, b in (("validation", base_val), ("test", base_test))},
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
    """Highest mean style among methods keeping fidelity within 10% of the base; whether its
    CI separates it from the runner-up; and the methods the fidelity rule excluded, with their
    relative fidelity change."""
    ok = {m: r for m, r in results.items() if keeps_fidelity(r["fidelity"]["mean"], base_fidelity)}
    excluded = {m: r["fidelity"]["mean"] / base_fidelity - 1 for m, r in results.items() if m not in ok}
    pool = ok or results
    ranked = sorted(pool, key=lambda m: pool[m]["style"]["mean"], reverse=True)
    best = ranked[0]
    separated: Optional[bool] = None
    if len(ranked) > 1:
        a, b = pool[best]["style"], pool[ranked[1]]["style"]
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
        f"beta and learning rate chosen per method on the validation captions; scored on {24} held-out test captions "
        f"x {p['test_samples']} samples (DDIM {p['inference_steps']} steps, guidance {p['guidance_scale']:g}). "
        f"Mean and 95% t-interval over {len(p['seeds'])} training seeds {p['seeds']}. Machine: {report['machine']}.",
        "",
        "| method | beta | lr | style ↑ | fidelity | style per seed |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| base | | | {base['style']['mean']:.3f} | {base['fidelity']['mean']:.3f} | |",
    ]
    for method, r in report["results"].items():
        beta = "" if method == "sft" else f"{r['beta']:g}"
        per_seed = ", ".join(f"{v:.3f}" for v in r["style"]["per_seed"])
        lines.append(f"| {method} | {beta} | {r['learning_rate']:g} | {r['style']['mean']:.3f} ± {r['style']['ci95']:.3f} "
                     f"| {r['fidelity']['mean']:.3f} ± {r['fidelity']['ci95']:.3f} | {per_seed} |")
    w = report["winner"]
    verdict = f"**Winner: {w['method']}**"
    if w["runner_up"] is not None:
        verdict += (f" (ahead of {w['runner_up']}; the 95% intervals "
                    f"{'do not overlap' if w['cis_separate'] else 'overlap, so the lead is not significant'})")
    if not w["fidelity_constraint_met"]:
        verdict += f"; no method kept fidelity within {100 * MAX_FIDELITY_DROP:.0f}% of the base"
    for method, change in w.get("excluded_by_fidelity", {}).items():
        verdict += (f"; {method} (style {report['results'][method]['style']['mean']:.3f}) is out: its fidelity "
                    f"fell {-100 * change:.1f}% from the base's, more than the {100 * MAX_FIDELITY_DROP:.0f}% allowed")
    lines += ["", verdict + ".", "",
              "style: hollowness of the drawn shape (0 filled, ~0.6 outline); fidelity: fraction of images with the "
              "caption's shape and colour. See docs/demo.md.", ""]
    return "\n".join(lines)


def _plot(path: Path, report: Dict) -> None:
    from .report import save_score_plot

    base = report["base"]["test"]
    results = {"base": {m: (base[m]["mean"], base[m]["ci95_over_prompts"]) for m in ("style", "fidelity")}}
    for method, r in report["results"].items():
        results[method] = {m: (r[m]["mean"], r[m]["ci95"]) for m in ("style", "fidelity")}
    save_score_plot(path, results, title="test captions; methods: 95% CI over training seeds")
