"""Gated cross-attention dense: how a frozen language model starts to look at images.

Alayrac et al. 2022, "Flamingo: a Visual Language Model for Few-Shot Learning", Figure 4:
    x = x + tanh(alpha_xattn) * xattn(norm1(x), media)
    x = x + tanh(alpha_dense) * ffw(norm2(x))
with both gates initialised at zero, so a new block is the identity and the frozen LM's outputs are
unchanged until training opens the gates. Written after IDEFICS (`transformers`'
IdeficsGatedCrossAttentionLayer): RMSNorm or LayerNorm, optional query/key norms, gates that are one
number ("float") or one per channel ("vector"), and a text token that may see no image at all gets
no cross-attention output.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polymodal.nn.attention import Attention
from polymodal.nn.mlp import MLP
from polymodal.nn.norm import make_norm


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, media_dim: int, mlp_dim: int, *, act: str = "swiglu",
                 norm: str = "rms", eps: float = 1e-6, qk_norm: bool = False, gate: str = "float",
                 bias: bool = False):
        super().__init__()
        if gate not in ("float", "vector"):
            raise ValueError(f"unknown gate kind {gate!r}; known: float, vector")
        self.norm1 = make_norm(norm, dim, eps)
        self.xattn = Attention(dim, heads, context_dim=media_dim, bias=bias, cross=True,
                               qk_norm=norm if qk_norm else None, qk_norm_eps=eps)
        self.norm2 = make_norm(norm, dim, eps)
        self.mlp = MLP(dim, mlp_dim, act, bias=bias)
        shape = (1,) if gate == "float" else (1, 1, dim)
        self.attn_gate = nn.Parameter(torch.zeros(shape))  # tanh(0) = 0: the block starts closed
        self.ff_gate = nn.Parameter(torch.zeros(shape))

    def forward(self, x: Tensor, media: Tensor, media_mask: Tensor, *, eager: bool = False) -> Tensor:
        """x: (B, T, dim) text; media: (B, S, media_dim) visual tokens; media_mask: (B, T, S) bool,
        True where text token t may attend to visual token s."""
        sees = media_mask.any(-1)  # (B, T): does the token see any image?
        # a token that sees nothing attends everywhere (no empty softmax row), then is zeroed
        mask = (media_mask | ~sees[..., None])[:, None]  # (B, 1, T, S)
        h = self.xattn(self.norm1(x), media, mask=mask, eager=eager)  # (B, T, dim)
        h = h.masked_fill(~sees[..., None], 0.0)
        x = x + torch.tanh(self.attn_gate) * h
        return x + torch.tanh(self.ff_gate) * self.mlp(self.norm2(x))
