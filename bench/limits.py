"""What bounds the batch-1 ratios of issue 8 on this CPU: memory bandwidth and small matrix products.

    .venv/bin/python bench/limits.py

Captioning at batch 1 and 8 streams every weight of the LM once per token, and batch-1 image
embedding multiplies 50 tokens by every weight of the ViT. This measures, in one process:
- the fp32 matmul peak (2048^3) and the memory read bandwidth (summing 1 GiB);
- one decode step's matrix products of an OPT-125m-shaped LM (12 layers of 768 -> 768 x 4,
  768 -> 3072, 3072 -> 768, and the 50,272-row head) with torch's fp32 kernels, at 1 and 8 rows,
  in torch's (out, in) weight layout and transposed: time, and weight bytes read per second;
- the same for ViT-B/32 at batch 1 (50 rows): GFLOP/s.
From these it prints the fastest a token could be if the weights streamed at the full read
bandwidth, against what torch's kernels (which both polymodal and transformers call) reach.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from timing import matmul_gflops


def median_time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(gib: float = 1.0) -> float:
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / median_time(x.sum, 5) / 1e9


def linears(shapes: list[tuple[int, int]], rows: int, *, transposed: bool = False) -> tuple[float, int, int]:
    """(seconds, weight bytes, flops) of one pass of `rows` rows through Linear weights of `shapes`."""
    weights = [torch.randn(o, i) for o, i in shapes]
    inputs = {i: torch.randn(rows, i) for _, i in shapes}
    if transposed:
        weights_t = [w.t().contiguous() for w in weights]
        fn = lambda: [inputs[w.shape[0]] @ w for w in weights_t]  # noqa: E731
    else:
        fn = lambda: [F.linear(inputs[w.shape[1]], w) for w in weights]  # noqa: E731
    nbytes = sum(w.numel() for w in weights) * 4
    return median_time(fn), nbytes, 2 * rows * nbytes // 4


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    peak = matmul_gflops()
    bandwidth = read_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: fp32 matmul peak {peak:.1f} GFLOP/s, "
          f"memory read bandwidth {bandwidth:.1f} GB/s")

    opt = [(768, 768)] * 4 * 12 + [(3072, 768), (768, 3072)] * 12 + [(50272, 768)]
    for rows in (1, 8):
        for transposed in (False, True):
            seconds, nbytes, _ = linears(opt, rows, transposed=transposed)
            layout = "(in, out) layout" if transposed else "torch's (out, in)"
            print(f"OPT-125m decode step, {rows} row(s), {layout:17s}: matrix products {seconds * 1e3:5.1f} ms, "
                  f"weights read at {nbytes / seconds / 1e9:4.1f} GB/s; at the full read bandwidth "
                  f"{nbytes / bandwidth / 1e6:4.1f} ms")
    vit = [(768 * 3, 768), (768, 768), (3072, 768), (768, 3072)] * 12
    seconds, nbytes, flops = linears(vit, 50)
    print(f"ViT-B/32 batch 1 (50 rows): matrix products {seconds * 1e3:5.1f} ms, {flops / seconds / 1e9:5.1f} GFLOP/s "
          f"= {flops / seconds / 1e9 / peak:.0%} of peak; compute floor {flops / peak / 1e6:4.1f} ms, "
          f"weight-streaming floor {nbytes / bandwidth / 1e6:4.1f} ms")


if __name__ == "__main__":
    main()
