"""Per-GPU memory of SD1.5 (512 px) and SDXL (1024 px) training with rpo-fast, on paper.

The real UNets are built from their configs on the meta device (no weights, no downloads).
State bytes come from the parameter shapes; activations from one meta forward of one sample
under an emulated bf16 autocast, counting the storages still alive when it ends (what the
backward keeps). Estimates, not measurements: see docs/memory.md. Run: ``python -m benchmarks.memory_budget``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from benchmarks.step_budget import META, SD15_UNET, SDXL_UNET

GiB = 2**30
OVERHEAD = 3 * GiB  # CUDA context, allocator fragmentation, loss, latents and text rows: 2-4 GiB
CAPACITY = {"H100": 81559 * 2**20, "H200": 143771 * 2**20}  # total memory as nvidia-smi reports it
NUM_GPUS, PAIRS = (1, 8, 64), (1, 4)
LORA_RANK, LORA_TARGETS = 64, ["to_k", "to_q", "to_v", "to_out.0"]  # rpo-fast's default targets
# FSDP (rpo_fast/train/sharding.py): a unit per ResnetBlock2D and BasicTransformerBlock, then one per down/mid/up
# block for what is left (samplers, projections, norms), then the root; param_dtype bf16, reduce_dtype fp32.
# Unsharded working set: bf16 params of two adjacent layer units (one prefetched, 2 B) and the running one's bf16
# gradients with their fp32 copy (6 B); the enclosing block's leftover for its whole forward and backward (8 B, as
# a running unit); the root stays unsharded (8 B).
CASTS = {**dict.fromkeys(["linear", "conv2d", "matmul", "bmm", "baddbmm", "addmm", "mm"], torch.bfloat16),
         "layer_norm": torch.float32, "group_norm": torch.float32}  # CUDA autocast's policy for these ops
SETTINGS = {"(a) DDP, AdamW, fp32 reference": dict(fsdp=False, opt="adamw", ref=4),
            "(b) DDP, Adafactor, bf16 reference": dict(fsdp=False, opt="adafactor", ref=2),
            "(c) FSDP, AdamW, bf16 reference": dict(fsdp=True, opt="adamw", ref=2, accum=True),
            "(d) FSDP, Adafactor, --precompute-ref": dict(fsdp=True, opt="adafactor", ref=0, accum=True),
            "(c1) = (c), no gradient accumulation": dict(fsdp=True, opt="adamw", ref=2),
            "(d1) = (d), no gradient accumulation": dict(fsdp=True, opt="adafactor", ref=0),
            f"(e) LoRA r{LORA_RANK}, DDP, AdamW": dict(fsdp=False, opt="adamw", ref=0, lora=True)}


def build(config: dict, lora: bool = False):
    """The UNet as rpo-fast trains it: fp32 (full), or a bf16 base with fp32 LoRA adapters."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    with META:
        unet = UNet2DConditionModel(**config)
    if lora:
        unet.to(torch.bfloat16).requires_grad_(False)
        unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=LORA_TARGETS))
        for p in unet.parameters():
            p.data = p.data.float() if p.requires_grad else p.data
    return unet


def optimizer_state(ps) -> dict:
    """B of state: fused AdamW (two fp32 moments); bitsandbytes AdamW8bit (two uint8 states, two fp32
    absmax per 256 elements; fp32 states under min_8bit_size=4096); transformers' Adafactor, beta1=None
    (>= 2-D: exp_avg_sq_row of shape[:-1], exp_avg_sq_col of shape[:-2] + shape[-1:]; 1-D: exp_avg_sq)."""
    return {"adamw": sum(8 * p.numel() for p in ps),
            "adamw8bit": sum(2 * p.numel() + 8 * math.ceil(p.numel() / 256) if p.numel() >= 4096 else 8 * p.numel()
                             for p in ps),
            "adafactor": sum(4 * (math.prod(p.shape[:-1]) + math.prod(p.shape[:-2]) * p.shape[-1]) if p.dim() >= 2
                             else 4 * p.numel() for p in ps)}


