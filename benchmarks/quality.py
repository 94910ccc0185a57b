"""RPO against DPO and SFT, where each claim can win or lose: ``python -m benchmarks.quality``
(``make bench-quality``).

Two conditions on the demo's shapes task (the committed base model, 32x32, LoRA rank 16):

* **H**: one preference for every caption (outlines over fills), 8 pairs a caption: the task
  of ``make demo``. Scored by the style rate (the caption's shape and colour, as an outline).
* **P**: the preference depends on a property of the caption that related captions share and
  the embeddings encode: outlines preferred for large shapes, fills for small ones, 2 pairs a
  caption. Scored by the preferred-style rate (the caption's shape and colour, drawn in the
  style its size prefers).

Methods, each with its own loss alone: SFT, DPO, RPO with the demo's similarity weights
(caption words and pixels), RPO with uniform weights, and RPO with a control embedding that
leaves out the size (the property P's preference depends on). RPO runs with
``weight_norm="mean"``, so that every preference method sits on one effective-beta scale
(beta times the mean diagonal weight: what scales a pair's own logit; DPO's is its beta).

The protocol, fixed before the run (:data:`RULES`, and :data:`PREDICTIONS` written with it):
each method's effective beta is chosen per condition on the validation captions; the chosen
settings then train with every seed (the same seeds for every method: the same initial
adapters and batches) and are scored on the test captions at several checkpoints, so that
methods are compared along their style-against-fidelity frontiers at matched fidelity; the
claims are paired differences over seeds with 95% intervals.

Every finished run is recorded in ``<work>/runs/*.json`` and skipped when the command runs
again (an interrupted benchmark resumes); runs go to ``--workers`` processes of one torch
thread each.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from rpo_fast.atomic import write_atomic
from rpo_fast.demo.base_model import BASE_DIR, base_exists, load_pipeline
from rpo_fast.demo.datasets import ShapesEmbedder, write_style_data, write_style_embeddings
from rpo_fast.demo.evaluate import GUIDANCE_SCALE, INFERENCE_STEPS, evaluate
from rpo_fast.demo.finetune import FinetuneSettings, finetune
from rpo_fast.demo.shapes import parse_caption, split_scenes
from rpo_fast.evaluation.shapes_score import MAX_FIDELITY_DROP, foreground_mask, keeps_fidelity
from rpo_fast.evaluation.stats import mean_ci
from rpo_fast.machine import cpu_cores, cpu_model

CONDITIONS = ("H", "P")
METHODS = ("sft", "dpo", "rpo", "rpo-uniform", "rpo-control")
EMBEDDING_OF = {"rpo": "similarity", "rpo-control": "control"}  # the other methods use none
COMPARISONS = (("rpo", "dpo"), ("rpo", "sft"), ("rpo", "rpo-uniform"), ("rpo", "rpo-control"))
SCORE_NAME = {"H": "style rate", "P": "preferred-style rate"}

PREDICTIONS = {
    "H": "RPO and DPO tie at matched fidelity (paired interval containing 0), and so do the three RPO weightings "
         "(similarity, uniform, control): with one preference for every caption no weight can carry preference "
         "information. RPO and DPO beat SFT.",
    "P": "Similarity weights against uniform and control weights: at most a small difference, interval containing 0. "
         "The weights only change how hard each sample is pushed (through the sigmoid's saturation); no contrast "
         "pushes a winner up or a loser down, whatever its weight. RPO against DPO: a tie.",
}
RULES = (
    "Setting: per condition and method, effective betas {betas} at the condition's learning rate ({lr}), training "
    "seed {grid_seed}, "
    "scored on the validation captions ({validation_samples} samples each, final checkpoint); the chosen one is the "
    "highest score among those keeping fidelity at least {keep:.0%} of the base's, else the most faithful. SFT has "
    "no beta: one setting.",
    "Score of a run: the highest score among its checkpoints (and the base at step 0) whose test fidelity is at least "
    "{keep:.0%} of the base's: the score at matched fidelity.",
    "Claim A - B: the mean of the per-seed differences of run scores over {num_seeds} paired seeds, with its 95% "
    "t-interval. A wins if the interval lies above 0, loses if below, else no difference is shown.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="benchmarks/results", help="where quality.md, quality.json, quality.png go")
    parser.add_argument("--work", default="bench_quality_work", help="data, runs and their records")
    parser.add_argument("--model-dir", default=str(BASE_DIR))
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="paired training seeds")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-pairs", type=int, default=FinetuneSettings.batch_pairs)
    parser.add_argument("--lora-rank", type=int, default=FinetuneSettings.lora_rank)
    parser.add_argument("--learning-rates", nargs=2, type=float, default=[FinetuneSettings.learning_rate, 1e-3],
                        metavar=("H", "P"), help="learning rate of every method in conditions H and P (P's from the "
                        "pilot in docs/demo.md: at H's, no method learned P in the steps)")
    parser.add_argument("--effective-betas", nargs="+", type=float, default=[1000.0, 3000.0, 9000.0],
                        help="grid of DPO and RPO, on one scale: beta times the mean diagonal weight")
    parser.add_argument("--pairs-per-caption", nargs=2, type=int, default=[8, 2], metavar=("H", "P"),
                        help="preference pairs per training caption in conditions H and P")
    parser.add_argument("--validation-samples", type=int, default=4, help="images per validation caption")
    parser.add_argument("--test-samples", type=int, default=2, help="images per test caption and checkpoint")
    parser.add_argument("--checkpoints", type=int, default=3, help="checkpoints scored per test run, the last one included")
    parser.add_argument("--inference-steps", type=int, default=INFERENCE_STEPS)
    parser.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE)
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel, one torch thread each")
    parser.add_argument("--no-progress", action="store_true")


# --------------------------------------------------------------------------- the two conditions


def preferred_score(scores: Dict[str, np.ndarray], captions: Sequence[str], condition: str) -> np.ndarray:
    """Per image: 1 when it is the caption's shape and colour drawn in the preferred style."""
    if condition == "H":
        return scores["style"]
    large = np.array([parse_caption(c).size == "large" for c in captions])
    return scores["fidelity"] * np.where(large, scores["outline"], scores["filled"])


