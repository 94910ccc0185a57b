"""Inputs, tolerances and comparisons shared by the parity tests of every backend.

Tolerances (explained once here, used by test_parity and the backend-specific tests).
A backend sums each sample in float32 (short blocks, combined in double
where it can), so a per-sample error is within a few float32 roundings of its float64
value; but it is returned as float32 (the op contract), and ``e_model - e_ref`` is a
difference of nearly equal numbers that beta then multiplies. Rounding the errors alone
therefore moves the loss by more than rtol 1e-5 on some inputs, whatever the kernel does
(the float32 ``torch`` backend misses a bare 1e-5 just the same: measured 3.3e-5 on the ipo
loss). Each comparison is held to rtol 1e-5 plus that propagated rounding
(``Conditioning``: first order, from the gradient and Hessian of the float64 reference), an
absolute term that vanishes where the loss does not amplify the rounding. The pair stage
alone, given the same float32 errors, is held to a bare rtol 1e-5. bf16 and fp16 inputs
convert exactly to float64 for the reference and accumulate in float32, so loss and metrics
keep those tolerances; the gradient, written in the input's dtype, adds its final rounding:
rtol 2^-8 (bf16), 2^-11 (fp16).
"""

from __future__ import annotations

import contextlib

import math
from typing import Dict, Optional

import pytest
import torch

import rpo_fast
from rpo_fast import reference
from rpo_fast.validation import LossInputs
from rpo_fast._types import METRIC_NAMES, loss_type_code, method_code
# The rounding bounds are the product's own (its first-use check holds a GPU backend to them):
from rpo_fast.verify import ERROR_ROUNDINGS, GRAD_ATOL, GRAD_RTOL, UNIT_ROUNDOFF, Tolerances, errors64  # noqa: F401
from rpo_fast.weights import similarity_weights

SMALL = (4, 7, 9)  # D = 252: divides no vector width or block size
SD_LIKE = (4, 64, 64)  # an SD1.5 latent


def make_inputs(
    pairs: int,
    shape,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    *,
    seed: int = 0,
    with_embeddings: bool = False,
    with_weights: bool = False,
    layout: str = "contiguous",
) -> Dict[str, Optional[torch.Tensor]]:
    """A batch like a training step's: reference errors close to the policy's, so that
    ``beta * (dl - dw)`` is O(1) for the default test beta (see ``TEST_BETA``).

    ``layout``: contiguous, channels_last (4-D shapes) or sliced (non-contiguous views).
    """
    gen = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    full = (n, *shape)
    if layout == "sliced":  # every other element of the last dim of a twice wider tensor
        full = (n, *shape[:-1], 2 * shape[-1])
    target = torch.randn(full, generator=gen)
    ref_pred = target + torch.randn(full, generator=gen)
    model_pred = ref_pred + 0.05 * torch.randn(full, generator=gen)
    tensors = {"model_pred": model_pred, "target": target, "ref_pred": ref_pred}
    for name, t in tensors.items():
        t = t.to(device=device, dtype=dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":
            t = t[..., ::2]
        tensors[name] = t
    out: Dict[str, Optional[torch.Tensor]] = dict(tensors, emb_w=None, emb_l=None, weights=None)
    if with_embeddings:
        emb = torch.randn(n, 8, generator=gen).to(device)
        out["emb_w"], out["emb_l"] = emb[:pairs], emb[pairs:]
    if with_weights:
        out["weights"] = torch.rand(pairs, pairs, generator=gen).to(device)
    return out


# With the inputs above, dl - dw is about 1e-2; beta = 100 puts z around 1.
TEST_BETA = 100.0


def run_loss(method: str, backend: str, inputs, *, use_ref_err: bool = False, loss_type: str = "sigmoid",
             beta: float = TEST_BETA, weight_norm: str = "mean"):
    """Loss, metrics and d loss / d model_pred for one backend."""
    pred = inputs["model_pred"].detach().clone().requires_grad_(True)
    target, ref_pred = inputs["target"], inputs["ref_pred"]
    ref_err = None
    if use_ref_err:
        ref_err = (ref_pred.double() - target.double()).pow(2).flatten(1).mean(1).float()
        ref_pred = None
    if method == "sft":
        loss, metrics = rpo_fast.sft_loss(pred, target, backend=backend), {}
    elif method == "dpo":
        loss, metrics = rpo_fast.diffusion_dpo_loss(
            pred, target, ref_pred, ref_err=ref_err, beta=beta, loss_type=loss_type, backend=backend, return_metrics=True
        )
    else:
        loss, metrics = rpo_fast.diffusion_rpo_loss(
            pred, target, ref_pred, ref_err=ref_err, emb_w=inputs["emb_w"], emb_l=inputs["emb_l"],
            weights=inputs["weights"], beta=beta, loss_type=loss_type, weight_norm=weight_norm, backend=backend,
            return_metrics=True,
        )
    loss.backward()
    return loss.detach(), metrics, pred.grad


def reference_in_float64(method: str, inputs, **kwargs):
    """The torch reference on float64 copies of the inputs: the ground truth, free of
    float32 summation-order noise (which beta amplifies)."""
    as64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return run_loss(method, "torch", as64, **kwargs)


def pair_reference64(model_err, ref_err, weights, method, loss_type, beta, weight_scale=1.0):
    """The reference pair stage in float64 on given per-sample errors: loss, metrics and
    coef = dloss/dmodel_err (zeros where the loss does not depend on a sample)."""
    e = model_err.double().requires_grad_(True)
    w = None if weights is None else weights.double()
    loss, metrics = reference.pair_loss(e, ref_err.double(), w, method, loss_type, beta, weight_scale)
    (coef,) = torch.autograd.grad(loss, e, allow_unused=True)
    return loss.detach(), metrics, coef if coef is not None else torch.zeros_like(e)


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to ``count`` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def assert_within(actual, expected, atol, rtol, what):
    """|actual - expected| <= atol + rtol |expected| entrywise (NaN matches NaN)."""
    actual, expected = actual.double().cpu(), expected.double().cpu()
    atol = atol.cpu() if isinstance(atol, torch.Tensor) else atol
    bound = atol + rtol * expected.abs()
    err = (actual - expected).abs()
    bad = ~((err <= bound) | (actual.isnan() & expected.isnan()))
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} entries off; worst excess "
        f"{float((err - bound)[bad].max())}, at actual {actual[bad].flatten()[:3].tolist()} "
        f"vs expected {expected[bad].flatten()[:3].tolist()}"
    )


