"""One parity suite for every kernel backend this process has: ``cpu`` (the C++ ops),
``triton`` (on a GPU, or on the CPU in Triton's interpreter, which tests/conftest.py turns
on) and ``cuda`` (where a GPU is present). A backend that cannot run here is not in the
parametrization; nothing skips itself.

Every end-to-end case compares the loss, the metrics and d loss / d model_pred with the
``torch`` reference evaluated in float64 (``parity_utils.reference_in_float64``), to the
tolerances that tests/parity_utils.py explains; the stage ops are checked one by one, and
``torch.library.opcheck`` checks every op's registration (schema, fake kernel, autograd).
What only one backend has (instruction sets, launch grids, GPU-only paths) is tested in
test_cpu_kernels.py, test_triton_kernels.py and test_cuda_kernels.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import pytest
import torch

import rpo_fast
from rpo_fast._types import LOSS_TYPES, loss_type_code, method_code

import parity_utils
from parity_utils import (
    ERROR_ROUNDINGS,
    GRAD_ATOL,
    GRAD_RTOL,
    PAIR_STAGE_CASES,
    PAIR_STAGE_IDS,
    SD_LIKE,
    SMALL,
    TEST_BETA,
    UNIT_ROUNDOFF,
    assert_within,
    check_hinge_slope_at_the_kink,
    check_nan_prediction_gives_nan_loss,
    check_non_finite_pair_stage,
    check_pair_stage,
    check_sigmoid_stable_for_large_logits,
    errors64,
    make_inputs,
    run_loss,
)

KERNEL_BACKENDS = [name for name in rpo_fast.available_backends() if name != "torch"]
# Triton's interpreter truncates float32 -> bfloat16 (its cast ignores the rounding mode); a
# GPU rounds to nearest even. So in the interpreter a bf16 gradient may be one more ulp off.
INTERPRETER_GRAD_RTOL = {**GRAD_RTOL, torch.bfloat16: 2.0**-7}


@dataclass(frozen=True)
class Kernels:
    """One backend's stage ops and the device its tensors live on."""

    name: str
    device: str
    sample_errors: Callable
    pair_loss: Callable
    error_grad: Callable
    grad_rtol: Dict[torch.dtype, float]


def _kernels(name: str) -> Kernels:
    ops = torch.ops.rpo_fast
    if name == "cpu":
        return Kernels(name, "cpu", ops.sample_errors, ops.pair_loss, ops.error_grad, GRAD_RTOL)
    if name == "cuda":
        return Kernels(name, "cuda", ops.sample_errors, ops.pair_loss, ops.error_grad, GRAD_RTOL)
    from rpo_fast.kernels import triton_loss  # noqa: F401  (registers the triton ops)

    on_gpu = torch.cuda.is_available()
    return Kernels(name, "cuda" if on_gpu else "cpu", ops.triton_sample_errors, ops.triton_pair_loss,
                   ops.triton_error_grad, GRAD_RTOL if on_gpu else INTERPRETER_GRAD_RTOL)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernels(request) -> Kernels:
    return _kernels(request.param)


# The backends whose tensors live on a GPU here (triton only where one is present).
GPU_BACKENDS = [name for name in KERNEL_BACKENDS if name == "cuda" or (name == "triton" and torch.cuda.is_available())]


@pytest.fixture(params=GPU_BACKENDS)
def gpu_kernels(request) -> Kernels:
    return _kernels(request.param)


def test_this_machine_tests_the_cpu_and_triton_backends():
    """The parametrization is not empty: the C++ extension is built and Triton imports (in
    its interpreter on a CPU-only machine)."""
    assert {"cpu", "triton"} <= set(KERNEL_BACKENDS), (KERNEL_BACKENDS, rpo_fast._extension.unavailable_reason())


def check_parity(kernels: Kernels, method, inputs, **kwargs):
    return parity_utils.check_parity(method, inputs, backend=kernels.name, grad_rtol=kernels.grad_rtol, **kwargs)


# ----------------------------------------------------------------- end to end parity


