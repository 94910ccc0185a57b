"""The loss as the public Diffusion-DPO trainers write it: the baseline every backend is timed against.

Written the way diffusers' ``examples/research_projects/diffusion_dpo/train_diffusion_dpo.py``
and the original Diffusion-DPO code write it: ``F.mse_loss`` of fp32 copies with
``reduction="none"``, a mean over the non-batch dims, ``chunk(2)`` into preferred and
dispreferred halves, the reference the same way under ``no_grad``, then
``-F.logsigmoid(-0.5 * beta_dpo * (model_diff - ref_diff)).mean()``, plus the values those
trainers log. The RPO form is the same code with the M x M contrast and the similarity weights.

``beta_dpo`` is those trainers' beta: ``-0.5 * beta_dpo`` equals rpo-fast's ``beta`` when
``beta_dpo = 2 * beta`` (docs/loss.md), so both compute the same loss.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    losses = F.mse_loss(pred.float(), target.float(), reduction="none")
    return losses.mean(dim=list(range(1, len(losses.shape))))


def eager_dpo_loss(
    model_pred: torch.Tensor, target: torch.Tensor, ref_pred: torch.Tensor, beta_dpo: float = 5000.0
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Diffusion-DPO: matched pairs only. Returns the loss and the logged values."""
    model_losses = _per_sample_mse(model_pred, target)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w - model_losses_l

    with torch.no_grad():
        ref_losses = _per_sample_mse(ref_pred.detach(), target)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
        raw_ref_loss = ref_losses.mean()

    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    loss = -1 * F.logsigmoid(inside_term).mean()
    return loss, {"raw_model_loss": raw_model_loss, "raw_ref_loss": raw_ref_loss, "implicit_acc": implicit_acc}


def eager_rpo_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: torch.Tensor,
    emb_w: Optional[torch.Tensor] = None,
    emb_l: Optional[torch.Tensor] = None,
    beta_dpo: float = 5000.0,
    tau: float = 0.5,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Diffusion-RPO written the same way: every preferred sample against every dispreferred
    one (an M x M matrix), weighted by a row softmax of the embeddings' cosine similarity
    over ``tau`` (uniform ``1/M`` without embeddings)."""
    model_losses = _per_sample_mse(model_pred, target)
    model_losses_w, model_losses_l = model_losses.chunk(2)
    raw_model_loss = 0.5 * (model_losses_w.mean() + model_losses_l.mean())
    model_diff = model_losses_w[:, None] - model_losses_l[None, :]  # [i, j]: winner i, loser j

    with torch.no_grad():
        ref_losses = _per_sample_mse(ref_pred.detach(), target)
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w[:, None] - ref_losses_l[None, :]
        raw_ref_loss = ref_losses.mean()
        num_pairs = model_losses_w.size(0)
        if emb_w is None:
            weights = torch.full((num_pairs, num_pairs), 1.0 / num_pairs, device=model_pred.device)
        else:
            similarity = F.cosine_similarity(emb_w.float()[:, None, :], emb_l.float()[None, :, :], dim=-1)
            weights = torch.softmax(similarity / tau, dim=1)

    scale_term = -0.5 * beta_dpo
    inside_term = scale_term * (model_diff - ref_diff)
    diagonal = inside_term.diagonal()
    implicit_acc = (diagonal > 0).sum().float() / diagonal.size(0)
    loss = -1 * F.logsigmoid(weights * inside_term).mean()
    return loss, {"raw_model_loss": raw_model_loss, "raw_ref_loss": raw_ref_loss, "implicit_acc": implicit_acc}