class SizeBlindEmbedder(ShapesEmbedder):
    """The control: the demo's embedder without the size. The caption's size word is dropped,
    and the image is cropped to its shape (the foreground's bounding box, one pixel around it)
    before the 8x8 pixels are taken: shape, colour, background and drawing stay, size goes."""

    identity = "bench-quality:shapes-without-size:v1"

    def __call__(self, prompts, images):
        return super().__call__([re.sub(r"\b(small|large) ", "", p) for p in prompts], [_crop(im) for im in images])


def _crop(image):
    mask = foreground_mask(np.asarray(image.convert("RGB"), dtype=np.float32))
    if not mask.any():
        return image
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return image.crop((max(0, cols[0] - 1), max(0, rows[0] - 1), cols[-1] + 2, rows[-1] + 2))


@dataclass
class Condition:
    data: str
    embeddings: Dict[str, str]  # similarity / control -> embedding cache
    diagonal: Dict[str, float]  # mean diagonal weight of each, under weight_norm "mean" (uniform: 1)


def prepare_condition(work: Path, condition: str, pairs_per_caption: int, batch_pairs: int) -> Condition:
    """The condition's training pairs, both embedding caches and their mean diagonal weights
    over the first 32 contrasts of the training schedule (seed 0: the same rows for all)."""
    import torch

    from rpo_fast.data import load_preference_dataset
    from rpo_fast.embedding import build_embedding_cache, load_embedding_cache
    from rpo_fast.train.batches import PairSchedule
    from rpo_fast.weights import mean_diagonal_weight

    data = write_style_data(work / f"data-{condition}", per_scene=pairs_per_caption, by_size=condition == "P")
    dataset = load_preference_dataset(str(data))
    control = data / "control.safetensors"
    if not control.exists():
        build_embedding_cache(dataset, SizeBlindEmbedder(), control, batch_size=256, progress=False)
    embeddings = {"similarity": str(write_style_embeddings(data)), "control": str(control)}
    schedule = PairSchedule(np.arange(len(dataset)), batch_pairs, 1, 0)
    contrasts = [torch.as_tensor(schedule.global_rows(u)[1]) for u in range(min(32, schedule.micro_batches_per_epoch))]
    diagonal = {kind: mean_diagonal_weight(*load_embedding_cache(path, dataset), contrasts)
                for kind, path in embeddings.items()}
    return Condition(str(data), embeddings, diagonal)


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Job:
    condition: str
    method: str
    beta_eff: float  # 0 for sft
    seed: int
    split: str  # validation (the grid) or test

    def name(self, s: "Setup") -> str:
        evals = f"v{s.samples[self.split]}x{s.inference_steps}g{s.guidance_scale:g}"
        curve = f"c{s.checkpoints}" if self.split == "test" else "c1"
        return (f"{self.condition}{s.pairs_per_caption[self.condition]}-{self.method}-beff{self.beta_eff:g}"
                f"-lr{s.learning_rate[self.condition]:g}-r{s.lora_rank}-s{s.steps}-bp{s.batch_pairs}-seed{self.seed}"
                f"-{self.split}-{curve}-{evals}")


