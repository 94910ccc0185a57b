"""Parity tests of the ``cuda`` backend: the CUDA ops of ``rpo_fast._C`` (csrc/cuda/).

All marked ``gpu``: they run where a CUDA device is present (``make test-gpu``) and are
skipped elsewhere (tests/conftest.py); on machines without one the CUDA sources are still
compiled by the build. Checks and tolerances are those of the CPU kernels
(tests/parity_utils.py explains them); the pair-stage arithmetic is
the same header (csrc/rpo_math.h) on both.
"""

from __future__ import annotations

import pytest
import torch

import rpo_fast
from rpo_fast._types import LOSS_TYPES

from parity_utils import (
    FUSED_CASES,
    FUSED_IDS,
    assert_compiled_step_matches_eager,
    check_fused_matches_stages,
    check_similarity_weights,
    check_similarity_weights_edge_rows,
    PAIR_STAGE_CASES,
    PAIR_STAGE_IDS,
    check_hinge_slope_at_the_kink,
    check_non_finite_pair_stage,
    check_pair_stage,
    check_sigmoid_stable_for_large_logits,
    check_parity,
    ERROR_ROUNDINGS,
    SD_LIKE,
    SMALL,
    UNIT_ROUNDOFF,
    assert_within,
    errors64,
    make_inputs,
    run_loss,
)

pytestmark = pytest.mark.gpu
ops = torch.ops.rpo_fast


def _cuda(inputs):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def test_cuda_backend_is_available():
    assert "cuda" in rpo_fast.available_backends(), "rpo_fast._C was built without its CUDA part"


@pytest.mark.parametrize("pairs", [1, 2, 3, 8, 33])
@pytest.mark.parametrize(
    "method,loss_type", [(m, lt) for m in ("rpo", "dpo") for lt in LOSS_TYPES] + [("sft", "sigmoid")]
)
def test_parity_every_method_and_loss_type(method, loss_type, pairs):
    inputs = _cuda(make_inputs(pairs, SMALL, seed=pairs, with_embeddings=method == "rpo"))
    check_parity(method, inputs, backend="cuda", loss_type=loss_type)


