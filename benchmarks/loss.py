"""``make bench``: the loss's forward + backward, every rpo-fast backend against the eager loss as
the Diffusion-DPO trainers write it, ``torch.compile`` of that loss, and a plain copy of the
bytes the loss must move (the byte bound).

    python -m benchmarks.loss                # SD1.5 and SDXL latents, M = 1..64, fp32 and bf16
    python -m benchmarks.loss --quick        # SDXL latents, M = 16: the rows docs/benchmarks.md quotes
    python -m benchmarks.loss --smoke        # toy shapes, one round (the test that keeps it from rotting)

Writes ``benchmarks/results/loss-<machine>.{json,md,png}`` (``--out``, ``--name`` to change).
How a case is timed: its implementations are called in turn, call by call, each timed by
itself after the same untimed 64 MiB write, on inputs that no cache holds (a ring of copies
with 128 MiB of other inputs between two uses of one); a ratio is the median over rounds of
the two calls of a round. Each implementation's loss and gradient are checked against the
float64 truth within rounding bounds before its time counts.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

import rpo_fast
from benchmarks.eager_loss import eager_dpo_loss, eager_rpo_loss
from benchmarks.harness import (RESULTS, bench_device, keep_freed_host_memory, machine_info, machine_line, stamp,
                                table, warn_if_busy, write_json)

BETA = 2500.0  # rpo-fast's beta; the eager loss gets beta_dpo = 2 * BETA (eager_loss.py)
TAU = 0.5
EMBED_DIM = 768  # CLIP ViT-L/14, what the Diffusion-RPO paper embeds with
BASELINES = ("copy", "eager", "compiled")
COLD_BYTES = 128 << 20  # more than any cache holds (an EPYC's 32 MiB L3, an H100's or H200's 50 MiB L2)
DIRTY_BYTES = 64 << 20  # dirty lines before every call, as a UNet forward leaves the cache before its loss
# Triton runs on the CPU only in its interpreter (tests): not worth timing there.
TIMED_ON = {"torch": ("cpu", "cuda"), "cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
LATENT_SHAPES = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128), "tiny": (4, 8, 8)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LossCase:
    latents: str  # a key of LATENT_SHAPES
    pairs: int  # M: the batch holds 2M samples
    dtype: str  # a key of DTYPES
    method: str  # rpo | dpo

    @property
    def shape(self) -> Tuple[int, ...]:
        return (2 * self.pairs, *LATENT_SHAPES[self.latents])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def minimal_bytes(self) -> int:
        """Read model_pred, ref_pred and target once, write the gradient once."""
        return 4 * self.numel * DTYPES[self.dtype].itemsize

    @property
    def id(self) -> str:
        return f"{self.latents}-M{self.pairs}-{self.dtype}-{self.method}"


@dataclass(frozen=True)
class Profile:
    cases: Tuple[LossCase, ...]
    target_s: float  # calls per implementation and case: about this many seconds of them,
    min_rounds: int  # within these bounds
    max_rounds: int
    compile_backend: str = "inductor"


def _grid(latents, pairs, dtypes, methods) -> Tuple[LossCase, ...]:
    return tuple(LossCase(*c) for c in itertools.product(latents, pairs, dtypes, methods))


PROFILES = {
    "full": Profile(_grid(("sd15", "sdxl"), (1, 4, 16, 64), DTYPES, ("rpo", "dpo")), 1.0, 10, 300),
    "quick": Profile(_grid(("sdxl",), (16,), DTYPES, ("rpo", "dpo")), 0.5, 5, 100),
    # aot_eager: torch.compile's tracing and autograd without inductor's C++ build (~25 s cold)
    "smoke": Profile(_grid(("tiny",), (2,), ("fp32",), ("rpo", "dpo")) + _grid(("tiny",), (2,), ("bf16",), ("rpo",)),
                     0.0, 1, 1, compile_backend="aot_eager"),
}


def impls_for(device: torch.device) -> List[str]:
    return list(BASELINES) + [b for b in rpo_fast.available_backends() if device.type in TIMED_ON.get(b, ())]


@dataclass
class LossInputs:
    model_pred: torch.Tensor  # requires grad: the policy's prediction
    target: torch.Tensor
    ref_pred: torch.Tensor
    emb_w: torch.Tensor  # (M, E), rpo only
    emb_l: torch.Tensor


def make_inputs(case: LossCase, device: torch.device, seed: int = 0) -> LossInputs:
    """A batch like an early fine-tuning step's: the policy close to the reference, so the
    logits are O(1) and neither loss saturates."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(case.shape, generator=gen)
    ref_pred = target + torch.randn(case.shape, generator=gen)
    model_pred = ref_pred + 0.05 * torch.randn(case.shape, generator=gen)
    emb_w = torch.randn(case.pairs, EMBED_DIM, generator=gen)
    emb_l = emb_w + torch.randn(case.pairs, EMBED_DIM, generator=gen)
    put = functools.partial(torch.Tensor.to, device=device, dtype=DTYPES[case.dtype])
    return LossInputs(put(model_pred).requires_grad_(True), put(target), put(ref_pred), emb_w.to(device),
                      emb_l.to(device))


