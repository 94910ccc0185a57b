"""What only the ``cuda`` backend has: the CUDA ops of ``rpo_fast._C`` (csrc/cuda/) at SDXL
size against the cpu backend, misaligned (scalar-load) inputs, its chunk size, a pair stage
larger than one block, and a compiled step. The parity with the reference that every backend
shares is tests/test_parity.py, which runs on CUDA where a device is present.

All marked ``gpu``: they run where a CUDA device is present (``make test-gpu``) and are
skipped elsewhere (tests/conftest.py); on machines without one the CUDA sources are still
compiled by the build. Tolerances: tests/parity_utils.py.
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
    check_pair_stage,
    ERROR_ROUNDINGS,
    UNIT_ROUNDOFF,
    assert_within,
    errors64,
)

pytestmark = pytest.mark.gpu
ops = torch.ops.rpo_fast


def test_cuda_backend_is_available():
    assert "cuda" in rpo_fast.available_backends(), "rpo_fast._C was built without its CUDA part"


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


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("method,with_weights", PAIR_STAGE_CASES, ids=PAIR_STAGE_IDS)
def test_pair_loss_stage_with_more_rows_than_threads(method, with_weights, loss_type):
    """M = 600: more rows than the 512 threads of the block (test_parity.py: M up to 100)."""
    pairs = 600
    check_pair_stage(ops.pair_loss, method, with_weights, loss_type, pairs, device="cuda")


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