@dataclass
class Setup:
    """What every run needs (sent to the worker processes)."""

    model_dir: str
    work: str
    steps: int
    batch_pairs: int
    lora_rank: int
    learning_rate: Dict[str, float]  # per condition
    checkpoints: int
    samples: Dict[str, int]
    inference_steps: int
    guidance_scale: float
    pairs_per_caption: Dict[str, int]
    conditions: Dict[str, Condition] = field(default_factory=dict)

    def beta(self, job: Job) -> float:
        """The loss's beta for the job's effective beta: divided by the mean diagonal weight of
        the method's weights (1 for uniform weights; DPO's effective beta is its beta)."""
        kind = EMBEDDING_OF.get(job.method)
        return job.beta_eff / (self.conditions[job.condition].diagonal[kind] if kind else 1.0)

    def score(self, pipe, condition: str, split: str) -> Dict[str, float]:
        ev = evaluate(pipe, split_scenes()[split], samples_per_prompt=self.samples[split], seed=0,
                      steps=self.inference_steps, guidance_scale=self.guidance_scale, progress=False)
        return {"score": float(preferred_score(ev.scores, ev.captions, condition).mean()),
                "fidelity": float(ev.scores["fidelity"].mean())}


def run_job(setup: Setup, job: Job) -> Dict:
    """Fine-tunes, scores the checkpoints (test) or the final weights (validation); the record."""
    start = time.perf_counter()
    cond = setup.conditions[job.condition]
    kind = EMBEDDING_OF.get(job.method)
    beta = setup.beta(job) if job.method != "sft" else 0.0
    settings = FinetuneSettings(method="sft" if job.method == "sft" else "dpo" if job.method == "dpo" else "rpo",
                                beta=beta or 1.0, learning_rate=setup.learning_rate[job.condition], steps=setup.steps,
                                batch_pairs=setup.batch_pairs, lora_rank=setup.lora_rank, sft_weight=0.0,
                                seed=job.seed)
    out = Path(setup.work) / "train" / job.name(setup)
    every = math.ceil(setup.steps / setup.checkpoints) if job.split == "test" and setup.checkpoints > 1 else 0
    tuned, checkpoints = finetune(setup.model_dir, cond.data, out, settings,
                                  embeddings=cond.embeddings[kind] if kind else None,
                                  latent_cache=Path(setup.work) / "latents", progress=False, checkpoint_every=every)
    points = [{"step": step, **setup.score(load_pipeline(setup.model_dir, checkpoint=path), job.condition, job.split)}
              for step, path in sorted(checkpoints.items())]
    points.append({"step": setup.steps, **setup.score(load_pipeline(setup.model_dir, tuned), job.condition, job.split)})
    train_log = [{k: line.get(k) for k in ("step", "loss", "implicit_acc", "reward_margin", "effective_beta")}
                 for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    shutil.rmtree(out, ignore_errors=True)  # keep only the record
    return {**asdict(job), "beta": beta, "points": points, "train_log": train_log,
            "seconds": time.perf_counter() - start}


def _run_in_worker(setup: Setup, job: Job) -> Dict:
    import torch

    from rpo_fast.cli import quiet_library_progress

    torch.set_num_threads(1)
    quiet_library_progress()  # the libraries' bars of parallel runs would interleave with the benchmark's
    return run_job(setup, job)


def run_jobs(setup: Setup, jobs: List[Job], workers: int, progress: bool, desc: str) -> Dict[Job, Dict]:
    """The record of every job: read when the benchmark ran it before, else run (in parallel)."""
    from tqdm.auto import tqdm

    records, todo = {}, []
    for job in jobs:
        path = Path(setup.work) / "runs" / f"{job.name(setup)}.json"
        if path.exists():
            records[job] = json.loads(path.read_text())
        else:
            todo.append(job)

    def keep(job: Job, record: Dict) -> None:
        path = Path(setup.work) / "runs" / f"{job.name(setup)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1)))
        records[job] = record

    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run", disable=not progress,
              dynamic_ncols=True) as bar:
        if workers <= 1:
            for job in todo:
                keep(job, run_job(setup, job))
                bar.update(1)
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = {pool.submit(_run_in_worker, setup, job): job for job in todo}
                for future in concurrent.futures.as_completed(futures):
                    keep(futures[future], future.result())
                    bar.update(1)
    return records


