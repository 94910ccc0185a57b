"""The public functional losses: drop-in replacements for a Diffusion-DPO trainer's loss.

Tensors follow the Diffusion-DPO layout: ``model_pred``, ``target`` and ``ref_pred`` have
shape ``(2M, *S)``, rows ``[0, M)`` preferred, rows ``[M, 2M)`` dispreferred.
See docs/loss.md for the exact definitions.

Non-finite values (NaN or inf) anywhere in the inputs, weights or embeddings give a
non-finite loss: never a silently finite one. A training loop should check
``torch.isfinite(loss)`` and skip that step.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from . import distributed, verify
from .validation import LossInputs, LossSettings, validate_loss_inputs, validate_loss_settings
from ._types import METRIC_NAMES
from .dispatch import Backend, pick_device_dtypes, resolve

LossResult = Union[torch.Tensor, Tuple[torch.Tensor, Dict[str, torch.Tensor]]]

_METRICS_BY_METHOD = {
    "rpo": METRIC_NAMES,
    "dpo": METRIC_NAMES[:4],
    "sft": ("model_mse",),
}


def _staged(impl: Backend, inputs: LossInputs, process_group, world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss stage by stage, gathering the errors and embeddings of every rank between
    the pass over the predictions and the pair stage when ``world > 1``."""
    model_err, ref_err = impl.sample_errors(inputs.model_pred, inputs.target, inputs.ref_pred)
    if inputs.ref_err is not None:
        ref_err = inputs.ref_err.detach().to(model_err.dtype)
    emb_w, emb_l = inputs.emb_w, inputs.emb_l
    if world > 1:
        model_err, ref_err, emb_w, emb_l = distributed.gather_errors(model_err, ref_err, emb_w, emb_l, process_group)
    weights = inputs.weights
    if emb_w is not None:
        weights = impl.similarity_weights(emb_w, emb_l, inputs.tau)
    scale = inputs.weight_scale(model_err.shape[0] // 2)  # the gathered (global) batch
    loss, metrics = impl.pair_loss(model_err, ref_err, weights, inputs.method, inputs.loss_type, inputs.beta, scale)
    return distributed.scale_gradient_for_averaging(loss, world), metrics


def apply(impl: Backend, inputs: LossInputs, process_group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss and the metrics vector of backend ``impl``: its fused op where it has one and
    nothing is gathered, else stage by stage."""
    world = distributed.world_size(process_group)
    if world == 1 and impl.fused_loss is not None:
        return impl.fused_loss(inputs)
    return _staged(impl, inputs, process_group, world)


def _compute(inputs: LossInputs, backend: str, process_group, return_metrics: bool) -> LossResult:
    device, dtypes = pick_device_dtypes(inputs.model_pred, inputs.target, inputs.ref_pred)
    impl = verify.checked(resolve(backend, device, dtypes), inputs, process_group)
    loss, metrics = apply(impl, inputs, process_group)
    if not return_metrics:
        return loss
    values = metrics.detach().unbind()  # one op for all of them, not one per metric
    out = {name: values[METRIC_NAMES.index(name)] for name in _METRICS_BY_METHOD[inputs.method]}
    # What scales a pair's own logit: beta, times the mean diagonal weight for rpo.
    if inputs.method == "rpo":
        out["effective_beta"] = out["weight_diag"] * inputs.beta
    elif inputs.method == "dpo":
        out["effective_beta"] = torch.full_like(out["reward_margin"], inputs.beta)
    return loss, out


def loss_with_settings(
    settings: LossSettings,
    model_pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: Optional[torch.Tensor] = None,
    *,
    ref_err: Optional[torch.Tensor] = None,
    emb_w: Optional[torch.Tensor] = None,
    emb_l: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    backend: str = "auto",
    process_group=None,
    return_metrics: bool = False,
) -> LossResult:
    """The loss of ``settings.method``, whose hyper-parameters were validated already (by the
    functional losses below, ``RPOLoss`` or ``TrainConfig``): only the tensors are checked
    here. What the method does not use is ignored: the reference, the weights and the metrics
    for sft, the weights and the process group for dpo."""
    method = settings.method
    if method != "rpo":
        process_group = None
    global_pairs = None
    if process_group is not None and weights is not None and isinstance(model_pred, torch.Tensor) and model_pred.dim() > 0:
        global_pairs = model_pred.shape[0] // 2 * distributed.world_size(process_group)
    inputs = validate_loss_inputs(settings, model_pred, target, ref_pred, ref_err=ref_err, emb_w=emb_w, emb_l=emb_l,
                                  weights=weights, global_pairs=global_pairs)
    return _compute(inputs, backend, process_group, return_metrics and method != "sft")


def diffusion_rpo_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: Optional[torch.Tensor] = None,
    *,
    ref_err: Optional[torch.Tensor] = None,
    emb_w: Optional[torch.Tensor] = None,
    emb_l: Optional[torch.Tensor] = None,
    weights: Optional[torch.Tensor] = None,
    beta: float = 2500.0,
    tau: float = 0.5,
    loss_type: str = "sigmoid",
    weight_norm: str = "mean",
    backend: str = "auto",
    process_group=None,
    return_metrics: bool = False,
) -> LossResult:
    """Diffusion-RPO: every preferred sample contrasted with every dispreferred one.

    ``L = (1/M^2) sum_ij f(w_ij * beta * (dl_j - dw_i))`` with ``d = e_model - e_ref``.
    Weights come from ``emb_w``/``emb_l`` (row softmax of cosine similarity over ``tau``)
    or are uniform; ``weight_norm="mean"`` (the default) scales them by M to average 1, so
    that a pair's own logit ``w_ii * beta * (dl_i - dw_i)`` has DPO's strength at the same
    beta: carry a DPO beta over as it is. ``weight_norm="row"`` keeps each row summing to 1
    (uniform ``1/M``), the LLM RPO trainer's definition: there a pair's own logit is about
    beta/M. An explicit ``(M, M)`` ``weights`` is used as given. The metric
    ``effective_beta`` is beta times the mean diagonal weight. With ``process_group`` the
    contrast spans the global batch of all ranks (equal M on every rank; M is the global
    batch; explicit ``weights`` are then ``(M W, M W)``).
    """
    settings = validate_loss_settings("rpo", beta, tau, loss_type, weight_norm)
    return loss_with_settings(settings, model_pred, target, ref_pred, ref_err=ref_err, emb_w=emb_w, emb_l=emb_l,
                              weights=weights, backend=backend, process_group=process_group,
                              return_metrics=return_metrics)


def diffusion_dpo_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    ref_pred: Optional[torch.Tensor] = None,
    *,
    ref_err: Optional[torch.Tensor] = None,
    beta: float = 2500.0,
    loss_type: str = "sigmoid",
    backend: str = "auto",
    return_metrics: bool = False,
) -> LossResult:
    """Diffusion-DPO: ``L = (1/M) sum_i f(beta * (dl_i - dw_i))`` over matched pairs."""
    settings = validate_loss_settings("dpo", beta, loss_type=loss_type)
    return loss_with_settings(settings, model_pred, target, ref_pred, ref_err=ref_err, backend=backend,
                              return_metrics=return_metrics)


def sft_loss(model_pred: torch.Tensor, target: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Supervised fine-tuning on the preferred rows: ``(1/M) sum_i e_model_i`` over ``[0, M)``."""
    return loss_with_settings(_SFT, model_pred, target, backend=backend)


_SFT = validate_loss_settings("sft", loss_type=None)  # sft has no hyper-parameters to check
