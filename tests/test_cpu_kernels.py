"""Parity tests of the ``cpu`` backend: the C++ ops of ``rpo_fast._C`` (csrc/).

Every case compares the loss, the metrics and d loss / d model_pred with the ``torch``
reference evaluated in float64 (``parity_utils.reference_in_float64``), to the tolerances
that tests/parity_utils.py explains.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rpo_fast
from rpo_fast._types import LOSS_TYPES, loss_type_code, method_code

import parity_utils
from parity_utils import (
    FUSED_CASES,
    FUSED_IDS,
    check_fused_matches_stages,
    check_nan_prediction_gives_nan_loss,
    check_similarity_weights,
    check_similarity_weights_edge_rows,
    torch_threads,
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
    assert_within,
    errors64,
    make_inputs,
    run_loss,
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


def check_parity(method, inputs, **kwargs):
    return parity_utils.check_parity(method, inputs, backend=kwargs.pop("backend", "cpu"), **kwargs)


# ----------------------------------------------------------------- end to end parity


@pytest.mark.parametrize("pairs", [1, 2, 3, 8, 33])
@pytest.mark.parametrize(
    "method,loss_type", [(m, lt) for m in ("rpo", "dpo") for lt in LOSS_TYPES] + [("sft", "sigmoid")]
)
def test_parity_every_method_and_loss_type(method, loss_type, pairs):
    inputs = make_inputs(pairs, SMALL, seed=pairs, with_embeddings=method == "rpo")
    check_parity(method, inputs, loss_type=loss_type)


@pytest.mark.parametrize("pairs", [3, 8])
@pytest.mark.parametrize("use_ref_err", [False, True], ids=["ref_pred", "ref_err"])
@pytest.mark.parametrize("weights", ["embeddings", "explicit", "uniform"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_parity_rpo_weights_and_reference_kinds(weights, use_ref_err, pairs, loss_type):
    inputs = make_inputs(
        pairs, SMALL, seed=10 + pairs, with_embeddings=weights == "embeddings", with_weights=weights == "explicit"
    )
    check_parity("rpo", inputs, use_ref_err=use_ref_err, loss_type=loss_type)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("use_ref_err", [False, True], ids=["ref_pred", "ref_err"])
def test_parity_dpo_reference_kinds(use_ref_err, loss_type):
    check_parity("dpo", make_inputs(8, SMALL, seed=3), use_ref_err=use_ref_err, loss_type=loss_type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
def test_parity_layouts_and_dtypes(method, layout, dtype):
    inputs = make_inputs(3, SMALL, dtype, seed=5, with_embeddings=method == "rpo", layout=layout)
    _, _, grad = check_parity(method, inputs)
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
def test_parity_mixed_dtypes(dtypes):
    """Each input read in its own dtype (model_pred, target, ref_pred)."""
    inputs = make_inputs(3, SMALL, seed=6, with_weights=True)
    for name, dtype in zip(("model_pred", "target", "ref_pred"), dtypes):
        inputs[name] = inputs[name].to(dtype)
    check_parity("rpo", inputs, loss_type="hinge")
    check_parity("dpo", inputs)


def test_parity_mixed_layouts():
    """channels_last prediction, contiguous target, sliced reference: the odd ones are
    brought into the prediction's layout; the gradient keeps it."""
    inputs = make_inputs(3, SMALL, seed=7, with_embeddings=True)
    inputs["model_pred"] = inputs["model_pred"].contiguous(memory_format=torch.channels_last)
    wide = torch.cat([inputs["ref_pred"], inputs["ref_pred"]], dim=-1)
    inputs["ref_pred"] = wide[..., : SMALL[-1]]
    assert not inputs["ref_pred"].is_contiguous()
    _, _, grad = check_parity("rpo", inputs)
    assert grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["rpo", "dpo", "sft"])
def test_parity_sd_like_shape(method, dtype):
    """D = 4x64x64: a sample spans several blocks (the float -> double hand-over)."""
    inputs = make_inputs(8, SD_LIKE, dtype, seed=8, with_embeddings=method == "rpo")
    check_parity(method, inputs, beta=TEST_BETA / 4)


