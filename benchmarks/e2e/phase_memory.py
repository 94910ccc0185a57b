"""Peak memory of ``rpo-fast train`` by phase, on the tiny SD1.5- and SDXL-architecture models.

    python -m benchmarks.e2e.phase_memory [--workdir DIR] [--json out.json]

Each configuration runs in fresh processes (one, or two under torchrun for DDP and FSDP) and
reports, per rank, the peak above the imported libraries (benchmarks/e2e/memory.py: resident
set on the CPU, ``max_memory_allocated`` on CUDA) of three phases: **cache building** (the
first ``prepare``, which fills the latent and text caches), **set-up** (``prepare`` again
with the caches full: models, reference, optimizer) and **training** (``--steps`` optimizer
steps). Configurations: AdamW, transformers' Adafactor, bitsandbytes' AdamW8bit (where
installed), without the text cache, and DDP against FSDP on two processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks.e2e.assets import preference_data, tiny_model
from benchmarks.e2e.harness import child_env

WORKER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    import diffusers, transformers  # noqa: F401  (imported before the baseline)
    from benchmarks.e2e.memory import PeakMemory
    from rpo_fast.train import TrainConfig
    from rpo_fast.train import loop

    job = json.loads(sys.argv[1])
    config = TrainConfig(**job["config"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory, phases = PeakMemory(device), {}
    for phase in ("cache building", "set-up"):  # the second prepare finds the caches full
        memory.start()
        run = loop.prepare(config)
        phases[phase] = memory.peak()["peak"]
        if phase == "cache building":
            run.barrier()
            run.owns_process_group = False  # keep the process group for the second prepare
            del run
    memory.start()
    batches = loop.step_batches(run, 0, job["steps"])
    for _ in range(job["steps"]):
        loop.train_step(run, batches)
    phases["training"] = memory.peak()["peak"]
    with open(job["out"] + f".rank{run.rank}", "w") as f:
        json.dump(phases, f)
    run.barrier()
    run.owns_process_group = True
    run.close()
""")


def configurations():
    base = dict(method="rpo", batch_pairs=4, max_steps=3)
    yield "AdamW", base, 1
    yield "Adafactor", {**base, "optimizer": "adafactor"}, 1
    if importlib.util.find_spec("bitsandbytes") is not None:
        yield "AdamW8bit", {**base, "optimizer": "adamw8bit"}, 1
    else:
        print("bitsandbytes is not installed: no AdamW8bit row", file=sys.stderr)
    yield "AdamW, --no-text-cache", {**base, "text_cache": False}, 1
    yield "DDP, 2 processes", {**base, "batch_pairs": 2}, 2
    yield "FSDP, 2 processes", {**base, "batch_pairs": 2, "fsdp": True}, 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--resolution", type=int, default=64)
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rpo-fast-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    from rpo_fast.tiny import build_tiny_sdxl

    models = {"sd15": tiny_model(work), "sdxl": work / "tiny-sdxl"}
    if not (models["sdxl"] / "model_index.json").exists():
        build_tiny_sdxl(models["sdxl"])
    data = preference_data(work, args.resolution, 16)
    env = child_env(OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)  # torchrun sets its own; a single process must not think it has peers
    rows = []
    for model, folder in models.items():
        for i, (name, settings, procs) in enumerate(configurations()):
            tag = f"{model}-{i}"
            config = dict(pretrained_model=str(folder), data=str(data), output_dir=str(work / "out" / tag),
                          latent_cache=str(work / "cache" / tag), resolution=args.resolution, progress=False,
                          compile=False, checkpoint_every=0, save_final=False, overwrite_output_dir=True, **settings)
            job = json.dumps({"config": config, "steps": config["max_steps"], "out": str(work / tag)})
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                        if procs > 1 else [sys.executable])
            done = subprocess.run([*launcher, str(_worker(work)), job], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{model} {name} failed: {done.stderr[-2000:]}")
            ranks = [json.loads((work / f"{tag}.rank{r}").read_text()) for r in range(procs)]
            rows.append({"model": model, "configuration": name, "processes": procs,
                         **{phase: max(r[phase] for r in ranks) / 2**20 for phase in ranks[0]}})
            print(f"{model} {name}: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rows[-1].items()
                                                   if isinstance(v, float)), flush=True)
    print("\n| model | configuration | cache building MiB | set-up MiB | training MiB |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['configuration']} | {r['cache building']:.0f} | {r['set-up']:.0f} | "
              f"{r['training']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _worker(work: Path) -> Path:
    path = work / "phase_memory_worker.py"
    path.write_text(WORKER)
    return path


if __name__ == "__main__":
    sys.exit(main())