def fsdp_units(unet, order: list) -> dict:
    """Params of FSDP's units as --fsdp shards the UNet: fully_shard on each ResnetBlock2D and BasicTransformerBlock
    ("fine": the largest; "pair": two adjacent in forward order, ``order`` being their names), then on each
    down/mid/up block ("leftover": the largest rest), then on the UNet ("root"). "block": the largest whole
    down/mid/up block, which a unit per block alone would all-gather (for comparison)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    inner = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    owner = {}
    for unit in inner + blocks + [unet]:  # innermost first: a parameter belongs to the first unit holding it
        for p in unit.parameters():
            owner.setdefault(id(p), id(unit))
    size = {}
    for p in unet.parameters():
        size[owner[id(p)]] = size.get(owner[id(p)], 0) + p.numel()
    named = dict(unet.named_modules())
    assert sorted(order) == sorted(n for n, m in named.items() if m in inner)  # each layer runs once
    run = [size[id(named[n])] for n in order]
    return {"fine": max(run), "pair": max(a + b for a, b in zip(run, run[1:])),
            "leftover": max(size.get(id(b), 0) for b in blocks), "root": size[id(unet)],
            "block": max(sum(p.numel() for p in b.parameters()) for b in blocks)}


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


def flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """SDPA as it runs on an H100/H200 in bf16: flash, which saves q, k, v, out and an fp32 logsumexp.
    On meta, F.scaled_dot_product_attention takes the math path, which saves the L x L matrix."""
    assert attn_mask is None
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


def activations(config: dict, xl: bool, checkpointing: bool, lora: bool) -> dict:
    """One sample: activation B alive when the forward ends ("held"); the same from saved_tensors_hooks
    ("saved", blind inside checkpointed blocks); the most one ResnetBlock2D / BasicTransformerBlock adds
    ("block": what its recompute adds in the backward); the bf16 weight casts alive ("casts"); the names of
    those layers in the order they ran ("order")."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    unet = build(config, lora)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    mode, saved, start, block = LiveStorages({p.untyped_storage()._cdata for p in unet.parameters()}), {}, {}, [0]
    order = []

    def enter(m, args, name):  # returns None: a forward pre-hook's result would replace the layer's inputs
        start[m] = mode.live()
        order.append(name)

    for name, m in unet.named_modules():
        if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)):
            m.register_forward_pre_hook(lambda m, a, name=name: enter(m, a, name))
            m.register_forward_hook(lambda m, a, o: block.__setitem__(0, max(block[0], mode.live() - start[m])))

    def pack(t):  # activations only: not parameters, nor the bf16 casts of trained weights
        if (entry := mode.refs.get(t.untyped_storage()._cdata)) is not None and not entry[2]:
            saved[t.untyped_storage()._cdata] = entry[1]
        return t

    s, mk = config["sample_size"], lambda *shape: torch.randn(*shape, device=META)
    added = dict(text_embeds=mk(1, 1280), time_ids=mk(1, 6)) if xl else None
    sdpa, F.scaled_dot_product_attention = F.scaled_dot_product_attention, flash_sdpa
    try:
        with mode, Autocast(mode), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = unet(mk(1, 4, s, s), torch.tensor([500], device=META),
                     encoder_hidden_states=mk(1, 77, config["cross_attention_dim"]), added_cond_kwargs=added).sample
    finally:
        F.scaled_dot_product_attention = sdpa
    del y
    return {"held": mode.live(), "saved": sum(saved.values()), "block": block[0], "casts": mode.live(True),
            "order": order}


def model_memory(config: dict, xl: bool) -> dict:
    unet, lora = build(config), [p for p in build(config, lora=True).parameters() if p.requires_grad]
    acts = {(ck, lo): activations(config, xl, ck, lo) for ck in (False, True) for lo in (False, True)}
    return {"params": sum(p.numel() for p in unet.parameters()), "tensors": len(list(unet.parameters())),
            "largest": max(p.numel() for p in unet.parameters()), **optimizer_state(list(unet.parameters())),
            **fsdp_units(unet, acts[(False, False)]["order"]), "lora": sum(p.numel() for p in lora), "acts": acts,
            "per_sample": {k: a["held"] + (acts[(False, k[1])]["block"] if k[0] else 0) for k, a in acts.items()}}


