"""Text towers: CLIP's causal text transformer and a BERT-style bidirectional encoder.

CLIPTextTransformer: Radford et al. 2021 (a GPT-2-like pre-norm transformer with a causal
mask, read out at the end-of-text token). BertEncoder: Devlin et al. 2018 (post-norm,
bidirectional, token-type embeddings, pooled at [CLS] or by the masked mean); it is the
Q-Former's backbone and the layout of frozen sentence encoders such as all-MiniLM-L6-v2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polymodal.config import BertConfig, TextConfig
from polymodal.nn import Block


@dataclass
class TextOutput:
    pooled: Tensor  # (B, width)
    tokens: Tensor  # (B, T, width)


def _check_ids(ids: Tensor, vocab_size: int, context_length: int) -> None:
    if torch.compiler.is_compiling():  # the value checks would break the graph; eager runs check
        return
    if ids.dim() != 2:
        raise ValueError(f"token ids must be (batch, length), got shape {tuple(ids.shape)}")
    if ids.shape[1] > context_length:
        raise ValueError(f"{ids.shape[1]} tokens exceed the context length {context_length}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_dim, act=cfg.act, eps=cfg.norm_eps) for _ in range(cfg.layers)
        )
        self.norm_final = nn.LayerNorm(w, eps=cfg.norm_eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def eot_positions(self, ids: Tensor) -> Tensor:
        """(B,) index of the first end-of-text token (or of the largest id, OpenAI's rule)."""
        if self.cfg.eot_token_id is None:
            return ids.argmax(dim=-1)
        return (ids == self.cfg.eot_token_id).int().argmax(dim=-1)

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, *, eager: bool = False) -> TextOutput:
        """ids: (B, T). Padding after end-of-text needs no mask: the causal mask keeps every
        position at or before end-of-text from seeing it, so `attention_mask` is not used."""
        _check_ids(ids, self.cfg.vocab_size, self.cfg.context_length)
        T = ids.shape[1]
        x = self.token_embed(ids) + self.pos_embed[:T]  # (B, T, width)
        for block in self.blocks:
            x = block(x, causal=True, eager=eager)
        x = self.norm_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), self.eot_positions(ids)]  # (B, width)
        return TextOutput(pooled=pooled, tokens=x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w, padding_idx=cfg.pad_token_id)
        self.pos_embed = nn.Embedding(cfg.context_length, w)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, w)
        self.norm_embed = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_dim, act=cfg.act, eps=cfg.norm_eps, pre_norm=False)
            for _ in range(cfg.layers)
        )

    def embed(self, ids: Tensor, token_types: Tensor | None = None) -> Tensor:
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device)
        types = torch.zeros_like(ids) if token_types is None else token_types
        return self.norm_embed(self.token_embed(ids) + self.pos_embed(pos) + self.type_embed(types))

    def forward(self, ids: Tensor, attention_mask: Tensor | None = None, *, token_types: Tensor | None = None,
                eager: bool = False) -> TextOutput:
        """ids, attention_mask (1 = real token), token_types: (B, T)."""
        _check_ids(ids, self.cfg.vocab_size, self.cfg.context_length)
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        keep = attention_mask.bool()  # (B, T)
        mask = keep[:, None, None, :]  # (B, 1, 1, T): every query may attend to real keys
        x = self.embed(ids, token_types)  # (B, T, width)
        for block in self.blocks:
            x = block(x, mask=mask, eager=eager)
        if self.cfg.pool == "cls":
            pooled = x[:, 0]
        else:
            weights = keep.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # (B, width)
        return TextOutput(pooled=pooled, tokens=x)


def build_text_tower(cfg: TextConfig | BertConfig) -> nn.Module:
    return BertEncoder(cfg) if isinstance(cfg, BertConfig) else CLIPTextTransformer(cfg)
