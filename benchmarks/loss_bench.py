"""One loss benchmark: inputs for a case, and the forward+backward of each implementation.

Implementations: ``copy`` (a plain copy of as many bytes as the loss must move at least: the
roofline), ``eager`` (eager_loss.py, as the Diffusion-DPO trainers write it), ``compiled``
(``torch.compile`` of that eager loss) and every rpo-fast backend available here
(``rpo_fast.available_backends()`` that runs on the benchmark device).
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

import rpo_fast
from benchmarks.eager_loss import eager_dpo_loss, eager_rpo_loss
from benchmarks.profiles import LossCase, Timing

BETA = 2500.0  # rpo-fast's beta; the eager loss gets beta_dpo = 2 * BETA (eager_loss.py)
TAU = 0.5
EMBED_DIM = 768  # CLIP ViT-L/14, what the Diffusion-RPO paper embeds with
BASELINE_IMPLS = ("copy", "eager", "compiled")
# Every timed call reads inputs that were last touched this many bytes of other inputs ago, more
# than any cache holds (the EPYC's 32 MiB L3, an H100's or H200's 50 MiB L2): a training step
# reads its predictions and noise fresh. Repeating a call on one set of inputs measured whether
# they stayed in a cache the host's other tenants share (docs/benchmarks.md, "Cold inputs").
COLD_BYTES = 128 << 20
# Before every timed call, untimed, a write of this many bytes (dirty lines, as a UNet forward
# leaves the cache before its loss): each call starts from the same state, whichever
# implementation ran before it. Without it, the implementation that always came next in a
# round inherited its predecessor's cache (the `cpu` backend after the `torch` reference was
# 6-32% slower than after the compiled loss, docs/benchmarks.md).
DIRTY_BYTES = 64 << 20


# Devices each backend is timed on. Triton also runs on the CPU, but only in its interpreter
# (TRITON_INTERPRET=1, for tests): far too slow to be worth timing.
TIMED_ON = {"torch": ("cpu", "cuda"), "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}


def backends_for(device: torch.device) -> List[str]:
    """rpo-fast backends available here that are timed on ``device`` tensors."""
    return [name for name in rpo_fast.available_backends() if device.type in TIMED_ON.get(name, ())]


def impls_for(device: torch.device) -> List[str]:
    return list(BASELINE_IMPLS) + backends_for(device)


@dataclass
class LossInputs:
    model_pred: torch.Tensor  # requires grad: the policy's prediction
    target: torch.Tensor
    ref_pred: torch.Tensor
    emb_w: torch.Tensor  # (M, E) used by rpo only
    emb_l: torch.Tensor


def make_inputs(case: LossCase, device: torch.device, seed: int = 0) -> LossInputs:
    """A batch like a training step's: the policy close to the reference (as early in
    fine-tuning), so the logits are O(1) and neither loss saturates."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    target = torch.randn(case.shape, generator=gen)
    ref_pred = target + torch.randn(case.shape, generator=gen)
    model_pred = ref_pred + 0.05 * torch.randn(case.shape, generator=gen)
    emb_w = torch.randn(case.pairs, EMBED_DIM, generator=gen)
    emb_l = emb_w + torch.randn(case.pairs, EMBED_DIM, generator=gen)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=case.torch_dtype)

    return LossInputs(
        put(model_pred).requires_grad_(True), put(target), put(ref_pred), emb_w.to(device), emb_l.to(device)
    )


def _eager_fn(method: str) -> Callable[[LossInputs], torch.Tensor]:
    if method == "rpo":
        return lambda x: eager_rpo_loss(x.model_pred, x.target, x.ref_pred, x.emb_w, x.emb_l, 2 * BETA, TAU)[0]
    return lambda x: eager_dpo_loss(x.model_pred, x.target, x.ref_pred, 2 * BETA)[0]