def loss_fn(case: LossCase, impl: str, compile_backend: str = "inductor") -> Callable[[LossInputs], torch.Tensor]:
    """The loss of ``impl`` (eager, compiled or a backend) as a function of the inputs."""
    rpo = case.method == "rpo"
    if impl in ("eager", "compiled"):
        eager = eager_rpo_loss if rpo else eager_dpo_loss
        if impl == "compiled":
            import torch._inductor.config as inductor_config

            torch._dynamo.reset()  # a graph per static shape, no recompile limit across the grid
            inductor_config.compile_threads = 1  # no background pool slowing the next calls on 2 cores
            eager = torch.compile(eager, dynamic=False, backend=compile_backend)
        if rpo:
            return lambda x: eager(x.model_pred, x.target, x.ref_pred, x.emb_w, x.emb_l, 2 * BETA, TAU)[0]
        return lambda x: eager(x.model_pred, x.target, x.ref_pred, 2 * BETA)[0]
    # weight_norm "row": the function the eager loss writes; metrics, as a trainer logs them
    if rpo:
        return lambda x: rpo_fast.diffusion_rpo_loss(x.model_pred, x.target, x.ref_pred, emb_w=x.emb_w, emb_l=x.emb_l,
                                                     beta=BETA, tau=TAU, weight_norm="row", backend=impl,
                                                     return_metrics=True)[0]
    return lambda x: rpo_fast.diffusion_dpo_loss(x.model_pred, x.target, x.ref_pred, beta=BETA, backend=impl,
                                                 return_metrics=True)[0]


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def ring_length(set_bytes: int) -> int:
    return min(1024, 1 + math.ceil(COLD_BYTES / set_bytes))


@functools.lru_cache(maxsize=1)
def cached_inputs(case: LossCase, device: str) -> LossInputs:
    return make_inputs(case, torch.device(device))


def input_ring(case: LossCase, device: str) -> Tuple[LossInputs, ...]:
    """``cached_inputs`` and copies of it in other memory, taken in turn by the timed calls."""
    first = cached_inputs(case, device)
    tensors = (first.model_pred, first.target, first.ref_pred)
    copies = [first]
    for _ in range(ring_length(sum(t.nbytes for t in tensors)) - 1):
        pred, target, ref = (t.detach().clone() for t in tensors)
        copies.append(LossInputs(pred.requires_grad_(True), target, ref, first.emb_w, first.emb_l))
    return tuple(copies)


def copy_step(case: LossCase, device: torch.device) -> Callable[[], None]:
    """Copying 2N elements reads 2N and writes 2N: the 4N the loss must move at least. Cold
    sources in turn, one destination (as the gradient reuses the block the allocator kept)."""
    sync = _sync(device)
    first = torch.empty(2 * case.numel, dtype=DTYPES[case.dtype], device=device).normal_()
    sources = itertools.cycle([first] + [first.clone() for _ in range(ring_length(first.nbytes) - 1)])
    dst = torch.empty_like(first)
    return lambda: (dst.copy_(next(sources)), sync())