@pytest.mark.parametrize("pairs", [1, 2, 3, 8, 33])
@pytest.mark.parametrize(
    "method,loss_type", [(m, lt) for m in ("rpo", "dpo") for lt in LOSS_TYPES] + [("sft", "sigmoid")]
)
def test_parity_every_method_and_loss_type(kernels, method, loss_type, pairs):
    inputs = make_inputs(pairs, SMALL, device=kernels.device, seed=pairs, with_embeddings=method == "rpo")
    check_parity(kernels, method, inputs, loss_type=loss_type)


@pytest.mark.parametrize("pairs", [3, 8])
@pytest.mark.parametrize("use_ref_err", [False, True], ids=["ref_pred", "ref_err"])
@pytest.mark.parametrize("weights", ["embeddings", "explicit", "uniform"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("weight_norm", ["mean", "row"])
def test_parity_rpo_weights_and_reference_kinds(kernels, weights, use_ref_err, pairs, loss_type, weight_norm):
    inputs = make_inputs(pairs, SMALL, device=kernels.device, seed=10 + pairs,
                         with_embeddings=weights == "embeddings", with_weights=weights == "explicit")
    check_parity(kernels, "rpo", inputs, use_ref_err=use_ref_err, loss_type=loss_type, weight_norm=weight_norm)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("use_ref_err", [False, True], ids=["ref_pred", "ref_err"])
def test_parity_dpo_reference_kinds(kernels, use_ref_err, loss_type):
    inputs = make_inputs(8, SMALL, device=kernels.device, seed=3)
    check_parity(kernels, "dpo", inputs, use_ref_err=use_ref_err, loss_type=loss_type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
def test_parity_layouts_and_dtypes(kernels, method, layout, dtype):
    inputs = make_inputs(3, SMALL, dtype, kernels.device, seed=5, with_embeddings=method == "rpo", layout=layout)
    _, _, grad = check_parity(kernels, method, inputs)
    if layout == "channels_last":  # the gradient keeps model_pred's layout (empty_like)
        assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.float32, torch.bfloat16),  # autocast prediction, fp32 noise
        (torch.float16, torch.float32, torch.float16),
        (torch.float32, torch.bfloat16, torch.float16),
        (torch.bfloat16, torch.float16, torch.float32),
    ],
    ids=lambda d: "-".join(str(x).split(".")[1] for x in d),
)
def test_parity_mixed_dtypes(kernels, dtypes):
    """Each input read in its own dtype (model_pred, target, ref_pred)."""
    inputs = make_inputs(3, SMALL, device=kernels.device, seed=6, with_weights=True)
    for name, dtype in zip(("model_pred", "target", "ref_pred"), dtypes):
        inputs[name] = inputs[name].to(dtype)
    check_parity(kernels, "rpo", inputs, loss_type="hinge")
    check_parity(kernels, "dpo", inputs)


def test_parity_mixed_layouts(kernels):
    """channels_last prediction, contiguous target, sliced reference: the odd ones are
    brought into the prediction's layout; the gradient keeps it."""
    inputs = make_inputs(3, SMALL, device=kernels.device, seed=7, with_embeddings=True)
    inputs["model_pred"] = inputs["model_pred"].contiguous(memory_format=torch.channels_last)
    wide = torch.cat([inputs["ref_pred"], inputs["ref_pred"]], dim=-1)
    inputs["ref_pred"] = wide[..., : SMALL[-1]]
    assert not inputs["ref_pred"].is_contiguous()
    _, _, grad = check_parity(kernels, "rpo", inputs)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
def test_parity_sd_like_shape(kernels, method, dtype):
    """D = 4x64x64: a sample spans several blocks and chunks (the hand-over of partial sums)."""
    inputs = make_inputs(8, SD_LIKE, dtype, kernels.device, seed=8, with_embeddings=method == "rpo")
    check_parity(kernels, method, inputs, beta=TEST_BETA / 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parity_at_sdxl_shape(kernels, dtype, layout):
    """SDXL latents, M = 16, the training beta: a GPU-sized launch (marked gpu: too slow for
    the interpreter)."""
    inputs = make_inputs(16, (4, 128, 128), dtype, kernels.device, with_embeddings=True, layout=layout)
    check_parity(kernels, "rpo", inputs, beta=2500.0)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["rpo", "dpo"])