def _backend_fn(method: str, backend: str) -> Callable[[LossInputs], torch.Tensor]:
    # return_metrics: a trainer logs them; the fused kernels produce them in the same pass.
    # weight_norm "row": the function the eager loss writes (the LLM RPO trainer's weights); the
    # default "mean" runs the same kernels with one more factor on the weights.
    if method == "rpo":
        return lambda x: rpo_fast.diffusion_rpo_loss(
            x.model_pred, x.target, x.ref_pred, emb_w=x.emb_w, emb_l=x.emb_l, beta=BETA, tau=TAU,
            weight_norm="row", backend=backend, return_metrics=True,
        )[0]
    return lambda x: rpo_fast.diffusion_dpo_loss(
        x.model_pred, x.target, x.ref_pred, beta=BETA, backend=backend, return_metrics=True
    )[0]


def _compile_in_process() -> None:
    """Inductor compiles in a pool of worker processes that it starts in the background and
    keeps: they import torch while the next benchmarks run, and on 2 cores that made the
    implementations timed after a compilation up to 30x slower. One thread: no pool."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1


def loss_fn(case: LossCase, impl: str, compile_backend: str = "inductor") -> Callable[[LossInputs], torch.Tensor]:
    """The loss of ``impl`` as a function of the inputs (``copy`` has none)."""
    if impl == "eager":
        return _eager_fn(case.method)
    if impl == "compiled":
        # A fresh cache per case: one compiled graph per static shape, no dynamic-shape
        # recompile and no hitting the recompile limit across the grid.
        torch._dynamo.reset()
        _compile_in_process()
        eager = eager_rpo_loss if case.method == "rpo" else eager_dpo_loss
        compiled = torch.compile(eager, dynamic=False, backend=compile_backend)
        if case.method == "rpo":
            return lambda x: compiled(x.model_pred, x.target, x.ref_pred, x.emb_w, x.emb_l, 2 * BETA, TAU)[0]
        return lambda x: compiled(x.model_pred, x.target, x.ref_pred, 2 * BETA)[0]
    return _backend_fn(case.method, impl)


def _synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def copy_step(case: LossCase, device: torch.device) -> Callable[[], None]:
    """A plain copy of as many bytes as the fused loss must move at least: copying 2N
    elements reads 2N and writes 2N, the 4N of reading three inputs and writing the gradient.
    The sources are taken in turn, cold as the loss's inputs; the destination is one buffer,
    as the loss's gradient reuses the block the allocator kept."""
    sync = _synchronize(device)
    first = torch.empty(2 * case.numel, dtype=case.torch_dtype, device=device).normal_()
    sources = itertools.cycle([first] + [first.clone() for _ in range(ring_length(first.nbytes) - 1)])
    dst = torch.empty_like(first)

    def step():
        dst.copy_(next(sources))
        sync()

    return step


