"""Per-GPU memory of SD3.5-medium, SD3.5-large and FLUX.1-dev training at 1024 px with rpo-fast, on paper.

The transformers are built from their published configs on the meta device (no weights, no downloads)
and called as the trainer calls them (``forward.predict`` through the family's ``predict``, on the rows
``forward.unet_inputs`` makes: 16x128x128 latents, the cached text states, the pooled embedding; Flux
packs 2x2 and takes the guidance scale). State bytes come from the parameter shapes; activations from
one meta forward of one pair (two images, as the trainer runs M = 1) under an emulated bf16 autocast
with flash attention, counting the storages still alive when it ends (what the backward keeps), per
image. The machinery is that of ``git show 0d9f673:benchmarks/memory_budget.py`` (SD1.5 / SDXL).
Estimates, not measurements: see docs/sd3-flux.md. Run: ``python -m benchmarks.flow_memory_budget``.
"""

from __future__ import annotations

import gc
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from rpo_fast.train.config import DEFAULT_LORA_TARGETS
from rpo_fast.train.families import Flux, StableDiffusion3
from rpo_fast.train.forward import UNetInputs, predict
from rpo_fast.train.models import add_lora

META = torch.device("meta")
GB, GiB = 10**9, 2**30
OVERHEAD = 3 * GiB  # CUDA context, allocator fragmentation, loss, latents and text rows: 2-4 GiB
CAPACITY = {"H100": 81559 * 2**20, "H200": 143771 * 2**20}  # total memory as nvidia-smi reports it
PAIRS = (1, 2)
LORA_RANK = 16
# The published transformer/config.json of each model (the keys that differ from the defaults).
MODELS = {
    "SD3.5-medium": ("sd3", 2.24, dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "SD3.5-large": ("sd3", 8.06, dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "FLUX.1-dev": ("flux", 11.90, dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
}
# Text rows the trainer feeds (families.py): SD3 77 CLIP + 77 T5 tokens (_Flow.max_sequence_length), Flux 512 T5.
TEXT = {"sd3": (154, 2048), "flux": (512, 768)}  # (tokens, pooled width); hidden width 4096 (T5-XXL)
CASTS = {**dict.fromkeys(["linear", "conv2d", "matmul", "bmm", "baddbmm", "addmm", "mm"], torch.bfloat16),
         **dict.fromkeys(["layer_norm", "group_norm", "pow", "rsqrt", "exp", "softmax"], torch.float32)}
# (CUDA autocast's policy for these ops; rms_norm has none: it follows its inputs. SDPA: see flash_sdpa.)
# What the model's weights are in each measured setting: full (fp32, eager autocast casts and caches them),
# fsdp (FSDP gathers bf16 weights: nothing cast), lora (bf16 base, fp32 adapters, rank 16, the family's targets).
KINDS = ("full", "fsdp", "lora")
# docs/sd3-flux.md's settings, all AdamW, bf16 autocast. accum: gradient accumulation (K >= 2) under FSDP keeps
# whole unsharded fp32 gradients until the last micro-batch (set_requires_gradient_sync(False)).
SETTINGS = {
    "LoRA r16, one GPU": dict(kind="lora", shard=1, ref=0),
    "full, one GPU, frozen reference": dict(kind="full", shard=1, ref=2),
    "full, one GPU, --precompute-ref": dict(kind="full", shard=1, ref=0),
    "full, --fsdp on 8, frozen reference, K >= 2": dict(kind="fsdp", shard=8, ref=2, accum=True),
    "full, --fsdp on 8, --precompute-ref, K >= 2": dict(kind="fsdp", shard=8, ref=0, accum=True),
    "full, --fsdp on 8, frozen reference, K = 1": dict(kind="fsdp", shard=8, ref=2),
    "full, --fsdp on 8, --precompute-ref, K = 1": dict(kind="fsdp", shard=8, ref=0),
}


# docs/sd3-flux.md's launch lines: (model, setting, M); the SD3.5-medium line trains 2 pairs a micro-batch.
LAUNCH = [("SD3.5-medium", "LoRA r16, one GPU", 2), ("SD3.5-large", "full, --fsdp on 8, --precompute-ref, K >= 2", 1),
          ("FLUX.1-dev", "LoRA r16, one GPU", 1), ("FLUX.1-dev", "full, --fsdp on 8, --precompute-ref, K >= 2", 1)]
# The set-up's peaks (train/loop.py): the whole fp32 model goes to each GPU before anything is sharded or cast;
# frozen_copy deep-copies it in fp32 before casting the copy to bf16; precompute_reference_errors runs the fp32
# model under autocast, which caches a bf16 copy of each weight (its weights require grad; no_grad does not stop it).
SETUP = {"frozen reference: the fp32 copy before its cast": lambda c: 8 * (c["params"] + c["buffers"]) + OVERHEAD,
         "--precompute-ref pass": lambda c: 6 * c["params"] + 4 * c["buffers"] + OVERHEAD,
         "LoRA: the fp32 model before its cast to bf16": lambda c: 4 * (c["params"] + c["buffers"]) + OVERHEAD}


def family_of(kind: str):
    if kind == "sd3":
        return StableDiffusion3()
    family = Flux(3.5)
    family.guidance = True  # FLUX.1-dev's config: guidance_embeds
    return family


def build(name: str, kind: str = "full"):
    """The transformer as rpo-fast trains it (see KINDS), and its family."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    fam, _, config = MODELS[name]
    family = family_of(fam)
    with META:
        model = (SD3Transformer2DModel if fam == "sd3" else FluxTransformer2DModel)(**config)
        if kind == "fsdp":  # FSDP's policy casts the gathered parameters, not the buffers
            for p in model.parameters():
                p.data = p.data.to(torch.bfloat16)
        elif kind == "lora":
            model.to(torch.bfloat16)
            torch.manual_seed(0)
            add_lora(model, SimpleNamespace(lora_target_modules=DEFAULT_LORA_TARGETS, lora_rank=LORA_RANK,
                                            lora_alpha=None), family)
    return model, family


def fsdp_units(model, family, order: list) -> dict:
    """Params of --fsdp's units (Family.shard_units: each block; the root holds the rest): "fine" the largest
    block, "pair" two adjacent in forward order (``order``: their names), "root" the embedders and output layers."""
    units = family.shard_units(model)
    named = {m: n for n, m in model.named_modules()}
    size = {named[u]: sum(p.numel() for p in u.parameters()) for u in units}
    assert sorted(order) == sorted(size)  # each block runs once
    run = [size[n] for n in order]
    return {"fine": max(run), "pair": max(a + b for a, b in zip(run, run[1:])),
            "root": sum(p.numel() for p in model.parameters()) - sum(run)}


class LiveStorages(TorchDispatchMode):
    """Records each storage an op creates (marked: a bf16 copy of a trained weight); ``live`` sums the unfreed."""

    def __init__(self, exclude: set):
        super().__init__()
        self.refs, self.exclude = {}, exclude

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (s := t.untyped_storage())._cdata not in self.exclude:
                if s._cdata not in self.refs or self.refs[s._cdata][0].expired():
                    self.refs[s._cdata] = [StorageWeakRef(s), s.nbytes(), False]
        return out

    def live(self, weights: bool = False) -> int:
        return sum(n for ref, n, w in self.refs.values() if w == weights and not ref.expired())


class Autocast(TorchFunctionMode):
    """torch.autocast(bf16) on meta, where the real one does not apply (CASTS; the rest follows its inputs)."""

    def __init__(self, live: LiveStorages):
        super().__init__()
        self.live = live

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def cast(t):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == CASTS[func.__name__]:
                return t
            out = t.to(CASTS[func.__name__])
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:  # autocast caches these until it exits
                self.live.refs[out.untyped_storage()._cdata][2] = True
            return out
        if func.__name__ in CASTS:
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs or {})
        return func(*args, **(kwargs or {}))


def flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as it runs on an H100/H200 under bf16 autocast (which casts its inputs: the rms-normed, rotated
    q and k are fp32 when the weights are): flash, which saves q, k, v, out and an fp32 logsumexp. On meta,
    F.scaled_dot_product_attention takes the math path, which saves the L x L matrix."""
    assert attn_mask is None
    q, k, v = (t.to(torch.bfloat16) for t in (query, key, value))
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


def inputs(family, rows: int) -> UNetInputs:
    """What forward.unet_inputs hands the family at 1024 px: fp32 noisy latents and flow timesteps,
    the text cache's bf16 states and pooled embedding."""
    tokens, pooled = TEXT[family.name]
    noisy = torch.randn(rows, 16, 128, 128, device=META)
    hidden = torch.randn(rows, tokens, 4096, device=META, dtype=torch.bfloat16)
    added = family.conditioning(torch.randn(rows, pooled, device=META, dtype=torch.bfloat16), 1024)
    return UNetInputs(noisy, torch.full((rows,), 500.0, device=META), hidden, added, noisy, family)


def activations(name: str, kind: str, checkpointing: bool, rows: int = 2) -> dict:
    """Per image, of a call on ``rows`` (2: one pair, what the trainer runs at M = 1): activation B alive
    when the forward ends ("held"); the same from saved_tensors_hooks ("saved", blind inside checkpointed
    blocks); the most one block adds ("block": what its recompute adds in the backward); the bf16 weight
    casts alive ("casts"); the blocks' names in the order they ran ("order")."""
    model, family = build(name, kind)
    if checkpointing:
        model.enable_gradient_checkpointing()  # as the trainer (loop._make_trainable)
    model.train()
    states = [*model.parameters(), *model.buffers()]  # not activations (SD3's position table is a 0.4-0.9 GB buffer)
    mode, saved, start, block, order = LiveStorages({t.untyped_storage()._cdata for t in states}), {}, {}, [0], []

    def enter(m, args, name):  # returns None: a forward pre-hook's result would replace the block's inputs
        start[m] = mode.live()
        order.append(name)

    names = {m: n for n, m in model.named_modules()}
    for m in family.shard_units(model):  # the blocks
        m.register_forward_pre_hook(lambda m, a, name=names[m]: enter(m, a, name))
        m.register_forward_hook(lambda m, a, o: block.__setitem__(0, max(block[0], mode.live() - start[m])))

    def pack(t):  # activations only: not parameters, nor the bf16 casts of trained weights
        if (entry := mode.refs.get(t.untyped_storage()._cdata)) is not None and not entry[2]:
            saved[t.untyped_storage()._cdata] = entry[1]
        return t

    x = inputs(family, rows)
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, flash_sdpa
    try:
        with mode, Autocast(mode), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = predict(model, x)
    finally:
        F.scaled_dot_product_attention = sdpa
    assert y.shape == x.noisy.shape
    gc.collect()
    # Measured while the prediction is alive: it holds the graph, and with it what the backward needs. (Once it
    # is deleted, only what reference cycles keep would remain: pack returns the tensor itself, so an output
    # saved by its own node, flash attention's, holds everything before it until the collector runs.)
    held, casts = mode.live(), mode.live(True)
    del y
    return {"held": held / rows, "saved": sum(saved.values()) / rows, "block": block[0] / rows, "casts": casts / rows,
            "order": order}


def model_memory(name: str) -> dict:
    model, family = build(name)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e9, 2) == MODELS[name][1], (name, params)
    lora = sum(p.numel() for p in build(name, "lora")[0].parameters() if p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers())  # fp32 as trained in full, bf16 under LoRA and in the reference
    acts = {(k, ck): activations(name, k, ck) for k in KINDS for ck in (False, True)}
    return {"params": params, "lora": lora, "buffers": buffers, "acts": acts,
            **fsdp_units(model, family, acts[("full", False)]["order"]),
            "per_image": {(k, ck): a["held"] + (acts[(k, False)]["block"] if ck else 0) for (k, ck), a in acts.items()}}


def per_gpu(c: dict, s: dict, pairs: int, checkpointing: bool = True) -> dict:
    """Bytes per GPU at the peak (the end of the forward / the backward), by component, AdamW."""
    lora, shard = s["kind"] == "lora", s["shard"]
    t = c["lora"] if lora else c["params"]  # trained parameters, fp32
    return {"trained weights (fp32; LoRA: + bf16 base)": 4 * t / shard + (2 * c["params"] if lora else 0),
            "gradients (fp32)": 4 * t / (1 if s.get("accum") else shard),
            "AdamW state": 8 * t / shard,
            "reference (bf16)": s["ref"] * c["params"] / shard,
            "buffers (SD3's position table; FSDP shards none)": (2 if lora else 4 + s["ref"]) * c["buffers"],
            "autocast bf16 weight cache (eager)": 0 if shard > 1 else 2 * t,
            "FSDP unsharded units": 2 * c["pair"] + 6 * c["fine"] + 8 * c["root"] if shard > 1 else 0,
            "activations": 2 * pairs * c["per_image"][(s["kind"], checkpointing)],
            "CUDA context, fragmentation, loss": OVERHEAD}


def cell(b: float) -> str:
    return f"{b / GB:.1f} ({'both' if b <= CAPACITY['H100'] else 'H200' if b <= CAPACITY['H200'] else 'neither'})"


def main() -> None:
    import warnings

    from diffusers.utils import logging
    logging.set_verbosity_error()  # "modules that should be kept in float32: []" at each bf16 build
    warnings.filterwarnings("ignore", "Mismatch dtype between input and weight")  # Flux's rms_norm, as on CUDA
    row = lambda cells: print("| " + " | ".join(map(str, cells)) + " |")
    t0 = time.time()
    for name, ck in (("SD3.5-medium", True), ("FLUX.1-dev", False)):
        one, two = (activations(name, "full", ck, rows)["held"] for rows in (2, 4))
        print(f"per image, 4 images / 2 images ({name}, full, {'' if ck else 'no '}checkpointing): {two / one:.4f}")
    res = {}
    for name in MODELS:
        t = time.time()
        res[name] = c = model_memory(name)
        print(f"\n### {name}: {c['params']:,} parameters; LoRA r{LORA_RANK} on the family's targets {c['lora']:,}; "
              f"buffers {c['buffers']:,}; FSDP units: largest block {c['fine']:,}, two adjacent {c['pair']:,}, "
              f"root {c['root']:,} "
              f"({time.time() - t:.0f} s)\n")
        print("| GB per image | held at the end of the forward | saved_tensors_hooks | + largest block recompute "
              "| bf16 weight casts held | at the peak |\n| --- |" + " ---: |" * 5)
        for (k, ck), a in c["acts"].items():
            block = c["acts"][(k, False)]["block"] if ck else 0
            row([f"{k}, {'' if ck else 'no '}checkpointing"]
                + [f"{v / GB:.2f}" for v in (a["held"], a["saved"], block, a["casts"], c["per_image"][(k, ck)])])
    for ck in (True, False):
        print(f"\nGB per GPU, {'with' if ck else 'without'} gradient checkpointing, M = {' / '.join(map(str, PAIRS))} "
              "pairs (both: fits an H100, 85.5 GB, and an H200, 150.8 GB)\n")
        row(["setting"] + [f"{n}, M = {m}" for n in MODELS for m in PAIRS])
        print("| --- |" + " ---: |" * (len(MODELS) * len(PAIRS)))
        for label, s in SETTINGS.items():
            row([label] + [cell(sum(per_gpu(res[n], s, m, ck).values())) for n in MODELS for m in PAIRS])
    print("\nGB per GPU by component, checkpointing, the launch lines of docs/sd3-flux.md\n")
    row(["component"] + [f"{n}, {label}, M = {m}" for n, label, m in LAUNCH])
    print("| --- |" + " ---: |" * len(LAUNCH))
    parts = [per_gpu(res[n], SETTINGS[label], m) for n, label, m in LAUNCH]
    for part in [*parts[0], "total"]:
        row([part] + [f"{(sum(q.values()) if part == 'total' else q[part]) / GB:.2f}" for q in parts])
    print("\nGB per GPU at set-up, before training (states and overhead; + a forward's transients in the pass)\n")
    row(["set-up"] + list(MODELS))
    print("| --- |" + " ---: |" * len(MODELS))
    for label, f in SETUP.items():
        row([label] + [f"{f(res[n]) / GB:.1f}" for n in MODELS])
    print(f"\n({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