def Conditioning(method, inputs, loss_type, beta, weight_norm="mean") -> Tolerances:
    """rpo_fast.verify.Tolerances of a parity-test batch (a dict from ``make_inputs``)."""
    return Tolerances(LossInputs(method, inputs["model_pred"], inputs["target"], inputs["ref_pred"], None,
                                 inputs["emb_w"], inputs["emb_l"], inputs["weights"], beta, 0.5, loss_type,
                                 weight_norm))


def check_parity(method, inputs, *, backend, loss_type="sigmoid", use_ref_err=False, beta=TEST_BETA,
                 grad_rtol=GRAD_RTOL, weight_norm="mean"):
    """Runs ``backend`` and the float64 reference on ``inputs`` and compares loss, metrics
    and gradient. ``grad_rtol``: per gradient dtype (a backend may need a looser bf16 one,
    see test_triton_kernels)."""
    settings = dict(use_ref_err=use_ref_err, loss_type=loss_type, beta=beta, weight_norm=weight_norm)
    loss, metrics, grad = run_loss(method, backend, inputs, **settings)
    ref_loss, ref_metrics, ref_grad = reference_in_float64(method, inputs, **settings)
    cond = Conditioning(method, inputs, loss_type, beta, weight_norm)
    dtype = inputs["model_pred"].dtype
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_within(loss, ref_loss, cond.loss_atol, 1e-5, "loss")
    assert set(metrics) == set(ref_metrics)
    for name, value in metrics.items():
        atol = cond.margin_atol if name == "reward_margin" else 0.0
        if name == "effective_beta" and method == "rpo":
            atol = 1e-5 * beta  # float32 weights times beta
        assert_within(value, ref_metrics[name], atol, 1e-5, name)
    assert grad.dtype == dtype and grad.shape == inputs["model_pred"].shape
    assert grad.device == inputs["model_pred"].device
    assert_within(grad, ref_grad, cond.grad_atol + GRAD_ATOL[dtype], max(1e-5, grad_rtol[dtype]), "grad")
    return loss, metrics, grad


# ----------------------------------------------------------------- the pair stage, per backend
# Each takes ``pair_op``: a backend's ``pair_loss`` op (torch.ops.rpo_fast.pair_loss for cpu
# and cuda, .triton_pair_loss for triton) and the device its inputs go to.

PAIR_STAGE_CASES = [("sft", False), ("dpo", False), ("rpo", False), ("rpo", True)]
PAIR_STAGE_IDS = ["sft", "dpo", "rpo_uniform", "rpo_weights"]