# ----------------------------------------------------------------- the three ops one by one


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
def test_sample_errors_and_error_grad_on_any_layout(make):
    gen = torch.Generator().manual_seed(1)
    full = (8, 4, 24, 48)
    target, ref, pred = (make(torch.randn(full, generator=gen)) for _ in range(3))
    model_err, ref_err = ops.sample_errors(pred, target, ref)
    assert model_err.dtype == ref_err.dtype == torch.float32
    assert_within(model_err, errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")
    assert_within(ref_err, errors64(ref, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "ref_err")

    coef = torch.randn(pred.shape[0], generator=gen)
    grad = ops.error_grad(coef, pred, target)
    expected = coef.double().view(-1, 1, 1, 1) * 2 * (pred.double() - target.double()) / pred[0].numel()
    # the layout the fake kernel promises (torch.compile relies on it)
    assert grad.shape == pred.shape and grad.stride() == torch.empty_like(pred).stride()
    assert_within(grad, expected, 0.0, 4 * UNIT_ROUNDOFF, "grad")


@pytest.mark.parametrize(
    "shape",
    [(2, 1), (2, 31), (2, 33), (4, 1023), (2, 1025), (2, 3, 101, 109), (6, 16384), (2, 16385)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_vector_tails_blocks_and_chunks(shape, dtype):
    """Sizes around the vector step, the 1024-element block and the 16384-element chunk:
    every tail and hand-over path of the loops."""
    gen = torch.Generator().manual_seed(2)
    pred, target, ref = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    model_err, ref_err = ops.sample_errors(pred, target, ref)
    assert_within(model_err, errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")
    assert_within(ref_err, errors64(ref, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "ref_err")
    coef = torch.randn(shape[0], generator=gen)
    grad = ops.error_grad(coef, pred, target)
    view = (-1,) + (1,) * (len(shape) - 1)
    expected = (coef.double().view(view) * 2 * (pred.double() - target.double()) / pred[0].numel()).to(dtype)
    assert grad.dtype == dtype
    # the same float32 arithmetic, then one rounding to dtype: at most one ulp apart
    assert_within(grad, expected, GRAD_ATOL[dtype], 2 * GRAD_RTOL[dtype] if dtype != torch.float32 else 4 * UNIT_ROUNDOFF, "grad")


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


def test_sample_errors_without_reference_deterministic_and_thread_independent():
    pred, target = torch.randn(2, 6, 4, 3, 3000).unbind(0)  # 36000 elements: 3 chunks a sample
    first = ops.sample_errors(pred, target, None)
    assert first[1].shape == (0,)
    with torch_threads(1):
        single = ops.sample_errors(pred, target, None)
    assert torch.equal(first[0], single[0])  # a fixed summation order, whatever the threads
    assert_within(first[0], errors64(pred, target), 0.0, ERROR_ROUNDINGS * UNIT_ROUNDOFF, "model_err")


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
    check_parity("rpo", inputs)
    inputs = make_inputs(3, SMALL, with_weights=True)
    inputs["weights"] = inputs["weights"].to(embedding_dtype)
    check_parity("rpo", inputs)


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


def test_fused_loss_rejects_bad_input_with_named_argument():
    x, emb = torch.randn(4, 3), torch.randn(2, 5)
    with pytest.raises(ValueError, match="emb_w and emb_l together"):
        ops.fused_loss(x, x, x, None, emb, None, None, 2, 0, 1.0, 0.5)
    with pytest.raises(ValueError, match="embeddings or weights, not both"):
        ops.fused_loss(x, x, x, None, emb, emb, torch.ones(2, 2), 2, 0, 1.0, 0.5)
    with pytest.raises(ValueError, match="ref_pred or ref_err, not both"):
        ops.fused_loss(x, x, x, torch.ones(4), None, None, None, 2, 0, 1.0, 0.5)
    with pytest.raises(ValueError, match="emb_w and emb_l must both have shape"):
        ops.similarity_weights(emb, emb[:1], 0.5)
    with pytest.raises(ValueError, match="tau must be > 0"):
        ops.similarity_weights(emb, emb, 0.0)
    with pytest.raises(TypeError, match="emb_l must have a floating dtype, got Int"):
        ops.similarity_weights(emb, emb.int(), 0.5)


# --------------------------------- the gradient the fused forward writes (dpo and sft on CPU)


def _fused(method, pred, target, ref=None, ref_err=None, **kwargs):
    """fused_loss with sigmoid loss, no weights; kwargs: with_grad."""
    codes = (method_code(method), loss_type_code("sigmoid"), TEST_BETA)
    return ops.fused_loss(pred, target, ref, ref_err, None, None, None, *codes, 0.5, **kwargs)


def _staged(method, pred, target, ref=None, ref_err=None):
    """The stage ops: (loss, metrics, coef, gradient for dL = 1)."""
    model_err, ref_from_pred = ops.sample_errors(pred, target, ref)
    ref_errors = ref_err.float() if ref_err is not None else ref_from_pred
    loss, metrics, coef = ops.pair_loss(model_err, ref_errors, None, method_code(method), loss_type_code("sigmoid"),
                                        TEST_BETA)
    return loss, metrics, coef, ops.error_grad(coef, pred, target)


def _assert_same(got, want):
    for name, a, b in zip(("loss", "metrics", "coef", "grad"), got, want):
        assert a.shape == b.shape and a.stride() == b.stride(), name
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), name


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("pairs", [1, 2, 3, 8])
@pytest.mark.parametrize("method,reference", [("dpo", "ref_pred"), ("dpo", "ref_err"), ("sft", None)])
def test_forward_gradient_is_the_stages_bit_for_bit(method, reference, pairs, threads):
    """Pair by pair (at least two pairs a thread) or through the stages (fewer): the loss,
    metrics, coefficients and gradient of the stage ops, in fp32 and bf16, D = 252."""
    gen = torch.Generator().manual_seed(pairs)
    for dtype in (torch.float32, torch.bfloat16):
        pred, target, ref = (torch.randn((2 * pairs, *SMALL), generator=gen).to(dtype) for _ in range(3))
        ref_err = ops.sample_errors(ref, target, None)[0] if reference == "ref_err" else None
        ref = ref if reference == "ref_pred" else None
        with torch_threads(threads):
            got = _fused(method, pred, target, ref, ref_err, with_grad=True)
        _assert_same(got, _staged(method, pred, target, ref, ref_err))


@pytest.mark.parametrize("make", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_gradient_on_any_layout(make):
    """The gradient in the layout the fake kernel promises (empty_like), on every layout."""
    gen = torch.Generator().manual_seed(5)
    target, ref, pred = (make(torch.randn((8, 4, 24, 48), generator=gen)) for _ in range(3))
    with torch_threads(1):  # four pairs: pairwise
        got = _fused("dpo", pred, target, ref, with_grad=True)
    assert got[3].stride() == torch.empty_like(pred).stride()
    _assert_same(got, _staged("dpo", pred, target, ref))


def test_forward_gradient_of_a_non_finite_pair_is_nan_everywhere():
    """As the pair stage makes every coefficient NaN when one input is not finite."""
    pred, target, ref = torch.randn(3, 8, 4, 5, 6).unbind(0)
    pred[5, 1, 2, 3] = float("inf")
    with torch_threads(1):
        got = _fused("dpo", pred, target, ref, with_grad=True)
    assert got[0].isnan() and got[3].isnan().all()
    _assert_same(got, _staged("dpo", pred, target, ref))


def test_forward_writes_the_gradient_only_where_it_pays():
    """dpo and sft on CPU with a gradient wanted; not rpo (a second pass either way), not
    without grad."""
    pred, target, ref = torch.randn(3, 8, 4, 5, 6).unbind(0)
    leaf = pred.clone().requires_grad_(True)
    assert _fused("dpo", leaf, target, ref)[3].shape == leaf.shape
    assert _fused("sft", leaf, target)[3].shape == leaf.shape
    assert _fused("rpo", leaf, target, ref)[3].shape == (0,)
    with torch.no_grad():
        assert _fused("dpo", leaf, target, ref)[3].shape == (0,)
    assert _fused("dpo", pred, target, ref)[3].shape == (0,)


def test_backward_hands_on_the_forward_gradient_without_a_copy():
    """dL = 1: the buffer the forward wrote becomes the gradient; other dL: scaled in place."""
    pred, target, ref = torch.randn(3, 8, 4, 5, 6).unbind(0)
    for scale in (1.0, 0.25):
        leaf = pred.clone().requires_grad_(True)
        loss, _, coef, grad = _fused("dpo", leaf, target, ref)
        written_at = grad.data_ptr()
        del grad  # the caller's reference: the node then holds the only one
        (loss * scale).backward()
        assert leaf.grad.data_ptr() == written_at
        assert_within(leaf.grad, ops.error_grad(coef * scale, pred, target), 0.0, 2 * UNIT_ROUNDOFF, "grad")


@pytest.mark.parametrize("method", ["rpo", "dpo"])
def test_backward_with_retain_graph_and_after_the_graph_is_freed(method):
    """A kept graph gives the same gradient on every backward (the incoming gradient scaled
    in); once freed, another backward raises as torch does."""
    pred, target, ref = torch.randn(3, 8, 4, 5, 6).unbind(0)
    leaf = pred.clone().requires_grad_(True)
    loss, _, coef, _ = _fused(method, leaf, target, ref)
    (first,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (again,) = torch.autograd.grad(loss, leaf, retain_graph=True)
    (doubled,) = torch.autograd.grad(loss * 2.0, leaf)
    assert torch.equal(first, ops.error_grad(coef, pred, target)) and torch.equal(first, again)
    assert torch.equal(doubled, ops.error_grad(coef * 2.0, pred, target))  # doubling is exact
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(loss, leaf)


# ----------------------------------------------------------------- the pair stage



@pytest.mark.parametrize("pairs", [1, 5, 64, 100])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("method,with_weights", PAIR_STAGE_CASES, ids=PAIR_STAGE_IDS)
def test_pair_loss_stage_at_training_beta(method, with_weights, loss_type, pairs):
    check_pair_stage(ops.pair_loss, method, with_weights, loss_type, pairs)


def test_pair_loss_is_thread_independent():
    gen = torch.Generator().manual_seed(9)
    model_err, ref_err = torch.rand(2, 600, generator=gen)
    weights = torch.rand(300, 300, generator=gen)
    first = ops.pair_loss(model_err, ref_err, weights, 2, 0, 2500.0)
    with torch_threads(1):
        single = ops.pair_loss(model_err, ref_err, weights, 2, 0, 2500.0)
    for a, b in zip(first, single):
        assert torch.equal(a, b)


def test_hinge_slope_is_zero_at_the_kink():
    check_hinge_slope_at_the_kink(ops.pair_loss)


def test_sigmoid_loss_is_stable_for_large_logits():
    check_sigmoid_stable_for_large_logits(ops.pair_loss)


def test_non_finite_inputs_give_nan_loss_and_coef():
    check_non_finite_pair_stage(ops.pair_loss)
    inf_ref = torch.tensor([1.0, float("inf"), 3.0, 4.0])
    loss, _, coef = ops.pair_loss(torch.ones(4), inf_ref, None, 2, 1, 10.0)
    assert loss.isnan() and coef.isnan().all()
    model_err = torch.tensor([1.0, 2.0, 3.0, float("nan")])
    # sft has no finiteness rule: NaN flows through the mean, as in the reference.
    loss, metrics, coef = ops.pair_loss(model_err, torch.empty(0), None, 0, 0, 10.0)
    assert float(loss) == pytest.approx(1.5) and metrics[2].isnan() and torch.equal(coef, torch.tensor([0.5, 0.5, 0, 0]))
    check_nan_prediction_gives_nan_loss("cpu")


# ----------------------------------------------------------------- bad input


def test_ops_reject_bad_input_with_named_argument():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="model_pred must be float32, bfloat16 or float16, got Double"):
        ops.sample_errors(x.double(), x, None)
    with pytest.raises(TypeError, match="target must be float32, bfloat16 or float16, got Int"):
        ops.sample_errors(x, x.int(), None)
    with pytest.raises(TypeError, match="ref_pred must be float32, bfloat16 or float16, got Double"):
        ops.sample_errors(x, x, x.double())
    with pytest.raises(TypeError, match="model_pred must be float32, bfloat16 or float16, got Double"):
        ops.error_grad(torch.ones(4), x.double(), x)
    with pytest.raises(TypeError, match="coef must be float32"):
        ops.error_grad(torch.ones(4, dtype=torch.float64), x, x)
    with pytest.raises(ValueError, match="target must have the shape of model_pred"):
        ops.sample_errors(x, x[:2], None)
    with pytest.raises(ValueError, match="ref_pred must have the shape of model_pred"):
        ops.sample_errors(x, x, x[:, :2])
    with pytest.raises(ValueError, match="coef must have shape"):
        ops.error_grad(torch.ones(3), x, x)
    with pytest.raises(ValueError, match="ref_err must have shape"):
        ops.pair_loss(torch.ones(4), torch.ones(3), None, 2, 0, 1.0)
    with pytest.raises(ValueError, match="model_err must have shape"):
        ops.pair_loss(torch.ones(3), torch.ones(3), None, 2, 0, 1.0)
    with pytest.raises(TypeError, match="model_err must be float32"):
        ops.pair_loss(torch.ones(4, dtype=torch.float64), torch.ones(4), None, 2, 0, 1.0)
    with pytest.raises(ValueError, match="method must be"):
        ops.pair_loss(torch.ones(4), torch.ones(4), None, 3, 0, 1.0)
    with pytest.raises(ValueError, match="loss_type must be"):
        ops.pair_loss(torch.ones(4), torch.ones(4), None, 2, 7, 1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        ops.pair_loss(torch.ones(4), torch.ones(4), None, 2, 0, 0.0)
    with pytest.raises(ValueError, match="weights must have shape"):
        ops.pair_loss(torch.ones(4), torch.ones(4), torch.ones(3, 3), 2, 0, 1.0)
    with pytest.raises(TypeError, match="weights must be float32"):
        ops.pair_loss(torch.ones(4), torch.ones(4), torch.ones(2, 2, dtype=torch.float64), 2, 0, 1.0)


def test_float64_needs_the_torch_backend():
    inputs = make_inputs(2, SMALL, torch.float64)
    with pytest.raises(TypeError, match="backend: 'cpu' takes float32, bfloat16 or float16"):
        run_loss("rpo", "cpu", inputs)
