"""Parity tests of the ``triton`` backend (kernels/triton_loss.py).

On the CPU they run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported), so shapes stay small; the tests marked ``gpu`` repeat the parity
check on CUDA tensors at SDXL latent shape. Tolerances: tests/parity_utils.py, except that a
bf16 gradient may be one more ulp off in the interpreter (INTERPRETER_GRAD_RTOL).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rpo_fast
from rpo_fast._types import LOSS_TYPES

import parity_utils
from parity_utils import (
    check_nan_prediction_gives_nan_loss,
    PAIR_STAGE_CASES,
    PAIR_STAGE_IDS,
    check_hinge_slope_at_the_kink,
    check_non_finite_pair_stage,
    check_pair_stage,
    check_sigmoid_stable_for_large_logits,
    ERROR_ROUNDINGS,
    GRAD_ATOL,
    GRAD_RTOL,
    SD_LIKE,
    SMALL,
    TEST_BETA,
    UNIT_ROUNDOFF,
    Conditioning,
    assert_within,
    errors64,
    make_inputs,
    reference_in_float64,
    run_loss,
)

if "triton" not in rpo_fast.available_backends():
    pytest.skip("the triton backend does not import here", allow_module_level=True)

from rpo_fast.kernels import triton_loss  # noqa: E402

ops = torch.ops.rpo_fast
# Triton 3.8's interpreter truncates float32 -> bfloat16 (its cast ignores the rounding
# mode); a GPU rounds to nearest even. So on the CPU a bf16 gradient may be one ulp off.
INTERPRETER_GRAD_RTOL = {**GRAD_RTOL, torch.bfloat16: 2.0**-7}


def check_parity(method, inputs, **kwargs):
    on_gpu = inputs["model_pred"].is_cuda
    return parity_utils.check_parity(
        method, inputs, backend="triton", grad_rtol=GRAD_RTOL if on_gpu else INTERPRETER_GRAD_RTOL, **kwargs
    )


# ----------------------------------------------------------------- end to end parity


@pytest.mark.parametrize("pairs", [1, 2, 3, 8, 33])
@pytest.mark.parametrize(
    "method,loss_type",
    [(m, lt) for m in ("rpo", "dpo") for lt in LOSS_TYPES] + [("sft", "sigmoid")],
)
def test_parity_every_method_and_loss_type(method, loss_type, pairs):
    inputs = make_inputs(pairs, SMALL, seed=pairs, with_embeddings=method == "rpo")
    check_parity(method, inputs, loss_type=loss_type)


@pytest.mark.parametrize("pairs", [3, 8])
@pytest.mark.parametrize("use_ref_err", [False, True], ids=["ref_pred", "ref_err"])
@pytest.mark.parametrize("weights", ["embeddings", "explicit", "uniform"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_parity_rpo_weights_and_reference_kinds(weights, use_ref_err, pairs, loss_type):
    inputs = make_inputs(
        pairs, SMALL, seed=10 + pairs, with_embeddings=weights == "embeddings", with_weights=weights == "explicit"
    )
    check_parity("rpo", inputs, use_ref_err=use_ref_err, loss_type=loss_type)


@pytest.mark.parametrize("use_ref_err", [False, True], ids=["ref_pred", "ref_err"])
def test_parity_dpo_reference_kinds(use_ref_err):
    check_parity("dpo", make_inputs(8, SMALL, seed=3), use_ref_err=use_ref_err, loss_type="ipo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
def test_parity_layouts_and_dtypes(method, layout, dtype):
    inputs = make_inputs(3, SMALL, dtype, seed=5, with_embeddings=method == "rpo", layout=layout)
    _, _, grad = check_parity(method, inputs)
    if layout == "channels_last":  # the gradient keeps model_pred's layout (empty_like)
        assert grad.is_contiguous(memory_format=torch.channels_last)


def test_parity_mixed_dtypes():
    """bf16 prediction, fp32 target, fp16 reference: each read in its own dtype."""
    inputs = make_inputs(3, SMALL, seed=6, with_weights=True)
    inputs["model_pred"] = inputs["model_pred"].bfloat16()
    inputs["ref_pred"] = inputs["ref_pred"].half()
    check_parity("rpo", inputs, loss_type="hinge")


def test_parity_mixed_layouts():
    """channels_last prediction with a contiguous target (a channels_last UNet and its
    noise): the target is copied into the prediction's layout."""
    inputs = make_inputs(3, SMALL, seed=7, with_embeddings=True)
    inputs["model_pred"] = inputs["model_pred"].contiguous(memory_format=torch.channels_last)
    _, _, grad = check_parity("rpo", inputs)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_parity_sd_like_shape(dtype):
    """D = 4x64x64 spans several chunks a sample: the two-level reduction."""
    inputs = make_inputs(8, SD_LIKE, dtype, seed=8, with_embeddings=True)
    check_parity("rpo", inputs, beta=2500.0 / 25)


