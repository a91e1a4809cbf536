"""The position-wise feed-forward network of a transformer block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
}
GATED = {"swiglu": F.silu, "geglu": F.gelu}


class MLP(nn.Module):
    """Linear -> activation -> Linear; gated variants (SwiGLU, Shazeer 2020) fuse gate and up.

    Gated: `up` projects to 2 x hidden, the first half (gate) through the activation
    multiplies the second half.
    """

    def __init__(self, dim: int, hidden: int, act: str = "gelu", *, bias: bool = True):
        super().__init__()
        if act not in ACTIVATIONS and act not in GATED:
            raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS) + sorted(GATED)}")
        self.act_name = act
        self.gated = act in GATED
        self.act = GATED[act] if self.gated else ACTIVATIONS[act]
        self.up = nn.Linear(dim, 2 * hidden if self.gated else hidden, bias=bias)
        self.down = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (B, T, hidden) or (B, T, 2 * hidden) gated
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(h)
