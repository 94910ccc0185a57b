"""Aggregates scores of base vs tuned and writes them: JSON, a markdown table, an image grid,
a bar plot of the means with their confidence intervals."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw

from .stats import mean_ci
from ..atomic import write_atomic
from .outputs import write_text


def per_prompt(scores: torch.Tensor) -> torch.Tensor:
    """``(P, K)`` scores (K images per prompt) -> ``(P,)`` means, in float64."""
    if scores.dim() != 2:
        raise ValueError(f"scores: expected shape (prompts, images_per_prompt), got {tuple(scores.shape)}")
    return scores.double().mean(dim=1)


def win_rate(tuned: torch.Tensor, base: torch.Tensor) -> float:
    """Fraction of prompts where the tuned model's mean score beats the base's; ties count half."""
    if tuned.shape != base.shape or tuned.dim() != 1 or tuned.numel() == 0:
        raise ValueError(f"win_rate: expected two equal (P,) tensors, got {tuple(tuned.shape)} and {tuple(base.shape)}")
    wins = (tuned > base).float() + 0.5 * (tuned == base).float()
    return float(wins.mean())


def summarize(base: Dict[str, torch.Tensor], tuned: Dict[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """The paired summary of ``(P, K)`` scores (K images per prompt, image k of prompt i from
    the same seed for both models). For each metric: base and tuned means over all images,
    each with the half-width of its 95% t-interval over the per-prompt means (``base_ci95``,
    ``tuned_ci95``), their difference with the half-width of its 95% t-interval over the
    per-prompt paired differences (``delta_ci95``; nan for one prompt), and the per-prompt
    win rate of tuned over base."""
    if set(base) != set(tuned):
        raise ValueError(f"summarize: base metrics {sorted(base)} differ from tuned metrics {sorted(tuned)}")
    summary = {}
    for name in base:
        b, t = per_prompt(base[name]), per_prompt(tuned[name])
        summary[name] = {
            "base": float(b.mean()),
            "base_ci95": mean_ci(b.numpy())[1],
            "tuned": float(t.mean()),
            "tuned_ci95": mean_ci(t.numpy())[1],
            "delta": float(t.mean() - b.mean()),
            "delta_ci95": mean_ci((t - b).numpy())[1],
            "win_rate": win_rate(t, b),
        }
    return summary


NO_METRIC = ("No metric was computed (--no-clip and no other scorer): compare the images in images/base and "
             "images/tuned, side by side in grid.png.\n")


def markdown_table(summary: Dict[str, Dict[str, float]], num_prompts: int) -> str:
    if not summary:
        return NO_METRIC
    lines = [
        "| metric | base | tuned | tuned - base | 95% CI of the difference | tuned win rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['base']:.4f} | {s['tuned']:.4f} | {s['delta']:+.4f} | ± {s['delta_ci95']:.4f} "
                     f"| {100 * s['win_rate']:.1f}% |")
    lines.append("")
    lines.append(f"Means over all images; the confidence interval is Student's t over the {num_prompts} per-prompt "
                 "paired differences; win rate over the prompts (per-prompt means, ties count half).")
    return "\n".join(lines) + "\n"


def image_grid(rows: Dict[str, List[Image.Image]], *, cell: int = 256, label_width: int = 64,
               column_labels: Optional[List[str]] = None, line_height: int = 12,
               resample: Optional[Image.Resampling] = None) -> Image.Image:
    """One row per model (labelled at the left), one column per prompt; cells are resized to
    ``cell`` px (with ``resample``, PIL's default if None; NEAREST keeps tiny images' pixels);
    ``column_labels`` (the prompts) are written under their columns, wrapped."""
    if not rows or not all(rows.values()):
        raise ValueError("image_grid: expected at least one row with at least one image")
    columns = max(len(images) for images in rows.values())
    wrapped = [textwrap.wrap(text, max(4, cell // 6)) or [""] for text in (column_labels or [])[:columns]]
    caption_height = (max(len(w) for w in wrapped) * line_height + 4) if wrapped else 0
    grid = Image.new("RGB", (label_width + columns * cell, len(rows) * cell + caption_height), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        draw.text((4, r * cell + cell // 2), label, fill="black")
        for c, image in enumerate(images):
            big = image.convert("RGB")
            big = big.resize((cell, cell)) if resample is None else big.resize((cell, cell), resample)
            grid.paste(big, (label_width + c * cell, r * cell))
    for c, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((label_width + c * cell + 2, len(rows) * cell + 2 + k * line_height), line, fill="black")
    return grid


def write_report(output_dir: Path, *, prompts: List[str], summary: Dict[str, Dict[str, float]],
                 base: Dict[str, torch.Tensor], tuned: Dict[str, torch.Tensor],
                 image_paths: Dict[str, List[List[str]]], settings: dict,
                 grid_rows: Optional[Dict[str, List[Image.Image]]] = None, grid_cell: int = 256) -> Dict[str, Path]:
    """Writes ``metrics.json`` (summary, per-prompt scores, image paths, settings; an empty
    summary when no metric was asked for), ``report.md`` and ``grid.png``; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    per_prompt_rows = []
    for i, prompt in enumerate(prompts):
        per_prompt_rows.append({
            "prompt": prompt,
            "base": {name: base[name][i].tolist() for name in base},
            "tuned": {name: tuned[name][i].tolist() for name in tuned},
            "images": {model: paths[i] for model, paths in image_paths.items()},
        })
    record = {"summary": summary, "num_prompts": len(prompts), "settings": settings, "per_prompt": per_prompt_rows}
    if not summary:
        record["note"] = NO_METRIC.strip()
    files = {"json": output_dir / "metrics.json", "markdown": output_dir / "report.md", "grid": output_dir / "grid.png"}
    write_text(files["json"], json.dumps(record, indent=2))
    counts = {model: sum(len(p) for p in paths) for model, paths in image_paths.items()}
    header = [f"- base: `{settings.get('base')}`",
              f"- tuned: `{settings.get('tuned')}` (read as {settings.get('tuned_kind', 'auto')}: "
              f"`{settings.get('tuned_path', settings.get('tuned'))}`)",
              f"- images: {len(prompts)} prompts x {counts and max(counts.values()) // max(1, len(prompts))} per prompt; "
              + ", ".join(f"{n} from {model}" for model, n in counts.items()), ""]
    write_text(files["markdown"], "# Evaluation: base vs tuned\n\n" + "\n".join(header) + "\n"
               + markdown_table(summary, len(prompts)))
    if grid_rows:
        grid = image_grid(grid_rows, cell=grid_cell, column_labels=prompts)
        write_atomic(files["grid"], lambda tmp: grid.save(tmp, format="PNG"))
    else:
        del files["grid"]
    return files


def save_score_plot(path, results: Dict[str, Dict[str, Tuple[float, float]]], *,
                    metrics: Sequence[str] = ("style_rate", "fidelity"), title: str = "",
                    ylim: Optional[Tuple[float, float]] = (0, 1)) -> Path:
    """Bars of ``results[model][metric] = (mean, ci half-width)``, one panel per metric
    (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models: List[str] = list(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        means = [results[m][metric][0] for m in models]
        errors = [results[m][metric][1] for m in models]
        ax.bar(models, means, yerr=errors, capsize=4, color=["#9e9e9e", "#1f77b4", "#ff7f0e", "#2ca02c"][: len(models)])
        ax.set_title(metric)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.tick_params(axis="x", labelrotation=20)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