def check_pair_stage(pair_op, method, with_weights, loss_type, pairs, device="cpu", weight_scale=1.0):
    """The O(M^2) stage alone, given float32 errors, against float64 on the same errors, at
    the training beta 2500: a bare rtol 1e-5 (no per-sample rounding to propagate).
    ``weight_scale``: what the weights are multiplied by (M under weight_norm="mean")."""
    gen = torch.Generator().manual_seed(pairs)
    ref_err = 0.1 + torch.rand(2 * pairs, generator=gen)
    model_err = ref_err + 2e-4 * torch.randn(2 * pairs, generator=gen)
    weights = torch.rand(pairs, pairs, generator=gen) if with_weights else None
    sent_ref = ref_err if method != "sft" else torch.empty(0)
    loss, metrics, coef = pair_op(
        model_err.to(device), sent_ref.to(device), None if weights is None else weights.to(device),
        method_code(method), loss_type_code(loss_type), 2500.0, weight_scale,
    )
    ref_loss, ref_metrics, ref_coef = pair_reference64(model_err, ref_err, weights, method, loss_type, 2500.0,
                                                       weight_scale)
    assert loss.shape == () and metrics.shape == (5,) and coef.shape == (2 * pairs,)
    assert_within(loss, ref_loss, 0.0, 1e-5, "loss")
    for i, name in enumerate(METRIC_NAMES):
        assert_within(metrics[i], ref_metrics[i], 0.0, 1e-5, name)
    # coef: relative to the largest entry (entries that cancel to ~0 have no relative scale)
    assert_within(coef, ref_coef, 1e-5 * float(ref_coef.abs().max()), 1e-5, "coef")


def check_hinge_slope_at_the_kink(pair_op, device="cpu"):
    """z = 1 exactly: relu(1 - z) has slope 0 there in torch, and so must the kernel."""
    model_err = torch.tensor([0.0, 0.0, 0.5, 0.25])
    ref_err = torch.zeros(4)
    for method in ("dpo", "rpo"):
        weights = torch.eye(2) * 2 if method == "rpo" else None
        _, _, coef = pair_op(model_err.to(device), ref_err.to(device), None if weights is None else weights.to(device),
                             method_code(method), loss_type_code("hinge"), 2.0, 1.0)
        _, _, ref_coef = pair_reference64(model_err, ref_err, weights, method, "hinge", 2.0)
        assert torch.equal(coef.double().cpu(), ref_coef), method


def check_sigmoid_stable_for_large_logits(pair_op, device="cpu"):
    """|z| ~ 1e4: softplus must neither overflow nor lose the tiny loss of a right call."""
    model_err = torch.tensor([1.0, 5.0, 5.0, 1.0])  # pair 0 favoured, pair 1 not
    ref_err = torch.ones(4)
    loss, _, coef = pair_op(model_err.to(device), ref_err.to(device), None, 1, 0, 2500.0, 1.0)
    ref_loss, _, ref_coef = pair_reference64(model_err, ref_err, None, "dpo", "sigmoid", 2500.0)
    assert_within(loss, ref_loss, 0.0, 1e-6, "loss")
    assert_within(coef, ref_coef, 0.0, 1e-6, "coef")
    small = pair_op(torch.tensor([1.0, 1.01], device=device), torch.ones(2, device=device), None, 1, 0, 2500.0, 1.0)[0]
    assert 0 < float(small) == pytest.approx(math.log1p(math.exp(-25.0)), rel=1e-6)


def check_non_finite_pair_stage(pair_op, device="cpu"):
    """A NaN error, or an infinite weight (which drives sigmoid's f to a finite 0), gives a
    NaN loss and NaN coefficients; the metrics stay those of the reference."""
    model_err = torch.tensor([1.0, 2.0, 3.0, float("nan")], device=device)
    ref_err = torch.tensor([1.0, 2.1, 3.0, 4.0], device=device)
    for method in (1, 2):  # dpo, rpo
        loss, _, coef = pair_op(model_err, ref_err, None, method, 0, 10.0, 1.0)
        assert loss.isnan() and coef.isnan().all(), method
    weights = torch.tensor([[1.0, float("inf")], [0.5, 0.5]])
    finite_err = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss, metrics, coef = pair_op(finite_err.to(device), ref_err, weights.to(device), 2, 0, 10.0, 1.0)
    ref_loss, ref_metrics, _ = pair_reference64(finite_err, ref_err.cpu(), weights, "rpo", "sigmoid", 10.0)
    assert loss.isnan() and ref_loss.isnan() and coef.isnan().all()
    assert_within(metrics, ref_metrics, 0.0, 1e-6, "metrics")


def check_nan_prediction_gives_nan_loss(backend, device="cpu"):
    """End to end: a NaN in the prediction gives a NaN loss and a non-finite gradient."""
    inputs = make_inputs(2, SMALL, device=device)
    inputs["model_pred"][1, 0, 0, 0] = float("nan")
    loss, _, grad = run_loss("rpo", backend, inputs)
    assert loss.isnan() and not grad.isfinite().all()


