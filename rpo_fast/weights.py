"""Similarity weights of Diffusion-RPO: a row softmax of cosine similarities over tau."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_positive, check_embeddings


def similarity_weights(emb_w: torch.Tensor, emb_l: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """``omega[i, j] = softmax_j(cos(emb_w[i], emb_l[j]) / tau)``, shape ``(M, M)``, float32.

    Weights are constants of the loss: the result is detached from the embeddings.
    """
    check_embeddings(emb_w, emb_l, None)
    tau = check_positive("tau", tau)
    dtype = torch.float64 if emb_w.dtype == torch.float64 else torch.float32
    w = F.normalize(emb_w.detach().to(dtype), dim=-1)
    l = F.normalize(emb_l.detach().to(dtype), dim=-1)
    return torch.softmax((w @ l.T) / tau, dim=-1)
