"""The ``torch`` backend: docs/loss.md written in plain PyTorch, for clarity.

This is the ground truth every kernel backend is tested against. Gradients come from
autograd; the reference, the target, the weights and the embeddings are detached, so only
``model_pred`` receives one. Arithmetic is in float32 (float64 when an input is float64,
which ``gradcheck`` needs).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def _accumulate_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``e_k = mean_d (pred[k, d] - target[k, d])^2``, shape ``(N,)``."""
    diff = pred.to(dtype) - target.detach().to(dtype)
    return diff.pow(2).flatten(1).mean(dim=1)


def sample_errors(
    model_pred: torch.Tensor, target: torch.Tensor, ref_pred: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-sample policy errors (differentiable) and reference errors (constant or None)."""
    dtype = _accumulate_dtype(model_pred, target, ref_pred)
    model_err = per_sample_error(model_pred, target, dtype)
    ref_err = None
    if ref_pred is not None:
        ref_err = per_sample_error(ref_pred.detach(), target, dtype)
    return model_err, ref_err


def elementwise_loss(x: torch.Tensor, loss_type: str, beta: float) -> torch.Tensor:
    """The per-element loss ``f`` of docs/loss.md: sigmoid, hinge or ipo."""
    if loss_type == "sigmoid":
        return F.softplus(-x)  # -log(sigmoid(x)), stable for any |x|
    if loss_type == "hinge":
        return torch.relu(1.0 - x)
    if loss_type == "ipo":
        return (x / beta - 1.0 / (2.0 * beta)).pow(2)
    raise AssertionError(f"loss_type {loss_type!r}: validated by the loss (rpo_fast/validation.py)")


def pair_loss(
    model_err: torch.Tensor,
    ref_err: Optional[torch.Tensor],
    weights: Optional[torch.Tensor],
    method: str,
    loss_type: str,
    beta: float,
    weight_scale: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss and the metrics vector (order of ``_types.METRIC_NAMES``) from per-sample errors.

    ``model_err`` and ``ref_err`` have shape ``(2M,)``: winners first, then losers.
    ``weight_scale`` multiplies the weights (given, or the uniform 1/M): M under
    ``weight_norm="mean"`` (``validation.LossInputs.weight_scale``).
    Non-finite errors or weights give a NaN loss (a contract: never a silently finite one).
    """
    num_pairs = model_err.shape[0] // 2
    nan = torch.full((), float("nan"), dtype=model_err.dtype, device=model_err.device)
    if method == "sft":
        loss = model_err[:num_pairs].mean()
        metrics = torch.stack([nan, nan, model_err.detach().mean(), nan, nan])
        return loss, metrics

    ref_err = ref_err.detach().to(model_err.dtype)
    delta = model_err - ref_err
    delta_w, delta_l = delta[:num_pairs], delta[num_pairs:]
    finite = torch.isfinite(model_err).all() & torch.isfinite(ref_err).all()
    if method == "dpo":
        z = beta * (delta_l - delta_w)
        loss = elementwise_loss(z, loss_type, beta).mean()
        weight_diag = nan
    else:
        if weights is None:
            weights = torch.full((num_pairs, num_pairs), 1.0 / num_pairs, dtype=model_err.dtype, device=model_err.device)
        weights = weights.detach().to(model_err.dtype) * weight_scale
        finite = finite & torch.isfinite(weights).all()
        z = beta * (delta_l[None, :] - delta_w[:, None])  # z[i, j]: winner i against loser j
        loss = elementwise_loss(weights * z, loss_type, beta).mean()
        weight_diag = weights.diagonal().mean()
    loss = torch.where(finite, loss, nan)

    z_diag = (beta * (delta_l - delta_w)).detach()
    implicit_acc = ((z_diag > 0).to(z_diag.dtype) + 0.5 * (z_diag == 0).to(z_diag.dtype)).mean()
    metrics = torch.stack(
        [implicit_acc, (z_diag / beta).mean(), model_err.detach().mean(), ref_err.mean(), weight_diag]
    )
    return loss, metrics
