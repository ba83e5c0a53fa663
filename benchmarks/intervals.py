"""Student-t 95% confidence intervals, shared by the benchmark scripts."""

from __future__ import annotations

import math
import statistics


def t95(n: int) -> float:
    """The 97.5% quantile of Student's t with ``n − 1`` degrees of freedom (nan for ``n < 2``)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")


def ci(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval); the half-width is nan for fewer than two values."""
    mean = statistics.fmean(values)
    return mean, (t95(len(values)) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan)