def dirty_cache_step(device: torch.device) -> Callable[[], None]:
    """A write of DIRTY_BYTES, a new value each time (untimed, before every call)."""
    sync = _synchronize(device)
    scratch = torch.empty(DIRTY_BYTES // 4, dtype=torch.float32, device=device)
    values = itertools.count()

    def step():
        scratch.fill_(float(next(values) % 1024))
        sync()

    return step


def loss_step(fn: Callable[[LossInputs], torch.Tensor], ring: Tuple[LossInputs, ...]) -> Callable[[], tuple]:
    """Forward + backward of ``fn`` on the next inputs of ``ring``: the gradient with respect
    to ``model_pred`` is returned, not accumulated into ``.grad`` (which would add a pass)."""
    sync = _synchronize(ring[0].model_pred.device)
    turn = itertools.cycle(ring)

    def step():
        inputs = next(turn)
        loss = fn(inputs)
        (grad,) = torch.autograd.grad(loss, [inputs.model_pred])
        sync()
        return loss.detach(), grad

    return step


def warm_up(step: Callable[[], object]) -> Tuple[float, float]:
    """Calls ``step`` until warm: (the first call's time, which includes torch.compile's
    compilation for ``compiled``; the fastest of a few more calls, up to 5 or 0.5 s of them,
    so that one call slowed down by another process does not shrink the number of rounds)."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    calls: List[float] = []
    while len(calls) < 5 and (len(calls) < 1 or sum(calls) < 0.5):
        start = time.perf_counter()
        step()
        calls.append(time.perf_counter() - start)
    return first, min(calls)


def rounds_for(call_s: List[float], timing: Timing) -> int:
    """Rounds (one call of each implementation) giving each ``timing.target_s`` on average."""
    if timing.target_s <= 0:
        return timing.min_rounds
    rounds = math.ceil(timing.target_s * len(call_s) / max(sum(call_s), 1e-7))
    return min(max(rounds, timing.min_rounds), timing.max_rounds)


def interleaved(steps: Dict[str, Callable[[], object]],
                before_each: Callable[[], None]) -> Tuple[Callable[[], None], Dict[str, List[float]]]:
    """A round calling each step once, each call timed by itself after an untimed
    ``before_each``, and the times it appends to (``times[name][r]``: round r). Each round
    starts one step further. Interleaved call by call, the implementations of a case meet the
    same moments of a shared machine: its memory bandwidth moves by a third within minutes
    (docs/benchmarks.md)."""
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    starts = itertools.count()

    def one_round() -> None:
        first = next(starts) % len(names)
        for name in names[first:] + names[:first]:
            before_each()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    return one_round, times


def paired_ratio(numerator: List[float], denominator: List[float]) -> float:
    """The median over rounds of ``numerator[r] / denominator[r]``: two calls of one round
    meet the same moment of the machine, which a ratio of two minima from different moments
    does not."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def call_stats(times: List[float]) -> Dict[str, float]:
    return {"min_s": min(times), "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
            "stddev_s": statistics.pstdev(times), "rounds": len(times)}


def saved_for_backward(loss: Callable[[], torch.Tensor], inputs: LossInputs) -> Tuple[int, int]:
    """Bytes the autograd graph of one forward keeps for backward, counted by storage (a view
    and its base count once): ``(all, beyond the inputs)``. The second is what a training
    step pays on top of the tensors it holds anyway."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr() or id(storage)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss()
    del out
    own = {t.untyped_storage().data_ptr() for t in (inputs.model_pred, inputs.target, inputs.ref_pred)}
    total = sum(storages.values())
    return total, total - sum(n for ptr, n in storages.items() if ptr in own)


@functools.lru_cache(maxsize=1)
def cached_inputs(case: LossCase, device: str) -> LossInputs:
    """One case's inputs at a time: every implementation of the case times the same tensors."""
    return make_inputs(case, torch.device(device))


def ring_length(set_bytes: int) -> int:
    """Copies of a case's inputs to take in turn so that the others between two uses of one
    move at least ``COLD_BYTES`` (at most 1024 copies: the smoke run's toy shapes)."""
    return min(1024, 1 + math.ceil(COLD_BYTES / set_bytes))


@functools.lru_cache(maxsize=1)
def input_ring(case: LossCase, device: str) -> Tuple[LossInputs, ...]:
    """``cached_inputs`` and copies of it, the same values in other memory, for the timed
    calls to take in turn (the embeddings, a few KiB, are shared)."""
    first = cached_inputs(case, device)
    tensors = (first.model_pred, first.target, first.ref_pred)
    copies = [first]
    for _ in range(ring_length(sum(t.nbytes for t in tensors)) - 1):
        pred, target, ref = (t.detach().clone() for t in tensors)
        copies.append(LossInputs(pred.requires_grad_(True), target, ref, first.emb_w, first.emb_l))
    return tuple(copies)


# Rounding of an implementation that computes in float32 (bf16 inputs are upcast exactly)
# against the float64 truth. A mean of D squares summed in float32 in any order is off by about
# LAMBDA sqrt(D) u relatively: the probabilistic bound of Higham and Mary (SIAM J. Sci. Comput.
# 2019), which holds with probability at least 1 - 2 exp(-LAMBDA^2 / 2) (here 1 - 3e-8); the
# worst case, D u, is 30 times looser at SD latents and would accept a loss off by its own size.
U32 = 2.0**-24
LAMBDA = 6.0
OUTPUT_U = {"fp32": 0.0, "bf16": 2.0**-8}  # the gradient's rounding to model_pred's dtype
SOFTPLUS_XF1 = 0.2785  # max over x of |x f'(x)| for f(x) = softplus(-x), the sigmoid loss
SOFTPLUS_F1_XF2 = 1.224  # max over x of |f'(x) + x f''(x)|


@functools.lru_cache(maxsize=1)
def _truth(case: LossCase, device: str) -> Tuple[float, torch.Tensor, float, float]:
    """The loss and gradient in float64 (the torch reference on float64 copies of the inputs),
    and the bounds within which a float32 implementation's must lie, to first order: the
    per-sample errors off by (LAMBDA sqrt(D) + 3) u relatively, moving the loss by
    sum_k |dL/de_k| (e_k + r_k) times that and each coefficient dL/de_k by its row of the
    Jacobian; for rpo, the weights off by rho relatively (cosines of E-dim embeddings,
    (E + 4) u each, over tau, through the softmax); the pair stage's own sums of M or M^2
    terms; the gradient coef_k (2/D)(pred - target) with its coefficient's error, 4 roundings
    of its own and its rounding to model_pred's dtype (cached: every implementation checks
    against it)."""
    from rpo_fast import reference
    from rpo_fast.weights import similarity_weights

    x = cached_inputs(case, device)
    pred, target, ref = (t.detach().double() for t in (x.model_pred, x.target, x.ref_pred))
    m, d = case.pairs, case.numel // (2 * case.pairs)
    weights = similarity_weights(x.emb_w.double(), x.emb_l.double(), TAU) if case.method == "rpo" else None
    errors = reference.per_sample_error(pred, target, torch.float64).requires_grad_(True)
    ref_err = reference.per_sample_error(ref, target, torch.float64)
    loss, _ = reference.pair_loss(errors, ref_err, weights, case.method, "sigmoid", BETA)
    (coef,) = torch.autograd.grad(loss, [errors], create_graph=True)
    jacobian = torch.stack([torch.autograd.grad(c, [errors], retain_graph=True)[0] for c in coef])
    coef, loss = coef.detach(), float(loss.detach())
    grad = coef.view(-1, *([1] * (pred.dim() - 1))) * (2.0 / d) * (pred - target)

    gamma = (LAMBDA * math.sqrt(d) + 3) * U32
    scale = (errors.detach() + ref_err) * gamma
    loss_bound = float((coef.abs() * scale).sum()) + (LAMBDA * (m if weights is not None else math.sqrt(m)) + 8) * U32 * abs(loss)
    coef_bound = jacobian.abs() @ scale + 4 * U32 * coef.abs()
    if weights is not None:
        rho = 2 * (EMBED_DIM + 4) * U32 / TAU + 4 * U32
        loss_bound += SOFTPLUS_XF1 * rho
        coef_bound += SOFTPLUS_F1_XF2 * BETA * rho / m**2 * torch.cat([weights.sum(1), weights.sum(0)])
    spread = (pred - target).abs().flatten(1).amax(1)
    grad_bound = float((coef_bound * (2.0 / d) * spread).max()) + OUTPUT_U[case.dtype] * float(grad.abs().max())
    return loss, grad, loss_bound, grad_bound


def agreement(case: LossCase, result: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, float]:
    """An implementation's loss and gradient against the float64 truth: the errors and the
    rounding bounds they must stay within (``_truth``), each relative to the true value's
    size (the gradient's: its largest element)."""
    device = str(result[1].device)
    true_loss, true_grad, loss_bound, grad_bound = _truth(case, device)
    loss, grad = result
    scale = max(abs(true_loss), 1e-300)
    grad_scale = float(true_grad.abs().max()) or 1e-300
    return {
        "loss_rel_err": abs(float(loss) - true_loss) / scale,
        "grad_rel_err": float((grad.double() - true_grad).abs().max()) / grad_scale,
        "loss_rel_bound": loss_bound / scale,
        "grad_rel_bound": grad_bound / grad_scale,
    }
