"""The transformer block: attention, optional cross-attention, MLP, each with a residual.

Pre-norm (GPT-2, ViT, CLIP):   x = x + attn(norm1(x)); x = x + xattn(norm_x(x), ctx); x = x + mlp(norm2(x))
Post-norm (BERT, the original): x = norm1(x + attn(x)); x = norm_x(x + xattn(x, ctx)); x = norm2(x + mlp(x))
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from polymodal.nn.attention import Attention, KVCache
from polymodal.nn.mlp import MLP
from polymodal.nn.norm import make_norm


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, *, act: str = "gelu", norm: str = "layer",
                 eps: float = 1e-5, pre_norm: bool = True, kv_heads: int | None = None,
                 head_dim: int | None = None, cross_dim: int | None = None, bias: bool = True,
                 mlp_bias: bool | None = None, out_bias: bool | None = None):
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = make_norm(norm, dim, eps)
        self.attn = Attention(dim, heads, kv_heads=kv_heads, head_dim=head_dim, bias=bias, out_bias=out_bias)
        if cross_dim is not None:
            self.norm_x = make_norm(norm, dim, eps)
            self.xattn = Attention(dim, heads, head_dim=head_dim, context_dim=cross_dim, bias=bias, cross=True)
        else:
            self.xattn = None
        self.norm2 = make_norm(norm, dim, eps)
        self.mlp = MLP(dim, mlp_dim, act, bias=bias if mlp_bias is None else mlp_bias)

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                context_mask: Tensor | None = None, causal: bool = False, cache: KVCache | None = None,
                layer: int = 0, rope: Callable | None = None, eager: bool = False, keep: int | None = None) -> Tensor:
        """x: (B, T, dim); context: (B, S, cross_dim) when the block has cross-attention.
        keep: only the first `keep` positions come out (B, keep, dim), attending to all of x."""
        attn = lambda h: self.attn(h, mask=mask, causal=causal, cache=cache, layer=layer,  # noqa: E731
                                   rope=rope, eager=eager, keep=keep)
        if keep is not None:
            if not self.pre_norm or self.xattn is not None:
                raise ValueError("keep works for a pre-norm block without cross-attention")
            x = x[:, :keep] + attn(self.norm1(x))  # (B, keep, dim)
            return x + self.mlp(self.norm2(x))
        xattn = lambda h: self.xattn(h, context, mask=context_mask, cache=cache, layer=layer, eager=eager)  # noqa: E731
        if self.pre_norm:
            x = x + attn(self.norm1(x))
            if self.xattn is not None and context is not None:
                x = x + xattn(self.norm_x(x))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + attn(x))
        if self.xattn is not None and context is not None:
            x = self.norm_x(x + xattn(x))
        return self.norm2(x + self.mlp(x))