@pytest.mark.parametrize("use_ref_err", [False, True], ids=["ref_pred", "ref_err"])
@pytest.mark.parametrize("weights", ["embeddings", "explicit", "uniform"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_parity_rpo_weights_and_reference_kinds(weights, use_ref_err, loss_type):
    inputs = make_inputs(8, SMALL, seed=18, with_embeddings=weights == "embeddings", with_weights=weights == "explicit")
    check_parity("rpo", _cuda(inputs), backend="cuda", use_ref_err=use_ref_err, loss_type=loss_type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
def test_parity_layouts_and_dtypes(method, layout, dtype):
    inputs = make_inputs(3, SMALL, dtype, "cuda", seed=5, with_embeddings=method == "rpo", layout=layout)
    _, _, grad = check_parity(method, inputs, backend="cuda")
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)


def test_parity_mixed_dtypes():
    inputs = make_inputs(3, SD_LIKE, seed=6, with_weights=True)
    for name, dtype in zip(("model_pred", "target", "ref_pred"), (torch.bfloat16, torch.float32, torch.float16)):
        inputs[name] = inputs[name].to(dtype)
    check_parity("rpo", _cuda(inputs), backend="cuda", loss_type="hinge", beta=25.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sdxl_shape_matches_the_cpu_backend(dtype, layout):
    """SDXL latents, M = 16, training beta: the two C++ backends agree."""
    inputs = make_inputs(16, (4, 128, 128), dtype, "cuda", with_embeddings=True, layout=layout)
    loss, metrics, grad = run_loss("rpo", "cuda", inputs, beta=2500.0)
    cpu_inputs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    cpu_loss, cpu_metrics, cpu_grad = run_loss("rpo", "cpu", cpu_inputs, beta=2500.0)
    assert_within(loss.cpu(), cpu_loss, 0.0, 1e-4, "loss")
    for name in metrics:
        assert_within(metrics[name].cpu(), cpu_metrics[name], 1e-6, 1e-4, name)
    rtol = 1e-4 if dtype == torch.float32 else 2.0**-7
    assert_within(grad.cpu(), cpu_grad, 1e-4 * float(cpu_grad.abs().max()), rtol, "grad")


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,
        lambda x: x.contiguous(memory_format=torch.channels_last),
        lambda x: x[..., ::2],
        lambda x: x[::2],
        lambda x: x.transpose(0, 1).contiguous().transpose(0, 1),
        lambda x: x[:1].expand(x.shape),  # batch stride 0
        lambda x: torch.cat([x.new_zeros(1), x.flatten()])[1:].view(x.shape),  # misaligned: scalar loads
    ],
    ids=["contiguous", "channels_last", "sliced", "batch_strided", "batch_inner", "expanded", "misaligned"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sample_errors_and_error_grad_on_any_layout(make, dtype):
    gen = torch.Generator().manual_seed(1)
    full = (8, 4, 24, 48)
    target, ref, pred = (make(torch.randn(full, generator=gen).to(dtype).cuda()) for _ in range(3))
    model_err, ref_err = ops.sample_errors(pred, target, ref)
    assert_within(model_err.cpu(), errors64(pred.cpu(), target.cpu()), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")
    assert_within(ref_err.cpu(), errors64(ref.cpu(), target.cpu()), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "ref_err")
    coef = torch.randn(pred.shape[0], generator=gen)
    grad = ops.error_grad(coef.cuda(), pred, target)
    expected = coef.double().view(-1, 1, 1, 1) * 2 * (pred.cpu().double() - target.cpu().double()) / pred[0].numel()
    assert grad.shape == pred.shape and grad.stride() == torch.empty_like(pred).stride()
    rtol = 4 * UNIT_ROUNDOFF if dtype == torch.float32 else 2.0**-8
    assert_within(grad.cpu(), expected, 0.0, rtol, "grad")


@pytest.mark.parametrize("shape", [(2, 1), (2, 31), (2, 8191), (2, 8193), (4, 3, 101, 109)], ids=str)
def test_tails_and_chunks(shape):
    gen = torch.Generator().manual_seed(2)
    pred, target = (torch.randn(shape, generator=gen) for _ in range(2))
    model_err, ref_err = ops.sample_errors(pred.cuda(), target.cuda(), None)
    assert ref_err.shape == (0,)
    assert_within(model_err.cpu(), errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")
    again, _ = ops.sample_errors(pred.cuda(), target.cuda(), None)
    assert torch.equal(model_err, again)  # no atomics: the same bits every run


@pytest.mark.parametrize("pairs", [1, 5, 100, 600])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("method,with_weights", PAIR_STAGE_CASES, ids=PAIR_STAGE_IDS)
def test_pair_loss_stage(method, with_weights, loss_type, pairs):
    """M = 600: more rows than threads in the block."""
    check_pair_stage(ops.pair_loss, method, with_weights, loss_type, pairs, device="cuda")


def test_hinge_slope_is_zero_at_the_kink():
    check_hinge_slope_at_the_kink(ops.pair_loss, device="cuda")


def test_sigmoid_loss_is_stable_for_large_logits():
    check_sigmoid_stable_for_large_logits(ops.pair_loss, device="cuda")


def test_non_finite_inputs_give_nan_loss_and_coef():
    check_non_finite_pair_stage(ops.pair_loss, device="cuda")


def test_compiled_step_on_cuda():
    torch._dynamo.reset()
    model = torch.nn.Conv2d(4, 4, 3, padding=1).cuda()
    x, target = torch.randn(2, 6, 4, 8, 8, device="cuda").unbind(0)
    ref = target + 0.1 * torch.randn_like(target)

    def forward(x):
        return rpo_fast.diffusion_rpo_loss(model(x), target, ref, beta=100.0, backend="cuda")

    assert_compiled_step_matches_eager(model, forward, x)


# ----------------------------------------------------------------- similarity weights, fused op


@pytest.mark.parametrize("pairs", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_similarity_weights_op(pairs, dtype):
    check_similarity_weights(ops.similarity_weights, pairs, 768, dtype, device="cuda")
    check_similarity_weights_edge_rows(ops.similarity_weights, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,weights,use_ref_err", FUSED_CASES, ids=FUSED_IDS)
def test_fused_loss_is_the_stages_chained(method, weights, use_ref_err, dtype):
    check_fused_matches_stages(method, weights, use_ref_err, dtype, device="cuda")
