"""Turns a results json (benchmarks/run.py) into a markdown table and PNG plots.

``python -m benchmarks.report benchmarks/results/<machine>.json [--out DIR]`` writes
``<machine>.md``, ``<machine>-loss-time.png``, ``<machine>-loss-speedup.png`` and
``<machine>-e2e.png`` next to the json (or into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.collect import STATISTIC, summarize
from benchmarks.profiles import E2E_LOOPS

MIB = 2**20
LOOP_LABELS = {"baseline": "baseline", "rpo_fast": "rpo-fast", "rpo_fast_precompute_ref": "rpo-fast precompute_ref"}
BACKEND_COLORS = {"torch": "tab:purple", "cpu": "tab:blue", "cuda": "tab:green", "triton": "tab:brown"}
LOOP_COLORS = {"baseline": "tab:red", "rpo_fast": "tab:blue", "rpo_fast_precompute_ref": "tab:green"}


def _fmt(value: Optional[float], spec: str = ".2f", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value * scale, spec)


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(machine: Dict[str, object]) -> str:
    cpu = ", ".join(x for x in (machine["cpu"], machine.get("cpu_id"), machine.get("cpu_kernels") and
                                f"{machine['cpu_kernels']} kernels") if x)
    parts = [f"**{machine['slug']}**: {cpu}, {machine['cores']} cores "
             f"({machine['torch_threads']} torch threads), {machine['memory_gib']} GiB"]
    if machine.get("gpu"):
        parts.append(f"GPU {machine['gpu']} ({machine.get('gpu_memory_gib')} GiB)")
    parts.append(f"torch {machine['torch']}, Python {machine['python']}")
    return "; ".join(parts)


def markdown(results: Dict[str, object], plots: Dict[str, str]) -> str:
    summary = summarize(results.get("loss", []), results.get("e2e", []))
    out = [f"# rpo-fast benchmarks on {results['machine']['slug']}", ""]
    out += [machine_line(results["machine"]), ""]
    env = results.get("environment", {})
    profiles = results.get("profiles", {})
    profile = results["profile"] if len(set(profiles.values())) <= 1 else \
        ", ".join(f"{part}: {name}" for part, name in profiles.items())
    out += [f"Profile `{profile}`, measured {results['created']} at commit `{results.get('commit', '?')}`; "
            f"backends here: {', '.join(results.get('backends', []))}; load average before/after the run: "
            f"{env.get('load_average_before', '?')}/{env.get('load_average_after', '?')}. "
            "Column meanings: docs/benchmarks.md.", ""]

    out += ["## Targets", ""]
    out.append(_table(["target", "measured", "met"], [
        [t["target"], _fmt(t["value"]), {True: "yes", False: "**no**", None: "not measured"}[t["met"]]]
        for t in summary["targets"]
    ]))

    if summary["loss_rows"]:
        out += ["", "## Loss: forward + backward", ""]
        out += ["Fastest calls, the implementations of a case interleaved call by call on inputs no cache holds, "
                "each call after the same untimed write (medians are in the json); `×eager`, `×compiled`: speedup "
                "over the eager loss as the Diffusion-DPO trainers write it and over `torch.compile` of it, and "
                "`roofline`: copy time / time (1.0 = as fast as copying the bytes the loss must move), each the "
                "median over rounds of the ratio of the two calls of a round; saved: MiB autograd keeps for "
                "backward beyond the inputs.", ""]
        if plots.get("loss_time"):
            out += [f"![loss time]({plots['loss_time']})", f"![loss speedup]({plots['loss_speedup']})", ""]
        rows = sorted(summary["loss_rows"], key=lambda r: (r["latents"], r["method"], r["dtype"], r["pairs"], r["backend"]))
        out.append(_table(
            ["latents", "M", "dtype", "method", "backend", "time ms", "eager ms", "compiled ms", "copy ms",
             "×eager", "×compiled", "roofline", "saved MiB", "eager saved MiB", "compiled saved MiB"],
            [[r["latents"], str(r["pairs"]), r["dtype"], r["method"], r["backend"],
              _fmt(r["time_s"], ".3f", 1e3), _fmt(r["eager_s"], ".3f", 1e3), _fmt(r["compiled_s"], ".3f", 1e3),
              _fmt(r["copy_s"], ".3f", 1e3), _fmt(r["speedup_eager"], ".1f"), _fmt(r["speedup_compiled"], ".2f"),
              _fmt(r["roofline"], ".2f"), _fmt(r["saved_extra_bytes"], ".2f", 1 / MIB),
              _fmt(r["eager_saved_extra_bytes"], ".2f", 1 / MIB),
              _fmt(r["compiled_saved_extra_bytes"], ".2f", 1 / MIB)] for r in rows],
        ))

    if summary["e2e_rows"]:
        out += ["", "## End to end: training steps", ""]
        out += ["Pairs/s at the median step time after warm-up (for `precompute_ref`, the reference pass it runs "
                "before training is spread over the steps it serves); peak memory while training, above the "
                "imported libraries; each configuration in a fresh process. `×`: over the baseline. Set-up "
                "(model loading; for rpo-fast also filling the latent cache) is listed, not counted; its peak "
                "memory is in the json.", ""]
        if plots.get("e2e"):
            out += [f"![end to end]({plots['e2e']})", ""]
        header = ["sweep", "pairs", "px"]
        for loop in E2E_LOOPS:
            label = LOOP_LABELS[loop]
            header += [f"{label} pairs/s"] + (["×"] if loop != "baseline" else []) + [f"{label} peak MiB"]
            header += (["mem ×"] if loop != "baseline" else []) + [f"{label} setup s"]
        body = []
        for r in summary["e2e_rows"]:
            cells = [r["sweep"], str(r["pairs"]), str(r["resolution"])]
            for loop in E2E_LOOPS:
                cells.append(_fmt(r[f"{loop}_pairs_per_s"]))
                if loop != "baseline":
                    cells.append(_fmt(r[f"{loop}_throughput_ratio"]))
                cells.append(_fmt(r[f"{loop}_peak_bytes"], ".0f", 1 / MIB))
                if loop != "baseline":
                    cells.append(_fmt(r[f"{loop}_memory_ratio"]))
                cells.append(_fmt(r[f"{loop}_setup_s"], ".1f"))
            body.append(cells)
        out.append(_table(header, body))
    return "\n".join(out) + "\n"


def _loss_grid(loss: List[dict]):
    latents = [x for x in ("tiny", "sd15", "sdxl") if any(m["latents"] == x for m in loss)]
    dtypes = [x for x in ("fp32", "bf16") if any(m["dtype"] == x for m in loss)]
    return latents, dtypes


def plot_loss(results: Dict[str, object], time_png: Path, speedup_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [m for m in results["loss"] if m["method"] == "rpo"]
    latents, dtypes = _loss_grid(loss)
    rows = [r for r in summarize(results["loss"], [])["loss_rows"] if r["method"] == "rpo"]
    impls = ["copy", "eager", "compiled"] + sorted({m["impl"] for m in loss} - {"copy", "eager", "compiled"})
    styles = {"copy": dict(color="grey", linestyle="--"), "eager": dict(color="tab:red"),
              "compiled": dict(color="tab:orange"), **{b: dict(color=c) for b, c in BACKEND_COLORS.items()}}

    fig, axes = plt.subplots(len(latents), len(dtypes), figsize=(5 * len(dtypes), 3.6 * len(latents)), squeeze=False)
    for (i, lat), (j, dt) in ((a, b) for a in enumerate(latents) for b in enumerate(dtypes)):
        ax = axes[i][j]
        for impl in impls:
            pts = sorted((m["pairs"], m[STATISTIC] * 1e3) for m in loss
                         if m["impl"] == impl and m["latents"] == lat and m["dtype"] == dt)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl, **styles.get(impl, {}))
        ax.set(xscale="log", yscale="log", xlabel="pairs M", ylabel="fwd+bwd time (ms)", title=f"rpo, {lat} latents, {dt}")
        ax.set_xticks(sorted({m["pairs"] for m in loss}), labels=[str(p) for p in sorted({m["pairs"] for m in loss})])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Loss forward+backward on {results['machine']['slug']}")
    fig.tight_layout()
    fig.savefig(time_png, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(latents), len(dtypes), figsize=(5 * len(dtypes), 3.6 * len(latents)), squeeze=False)
    backends = sorted({r["backend"] for r in rows})
    for (i, lat), (j, dt) in ((a, b) for a in enumerate(latents) for b in enumerate(dtypes)):
        ax = axes[i][j]
        for k, backend in enumerate(backends):
            sel = sorted((r for r in rows if r["backend"] == backend and r["latents"] == lat and r["dtype"] == dt),
                         key=lambda r: r["pairs"])
            color = BACKEND_COLORS.get(backend, f"C{k}")
            for metric, style, what in (("speedup_eager", "-", "vs eager"), ("speedup_compiled", "--", "vs compiled")):
                pts = [(r["pairs"], r[metric]) for r in sel if r[metric] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle=style, color=color, label=f"{backend} {what}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="pairs M", ylabel="speedup (×)", title=f"rpo, {lat} latents, {dt}")
        pairs = sorted({r["pairs"] for r in rows})
        ax.set_xticks(pairs, labels=[str(p) for p in pairs])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Loss speedup over the eager and compiled eager loss on {results['machine']['slug']}")
    fig.tight_layout()
    fig.savefig(speedup_png, dpi=110)
    plt.close(fig)


def plot_e2e(results: Dict[str, object], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = results["e2e"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for col, (sweep, xkey, xlabel) in enumerate((("batch", "pairs", "pairs per step"),
                                                  ("resolution", "resolution", "resolution (px)"))):
        # The sweeps share their base point: the batch sweep's point at the base resolution.
        points = [m for m in e2e if m["sweep"] == sweep]
        if sweep == "resolution" and points:
            base_pairs = points[0]["pairs"]
            points += [m for m in e2e if m["sweep"] == "batch" and m["pairs"] == base_pairs]
        for loop in E2E_LOOPS:
            color, label = LOOP_COLORS[loop], LOOP_LABELS[loop]
            sel = sorted((m for m in points if m["loop"] == loop), key=lambda m: m[xkey])
            if not sel:
                continue
            xs = [m[xkey] for m in sel]
            axes[0][col].plot(xs, [m["pairs_per_s"] for m in sel], marker="o", color=color, label=label)
            axes[1][col].plot(xs, [m["train_peak_bytes"] / MIB for m in sel], marker="o", color=color, label=label)
        for row, ylabel in ((0, "pairs / s"), (1, "peak memory while training (MiB)")):
            ax = axes[row][col]
            ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel)
            if row == 0:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"Training step, tiny SD1.5 architecture, on {results['machine']['slug']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_report(results_json: Path, out_dir: Optional[Path] = None) -> List[Path]:
    """Writes the markdown table and the plots for ``results_json``; returns the files."""
    results = json.loads(Path(results_json).read_text())
    out_dir = Path(out_dir) if out_dir else Path(results_json).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(results_json).stem
    written: List[Path] = []
    plots: Dict[str, str] = {}
    if results.get("loss"):
        time_png, speedup_png = out_dir / f"{stem}-loss-time.png", out_dir / f"{stem}-loss-speedup.png"
        plot_loss(results, time_png, speedup_png)
        plots.update(loss_time=time_png.name, loss_speedup=speedup_png.name)
        written += [time_png, speedup_png]
    if results.get("e2e"):
        e2e_png = out_dir / f"{stem}-e2e.png"
        plot_e2e(results, e2e_png)
        plots["e2e"] = e2e_png.name
        written.append(e2e_png)
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(results, plots))
    return [md] + written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Markdown table and PNG plots from a benchmark results json.")
    parser.add_argument("results", type=Path, help="benchmarks/results/<machine>.json")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: next to the json)")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results: no such file: {args.results}")
    for path in write_report(args.results, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
