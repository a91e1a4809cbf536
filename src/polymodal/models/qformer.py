"""The Querying Transformer (Q-Former): learned queries that read a frozen image encoder.

Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders
and Large Language Models", Figure 2. A BERT-style post-norm encoder (Devlin et al. 2018) runs
over `num_query_tokens` learned queries followed, optionally, by text. Queries and text share
each layer's self-attention; only the queries cross-attend to the image features (every
`cross_attention_frequency`-th layer), and queries and text have separate feed-forward networks.
What the two streams see of each other is the mask of the stage-1 objective (Figure 2, right):

    ITC (contrastive)   unimodal: queries see queries, text sees text
    ITM (matching)      bidirectional: every position sees every position
    ITG (generation)    queries see queries; text sees every query and the text up to itself

Queries alone (no text) is what stage 2 feeds the LLM; text alone is ITC's text encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import QFormerConfig
from polymodal.nn import MLP, Attention
from polymodal.nn.mlp import ACTIVATIONS

Mask = Literal["itc", "itm", "itg"]


def stage1_mask(kind: Mask, num_queries: int, text_mask: Tensor) -> Tensor:
    """(B, 1, Q + T, Q + T) boolean mask (True = may attend) over [queries; text] for one objective.

    text_mask (B, T): 1 = real token. No row attends to padding, except that every row attends to
    itself, so a padding row (whose output is never read) never has an empty softmax."""
    B, T = text_mask.shape
    Q, L, dev = num_queries, num_queries + T, text_mask.device
    is_text = torch.arange(L, device=dev) >= Q  # (L,)
    row_text, col_text = is_text[:, None], is_text[None, :]  # (L, 1), (1, L)
    if kind == "itm":
        allowed = torch.ones(L, L, dtype=torch.bool, device=dev)
    elif kind == "itc":
        allowed = row_text == col_text  # two unimodal blocks
    elif kind == "itg":
        causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
        allowed = ~col_text | (row_text & causal)  # all rows see the queries; text sees earlier text
    else:
        raise ValueError(f"unknown Q-Former mask {kind!r}; known: itc, itm, itg")
    real = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=dev), text_mask.bool()], 1)  # (B, L)
    allowed = (allowed & real[:, None, :]) | torch.eye(L, dtype=torch.bool, device=dev)  # (B, L, L)
    return allowed[:, None]  # (B, 1, L, L)


class SharedImage:
    """Cross-attention's keys and values of one batch of image features, projected once per layer and
    shared by every Q-Former pass over those images or rows of them (stage 1's ITC, ITM and ITG
    passes, whose hard negatives are other rows of the same batch). `Attention` takes it as its cache:
    `context_kv` is what cross-attention asks a cache for. select(rows): the same projections, read
    at `rows` (B,) of the batch."""

    def __init__(self, rows: Tensor | None = None, memo: dict | None = None):
        self.rows, self.memo = rows, {} if memo is None else memo

    def select(self, rows: Tensor) -> SharedImage:
        return SharedImage(rows, self.memo)

    def batch(self, image: Tensor) -> int:
        return image.shape[0] if self.rows is None else self.rows.shape[0]

    def context_kv(self, layer: int, context: Tensor, project):
        if layer not in self.memo:
            self.memo[layer] = project(context)  # (N, kv_heads, S, head_dim) twice
        k, v = self.memo[layer]
        return (k, v) if self.rows is None else (k[self.rows], v[self.rows])


@dataclass
class QFormerOutput:
    queries: Tensor | None  # (B, Q, width): the query outputs, or None for text alone
    text: Tensor | None  # (B, T, width): the text outputs, or None for queries alone


class QFormerLayer(nn.Module):
    """One Q-Former layer; post-norm sublayers x = norm(x + f(x)) in BERT's order:

        [queries; text] -- self-attention (shared, under the objective's mask) --> split rows
        queries         -- cross-attention to the image (every k-th layer) --> query FFN
        text            ----------------------------------------------------> text FFN

    The query stream is a post-norm `Block` with cross-attention, part for part (attn / norm1,
    xattn / norm_x, then its own MLP); `Block.forward` itself cannot run it, because rows that
    share one self-attention then take different paths, so the layer composes the same
    `Attention` and `MLP` modules directly.
    """

    def __init__(self, cfg: QFormerConfig, vision_width: int, cross: bool):
        super().__init__()
        w, eps = cfg.width, cfg.norm_eps
        self.attn = Attention(w, cfg.heads)
        self.norm1 = nn.LayerNorm(w, eps=eps)
        self.xattn = Attention(w, cfg.heads, context_dim=vision_width, cross=True) if cross else None
        self.norm_x = nn.LayerNorm(w, eps=eps) if cross else None
        self.query_mlp = MLP(w, cfg.mlp_dim, cfg.act)
        self.query_norm = nn.LayerNorm(w, eps=eps)
        self.text_mlp = MLP(w, cfg.mlp_dim, cfg.act) if cfg.text_input else None
        self.text_norm = nn.LayerNorm(w, eps=eps) if cfg.text_input else None

    def forward(self, x: Tensor, num_queries: int, image: Tensor | None, *, mask: Tensor | None = None,
                image_mask: Tensor | None = None, shared: SharedImage | None = None, index: int = 0,
                eager: bool = False) -> Tensor:
        """x: (B, Q + T, width), queries first; image: (B, S, vision_width); image_mask: (B, 1, 1, S),
        True where the image (or audio) position is real, for a batch of padded encoder outputs.
        shared: image's keys and values, projected once for passes over it (`SharedImage`), the
        layer's `index` keying them."""
        x = self.norm1(x + self.attn(x, mask=mask, eager=eager))  # (B, Q + T, width)
        q, t = x[:, :num_queries], x[:, num_queries:]  # (B, Q, width), (B, T, width)
        if num_queries:
            if self.xattn is not None:
                # only the queries see the image
                q = self.norm_x(q + self.xattn(q, image, mask=image_mask, cache=shared, layer=index, eager=eager))
            q = self.query_norm(q + self.query_mlp(q))
        if t.shape[1]:
            if self.text_mlp is None:
                raise ValueError("this Q-Former has no text side (QFormerConfig.text_input=False)")
            t = self.text_norm(t + self.text_mlp(t))
        return torch.cat([q, t], dim=1)


class LMHead(nn.Module):
    """BERT's language-model head (Devlin et al. 2018), BLIP-2's ITG head on the text outputs:
    dense -> activation -> LayerNorm -> the word embeddings transposed (tied) + a bias."""

    def __init__(self, width: int, vocab_size: int, act: str, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.act = ACTIVATIONS[act]
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        """x: (B, T, width); embedding: (vocab, width) -> (B, T, vocab) logits."""
        return F.linear(self.norm(self.act(self.dense(x))), embedding, self.bias)


def bert_init(module: nn.Module) -> None:
    """BERT's initialisation (normal, std 0.02; zero biases), for a Q-Former trained from scratch:
    `model.apply(bert_init)`. PyTorch's defaults (an N(0, 1) word embedding tied to the ITG head)
    start ITG near a loss of 60."""
    if isinstance(module, nn.Linear | nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


class QFormer(nn.Module):
    """Learned queries (+ text) -> LayerNorm -> Q-Former layers; optional ITG head.

    The text side embeds word + position (no token types); one LayerNorm normalises queries and
    text together, as BLIP-2's BertEmbeddings (transformers: Blip2QFormerModel.layernorm)."""

    def __init__(self, cfg: QFormerConfig, vision_width: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.query_tokens = nn.Parameter(torch.randn(cfg.num_query_tokens, w) * 0.02)
        self.token_embed = self.pos_embed = None
        if cfg.text_input:
            self.pos_embed = nn.Embedding(cfg.context_length, w)
            if cfg.vocab_size:  # else the text comes embedded (forward's text_embeds)
                self.token_embed = nn.Embedding(cfg.vocab_size, w, padding_idx=cfg.pad_token_id)
        self.norm_embed = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, vision_width, cross=i % cfg.cross_attention_frequency == 0) for i in range(cfg.layers)
        )
        self.lm_head = LMHead(w, cfg.vocab_size, cfg.act, cfg.norm_eps) if cfg.lm_head else None

    def embed(self, ids: Tensor | None = None, words: Tensor | None = None) -> Tensor:
        """ids (B, T), or their word embeddings (B, T, width) made elsewhere -> word + position
        embeddings (B, T, width), not yet normalised."""
        if self.pos_embed is None or (words is None and self.token_embed is None):
            raise ValueError("this Q-Former has no text side (QFormerConfig.text_input=False)"
                             if self.pos_embed is None else "this Q-Former has no word embeddings: give text_embeds")
        if words is None:
            words = self.token_embed(ids)
        length = words.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"{length} tokens exceed the Q-Former's context length {self.cfg.context_length}")
        return words + self.pos_embed(torch.arange(length, device=words.device))  # (B, T, width)

    def forward(self, image: Tensor | None = None, ids: Tensor | None = None, attention_mask: Tensor | None = None,
                *, mask: Mask = "itm", image_mask: Tensor | None = None, text_embeds: Tensor | None = None,
                shared: SharedImage | None = None, query_offset: Tensor | None = None,
                eager: bool = False) -> QFormerOutput:
        """image (B, S, vision_width): the frozen encoder's tokens; without it, no queries run
        (ITC's text encoder). ids, attention_mask (B, T), 1 = real token: the text; without it the
        queries run alone. text_embeds (B, T, width) instead of ids: the text's word embeddings, made
        elsewhere (positions are added here). mask: how queries and text see each other ("itc",
        "itm", "itg"). image_mask (B, S), 1 = real: the positions of `image` the queries may read.
        shared: the keys and values of `image` (N, S, vision_width) kept across passes; the batch is
        then its rows (`SharedImage.select`), or all N. query_offset (B, width): added to every
        learned query before the first layer (a question the queries start from)."""
        if ids is not None and text_embeds is not None:
            raise ValueError("give the text as ids or as text_embeds, not both")
        if image is None and ids is None and text_embeds is None:
            raise ValueError("give an image, text ids, or both")
        if mask not in ("itc", "itm", "itg"):
            raise ValueError(f"unknown Q-Former mask {mask!r}; known: itc, itm, itg")
        parts, Q = [], 0
        if image is not None:
            image = image.to(self.query_tokens.dtype)
            Q = self.cfg.num_query_tokens
            B = image.shape[0] if shared is None else shared.batch(image)
            queries = self.query_tokens.expand(B, -1, -1)  # (B, Q, width)
            parts.append(queries if query_offset is None else queries + query_offset[:, None].to(queries.dtype))
        attn_mask = None
        has_text = ids is not None or text_embeds is not None
        if has_text:
            parts.append(self.embed(ids, text_embeds))  # (B, T, width)
            text_mask = attention_mask
            if text_mask is None:
                text_mask = torch.ones(parts[-1].shape[:2], dtype=torch.long, device=parts[-1].device)
            if mask == "itg" or (Q and mask == "itc") or not bool(text_mask.all()):  # else: all see all
                attn_mask = stage1_mask(mask, Q, text_mask)  # (B, 1, Q + T, Q + T)
        x = self.norm_embed(torch.cat(parts, dim=1))  # (B, Q + T, width)
        if image_mask is not None:
            image_mask = image_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        for i, layer in enumerate(self.layers):
            x = layer(x, Q, image, mask=attn_mask, image_mask=image_mask, shared=shared, index=i, eager=eager)
        return QFormerOutput(queries=x[:, :Q] if Q else None, text=x[:, Q:] if has_text else None)

    def text_logits(self, text: Tensor) -> Tensor:
        """ITG: text outputs (B, T, width) -> next-token logits (B, T, vocab)."""
        if self.lm_head is None:
            raise ValueError("this Q-Former has no ITG head (QFormerConfig.lm_head=False)")
        return self.lm_head(text, self.token_embed.weight)
