"""The first-use check of a fused backend (rpo_fast/verify.py), run on the CPU through the same
code path a CUDA call takes: the cpu backend probed as if it were on a GPU, and deliberately wrong
backends injected in its place (a wrong loss, a wrong gradient)."""

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import rpo_fast
from rpo_fast import dispatch, verify
from rpo_fast.dispatch import Backend

from parity_utils import SMALL, make_inputs


@pytest.fixture
def probed_on_cpu(monkeypatch):
    """CPU calls of a fused backend are probed, with a clean slate of decisions and backends."""
    monkeypatch.setattr(verify, "DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.delenv(verify.ENV, raising=False)
    saved = dict(dispatch._BACKENDS)
    verify.reset()
    dispatch._RESOLVED.clear()
    yield
    verify.reset()
    dispatch._RESOLVED.clear()
    dispatch._BACKENDS.clear()
    dispatch._BACKENDS.update(saved)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.01


def inject(fault: str) -> None:
    """The cpu backend replaced by one that is 1% off in its loss value only, or in its gradient only."""
    good = dispatch._make_backend("cpu")

    def fused_loss(inputs):
        if fault == "gradient":
            inputs = type(inputs)(**{**vars(inputs), "model_pred": _ScaleGradient.apply(inputs.model_pred)})
        loss, metrics = good.fused_loss(inputs)
        return (loss + 0.01 * loss.detach().abs() if fault == "loss" else loss), metrics

    dispatch._BACKENDS["cpu"] = Backend("cpu", good.sample_errors, good.pair_loss, good.similarity_weights, fused_loss)
    dispatch._RESOLVED.clear()


def rpo_call(inputs, **kwargs):
    pred = inputs["model_pred"].detach().clone().requires_grad_(True)
    loss = rpo_fast.diffusion_rpo_loss(pred, inputs["target"], inputs["ref_pred"], emb_w=inputs["emb_w"],
                                       emb_l=inputs["emb_l"], beta=100.0, **kwargs)
    (grad,) = torch.autograd.grad(loss, pred)
    return loss.detach(), grad


needs_kernels = pytest.mark.skipif("cpu" not in rpo_fast.available_backends(), reason="needs rpo_fast._C")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["sft", "dpo", "rpo"])
def test_a_right_backend_passes_its_probe_once_per_class_and_is_kept(probed_on_cpu, method, dtype, caplog):
    inputs = make_inputs(5, SMALL, dtype, with_embeddings=True)
    pred, target, ref = inputs["model_pred"], inputs["target"], inputs["ref_pred"]
    calls = {"sft": lambda: rpo_fast.sft_loss(pred, target, backend="cpu"),
             "dpo": lambda: rpo_fast.diffusion_dpo_loss(pred, target, ref, backend="cpu"),
             "rpo": lambda: rpo_fast.diffusion_rpo_loss(pred, target, ref, emb_w=inputs["emb_w"],
                                                        emb_l=inputs["emb_l"], backend="cpu")}
    with caplog.at_level(logging.WARNING, logger="rpo_fast"):
        first = calls[method]()
        assert list(verify._DECIDED.values()) == [True] and not verify._FAILED
        probed = dict(verify._DECIDED)
        assert torch.equal(calls[method](), first)
    assert verify._DECIDED == probed  # the second call of the class ran no probe
    assert "disagrees" not in caplog.text


@needs_kernels
@pytest.mark.parametrize("fault", ["loss", "gradient"])
def test_a_wrong_backend_is_caught_warned_once_and_replaced_by_the_reference(probed_on_cpu, fault, caplog):
    inputs = make_inputs(4, SMALL, with_embeddings=True)
    want_loss, want_grad = rpo_call(inputs, backend="torch")
    inject(fault)
    verify.DEVICE_TYPES.discard("cpu")  # unchecked: the fault shows
    wrong_loss, wrong_grad = rpo_call(inputs, backend="cpu")
    assert not torch.allclose(wrong_loss, want_loss) or not torch.allclose(wrong_grad, want_grad)
    verify.DEVICE_TYPES.add("cpu")
    with caplog.at_level(logging.WARNING, logger="rpo_fast"):
        for _ in range(2):
            loss, grad = rpo_call(inputs, backend="cpu")
            torch.testing.assert_close(loss, want_loss)
            torch.testing.assert_close(grad, want_grad)
        # another class of call on the same device: the reference too, with no second probe
        dpo = rpo_fast.diffusion_dpo_loss(inputs["model_pred"], inputs["target"], inputs["ref_pred"], backend="cpu")
    torch.testing.assert_close(dpo, rpo_fast.diffusion_dpo_loss(inputs["model_pred"], inputs["target"],
                                                                inputs["ref_pred"], backend="torch"))
    lines = [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0]
    what = "loss" if fault == "loss" else "gradient"
    assert f"'cpu' backend disagrees" in lines[0] and f": {what} off by" in lines[0]
    assert "float32" in lines[0] and "tolerance" in lines[0] and verify.ENV in lines[0] and "report" in lines[0]


@needs_kernels
def test_error_mode_raises_off_mode_skips_and_a_bad_mode_is_one_line(probed_on_cpu, monkeypatch):
    inputs = make_inputs(3, SMALL, with_embeddings=True)
    inject("gradient")
    monkeypatch.setenv(verify.ENV, "error")
    with pytest.raises(verify.BackendMismatch, match="gradient off by"):
        rpo_call(inputs, backend="cpu")
    verify.reset()
    monkeypatch.setenv(verify.ENV, "off")
    _, grad = rpo_call(inputs, backend="cpu")
    _, want = rpo_call(inputs, backend="torch")
    assert not torch.allclose(grad, want) and not verify._DECIDED  # no probe, the fault through
    monkeypatch.setenv(verify.ENV, "sometimes")
    with pytest.raises(ValueError, match=r"^RPO_FAST_VERIFY: expected one of warn, error, off, got 'sometimes'$"):
        rpo_call(inputs, backend="cpu")


