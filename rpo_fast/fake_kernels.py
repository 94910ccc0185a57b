"""The contract of the fused custom ops, and the fake (meta) kernels of the C++ ones.

Every fused backend provides the same three stage ops (C++ schemas in csrc/ops.cpp; the
Triton ones, prefixed ``triton_``, in kernels/triton_loss.py):

* ``sample_errors(Tensor model_pred, Tensor target, Tensor? ref_pred) -> (Tensor, Tensor)``
  One pass over the inputs: per-sample policy errors and reference errors, float32 ``(2M,)``
  each (the second is ``(0,)`` when ``ref_pred`` is None).
* ``pair_loss(Tensor model_err, Tensor ref_err, Tensor? weights, int method, int loss_type,
  float beta, float weight_scale) -> (Tensor, Tensor, Tensor)``
  The O(M^2) stage: loss (0-d), metrics ``(5,)`` in the order of ``_types.METRIC_NAMES``,
  and ``coef = dloss/dmodel_err`` ``(2M,)``, all float32. ``weight_scale`` multiplies every
  weight (the given ones, or the uniform 1/M): M puts row-softmax weights on DPO's scale.
* ``error_grad(Tensor coef, Tensor model_pred, Tensor target) -> Tensor``
  The gradient write: ``coef[k] * 2 * (pred[k] - target[k]) / D`` in model_pred's dtype.

The C++ extension adds two ops:

* ``similarity_weights(Tensor emb_w, Tensor emb_l, float tau) -> Tensor``: the ``(M, M)``
  weights of rpo_fast/weights.py, float32.
* ``fused_loss(model_pred, target, ref_pred?, ref_err?, emb_w?, emb_l?, weights?, int method,
  int loss_type, float beta, float tau, float weight_scale) -> (loss, metrics, coef)``: the stages chained in
  C++, one op and one autograd node for a loss call on one process (csrc/fused.cpp).

One gradient design for every op and backend: the forward returns ``coef``, the backward
recomputes ``pred - target`` in ``error_grad`` (docs/kernels-cpp.md, "One gradient path",
has the measurements). Each op has one backward, registered once: in C++ for the C++ ops
(csrc/autograd.cpp), in Python for the Triton ones (kernels/triton_loss.py). Only the fake
kernels are written here, once, for both: they state the output shapes, dtypes and layouts
that ``torch.compile`` traces with.

Arguments are checked for users by rpo_fast/validation.py before any op runs; the ops keep
internal asserts only.
"""

from __future__ import annotations

import torch


def fake_sample_errors(model_pred, target, ref_pred):
    n = model_pred.shape[0]
    model_err = model_pred.new_empty((n,), dtype=torch.float32)
    ref_err = model_pred.new_empty((n if ref_pred is not None else 0,), dtype=torch.float32)
    return model_err, ref_err


def fake_pair_loss(model_err, ref_err, weights, method, loss_type, beta, weight_scale):
    return (
        model_err.new_empty((), dtype=torch.float32),
        model_err.new_empty((5,), dtype=torch.float32),
        model_err.new_empty(model_err.shape, dtype=torch.float32),
    )


def fake_error_grad(coef, model_pred, target):
    return torch.empty_like(model_pred)


def fake_fused_loss(model_pred, target, ref_pred, ref_err, emb_w, emb_l, weights, method, loss_type, beta, tau,
                    weight_scale):
    return fake_pair_loss(model_pred.new_empty((model_pred.shape[0],), dtype=torch.float32), None, None, 0, 0, 1.0,
                          1.0)


_cxx_registered = False


def register_cxx_ops() -> None:
    """The fake kernels of the C++ ops; called once, right after ``rpo_fast._C`` is imported
    (registering them on the first loss call would break a torch.compile(fullgraph=True)
    that makes that call). similarity_weights needs none: its ATen version (csrc/fused.cpp)
    runs on Meta and fake tensors."""
    global _cxx_registered
    if not _cxx_registered:
        torch.library.register_fake("rpo_fast::sample_errors")(fake_sample_errors)
        torch.library.register_fake("rpo_fast::pair_loss")(fake_pair_loss)
        torch.library.register_fake("rpo_fast::error_grad")(fake_error_grad)
        torch.library.register_fake("rpo_fast::fused_loss")(fake_fused_loss)
        _cxx_registered = True
