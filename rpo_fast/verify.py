"""A fused backend checked against the reference the first time a process uses it.

The CPU tests vouch for the ``cpu`` backend and, through the Triton interpreter, for the
Triton kernels' logic; nothing here vouches for a kernel on the user's GPU. So the first time a
process runs a fused backend on a device type in ``DEVICE_TYPES`` (CUDA) for a class of call
(backend, method, dtype, reference form, weights form, loss type, weight norm), it also runs a
small deterministic probe of that class (3 pairs of ``(4, 7, 9)`` samples: sizes that divide no
block) through the same backend and through the ``torch`` reference in float64, and compares
loss, metrics and gradient within ``SLACK`` times the bounds that float32 rounding alone allows
(``Tolerances``, the parity suite's own): room for a correct kernel that sums in another order,
none for a fault, which is off by orders of magnitude more. Cost: two small loss calls with their backward, once per
class and process (milliseconds on a GPU, plus the kernels' first compilation, which the first
real call would pay anyway).

On a mismatch (``RPO_FAST_VERIFY``, default ``warn``): one warning line, and the ``torch``
reference for that backend and device type for the rest of the process; ``error`` raises
instead; ``off`` skips the check. Under ``torch.distributed`` every rank probes and the ranks
agree (a mismatch on one is a mismatch on all). Inside a ``torch.compile`` trace no probe runs:
the decision already made stands, and one eager call of the loss makes it before the first
compiled step (the trainer's loss calls are eager).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import reference
from .validation import LossInputs
from ._types import METRIC_NAMES

logger = logging.getLogger("rpo_fast")

ENV = "RPO_FAST_VERIFY"
MODES = ("warn", "error", "off")
DEVICE_TYPES = {"cuda"}  # where a fused backend is probed before it is trusted
PROBE_PAIRS, PROBE_SHAPE, PROBE_BETA = 3, (4, 7, 9), 100.0
SLACK = 4.0  # the probe's bounds over the parity suite's (the cpu backend uses up to 98% of those on the probe)
REPORT = "with this line and the output of `rpo-fast check --device cuda`"

UNIT_ROUNDOFF = 2.0**-24
ERROR_ROUNDINGS = 4  # float32 roundings allowed on one per-sample error (measured: ~2)
# The gradient is written in the input's dtype: its final rounding.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Half the smallest fp16 subnormal: a gradient entry that small may round to zero.
GRAD_ATOL = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-25}
METRICS_OF = {"rpo": METRIC_NAMES, "dpo": METRIC_NAMES[:4], "sft": ()}

# (loss, metrics vector, d loss / d model_pred) of one backend on one call: functional's path
Run = Callable[[LossInputs], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class BackendMismatch(RuntimeError):
    """A fused backend disagreed with the reference on this device (``RPO_FAST_VERIFY=error``)."""


def mode() -> str:
    value = os.environ.get(ENV, "warn").strip().lower() or "warn"
    if value not in MODES:
        raise ValueError(f"{ENV}: expected one of {', '.join(MODES)}, got {value!r}")
    return value


@dataclass(frozen=True)
class CallClass:
    """What decides which kernel code a loss call runs."""

    backend: str
    device_type: str
    method: str
    dtype: torch.dtype
    reference: str  # ref_pred, ref_err or none
    weights: str  # embeddings, explicit or uniform (rpo); none otherwise
    loss_type: str
    weight_norm: str

    @classmethod
    def of(cls, backend: str, inputs: LossInputs) -> "CallClass":
        ref = "ref_pred" if inputs.ref_pred is not None else "ref_err" if inputs.ref_err is not None else "none"
        weights = ("embeddings" if inputs.emb_w is not None else "explicit" if inputs.weights is not None
                   else "uniform") if inputs.method == "rpo" else "none"
        return cls(backend, inputs.model_pred.device.type, inputs.method, inputs.model_pred.dtype, ref, weights,
                   inputs.loss_type or "sigmoid", inputs.weight_norm)

    def __str__(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.method} {dtype} {self.reference} weights={self.weights} {self.loss_type} {self.weight_norm}"


def probe_inputs(call: CallClass, device: torch.device, pairs: int = PROBE_PAIRS,
                 shape: Tuple[int, ...] = PROBE_SHAPE) -> LossInputs:
    """A deterministic call of class ``call`` (``pairs`` pairs of ``shape`` samples): errors
    near the reference's, ``beta (dl - dw)`` of order 1, so that every term of the loss and its
    gradient is exercised."""
    gen = torch.Generator().manual_seed(20261207)
    n = 2 * pairs
    target = torch.randn(n, *shape, generator=gen)
    ref_pred = target + torch.randn(n, *shape, generator=gen)
    model_pred = ref_pred + 0.05 * torch.randn(n, *shape, generator=gen)
    emb = torch.randn(n, 8, generator=gen)
    weights = torch.rand(pairs, pairs, generator=gen)
    on = dict(device=device, dtype=call.dtype)
    ref_pred, target = ref_pred.to(**on), target.to(**on)
    return LossInputs(
        method=call.method, model_pred=model_pred.to(**on), target=target,
        ref_pred=ref_pred if call.reference == "ref_pred" else None,
        ref_err=errors64(ref_pred, target).float() if call.reference == "ref_err" else None,
        emb_w=emb[:pairs].to(device) if call.weights == "embeddings" else None,
        emb_l=emb[pairs:].to(device) if call.weights == "embeddings" else None,
        weights=weights.to(device) if call.weights == "explicit" else None,
        beta=PROBE_BETA, tau=0.5, loss_type=call.loss_type if call.method != "sft" else None,
        weight_norm=call.weight_norm)


class Tolerances:
    """Absolute error bounds that rounding each per-sample error to float32 alone causes, to
    first order (gradient and Hessian of the float64 reference's pair loss): a kernel summing
    in float32 returns errors within a few roundings of their float64 values, and
    ``e_model - e_ref``, a difference of nearly equal numbers, is then multiplied by beta."""

    def __init__(self, inputs: LossInputs):
        cpu = {k: v.detach().cpu().double() for k, v in vars(inputs).items() if isinstance(v, torch.Tensor)}
        pred, target = cpu["model_pred"], cpu["target"]
        model_err = errors64(pred, target)
        ref_err = errors64(cpu["ref_pred"], target) if "ref_pred" in cpu else cpu.get("ref_err", torch.zeros_like(model_err))
        weights = cpu.get("weights")
        if "emb_w" in cpu:
            from .weights import row_softmax_weights

            weights = row_softmax_weights(cpu["emb_w"], cpu["emb_l"], inputs.tau)
        scale = inputs.weight_scale(len(model_err) // 2)

        def loss_of(e):
            return reference.pair_loss(e, ref_err, weights, inputs.method, inputs.loss_type or "sigmoid",
                                       inputs.beta, scale)[0]

        step = ERROR_ROUNDINGS * UNIT_ROUNDOFF * (model_err.abs() + ref_err.abs())
        coef = torch.autograd.functional.jacobian(loss_of, model_err)
        hess = torch.autograd.functional.hessian(loss_of, model_err)
        self.loss_atol = float((coef.abs() * step).sum())
        self.margin_atol = 2 * float(step.mean())
        coef_atol = hess.abs() @ step + 8 * UNIT_ROUNDOFF * coef.abs()
        self.grad_atol = coef_atol.view(-1, *([1] * (pred.dim() - 1))) * (2.0 * (pred - target) / pred[0].numel()).abs()


def errors64(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared errors in float64."""
    return (pred.double() - target.double()).pow(2).flatten(1).mean(1)


@dataclass(frozen=True)
class Finding:
    """The worst entry of one compared quantity: its distance from the float64 reference and
    the bound it may reach (``distance <= tolerance`` passes; NaN matches NaN)."""

    what: str
    distance: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.distance <= self.tolerance


def _worst(what: str, actual: torch.Tensor, expected: torch.Tensor, atol, rtol: float) -> Finding:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    bound = (atol.cpu() if isinstance(atol, torch.Tensor) else atol) + rtol * expected.abs()
    err = (actual - expected).abs()
    both_nan = actual.isnan() & expected.isnan()
    err = torch.where(both_nan, torch.zeros_like(err), err.nan_to_num(float("inf")))
    excess = (err - bound)
    i = int(excess.flatten().argmax())
    return Finding(what, float(err.flatten()[i]), float(torch.as_tensor(bound).expand_as(err).flatten()[i]))


def compare(run: Run, inputs: LossInputs, grad_rtol: Optional[Dict[torch.dtype, float]] = None,
            slack: float = 1.0) -> List[Finding]:
    """``run`` (a backend) against the ``torch`` reference in float64 on ``inputs``: loss, each
    metric of the method, and the gradient, each as a ``Finding`` whose tolerance is ``slack``
    times the rounding bound."""
    loss, metrics, grad = run(inputs)
    as64 = replace(inputs, **{k: v.double() for k, v in vars(inputs).items()
                              if isinstance(v, torch.Tensor)})
    ref_loss, ref_metrics, ref_grad = run_reference(as64)
    tol = Tolerances(inputs)
    dtype = inputs.model_pred.dtype
    found = [_worst("loss", loss, ref_loss, tol.loss_atol, 1e-5)]
    for i, name in enumerate(METRIC_NAMES):
        if name in METRICS_OF[inputs.method]:
            found.append(_worst(name, metrics[i], ref_metrics[i], tol.margin_atol if name == "reward_margin" else 0.0,
                                1e-5))
    rtol = max(1e-5, (grad_rtol or GRAD_RTOL)[dtype])
    found.append(_worst("gradient", grad, ref_grad, tol.grad_atol + GRAD_ATOL[dtype], rtol))
    return [replace(f, tolerance=slack * f.tolerance) for f in found]


def probe(backend, call: CallClass, device: torch.device) -> List[Finding]:
    """``backend`` (a dispatch.Backend) on the probe of ``call`` against the float64 reference,
    within ``SLACK`` times the rounding bounds."""
    return compare(lambda i: run_backend(backend, i), probe_inputs(call, device), _grad_rtol(call), SLACK)


def worst(findings: List[Finding]) -> Finding:
    """The finding closest to (or furthest past) its tolerance."""
    return max(findings, key=lambda f: f.distance / max(f.tolerance, 1e-300))


def run_backend(backend, inputs: LossInputs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, metrics vector and d loss / d model_pred of ``backend`` (a dispatch.Backend) on one rank."""
    from .functional import apply  # the loss's own path through a backend

    leaf = inputs.model_pred.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss, metrics = apply(backend, replace(inputs, model_pred=leaf))
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), metrics.detach(), grad


def run_reference(inputs: LossInputs):
    from .dispatch import TORCH_BACKEND

    return run_backend(TORCH_BACKEND, inputs)


# ------------------------------------------------------------------ the process's decisions
_DECIDED: Dict[CallClass, bool] = {}  # class -> the backend passed its probe
_FAILED: Dict[Tuple[str, str], str] = {}  # (backend, device type) -> the warning line


def verify_backend(backend, inputs: LossInputs, process_group=None) -> bool:
    """Probes ``backend`` (a dispatch.Backend) for the class of ``inputs`` unless this process
    has already decided it; returns whether the backend may be used. Call it eagerly."""
    call = CallClass.of(backend.name, inputs)
    if call in _DECIDED:
        return _DECIDED[call]
    device = inputs.model_pred.device
    bad = [f for f in probe(backend, call, device) if not f.ok]
    ok = _agree(not bad, device, process_group)
    _DECIDED[call] = ok
    if not ok:
        found = worst(bad) if bad else None
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        seen = (f"{found.what} off by {found.distance:.3g} (tolerance {found.tolerance:.3g})" if found
                else "another rank found a mismatch")
        line = (f"rpo_fast: the {backend.name!r} backend disagrees with the reference on {name} for {call}: {seen}; "
                f"using the 'torch' backend on {device.type} for the rest of this process; "
                f"{ENV}=error makes this an error; please report it {REPORT}")
        _FAILED[(backend.name, device.type)] = line
        if mode() == "error":
            raise BackendMismatch(line)
        logger.warning(line)
    return ok


def checked(backend, inputs: LossInputs, process_group=None):
    """``backend``, or the ``torch`` reference if it failed (or now fails) its probe on this
    device type. Outside ``DEVICE_TYPES``, for ``torch`` itself, and with the check off: as given."""
    from .dispatch import TORCH_BACKEND

    device_type = inputs.model_pred.device.type
    if backend.name == "torch" or device_type not in DEVICE_TYPES:
        return backend
    if (backend.name, device_type) in _FAILED:
        return TORCH_BACKEND
    if torch.compiler.is_compiling() or mode() == "off":  # no probe inside a trace
        return backend
    return backend if verify_backend(backend, inputs, process_group) else TORCH_BACKEND


def _grad_rtol(call: CallClass) -> Dict[torch.dtype, float]:
    if call.backend == "triton" and call.device_type == "cpu":  # the interpreter's bf16 rounding
        return {**GRAD_RTOL, torch.bfloat16: 2.0**-7}
    return GRAD_RTOL


def _agree(ok: bool, device: torch.device, process_group) -> bool:
    """True only if every rank found its probe right (one all-reduce, when distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    group = process_group if process_group is not None else dist.group.WORLD
    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    flag = torch.tensor([0 if ok else 1], device=on)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item()) == 0


def reset() -> None:
    """Forgets every decision (tests)."""
    _DECIDED.clear()
    _FAILED.clear()
