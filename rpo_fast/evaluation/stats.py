"""Means with 95% confidence intervals (Student t), without scipy."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t, by integrating the density (trapezoid, 20k intervals)."""
    if x == 0:
        return 0.5
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    grid = np.linspace(0.0, abs(x), 20001)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
    area = float(np.sum((density[1:] + density[:-1]) * 0.5 * (grid[1] - grid[0])))
    return 0.5 + math.copysign(area, x)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (to ~1e-6)."""
    if not 0 < p < 1:
        raise ValueError(f"p: expected a probability in (0, 1), got {p!r}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df: expected a positive int, got {df!r}")
    lo, hi = -1e3, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
    """(mean, half-width of the ``confidence`` t-interval of the mean); half-width is nan
    for fewer than two values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("values: expected at least one value")
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan")
    sem = float(values.std(ddof=1)) / math.sqrt(values.size)
    return mean, t_quantile(0.5 + confidence / 2, values.size - 1) * sem
