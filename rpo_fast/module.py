"""``RPOLoss``: the functional losses as an ``nn.Module`` holding their hyper-parameters."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .validation import check_positive, check_loss_type, check_method, check_weight_norm
from .functional import diffusion_dpo_loss, diffusion_rpo_loss, sft_loss


class RPOLoss(nn.Module):
    """``RPOLoss(method="rpo")(model_pred, target, ref_pred, emb_w=..., emb_l=...)``.

    ``method`` is one of ``rpo``, ``dpo``, ``sft``; the forward takes the tensors of the
    matching functional loss.
    """

    def __init__(
        self,
        method: str = "rpo",
        beta: float = 2500.0,
        tau: float = 0.5,
        loss_type: str = "sigmoid",
        weight_norm: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.method = check_method(method)
        self.beta = check_positive("beta", beta)
        self.tau = check_positive("tau", tau)
        self.loss_type = check_loss_type(loss_type)
        self.weight_norm = check_weight_norm(weight_norm)
        self.backend = backend

    def forward(
        self,
        model_pred: torch.Tensor,
        target: torch.Tensor,
        ref_pred: Optional[torch.Tensor] = None,
        *,
        ref_err: Optional[torch.Tensor] = None,
        emb_w: Optional[torch.Tensor] = None,
        emb_l: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
        process_group=None,
        return_metrics: bool = False,
    ):
        if self.method == "sft":
            return sft_loss(model_pred, target, backend=self.backend)
        if self.method == "dpo":
            return diffusion_dpo_loss(
                model_pred, target, ref_pred, ref_err=ref_err, beta=self.beta,
                loss_type=self.loss_type, backend=self.backend, return_metrics=return_metrics,
            )
        return diffusion_rpo_loss(
            model_pred, target, ref_pred, ref_err=ref_err, emb_w=emb_w, emb_l=emb_l, weights=weights,
            beta=self.beta, tau=self.tau, loss_type=self.loss_type, weight_norm=self.weight_norm, backend=self.backend,
            process_group=process_group, return_metrics=return_metrics,
        )

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, beta={self.beta}, tau={self.tau}, loss_type={self.loss_type!r}, "
                f"weight_norm={self.weight_norm!r}, backend={self.backend!r}")