def test_side_stream_gives_the_default_streams_results(gpu_kernels, method):
    """Kernels launch on the caller's current stream: the loss and gradient computed on a side
    stream (inputs made there, results read after it is synchronized) equal the default
    stream's bit for bit."""
    want = run_loss(method, gpu_kernels.name, make_inputs(8, SD_LIKE, torch.float32, gpu_kernels.device, seed=3,
                                                      with_embeddings=method == "rpo"))
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        inputs = make_inputs(8, SD_LIKE, torch.float32, gpu_kernels.device, seed=3, with_embeddings=method == "rpo")
        got = run_loss(method, gpu_kernels.name, inputs)
    side.synchronize()
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    for name in want[1]:
        assert torch.equal(got[1][name], want[1][name]), name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device_gives_the_first_devices_results(gpu_kernels):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on the tensors' device."""
    want = run_loss("rpo", gpu_kernels.name, make_inputs(4, SMALL, torch.float32, "cuda:0", seed=5, with_embeddings=True))
    got = run_loss("rpo", gpu_kernels.name, make_inputs(4, SMALL, torch.float32, "cuda:1", seed=5, with_embeddings=True))
    assert got[0].device == torch.device("cuda:1") and got[2].device == torch.device("cuda:1")
    assert torch.equal(got[0].cpu(), want[0].cpu()) and torch.equal(got[2].cpu(), want[2].cpu())


def test_nan_prediction_gives_nan_loss(kernels):
    check_nan_prediction_gives_nan_loss(kernels.name, kernels.device)


def test_float64_needs_the_torch_backend(kernels):
    inputs = make_inputs(2, SMALL, torch.float64, kernels.device)
    with pytest.raises(TypeError, match=f"backend: '{kernels.name}' takes float32, bfloat16 or float16"):
        run_loss("rpo", kernels.name, inputs)


# ----------------------------------------------------------------- the stage ops one by one


LAYOUTS = [
    lambda x: x,
    lambda x: x.contiguous(memory_format=torch.channels_last),
    lambda x: x[..., ::2],  # sliced: copied to contiguous
    lambda x: x[::2],  # every other sample: each sample a block, walked in place
    lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),  # dense, batch not outermost
    lambda x: x[:1].expand(x.shape),  # every sample the same memory (batch stride 0)
]
LAYOUT_IDS = ["contiguous", "channels_last", "sliced", "batch_strided", "batch_inner", "expanded"]


