"""The per-step cost budget of an SD1.5 (512 px) and SDXL (1024 px) DPO step, on paper.

The real architectures are built from their published configs on the meta device (no weights,
no downloads); parameters and FLOPs per sample are counted with torch.utils.flop_counter and
turned into milliseconds under the assumptions below. Estimates, not measurements: see
docs/step-budget.md. Run: ``python -m benchmarks.step_budget``.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# -- assumptions (docs/step-budget.md) -------------------------------------------------------
PEAK = 989e12                  # H100/H200 SXM dense bf16 FLOP/s
MFU = (0.4, 0.5, 0.6)          # sustained fraction of peak: low, central, high
HBM = 4.8e12                   # H200 HBM bytes/s (H100 SXM: 3.35e12)
PCIE = (12e9, 25e9)            # pageable host-to-device bytes/s (accelerate.cpu_offload)
COMPILE = (1.1, 1.3)           # torch.compile speed-up of the UNet forward and backward
PAIRS_PER_OPT_STEP = 128       # per GPU: the official launchers' batch 1 x accumulation 128
# HBM bytes per parameter of one optimizer step: the update, + grad-norm clipping (12), + fp16 unscale (8)
OPT_BYTES = {"adamw_foreach": 80 + 12 + 8, "adafactor": 80 + 8, "adamw_fused": 28 + 12}

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280, 1280], attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
           block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
META = torch.device("meta")


def count(fn) -> float:
    with FlopCounterMode(display=False) as counter:  # matmul, conv and attention FLOPs only
        fn()
    return counter.get_total_flops()


def unet_costs(config: dict, xl: bool) -> dict:
    """Parameters and per-sample GFLOP of one UNet: forward, full backward, frozen-base backward."""
    from diffusers import UNet2DConditionModel
    with META:
        unet = UNet2DConditionModel(**config)
    s = config["sample_size"]
    x = torch.randn(1, 4, s, s, device=META, requires_grad=True)
    t = torch.tensor([500], device=META)
    ctx = torch.randn(1, 77, config["cross_attention_dim"], device=META)
    added = dict(text_embeds=torch.randn(1, 1280, device=META), time_ids=torch.randn(1, 6, device=META)) if xl else None
    run = lambda: unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    out = {"params": sum(p.numel() for p in unet.parameters()), "tensors": len(list(unet.parameters())),
           "fwd": count(run) / 1e9}
    y = run()
    out["bwd"] = count(lambda: y.sum().backward()) / 1e9            # weight and input gradients
    unet.requires_grad_(False)                                        # LoRA: base frozen, input grads only
    y = run()
    out["bwd_frozen"] = count(lambda: y.sum().backward()) / 1e9
    return out


def vae_encode_costs(pixels: int) -> dict:
    from diffusers import AutoencoderKL
    with META:
        vae = AutoencoderKL(**VAE)
    img = torch.randn(1, 3, pixels, pixels, device=META)
    params = sum(p.numel() for m in (vae.encoder, vae.quant_conv) for p in m.parameters())
    with torch.no_grad():
        return {"params": params, "fwd": count(lambda: vae.encode(img)) / 1e9}


def text_encoder_costs(config: dict, projection: bool) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with META:
        model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config))
    ids = torch.zeros(1, 77, dtype=torch.long, device=META)
    with torch.no_grad():
        return {"params": sum(p.numel() for p in model.parameters()),
                "fwd": count(lambda: model(ids, output_hidden_states=True)) / 1e9}


# rpo-fast's configurations: what each leaves out of budget() besides the VAE (the latent cache).
RPO_FAST = {"(a) frozen reference": dict(text=False),                 # the text cache
            "(b) --precompute-ref": dict(ref=False, text=False),
            "(c) --lora": dict(lora=True, text=False)}


def budget(c: dict, m: int, *, official: bool, lora=False, ref=True, vae=True, text=True, compile_x=1.0,
           mfu=MFU[1], pcie=PCIE[0], offload=True) -> dict:
    """Milliseconds per component of one micro-batch of m pairs (2m images, m prompts)."""
    ms = lambda gflop: gflop * 1e9 / (PEAK * mfu) * 1e3
    passes = 2 if c["xl"] else 1                                      # SDXL: gradient checkpointing recomputes
    bwd = c["bwd_frozen"] if lora else c["bwd"]
    opt = "adafactor" if official and c["xl"] else ("adamw_foreach" if official else "adamw_fused")
    trained = 0 if lora else c["params"]                              # LoRA adapters: a few MB, ignored
    rows = {"policy UNet fwd+bwd": ms(2 * m * (passes * c["fwd"] + bwd)) / compile_x,
            "reference UNet fwd": ms(2 * m * c["fwd"]) / compile_x if ref else 0.0,
            "VAE encode": ms(2 * m * c["vae"]) if vae else 0.0,
            "text encoder(s)": ms(m * c["text"]) if text else 0.0,
            # fp32 master weights cast per UNet pass (6 B) + gradient accumulation (12 B), per parameter
            "weight casts, grad accumulation": trained * (6 * passes + 12) / HBM * 1e3,
            "optimizer (amortized)": trained * OPT_BYTES[opt] / HBM * 1e3 * m / PAIRS_PER_OPT_STEP}
    if official and c["xl"] and offload:  # cpu_offload: ref UNet, text encoders, VAE fp16 weights copied per step
        rows["CPU-offload weight copies"] = 2 * (c["params"] + c["text_params"] + c["vae_params"]) / pcie * 1e3
    return rows


def model_costs(xl: bool) -> dict:
    u = unet_costs(SDXL_UNET if xl else SD15_UNET, xl)
    v = vae_encode_costs(1024 if xl else 512)
    texts = [text_encoder_costs(CLIP_L, False)] + ([text_encoder_costs(CLIP_BIGG, True)] if xl else [])
    return dict(u, xl=xl, vae=v["fwd"], vae_params=v["params"], text=sum(t["fwd"] for t in texts),
                text_params=sum(t["params"] for t in texts), texts=texts)


def report(name: str, c: dict) -> None:
    print(f"\n### {name}\n\n| component | params (M) | GFLOP per sample |\n| --- | ---: | ---: |")
    print(f"| UNet forward | {c['params'] / 1e6:.1f} | {c['fwd']:.0f} |")
    print(f"| UNet backward (weight + input grads) | | {c['bwd']:.0f} |")
    print(f"| UNet backward, frozen base (LoRA) | | {c['bwd_frozen']:.0f} |")
    print(f"| VAE encode (encoder + quant_conv) | {c['vae_params'] / 1e6:.1f} | {c['vae']:.0f} |")
    for label, t in zip(("CLIP ViT-L/14 text", "OpenCLIP ViT-bigG/14 text"), c["texts"]):
        print(f"| {label}, 77 tokens | {t['params'] / 1e6:.1f} | {t['fwd']:.1f} |")
    latent_elems = 4 * (128 if c["xl"] else 64) ** 2                  # the loss: ~6 FLOP per element
    opt = {k: c["params"] * b / HBM * 1e3 for k, b in OPT_BYTES.items()}
    print(f"\nUNet parameter tensors: {c['tensors']}. Loss per sample: {6 * latent_elems / 1e9:.1e} GFLOP. "
          f"One optimizer step (full FT): " + ", ".join(f"{k} {v:.0f} ms" for k, v in opt.items()) + ".")
    for m in (1, 4):
        rows = budget(c, m, official=True)
        total = sum(rows.values())
        print(f"\nOfficial trainer, M = {m} pair(s) per micro-batch, {MFU[1]:.0%} MFU"
              f"{', PCIe %.0f GB/s' % (PCIE[0] / 1e9) if c['xl'] else ''}: {total:.0f} ms\n")
        print("| component | ms | share |\n| --- | ---: | ---: |")
        for k, v in rows.items():
            print(f"| {k} | {v:.1f} | {v / total:.1%} |")
    print("\n| rpo-fast, speed-up per pair over the official trainer | M=1 both | M=4 both | official M=1 (its "
          "launchers), rpo-fast M=4 | same, compile and MFU (PCIe) range | M=4 both, official without offload |"
          "\n| --- | ---: | ---: | ---: | ---: | ---: |")
    labels = {"(a) frozen reference": "(a) full FT, frozen ref, latent and text caches",
              "(b) --precompute-ref": "(b) (a) + --precompute-ref, per step (pass excluded)",
              "(c) --lora": "(c) LoRA, adapter-off reference, latent and text caches"}

    def speedup(m_off, m, kw, compile_x=1.0, mfu=MFU[1], pcie=PCIE[0], offload=True) -> float:
        """Official time per pair over rpo-fast's (latent cache: no VAE), at the same MFU."""
        official = sum(budget(c, m_off, official=True, mfu=mfu, pcie=pcie, offload=offload).values()) / m_off
        ours = sum(budget(c, m, official=False, vae=False, compile_x=compile_x, mfu=mfu, **kw).values()) / m
        return official / ours
    for name, kw in RPO_FAST.items():
        corners = [speedup(1, 4, kw, x, f, p) for f in MFU[::2] for x in COMPILE for p in PCIE]
        print(f"| {labels[name]} | {speedup(1, 1, kw):.2f}x | {speedup(4, 4, kw):.2f}x | {speedup(1, 4, kw):.2f}x | "
              f"{min(corners):.2f}-{max(corners):.2f}x | {speedup(4, 4, kw, offload=False):.2f}x |")


def main() -> None:
    print("## Step budget on paper (benchmarks/step_budget.py)")
    print(f"\nAssumptions: {PEAK / 1e12:.0f} TFLOP/s bf16 peak at {MFU[1]:.0%} MFU (range {MFU[0]:.0%}-{MFU[2]:.0%}); "
          f"HBM {HBM / 1e12:.2f} TB/s; pageable PCIe {PCIE[0] / 1e9:.0f}-{PCIE[1] / 1e9:.0f} GB/s; "
          f"compile {COMPILE[0]}-{COMPILE[1]}x on the UNet (range column only); "
          f"{PAIRS_PER_OPT_STEP} pairs per optimizer step per GPU.")
    report("SD1.5, 512 px (64x64 latents)", model_costs(xl=False))
    report("SDXL, 1024 px (128x128 latents), gradient checkpointing in both trainers", model_costs(xl=True))


if __name__ == "__main__":
    main()
