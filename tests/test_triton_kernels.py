"""What only the ``triton`` backend has (kernels/triton_loss.py): its launch grids, the
lowering of every kernel variant to PTX, a compiled step on its ops, and the SDXL-sized GPU
runs (marked ``gpu``). The parity with the reference that every backend shares is
tests/test_parity.py. On the CPU the kernels run in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1 before triton is imported), so shapes stay small.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rpo_fast
from rpo_fast.kernels import triton_loss

from parity_utils import (
    ERROR_ROUNDINGS,
    TEST_BETA,
    UNIT_ROUNDOFF,
    assert_within,
    errors64,
)

ops = torch.ops.rpo_fast
# ----------------------------------------------------------------- launch grids


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
def test_looping_programs_on_any_layout(make, monkeypatch):
    """A grid of about 8 programs, so that each program loops over several blocks and a
    sample spans several chunks, as at SDXL size on a GPU (tests/test_parity.py runs the
    default grid)."""
    monkeypatch.setattr(triton_loss, "STREAM_TARGET_PROGRAMS", 8)
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


def test_ops_assert_what_their_kernels_rely_on(monkeypatch):
    """Users' arguments are checked by rpo_fast/validation.py; called directly, an op still
    refuses what its kernels cannot read (a RuntimeError from torch._check)."""
    x = torch.randn(4, 3)
    bad_calls = [
        lambda: ops.triton_sample_errors(x.double(), x, None),
        lambda: ops.triton_sample_errors(x, x[:2], None),
        lambda: ops.triton_pair_loss(torch.ones(4), torch.ones(3), None, 2, 0, 1.0, 1.0),
        lambda: ops.triton_pair_loss(torch.ones(3), torch.ones(3), None, 2, 0, 1.0, 1.0),
        lambda: ops.triton_pair_loss(torch.ones(4), torch.ones(4), None, 3, 0, 1.0, 1.0),
        lambda: ops.triton_pair_loss(torch.ones(4), torch.ones(4), torch.ones(3, 3), 2, 0, 1.0, 1.0),
        lambda: ops.triton_pair_loss(torch.ones(4), torch.ones(4), None, 2, 0, 1.0, 0.0),
        lambda: ops.triton_error_grad(torch.ones(3), x, x),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError, match="rpo_fast::triton"):
            call()
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        ops.triton_sample_errors(x, x, None)


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
    streaming kernels' 128-bit loads (tests/triton_compile_check.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("triton_compile_check.py")), "--arch", "90", "--quiet"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "kernel variants compiled for sm_90" in done.stdout


# ----------------------------------------------------------------- on a real GPU


@pytest.mark.gpu
def test_gpu_compiled_step_matches_eager():
    model = torch.nn.Conv2d(4, 4, 3, padding=1).cuda()
    x, target = torch.randn(2, 8, 4, 64, 64, device="cuda").unbind(0)

    def forward(x, target):
        return rpo_fast.diffusion_rpo_loss(model(x), target, target + 0.1, beta=TEST_BETA, backend="triton")

    compiled = torch.compile(forward, fullgraph=True)(x, target)
    torch.testing.assert_close(compiled, forward(x, target), rtol=1e-5, atol=1e-6)
