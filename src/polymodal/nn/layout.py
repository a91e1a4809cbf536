"""Weight layout for generating on a CPU: one token at a time, x (1, in) @ W.T.

A Linear keeps its weight as (out, in), row-major. For a single input row the product then reads
W one output row at a time, and a large matrix streams from memory at about a third of the speed
it does when its transpose (in, out) is the contiguous one (Whisper tiny.en's 51,864 x 384 logits:
9 ms against 3 ms on one core of this machine's CPU; bench/transcribe.py). `column_major_`
re-lays such weights in place: the same values, the same shape, only the strides change, so
every caller, state dict and optimizer sees the parameter it saw before.
"""

from __future__ import annotations

from torch import Tensor, nn


def column_major_(module: nn.Module, *extra: Tensor) -> nn.Module:
    """Lay out every nn.Linear weight under `module`, and the `extra` weights (a tied LM head read
    through F.linear), so that W.T is contiguous. Weights on the CPU only: a GPU's kernels want
    the usual layout. Returns the module."""
    weights = [m.weight for m in module.modules() if isinstance(m, nn.Linear)] + list(extra)
    for w in weights:
        if w.device.type == "cpu" and w.dim() == 2 and not w.t().is_contiguous():
            w.data = w.data.t().contiguous().t()
    return module


__all__ = ["column_major_"]
