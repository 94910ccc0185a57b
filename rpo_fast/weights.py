"""Similarity weights of Diffusion-RPO: a row softmax of cosine similarities over tau."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .validation import check_embeddings, check_positive


def similarity_weights(emb_w: torch.Tensor, emb_l: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """``omega[i, j] = softmax_j(cos(emb_w[i], emb_l[j]) / tau)``, shape ``(M, M)``, float32.

    Weights are constants of the loss: the result is detached from the embeddings.
    """
    check_embeddings(emb_w, emb_l, None)
    return row_softmax_weights(emb_w, emb_l, check_positive("tau", tau))


def row_softmax_weights(emb_w: torch.Tensor, emb_l: torch.Tensor, tau: float) -> torch.Tensor:
    """:func:`similarity_weights` without its checks, for arguments validated already (by the
    loss, or by similarity_weights): the weights of the ``torch`` and ``triton`` backends."""
    # On a GPU in double: an fp32 matmul there runs in TF32 where allowed (the trainer's
    # default), about 1e-3 off in the cosines. M x M x E in double costs little next to the loss.
    dtype = torch.float64 if emb_w.dtype == torch.float64 or emb_w.is_cuda else torch.float32
    w = F.normalize(emb_w.detach().to(dtype), dim=-1)
    l = F.normalize(emb_l.detach().to(dtype), dim=-1)
    weights = torch.softmax((w @ l.T) / tau, dim=-1)
    return weights if emb_w.dtype == torch.float64 else weights.float()


def mean_diagonal_weight(emb_w: torch.Tensor, emb_l: torch.Tensor, batches: Iterable[torch.Tensor], tau: float = 0.5,
                         weight_norm: str = "mean") -> float:
    """The mean diagonal weight ``w_ii`` over contrasts of the given row ``batches`` (index
    tensors into the embeddings, one per contrast): what scales a pair's own logit beside beta.
    Under ``weight_norm="mean"`` the weights are M times the row softmax (the losses' default)."""
    check_embeddings(emb_w, emb_l, None)
    tau = check_positive("tau", tau)
    diagonals = []
    for rows in batches:
        scale = len(rows) if weight_norm == "mean" else 1
        diagonals.append(scale * row_softmax_weights(emb_w[rows], emb_l[rows], tau).diagonal().mean())
    if not diagonals:
        raise ValueError("batches: expected at least one batch of rows")
    return float(torch.stack(diagonals).mean())