# --------------------------------------------------------------------------- the rules


def select(grid: List[Dict], base_fidelity: float) -> Dict:
    """The most stylish grid point keeping the fidelity, else the most faithful (RULES[0])."""
    final = [(r["points"][-1], r) for r in grid]
    ok = [(p, r) for p, r in final if keeps_fidelity(p["fidelity"], base_fidelity)]
    if ok:
        return max(ok, key=lambda pr: (pr[0]["score"], pr[0]["fidelity"]))[1]
    return max(final, key=lambda pr: (pr[0]["fidelity"], pr[0]["score"]))[1]


def matched_score(points: List[Dict], base: Dict) -> float:
    """The highest score among the base (step 0) and the checkpoints whose fidelity keeps at
    least 90% of the base's (RULES[1])."""
    return max(p["score"] for p in [base, *points] if p is base or keeps_fidelity(p["fidelity"], base["fidelity"]))


def paired(a: Sequence[float], b: Sequence[float]) -> Dict:
    """Claim a - b over paired seeds (RULES[2])."""
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    mean, half = mean_ci(diffs)
    verdict = "no difference shown"
    if half == half:  # not NaN (two seeds or more)
        verdict = "wins" if mean - half > 0 else "loses" if mean + half < 0 else verdict
    return {"mean": mean, "ci95": half, "per_seed": diffs.tolist(), "verdict": verdict}


# --------------------------------------------------------------------------- the benchmark


