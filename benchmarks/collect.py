"""Turns pytest-benchmark's json into the suite's results: measurements, then derived rows.

Loss rows (one per case and rpo-fast backend):
  time_s             forward+backward time: the fastest call (STATISTIC)
  speedup_eager      eager time / time           (the Diffusion-DPO trainers' loss)
  speedup_compiled   compiled eager time / time  (torch.compile of that loss)
  roofline           copy time / time: the minimal bytes (read model_pred, ref_pred and target
                     once, write the gradient once) over this time, as a fraction of the
                     bandwidth a plain copy of as many bytes reached in the same run
                     (these three: the median over rounds of the ratio of the two calls of a
                     round, loss_bench.paired_ratio)
  saved_bytes        bytes autograd keeps for backward (by storage; inputs included)
  saved_extra_bytes  the same without the storages of the inputs
End-to-end rows (one per configuration): pairs/s, peak memory while training (and of set-up)
and set-up time of each loop (profiles.E2E_LOOPS), and each rpo-fast variant's throughput and
training peak memory over the baseline's.
"""

from __future__ import annotations

import statistics
from typing import Dict, Iterable, List, Optional, Tuple

from benchmarks.profiles import E2E_LOOPS

LOSS_KEYS = ("latents", "pairs", "dtype", "method")
# Loss times are the fastest call of each implementation: on a shared 2-core machine a call
# that another process interrupts can take 100x longer (a parallel op waits for its
# descheduled thread), which moves medians by whole factors but rarely the minimum. Ratios
# are per round (an interrupted call makes one round's ratio an outlier, which the median
# ignores). Medians are kept in the measurements.
STATISTIC = "min_s"


def measurements(raw: Dict[str, object]) -> Tuple[List[dict], List[dict]]:
    """(loss, e2e) measurements from a pytest-benchmark json document."""
    loss, e2e = [], []
    for bench in raw.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        stats = bench["stats"]
        if info.get("kind") == "loss":  # one benchmark per case, its implementations interleaved
            for impl, timed in info.pop("impls").items():
                loss.append({**info, "impl": impl, **timed})
        elif info.get("kind") == "e2e":
            info["process_wall_s"] = stats["median"]
            e2e.append(info)
    return loss, e2e


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0:
        return None
    return num / den


def loss_rows(loss: Iterable[dict]) -> List[dict]:
    by_case: Dict[tuple, Dict[str, dict]] = {}
    for m in loss:
        by_case.setdefault(tuple(m[k] for k in LOSS_KEYS), {})[m["impl"]] = m
    rows = []
    for key, impls in by_case.items():
        copy, eager, compiled = impls.get("copy"), impls.get("eager"), impls.get("compiled")
        t = lambda m: m[STATISTIC] if m else None  # noqa: E731
        for impl, m in impls.items():
            if impl in ("copy", "eager", "compiled"):
                continue
            # per-round ratios; results measured before them (no "paired") compared fastest calls
            paired = m.get("paired") or {base: _ratio(t(impls.get(base)), m[STATISTIC])
                                         for base in ("copy", "eager", "compiled")}
            row = dict(zip(LOSS_KEYS, key))
            row.update(
                backend=impl,
                time_s=m[STATISTIC],
                median_s=m["median_s"],
                eager_s=t(eager),
                compiled_s=t(compiled),
                copy_s=t(copy),
                speedup_eager=paired.get("eager"),
                speedup_compiled=paired.get("compiled"),
                roofline=paired.get("copy"),
                copy_gbps=_ratio(m["minimal_bytes"] / 1e9, t(copy)),
                minimal_bytes=m["minimal_bytes"],
                saved_bytes=m.get("saved_bytes"),
                saved_extra_bytes=m.get("saved_extra_bytes"),
                eager_saved_bytes=(eager or {}).get("saved_bytes"),
                eager_saved_extra_bytes=(eager or {}).get("saved_extra_bytes"),
                compiled_saved_extra_bytes=(compiled or {}).get("saved_extra_bytes"),
                loss_rel_err=m.get("loss_rel_err"),
                grad_rel_err=m.get("grad_rel_err"),
            )
            rows.append(row)
    return rows


def e2e_rows(e2e: Iterable[dict]) -> List[dict]:
    by_point: Dict[tuple, Dict[str, dict]] = {}
    for m in e2e:
        by_point.setdefault((m["sweep"], m["pairs"], m["resolution"]), {})[m["loop"]] = m
    rows = []
    for (sweep, pairs, resolution), loops in sorted(by_point.items()):
        row = {"sweep": sweep, "pairs": pairs, "resolution": resolution}
        for loop in E2E_LOOPS:
            m = loops.get(loop)
            row[f"{loop}_pairs_per_s"] = m["pairs_per_s"] if m else None
            row[f"{loop}_step_s"] = statistics.median(m["step_times_s"]) if m else None
            row[f"{loop}_peak_bytes"] = m["train_peak_bytes"] if m else None
            row[f"{loop}_setup_peak_bytes"] = m["setup_peak_bytes"] if m else None
            row[f"{loop}_setup_s"] = m["setup_s"] if m else None
        for loop in E2E_LOOPS[1:]:
            row[f"{loop}_throughput_ratio"] = _ratio(row[f"{loop}_pairs_per_s"], row["baseline_pairs_per_s"])
            row[f"{loop}_memory_ratio"] = _ratio(row[f"{loop}_peak_bytes"], row["baseline_peak_bytes"])
        rows.append(row)
    return rows


# The kernel issue's targets, measured on the cpu backend at SDXL latents with 16 pairs.
LOSS_TARGETS = (("speedup_eager", ">=", 4.0), ("speedup_compiled", ">=", 1.5), ("roofline", ">=", 1 / 1.5))
E2E_TARGETS = (("throughput_ratio", ">=", 2.0), ("memory_ratio", "<", 1.0))
E2E_LOOP_NAMES = {"rpo_fast": "rpo-fast", "rpo_fast_precompute_ref": "rpo-fast --precompute_ref"}


def _check(value: Optional[float], op: str, threshold: float) -> Optional[bool]:
    if value is None:
        return None
    return value >= threshold if op == ">=" else value < threshold


def targets(loss: List[dict], e2e: List[dict]) -> List[dict]:
    """Each target with the measured value and whether it is met (None: not measured here)."""
    out = []
    for dtype in ("fp32", "bf16"):
        for method in ("rpo", "dpo"):
            row = next((r for r in loss if r["backend"] == "cpu" and r["latents"] == "sdxl" and r["pairs"] == 16
                        and r["dtype"] == dtype and r["method"] == method), None)
            for metric, op, threshold in LOSS_TARGETS:
                value = row[metric] if row else None
                out.append({"target": f"cpu backend, SDXL, M=16, {dtype}, {method}: {metric} {op} {threshold:.2f}",
                            "value": value, "met": _check(value, op, threshold)})
    for loop, name in E2E_LOOP_NAMES.items():
        for metric, op, threshold in E2E_TARGETS:
            values = [r[f"{loop}_{metric}"] for r in e2e if r.get(f"{loop}_{metric}") is not None]
            worst = (min(values) if op == ">=" else max(values)) if values else None
            out.append({"target": f"{name} vs baseline, worst configuration: {metric} {op} {threshold:g}",
                        "value": worst, "met": _check(worst, op, threshold)})
    return out


def summarize(loss: List[dict], e2e: List[dict]) -> Dict[str, List[dict]]:
    lrows, erows = loss_rows(loss), e2e_rows(e2e)
    return {"loss_rows": lrows, "e2e_rows": erows, "targets": targets(lrows, erows)}
