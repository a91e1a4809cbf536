"""Rotary position embedding (RoPE): queries and keys rotated by an angle that grows with position.

Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position Embedding". Pairs of
channels (i, i + head_dim/2) rotate by position * theta^(-2i/head_dim) — the "rotate_half"
layout of Llama in `transformers`, not the interleaved (2i, 2i + 1) layout of the paper.

Positions are explicit (B, T) ids, so a left-padded batch rotates each row from its own first
real token. `RotaryEmbedding(positions)` returns a `Rotation`, the `rope(t, offset)` hook that
`Attention` calls; it ignores the offset because the positions already include the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotation:
    """cos and sin of every (row, position, channel); rotates (B, heads, T, head_dim) tensors."""

    def __init__(self, cos: Tensor, sin: Tensor):
        self.cos, self.sin = cos, sin  # (B, 1, T, head_dim), broadcast over heads

    def __call__(self, t: Tensor, offset: int = 0) -> Tensor:
        return t * self.cos + rotate_half(t) * self.sin


class RotaryEmbedding(nn.Module):
    """Holds no weights: the frequencies are recomputed in fp32 on every call (head_dim/2 numbers),
    so casting the model to half precision cannot round them."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta

    def inv_freq(self, device: torch.device | str | None = None) -> Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.theta**exponent)  # (head_dim / 2,)

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> Rotation:
        """positions: (B, T) integer ids -> the Rotation for those positions, in `dtype`."""
        freqs = positions[..., None].float() * self.inv_freq(positions.device)  # (B, T, head_dim / 2)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, head_dim)
        return Rotation(angles.cos().to(dtype), angles.sin().to(dtype))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
