"""Decoder-only causal language models: the frozen LLM that BLIP-2 and Flamingo prompt.

Two families, one stack of `Block`s (Radford et al. 2018's decoder-only transformer):
  - OPT (Zhang et al. 2022, "OPT: Open Pre-trained Transformer Language Models"): learned
    positions offset by 2, LayerNorm, ReLU MLP, biases, optional project_in / project_out
    around the stack when the embeddings are narrower than the model (OPT-350m);
  - Llama (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models"):
    rotary positions (Su et al. 2021), RMSNorm, SwiGLU, grouped-query attention
    (Ainslie et al. 2023), no biases; Qwen2 is Llama with a bias on q, k and v.

Positions come from the attention mask (cumsum - 1), so a left-padded batch and a continuation
from a KV cache place every real token where `transformers` does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import LMConfig
from polymodal.nn import Block, KVCache, make_norm, one_row_layout_, split_linear
from polymodal.nn.rope import RotaryEmbedding

# OPT's learned position table starts 2 rows in (fairseq kept rows 0-1 for padding).
OPT_POSITION_OFFSET = 2
IGNORE_INDEX = -100


@dataclass
class LMOutput:
    logits: Tensor | None  # (B, T, vocab_size); None when asked for the hidden states alone
    loss: Tensor | None = None  # next-token cross-entropy when targets are given
    hidden: Tensor | None = None  # (B, T, embed_dim): the last hidden states, when asked for (logits=False)


class DecoderLM(nn.Module):
    """embed -> [project_in] -> (+ positions | RoPE in attention) -> blocks -> [norm] -> [project_out] -> head"""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        w, e = cfg.width, cfg.embed_dim
        self.token_embed = nn.Embedding(cfg.vocab_size, e)
        self.project_in = nn.Linear(e, w, bias=False) if e != w else None
        if cfg.family == "opt":
            self.pos_embed = nn.Embedding(cfg.max_positions + OPT_POSITION_OFFSET, w)
            self.rope = None
        else:
            self.pos_embed = None
            self.rope = RotaryEmbedding(cfg.head_size, cfg.rope_theta)
        self.blocks = nn.ModuleList(
            Block(w, cfg.heads, cfg.mlp_dim, act=cfg.act, norm=cfg.norm, eps=cfg.norm_eps,
                  pre_norm=cfg.pre_norm, kv_heads=cfg.kv_heads, head_dim=cfg.head_size,
                  bias=cfg.qkv_bias, out_bias=cfg.out_bias, mlp_bias=cfg.mlp_bias)
            for _ in range(cfg.layers)
        )
        # a post-norm stack (OPT-350m) ends normalised already
        self.norm_final = make_norm(cfg.norm, w, cfg.norm_eps) if cfg.pre_norm else None
        self.project_out = nn.Linear(w, e, bias=False) if e != w else None
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(e, cfg.vocab_size, bias=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)

    def for_decoding(self) -> DecoderLM:
        """On a CPU, lay the weights out for one-token steps (nn/layout.py's `one_row_layout_`): the
        same values; the widening products and the logits are read in two column blocks over two
        threads. SmolLM2 chat on 2 threads: 1.60x transformers at batch 1, 1.17x at batch 8
        (bench/lm_generate.py); 10% and 38% faster than all weights column-major. Training and
        loading are unaffected. Returns self."""
        return one_row_layout_(self, *([self.token_embed.weight] if self.lm_head is None else []))

    def embed(self, ids: Tensor) -> Tensor:
        """ids (B, T) -> (B, T, embed_dim): the space `inputs_embeds` (and soft prompts) live in."""
        return self.token_embed(ids)

    def new_cache(self, batch: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        p = self.token_embed.weight
        return KVCache(self.cfg.layers, batch, self.cfg.kv_heads or self.cfg.heads, max_len, self.cfg.head_size,
                       dtype=dtype or p.dtype, device=device or p.device)

    @staticmethod
    def positions(attention_mask: Tensor | None, past: int, B: int, T: int, device: torch.device) -> Tensor:
        """(B, T) position ids of the new tokens: counted over real tokens only, so left padding
        does not shift them; padding itself gets position 0 (it is never attended to)."""
        if attention_mask is None:
            return torch.arange(past, past + T, device=device).expand(B, T)
        pos = attention_mask.long().cumsum(-1) - 1  # (B, past + T)
        return pos.clamp(min=0)[:, past:]

    @staticmethod
    def _mask(attention_mask: Tensor, T: int) -> Tensor | None:
        """(B, past + T) with 1 = real token -> boolean (B, 1, T, past + T) key mask, or None when
        nothing is padded. A padding query sees every key instead of none, so no softmax row is
        empty (an empty row gives NaN, which would leak through the masked values)."""
        if bool(attention_mask.all()):
            return None
        keep = attention_mask.bool()
        return keep[:, None, None, :] | ~keep[:, None, -T:, None]  # (B, 1, T, past + T)

    def forward(self, ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, cache: KVCache | None = None,
                targets: Tensor | None = None, positions: Tensor | None = None, logits: bool | str = True,
                eager: bool = False, before_block: Callable[[int, Tensor], Tensor] | None = None) -> LMOutput:
        """ids (B, T), or inputs_embeds (B, T, embed_dim) such as soft visual prompts.

        attention_mask (B, past + T): 1 = real token, 0 = (left) padding, covering the cached
        positions too. targets (B, T): the ids themselves, -100 where no loss is wanted; the
        loss predicts targets[:, t + 1] from position t. positions (B, T) overrides the ids
        computed from the mask. before_block(i, x) -> x runs before block i (Flamingo's gated
        cross-attention layers go there). logits=False skips the vocabulary projection and returns
        the last hidden states (`LMOutput.hidden`), for a caller that scores a few positions (`head`);
        logits="last" projects only the last position (B, 1, vocab): a prompt's next token, without
        the (B, T, vocab) product of every position (generation's first step).
        """
        if (ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of ids and inputs_embeds")
        x = self.embed(ids) if inputs_embeds is None else inputs_embeds  # (B, T, embed_dim)
        B, T, _ = x.shape
        past = cache.length() if cache is not None else 0
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (batch, cached + new) = {(B, past + T)}, "
                             f"got {tuple(attention_mask.shape)}")
        if self.pos_embed is not None and past + T > self.cfg.max_positions:
            raise ValueError(f"{past + T} positions exceed the model's {self.cfg.max_positions}")
        if positions is None:
            positions = self.positions(attention_mask, past, B, T, x.device)  # (B, T)

        if self.project_in is not None:
            x = self.project_in(x)  # (B, T, width)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions + OPT_POSITION_OFFSET)
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        mask = self._mask(attention_mask, T) if attention_mask is not None else None
        for i, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(i, x)
            x = block(x, mask=mask, causal=True, cache=cache, layer=i, rope=rope, eager=eager)
        if self.norm_final is not None:
            x = self.norm_final(x)
        if self.project_out is not None:
            x = self.project_out(x)  # (B, T, embed_dim)
        if not logits:
            return LMOutput(logits=None, hidden=x)
        if logits == "last":
            if targets is not None:
                raise ValueError('logits="last" gives no loss: the loss needs every position\'s logits')
            x = x[:, -1:]
        out = self.head(x)  # (B, T, vocab_size), T = 1 for logits="last"

        loss = None
        if targets is not None:
            loss = F.cross_entropy(out[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return LMOutput(logits=out, loss=loss)

    def head(self, hidden: Tensor) -> Tensor:
        """(..., embed_dim) last hidden states -> (..., vocab_size) next-token logits."""
        weight = self.token_embed.weight if self.lm_head is None else self.lm_head.weight
        return split_linear(hidden, weight)  # F.linear unless laid out column-major for decoding
