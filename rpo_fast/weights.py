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
    # On a GPU in double: an fp32 matmul there runs in TF32 where allowed (the trainer's
    # default), about 1e-3 off in the cosines. M x M x E in double costs little next to the loss.
    dtype = torch.float64 if emb_w.dtype == torch.float64 or emb_w.is_cuda else torch.float32
    w = F.normalize(emb_w.detach().to(dtype), dim=-1)
    l = F.normalize(emb_l.detach().to(dtype), dim=-1)
    weights = torch.softmax((w @ l.T) / tau, dim=-1)
    return weights if emb_w.dtype == torch.float64 else weights.float()
