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


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of one large torch.mm (n x n by n x n), the median of `repeats`: the
    physical limit an fp32 model on this machine can approach."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9