# ----------------------------------------------------------------- the three ops one by one


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x[..., ::2],  # sliced: copied to contiguous
        lambda x: x[::2],  # every other sample: walked in place (each sample still dense)
        lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),  # batch not outermost
    ],
    ids=["contiguous", "channels_last", "sliced", "batch_strided", "batch_inner"],
)
@pytest.mark.parametrize("programs", [None, 8], ids=["default_grid", "looping_programs"])
def test_sample_errors_and_error_grad_on_any_layout(make, programs, monkeypatch):
    """``programs=8`` shrinks the grid so that each program loops over several blocks and
    a sample spans several chunks, as at SDXL size on a GPU."""
    if programs is not None:
        monkeypatch.setattr(triton_loss, "STREAM_TARGET_PROGRAMS", programs)
    gen = torch.Generator().manual_seed(1)
    full = (8, 4, 24, 48)  # sliced: (8, 4, 24, 24) -> D = 2304, batch_strided: N = 4
    target = make(torch.randn(full, generator=gen))
    ref = make(torch.randn(full, generator=gen))
    pred = make(torch.randn(full, generator=gen))
    model_err, ref_err = ops.triton_sample_errors(pred, target, ref)
    assert model_err.dtype == ref_err.dtype == torch.float32
    assert_within(model_err, errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")
    assert_within(ref_err, errors64(ref, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "ref_err")

    coef = torch.randn(pred.shape[0], generator=gen)
    grad = ops.triton_error_grad(coef, pred, target)
    d = pred[0].numel()
    expected = coef.double().view(-1, 1, 1, 1) * 2 * (pred.double() - target.double()) / d
    assert grad.shape == pred.shape and grad.stride() == torch.empty_like(pred).stride()
    assert_within(grad, expected, 0.0, 4 * UNIT_ROUNDOFF, "grad")


def test_sample_errors_without_reference_and_deterministic():
    pred, target = torch.randn(2, 6, 4, 3, 1000).unbind(0)
    first = ops.triton_sample_errors(pred, target, None)
    second = ops.triton_sample_errors(pred, target, None)
    assert first[1].shape == (0,)
    assert torch.equal(first[0], second[0])  # a fixed summation order, no atomics
    assert_within(first[0], errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")



@pytest.mark.parametrize("pairs", [1, 5, 64, 100])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("method,with_weights", PAIR_STAGE_CASES, ids=PAIR_STAGE_IDS)
def test_pair_loss_stage_at_training_beta(method, with_weights, loss_type, pairs):
    """M = 100 spans two 64-wide tiles; M = 64 fills exactly one."""
    check_pair_stage(ops.triton_pair_loss, method, with_weights, loss_type, pairs)


def test_hinge_slope_is_zero_at_the_kink():
    check_hinge_slope_at_the_kink(ops.triton_pair_loss)


def test_sigmoid_loss_is_stable_for_large_logits():
    check_sigmoid_stable_for_large_logits(ops.triton_pair_loss)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_non_finite_inputs_give_nan_loss_and_coef():
    check_non_finite_pair_stage(ops.triton_pair_loss)
    check_nan_prediction_gives_nan_loss("triton")


# ----------------------------------------------------------------- bad input


def test_ops_reject_bad_input_with_named_argument():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="model_pred: expected float32, bfloat16 or float16"):
        ops.triton_sample_errors(x.double(), x, None)
    with pytest.raises(ValueError, match="target: expected the shape of model_pred"):
        ops.triton_sample_errors(x, x[:2], None)
    with pytest.raises(ValueError, match="ref_err: expected shape"):
        ops.triton_pair_loss(torch.ones(4), torch.ones(3), None, 2, 0, 1.0)
    with pytest.raises(ValueError, match="model_err: expected shape"):
        ops.triton_pair_loss(torch.ones(3), torch.ones(3), None, 2, 0, 1.0)
    with pytest.raises(ValueError, match="method"):
        ops.triton_pair_loss(torch.ones(4), torch.ones(4), None, 3, 0, 1.0)
    with pytest.raises(ValueError, match="loss_type"):
        ops.triton_pair_loss(torch.ones(4), torch.ones(4), None, 2, 7, 1.0)
    with pytest.raises(ValueError, match="weights: expected shape"):
        ops.triton_pair_loss(torch.ones(4), torch.ones(4), torch.ones(3, 3), 2, 0, 1.0)
    with pytest.raises(ValueError, match="coef: expected shape"):
        ops.triton_error_grad(torch.ones(3), x, x)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="model_pred: the triton backend runs CUDA tensors"):
        ops.triton_sample_errors(torch.randn(2, 3), torch.randn(2, 3), None)


# ----------------------------------------------------------------- torch.compile


def test_compiled_training_step_fullgraph_matches_eager():
    """torch.compile(fullgraph=True, inductor) of a step that calls the triton loss: no graph
    break (fullgraph raises on one), and the loss, metrics and parameter gradients of eager.
    On the CPU inductor runs the surrounding graph as C++ and calls the ops, which run
    in the interpreter."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(4, 4, 3, padding=1)
    x, target = torch.randn(2, 6, 4, 6, 5).unbind(0)
    ref = target + 0.1 * torch.randn_like(target)
    emb = torch.randn(6, 8)

    def forward(x, target, ref):
        pred = model(x)
        loss, metrics = rpo_fast.diffusion_rpo_loss(
            pred, target, ref, emb_w=emb[:3], emb_l=emb[3:], beta=TEST_BETA, backend="triton", return_metrics=True
        )
        return loss, metrics["implicit_acc"], metrics["reward_margin"]

    def step(fn):
        model.zero_grad()
        out = fn(x, target, ref)
        out[0].backward()
        return out, [p.grad.clone() for p in model.parameters()]

    compiled_out, compiled_grads = step(torch.compile(forward, fullgraph=True))
    eager_out, eager_grads = step(forward)
    for got, want in zip(compiled_out, eager_out):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.weight)


# ----------------------------------------------------------------- GPU code, without a GPU


def test_every_kernel_compiles_for_hopper_with_vector_loads():
    """The interpreter accepts code that the GPU compiler rejects: lower every kernel variant
    to PTX for sm_90 (no GPU needed) in a process without TRITON_INTERPRET, and check the
    streaming kernels' 128-bit loads (kernels/compile_check.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "rpo_fast.kernels.compile_check", "--arch", "90", "--quiet"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kernel variants compiled for sm_90" in done.stdout


# ----------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_parity_at_sdxl_shape(dtype, layout):
    inputs = make_inputs(16, (4, 128, 128), dtype, "cuda", with_embeddings=True, layout=layout)
    loss, metrics, grad = run_loss("rpo", "triton", inputs, beta=2500.0)
    cpu_inputs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ref_loss, ref_metrics, ref_grad = reference_in_float64("rpo", cpu_inputs, beta=2500.0)
    cond = Conditioning("rpo", cpu_inputs, "sigmoid", 2500.0)
    assert_within(loss.cpu(), ref_loss, cond.loss_atol, 1e-5, "loss")
    assert_within(metrics["model_mse"].cpu(), ref_metrics["model_mse"], 0.0, 1e-5, "model_mse")
    assert_within(grad.cpu(), ref_grad, cond.grad_atol + GRAD_ATOL[dtype], max(1e-5, GRAD_RTOL[dtype]), "grad")


@pytest.mark.gpu
def test_gpu_compiled_step_matches_eager():
    model = torch.nn.Conv2d(4, 4, 3, padding=1).cuda()
    x, target = torch.randn(2, 8, 4, 64, 64, device="cuda").unbind(0)

    def forward(x, target):
        return rpo_fast.diffusion_rpo_loss(model(x), target, target + 0.1, beta=TEST_BETA, backend="triton")

    compiled = torch.compile(forward, fullgraph=True)(x, target)
    torch.testing.assert_close(compiled, forward(x, target), rtol=1e-5, atol=1e-6)
