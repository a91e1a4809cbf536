"""The timing every benchmark shares: polymodal and the reference, alternated."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed_pair(a: Callable, b: Callable, repeats: int, *, warmup: bool = True) -> tuple[float, float]:
    """Median seconds of a() and b(), alternated so drifts in machine load hit both sides."""
    if warmup:
        a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)
