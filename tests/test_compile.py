"""torch.compile(fullgraph=True) of a training step that calls the C++ ``cpu`` backend.

fullgraph=True raises on any graph break, so compiling at all shows that the custom ops
(their fake kernels and autograd, rpo_fast/fake_kernels.py) trace. The compiled function is the
forward (model and loss); AOTAutograd compiles its backward with it, which ``backward()``
then runs: the loss, a metric and the parameter gradients must equal eager's.
"""

from __future__ import annotations

import pytest
import torch

import rpo_fast

from parity_utils import TEST_BETA, assert_compiled_step_matches_eager, torch_threads


class TinyDenoiser(torch.nn.Module):
    """Two convolutions: enough to give model_pred a real autograd graph upstream."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.nn.functional.silu(self.conv1(x)))


def _loss(method, pred, target, ref, emb, dtype):
    pred = pred.to(dtype)
    if method == "sft":
        return rpo_fast.sft_loss(pred, target, backend="cpu"), pred.new_zeros((), dtype=torch.float32)
    if method == "dpo":
        loss, metrics = rpo_fast.diffusion_dpo_loss(
            pred, target, ref, beta=TEST_BETA, backend="cpu", return_metrics=True
        )
        return loss, metrics["reward_margin"]
    pairs = pred.shape[0] // 2
    loss, metrics = rpo_fast.diffusion_rpo_loss(
        pred, target, ref, emb_w=emb[:pairs], emb_l=emb[pairs:], beta=TEST_BETA, backend="cpu", return_metrics=True
    )
    return loss, metrics["reward_margin"]


@pytest.mark.parametrize(
    "method,dtype",
    [("rpo", torch.float32), ("dpo", torch.float32), ("sft", torch.float32), ("rpo", torch.bfloat16)],
    ids=["rpo", "dpo", "sft", "rpo-bf16-pred"],
)
def test_compiled_training_step_fullgraph_matches_eager(method, dtype):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyDenoiser()
    x, target = torch.randn(2, 6, 4, 6, 5).unbind(0)
    ref = (target + 0.3 * torch.randn_like(target)).to(dtype)
    emb = torch.randn(6, 8)

    def forward(x, target, ref):
        return _loss(method, model(x), target, ref, emb, dtype)

    def run(fn):
        model.zero_grad()
        loss, margin = fn(x, target, ref)
        loss.backward()  # runs the backward graph that AOTAutograd compiled with the forward
        return (loss.detach(), margin), [p.grad.clone() for p in model.parameters()]

    compiled_out, compiled_grads = run(torch.compile(forward, fullgraph=True))
    eager_out, eager_grads = run(forward)
    assert compiled_out[0].isfinite() and compiled_out[0] > 0
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for got, want in zip(compiled_out, eager_out):
        torch.testing.assert_close(got, want, **tol)
    for got, want in zip(compiled_grads, eager_grads):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, want, **tol)


def test_compiled_step_with_channels_last_prediction():
    """The gradient of a channels_last prediction keeps its strides in the compiled graph
    (the fake kernel's empty_like promise) and equals eager's."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = TinyDenoiser().to(memory_format=torch.channels_last)
    x = torch.randn(4, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    target = torch.randn(4, 4, 6, 5)
    ref = target + 0.3 * torch.randn_like(target)

    def forward(x):
        pred = model(x).contiguous(memory_format=torch.channels_last)
        return rpo_fast.diffusion_rpo_loss(pred, target, ref, beta=TEST_BETA, backend="cpu")

    assert_compiled_step_matches_eager(model, forward, x)


@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
def test_compiled_graphs_call_the_fused_ops(method):
    """The forward graph calls fused_loss (the stages chained in one op), the backward graph
    error_grad (the one gradient path of every method): the kernels run inside the compiled
    step, not beside it."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    torch._dynamo.reset()
    graphs = {}

    def recording_backend(gm, example_inputs):
        def keep(kind):
            def compiler(graph, _):
                graphs[kind] = graph.code
                return make_boxed_func(graph.forward)

            return compiler

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward"))

    model = TinyDenoiser()
    x, target, ref = torch.randn(3, 8, 4, 6, 5).unbind(0)

    def forward(x):
        if method == "sft":
            return rpo_fast.sft_loss(model(x), target, backend="cpu")
        loss_fn = rpo_fast.diffusion_rpo_loss if method == "rpo" else rpo_fast.diffusion_dpo_loss
        return loss_fn(model(x), target, ref, beta=TEST_BETA, backend="cpu")

    with torch_threads(2):
        torch.compile(forward, fullgraph=True, backend=recording_backend)(x).backward()
    assert "rpo_fast.fused_loss" in graphs["forward"], graphs["forward"]
    assert "rpo_fast.error_grad" in graphs["backward"], graphs["backward"]
    assert model.conv1.weight.grad is not None
