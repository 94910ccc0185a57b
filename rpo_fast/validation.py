"""Validation of what users pass to the losses, each check written and made once.

``validate_loss_settings`` checks a loss's hyper-parameters (method, beta, tau, loss_type,
weight_norm): per call in the functional losses, once at construction in ``RPOLoss``
(``TrainConfig`` checks the same options itself, naming the flags, and hands the loss
``LossSettings`` built from them). ``validate_loss_inputs`` checks the tensors of one call,
``check_backend`` an explicitly requested backend (in dispatch's resolve). The layers below
(dispatch, the reference, the ops) do not check again; the ops keep internal asserts of what
their kernels rely on.

Every check runs before any work and raises ``ValueError`` or ``TypeError`` with a message
that names the argument and what was expected (docs/loss.md is the contract).
The checks look only at metadata (shape, dtype, device), never at values (but the signs of
explicit ``(M, M)`` weights), so they cost nothing on the GPU and are traced away by
``torch.compile``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ._types import BACKENDS, KERNEL_DTYPES, LOSS_TYPES, METHODS, WEIGHT_NORMS

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class LossInputs:
    """Validated arguments of one loss call, ready for a backend."""

    method: str
    model_pred: torch.Tensor
    target: torch.Tensor
    ref_pred: Optional[torch.Tensor]
    ref_err: Optional[torch.Tensor]
    emb_w: Optional[torch.Tensor]
    emb_l: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    beta: float
    tau: float
    loss_type: str
    weight_norm: str = "mean"

    @property
    def num_pairs(self) -> int:
        return self.model_pred.shape[0] // 2

    def weight_scale(self, contrast_pairs: int) -> float:
        """What the pair stage multiplies the weights by, for a contrast of ``contrast_pairs``
        pairs (the global batch): M for computed weights under ``weight_norm="mean"``, else 1."""
        computed = self.method == "rpo" and self.weights is None
        return float(contrast_pairs) if computed and self.weight_norm == "mean" else 1.0


def _check_tensor(name: str, value, *, floating: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float32, bfloat16, float16 or float64), "
            f"got {value.dtype}"
        )


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive number, got {type(value).__name__}")
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name}: expected a value > 0, got {value}")
    return float(value)


def check_backend(backend: str, available: List[str], runs_on_device: bool, device: torch.device,
                  dtypes: Sequence[torch.dtype]) -> None:
    """An explicitly requested backend: known, available here, able to run on ``device``, and
    (but for ``torch``) taking the inputs' ``dtypes``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    if backend not in available:
        raise ValueError(f"backend: {backend!r} is not available here; available: {available}")
    if not runs_on_device:
        raise ValueError(f"backend: {backend!r} does not run on {device.type} tensors")
    if backend != "torch" and not all(d in KERNEL_DTYPES for d in dtypes):
        raise TypeError(
            f"backend: {backend!r} takes float32, bfloat16 or float16 inputs, got "
            f"{sorted({str(d) for d in dtypes})}; use backend='torch'"
        )


def check_batch(name: str, tensor: torch.Tensor) -> int:
    """Checks the Diffusion-DPO layout ``(2M, *S)`` and returns M."""
    _check_tensor(name, tensor)
    if tensor.dim() < 2:
        raise ValueError(
            f"{name}: expected shape (2M, *S) with a batch dimension and at least one "
            f"trailing dimension, got shape {tuple(tensor.shape)}"
        )
    n = tensor.shape[0]
    if n == 0 or n % 2:
        raise ValueError(
            f"{name}: the first dimension must be 2M > 0 (M preferred rows, then M "
            f"dispreferred rows), got {n}"
        )
    return n // 2


def check_loss_type(loss_type) -> str:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {list(LOSS_TYPES)}, got {loss_type!r}")
    return loss_type


def check_weight_norm(weight_norm) -> str:
    if weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm: expected one of {list(WEIGHT_NORMS)}, got {weight_norm!r}")
    return weight_norm


def check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    return method


def check_embeddings(emb_w, emb_l, num_pairs: Optional[int]) -> None:
    """Both or neither; each ``(M, E)`` with equal E (M checked when given)."""
    if (emb_w is None) != (emb_l is None):
        missing = "emb_l" if emb_l is None else "emb_w"
        raise ValueError(f"{missing}: emb_w and emb_l must be given together or not at all")
    if emb_w is None:
        return
    for name, emb in (("emb_w", emb_w), ("emb_l", emb_l)):
        _check_tensor(name, emb)
        if emb.dim() != 2 or (num_pairs is not None and emb.shape[0] != num_pairs):
            want = f"({num_pairs}, E)" if num_pairs is not None else "(M, E)"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(emb.shape)}")
    if emb_w.shape != emb_l.shape:
        raise ValueError(
            f"emb_l: expected the same shape as emb_w {tuple(emb_w.shape)}, "
            f"got {tuple(emb_l.shape)}"
        )
    if emb_w.device != emb_l.device:
        raise ValueError(f"emb_l: expected device {emb_w.device}, got {emb_l.device}")


