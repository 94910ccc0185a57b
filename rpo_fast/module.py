"""``RPOLoss``: the functional losses as an ``nn.Module`` holding their hyper-parameters."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .functional import loss_with_settings
from .validation import validate_loss_settings


class RPOLoss(nn.Module):
    """``RPOLoss(method="rpo")(model_pred, target, ref_pred, emb_w=..., emb_l=...)``.

    ``method`` is one of ``rpo``, ``dpo``, ``sft``; the forward takes the tensors of the
    matching functional loss. The hyper-parameters are validated once, here, and read-only
    afterwards; each forward checks only its tensors.
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
        self.settings = validate_loss_settings(method, beta, tau, loss_type, weight_norm)
        self.backend = backend

    method = property(lambda self: self.settings.method)
    beta = property(lambda self: self.settings.beta)
    tau = property(lambda self: self.settings.tau)
    loss_type = property(lambda self: self.settings.loss_type)
    weight_norm = property(lambda self: self.settings.weight_norm)

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
        return loss_with_settings(
            self.settings, model_pred, target, ref_pred, ref_err=ref_err, emb_w=emb_w, emb_l=emb_l, weights=weights,
            backend=self.backend, process_group=process_group, return_metrics=return_metrics,
        )

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, beta={self.beta}, tau={self.tau}, loss_type={self.loss_type!r}, "
                f"weight_norm={self.weight_norm!r}, backend={self.backend!r}")