def assert_compiled_step_matches_eager(model, forward, x):
    """``torch.compile(forward, fullgraph=True)`` (raises on a graph break) gives eager's loss
    and the same gradients of ``model``'s parameters."""

    def run(fn):
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    compiled_loss, compiled_grads = run(torch.compile(forward, fullgraph=True))
    eager_loss, eager_grads = run(forward)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- similarity weights, fused op

def check_similarity_weights(weights_op, pairs, width, dtype, device="cpu"):
    """An (M, M) similarity-weights op against the reference in float64 (rpo_fast/weights.py):
    the embeddings are widened exactly, the sums run in float32 (a few roundings of values
    below 1/tau), then exp and normalization."""
    gen = torch.Generator().manual_seed(pairs * 1000 + width)
    emb_w = torch.randn(pairs, width, generator=gen).to(device=device, dtype=dtype)
    emb_l = (emb_w.float().cpu() + torch.randn(pairs, width, generator=gen)).to(device=device, dtype=dtype)
    got = weights_op(emb_w, emb_l, 0.5)
    assert got.dtype == torch.float32 and got.shape == (pairs, pairs)
    want = similarity_weights(emb_w.double(), emb_l.double(), 0.5)
    assert_within(got, want, 1e-7, 1e-5, "similarity weights")


def check_similarity_weights_edge_rows(weights_op, device="cpu"):
    """A zero embedding has cosine 0 with everything (F.normalize's eps), as in the reference;
    a NaN makes its row NaN and an inf every row (then the loss is NaN, never finite)."""
    gen = torch.Generator().manual_seed(11)
    emb_w, emb_l = (torch.randn(3, 40, generator=gen) for _ in range(2))
    emb_w[1] = 0.0
    got = weights_op(emb_w.to(device), emb_l.to(device), 0.5)
    assert_within(got, similarity_weights(emb_w.double(), emb_l.double(), 0.5), 1e-7, 1e-5, "zero row")
    with_nan = emb_w.clone()
    with_nan[2, 5] = float("nan")
    got = weights_op(with_nan.to(device), emb_l.to(device), 0.5).cpu()
    assert got[2].isnan().all() and got[:2].isfinite().all()
    with_inf = emb_l.clone()
    with_inf[0, 3] = float("inf")
    assert weights_op(emb_w.to(device), with_inf.to(device), 0.5).isnan().all()


FUSED_CASES = [
    ("rpo", "embeddings", False), ("rpo", "explicit", False), ("rpo", "uniform", True),
    ("dpo", "uniform", False), ("dpo", "uniform", True), ("sft", "uniform", False),
]
FUSED_IDS = [f"{m}-{w}-{'ref_err' if r else 'ref_pred'}" for m, w, r in FUSED_CASES]


def check_fused_matches_stages(method, weights, use_ref_err, dtype, device="cpu"):
    """fused_loss is the stage ops chained: the same loss, metrics and coefficients, bit for
    bit, and (through autograd) the same gradient as error_grad of those coefficients scaled
    by the incoming gradient, bit for bit, for dL = 1 and dL = 3."""
    ops = torch.ops.rpo_fast
    inputs = make_inputs(5, SMALL, dtype, device, with_embeddings=weights == "embeddings",
                         with_weights=weights == "explicit")
    pred, target, ref_pred = inputs["model_pred"], inputs["target"], inputs["ref_pred"]
    if method == "sft":
        ref_pred = None
    model_err, ref_err = ops.sample_errors(pred, target, ref_pred)
    given_ref_err = None
    if use_ref_err:
        given_ref_err, ref_pred = ref_err.to(dtype), None
        ref_err = given_ref_err.float()
    stage_weights = inputs["weights"]
    if weights == "embeddings":
        stage_weights = ops.similarity_weights(inputs["emb_w"], inputs["emb_l"], 0.5)
    codes = (method_code(method), loss_type_code("sigmoid"), TEST_BETA)
    scale = 5.0 if weights != "explicit" else 1.0  # weight_norm "mean": M times the computed weights
    staged = ops.pair_loss(model_err, ref_err, stage_weights, *codes, scale)
    leaf = pred.detach().clone().requires_grad_(True)
    fused = ops.fused_loss(leaf, target, ref_pred, given_ref_err, inputs["emb_w"], inputs["emb_l"],
                           inputs["weights"], *codes, 0.5, scale)
    for name, a, b in zip(("loss", "metrics", "coef"), fused, staged):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name
    (grad,) = torch.autograd.grad(fused[0], leaf, retain_graph=True)
    assert torch.equal(grad, ops.error_grad(staged[2], pred, target))
    (grad,) = torch.autograd.grad(fused[0] * 3.0, leaf)
    assert torch.equal(grad, ops.error_grad(staged[2] * 3.0, pred, target))
