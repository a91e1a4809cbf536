"""Multi-head attention, written once: self-, cross- and causal attention with a KV cache.

Vaswani et al. 2017, "Attention Is All You Need". Every tower in polymodal (ViT, the CLIP
and BERT text towers, and the later Q-Former, decoder LMs and gated cross-attention)
composes this module. The fast path is `F.scaled_dot_product_attention`; `eager=True`
computes softmax(QK^T / sqrt(d)) V by hand, for checking it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.nn.norm import make_norm


class KVCache:
    """Keys and values of past positions, preallocated per layer.

    `update(layer, k, v)` writes the new positions after the cached ones and returns the
    keys and values of every position so far, each (B, kv_heads, T_past + T_new, head_dim).

    A decoder with cross-attention (Whisper) also keeps each layer's keys and values of the
    context: `context_kv(layer, context, project)` projects them once per context and returns
    them, each (B, kv_heads, S, head_dim) and contiguous, so a step reads them as one stream
    (strided per-head views of the fused projection made cross-attention ~3x slower on a CPU).
    `reorder` leaves them alone: generation reorders rows only within a beam group, whose rows
    share one context.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths = [0] * layers
        self.max_len = max_len
        self.context: list[tuple[Tensor, Tensor, Tensor] | None] = [None] * layers  # (context, k, v)

    def length(self, layer: int = 0) -> int:
        return self.lengths[layer]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        start, new = self.lengths[layer], k.shape[2]
        if start + new > self.max_len:
            raise ValueError(f"KV cache full: {start} + {new} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:start + new] = k
        self.v[layer][:, :, start:start + new] = v
        self.lengths[layer] = start + new
        return self.k[layer][:, :, :start + new], self.v[layer][:, :, :start + new]

    def context_kv(self, layer: int, context: Tensor,
                   project: Callable[[Tensor], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """The keys and values of `context` for this layer: project(context) -> (k, v) the first
        time (and whenever a different context tensor comes), kept contiguous, then reused."""
        held = self.context[layer]
        if held is None or held[0] is not context:
            k, v = project(context)
            held = self.context[layer] = (context, k.contiguous(), v.contiguous())
        return held[1], held[2]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B_new,) of every layer, in that order: beam search's reshuffle."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class Attention(nn.Module):
    """Multi-head attention over `x`, or over `context` when given (cross-attention).

    Self-attention projects queries, keys and values with one fused `qkv` Linear;
    cross-attention projects queries from `x` with `q` and keys and values from the
    context with one fused `kv` Linear. `kv_heads < heads` gives grouped-query attention.
    `qk_norm` ("layer" or "rms") normalises each head's queries and keys before the scores
    (Dehghani et al. 2023; IDEFICS's perceiver and gated cross-attention).
    """

    def __init__(self, dim: int, heads: int, *, kv_heads: int | None = None, context_dim: int | None = None,
                 head_dim: int | None = None, bias: bool = True, out_bias: bool | None = None,
                 cross: bool = False, qk_norm: str | None = None, qk_norm_eps: float = 1e-6):
        super().__init__()
        if heads < 1 or (head_dim is None and dim % heads):
            raise ValueError(f"width {dim} cannot be split into {heads} heads")
        self.heads = heads
        self.kv_heads = kv_heads or heads
        self.head_dim = head_dim or dim // heads
        self.cross = cross
        if heads % self.kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({self.kv_heads})")
        q_dim, kv_dim = heads * self.head_dim, self.kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(dim, q_dim, bias=bias)
            self.kv = nn.Linear(context_dim or dim, 2 * kv_dim, bias=bias)
        else:
            self.qkv = nn.Linear(dim, q_dim + 2 * kv_dim, bias=bias)
        self.out = nn.Linear(q_dim, dim, bias=bias if out_bias is None else out_bias)
        if qk_norm is not None:
            self.q_norm = make_norm(qk_norm, self.head_dim, qk_norm_eps)
            self.k_norm = make_norm(qk_norm, self.head_dim, qk_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _split(self, t: Tensor, heads: int) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                causal: bool = False, cache: KVCache | None = None, layer: int = 0,
                rope: Callable[[Tensor, int], Tensor] | None = None, eager: bool = False,
                keep: int | None = None) -> Tensor:
        """x: (B, T, dim); context: (B, S, context_dim) for cross-attention.

        mask: boolean (True = may attend) or additive float, broadcastable to (B, heads, T, S).
        rope(t, offset) rotates queries and keys (B, heads, T, head_dim) at positions from offset.
        keep: only the first `keep` positions' outputs (B, keep, dim), their queries still seeing
        every key: a ViT's last block needs only its class token. Not with causal, cache or rope.
        """
        if keep is not None and (causal or cache is not None or rope is not None or self.cross):
            raise ValueError("keep works for plain self-attention only (no causal mask, cache, rope or context)")
        B, T, _ = x.shape
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.cross:
            if context is None:
                raise ValueError("cross-attention needs a context")
            q = self._split(self.q(x), self.heads)
            project = lambda c: tuple(self._split(t, self.kv_heads) for t in self.kv(c).split(kv_dim, dim=-1))  # noqa: E731
            k, v = project(context) if cache is None else cache.context_kv(layer, context, project)
        else:
            q, k, v = self.qkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
            q, k, v = self._split(q, self.heads), self._split(k, self.kv_heads), self._split(v, self.kv_heads)
        if keep is not None:
            q, T = q[:, :, :keep], keep  # (B, heads, keep, head_dim)
            mask = mask[..., :keep, :] if mask is not None and mask.dim() == 4 and mask.shape[-2] > 1 else mask
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # over head_dim, before positions and the cache

        past = cache.length(layer) if cache is not None and not self.cross else 0
        if rope is not None:
            q, k = rope(q, past), rope(k, past)
        if cache is not None and not self.cross:
            k, v = cache.update(layer, k, v)  # (B, kv_heads, past + T, head_dim)
        if eager and self.kv_heads != self.heads:  # SDPA shares kv heads itself (enable_gqa), no copy
            repeat = self.heads // self.kv_heads
            k = k.repeat_interleave(repeat, dim=1)  # (B, heads, S, head_dim)
            v = v.repeat_interleave(repeat, dim=1)

        if causal and T == 1 and mask is None:
            causal = False  # one new query sees every cached key: no mask to build
        elif causal and (past > 0 or mask is not None):
            # SDPA's is_causal aligns the mask top-left, which is wrong once a prefix is cached;
            # spell it out: query i (at position past + i) sees keys 0 .. past + i.
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            mask = _merge_masks(mask, allowed, q.dtype)
            causal = False
        y = (_eager_attention if eager else _sdpa)(q, k, v, mask, causal)  # (B, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, q_dim)  # (B, T, heads * head_dim)
        return self.out(y)


def _merge_masks(mask: Tensor | None, allowed: Tensor, dtype: torch.dtype) -> Tensor:
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return torch.where(allowed, mask, torch.finfo(dtype).min)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    gqa = k.shape[1] != q.shape[1]  # grouped-query: each kv head serves heads / kv_heads query heads
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, T, S)
    if causal:
        T, S = scores.shape[-2:]
        mask = _merge_masks(mask, torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), q.dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1) @ v
