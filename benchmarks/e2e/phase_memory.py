"""Peak memory of ``rpo-fast train`` by phase, on small SD1.5- and SDXL-architecture models.

    python -m benchmarks.e2e.phase_memory [--size tiny|small] [--workdir DIR] [--json out.json]

Each configuration runs in fresh processes (one, or two under torchrun for DDP and FSDP) and
reports, per rank, the peak above the imported libraries (benchmarks/e2e/memory.py: resident
set on the CPU, ``max_memory_allocated`` on CUDA) of three phases: **cache building** (the
first ``prepare``, which fills the latent and text caches), **set-up** (``prepare`` again
with the caches full: models, reference, optimizer) and **training** (``--steps`` optimizer
steps). Configurations: AdamW, transformers' Adafactor, bitsandbytes' AdamW8bit (where
installed), without the text cache, and DDP against FSDP on two processes.

``--size tiny`` (default): the test models (about 1 M UNet parameters), whose states are below
the resident set's noise; ``--size small``: the same architectures at widths where the UNet's
fp32 weights, AdamW's moments and the text encoders are each hundreds of MiB (``SIZES``). The
output names each model's parameter counts and the bytes of its states by the arithmetic of
docs/memory.md, and each rank's tensors held at the end of training, next to the peaks. Each
row runs under glibc's malloc as it comes and with a fixed mmap threshold (``ALLOCATORS``):
on the CPU the resident set counts what the allocator keeps, not only the live tensors.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from benchmarks.e2e.assets import preference_data, tiny_model
from benchmarks.e2e.harness import child_env

# glibc's malloc by default raises its mmap threshold (up to 32 MiB) each time it frees a mapped
# block, so after the first large free most tensors come from its heap, whose freed parts stay
# resident: the resident set then overstates what is alive by hundreds of MiB at the small size.
# "released": a fixed threshold of 128 KiB (which also turns the raising off), so that every
# tensor above it is a mapping of its own, returned on free: the resident set follows the live
# tensors, and the options' differences show as their bytes. "default": glibc as a run gets it.
ALLOCATORS = {"default": {}, "released": {"MALLOC_MMAP_THRESHOLD_": "131072"}}

# benchmarks/tiny_models.py's builders' settings per size (both architectures; SDXL has two text encoders,
# each of this width, and cross-attends to their concatenation).
SIZES = {
    "tiny": {},
    "small": dict(block_out_channels=(128, 256, 512), text_hidden=768, text_layers=12),
}

WORKER = textwrap.dedent("""
    import gc, json, sys, torch
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
            run.barrier()  # the process group stays for the second prepare (which finds it started)
            del run
            gc.collect()
    memory.start()
    batches = loop.step_batches(run, 0, job["steps"])
    for _ in range(job["steps"]):
        loop.train_step(run, batches)
    phases["training"] = memory.peak()["peak"]

    def nbytes(tensors):
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in local) / 2**20

    reference = run.reference.model if run.reference is not None and run.reference.kind == "copy" else None
    held = {"unet": nbytes(run.unet.parameters()), "gradients": nbytes(p.grad for p in run.params),
            "optimizer": nbytes(v for s in run.optimizer.state.values() for v in s.values()),
            "reference": nbytes(reference.parameters()) if reference is not None else 0.0,
            "text encoders": nbytes(p for e in run.models.text_encoders for p in e.parameters())}
    with open(job["out"] + f".rank{run.rank}", "w") as f:
        json.dump({"phases": phases, "held": held}, f)
    run.barrier()
    if torch.distributed.is_initialized():  # started by the first prepare
        torch.distributed.destroy_process_group()
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


def build_models(work: Path, size: str) -> dict:
    """{"sd15": folder, "sdxl": folder} of ``size``, built once per workdir."""
    from benchmarks.tiny_models import build_tiny_sd15, build_tiny_sdxl

    models = {"sd15": tiny_model(work) if size == "tiny" else work / f"{size}-sd15", "sdxl": work / f"{size}-sdxl"}
    for name, build in (("sd15", build_tiny_sd15), ("sdxl", build_tiny_sdxl)):
        if not (models[name] / "model_index.json").exists():
            build(models[name], **SIZES[size])
    return models


