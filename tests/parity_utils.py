"""Inputs and comparisons shared by the parity tests of every backend."""

from __future__ import annotations

from typing import Dict, Optional

import torch

import rpo_fast


def make_inputs(
    pairs: int,
    shape,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    *,
    seed: int = 0,
    with_embeddings: bool = False,
    with_weights: bool = False,
    layout: str = "contiguous",
) -> Dict[str, Optional[torch.Tensor]]:
    """A batch like a training step's: reference errors close to the policy's, so that
    ``beta * (dl - dw)`` is O(1) for the default test beta (see ``TEST_BETA``).

    ``layout``: contiguous, channels_last (4-D shapes) or sliced (non-contiguous views).
    """
    gen = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    full = (n, *shape)
    if layout == "sliced":  # every other element of the last dim of a twice wider tensor
        full = (n, *shape[:-1], 2 * shape[-1])
    target = torch.randn(full, generator=gen)
    ref_pred = target + torch.randn(full, generator=gen)
    model_pred = ref_pred + 0.05 * torch.randn(full, generator=gen)
    tensors = {"model_pred": model_pred, "target": target, "ref_pred": ref_pred}
    for name, t in tensors.items():
        t = t.to(device=device, dtype=dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":
            t = t[..., ::2]
        tensors[name] = t
    out: Dict[str, Optional[torch.Tensor]] = dict(tensors, emb_w=None, emb_l=None, weights=None)
    if with_embeddings:
        emb = torch.randn(n, 8, generator=gen).to(device)
        out["emb_w"], out["emb_l"] = emb[:pairs], emb[pairs:]
    if with_weights:
        out["weights"] = torch.rand(pairs, pairs, generator=gen).to(device)
    return out


# With the inputs above, dl - dw is about 1e-2; beta = 100 puts z around 1.
TEST_BETA = 100.0


def run_loss(method: str, backend: str, inputs, *, use_ref_err: bool = False, loss_type: str = "sigmoid", beta: float = TEST_BETA):
    """Loss, metrics and d loss / d model_pred for one backend."""
    pred = inputs["model_pred"].detach().clone().requires_grad_(True)
    target, ref_pred = inputs["target"], inputs["ref_pred"]
    ref_err = None
    if use_ref_err:
        ref_err = (ref_pred.double() - target.double()).pow(2).flatten(1).mean(1).float()
        ref_pred = None
    if method == "sft":
        loss, metrics = rpo_fast.sft_loss(pred, target, backend=backend), {}
    elif method == "dpo":
        loss, metrics = rpo_fast.diffusion_dpo_loss(
            pred, target, ref_pred, ref_err=ref_err, beta=beta, loss_type=loss_type, backend=backend, return_metrics=True
        )
    else:
        loss, metrics = rpo_fast.diffusion_rpo_loss(
            pred, target, ref_pred, ref_err=ref_err, emb_w=inputs["emb_w"], emb_l=inputs["emb_l"],
            weights=inputs["weights"], beta=beta, loss_type=loss_type, backend=backend, return_metrics=True,
        )
    loss.backward()
    return loss.detach(), metrics, pred.grad


def reference_in_float64(method: str, inputs, **kwargs):
    """The torch reference on float64 copies of the inputs: the ground truth, free of
    float32 summation-order noise (which beta amplifies)."""
    as64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return run_loss(method, "torch", as64, **kwargs)


def pair_reference64(model_err, ref_err, weights, method, loss_type, beta):
    """The reference pair stage in float64 on given per-sample errors: loss, metrics and
    coef = dloss/dmodel_err (zeros where the loss does not depend on a sample)."""
    from rpo_fast import reference

    e = model_err.double().requires_grad_(True)
    w = None if weights is None else weights.double()
    loss, metrics = reference.pair_loss(e, ref_err.double(), w, method, loss_type, beta)
    (coef,) = torch.autograd.grad(loss, e, allow_unused=True)
    return loss.detach(), metrics, coef if coef is not None else torch.zeros_like(e)
