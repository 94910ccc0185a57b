"""What only the ``cpu`` backend has (the C++ ops of ``rpo_fast._C`` on CPU tensors, csrc/):
instruction sets, threads, streaming stores, the bf16 even/odd path, the similarity-weights
kernel and fused_loss against its stages. The parity with the reference that every backend
shares is tests/test_parity.py; tolerances are explained in tests/parity_utils.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rpo_fast

from parity_utils import (
    FUSED_CASES,
    FUSED_IDS,
    GRAD_RTOL,
    SMALL,
    UNIT_ROUNDOFF,
    assert_within,
    check_fused_matches_stages,
    check_parity,
    check_similarity_weights,
    check_similarity_weights_edge_rows,
    errors64,
    make_inputs,
    torch_threads,
)

ops = torch.ops.rpo_fast


def test_extension_is_built_with_vector_kernels():
    """The cpu backend exists, and on an x86 machine with AVX2 or AVX-512 it runs the
    kernels compiled for it, not the scalar fallback."""
    assert "cpu" in rpo_fast.available_backends(), rpo_fast._extension.unavailable_reason()
    isa = ops.cpu_isa()
    assert isa in ("default", "avx2", "avx512")
    capability = torch.backends.cpu.get_cpu_capability()
    assert isa == {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "default")


# ----------------------------------------------------------------- the CPU kernels' own paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_error_grad_on_large_batches(dtype):
    """Large enough (48 MiB touched in fp32) that error_grad streams its stores past the
    cache on machines with an L3 of up to 96 MiB; D = 2^20 + 5 puts later samples off the
    vector alignment, so the aligning head and the tail run too."""
    gen = torch.Generator().manual_seed(5)
    shape = (4, (1 << 20) + 5)
    pred, target = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    coef = torch.randn(shape[0], generator=gen)
    grad = ops.error_grad(coef, pred, target)
    expected = (coef.double()[:, None] * 2 * (pred.double() - target.double()) / shape[1]).to(dtype)
    rtol = 4 * UNIT_ROUNDOFF if dtype == torch.float32 else 2 * GRAD_RTOL[dtype]
    assert_within(grad, expected, 0.0, rtol, "grad")


def test_sample_errors_are_thread_independent():
    pred, target = torch.randn(2, 6, 4, 3, 3000).unbind(0)  # 36000 elements: 3 chunks a sample
    first = ops.sample_errors(pred, target, None)
    with torch_threads(1):
        single = ops.sample_errors(pred, target, None)
    assert torch.equal(first[0], single[0])  # a fixed summation order, whatever the threads


def test_sums_stay_accurate_on_large_samples():
    """A float32 running sum over 2^20 elements would be off by ~1e-4 relative; the kernels'
    short float blocks summed in double stay at the float32 rounding of the result."""
    gen = torch.Generator().manual_seed(3)
    pred = 1.0 + 0.01 * torch.randn(2, 1 << 20, generator=gen)
    target = torch.zeros(2, 1 << 20)
    model_err, _ = ops.sample_errors(pred, target, None)
    assert_within(model_err, errors64(pred, target), 0.0, 2 * UNIT_ROUNDOFF, "model_err")


def test_forced_instruction_sets_match(tmp_path):
    """The AVX2 and scalar builds of the kernels (picked with ATEN_CPU_CAPABILITY) give the
    results of the float64 reference too (and the bf16 gradient torch's rounding, bit for
    bit); on this machine they otherwise never run."""
    script = tmp_path / "check.py"
    script.write_text(
        "import sys, torch, rpo_fast\n"
        "ops = torch.ops.rpo_fast\n"
        "print(ops.cpu_isa())\n"
        "g = torch.Generator().manual_seed(4)\n"
        "for dtype in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    p, t, r = (torch.randn(4, 3, 101, 109, generator=g).to(dtype) for _ in range(3))\n"
        "    e, re = ops.sample_errors(p, t, r)\n"
        "    want = lambda a: (a.double() - t.double()).pow(2).flatten(1).mean(1)\n"
        "    assert torch.allclose(e.double(), want(p), rtol=2.4e-7, atol=0), (dtype, e, want(p))\n"
        "    assert torch.allclose(re.double(), want(r), rtol=2.4e-7, atol=0), dtype\n"
        "    c = torch.randn(4, generator=g)\n"
        "    grad = ops.error_grad(c, p, t)\n"
        "    exp = (c.double().view(-1, 1, 1, 1) * 2 * (p.double() - t.double()) / p[0].numel())\n"
        "    tol = {torch.float32: 5e-7, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]\n"
        "    assert torch.allclose(grad.double(), exp, rtol=tol, atol=1e-7), dtype\n"
        "    if dtype == torch.bfloat16:  # the even/odd path rounds exactly as torch does\n"
        "        s = (c.double() * 2.0 / p[0].numel()).float().view(-1, 1, 1, 1)\n"
        "        assert torch.equal(grad, ((p.float() - t.float()) * s).to(dtype))\n"
        "w, l = torch.randn(2, 5, 37, generator=g)\n"
        "want = torch.softmax(torch.nn.functional.normalize(w.double(), dim=-1) @ torch.nn.functional.normalize(l.double(), dim=-1).T / 0.5, -1)\n"
        "assert torch.allclose(ops.similarity_weights(w, l, 0.5).double(), want, rtol=1e-5, atol=1e-7)\n"
        "print('ok')\n"
    )
    supported = {"AVX512": ["default", "avx2", "avx512"], "AVX2": ["default", "avx2"]}.get(
        torch.backends.cpu.get_cpu_capability(), ["default"]
    )
    for isa in ("default", "avx2"):
        if isa not in supported:
            continue
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert done.stdout.split() == [isa, "ok"], done.stdout


@pytest.mark.parametrize("shape", [(2, 77), (4, 3, 101, 109)], ids=["2x77", "4x3x101x109"])
def test_bfloat16_gradient_rounds_like_torch(shape):
    """All-bfloat16 inputs take the even/odd path (csrc/cpu/kernels_impl.h): the gradient
    must be bit for bit the float32 arithmetic rounded as tensor.to(bfloat16) rounds, with
    ties, values that round up into the next binade, NaN and infinities among the inputs."""
    gen = torch.Generator().manual_seed(6)
    pred, target = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(2))
    flat = pred.view(-1)
    flat[5], flat[40], flat[70] = float("nan"), float("inf"), -float("inf")
    coef = torch.randn(shape[0], generator=gen)
    d = pred[0].numel()
    scale = (coef.double() * 2.0 / d).float()  # the kernel's per-sample scale, rounded once
    view = (-1,) + (1,) * (len(shape) - 1)
    expected = ((pred.float() - target.float()) * scale.view(view)).to(torch.bfloat16)
    grad = ops.error_grad(coef, pred, target)
    assert torch.equal(grad.isnan(), expected.isnan())
    assert torch.equal(grad.nan_to_num(), expected.nan_to_num())


# ----------------------------------------------------------------- similarity weights, fused op


@pytest.mark.parametrize("width", [5, 33, 768])
@pytest.mark.parametrize("pairs", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_similarity_weights_op(pairs, width, dtype):
    check_similarity_weights(ops.similarity_weights, pairs, width, dtype)


@pytest.mark.parametrize("embedding_dtype", [torch.float64, torch.float16], ids=str)
def test_embeddings_in_another_dtype_than_the_predictions(embedding_dtype):
    """float32 predictions with float64 (or fp16) embeddings and explicit weights: the cpu
    backend takes them, and gives the reference's loss and gradient."""
    inputs = make_inputs(3, SMALL, with_embeddings=True)
    inputs["emb_w"], inputs["emb_l"] = inputs["emb_w"].to(embedding_dtype), inputs["emb_l"].to(embedding_dtype)
    check_parity("rpo", inputs, backend="cpu")
    inputs = make_inputs(3, SMALL, with_weights=True)
    inputs["weights"] = inputs["weights"].to(embedding_dtype)
    check_parity("rpo", inputs, backend="cpu")


