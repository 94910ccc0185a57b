"""Autograd formulas and fake (meta) kernels of the fused custom ops.

Every fused backend exposes the same three stage ops (schemas in csrc/ops.cpp):

* ``sample_errors(Tensor model_pred, Tensor target, Tensor? ref_pred) -> (Tensor, Tensor)``
  One pass over the inputs: per-sample policy errors and reference errors, float32 ``(2M,)``
  each (the second is ``(0,)`` when ``ref_pred`` is None).
* ``pair_loss(Tensor model_err, Tensor ref_err, Tensor? weights, int method, int loss_type,
  float beta) -> (Tensor, Tensor, Tensor)``
  The O(M^2) stage: loss (0-d), metrics ``(5,)`` in the order of ``_types.METRIC_NAMES``,
  and ``coef = dloss/dmodel_err`` ``(2M,)``, all float32.
* ``error_grad(Tensor coef, Tensor model_pred, Tensor target) -> Tensor``
  The gradient write: ``coef[k] * 2 * (pred[k] - target[k]) / D`` in model_pred's dtype.

The C++ extension adds two ops that the Triton backend does without:

* ``similarity_weights(Tensor emb_w, Tensor emb_l, float tau) -> Tensor``: the ``(M, M)``
  weights of rpo_fast/weights.py, float32.
* ``fused_loss(model_pred, target, ref_pred?, ref_err?, emb_w?, emb_l?, weights?, int method,
  int loss_type, float beta, float tau, bool with_grad=False) -> (loss, metrics, coef, grad)``:
  the stages chained in C++, one op and one autograd node for a loss call on one process
  (csrc/fused.cpp). ``grad`` is d loss / d model_pred (like ``model_pred``) when
  ``with_grad``, else empty ``(0,)``; the autograd kernel asks for it where the forward
  writes it with one pass over memory (dpo and sft on CPU) and hands it on in the backward.

The C++ ops live in the namespace ``rpo_fast`` (``csrc/``), the Triton ones under
``rpo_fast::triton_*`` (``kernels/``). Both get their fake kernels and autograd here, from
one function, so that ``torch.compile(fullgraph=True)`` traces either without a break; the
C++ extension registers the same autograd formulas in C++ (csrc/autograd.cpp), which cost
less per call, and then only its fake kernels come from here.

The stage ops' backward recomputes ``pred - target`` (error_grad) instead of storing a
gradient in the forward: the bytes moved are the same when the stages run one after the
other (README, "Kernels"). fused_loss stores it where one pass suffices (csrc/autograd.cpp).
"""

from __future__ import annotations

import torch


def _fake_sample_errors(model_pred, target, ref_pred):
    n = model_pred.shape[0]
    model_err = model_pred.new_empty((n,), dtype=torch.float32)
    ref_err = model_pred.new_empty((n if ref_pred is not None else 0,), dtype=torch.float32)
    return model_err, ref_err


def _fake_pair_loss(model_err, ref_err, weights, method, loss_type, beta):
    return (
        model_err.new_empty((), dtype=torch.float32),
        model_err.new_empty((5,), dtype=torch.float32),
        model_err.new_empty(model_err.shape, dtype=torch.float32),
    )


def _fake_error_grad(coef, model_pred, target):
    return torch.empty_like(model_pred)


def _fake_fused_loss(
    model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights, method, loss_type, beta, tau, with_grad=False
):
    loss, metrics, coef = _fake_pair_loss(
        model_pred.new_empty((model_pred.shape[0],), dtype=torch.float32), None, None, 0, 0, 1.0
    )
    grad = torch.empty_like(model_pred) if with_grad else model_pred.new_empty((0,))
    return loss, metrics, coef, grad


def register_op_family(
    sample_errors: str, pair_loss: str, error_grad: str, *, fakes: bool = True, autograd: bool = True
) -> None:
    """Registers fake kernels (when ``fakes``) and autograd (when ``autograd``) for one
    backend's three ops.

    Ops made with ``torch.library.custom_op`` already carry their fake kernels and pass
    ``fakes=False``; the C++ ops get them here. The C++ extension registers the same autograd
    formulas in C++ (csrc/autograd.cpp, cheaper per call) and passes ``autograd=False``.
    """
    grad_op = getattr(torch.ops.rpo_fast, error_grad.split("::")[1])

    if fakes:
        torch.library.register_fake(sample_errors)(_fake_sample_errors)
        torch.library.register_fake(pair_loss)(_fake_pair_loss)
        torch.library.register_fake(error_grad)(_fake_error_grad)

    def errors_setup(ctx, inputs, output):
        model_pred, target, _ = inputs
        ctx.save_for_backward(model_pred, target)

    def errors_backward(ctx, grad_model_err, grad_ref_err):
        model_pred, target = ctx.saved_tensors
        if grad_model_err is None:
            return None, None, None
        return grad_op(grad_model_err.float().contiguous(), model_pred, target), None, None

    def pair_setup(ctx, inputs, output):
        ctx.save_for_backward(output[2])

    def pair_backward(ctx, grad_loss, grad_metrics, grad_coef):
        (coef,) = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None
        return coef * grad_loss, None, None, None, None, None

    if autograd:
        torch.library.register_autograd(sample_errors, errors_backward, setup_context=errors_setup)
        torch.library.register_autograd(pair_loss, pair_backward, setup_context=pair_setup)


_cxx_registered = False


def register_cxx_ops() -> None:
    """Called once after ``rpo_fast._C`` is imported."""
    global _cxx_registered
    if not _cxx_registered:
        # An extension built from csrc/autograd.cpp has its autograd kernels already.
        in_cxx = torch._C._dispatch_has_kernel_for_dispatch_key("rpo_fast::sample_errors", "Autograd")
        register_op_family(
            "rpo_fast::sample_errors", "rpo_fast::pair_loss", "rpo_fast::error_grad", autograd=not in_cxx
        )
        # Its autograd is in C++ only (csrc/autograd.cpp); similarity_weights needs no fake
        # kernel: its ATen version (csrc/fused.cpp) runs on Meta and fake tensors.
        torch.library.register_fake("rpo_fast::fused_loss")(_fake_fused_loss)
        _cxx_registered = True