def _shown_path(path: str) -> str:
    """A path as the results record it: relative to the repository when inside it (no machine's
    absolute paths in committed files)."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "batch_pairs", "validation_samples", "test_samples", "inference_steps", "checkpoints",
                 "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank: expected 0 (full fine-tuning) or a positive int, got {args.lora_rank}")
    if min(args.pairs_per_caption) < 1:
        raise ValueError(f"--pairs-per-caption: expected positive ints, got {args.pairs_per_caption}")
    if len(set(args.seeds)) < 2:
        raise ValueError(f"--seeds: expected at least 2 distinct seeds for an interval, got {args.seeds}")
    if not args.effective_betas or min(args.effective_betas) <= 0:
        raise ValueError(f"--effective-betas: expected positive numbers, got {args.effective_betas}")
    if not base_exists(args.model_dir):
        raise ValueError(f"--model-dir: no base model in {args.model_dir}; run `rpo-fast demo --pretrain` first")


def run(args: argparse.Namespace) -> int:
    import torch

    _check(args)
    start = time.perf_counter()
    work = Path(args.work)
    setup = Setup(args.model_dir, str(work), args.steps, args.batch_pairs, args.lora_rank,
                  dict(zip(CONDITIONS, args.learning_rates)),
                  args.checkpoints, {"validation": args.validation_samples, "test": args.test_samples},
                  args.inference_steps, args.guidance_scale, dict(zip(CONDITIONS, args.pairs_per_caption)))
    progress = not args.no_progress
    lrs = ", ".join(f"{c} {lr:g}" for c, lr in zip(CONDITIONS, args.learning_rates))
    rules = [r.format(betas=args.effective_betas, lr=lrs, grid_seed=args.seeds[0],
                      validation_samples=args.validation_samples, keep=1 - MAX_FIDELITY_DROP,
                      num_seeds=len(args.seeds)) for r in RULES]
    print("[bench-quality] rules, fixed before the run:\n  " + "\n  ".join(rules))
    for c in args.conditions:
        print(f"[bench-quality] prediction {c}: {PREDICTIONS[c]}")
        setup.conditions[c] = prepare_condition(work, c, setup.pairs_per_caption[c], args.batch_pairs)
        _fill_caches(setup, c)

    base_pipe = load_pipeline(args.model_dir)
    base = {c: {split: setup.score(base_pipe, c, split) for split in ("validation", "test")} for c in args.conditions}
    del base_pipe

    grid_jobs = [Job(c, m, 0.0 if m == "sft" else b, args.seeds[0], "validation") for c in args.conditions
                 for m in args.methods for b in ([0.0] if m == "sft" else args.effective_betas)]
    grid = run_jobs(setup, grid_jobs, args.workers, progress, "grid (validation)")
    chosen = {(c, m): select([grid[j] for j in grid_jobs if (j.condition, j.method) == (c, m)],
                             base[c]["validation"]["fidelity"])["beta_eff"]
              for c in args.conditions for m in args.methods}
    test_jobs = [Job(c, m, chosen[c, m], seed, "test") for c in args.conditions for m in args.methods
                 for seed in args.seeds]
    runs = run_jobs(setup, test_jobs, args.workers, progress, "seeds (test)")

    report = {
        "protocol": {**{k: v for k, v in vars(args).items() if k not in ("out", "work", "no_progress")},
                     "model_dir": _shown_path(args.model_dir)},
        "rules": rules, "predictions": {c: PREDICTIONS[c] for c in args.conditions},
        "machine": f"{cpu_model()}, {cpu_cores()} cores, {args.workers} runs in parallel at 1 torch thread each, "
                   f"torch {torch.__version__}",
        "conditions": {c: _condition_report(c, setup, base[c], grid, grid_jobs, runs, test_jobs, args.methods)
                       for c in args.conditions},
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    (out / "quality.md").write_text(format_report(report))
    _plot(out / "quality.png", report)
    print(format_report(report))
    return 0


def _fill_caches(setup: Setup, condition: str) -> None:
    """The latent and text caches of a condition's data, filled once here: parallel runs
    would each fill them."""
    cond = setup.conditions[condition]
    out = Path(setup.work) / f"caches-{condition}"
    finetune(setup.model_dir, cond.data, out, FinetuneSettings(method="sft", steps=1, batch_pairs=setup.batch_pairs,
                                                               lora_rank=setup.lora_rank),
             latent_cache=Path(setup.work) / "latents", progress=False)
    shutil.rmtree(out, ignore_errors=True)


def _condition_report(condition: str, setup: Setup, base: Dict, grid: Dict, grid_jobs: List[Job], runs: Dict,
                      test_jobs: List[Job], methods: Sequence[str]) -> Dict:
    base_test = {"step": 0, **base["test"]}
    results = {}
    for method in methods:
        jobs = [j for j in test_jobs if (j.condition, j.method) == (condition, method)]
        records = [runs[j] for j in jobs]
        scores = [matched_score(r["points"], base_test) for r in records]
        final = [r["points"][-1] for r in records]
        steps = [0] + [p["step"] for p in records[0]["points"]]
        frontier = [{"step": s, "score": float(np.mean([base_test["score"] if s == 0 else _at(r, s)["score"]
                                                         for r in records])),
                     "fidelity": float(np.mean([base_test["fidelity"] if s == 0 else _at(r, s)["fidelity"]
                                                for r in records]))} for s in steps]
        mean, half = mean_ci(scores)
        results[method] = {
            "beta_eff": jobs[0].beta_eff, "beta": records[0]["beta"], "learning_rate": setup.learning_rate[condition],
            "score": {"mean": mean, "ci95": half, "per_seed": scores},
            "final_score": _summary([p["score"] for p in final]),
            "final_fidelity": _summary([p["fidelity"] for p in final]),
            "frontier": frontier,
            "train_log": records[0]["train_log"],
            "grid": [{"beta_eff": grid[j]["beta_eff"], "beta": grid[j]["beta"], **grid[j]["points"][-1]}
                     for j in grid_jobs if (j.condition, j.method) == (condition, method)],
            "seeds": [j.seed for j in jobs],
        }
    comparisons = [{"a": a, "b": b, **paired(results[a]["score"]["per_seed"], results[b]["score"]["per_seed"])}
                   for a, b in COMPARISONS if a in results and b in results]
    cond = setup.conditions[condition]
    return {"score_name": SCORE_NAME[condition], "pairs_per_caption": setup.pairs_per_caption[condition],
            "mean_diagonal_weight": cond.diagonal, "base": base, "results": results, "comparisons": comparisons}


def _at(record: Dict, step: int) -> Dict:
    return next(p for p in record["points"] if p["step"] == step)


def _summary(values: Sequence[float]) -> Dict:
    mean, half = mean_ci(values)
    return {"mean": mean, "ci95": half}


# --------------------------------------------------------------------------- reading it


def format_report(report: Dict) -> str:
    p = report["protocol"]
    lines = [
        "# Quality: SFT vs DPO vs RPO, where each claim can win or lose", "",
        f"The demo's base model fine-tuned ({p['steps']} steps x {p['batch_pairs']} pairs, LoRA rank {p['lora_rank']}, "
        f"each method's own loss alone) in two conditions; scored on the 24 held-out test captions x "
        f"{p['test_samples']} samples at {p['checkpoints']} checkpoints (DDIM {p['inference_steps']} steps, guidance "
        f"{p['guidance_scale']:g}), {len(p['seeds'])} paired training seeds {p['seeds']}. Machine: {report['machine']}; "
        f"{report['seconds'] / 60:.0f} minutes.", "",
        f"- **H**: outlines preferred for every caption, {p['pairs_per_caption'][0]} pairs a caption, learning rate "
        f"{p['learning_rates'][0]:g}; score: the style rate.",
        f"- **P**: outlines preferred for large shapes, fills for small ones, {p['pairs_per_caption'][1]} pairs a "
        f"caption, learning rate {p['learning_rates'][1]:g}; score: the preferred-style rate (right shape and colour, "
        "in the style the caption's size prefers).", "",
        "Rules, fixed before the run:", "", *[f"{i + 1}. {r}" for i, r in enumerate(report["rules"])], "",
        "Predictions, written with the rules:", "",
        *[f"- {c}: {text}" for c, text in report["predictions"].items()], "",
    ]
    for condition, c in report["conditions"].items():
        b = c["base"]["test"]
        diag = ", ".join(f"{k} {v:.2f}" for k, v in c["mean_diagonal_weight"].items())
        lines += [
            f"## Condition {condition}: {c['score_name']}", "",
            f"Base: {c['score_name']} {b['score']:.3f}, fidelity {b['fidelity']:.3f}. Mean diagonal weight of the "
            f"RPO weights (weight_norm mean; uniform 1): {diag}.", "",
            f"| method | beta | effective beta | score at matched fidelity | final {c['score_name']} | final fidelity |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for method, r in c["results"].items():
            beta = "" if method == "sft" else f"{r['beta']:.4g}"
            beta_eff = "" if method == "sft" else f"{r['beta_eff']:g}"
            lines.append(f"| {method} | {beta} | {beta_eff} | {_pm(r['score'])} | {_pm(r['final_score'])} | "
                         f"{_pm(r['final_fidelity'])} |")
        lines += ["", "| claim | paired difference (95% interval) | per seed | verdict |", "| --- | --- | --- | --- |"]
        for d in c["comparisons"]:
            per_seed = ", ".join(f"{x:+.3f}" for x in d["per_seed"])
            lines.append(f"| {d['a']} - {d['b']} | {d['mean']:+.3f} ± {d['ci95']:.3f} | {per_seed} | {d['verdict']} |")
        lines += ["", "Training at the chosen settings (seed 0): loss and implicit accuracy at the first and last "
                  "logged steps:", ""]
        for method, r in c["results"].items():
            log = [x for x in r["train_log"] if x.get("implicit_acc") is not None]
            if log:
                first, last = log[0], log[-1]
                lines.append(f"- {method}: loss {first['loss']:.3f} -> {last['loss']:.3f}, implicit accuracy "
                             f"{first['implicit_acc']:.2f} -> {last['implicit_acc']:.2f} (steps {first['step']} -> "
                             f"{last['step']})")
        lines.append("")
    lines += ["Scores: see docs/demo.md (style: right shape and colour drawn as an outline; fidelity: right shape and "
              "colour).", ""]
    return "\n".join(lines)


def _pm(summary: Dict) -> str:
    return f"{summary['mean']:.3f} ± {summary['ci95']:.3f}"


def _plot(path: Path, report: Dict) -> None:
    """Per condition: each method's frontier (score against fidelity at each checkpoint, mean
    over seeds, from the base at step 0), and the paired differences with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = report["conditions"]
    fig, axes = plt.subplots(2, len(conditions), figsize=(6 * len(conditions), 8), squeeze=False)
    colours = dict(zip(METHODS, ["#2ca02c", "#ff7f0e", "#1f77b4", "#9467bd", "#8c564b"]))
    for col, (condition, c) in enumerate(conditions.items()):
        ax, forest = axes[0][col], axes[1][col]
        for method, r in c["results"].items():
            ax.plot([f["fidelity"] for f in r["frontier"]], [f["score"] for f in r["frontier"]], marker="o",
                    color=colours[method], label=method)
        base = c["base"]["test"]
        ax.axvline((1 - MAX_FIDELITY_DROP) * base["fidelity"], color="gray", ls=":", lw=1)
        ax.set(xlabel="fidelity", ylabel=c["score_name"], title=f"{condition}: frontier (test, mean over seeds)")
        ax.legend(fontsize=8)
        comparisons = c["comparisons"]
        ys = np.arange(len(comparisons))
        forest.errorbar([d["mean"] for d in comparisons], ys, xerr=[d["ci95"] for d in comparisons], fmt="o",
                        capsize=3, color="black")
        forest.axvline(0, color="gray", lw=1)
        forest.set_yticks(ys, [f"{d['a']} - {d['b']}" for d in comparisons])
        forest.set(xlabel=f"paired difference in {c['score_name']} at matched fidelity",
                   title=f"{condition}: claims (95% interval over seeds)")
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
