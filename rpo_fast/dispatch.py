"""The one place that picks a backend for a loss call.

``backend="auto"``: CUDA tensors use ``triton`` when it imports, else ``cuda``, else
``torch``; CPU tensors use ``cpu``, else ``torch``. Every fallback is logged once.
An explicitly requested backend that cannot run here is an error that lists those that can.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

from . import _extension, reference
from .validation import check_backend
from ._types import KERNEL_DTYPES, loss_type_code, method_code
from .weights import row_softmax_weights as reference_weights

logger = logging.getLogger("rpo_fast")


@dataclass(frozen=True)
class Backend:
    """The two stages of a loss: one pass over the predictions, then the O(M^2) loss; and,
    where a backend has it, the whole loss in one op."""

    name: str
    # (model_pred, target, ref_pred | None) -> (model_err (2M,), ref_err (2M,) | None)
    sample_errors: Callable
    # (model_err, ref_err | None, weights | None, method, loss_type, beta, weight_scale) -> (loss, metrics)
    pair_loss: Callable
    # (emb_w, emb_l, tau) -> (M, M) float32 weights
    similarity_weights: Callable = reference_weights
    # (LossInputs) -> (loss, metrics): the stages and the weights in one op, for a call that
    # gathers nothing between the stages; None: the caller chains the stages.
    fused_loss: Optional[Callable] = None


def _fused_backend(name: str, ops_prefix: str) -> Backend:
    """A backend made of the custom ops ``rpo_fast::{prefix}sample_errors`` etc.: the Triton
    ones (prefix ``triton_``) are the stages; the C++ ones add the weights and ``fused_loss``."""
    errors_op = getattr(torch.ops.rpo_fast, f"{ops_prefix}sample_errors")
    pair_op = getattr(torch.ops.rpo_fast, f"{ops_prefix}pair_loss")

    def sample_errors(model_pred, target, ref_pred):
        model_err, ref_err = errors_op(model_pred, target, ref_pred)
        return model_err, (ref_err if ref_pred is not None else None)

    def pair_loss(model_err, ref_err, weights, method, loss_type, beta, weight_scale):
        if ref_err is None:
            ref_err = model_err.new_empty((0,))
        if weights is not None:
            weights = weights.detach().float().contiguous()
        loss, metrics, _ = pair_op(
            model_err.float().contiguous(),
            ref_err.detach().float().contiguous(),
            weights,
            method_code(method),
            loss_type_code(loss_type or "sigmoid"),
            float(beta),
            float(weight_scale),
        )
        return loss, metrics

    if ops_prefix:  # the Triton ops: stages only
        # reference_weights passed, not left to the field default: a backend built while
        # torch.compile traces the first call is stored in _BACKENDS, and dynamo cannot
        # rebuild a default it saw without a source.
        return Backend(name, sample_errors, pair_loss, reference_weights)

    def similarity_weights(emb_w, emb_l, tau):
        return torch.ops.rpo_fast.similarity_weights(emb_w.detach(), emb_l.detach(), float(tau))

    def fused_loss(inputs):
        loss, metrics, _ = torch.ops.rpo_fast.fused_loss(
            inputs.model_pred,
            inputs.target,
            inputs.ref_pred,
            inputs.ref_err.detach() if inputs.ref_err is not None else None,
            inputs.emb_w.detach() if inputs.emb_w is not None else None,
            inputs.emb_l.detach() if inputs.emb_l is not None else None,
            inputs.weights.detach() if inputs.weights is not None else None,
            method_code(inputs.method),
            loss_type_code(inputs.loss_type or "sigmoid"),
            float(inputs.beta),
            float(inputs.tau),
            inputs.weight_scale(inputs.num_pairs),
        )
        return loss, metrics

    return Backend(name, sample_errors, pair_loss, similarity_weights, fused_loss)


TORCH_BACKEND = Backend("torch", reference.sample_errors, reference.pair_loss)


def _triton_usable() -> bool:
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        from .kernels import triton_loss  # noqa: F401
    except Exception as exc:  # triton missing, or a kernel module that fails to import
        _log_once(f"rpo_fast: the triton backend is unavailable ({type(exc).__name__}: {exc})")
        return False
    return True


# Plain dicts rather than functools.lru_cache: torch.compile traces through a dict lookup,
# while it warns on (and ignores) an lru_cache at every compiled step.
_BACKENDS: Dict[str, Backend] = {}
_LOGGED: Set[str] = set()


def _backend(name: str) -> Backend:
    if name not in _BACKENDS:
        _BACKENDS[name] = _make_backend(name)
    return _BACKENDS[name]


def _make_backend(name: str) -> Backend:
    if name == "torch":
        return TORCH_BACKEND
    if name in ("cpu", "cuda"):  # the C++ ops, registered when rpo_fast._C loaded
        return _fused_backend(name, "")
    if name == "triton":
        from .kernels import triton_loss  # noqa: F401  (registers the rpo_fast::triton_* ops)

        return _fused_backend(name, "triton_")
    raise AssertionError(name)


def available_backends() -> List[str]:
    """The backends usable in this process, out of torch, cpu, cuda, triton."""
    found = ["torch"]
    if _extension.has_kernel("CPU"):
        found.append("cpu")
    if torch.cuda.is_available() and _extension.has_kernel("CUDA"):
        found.append("cuda")
    if _triton_usable():
        found.append("triton")
    return found


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":  # GPU tensors, or CPU tensors under TRITON_INTERPRET=1
        return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return True


# resolve()'s answers: what it reads is fixed for the life of the process, except the
# Triton interpreter switch, which is part of the key. Asking again costs ~10 us a call.
_RESOLVED: Dict[tuple, Backend] = {}


def resolve(backend: str, device: torch.device, dtypes: Tuple[torch.dtype, ...]) -> Backend:
    """Returns the backend for tensors on ``device`` with input ``dtypes``."""
    key = (backend, device.type, dtypes, os.environ.get("TRITON_INTERPRET"))
    found = _RESOLVED.get(key)
    if found is None:
        found = _RESOLVED[key] = _resolve(backend, device, dtypes)
    return found


def _resolve(backend: str, device: torch.device, dtypes: Tuple[torch.dtype, ...]) -> Backend:
    available = available_backends()
    kernel_dtypes_ok = all(d in KERNEL_DTYPES for d in dtypes)
    if backend != "auto":
        check_backend(backend, available, _runs_on(backend, device), device, dtypes)
        return _backend(backend)

    preferred = ["triton", "cuda"] if device.type == "cuda" else ["cpu"] if device.type == "cpu" else []
    for name in preferred:
        if name in available and kernel_dtypes_ok:
            return _backend(name)
    if preferred:
        why = "float64 inputs" if not kernel_dtypes_ok else f"{' and '.join(preferred)} not available"
        _log_once(f"rpo_fast: using the 'torch' backend for {device.type} tensors ({why})")
    return TORCH_BACKEND


def pick_device_dtypes(*tensors: Optional[torch.Tensor]) -> Tuple[torch.device, Tuple[torch.dtype, ...]]:
    present = [t for t in tensors if t is not None]
    return present[0].device, tuple(t.dtype for t in present)