def model_summary(folder: Path) -> dict:
    """Parameter counts of the UNet and text encoders (from the safetensors headers) and the MiB
    of the states by the bytes-per-parameter arithmetic of docs/memory.md: fp32 UNet weights (and
    as many for its gradients and a frozen fp32 reference), AdamW's two fp32 moments,
    transformers' Adafactor (beta1=None: a >= 2-D weight keeps fp32 means over its last and its
    second-to-last dim, a 1-D one a full fp32 copy), the fp32 text encoders."""
    import math

    from safetensors import safe_open

    shapes = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for file in sorted((folder / part).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                shapes.setdefault(part, []).extend(f.get_slice(k).get_shape() for k in f.keys())
    count = {part: sum(math.prod(s) for s in found) for part, found in shapes.items()}
    adafactor = sum(4 * (math.prod(s[:-1]) + math.prod(s[:-2]) * s[-1]) if len(s) >= 2 else 4 * math.prod(s)
                    for s in shapes["unet"])
    text = sum(n for part, n in count.items() if part != "unet")
    return {"parameters": count,
            "MiB": {"unet fp32": 4 * count["unet"] / 2**20, "adamw moments": 8 * count["unet"] / 2**20,
                    "adafactor state": adafactor / 2**20, "text encoders fp32": 4 * text / 2**20}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--model", choices=("sd15", "sdxl"), action="append", help="only this architecture (repeatable)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--allocator", choices=(*ALLOCATORS, "both"), default="both",
                   help="glibc malloc as it comes, with a fixed 128 KiB mmap threshold, or each row under both")
    args = p.parse_args(argv)
    allocators = list(ALLOCATORS) if args.allocator == "both" else [args.allocator]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rpo-fast-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    models = {k: v for k, v in build_models(work, args.size).items() if not args.model or k in args.model}
    summaries = {model: model_summary(folder) for model, folder in models.items()}
    for model, summary in summaries.items():
        print(f"{model} ({args.size}): parameters " + ", ".join(f"{k} {v:,}" for k, v in summary["parameters"].items())
              + "; MiB " + ", ".join(f"{k} {v:.0f}" for k, v in summary["MiB"].items()), flush=True)
    data = preference_data(work, args.resolution, 16)
    rows = []
    for model, folder in models.items():
        for i, (name, settings, procs) in enumerate(configurations()):
            row = {"model": model, "configuration": name, "processes": procs}
            for allocator in allocators:
                env = child_env(OMP_NUM_THREADS="1", **ALLOCATORS[allocator])
                env.pop("WORLD_SIZE", None)  # torchrun sets its own; a single process must not think it has peers
                if not ALLOCATORS[allocator]:
                    env.pop("MALLOC_MMAP_THRESHOLD_", None)
                tag = f"{args.size}-{model}-{i}-{allocator}"
                shutil.rmtree(work / "cache" / tag, ignore_errors=True)  # the first phase fills the caches
                config = dict(pretrained_model=str(folder), data=str(data), output_dir=str(work / "out" / tag),
                              latent_cache=str(work / "cache" / tag), resolution=args.resolution, progress=False,
                              compile=False, checkpoint_every=0, save_final=False, overwrite_output_dir=True,
                              **settings)
                job = json.dumps({"config": config, "steps": config["max_steps"], "out": str(work / tag)})
                launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(procs)] if procs > 1 else [sys.executable])
                done = subprocess.run([*launcher, str(_worker(work)), job], env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{model} {name} ({allocator} malloc) failed: {done.stderr[-2000:]}")
                ranks = [json.loads((work / f"{tag}.rank{r}").read_text()) for r in range(procs)]
                row[allocator] = {phase: max(r["phases"][phase] for r in ranks) / 2**20 for phase in ranks[0]["phases"]}
                row["held MiB"] = {k: max(r["held"][k] for r in ranks) for k in ranks[0]["held"]}
                print(f"{model} {name}, {allocator} malloc: "
                      + ", ".join(f"{k} {v:.0f} MiB" for k, v in row[allocator].items())
                      + "; held at the end " + ", ".join(f"{k} {v:.0f}" for k, v in row["held MiB"].items()), flush=True)
            rows.append(row)
    phases = ("cache building", "set-up", "training")
    print(f"\nMiB per rank (max over ranks), {' / '.join(allocators)} malloc:\n")
    print("| model | configuration | " + " | ".join(phases) + " | held tensors |\n| --- | --- |"
          + " ---: |" * (len(phases) + 1))
    for r in rows:
        cells = [" / ".join(f"{r[a][ph]:.0f}" for a in allocators) for ph in phases]
        print(f"| {r['model']} | {r['configuration']} | " + " | ".join(cells) + f" | {sum(r['held MiB'].values()):.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "resolution": args.resolution, "models": summaries,
                                         "allocators": {a: ALLOCATORS[a] for a in allocators}, "rows": rows},
                                        indent=1))
    return 0


def _worker(work: Path) -> Path:
    path = work / "phase_memory_worker.py"
    path.write_text(WORKER)
    return path


if __name__ == "__main__":
    sys.exit(main())