def test_similarity_weights_aten_version():
    """The ATen version that CUDA and Meta tensors run (csrc/fused.cpp), called here on CPU
    tensors by dispatching past the CPU kernel."""
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def aten_version(emb_w, emb_l, tau):
        return ops.similarity_weights.default.redispatch(composite, emb_w, emb_l, tau)

    check_similarity_weights(aten_version, 33, 768, torch.float32)
    check_similarity_weights_edge_rows(aten_version)
    meta = ops.similarity_weights(torch.empty(4, 8, device="meta"), torch.empty(4, 8, device="meta"), 0.5)
    assert meta.shape == (4, 4) and meta.dtype == torch.float32


def test_similarity_weights_edge_rows():
    check_similarity_weights_edge_rows(ops.similarity_weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,weights,use_ref_err", FUSED_CASES, ids=FUSED_IDS)
def test_fused_loss_is_the_stages_chained(method, weights, use_ref_err, dtype):
    check_fused_matches_stages(method, weights, use_ref_err, dtype)


# ----------------------------------------------------------------- the pair stage



def test_pair_loss_is_thread_independent():
    gen = torch.Generator().manual_seed(9)
    model_err, ref_err = torch.rand(2, 600, generator=gen)
    weights = torch.rand(300, 300, generator=gen)
    first = ops.pair_loss(model_err, ref_err, weights, 2, 0, 2500.0, 1.0)
    with torch_threads(1):
        single = ops.pair_loss(model_err, ref_err, weights, 2, 0, 2500.0, 1.0)
    for a, b in zip(first, single):
        assert torch.equal(a, b)


# ----------------------------------------------------------------- internal asserts


def test_ops_assert_what_their_kernels_rely_on():
    """Users' arguments are checked by rpo_fast/validation.py (tests/test_checks.py); called
    directly, an op still refuses what would make its kernel read the wrong memory."""
    x = torch.randn(4, 3)
    bad_calls = [
        lambda: ops.sample_errors(x.double(), x, None),
        lambda: ops.sample_errors(x, x.int(), None),
        lambda: ops.sample_errors(x, x[:2], None),
        lambda: ops.sample_errors(x, x, x[:, :2]),
        lambda: ops.error_grad(torch.ones(3), x, x),
        lambda: ops.error_grad(torch.ones(4, dtype=torch.float64), x, x),
        lambda: ops.pair_loss(torch.ones(4), torch.ones(3), None, 2, 0, 1.0, 1.0),
        lambda: ops.pair_loss(torch.ones(3), torch.ones(3), None, 2, 0, 1.0, 1.0),
        lambda: ops.pair_loss(torch.ones(4), torch.ones(4), None, 3, 0, 1.0, 1.0),
        lambda: ops.pair_loss(torch.ones(4), torch.ones(4), torch.ones(3, 3), 2, 0, 1.0, 1.0),
        lambda: ops.pair_loss(torch.ones(4), torch.ones(4), None, 2, 0, 1.0, 0.0),
        lambda: ops.similarity_weights(torch.randn(2, 5), torch.randn(1, 5), 0.5),
        lambda: ops.fused_loss(x, x, x, torch.ones(4), None, None, None, 2, 0, 1.0, 0.5, 1.0),
    ]
    for call in bad_calls:
        with pytest.raises(RuntimeError, match=r"rpo_fast::.*\(internal check failed\)"):
            call()