@pytest.mark.parametrize("make", LAYOUTS, ids=LAYOUT_IDS)
def test_sample_errors_and_error_grad_on_any_layout(kernels, make):
    gen = torch.Generator().manual_seed(1)
    full = (8, 4, 24, 48)
    target, ref, pred = (make(torch.randn(full, generator=gen).to(kernels.device)) for _ in range(3))
    model_err, ref_err = kernels.sample_errors(pred, target, ref)
    assert model_err.dtype == ref_err.dtype == torch.float32
    assert_within(model_err, errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")
    assert_within(ref_err, errors64(ref, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "ref_err")

    coef = torch.randn(pred.shape[0], generator=gen)
    grad = kernels.error_grad(coef.to(kernels.device), pred, target)
    expected = coef.double().view(-1, 1, 1, 1) * 2 * (pred.double().cpu() - target.double().cpu()) / pred[0].numel()
    # the layout the fake kernel promises (torch.compile relies on it)
    assert grad.shape == pred.shape and grad.stride() == torch.empty_like(pred).stride()
    assert_within(grad, expected, 0.0, 4 * UNIT_ROUNDOFF, "grad")


@pytest.mark.parametrize(
    "shape",
    [(2, 1), (2, 31), (2, 33), (4, 1023), (2, 1025), (2, 3, 101, 109), (6, 16384), (2, 16385)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_vector_tails_blocks_and_chunks(kernels, shape, dtype):
    """Sizes around the vector step, the 1024-element block and the 16384-element chunk
    (cpu; 8192 on cuda, 1024 a step in triton): every tail and hand-over path of the loops."""
    gen = torch.Generator().manual_seed(2)
    pred, target, ref = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    model_err, ref_err = kernels.sample_errors(*(t.to(kernels.device) for t in (pred, target, ref)))
    assert_within(model_err, errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")
    assert_within(ref_err, errors64(ref, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "ref_err")
    coef = torch.randn(shape[0], generator=gen)
    grad = kernels.error_grad(coef.to(kernels.device), pred.to(kernels.device), target.to(kernels.device))
    view = (-1,) + (1,) * (len(shape) - 1)
    expected = (coef.double().view(view) * 2 * (pred.double() - target.double()) / pred[0].numel()).to(dtype)
    assert grad.dtype == dtype
    # the same float32 arithmetic, then one rounding to dtype: at most one ulp apart (two in
    # the interpreter, which truncates to bf16)
    rtol = 4 * UNIT_ROUNDOFF if dtype == torch.float32 else 2 * kernels.grad_rtol[dtype]
    assert_within(grad, expected, GRAD_ATOL[dtype], rtol, "grad")


def test_sample_errors_without_reference_and_deterministic(kernels):
    pred, target = torch.randn(2, 6, 4, 3, 3000).to(kernels.device).unbind(0)  # 36000 elements a sample
    first = kernels.sample_errors(pred, target, None)
    second = kernels.sample_errors(pred, target, None)
    assert first[1].shape == (0,)
    assert torch.equal(first[0], second[0])  # a fixed summation order, no atomics
    assert_within(first[0], errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")


# ----------------------------------------------------------------- the pair stage


@pytest.mark.parametrize("pairs", [1, 5, 64, 100, 300])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("method,with_weights", PAIR_STAGE_CASES, ids=PAIR_STAGE_IDS)
@pytest.mark.parametrize("weight_norm", ["mean", "row"])
def test_pair_loss_stage_at_training_beta(kernels, method, with_weights, loss_type, pairs, weight_norm):
    """M = 100 spans two of triton's 64-wide tiles, M = 64 fills exactly one; M = 300 is five of
    the C++ backends' 128-index tiles (rpo_math.h), the last one partly filled. ``mean``
    scales the weights by M (what the losses pass for computed weights), ``row`` leaves them."""
    check_pair_stage(kernels.pair_loss, method, with_weights, loss_type, pairs, device=kernels.device,
                     weight_scale=float(pairs) if weight_norm == "mean" else 1.0)


def test_hinge_slope_is_zero_at_the_kink(kernels):
    check_hinge_slope_at_the_kink(kernels.pair_loss, device=kernels.device)


def test_sigmoid_loss_is_stable_for_large_logits(kernels):
    check_sigmoid_stable_for_large_logits(kernels.pair_loss, device=kernels.device)


@pytest.mark.parametrize("where", ["model_err", "ref_err", "weights"])
def test_a_non_finite_input_in_a_late_tile_makes_every_coefficient_nan(kernels, where):
    """M = 300: the bad value sits in the last of five tiles, whose partial carries the flag."""
    dev, m = kernels.device, 300
    gen = torch.Generator().manual_seed(3)
    model_err, ref_err = torch.rand(2, 2 * m, generator=gen)
    weights = torch.rand(m, m, generator=gen)
    {"model_err": model_err, "ref_err": ref_err}.get(where, weights[m - 1])[-1] = float("nan")
    loss, _, coef = kernels.pair_loss(model_err.to(dev), ref_err.to(dev), weights.to(dev), 2, 0, 2500.0, 1.0)
    assert loss.isnan() and coef.isnan().all(), where


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_non_finite_inputs_give_nan_loss_and_coef(kernels):
    check_non_finite_pair_stage(kernels.pair_loss, device=kernels.device)
    dev = kernels.device
    inf_ref = torch.tensor([1.0, float("inf"), 3.0, 4.0], device=dev)
    loss, _, coef = kernels.pair_loss(torch.ones(4, device=dev), inf_ref, None, 2, 1, 10.0, 1.0)
    assert loss.isnan() and coef.isnan().all()
    # sft has no finiteness rule: NaN flows through the mean, as in the reference.
    model_err = torch.tensor([1.0, 2.0, 3.0, float("nan")], device=dev)
    loss, metrics, coef = kernels.pair_loss(model_err, torch.empty(0, device=dev), None, 0, 0, 10.0, 1.0)
    assert float(loss) == pytest.approx(1.5) and metrics[2].isnan()
    assert torch.equal(coef.cpu(), torch.tensor([0.5, 0.5, 0, 0]))


# ----------------------------------------------------------------- one gradient path


@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
def test_gradient_is_error_grad_of_the_coefficients(kernels, method):
    """The one gradient design of every backend (rpo_fast/fake_kernels.py): d loss / d model_pred is
    error_grad of the pair stage's coefficients scaled by the incoming gradient, bit for bit,
    for dL = 1 and for any other dL (gradient accumulation, loss scaling)."""
    inputs = make_inputs(4, SMALL, device=kernels.device, seed=9)
    pred, target, ref = inputs["model_pred"], inputs["target"], inputs["ref_pred"] if method != "sft" else None
    model_err, ref_err = kernels.sample_errors(pred, target, ref)
    scale = 4.0 if method == "rpo" else 1.0  # weight_norm "mean": uniform weights times M
    _, _, coef = kernels.pair_loss(model_err, ref_err, None, method_code(method), loss_type_code("sigmoid"), TEST_BETA,
                                   scale)
    for scale in (1.0, 0.25, 3.0):
        leaf = pred.detach().clone().requires_grad_(True)
        if method == "sft":
            loss = rpo_fast.sft_loss(leaf, target, backend=kernels.name)
        elif method == "dpo":
            loss = rpo_fast.diffusion_dpo_loss(leaf, target, ref, beta=TEST_BETA, backend=kernels.name)
        else:
            loss = rpo_fast.diffusion_rpo_loss(leaf, target, ref, beta=TEST_BETA, backend=kernels.name)
        (grad,) = torch.autograd.grad(loss * scale, leaf)
        want = kernels.error_grad(coef * torch.tensor(scale, device=coef.device), pred, target)
        assert torch.equal(grad, want), (method, scale)


# ----------------------------------------------------------------- op registrations


def _opcheck_cases(kernels: Kernels):
    """(op, args) covering each op of the backend, with and without the optional tensors.
    rpo only: dpo and sft give NaN metrics (no weights), which opcheck's comparisons, which
    do not equate NaN with NaN, would report as a difference."""
    dev = kernels.device
    gen = torch.Generator().manual_seed(3)
    pred, target, ref = (torch.randn(6, 3, 5, 7, generator=gen).to(dev) for _ in range(3))
    pred.requires_grad_(True)
    errors = (0.5 + torch.rand(6, generator=gen)).to(dev).requires_grad_(True)
    ref_err = (0.5 + torch.rand(6, generator=gen)).to(dev)
    weights = torch.rand(3, 3, generator=gen).to(dev)
    coef = torch.randn(6, generator=gen).to(dev)
    ops = torch.ops.rpo_fast
    prefix = "triton_" if kernels.name == "triton" else ""
    cases = [
        (getattr(ops, f"{prefix}sample_errors").default, (pred, target, ref)),
        (getattr(ops, f"{prefix}sample_errors").default, (pred, target, None)),
        (getattr(ops, f"{prefix}pair_loss").default, (errors, ref_err, weights, 2, 0, 10.0, 1.0)),
        (getattr(ops, f"{prefix}pair_loss").default, (errors, ref_err, None, 2, 2, 10.0, 3.0)),
        (getattr(ops, f"{prefix}error_grad").default, (coef, pred.detach(), target)),
    ]
    if kernels.name != "triton":  # the C++ extension's two more ops
        emb = torch.randn(6, 8, generator=gen).to(dev)
        cases += [
            (ops.similarity_weights.default, (emb[:3], emb[3:], 0.5)),
            (ops.fused_loss.default, (pred, target, ref, None, emb[:3], emb[3:], None, 2, 0, 10.0, 0.5, 3.0)),
            (ops.fused_loss.default, (pred, target, None, ref_err, None, None, weights, 2, 1, 10.0, 0.5, 1.0)),
            (ops.fused_loss.default, (pred, target, ref, None, None, None, None, 2, 0, 10.0, 0.5, 3.0)),
        ]
    return cases


def test_opcheck_every_op(kernels):
    """torch.library.opcheck: schema, fake kernel, autograd registration and AOT dispatch of
    every op, as torch.compile needs them."""
    cases = _opcheck_cases(kernels)
    names = {op.name() for op, _ in cases}
    assert len(names) == (3 if kernels.name == "triton" else 5), names
    for op, args in cases:
        torch.library.opcheck(op, args)
