"""``rpo-fast check``: every loss with every available backend on one small random batch.

A quick look that the installed backends agree with the reference, with their metrics.
"""

from __future__ import annotations

import argparse
import time

import torch

from .dispatch import available_backends
from .functional import diffusion_dpo_loss, diffusion_rpo_loss, sft_loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=4, help="M, preference pairs in the batch")
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 32, 32], help="per-sample shape S (C H W)")
    parser.add_argument("--beta", type=float, default=2500.0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)


def make_batch(pairs: int, shape, dtype: torch.dtype, device: str, seed: int):
    """Predictions whose errors differ from the reference's by ~1e-4, as in training."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * pairs, *shape, generator=gen)
    ref_pred = target + torch.randn(2 * pairs, *shape, generator=gen)
    model_pred = ref_pred + 1e-2 * torch.randn(2 * pairs, *shape, generator=gen)
    emb = torch.randn(2 * pairs, 16, generator=gen)
    to = dict(dtype=dtype, device=device)
    return model_pred.to(**to), target.to(**to), ref_pred.to(**to), emb[:pairs].to(device), emb[pairs:].to(device)


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    model_pred, target, ref_pred, emb_w, emb_l = make_batch(args.pairs, args.shape, dtype, args.device, args.seed)
    backends = [b for b in available_backends() if b != "cuda" or args.device.startswith("cuda")]
    print(f"M={args.pairs} S={tuple(args.shape)} {args.dtype} on {args.device}; backends: {', '.join(backends)}")
    losses = {
        "rpo": lambda pred, b: diffusion_rpo_loss(pred, target, ref_pred, emb_w=emb_w, emb_l=emb_l, beta=args.beta, backend=b, return_metrics=True),
        "dpo": lambda pred, b: diffusion_dpo_loss(pred, target, ref_pred, beta=args.beta, backend=b, return_metrics=True),
        "sft": lambda pred, b: (sft_loss(pred, target, backend=b), {}),
    }
    for method, fn in losses.items():
        for backend in backends:
            pred = model_pred.detach().clone().requires_grad_(True)
            start = time.perf_counter()
            loss, metrics = fn(pred, backend)
            loss.backward()
            elapsed_ms = 1e3 * (time.perf_counter() - start)
            shown = " ".join(f"{k}={v.item():.5g}" for k, v in metrics.items())
            print(f"{method:4s} {backend:7s} loss={loss.item():.6f} |grad|={pred.grad.float().norm().item():.5g} "
                  f"({elapsed_ms:.1f} ms) {shown}")
    return 0