@dataclass(frozen=True)
class LossSettings:
    """A loss's validated hyper-parameters. Checked once: per call by a functional loss, at
    construction by ``RPOLoss``, on creation by ``TrainConfig`` (its ``loss_settings``)."""

    method: str
    beta: float
    tau: float
    loss_type: Optional[str]  # None: sft, which has no per-pair loss
    weight_norm: str


def validate_loss_settings(method: str, beta=2500.0, tau=0.5, loss_type="sigmoid",
                           weight_norm="mean") -> LossSettings:
    """The hyper-parameters of a loss; ``loss_type`` may be None for ``sft`` only."""
    check_method(method)
    beta = check_positive("beta", beta)
    tau = check_positive("tau", tau)
    if loss_type is not None or method != "sft":
        check_loss_type(loss_type)
    check_weight_norm(weight_norm)
    return LossSettings(method, beta, tau, loss_type, weight_norm)


def validate_loss_inputs(
    settings: LossSettings,
    model_pred,
    target,
    ref_pred=None,
    *,
    ref_err=None,
    emb_w=None,
    emb_l=None,
    weights=None,
    global_pairs: Optional[int] = None,
) -> LossInputs:
    """Validates the tensors of one call with validated ``settings`` (what a method does not
    use is ignored: the reference and the weights for sft, the weights for dpo).
    ``global_pairs`` is M of the global batch with a process group: explicit weights then
    span it."""
    method, beta, tau = settings.method, settings.beta, settings.tau
    num_pairs = check_batch("model_pred", model_pred)
    _check_tensor("target", target)
    if target.shape != model_pred.shape:
        raise ValueError(
            f"target: expected the shape of model_pred {tuple(model_pred.shape)}, "
            f"got {tuple(target.shape)}"
        )
    device = model_pred.device

    def same_device(name, tensor):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name}: expected device {device} (that of model_pred), got {tensor.device}")

    same_device("target", target)
    if method == "sft":
        return LossInputs(method, model_pred, target, None, None, None, None, None, beta, tau, None)

    loss_type = settings.loss_type
    if ref_pred is None and ref_err is None:
        raise ValueError(f"ref_pred: method {method!r} needs a reference: pass ref_pred or ref_err")
    if ref_pred is not None and ref_err is not None:
        raise ValueError("ref_err: pass either ref_pred or ref_err, not both")
    if ref_pred is not None:
        _check_tensor("ref_pred", ref_pred)
        if ref_pred.shape != model_pred.shape:
            raise ValueError(
                f"ref_pred: expected the shape of model_pred {tuple(model_pred.shape)}, "
                f"got {tuple(ref_pred.shape)}"
            )
        same_device("ref_pred", ref_pred)
    if ref_err is not None:
        _check_tensor("ref_err", ref_err)
        if tuple(ref_err.shape) != (2 * num_pairs,):
            raise ValueError(f"ref_err: expected shape ({2 * num_pairs},), got {tuple(ref_err.shape)}")
        same_device("ref_err", ref_err)

    if method == "dpo":
        return LossInputs(method, model_pred, target, ref_pred, ref_err, None, None, None, beta, tau, loss_type)

    check_embeddings(emb_w, emb_l, num_pairs)
    same_device("emb_w", emb_w)
    same_device("emb_l", emb_l)
    if weights is not None:
        if emb_w is not None:
            raise ValueError("weights: pass either weights or emb_w/emb_l, not both")
        _check_tensor("weights", weights)
        m = global_pairs if global_pairs is not None else num_pairs
        if tuple(weights.shape) != (m, m):
            raise ValueError(f"weights: expected shape ({m}, {m}), got {tuple(weights.shape)}")
        same_device("weights", weights)
        # A value check, but on an (M, M) matrix only; skipped while tracing, where a
        # data-dependent branch would break the graph.
        if not torch.compiler.is_compiling() and bool((weights < 0).any()):
            raise ValueError("weights: expected non-negative values, got a negative entry")
    return LossInputs(method, model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights, beta, tau, loss_type,
                      settings.weight_norm)
