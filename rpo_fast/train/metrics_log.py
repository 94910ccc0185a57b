"""Metrics: one JSON object per line in ``<output_dir>/metrics.jsonl``, and TensorBoard when
installed. Only rank 0 logs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, Optional

from ..atomic import write_atomic

METRICS_FILE = "metrics.jsonl"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)  # JSON has no NaN/inf
    return value


class MetricsLog:
    def __init__(self, output_dir: Path, enabled: bool, tensorboard: Optional[bool], resume_step: Optional[int]):
        self.enabled = enabled
        self.path = output_dir / METRICS_FILE
        self._tb = None
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise ValueError("tensorboard: requested but the tensorboard package is not installed") from None
            else:
                self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        """Drop lines of steps after the checkpoint we resume from: they are about to be redone."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        write_atomic(self.path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept)))

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