def per_gpu(c: dict, s: dict, gpus: int, pairs: int, checkpointing: bool) -> dict:
    """Bytes per GPU at the peak (the end of the forward / the backward), by component. Under FSDP with
    gradient accumulation, set_requires_gradient_sync(False) keeps whole fp32 gradients until the last micro-batch.
    DDP's gradients are views of its all-reduce buckets (gradient_as_bucket_view=True): held once."""
    lora, shard = s.get("lora", False), gpus if s["fsdp"] else 1
    t = c["lora"] if lora else c["params"]  # trained parameters, fp32
    return {"trained weights (fp32)": 4 * t / shard + (2 * c["params"] if lora else 0),  # LoRA: + bf16 base
            "gradients (fp32)": 4 * t / (1 if s.get("accum") else shard),
            "optimizer state": (8 * t if lora else c[s["opt"]]) / shard,
            "reference": s["ref"] * c["params"] / shard,
            "autocast bf16 weight cache (eager)": 0 if s["fsdp"] else 2 * t,
            "FSDP unsharded units": 2 * c["pair"] + 6 * c["fine"] + 8 * (c["leftover"] + c["root"]) if s["fsdp"] else 0,
            "activations": 2 * pairs * c["per_sample"][(checkpointing, lora)],
            "CUDA context, fragmentation, loss": OVERHEAD}


def cell(c: dict, s: dict, gpus: int, pairs: int, checkpointing: bool) -> str:
    if s["fsdp"] and gpus == 1:
        return "refused"  # --fsdp needs torchrun with two processes or more
    b = sum(per_gpu(c, s, gpus, pairs, checkpointing).values())
    return f"{b / GiB:.1f} ({'both' if b <= CAPACITY['H100'] else 'H200' if b <= CAPACITY['H200'] else 'neither'})"


def report(name: str, c: dict) -> None:
    p, row = c["params"], lambda cells: print("| " + " | ".join(map(str, cells)) + " |")
    print(f"\n### {name}\n\nUNet parameters: {p:,} in {c['tensors']} tensors (largest {c['largest']:,}); "
          f"LoRA rank {LORA_RANK} on {', '.join(LORA_TARGETS)}: {c['lora']:,}.\n")
    print("| state | B per parameter | GiB |\n| --- | ---: | ---: |")
    for label, b in [("fp32 weights, gradients, fp32 reference: each", 4 * p), ("bf16 reference or weight copy", 2 * p),
                     ("AdamW", c["adamw"]), ("bitsandbytes AdamW8bit", c["adamw8bit"]),
                     ("transformers Adafactor", c["adafactor"])]:
        row([label, f"{b / p:.3f}", f"{b / GiB:.2f}"])
    print(f"\nFSDP units, parameters: largest ResnetBlock2D / BasicTransformerBlock {c['fine']:,}, two adjacent "
          f"{c['pair']:,}; largest down/mid/up block leftover {c['leftover']:,}; root {c['root']:,} (a whole "
          f"down/mid/up block, were it one unit: up to {c['block']:,}).\n")
    print("| activations per sample, GiB | held at the end of the forward | saved_tensors_hooks "
          "| + largest block recompute | bf16 weight casts held | at the peak |\n| --- |" + " ---: |" * 5)
    for (ck, lo), a in c["acts"].items():
        block = c["acts"][(False, lo)]["block"] if ck else 0
        row([f"{'LoRA' if lo else 'full'}, {'' if ck else 'no '}checkpointing"]
            + [f"{v / GiB:.2f}" for v in (a["held"], a["saved"], block, a["casts"], c["per_sample"][(ck, lo)])])
    for ck in (True, False):
        print(f"\nPer-GPU GiB, {'with' if ck else 'without'} gradient checkpointing (fits: both = H100 80 GB and "
              "H200 141 GB):\n\n| setting | pairs/GPU | " + " | ".join(f"{n} GPU(s)" for n in NUM_GPUS)
              + " |\n| --- |" + " ---: |" * 4)
        for label, s in SETTINGS.items():
            for m in PAIRS:
                row([label, m] + [cell(c, s, n, m, ck) for n in NUM_GPUS])
    n, m = 8, 4
    print(f"\nGiB per GPU at {n} GPUs, {m} pairs per GPU, gradient checkpointing:\n\n| component | "
          + " | ".join(k.split()[0] for k in SETTINGS) + " |\n| --- |" + " ---: |" * len(SETTINGS))
    parts = [per_gpu(c, s, n, m, True) for s in SETTINGS.values()]
    for part in parts[0]:
        row([part] + [f"{q[part] / GiB:.2f}" for q in parts])


def main() -> None:
    report("SDXL, 1024 px (128x128 latents)", model_memory(SDXL_UNET, xl=True))
    report("SD1.5, 512 px (64x64 latents)", model_memory(SD15_UNET, xl=False))


if __name__ == "__main__":
    main()