@needs_kernels
def test_auto_is_probed_too_and_torch_is_never_probed(probed_on_cpu):
    inputs = make_inputs(3, SMALL, with_embeddings=True)
    rpo_call(inputs, backend="torch")
    assert not verify._DECIDED
    rpo_call(inputs)  # auto on CPU tensors: the cpu backend
    assert [c.backend for c in verify._DECIDED] == ["cpu"]


@needs_kernels
def test_the_check_runs_eagerly_and_the_compiled_step_follows_its_decision(probed_on_cpu):
    """fullgraph=True: the probe never enters the trace; a backend failed before compiling
    stays replaced inside the compiled step."""
    inputs = make_inputs(3, SMALL, with_embeddings=True)
    want_loss, _ = rpo_call(inputs, backend="torch")
    inject("loss")

    def step(pred):
        return rpo_fast.diffusion_rpo_loss(pred, inputs["target"], inputs["ref_pred"], emb_w=inputs["emb_w"],
                                           emb_l=inputs["emb_l"], beta=100.0, backend="cpu")

    torch.testing.assert_close(step(inputs["model_pred"]), want_loss)  # probed eagerly: caught
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(inputs["model_pred"]), want_loss)


@needs_kernels
def test_a_trace_never_probes(probed_on_cpu):
    inputs = make_inputs(3, SMALL, with_embeddings=True)

    def step(pred):
        return rpo_fast.diffusion_rpo_loss(pred, inputs["target"], inputs["ref_pred"], emb_w=inputs["emb_w"],
                                           emb_l=inputs["emb_l"], beta=100.0, backend="cpu")

    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(inputs["model_pred"])
    assert not verify._DECIDED  # nothing ran inside the trace
    torch.testing.assert_close(loss, step(inputs["model_pred"]))
    assert list(verify._DECIDED.values()) == [True]  # the eager call probed


def _rank_worker(rank, init_file, out_dir):
    """Rank 1's cpu backend is wrong, rank 0's right: both must fall back."""
    import rpo_fast
    from rpo_fast import verify

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        verify.DEVICE_TYPES.add("cpu")
        if rank == 1:
            inject("loss")
        inputs = make_inputs(3, SMALL, with_embeddings=True, seed=rank)
        rpo_call(inputs, backend="cpu")
        torch.save({"decided": list(verify._DECIDED.values()), "failed": list(verify._FAILED)},
                   os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@needs_kernels
def test_every_rank_reaches_the_same_decision(tmp_path):
    mp.spawn(_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert out["decided"] == [False] and out["failed"] == [("cpu", "cpu")], rank


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_gpu_backends_pass_their_first_use_check(backend, dtype, monkeypatch):
    """On a real GPU: the probe of every method passes for each GPU backend (no fallback)."""
    if backend not in rpo_fast.available_backends():
        pytest.skip(f"{backend} is not available here")
    monkeypatch.delenv(verify.ENV, raising=False)
    verify.reset()
    inputs = make_inputs(5, SMALL, dtype, "cuda", with_embeddings=True)
    pred, target, ref = inputs["model_pred"], inputs["target"], inputs["ref_pred"]
    rpo_fast.sft_loss(pred, target, backend=backend)
    rpo_fast.diffusion_dpo_loss(pred, target, ref, backend=backend)
    rpo_fast.diffusion_rpo_loss(pred, target, ref, emb_w=inputs["emb_w"], emb_l=inputs["emb_l"], backend=backend)
    assert len(verify._DECIDED) == 3 and all(verify._DECIDED.values()), verify._FAILED
    verify.reset()


@needs_kernels
def test_check_reports_correctness_and_time_per_backend_and_the_fastest_right_one(probed_on_cpu, capsys):
    from rpo_fast.cli import main

    assert main(["check", "--device", "cpu", "--pairs", "3", "--shape", "4", "5", "7", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for method in ("rpo", "dpo", "sft"):
        section = out.split(f"{method}:\n")[1].split("fastest correct: ")
        rows = {line.split()[0]: line.split() for line in section[0].splitlines()[1:] if line.strip()}
        assert set(rows) >= {"torch", "cpu"} and all(r[1] == "yes" and float(r[-2]) > 0 for r in rows.values())
        fastest = min(rows, key=lambda b: float(rows[b][-2]))
        assert section[1].startswith(fastest), method
    inject("gradient")  # a wrong backend: named, never chosen, and the exit status says so
    assert main(["check", "--device", "cpu", "--method", "rpo", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert "  cpu      NO       gradient" in out and "fastest correct: torch" in out


def test_check_bad_arguments_are_one_line(capsys):
    from rpo_fast.cli import main

    for argv, message in ((["--device", "tpu"], "--device: expected cpu, cuda or cuda:N, got 'tpu'"),
                          (["--pairs", "0"], "--pairs: expected a positive integer, got 0"),
                          (["--shape", "4", "0"], "--shape: expected positive sizes, got 4 0")):
        assert main(["check", *argv]) == 2
        err = capsys.readouterr().err
        assert err == f"rpo-fast check: error: {message}\n"
    if not torch.cuda.is_available():
        assert main(["check", "--device", "cuda"]) == 2
        assert "no CUDA device here" in capsys.readouterr().err
