"""Whisper: an encoder-decoder transformer over log-mel spectrograms.

Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision", figure 1:
  encoder: 2 x (Conv1d k=3, GELU), the second with stride 2 (3,000 frames -> 1,500 positions)
           -> + sinusoidal positions -> pre-norm blocks -> LayerNorm
  decoder: token embedding + learned positions -> pre-norm blocks with cross-attention over the
           encoder output -> LayerNorm -> logits through the (tied) token embedding.

Every block is `nn.Block` (its attention is `nn.Attention`); nothing here computes attention.
The config lives beside the model (not in config.py) so that its presets, its converters and its
tasks read it from the file that defines the architecture; `WhisperConfig` still round-trips
through JSON like every other config.

Generation goes through the shared `generation.py`: `Whisper.decoding(states)` binds an encoder
output to the decoder and offers the `forward(ids, attention_mask=, cache=)` / `new_cache`
contract. The cross-attention keys and values of the encoder output are projected once per
window, into the KV cache (`KVCache.context_kv`), instead of once per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polymodal.config import WhisperConfig
from polymodal.models.lm import IGNORE_INDEX
from polymodal.nn import Block, KVCache, split_linear


@dataclass
class WhisperOutput:
    logits: Tensor  # (B, T, vocab_size)
    loss: Tensor | None = None  # next-token cross-entropy when targets are given


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> Tensor:
    """(length, channels): sin on the first half of the channels, cos on the second (Whisper's table)."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]  # (length, channels / 2)
    return torch.cat([t.sin(), t.cos()], dim=1)


class WhisperEncoder(nn.Module):
    """mel (B, n_mels, T) -> (B, T / 2, width). T is at most 2 * max_source_positions; a shorter
    input is a trimmed context (whisper.cpp's audio_ctx): faster, and not what the model trained on."""

    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv1d(cfg.n_mels, w, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(w, w, kernel_size=3, stride=2, padding=1)
        self.register_buffer("pos_embed", sinusoids(cfg.max_source_positions, w))  # (positions, width)
        self.blocks = nn.ModuleList(
            Block(w, cfg.encoder_heads, cfg.encoder_mlp_dim, act="gelu", norm="layer", eps=cfg.norm_eps)
            for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps)

    def forward(self, mel: Tensor) -> Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.cfg.n_mels:
            raise ValueError(f"the encoder reads (batch, {self.cfg.n_mels} mels, frames), got {tuple(mel.shape)}")
        if mel.shape[2] > self.cfg.n_frames:
            raise ValueError(f"{mel.shape[2]} frames exceed the encoder's window of {self.cfg.n_frames}")
        x = F.gelu(self.conv1(mel))  # (B, width, T)
        x = F.gelu(self.conv2(x))  # (B, width, T / 2)
        x = x.transpose(1, 2)  # (B, T / 2, width)
        x = x + self.pos_embed[: x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class WhisperDecoder(nn.Module):
    """ids (B, T) and the encoder output (B, S, width) -> logits (B, T, vocab_size)."""

    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embed = nn.Embedding(cfg.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_target_positions, w))  # learned
        self.blocks = nn.ModuleList(
            Block(w, cfg.decoder_heads, cfg.decoder_mlp_dim, act="gelu", norm="layer", eps=cfg.norm_eps,
                  cross_dim=w)
            for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, ids: Tensor, context: Tensor, *, cache: KVCache | None = None, eager: bool = False) -> Tensor:
        return F.linear(self.states(ids, context, cache=cache, eager=eager), self.token_embed.weight)

    def states(self, ids: Tensor, context: Tensor, *, cache: KVCache | None = None, eager: bool = False) -> Tensor:
        """The final hidden states (B, T, width) that the logits read."""
        B, T = ids.shape
        past = cache.length() if cache is not None else 0
        if past + T > self.cfg.max_target_positions:
            raise ValueError(f"{past + T} tokens exceed the decoder's {self.cfg.max_target_positions} positions")
        x = self.token_embed(ids) + self.pos_embed[past:past + T]  # (B, T, width)
        for i, block in enumerate(self.blocks):
            x = block(x, context, causal=True, cache=cache, layer=i, eager=eager)
        return self.norm(x)


class Whisper(nn.Module):
    """The speech recogniser: `forward(mel, ids, targets=None)`; `encode`, then `decoding` to generate."""

    def __init__(self, cfg: WhisperConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = WhisperEncoder(cfg)
        self.decoder = WhisperDecoder(cfg)

    def encode(self, mel: Tensor) -> Tensor:
        """mel (B, n_mels, T) -> (B, T / 2, width)."""
        return self.encoder(mel)

    def forward(self, mel: Tensor, ids: Tensor, targets: Tensor | None = None, *, eager: bool = False) -> WhisperOutput:
        """mel (B, n_mels, T), ids (B, L) -> logits (B, L, vocab). targets (B, L): the ids themselves,
        -100 where no loss is wanted; the loss predicts targets[:, t + 1] from position t."""
        logits = self.decoder(ids, self.encode(mel), eager=eager)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets[:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX)
        return WhisperOutput(logits=logits, loss=loss)

    def decoding(self, states: Tensor) -> WhisperDecoding:
        return WhisperDecoding(self, states)


class WhisperDecoding:
    """The decoder bound to one encoder output (B, S, width): the model contract of `generation.py`.

    Beam search asks for a cache of B * K rows; the encoder output is repeated K times, once, and
    the cache keeps each layer's cross-attention keys and values of it (projected at the first
    step). Usable as a context manager (`close` lets go of the repeated encoder output)."""

    def __init__(self, model: Whisper, states: Tensor):
        self.model, self.states = model, states
        self.context = states

    def _bind(self, batch: int) -> None:
        B = self.states.shape[0]
        if batch % B:
            raise ValueError(f"{batch} decoding rows cannot share {B} encoder outputs")
        if self.context.shape[0] != batch:
            self.context = self.states if batch == B else self.states.repeat_interleave(batch // B, dim=0)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        cfg, p = self.model.cfg, self.model.decoder.token_embed.weight
        self._bind(batch)
        return KVCache(cfg.decoder_layers, batch, cfg.decoder_heads, max_len, cfg.width // cfg.decoder_heads,
                       dtype=p.dtype, device=p.device)

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.decoder.token_embed(ids)

    def __call__(self, ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                 attention_mask: Tensor | None = None, cache: KVCache | None = None) -> WhisperOutput:
        if ids is None:
            raise ValueError("Whisper's decoder reads token ids, not inputs_embeds")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("Whisper prompts are never padded: give every row the same prompt length")
        if self.context.shape[0] != ids.shape[0]:
            self._bind(ids.shape[0])
        decoder = self.model.decoder
        h = decoder.states(ids, self.context, cache=cache)
        # the logits in blocks over torch's threads (nn/layout.py): a step's largest product
        return WhisperOutput(logits=split_linear(h, decoder.token_embed.weight))

    def close(self) -> None:
        self.context = self.states

    def __enter__(self) -> WhisperDecoding:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- Whisper's rules for the next token ------------------------------------------------------


def logits_rules(cfg: WhisperConfig, timestamps: bool):
    """hook(scores (R, vocab), history (R, n) new tokens so far) -> scores, as `transformers` applies
    them (SuppressTokensAtBegin, SuppressTokens, then WhisperTimeStampLogitsProcessor):
    no blank or end first; never the suppressed tokens; with timestamps, OpenAI's rules (timestamps
    in pairs, never decreasing, the first at most max_initial_timestamp_index, and a timestamp
    whenever the timestamps together are likelier than any text token)."""
    suppress = torch.tensor(cfg.suppress_tokens, dtype=torch.long)
    begin = torch.tensor(cfg.begin_suppress_tokens, dtype=torch.long)
    ts, eos, no_ts = cfg.timestamp_begin, cfg.eos_token_id, cfg.no_timestamps_token_id
    neg = float("-inf")
    # every step runs this on the CPU: slices and fills of a few rows, no vocabulary-sized temporaries
    # (amax, not max: torch's max also finds the index, about 3x the time over 50,000 scores)

    def hook(scores: Tensor, history: Tensor) -> Tensor:
        scores = scores.clone()
        n = history.shape[1]
        if n == 0 and begin.numel():
            scores.index_fill_(1, begin.to(scores.device), neg)
        if suppress.numel():
            scores.index_fill_(1, suppress.to(scores.device), neg)
        if not timestamps:
            return scores
        scores[:, no_ts].fill_(neg)
        stamps = scores[:, ts:]  # a view: the timestamp tokens
        for r, seq in enumerate(history.tolist()):
            last = n >= 1 and seq[-1] >= ts
            penultimate = n < 2 or seq[-2] >= ts
            if last:
                if penultimate:
                    stamps[r].fill_(neg)  # a pair is complete: text must follow
                else:
                    scores[r, :eos].fill_(neg)  # an opening timestamp: its closing one (or the end) follows
            latest = next((t for t in reversed(seq) if t >= ts), None)
            if latest is not None:  # never back in time
                stamps[r, :latest - ts + (0 if last and not penultimate else 1)].fill_(neg)
        if n == 0:
            scores[:, :ts].fill_(neg)
            if cfg.max_initial_timestamp_index is not None:
                stamps[:, cfg.max_initial_timestamp_index + 1:].fill_(neg)
        # timestamps together likelier than any text token: logsumexp(stamps) > max(text), log-softmax's
        # normaliser being on both sides, is sum(exp(stamps - max(text))) > 1 (a quarter of logsumexp's
        # time here); a max of -inf (all text barred) is clamped so that any possible timestamp wins
        text_max = scores[:, :ts].float().amax(-1).clamp(min=torch.finfo(torch.float32).min)  # (R,)
        pick_time = (stamps.float() - text_max[:, None]).exp().sum(-1) > 1.0  # (R,)
        if bool(pick_time.any()):
            scores[pick_time, :ts] = neg
        return scores

    return hook


__all__ = ["Whisper", "WhisperConfig", "WhisperDecoder", "WhisperDecoding", "WhisperEncoder",
           "WhisperOutput", "logits_rules", "sinusoids"]