def dirty_cache_step(device: torch.device) -> Callable[[], None]:
    sync, scratch, values = _sync(device), torch.empty(DIRTY_BYTES // 4, device=device), itertools.count()
    return lambda: (scratch.fill_(float(next(values) % 1024)), sync())


def loss_step(fn: Callable[[LossInputs], torch.Tensor], ring: Tuple[LossInputs, ...]) -> Callable[[], tuple]:
    """Forward + backward on the next inputs of ``ring``; the gradient is returned, not
    accumulated into ``.grad`` (which would add a pass)."""
    sync, turn = _sync(ring[0].model_pred.device), itertools.cycle(ring)

    def step():
        inputs = next(turn)
        loss = fn(inputs)
        (grad,) = torch.autograd.grad(loss, [inputs.model_pred])
        sync()
        return loss.detach(), grad

    return step


def warm_up(step: Callable[[], object]) -> Tuple[float, float]:
    """(the first call's time, compilation included; the fastest of up to 5 more, or 0.5 s)."""
    start = time.perf_counter()
    step()
    first, calls = time.perf_counter() - start, []
    while len(calls) < 5 and (not calls or sum(calls) < 0.5):
        start = time.perf_counter()
        step()
        calls.append(time.perf_counter() - start)
    return first, min(calls)


def interleaved(steps: Dict[str, Callable[[], object]],
                before_each: Callable[[], None]) -> Tuple[Callable[[], None], Dict[str, List[float]]]:
    """A round calls each step once, each timed by itself after an untimed ``before_each``;
    each round starts one step further. ``times[name][r]``: round r. The implementations of a
    case meet the same moments of a shared machine, whose bandwidth moves by a third within minutes."""
    names, starts = list(steps), itertools.count()
    times: Dict[str, List[float]] = {name: [] for name in names}

    def one_round() -> None:
        first = next(starts) % len(names)
        for name in names[first:] + names[:first]:
            before_each()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    return one_round, times


def paired_ratio(numerator: List[float], denominator: List[float]) -> float:
    """The median over rounds of ``numerator[r] / denominator[r]``: an interrupted call moves one
    round's ratio, not the result."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def saved_for_backward(loss: Callable[[], torch.Tensor], inputs: LossInputs) -> Tuple[int, int]:
    """Bytes one forward's graph keeps for backward, by storage: ``(all, beyond the inputs)``."""
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


# Rounding of a float32 implementation against the float64 truth: a mean of D squares in float32
# is off by about LAMBDA sqrt(D) u relatively (the probabilistic bound of Higham and Mary, SIAM
# J. Sci. Comput. 2019, holding with probability 1 - 3e-8); the worst case D u would accept a
# loss off by its own size at SD latents.
U32, LAMBDA = 2.0**-24, 6.0
OUTPUT_U = {"fp32": 0.0, "bf16": 2.0**-8}  # the gradient's rounding to model_pred's dtype
SOFTPLUS_XF1 = 0.2785  # max |x f'(x)| for f(x) = softplus(-x)
SOFTPLUS_F1_XF2 = 1.224  # max |f'(x) + x f''(x)|


@functools.lru_cache(maxsize=1)
def _truth(case: LossCase, device: str) -> Tuple[float, torch.Tensor, float, float]:
    """Loss and gradient in float64 (the reference on float64 copies) and first-order bounds for
    a float32 implementation: per-sample errors off by (LAMBDA sqrt(D) + 3) u, moving the loss by
    sum |dL/de_k| (e_k + r_k) times that and each dL/de_k by its Jacobian row; for rpo the
    weights off by rho (cosines of E-dim embeddings over tau, through the softmax); the pair
    stage's own sums; the gradient's 4 roundings and its rounding to the input dtype."""
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
    scale = (errors.detach() + ref_err) * (LAMBDA * math.sqrt(d) + 3) * U32
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
    """Relative errors of a loss and gradient against the float64 truth, and their bounds."""
    true_loss, true_grad, loss_bound, grad_bound = _truth(case, str(result[1].device))
    loss, grad = result
    scale, grad_scale = max(abs(true_loss), 1e-300), float(true_grad.abs().max()) or 1e-300
    return {"loss_rel_err": abs(float(loss) - true_loss) / scale, "loss_rel_bound": loss_bound / scale,
            "grad_rel_err": float((grad.double() - true_grad).abs().max()) / grad_scale,
            "grad_rel_bound": grad_bound / grad_scale}


def measure(case: LossCase, profile: Profile, device: torch.device) -> List[Dict[str, object]]:
    """One row per rpo-fast backend: its fastest call, the baselines' fastest calls, the paired
    ratios, the bytes kept for backward and the agreement with the float64 truth."""
    ring = input_ring(case, str(device))
    fns = {impl: loss_fn(case, impl, profile.compile_backend) for impl in impls_for(device) if impl != "copy"}
    steps = {"copy": copy_step(case, device), **{impl: loss_step(fn, ring) for impl, fn in fns.items()}}
    warm = {impl: warm_up(step) for impl, step in steps.items()}
    one_round, times = interleaved(steps, dirty_cache_step(device))
    per_round = sum(call for _, call in warm.values())
    rounds = profile.min_rounds if profile.target_s <= 0 else math.ceil(profile.target_s * len(steps) / max(per_round, 1e-7))
    for _ in range(min(max(rounds, profile.min_rounds), profile.max_rounds)):
        one_round()
    inputs = cached_inputs(case, str(device))
    saved = {impl: saved_for_backward(lambda: fn(inputs), inputs)[1] for impl, fn in fns.items()}
    rows = []
    for impl in fns:
        if impl in BASELINES:
            continue
        errors = agreement(case, steps[impl]())
        if errors["loss_rel_err"] > errors["loss_rel_bound"] or errors["grad_rel_err"] > errors["grad_rel_bound"]:
            raise SystemExit(f"{case.id}: {impl} is off the float64 truth by more than rounding: {errors}")
        rows.append({**asdict(case), "backend": impl, "time_s": min(times[impl]),
                     **{f"{base}_s": min(times[base]) for base in BASELINES},
                     "compile_first_call_s": warm["compiled"][0], "rounds": len(times[impl]),
                     "speedup_eager": paired_ratio(times["eager"], times[impl]),
                     "speedup_compiled": paired_ratio(times["compiled"], times[impl]),
                     "byte_bound": paired_ratio(times["copy"], times[impl]),
                     "saved_extra_bytes": saved[impl], "eager_saved_extra_bytes": saved["eager"],
                     "compiled_saved_extra_bytes": saved["compiled"], **errors})
    return rows


def markdown(results: Dict[str, object]) -> str:
    mib = 2**20
    rows = sorted(results["rows"], key=lambda r: (r["latents"], r["method"], r["dtype"], r["pairs"], r["backend"]))
    return "\n".join([
        f"# Loss forward + backward on {results['machine']['slug']}", "", machine_line(results["machine"]), "",
        f"Profile `{results['profile']}`, measured {results['created']} at commit `{results['commit']}`, load average "
        f"{results['load_average']} before. Fastest calls in ms; `×eager`, `×compiled`: per-round speedup over the "
        "eager and the compiled eager loss; `bound`: copy time / time (1.0 moves the loss's minimal bytes as fast as "
        "a copy); saved: MiB kept for backward beyond the inputs. docs/benchmarks.md explains the method.", "",
        f"![speedup]({results['name']}.png)", "",
        table(["latents", "M", "dtype", "method", "backend", "ms", "eager ms", "compiled ms", "copy ms", "×eager",
               "×compiled", "bound", "saved MiB", "eager saved", "compiled saved"],
              [[r["latents"], str(r["pairs"]), r["dtype"], r["method"], r["backend"], f"{1e3 * r['time_s']:.3f}",
                f"{1e3 * r['eager_s']:.3f}", f"{1e3 * r['compiled_s']:.3f}", f"{1e3 * r['copy_s']:.3f}",
                f"{r['speedup_eager']:.1f}", f"{r['speedup_compiled']:.2f}", f"{r['byte_bound']:.2f}",
                f"{r['saved_extra_bytes'] / mib:.2f}", f"{r['eager_saved_extra_bytes'] / mib:.2f}",
                f"{r['compiled_saved_extra_bytes'] / mib:.2f}"] for r in rows]), ""])


def plot(results: Dict[str, object], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["method"] == "rpo"]
    panels = sorted({(r["latents"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (latents, dtype) in zip(axes[0], panels):
        for k, backend in enumerate(sorted({r["backend"] for r in rows})):
            sel = sorted((r for r in rows if (r["latents"], r["dtype"], r["backend"]) == (latents, dtype, backend)),
                         key=lambda r: r["pairs"])
            for metric, style in (("speedup_eager", "-"), ("speedup_compiled", "--"), ("byte_bound", ":")):
                ax.plot([r["pairs"] for r in sel], [r[metric] for r in sel], marker="o", linestyle=style,
                        color=f"C{k}", label=f"{backend} {metric.replace('speedup_', 'vs ')}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set(xscale="log", yscale="log", xlabel="pairs M", ylabel="ratio", title=f"rpo, {latents}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Loss forward+backward on {results['machine']['slug']}: speedups and byte-bound fraction")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=PROFILES, default="full")
    p.add_argument("--quick", dest="profile", action="store_const", const="quick", help="same as --profile quick")
    p.add_argument("--smoke", dest="profile", action="store_const", const="smoke", help="same as --profile smoke")
    p.add_argument("-k", dest="keyword", default="", help="only the cases whose id contains this, e.g. sdxl-M16")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--name", default=None, help="file stem (default: loss-<machine>, plus -quick or -smoke)")
    args = p.parse_args(argv)
    keep_freed_host_memory()  # before anything is timed (harness.keep_freed_host_memory)
    profile, device, info = PROFILES[args.profile], bench_device(), machine_info()
    cases = [c for c in profile.cases if args.keyword in c.id]
    if not cases:
        p.error(f"-k: expected part of a case id such as {profile.cases[0].id!r}, got {args.keyword!r}")
    warn_if_busy(info)
    name = args.name or f"loss-{info['slug']}" + ("" if args.profile == "full" else f"-{args.profile}")
    results = {"name": name, "machine": info, "profile": args.profile, **stamp(),
               "backends": rpo_fast.available_backends(), "rows": []}
    for i, case in enumerate(cases):
        for row in measure(case, profile, device):
            results["rows"].append(row)
            print(f"[{i + 1}/{len(cases)}] {case.id} {row['backend']}: {1e3 * row['time_s']:.2f} ms, x"
                  f"{row['speedup_eager']:.1f} eager, x{row['speedup_compiled']:.2f} compiled, "
                  f"{row['byte_bound']:.2f} of the byte bound", flush=True)
    write_json(args.out / f"{name}.json", results)
    (args.out / f"{name}.md").write_text(markdown(results))
    plot(results, args.out / f"{name}.png")
    print(f"benchmarks: wrote {args.out / name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
